"""Engine layer: requests, block pool, KV cache manager, scheduler, LLMEngine (pure Python, no jax)."""

from .block_pool import NULL_BLOCK_ID, BlockPool, KVBlock, hash_block_tokens
from .config import EngineConfig
from .errors import EngineStepError, InvalidRequestError
from .kv_cache_manager import KVCacheManager
from .limits import RequestLimits
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .scheduler_output import ModelRunner, ScheduledChunk, SchedulerOutput
from .stats import EngineStats
from .structured_outputs import StructuredOutputsParams

__all__ = [
    "NULL_BLOCK_ID",
    "BlockPool",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "EngineStepError",
    "InvalidRequestError",
    "KVBlock",
    "KVCacheManager",
    "LLMEngine",
    "Logprob",
    "ModelRunner",
    "RequestLimits",
    "RequestOutput",
    "SamplingParams",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerOutput",
    "StructuredOutputsParams",
    "hash_block_tokens",
]
