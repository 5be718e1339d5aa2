"""vLLM CPU-backend runner for compare.py; runs in vLLM's own venv (benchmarks/.venv-vllm).

Thread binding and the KV-cache size come from compare.py: VLLM_CPU_OMP_THREADS_BIND in the
environment (e.g. "0-1": the worker's OpenMP threads on both cores) and kv_cache_memory_bytes
(the engine argument that replaced VLLM_CPU_KVCACHE_SPACE, which vLLM 0.32 still honours).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_spec, run_all, thread_env_summary  # noqa: E402


def main() -> None:
    spec, out_path = load_spec()
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    eng = spec["engine"]
    kwargs = dict(
        model=spec["model_path"], dtype=spec["dtype"], max_model_len=eng["max_model_len"],
        max_num_seqs=eng["max_num_seqs"], block_size=eng["vllm_block_size"],
        kv_cache_memory_bytes=int(eng["kv_cache_gib"] * (1 << 30)), seed=spec["seed"],
        enable_prefix_caching=True, skip_tokenizer_init=False,
    )
    if eng.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = eng["max_num_batched_tokens"]
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0

    def generate(requests: list[dict], temperature: float) -> list[int]:
        prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
        params = [SamplingParams(temperature=temperature, top_p=1.0, ignore_eos=True,
                                 max_tokens=r["max_tokens"]) for r in requests]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    sched = llm.llm_engine.vllm_config.scheduler_config
    info = {
        "startup_s": round(startup, 2), "vllm_version": vllm.__version__,
        "torch_version": torch.__version__, "engine_args": kwargs | {
            "max_num_batched_tokens_used": sched.max_num_batched_tokens},
        "env": thread_env_summary() | {"LD_PRELOAD": os.environ.get("LD_PRELOAD", "")},
    }
    run_all("vllm", generate, spec, out_path, info)


if __name__ == "__main__":
    main()
