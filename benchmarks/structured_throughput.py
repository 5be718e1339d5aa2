"""Structured outputs in the engine: output tok/s constrained vs unconstrained, same run, with
llguidance (the kept backend) and xgrammar (an adapter here), at batch 1 and 32.

Random-weight Llama (hidden 256, 4 layers) with a 32k byte-level BPE vocabulary (trained here
on the stdlib's sources, see grammar_masks.py), temperature 1.0, fixed output lengths: the
constraint is a JSON array of at least 20 objects (it never closes), so every request makes max_tokens
tokens under the mask. Also the host time spent filling masks per step, and the same with
the mask filled only after the device step finished ("serial": no overlap).

    python benchmarks/structured_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grammar_masks import build_tokenizer  # noqa: E402

ITEM = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
    "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "email", "role"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 20}  # never closes in max_tokens


def write_model(out_dir: str, vocab: int) -> str:
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    from jaxserve.demo import _random_llama_tensors

    path = os.path.join(out_dir, f"llama-v{vocab}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    tok = build_tokenizer(out_dir, vocab)
    tok.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, architectures=["LlamaForCausalLM"],
                         dtype="float32")
    config.save_pretrained(path)
    save_file(_random_llama_tensors(config, 0), os.path.join(path, "model.safetensors"))
    return path


class _XgrMatcher:
    def __init__(self, backend, matcher):
        self.backend, self.matcher = backend, matcher

    def accept(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(int(token_id)))

    @property
    def is_stopped(self) -> bool:
        return bool(self.matcher.is_terminated())

    error = None


class _XgrCompiled:
    def __init__(self, backend, compiled):
        self.backend, self.compiled = backend, compiled

    def new_matcher(self):
        return _XgrMatcher(self.backend, self.backend.xgr.GrammarMatcher(self.compiled))


class XgrBackend:
    """xgrammar behind the engine's GrammarBackend interface (JSON schemas only)."""

    def __init__(self, tokenizer, vocab_size: int, threads: int = 2):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads)
        self.batch = xgrammar.BatchGrammarMatcher(threads)

    def compile(self, so):
        return _XgrCompiled(self, self.compiler.compile_json_schema(
            so.schema_text(), any_whitespace=False, separators=(",", ":")))

    def fill_bitmasks(self, items, bitmask):
        assert all(not drafts for _, _, drafts in items)
        self.batch.batch_fill_next_token_bitmask([m.matcher for m, _, _ in items], bitmask,
                                                 [row for _, row, _ in items])


class Instrument:
    """Records the host seconds of each step's mask fill; serial=True waits for the device
    step to finish before filling (no overlap of mask and device work)."""

    def __init__(self, runner):
        self.runner = runner
        self.fill, self.run_model = runner._grammar_bitmask, runner._run_model
        self.times: list[float] = []
        runner._grammar_bitmask = self._timed_fill
        self.set_serial(False)

    def _timed_fill(self, *a, **kw):
        t0 = time.perf_counter()
        out = self.fill(*a, **kw)
        if out is not None:
            self.times.append(time.perf_counter() - t0)
        return out

    def _blocking_run(self, *args):
        import jax

        logits, hidden = self.run_model(*args)
        return jax.block_until_ready(logits), hidden

    def set_serial(self, serial: bool) -> None:
        self.runner._run_model = self._blocking_run if serial else self.run_model


def run_one(llm, batch: int, max_tokens: int, constrained: bool, tok) -> dict:
    from jaxserve.engine import SamplingParams, StructuredOutputsParams

    rng = np.random.default_rng(batch)
    prompts = [{"prompt_token_ids": rng.integers(10, len(tok), 32).tolist()}
               for _ in range(batch)]
    so = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=max_tokens, ignore_eos=True,
                            structured_outputs=so)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    if constrained:  # the oracle: every output is a prefix of valid JSON for the schema
        assert all(o.outputs[0].text.startswith("[{") for o in outs), outs[0].outputs[0].text
    return {"output_tokens": n_out, "wall_s": wall, "tok_s": n_out / wall}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default="/tmp/jaxserve-grammar-bench")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    from jaxserve.llm import LLM

    path = write_model(args.cache_dir, args.vocab)
    llm = LLM(path, dtype="float32", max_model_len=256, max_num_seqs=max(args.batches),
              max_num_batched_tokens=1024, show_progress=False, seed=0)
    tok = llm.get_tokenizer()
    engine, runner = llm.engine, llm.engine.runner
    llg_backend = engine.grammars
    configs = [("unconstrained", None, False), ("llguidance", llg_backend, False),
               ("llguidance-serial", llg_backend, True)]
    try:
        configs.insert(2, ("xgrammar", XgrBackend(tok, engine.config.vocab_size), False))
    except ImportError:
        print("xgrammar is not installed (pip install xgrammar): its row is skipped",
              file=sys.stderr)
    rows = []
    compiles_before = runner.num_compilations
    inst = Instrument(runner)
    for batch in args.batches:
        # configurations interleaved in every repeat: load changes hit them all alike
        tok_s = {name: [] for name, _, _ in configs}
        fills = {name: [] for name, _, _ in configs}
        for rep in range(args.repeats + 1):  # repeat 0 warms caches, not counted
            for name, backend, serial in configs:
                engine._grammars = backend if backend is not None else llg_backend
                inst.set_serial(serial)
                inst.times = []
                res = run_one(llm, batch, args.max_tokens if rep else 8, backend is not None,
                              tok)
                if rep:
                    tok_s[name].append(res["tok_s"])
                    fills[name] += inst.times
        for name, _, _ in configs:
            row = {"config": name, "batch": batch, "max_tokens": args.max_tokens,
                   "repeats": args.repeats, "tok_s_median": statistics.median(tok_s[name]),
                   "tok_s_all": tok_s[name],
                   "mask_ms_per_step_median": (1e3 * statistics.median(fills[name])
                                               if fills[name] else 0.0),
                   "vocab": engine.config.vocab_size, "load": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    inst.set_serial(False)
    assert runner.num_compilations == compiles_before, "compiled while serving"
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "rows": rows,
                       "loadavg_end": os.getloadavg()}, f, indent=1)
    assert runner.num_compilations == compiles_before, "compiled while serving"
    print(f"\n{'batch':>5} {'config':18} {'tok/s':>8} {'vs unconstr.':>12} {'mask ms/step':>12}")
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["config"] == "unconstrained")
        print(f"{r['batch']:5d} {r['config']:18} {r['tok_s_median']:8.1f} "
              f"{r['tok_s_median'] / base['tok_s_median']:12.3f} "
              f"{r['mask_ms_per_step_median']:12.3f}")


if __name__ == "__main__":
    main()
