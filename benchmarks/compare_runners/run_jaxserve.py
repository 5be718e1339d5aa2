"""jaxserve runner for compare.py: its offline `LLM` API on the spec's checkpoint and prompts."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import kv_block_count, load_spec, run_all, thread_env_summary  # noqa: E402


def main() -> None:
    spec, out_path = load_spec()
    repo = spec["repo_root"]
    sys.path.insert(0, repo)
    import jax

    import jaxserve
    from jaxserve.engine import SamplingParams
    from jaxserve.llm import LLM, EngineArgs

    if not os.path.abspath(jaxserve.__file__).startswith(os.path.abspath(repo)):
        raise RuntimeError(f"jaxserve resolved to {jaxserve.__file__}, not under {repo}")
    eng = spec["engine"]
    dtype_bytes = 2 if spec["dtype"] == "bfloat16" else 4
    kwargs = dict(
        dtype=spec["dtype"], max_model_len=eng["max_model_len"], max_num_seqs=eng["max_num_seqs"],
        block_size=eng["block_size"],
        num_kv_blocks=kv_block_count(spec, eng["block_size"], dtype_bytes),
        max_num_batched_tokens=eng.get("max_num_batched_tokens"), seed=spec["seed"],
        show_progress=False,
    )
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    dropped = sorted(set(kwargs) - fields)
    if dropped:
        print(f"[jaxserve] EngineArgs has no {dropped}: not passed", flush=True)
    kwargs = {k: v for k, v in kwargs.items() if k in fields}
    t0 = time.perf_counter()
    llm = LLM(spec["model_path"], **kwargs)
    startup = time.perf_counter() - t0

    def generate(requests: list[dict], temperature: float) -> list[int]:
        prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
        params = [SamplingParams(temperature=temperature, top_p=1.0, ignore_eos=True,
                                 max_tokens=r["max_tokens"]) for r in requests]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    dev = jax.devices()[0]
    cfg = llm.engine.config
    info = {
        "startup_s": round(startup, 2), "jax_version": jax.__version__,
        "device": f"{dev.platform}:{dev.device_kind}", "jaxserve_file": jaxserve.__file__,
        "engine_args": kwargs | {"max_num_batched_tokens_used": cfg.max_num_batched_tokens,
                                 "num_kv_blocks_used": cfg.num_kv_blocks},
        "env": thread_env_summary(),
    }
    run_all("jaxserve", generate, spec, out_path, info)


if __name__ == "__main__":
    main()
