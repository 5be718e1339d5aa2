"""HF transformers static-batching runner for compare.py (vLLM's `hf` throughput backend style).

Requests sorted by prompt length are cut into batches of up to hf_max_batch_size; each batch is
left-padded and `model.generate` runs to the batch's longest output (min_new_tokens forces it,
as ignore_eos); only the tokens each request asked for count as output.
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
    import transformers

    eng = spec["engine"]
    torch.set_num_threads(eng["threads"])
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model_path"], dtype=getattr(torch, spec["dtype"])).eval()
    startup = time.perf_counter() - t0
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    max_batch = eng["hf_max_batch_size"]

    def run_batch(batch: list[dict], temperature: float) -> None:
        width = max(len(r["prompt_token_ids"]) for r in batch)
        new = max(r["max_tokens"] for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):  # left padding, as decoder-only generate wants
            p = r["prompt_token_ids"]
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) \
            if temperature > 0 else dict(do_sample=False)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=pad, **sample)
        if out.shape != (len(batch), width + new):
            raise RuntimeError(f"generate returned {tuple(out.shape)}, "
                               f"expected {(len(batch), width + new)}")

    def generate(requests: list[dict], temperature: float) -> list[int]:
        order = sorted(range(len(requests)), key=lambda i: len(requests[i]["prompt_token_ids"]))
        with torch.inference_mode():
            for s in range(0, len(order), max_batch):
                run_batch([requests[i] for i in order[s:s + max_batch]], temperature)
        return [r["max_tokens"] for r in requests]

    info = {
        "startup_s": round(startup, 2), "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "hf_max_batch_size": max_batch, "attn_implementation": model.config._attn_implementation,
        "env": thread_env_summary(),
    }
    run_all("hf", generate, spec, out_path, info)


if __name__ == "__main__":
    main()
