"""jaxserve: LLM inference and serving on JAX/XLA (paged KV cache, continuous batching)."""

from jaxserve.engine import (
    CompletionOutput,
    EngineStats,
    Logprob,
    RequestOutput,
    SamplingParams,
    StructuredOutputsParams,
)
from jaxserve.llm import LLM, EngineArgs, create_engine

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "EngineStats",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "create_engine",
]
__version__ = "0.1.0"
