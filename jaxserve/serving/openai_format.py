"""Shapes of OpenAI responses: usage, logprobs (completions and chat), chat prompt rendering."""

from __future__ import annotations

from typing import Any

from jaxserve.engine.errors import InvalidRequestError


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def usage_of(outputs: list[Any]) -> dict:
    """Usage summed over the (finished) RequestOutputs of one API call."""
    prompt = sum(len(o.prompt_token_ids or []) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(int(o.num_cached_tokens or 0) for o in outputs)
    return usage_dict(prompt, completion, cached)


class TokenText:
    """Decoded text of single tokens (for logprobs), from the engine's Logprob or the tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int, logprob: Any) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])


def _top(position: dict[int, Any], k: int) -> list[tuple[int, Any]]:
    ranked = sorted(position.items(), key=lambda kv: kv[1].rank or 0)
    return [(t, lp) for t, lp in ranked if lp.rank is not None and lp.rank <= k][:k]


def completion_logprobs(token_ids: list[int], positions: list[dict[int, Any]], k: int,
                        text_offset: int, token_text: TokenText) -> dict:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for token_id, position in zip(token_ids, positions):
        sampled = position.get(token_id)
        text = token_text(token_id, sampled)
        tokens.append(text)
        token_logprobs.append(None if sampled is None else float(sampled.logprob))
        top = {token_text(t, lp): float(lp.logprob) for t, lp in _top(position, k)}
        if sampled is not None:
            top.setdefault(text, float(sampled.logprob))
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": max(float(logprob), -9999.0),
            "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], positions: list[dict[int, Any]], k: int,
                  token_text: TokenText) -> dict:
    """Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    content = []
    for token_id, position in zip(token_ids, positions):
        sampled = position.get(token_id)
        entry = _entry(token_text(token_id, sampled),
                       sampled.logprob if sampled is not None else float("-inf"))
        entry["top_logprobs"] = [_entry(token_text(t, lp), lp.logprob)
                                 for t, lp in _top(position, k)]
        content.append(entry)
    return {"content": content}


def prompt_logprobs_json(output: Any, token_text: TokenText) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first (nothing precedes it),
    else {token id: {"logprob", "rank", "decoded_token"}} holding the prompt token itself and
    the `prompt_logprobs` most likely tokens. None when the request did not ask for them."""
    if output.prompt_logprobs is None:
        return None
    return [
        None if position is None else {
            str(t): {"logprob": max(float(lp.logprob), -9999.0), "rank": lp.rank,
                     "decoded_token": token_text(t, lp)}
            for t, lp in position.items()
        }
        for position in output.prompt_logprobs
    ]


def refuse_streamed_prompt_logprobs(body: Any) -> None:
    """Prompt logprobs come in whole responses only (vLLM refuses them with stream=true)."""
    if body.stream and body.prompt_logprobs is not None:
        raise InvalidRequestError("prompt_logprobs", "is not available when stream is true")


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool,
                continue_final_message: bool = False,
                template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **(template_kwargs or {}))
        except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
            raise InvalidRequestError("messages", f"chat template failed: {exc}") from exc
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant:"
    return tokenizer.encode(text, add_special_tokens=False)
