"""Engine layer: requests, block pool, KV cache manager, scheduler, LLMEngine (pure Python, no jax)."""

from jaxserve.engine.block_pool import NULL_BLOCK_ID, BlockPool, KVBlock, hash_block_tokens
from jaxserve.engine.config import EngineConfig
from jaxserve.engine.errors import EngineStepError, InvalidRequestError
from jaxserve.engine.kv_cache_manager import KVCacheManager
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.scheduler_output import ModelRunner, ScheduledChunk, SchedulerOutput
from jaxserve.engine.stats import EngineStats

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
    "RequestOutput",
    "SamplingParams",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerOutput",
    "hash_block_tokens",
]
