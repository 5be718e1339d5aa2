"""ServeConfig: the servers' own settings (ports, names, key, limits), read in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the HTTP and gRPC front ends (the engine's own live in EngineArgs)."""

    model: str
    served_model_name: str | tuple[str, ...] | None = None  # one name or several (aliases)
    host: str = "0.0.0.0"
    port: int = 8000  # HTTP (OpenAI-compatible); 0 picks a free port
    grpc_port: int = 50051  # 0 picks a free port; -1 disables gRPC
    api_key: str | None = None
    protect_metrics: bool = False  # True: /metrics needs the API key too (default open, as vLLM)
    max_queued_requests: int | None = None
    drain_grace_period_s: float = 30.0  # SIGTERM: in-flight requests finish within this, then abort
    log_stats_interval_s: float = 10.0  # the periodic stats log line; 0 disables it
    max_grpc_message_bytes: int = 16 * 1024 * 1024
    max_request_bytes: int = 16 * 1024 * 1024  # HTTP request bodies; larger ones get 413
    log_requests: bool = False  # log every request's arrival (--enable-log-requests)
    # tool_choice "auto": parse tool calls out of the output (--enable-auto-tool-choice with
    # --tool-call-parser; "hermes": <tool_call>{...}</tool_call> blocks)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        from jaxserve.serving.tool_calls import TOOL_CALL_PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser: one of {TOOL_CALL_PARSERS}, got "
                             f"{self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice: needs --tool-call-parser")

    @property
    def auto_tool_parser(self) -> str | None:
        """The parser of tool_choice "auto", or None when auto tool choice is off."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name clients may use for the model; the first is the one responses carry."""
        names = self.served_model_name
        if isinstance(names, str):
            return (names,)
        return tuple(names) if names else (self.model,)

    @property
    def model_name(self) -> str:
        """The name responses carry (the first `--served-model-name`, else the model path)."""
        return self.model_names[0]
