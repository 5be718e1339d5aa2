"""Quantization quality on a trained model: logit KL divergence, next-token and greedy agreement
vs the unquantized model, for int8 / int4 / fp8 weights (and the lm_head quantized too) and an
int8 / fp8 KV cache.

The model must predict something (a random-weight model's near-uniform logits hide every
error), so it is trained: `--model DIR` takes an HF checkpoint (e.g. the "target" of
benchmarks/trained_models.py, ~/.cache/jaxserve/trained/target, with its own tokenizer),
otherwise a small byte-level Llama is trained here on CPU with torch for `--train-seconds` on
Python's own standard library sources (top-level files sorted by name: every other file trains,
the rest is held out), and cached under --cache-dir. The held-out text is the other files,
last name first (past what trained_models.py's capped corpus reads).

Measured on held-out text, all runs f32 activations, the blockwise (CPU serving) attention:
- teacher-forced: every position of `--eval-seqs` sequences of `--eval-len` bytes goes through
  the paged model in chunks of 64 (later chunks read the cached, possibly quantized, K/V);
  KL(p_float || p_quant) in nats (mean, p99), the NLL change, argmax agreement;
- free-running: greedy continuations of `--greedy-tokens` tokens from `--greedy-prompts`
  prompts through `LLM.generate`; the share of positions equal to the float model's, and the
  mean length of the common prefix.

  PYTHONPATH=. python benchmarks/quant_quality.py --out benchmarks/results/cpu_quant_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time

import numpy as np

# (name, quantization, kv_cache_dtype, quantize_lm_head)
RUNS = [("float", None, "auto", False), ("int8 weights", "int8", "auto", False),
        ("int4 weights", "int4", "auto", False), ("fp8 weights", "fp8", "auto", False),
        ("int8 w+head", "int8", "auto", True), ("int4 w+head", "int4", "auto", True),
        ("int8 KV", None, "int8", False), ("fp8 KV", None, "fp8", False),
        ("int8 w+KV", "int8", "int8", False)]
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, vocab_size=259, max_position_embeddings=1024)
BYTE0 = 3  # ids 0..2: <unk> <s> </s>; byte b is id b + 3


def corpus(split: str, limit_bytes: int) -> bytes:
    """Python's standard library sources, every other file (sorted): split train / eval."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))
    files = files[0::2] if split == "train" else files[1::2][::-1]  # eval: from the end
    out = bytearray()
    for f in files:
        with open(f, "rb") as fh:
            out += fh.read()
        if len(out) >= limit_bytes:
            break
    return bytes(out[:limit_bytes])


def write_tokenizer(out: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"b{i}": i + BYTE0 for i in range(256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)


def train_tiny(out: str, seconds: float, seed: int = 0) -> dict:
    """Trains TINY as a byte-level LM for `seconds` (AdamW, batch 32 x 128), saves it as an HF
    checkpoint in `out`. Returns the training log (steps, first / last loss)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    data = np.frombuffer(corpus("train", 4 << 20), np.uint8).astype(np.int64) + BYTE0
    cfg = LlamaConfig(**TINY, rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    losses, start, step = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        idx = rng.integers(0, len(data) - 128, 32)
        batch = torch.from_numpy(np.stack([data[i:i + 128] for i in idx]))
        loss = model(input_ids=batch, labels=batch).loss  # shifted inside: t predicts t + 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        step += 1
        for g in opt.param_groups:  # linear decay over the time budget
            g["lr"] = 3e-3 * max(0.05, 1 - (time.perf_counter() - start) / seconds)
    model.config.dtype = "float32"
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out)
    log = {"steps": step, "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])),
           "seconds": time.perf_counter() - start, "shape": TINY}
    with open(os.path.join(out, "trained.json"), "w") as f:
        json.dump(log, f)
    return log


def eval_tokens(path: str) -> np.ndarray:
    """The held-out text as token ids: bytes for the model trained here, else the model's own
    tokenizer (e.g. benchmarks/trained_models.py's BPE)."""
    text = corpus("eval", 1 << 20)
    if os.path.isfile(os.path.join(path, "trained.json")):  # ours: byte-level ids
        return np.frombuffer(text, np.uint8).astype(np.int64) + BYTE0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return np.asarray(tok(text.decode("utf-8", "replace"), add_special_tokens=False)["input_ids"])


def eval_sequences(data: np.ndarray, num: int, length: int) -> list[list[int]]:
    """`num` windows of `length` tokens spread evenly over the held-out token stream."""
    starts = np.linspace(0, len(data) - length - 1, num).astype(int)
    return [data[s:s + length].tolist() for s in starts]


def teacher_forced(path: str, quantization, kv_dtype: str, seqs, head: bool) -> np.ndarray:
    """log-softmax [sum of lengths, vocab] over every position, paged in chunks of 64."""
    from jaxserve.layers.attention import AttentionConfig
    from jaxserve.weights.loader import load_model
    from tests.models.forward import paged_logits

    loaded = load_model(path, "float32", AttentionConfig(backend="blockwise"),
                        quantization=quantization, quantize_lm_head=head)
    logits = np.concatenate(paged_logits(loaded, seqs, block_size=16, chunk=64,
                                         kv_cache_dtype=kv_dtype)).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def greedy(path: str, quantization, kv_dtype: str, prompts, tokens: int,
           head: bool) -> list[list[int]]:
    from jaxserve import LLM, SamplingParams

    llm = LLM(path, dtype="float32", quantization=quantization, quantize_lm_head=head,
              kv_cache_dtype=kv_dtype,
              max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256,
              use_tqdm_on_load=False, enable_prompt_logprobs=False)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    s = llm.stats()
    assert s.kv_blocks_free == s.kv_blocks_total  # every block back in the pool
    return [o.outputs[0].token_ids for o in outs]


def compare(ref_lp, lp, seqs, ref_greedy, got_greedy) -> dict:
    targets = np.concatenate([s[1:] + [s[-1]] for s in seqs])  # next token (last: ignored)
    keep = np.concatenate([np.arange(len(s)) < len(s) - 1 for s in seqs])
    p = np.exp(ref_lp)
    kl = (p * (ref_lp - lp)).sum(-1)  # [positions]
    nll = lambda x: -x[np.arange(len(targets)), targets][keep].mean()
    same = [a == b for r, g in zip(ref_greedy, got_greedy) for a, b in zip(r, g)]
    prefix = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r))
              for r, g in zip(ref_greedy, got_greedy)]
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()), "nll": float(nll(lp)), "nll_float": float(nll(ref_lp)),
            "top1_agreement": float((lp.argmax(-1) == ref_lp.argmax(-1)).mean()),
            "greedy_agreement": float(np.mean(same)),
            "greedy_common_prefix": float(np.mean(prefix))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a trained HF checkpoint (default: train one)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/jaxserve"))
    p.add_argument("--train-seconds", type=float, default=170.0)
    p.add_argument("--eval-seqs", type=int, default=16)
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--greedy-prompts", type=int, default=16)
    p.add_argument("--greedy-tokens", type=int, default=64)
    p.add_argument("--runs", nargs="*", default=None,
                   help="only these runs, by name (the first is the reference: keep 'float')")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    path, train_log = args.model, None
    if path is None:
        path = os.path.join(args.cache_dir, "quality-tiny-bytes")
        marker = os.path.join(path, "trained.json")
        if not os.path.isfile(marker):
            os.makedirs(path, exist_ok=True)
            train_tiny(path, args.train_seconds)
        with open(marker) as f:
            train_log = json.load(f)
        print("trained model:", json.dumps(train_log), flush=True)
    data = eval_tokens(path)
    seqs = eval_sequences(data, args.eval_seqs, args.eval_len)
    prompts = [s[:48] for s in eval_sequences(data, args.greedy_prompts, 96)]
    results, ref = [], None
    runs = [r for r in RUNS if not args.runs or r[0] in args.runs]
    for name, quant, kv, head in runs:
        t = time.perf_counter()
        lp = teacher_forced(path, quant, kv, seqs, head)
        gen = greedy(path, quant, kv, prompts, args.greedy_tokens, head)
        if ref is None:
            ref = (lp, gen)
        row = {"run": name, "quantization": quant, "kv_cache_dtype": kv, "lm_head": head,
               **compare(ref[0], lp, seqs, ref[1], gen), "seconds": time.perf_counter() - t}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'run':<13} {'KL mean':>9} {'KL p99':>8} {'NLL':>7} {'top-1':>6} {'greedy':>7} "
          f"{'prefix':>7}")
    for r in results:
        print(f"{r['run']:<13} {r['kl_mean']:9.2e} {r['kl_p99']:8.2e} {r['nll']:7.4f} "
              f"{r['top1_agreement']:6.3f} {r['greedy_agreement']:7.3f} "
              f"{r['greedy_common_prefix']:7.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "benchmarks/quant_quality.py " + " ".join(argv or sys.argv[1:]),
                       "model": path, "trained": train_log, "eval_seqs": args.eval_seqs,
                       "eval_len": args.eval_len, "greedy_prompts": args.greedy_prompts,
                       "greedy_tokens": args.greedy_tokens, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
