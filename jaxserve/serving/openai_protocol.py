"""Request bodies of the OpenAI-compatible API (pydantic), with vLLM's extra sampling fields."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jaxserve.engine.errors import InvalidRequestError, require_utf8
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.structured_outputs import StructuredOutputsParams
from jaxserve.serving.tool_calls import constraint_for


def _check_texts(value: Any, where: str) -> None:
    """Every str inside `value` (lists and dicts walked) must be valid Unicode text."""
    if isinstance(value, str):
        require_utf8(where, value)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_texts(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_texts(key, where)
            _check_texts(item, f"{where}.{key}")


class _Body(BaseModel):
    """A request body, as strict as OpenAI's schema: no coercion ("5" is not an int), no
    Infinity, no unknown fields (a field we do not implement is refused, never ignored), and
    strings are valid Unicode (JSON "\\ud800" cannot be tokenized)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_text(cls, value: Any, info) -> Any:
        _check_texts(value, info.field_name)
        return value


class StreamOptions(_Body):
    include_usage: bool = False


def _require_neutral(body: BaseModel, neutral: dict[str, Any]) -> None:
    """Fields accepted for compatibility but only at their no-op value."""
    for name, value in neutral.items():
        if getattr(body, name) != value:
            raise InvalidRequestError(name, f"is not supported by this server (only {value!r})")


class JsonSchemaFormat(_Body):
    """response_format.json_schema: OpenAI's {name, description, schema, strict}."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidRequestError("response_format.json_schema",
                                          'is required with type "json_schema"')
            schema = self.json_schema.schema_
            return StructuredOutputsParams(json=schema if schema is not None else {})
        return None


class _SamplingRequest(_Body):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    request_id: str | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's StructuredOutputsParams fields
    # Accepted, and no-ops, as in vLLM ("user" is ignored by vLLM too).
    user: str | None = None
    # vLLM fields accepted only at their neutral value (refused otherwise: not implemented).
    response_format: ResponseFormat | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    priority: int = 0

    def _check_unsupported(self) -> None:
        _require_neutral(self, dict(use_beam_search=False, length_penalty=1.0,
                                    spaces_between_special_tokens=True,
                                    truncate_prompt_tokens=None, priority=0))
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options", "is only allowed with stream: true")

    def _common_kwargs(self, defaults: dict[str, Any] | None) -> dict[str, Any]:
        """SamplingParams kwargs: the request's fields, else the server's defaults
        (generation_config.json), else SamplingParams' own."""
        self._check_unsupported()
        kwargs: dict[str, Any] = dict(defaults or {})
        kwargs.update(
            n=self.n, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
        for name in ("temperature", "top_p", "stop", "seed", "presence_penalty",
                     "frequency_penalty", "top_k", "min_p", "repetition_penalty",
                     "stop_token_ids", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.logit_bias is not None:
            try:
                kwargs["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError as exc:
                raise InvalidRequestError("logit_bias", "keys must be token ids") from exc
        constraint = self._constraint()
        if constraint is not None:
            kwargs["structured_outputs"] = constraint
        return kwargs

    def _constraint(self) -> StructuredOutputsParams | None:
        """response_format (OpenAI's) or structured_outputs (vLLM's), at most one of them."""
        fmt = self.response_format.constraint() if self.response_format is not None else None
        if self.structured_outputs is None:
            return fmt
        if fmt is not None:
            raise InvalidRequestError("structured_outputs", "give response_format or "
                                      "structured_outputs, not both")
        return StructuredOutputsParams.from_dict(self.structured_outputs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # None: the server's default, else 16 (SamplingParams')
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def prompts(self) -> list[str | list[int]]:
        """The prompts of a (possibly batched) request: strings or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)

    def to_sampling_params(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        if self.suffix:
            raise InvalidRequestError("suffix", "is not supported")
        if self.echo:
            raise InvalidRequestError("echo", "is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of", "is not supported (must equal n)")
        if not self.add_special_tokens:
            raise InvalidRequestError("add_special_tokens", "false is not supported by this "
                                      "server; send prompt token ids instead")
        kwargs = self._common_kwargs(defaults)
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.logprobs is not None:
            kwargs["logprobs"] = self.logprobs
        return SamplingParams(**kwargs)


class ChatMessage(_Body):
    """One message: a role and its content (required, but for an assistant message carrying
    tool_calls); a tool result names its call with tool_call_id."""

    role: str = Field(min_length=1)
    tool_calls: list[dict[str, Any]] | None = None  # before content: its validator reads it
    content: str | list[dict[str, Any]] | None
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="after")
    @classmethod
    def _content_or_tool_calls(cls, value: Any, info) -> Any:
        if value is None and not info.data.get("tool_calls"):
            raise ValueError("content is required (null only in an assistant message with "
                             "tool_calls)")
        return value

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [_parsed_arguments(c) for c in self.tool_calls]
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None:
            if not self.tool_calls:
                raise InvalidRequestError("messages", "content is required (it may be null "
                                          "only in an assistant message with tool_calls)")
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError("messages", f"content part {part.get('type')!r} "
                                          "is not supported (text parts only)")
            parts.append(part["text"])
        return "".join(parts)


class ToolFunction(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: ToolFunction


def _parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """An assistant tool call as templates expect it: arguments as an object when JSON."""
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": args}}


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # False: tool_choice "required" makes one call

    @property
    def effective_tool_choice(self) -> Any:
        """vLLM's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def tool_constraint(self) -> StructuredOutputsParams | None:
        choice = self.effective_tool_choice
        if choice == "none":
            return None
        if not self.tools:
            raise InvalidRequestError("tool_choice", f"{choice!r} needs tools")
        return constraint_for(self.tools, choice, self.parallel_tool_calls)

    def to_sampling_params(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        kwargs = self._common_kwargs(defaults)
        tool_constraint = self.tool_constraint()
        if tool_constraint is not None:
            if "structured_outputs" in kwargs:
                raise InvalidRequestError("tool_choice", "a required or named tool_choice "
                                          "cannot be combined with response_format or "
                                          "structured_outputs")
            kwargs["structured_outputs"] = tool_constraint
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        if max_tokens is not None or "max_tokens" not in kwargs:
            kwargs["max_tokens"] = max_tokens  # None: up to max_model_len
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs to be true")
        if self.logprobs:
            kwargs["logprobs"] = self.top_logprobs or 0
        return SamplingParams(**kwargs)


class TokenizeRequest(_Body):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]
