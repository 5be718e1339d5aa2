"""Per-step cost of a 2-process engine (tp=2 over jax.distributed, gloo) against 1 process.

Run the same command once per process; process 0 prints one JSON line: engine ms per decode
step and the part spent publishing each step to the followers.

  python benchmarks/multiprocess.py MODEL --num-processes 1
  python benchmarks/multiprocess.py MODEL --num-processes 2 --process-id 1 --coordinator-address 127.0.0.1:23460 &
  python benchmarks/multiprocess.py MODEL --num-processes 2 --process-id 0 --coordinator-address 127.0.0.1:23460
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--coordinator-address", default=None)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    from jaxserve import LLM, SamplingParams

    n = args.num_processes
    dist = dict(num_processes=n, process_id=args.process_id,
                coordinator_address=args.coordinator_address) if n > 1 else {}
    llm = LLM(args.model, tensor_parallel_size=n, max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=64, use_tqdm_on_load=False, **dist)
    if llm.engine is None:
        return
    eng = llm.engine
    for i in range(args.requests):
        eng.add_request(f"r{i}", {"prompt_token_ids": list(range(5, 37))},
                        SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True))
    times = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    runner = eng.runner
    steps = len(times)
    print(json.dumps({
        "num_processes": n, "tp": n, "decode_ms_per_step": 1e3 * statistics.median(times[4:]),
        "publish_ms_per_step": 1e3 * getattr(runner, "publish_seconds", 0.0) / max(1, steps),
        "steps": len(times), "load_avg_1m": round(os.getloadavg()[0], 2),
    }), flush=True)


if __name__ == "__main__":
    main()
