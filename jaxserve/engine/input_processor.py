"""Admission: parse a prompt (str, token ids or dict), tokenize, and validate it against limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import EngineConfig
from .errors import InvalidRequestError, require_utf8
from .sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    max_tokens: int  # resolved (max_tokens=None -> what is left of max_model_len)


# A text longer than this many characters per allowed token is first tokenized in part: when the
# part alone is over max_model_len the whole text is refused without tokenizing it in full.
PROBE_CHARS_PER_TOKEN = 8


def parse_prompt(prompt: PromptType, tokenizer: Any | None,
                 max_model_len: int | None = None) -> tuple[str | None, list[int]]:
    """Returns (prompt text or None, prompt token ids). With `max_model_len`, a text that cannot
    fit is refused after tokenizing a bounded prefix of it."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            text = prompt.get("prompt")
            return (text if isinstance(text, str) else None), _as_token_ids(
                prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return parse_prompt(prompt["prompt"], tokenizer, max_model_len) if isinstance(
                prompt["prompt"], str) else _bad_prompt(prompt)
        return _bad_prompt(prompt)
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        if tokenizer is None:
            raise InvalidRequestError("prompt", "a text prompt needs a tokenizer; pass token ids")
        return prompt, _encode_bounded(require_utf8("prompt", prompt), tokenizer, max_model_len)
    if isinstance(prompt, (list, tuple)):
        return None, _as_token_ids(prompt)
    return _bad_prompt(prompt)


def _encode_bounded(text: str, tokenizer: Any, max_model_len: int | None) -> list[int]:
    if max_model_len is not None:
        probe = PROBE_CHARS_PER_TOKEN * (max_model_len + 2)
        if len(text) > probe:
            # Tokens of a prefix are the text's own tokens but for the last one or two.
            n = len(tokenizer.encode(text[:probe]))
            if n > max_model_len + 2:
                raise InvalidRequestError(
                    "prompt", f"the prompt has more than {n - 2} tokens; max_model_len is "
                              f"{max_model_len}")
    return list(tokenizer.encode(text))


def _bad_prompt(prompt: Any):
    raise InvalidRequestError(
        "prompt",
        f"expected a str, a list of token ids, {{'prompt_token_ids': [...]}} or "
        f"{{'prompt': str}}, got {type(prompt).__name__}",
    )


def _as_token_ids(ids: Any) -> list[int]:
    try:
        out = [int(t) for t in ids]
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError("prompt_token_ids", "must be a list of ints") from exc
    if any(isinstance(t, bool) or int(t) != t for t in ids):
        raise InvalidRequestError("prompt_token_ids", "must be a list of ints")
    return out


def validate_request(
    token_ids: list[int], params: SamplingParams, config: EngineConfig, has_tokenizer: bool
) -> int:
    """Check a tokenized request against the engine's limits; returns the resolved max_tokens."""
    config.limits.check(params)
    if not token_ids:
        raise InvalidRequestError("prompt", "must not be empty (it has no tokens)")
    bad = [t for t in token_ids if t < 0 or t >= config.vocab_size]
    if bad:
        raise InvalidRequestError(
            "prompt_token_ids",
            f"token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})",
        )
    n = len(token_ids)
    if n >= config.max_model_len:
        raise InvalidRequestError(
            "prompt",
            f"the prompt has {n} tokens; max_model_len is {config.max_model_len} "
            "(at least one token must be generated)",
        )
    max_tokens = params.max_tokens if params.max_tokens is not None else config.max_model_len - n
    if n + max_tokens > config.max_model_len:
        raise InvalidRequestError(
            "max_tokens",
            f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
            f"({config.max_model_len})",
        )
    if params.min_tokens > max_tokens:
        raise InvalidRequestError("min_tokens", f"must be <= max_tokens ({max_tokens})")
    if params.prompt_logprobs is not None and not config.enable_prompt_logprobs:
        raise InvalidRequestError(
            "prompt_logprobs",
            "not enabled on this engine (enable_prompt_logprobs, --enable-prompt-logprobs)",
        )
    _check_vocab_ids("logit_bias", list(params.logit_bias or ()), config.vocab_size)
    _check_vocab_ids("stop_token_ids", params.stop_token_ids or [], config.vocab_size)
    _check_bias_width(params, config)
    if params.stop and not has_tokenizer:
        raise InvalidRequestError("stop", "stop strings need a tokenizer")
    return max_tokens


def _check_bias_width(params: SamplingParams, config: EngineConfig) -> None:
    """logit_bias + the ids banned until min_tokens must fit the sampler's bias row."""
    banned: set[int] = set()
    if params.min_tokens > 0:
        banned.update(params.all_stop_token_ids)
        if not params.ignore_eos:
            banned.update(config.eos_token_ids)
    total = len(params.logit_bias or ()) + len(banned)
    if total > config.max_biased_token_ids:
        field = "stop_token_ids" if banned else "logit_bias"
        raise InvalidRequestError(
            field, f"logit_bias ({len(params.logit_bias or ())} ids) plus the ids banned until "
            f"min_tokens ({len(banned)}) exceed the sampler's {config.max_biased_token_ids}")


def _check_vocab_ids(field: str, ids: list[int], vocab_size: int) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(field, f"token id {t} is outside [0, {vocab_size})")
