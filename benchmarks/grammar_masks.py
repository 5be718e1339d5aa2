"""Per-step token-mask cost of grammar libraries (llguidance, xgrammar) at batch 1 and 32.

A JSON-schema grammar is walked along a valid document's tokens, matcher j of the batch from
its own offset (so the batch holds different grammar states); every step fills the packed int32
bitmask [batch, ceil(vocab/32)] of the `batch` matchers then advances each by one token, as the
engine does per decode step. Also the compile time (cold and cached). Tokenizer: a
byte-level BPE trained here on Python's standard library sources (32k vocab by default), so no
download is needed.

    python benchmarks/grammar_masks.py --vocab 32000 --batch 1 32
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@analytical.com",
       "tags": ["math", "engines", "poetry"],
       "address": {"street": "12 St James Square", "city": "London", "zip": "10001"},
       "active": True}


def build_tokenizer(out_dir: str, vocab: int):
    """A byte-level BPE tokenizer of `vocab` entries trained on the stdlib's .py files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(out_dir, f"bpe{vocab}")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"),
                             recursive=True))[:3000]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = (open(f, encoding="utf-8", errors="ignore").read() for f in files)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


class Llg:
    name = "llguidance"

    def __init__(self, hf_tok, vocab: int, threads: int):
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self.llg, self.np = llguidance, llguidance.numpy
        self.tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(threads)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        m = self.llg.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    def matchers(self, compiled, batch: int):
        return [compiled.deep_copy() for _ in range(batch)]

    def fill(self, matchers, bitmask):
        self.np.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matchers, tokens: list[int]):
        for m, t in zip(matchers, tokens):
            assert m.consume_token(t), m.get_error()


class Xgr:
    name = "xgrammar"

    def __init__(self, hf_tok, vocab: int, threads: int):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads)
        self.batch = xgrammar.BatchGrammarMatcher(threads)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                   separators=(",", ":"))

    def matchers(self, compiled, batch: int):
        return [self.xgr.GrammarMatcher(compiled) for _ in range(batch)]

    def fill(self, matchers, bitmask):
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matchers, tokens: list[int]):
        for m, t in zip(matchers, tokens):
            assert m.accept_token(t)


def measure(lib, tokens: list[int], vocab: int, batches: list[int]) -> dict:
    t0 = time.perf_counter()
    compiled = lib.compile(SCHEMA)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    lib.compile(SCHEMA)
    warm = time.perf_counter() - t0
    out = {"library": lib.name, "compile_cold_ms": 1e3 * cold, "compile_again_ms": 1e3 * warm}
    words = (vocab + 31) // 32
    for batch in batches:
        fills, accepts = [], []
        # matcher j walks the document from its own offset (different grammar states)
        offsets = [j % (len(tokens) // 2) for j in range(batch)]
        for _ in range(3):
            matchers = lib.matchers(compiled, batch)
            for j, off in enumerate(offsets):
                for t in tokens[:off]:
                    lib.accept([matchers[j]], [t])
            bitmask = np.zeros((batch, words), np.int32)  # [B, V/32]
            for step in range(len(tokens) - max(offsets)):
                t0 = time.perf_counter()
                lib.fill(matchers, bitmask)
                t1 = time.perf_counter()
                lib.accept(matchers, [tokens[off + step] for off in offsets])
                fills.append(t1 - t0)
                accepts.append(time.perf_counter() - t1)
        out[f"b{batch}_fill_ms_median"] = 1e3 * statistics.median(fills)
        out[f"b{batch}_fill_ms_p90"] = 1e3 * float(np.percentile(fills, 90))
        out[f"b{batch}_accept_ms_median"] = 1e3 * statistics.median(accepts)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default="/tmp/jaxserve-grammar-bench")
    ap.add_argument("--libs", nargs="+", default=["llguidance", "xgrammar"])
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    tok = build_tokenizer(args.cache_dir, args.vocab)
    vocab = len(tok)
    tokens = tok.encode(json.dumps(DOC, separators=(",", ":")), add_special_tokens=False)
    tokens.append(tok.eos_token_id)
    libs = {"llguidance": Llg, "xgrammar": Xgr}
    rows = []
    for name in args.libs:
        row = measure(libs[name](tok, vocab, args.threads), tokens, vocab, args.batch)
        row.update(vocab=vocab, steps=len(tokens), threads=args.threads,
                   load=os.getloadavg()[0])
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "rows": rows,
                       "loadavg_end": os.getloadavg()}, f, indent=1)
    print(f"\n{'library':12} {'compile ms':>10} " + " ".join(
        f"{'b%d fill ms' % b:>12}" for b in args.batch), file=sys.stderr)
    for r in rows:
        print(f"{r['library']:12} {r['compile_cold_ms']:10.1f} " + " ".join(
            f"{r[f'b{b}_fill_ms_median']:12.3f}" for b in args.batch), file=sys.stderr)


if __name__ == "__main__":
    main()
