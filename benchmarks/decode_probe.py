"""Decode probe: jaxserve's ms/token on the CPU as a fraction of the memory-bandwidth floor.

Builds the "small" random-weight Llama (Qwen2.5-0.5B widths, 12 layers, vocab 32000, tied,
~207M params) as an HF checkpoint in the local cache, measures read/copy bandwidth in the same
process, then runs the LLM engine: decode with 1 request (ms per engine step) and a mixed batch
(output tok/s). Floor = bytes a decode step must read (all weights once + the KV context) /
read bandwidth. One JSON line per measurement, a short table last.

  PYTHONPATH=. python benchmarks/decode_probe.py --dtype bfloat16 --mixed-prompts 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SMALL = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=12,
             num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=32000,
             max_position_embeddings=4096, tie_word_embeddings=True)
FIRST_TOKEN_ID = 10


def write_small_checkpoint(out: str, dtype: str) -> str:
    """Random-weight Llama with SMALL's shape in `dtype`, plus a 32000-word tokenizer."""
    marker = os.path.join(out, "probe.json")
    if os.path.isfile(marker):
        return out
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    os.makedirs(out, exist_ok=True)
    vocab = {f"w{i}": i for i in range(SMALL["vocab_size"])}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    for i, name in enumerate(("<unk>", "<s>", "</s>")):
        vocab.pop(f"w{i}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    cfg = LlamaConfig(**SMALL, rms_norm_eps=1e-6, rope_theta=1e6, bos_token_id=1, eos_token_id=2,
                      architectures=["LlamaForCausalLM"], dtype=dtype)
    cfg.save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    d, m, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    tdt = getattr(torch, dtype)

    def normal(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(tdt)

    tensors = {"model.embed_tokens.weight": normal(cfg.vocab_size, d),
               "model.norm.weight": torch.ones(d, dtype=tdt)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": normal(q, d), p + "self_attn.k_proj.weight": normal(kv, d),
            p + "self_attn.v_proj.weight": normal(kv, d), p + "self_attn.o_proj.weight": normal(d, q),
            p + "mlp.gate_proj.weight": normal(m, d), p + "mlp.up_proj.weight": normal(m, d),
            p + "mlp.down_proj.weight": normal(d, m),
            p + "input_layernorm.weight": torch.ones(d, dtype=tdt),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=tdt),
        })
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with open(marker, "w") as f:
        json.dump({"shape": SMALL, "dtype": dtype}, f)
    return out


def measure_bandwidth(mib: int = 512, repeats: int = 7, threads: int = 2) -> dict:
    """Median read and copy GB/s over `threads` numpy workers (bytes read; copy counts r + w)."""
    n = mib * (1 << 20) // 8
    src = np.random.default_rng(0).random(n)  # float64: np.sum is cheap per byte
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(n), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    pool = ThreadPoolExecutor(threads)

    def timed(fn):
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(fn, bounds))
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    read_s = timed(lambda b: src[b[0]:b[1]].sum())
    copy_s = timed(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]))
    pool.shutdown()
    return {"read_GBps": src.nbytes / read_s / 1e9, "copy_GBps": 2 * src.nbytes / copy_s / 1e9}


def decode_bytes(cfg: dict, itemsize: int, context: int) -> int:
    """Bytes one decode step of one request must read: every weight once + its K/V context."""
    d, m, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * m + 2 * d
    weights = cfg["num_hidden_layers"] * per_layer + cfg["vocab_size"] * d + d
    kv_bytes = cfg["num_hidden_layers"] * 2 * kv * context
    return (weights + kv_bytes) * itemsize


def run_decode(llm, prompt_len: int, out_len: int, seed: int) -> tuple[list[float], list[float]]:
    """(wall, process CPU) seconds of every engine step after the first sampled token.

    CPU seconds (all threads) measure the work of a step; on a machine shared with other jobs
    they stay put while wall time swings with the load."""
    from jaxserve import SamplingParams

    eng = llm.engine
    rng = np.random.default_rng(seed)
    prompt = rng.integers(FIRST_TOKEN_ID, SMALL["vocab_size"], prompt_len).tolist()
    eng.add_request("decode-0", {"prompt_token_ids": prompt},
                    SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0))
    times, cpu, started = [], [], False
    while eng.has_unfinished_requests():
        t, c = time.perf_counter(), time.process_time()
        outs = eng.step()
        took, cpu_took = time.perf_counter() - t, time.process_time() - c
        if started:
            times.append(took)
            cpu.append(cpu_took)
        started = started or any(o.outputs and o.outputs[0].token_ids for o in outs)
    return times, cpu


def run_mixed(llm, num: int, seed: int) -> dict:
    """`num` prompts of 32..256 tokens, 16..128 outputs, temperature 1.0: output tok/s."""
    from jaxserve import SamplingParams

    rng = np.random.default_rng(seed)
    prompts, params = [], []
    for _ in range(num):
        n_in, n_out = int(rng.integers(32, 257)), int(rng.integers(16, 129))
        prompts.append({"prompt_token_ids": rng.integers(FIRST_TOKEN_ID, SMALL["vocab_size"],
                                                         n_in).tolist()})
        params.append(SamplingParams(max_tokens=n_out, ignore_eos=True, temperature=1.0,
                                     seed=int(rng.integers(1 << 30))))
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    took = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"num_prompts": num, "seconds": took, "output_tok_s": n_out / took,
            "total_tok_s": (n_out + sum(len(p["prompt_token_ids"]) for p in prompts)) / took}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/jaxserve"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--mixed-prompts", type=int, nargs="*", default=[32])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--cpu-matvec", default="auto", choices=("auto", "off"))
    args = p.parse_args(argv)

    import jax
    from jaxserve import LLM

    path = write_small_checkpoint(os.path.join(args.cache_dir, f"probe-small-{args.dtype}"),
                                  args.dtype)
    t = time.perf_counter()
    llm = LLM(path, dtype="auto", max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens, use_tqdm_on_load=False,
              attention_backend=args.attention_backend, cpu_matvec=args.cpu_matvec)
    startup = time.perf_counter() - t
    rows = []
    bw0 = measure_bandwidth()
    steps, cpu = run_decode(llm, args.prompt_len, args.decode_tokens, seed=1)
    bw1 = measure_bandwidth()
    read = statistics.median([bw0["read_GBps"], bw1["read_GBps"]])
    ms = 1e3 * statistics.median(steps)
    ctx = args.prompt_len + args.decode_tokens // 2
    itemsize = 2 if args.dtype == "bfloat16" else 4
    floor_ms = 1e3 * decode_bytes(SMALL, itemsize, ctx) / (read * 1e9)
    rows.append({"probe": "decode-b1", "dtype": args.dtype, "ms_per_token": ms,
                 "attention_backend": args.attention_backend, "cpu_matvec": args.cpu_matvec,
                 "p90_ms": 1e3 * float(np.percentile(steps, 90)),
                 "cpu_ms_per_token": 1e3 * statistics.median(cpu), "floor_ms": floor_ms,
                 "fraction_of_floor": floor_ms / ms, "read_GBps": read,
                 "copy_GBps": statistics.median([bw0["copy_GBps"], bw1["copy_GBps"]]),
                 "startup_s": startup, "jax": jax.__version__})
    print(json.dumps(rows[-1]), flush=True)
    for num in args.mixed_prompts:
        rows.append({"probe": f"mixed-{num}", "dtype": args.dtype, **run_mixed(llm, num, seed=2)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'probe':<12} {'dtype':<9} figure")
    for r in rows:
        if r["probe"] == "decode-b1":
            fig = (f"{r['ms_per_token']:.1f} ms/token ({r['cpu_ms_per_token']:.1f} CPU ms), floor "
                   f"{r['floor_ms']:.1f} ms ({100 * r['fraction_of_floor']:.0f}% of floor at "
                   f"{r['read_GBps']:.0f} GB/s read)")
        else:
            fig = f"{r['output_tok_s']:.0f} output tok/s ({r['seconds']:.1f} s)"
        print(f"{r['probe']:<12} {r['dtype']:<9} {fig}")


if __name__ == "__main__":
    main()
