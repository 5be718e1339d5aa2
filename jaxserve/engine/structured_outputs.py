"""StructuredOutputsParams: vLLM's output constraints (json, regex, choice, grammar, json_object)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError, require_utf8

FIELD = "structured_outputs"
# Bounds on what one request may ask the grammar compiler to build (a hostile schema must not
# stall the server): the constraint's text and the number of choices.
MAX_CONSTRAINT_CHARS = 64 * 1024
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint (vLLM's names): `json` (a JSON schema, as a dict or a JSON text),
    `regex`, `choice` (a list of strings), `grammar` (Lark / EBNF text, llguidance's syntax)
    or `json_object=True` (any JSON object)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        self.verify()

    def verify(self) -> None:
        set_ = [name for name in ("json", "regex", "choice", "grammar") if
                getattr(self, name) is not None]
        if self.json_object:
            set_.append("json_object")
        if len(set_) != 1:
            raise InvalidRequestError(FIELD, "exactly one of json, regex, choice, grammar, "
                                      f"json_object must be set, got {set_ or 'none'}")
        kind = set_[0]
        where = f"{FIELD}.{kind}"
        if kind == "json":
            if not isinstance(self.json, (dict, str)):
                raise InvalidRequestError(where, "must be a JSON schema (an object or its text)")
            _check_size(where, self.schema_text())
        elif kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if not isinstance(value, str) or not value:
                raise InvalidRequestError(where, "must be a non-empty string")
            _check_size(where, require_utf8(where, value))
        elif kind == "choice":
            if not self.choice or len(self.choice) > MAX_CHOICES:
                raise InvalidRequestError(where, f"must list 1 to {MAX_CHOICES} strings")
            for c in self.choice:
                if not isinstance(c, str) or not c:
                    raise InvalidRequestError(where, f"must be non-empty strings, got {c!r}")
                require_utf8(where, c)
            _check_size(where, "".join(self.choice))
        elif self.json_object is not True:
            raise InvalidRequestError(f"{FIELD}.json_object", "must be true when set")

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    @property
    def field(self) -> str:
        """The request field an error about this constraint names."""
        return f"{FIELD}.{self.kind}"

    def schema_text(self) -> str:
        """The JSON schema as canonical text (sorted keys): the cache key of its grammar."""
        if isinstance(self.json, str):
            try:
                value = json.loads(self.json)
            except ValueError as exc:
                raise InvalidRequestError(f"{FIELD}.json", f"is not valid JSON: {exc}") from None
        else:
            value = self.json
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{FIELD}.json", "must be a JSON object (a schema)")
        try:
            return json.dumps(value, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"{FIELD}.json", f"is not JSON: {exc}") from None

    def cache_key(self) -> tuple[str, str]:
        """(kind, canonical text): equal constraints share one compiled grammar."""
        kind = self.kind
        if kind == "json":
            return kind, self.schema_text()
        if kind == "choice":
            return kind, json.dumps(list(self.choice), ensure_ascii=False)
        if kind == "json_object":
            return kind, ""
        return kind, getattr(self, kind)

    @classmethod
    def from_dict(cls, value: Any, where: str = FIELD) -> StructuredOutputsParams:
        """From a request's `structured_outputs` object (unknown keys are refused)."""
        if isinstance(value, StructuredOutputsParams):
            return value
        if not isinstance(value, dict):
            raise InvalidRequestError(where, "must be an object")
        known = {"json", "regex", "choice", "grammar", "json_object"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequestError(where, f"unknown keys {unknown} (known: {sorted(known)})")
        if "choice" in value and not isinstance(value["choice"], (list, tuple)):
            raise InvalidRequestError(f"{where}.choice", "must be a list of strings")
        return cls(**value)


def _check_size(where: str, text: str) -> None:
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise InvalidRequestError(where, f"is {len(text)} characters; at most "
                                  f"{MAX_CONSTRAINT_CHARS} are accepted")
