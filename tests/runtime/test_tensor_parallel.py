"""tensor_parallel_size=2 over two (forced host) CPU devices gives the tp=1 greedy tokens
(float and int8 KV cache)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
from jaxserve import LLM, SamplingParams
path, cache = sys.argv[1], sys.argv[2]
params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
prompts = [{"prompt_token_ids": list(range(5, 60))}, {"prompt_token_ids": [9, 10, 11]}]
out = {}
for tp, kv in ((1, "auto"), (2, "auto"), (1, "int8"), (2, "int8")):
    llm = LLM(path, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
              tensor_parallel_size=tp, compilation_cache_dir=cache, use_tqdm_on_load=False,
              kv_cache_dtype=kv)
    runner = llm.engine.runner
    out[f"{tp}{kv}"] = {
        "tokens": [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)],
        "kv_spec": str(runner.kv_cache[0][0].sharding.spec),
        "q_proj_spec": str(runner.state["layers"][0]["q_proj"]["kernel"][...].sharding.spec),
        "regex": [o.outputs[0].text for o in llm.generate(
            ["Hello"] * 2, SamplingParams(temperature=0.0, max_tokens=20,
                                          structured_outputs={"regex": "[a-d]{3}-[0-9]{2}"}),
            use_tqdm=False)],
        "free": llm.stats().kv_blocks_free == llm.stats().kv_blocks_total,
    }
print(json.dumps(out))
"""


def test_tp2_matches_tp1(demo_model_path, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, demo_model_path, str(tmp_path / "xla")],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["1auto"]["tokens"] == out["2auto"]["tokens"]
    assert out["1int8"]["tokens"] == out["2int8"]["tokens"]  # int8 KV rows split the same way
    assert out["1auto"]["regex"] == out["2auto"]["regex"]  # structured outputs under tp
    assert all(re.fullmatch("[a-d]{3}-[0-9]{2}", t) for t in out["2auto"]["regex"]), out
    for run in ("2auto", "2int8"):
        assert out[run]["kv_spec"] == "P('tp', None, None, None)"  # KV split by kv head
    assert out["2auto"]["q_proj_spec"] == "P(None, 'tp')"  # column-parallel
    assert all(o["free"] for o in out.values())
