"""Conversions between jaxserve.v1 protobuf messages and the engine's Python types."""

from __future__ import annotations

from typing import Any

from jaxserve.engine.errors import InvalidRequestError
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.structured_outputs import StructuredOutputsParams
from jaxserve.serving.deltas import CompletionDelta
from jaxserve.serving.proto import jaxserve_pb2 as pb

# Proto scalars (proto3 `optional`) copied to SamplingParams only when set.
_SCALAR_FIELDS = (
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
    "top_k", "min_p", "seed", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "skip_special_tokens", "include_stop_str_in_output",
)


def sampling_params_from_proto(msg: pb.SamplingParams,
                               defaults: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from the message; unset fields take the server's `defaults`
    (generation_config.json), else the Python defaults.

    Raises InvalidRequestError (a ValueError naming the field) for invalid values.
    """
    kwargs: dict[str, Any] = dict(defaults or {})
    for name in _SCALAR_FIELDS:
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    if msg.stop:
        kwargs["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.logit_bias:
        kwargs["logit_bias"] = dict(msg.logit_bias)
    if msg.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_outputs_from_proto(msg.structured_outputs)
    return SamplingParams(**kwargs)


def structured_outputs_from_proto(msg: pb.StructuredOutputs) -> StructuredOutputsParams:
    """The constraint of a StructuredOutputs message (InvalidRequestError naming the field)."""
    which = msg.WhichOneof("kind")
    if which is None:
        raise InvalidRequestError("structured_outputs", "set one of json, regex, choice, "
                                  "grammar, json_object")
    if which == "choice":
        return StructuredOutputsParams(choice=list(msg.choice.choices))
    return StructuredOutputsParams(**{which: getattr(msg, which)})


def prompt_from_request(request: pb.GenerateRequest) -> str | dict[str, list[int]]:
    """The prompt as the engine takes it: text, or {"prompt_token_ids": [...]}."""
    which = request.WhichOneof("prompt")
    if which == "text":
        return request.text
    if which == "token_ids":
        return {"prompt_token_ids": list(request.token_ids.ids)}
    raise InvalidRequestError("prompt", "set either text or token_ids")


def _token_logprob(token_id: int, lp: Any) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=int(token_id), logprob=float(lp.logprob),
                           rank=int(lp.rank or 0), decoded_token=lp.decoded_token or "")


def logprobs_to_proto(positions: list[dict[int, Any] | None], token_ids: list[int],
                      num_top: int) -> list[pb.PositionLogprobs]:
    """One PositionLogprobs per generated position: the sampled token (whatever its rank),
    then the `num_top` most likely tokens by rank; the sampled token is among them only when
    it ranks in the top `num_top` (vLLM's and OpenAI's `top_logprobs` meaning)."""
    result = []
    for token_id, position in zip(token_ids, positions):
        if position is None:  # the first prompt token: no logprob
            result.append(pb.PositionLogprobs())
            continue
        sampled = position.get(token_id)
        ranked = sorted(position.items(), key=lambda kv: kv[1].rank or 0)
        top = [(t, lp) for t, lp in ranked if lp.rank is not None and lp.rank <= num_top]
        msg = pb.PositionLogprobs(top=[_token_logprob(t, lp) for t, lp in top[:num_top]])
        if sampled is not None:
            msg.sampled.CopyFrom(_token_logprob(token_id, sampled))
        result.append(msg)
    return result


def completion_to_proto(index: int, text: str, token_ids: list[int],
                        logprobs: list[dict[int, Any]] | None, finish_reason: str | None,
                        stop_reason: int | str | None, num_top: int = 0) -> pb.CompletionOutput:
    msg = pb.CompletionOutput(index=index, text=text, token_ids=token_ids)
    if finish_reason is not None:
        msg.finish_reason = finish_reason
    if stop_reason is not None:
        msg.stop_reason = str(stop_reason)
    if logprobs:
        msg.logprobs.extend(logprobs_to_proto(logprobs, token_ids, num_top))
    return msg


def delta_to_proto(delta: CompletionDelta, num_top: int = 0) -> pb.CompletionOutput:
    return completion_to_proto(delta.index, delta.text, delta.token_ids, delta.logprobs,
                               delta.finish_reason, delta.stop_reason, num_top)


def usage_from_output(output: Any) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=len(output.prompt_token_ids or []),
        completion_tokens=sum(len(c.token_ids) for c in output.outputs),
        cached_tokens=int(output.num_cached_tokens or 0),
    )


def prompt_logprobs_to_proto(output: Any, num_top: int) -> list[pb.PositionLogprobs]:
    """The prompt logprobs of `output` (one entry per prompt token, the first empty)."""
    return logprobs_to_proto(list(output.prompt_logprobs), list(output.prompt_token_ids),
                             num_top)


def full_response(request_id: str, output: Any, num_top: int = 0,
                  num_prompt_top: int = 0) -> pb.GenerateResponse:
    """The whole result of a finished request (`num_top` / `num_prompt_top`: the request's
    `logprobs` / `prompt_logprobs`)."""
    outputs = [
        completion_to_proto(c.index, c.text, list(c.token_ids), c.logprobs, c.finish_reason,
                            c.stop_reason, num_top)
        for c in output.outputs
    ]
    msg = pb.GenerateResponse(request_id=request_id, outputs=outputs,
                              usage=usage_from_output(output))
    if output.prompt_logprobs is not None:
        msg.prompt_logprobs.extend(prompt_logprobs_to_proto(output, num_prompt_top))
    return msg
