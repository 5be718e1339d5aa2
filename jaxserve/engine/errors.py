"""Engine error types: bad input is a ValueError naming the field; step failures name requests."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """Bad input at the engine's edge; `field` names the offending argument or parameter."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def require_utf8(field: str, text: str) -> str:
    """`text` unchanged, or InvalidRequestError when it cannot be UTF-8 (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            field, f"is not valid Unicode text ({exc.reason} at character {exc.start})"
        ) from None
    return text


class EngineStepError(RuntimeError):
    """The model runner failed during a step; the requests in that step were failed and freed."""

    def __init__(self, message: str, failed_request_ids: list[str]):
        super().__init__(message)
        self.failed_request_ids = failed_request_ids


class FatalRunnerError(RuntimeError):
    """The runner cannot run any further step (a process of a multi-process job is gone): the
    engine fails the requests in flight and stops instead of serving on."""
