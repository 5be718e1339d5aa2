"""Trained benchmark fixture: a small Llama target and a 2-layer draft, trained on CPU with torch.

Both share one byte-level BPE tokenizer trained on a fixed local corpus (the Python standard
library's own .py files, sorted by path, capped in bytes), so a draft's guesses and a quantized
model's quality mean something. Seeds are fixed; the result is cached under
~/.cache/jaxserve/trained/<shape name>/ as HF checkpoints (config.json + model.safetensors +
tokenizer). For benchmarks only; tests use random-weight models.

    PYTHONPATH=. python benchmarks/trained_models.py            # build (or reuse) both
    PYTHONPATH=. python benchmarks/trained_models.py --force    # rebuild
    PYTHONPATH=. python benchmarks/trained_models.py --force --target-steps 600
                                                # a longer schedule, on a quiet machine
    PYTHONPATH=. python benchmarks/trained_models.py --tiny   # the first (4M) fixture
The steps used are recorded in each model's jaxserve_trained.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from jaxserve.demo import CHAT_TEMPLATE, DEFAULT_CACHE, SPECIAL_TOKENS

TRAINED_CACHE = os.path.join(DEFAULT_CACHE, "trained")
CORPUS_BYTES = 3_000_000
VOCAB_TARGET = 2048
SEQ_LEN = 128


@dataclass(frozen=True)
class TrainedShape:
    """One model's shape and its training schedule (a fixed number of steps, not a time)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    steps: int
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0
    teacher: str | None = None  # another shape's name: learn its next-token distributions


# The target is wide enough that a one-token decode step is bound by reading its weights
# (~40 MB in bf16), as on real models, not by the engine's fixed per-step cost: that is what
# speculative decoding trades on (verifying k + 1 tokens costs about one step). The draft is a
# 2-layer model of the same family, ~16x fewer non-embedding weights, distilled from the target
# (its loss is the cross-entropy against the target's next-token distributions, not the corpus
# tokens): what a draft is for is agreeing with its target. Trained on the corpus alone
# ("draft-2l"), it agreed on 40-53% of greedy drafts (results/cpu_spec_decode_trained20m_*).
# One thread on a quiet 2-core EPYC: ~2 s per target step, ~0.25 s per draft step (~0.6 s
# distilled: the target's forward pass too).
TARGET = TrainedShape("target-20m", 512, 1408, 6, 8, 4, steps=400, lr=2e-3)
DRAFT = TrainedShape("draft-2l-distilled", 256, 688, 2, 4, 2, steps=800, lr=4e-3, seed=1,
                     teacher="target-20m")
# The first fixture (sessions 4-7): a 4M-parameter target whose decode steps were all fixed cost.
TINY_TARGET = TrainedShape("target", 256, 688, 4, 4, 2, steps=500)
TINY_DRAFT = TrainedShape("draft", 128, 352, 1, 2, 1, steps=600, lr=5e-3, seed=1)


def corpus_files() -> list[str]:
    """The stdlib's .py files (tests and site-packages excluded), sorted by relative path."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("test", "tests", "site-packages", "idle_test",
                                          "__pycache__", "lib2to3"))
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def load_corpus(max_bytes: int = CORPUS_BYTES) -> list[str]:
    """Whole files, in path order, until max_bytes of text."""
    texts, total = [], 0
    for path in corpus_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def build_tokenizer(texts: list[str], out_dir: str):
    """Byte-level BPE trained on the corpus; saved HF-style (PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def encode_corpus(tok, texts: list[str]) -> np.ndarray:
    """All files as one token stream, each file closed by eos."""
    ids: list[int] = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return np.asarray(ids, np.int64)  # [num_corpus_tokens]


def _llama(shape: TrainedShape, tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"],
        tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(shape.seed)
    return LlamaForCausalLM(config)


def train(shape: TrainedShape, tok, stream: np.ndarray, out_dir: str,
          cache: str = TRAINED_CACHE) -> dict:
    """AdamW with linear warm-up and cosine decay on random SEQ_LEN windows; save_pretrained.
    With a teacher (an already trained shape), the loss is the cross-entropy of the model's
    next-token distribution against the teacher's on the same windows."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(shape.seed)
    model = _llama(shape, tok)
    teacher = None
    if shape.teacher:
        teacher = LlamaForCausalLM.from_pretrained(trained_dir(shape.teacher, cache),
                                                   dtype=torch.float32).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=shape.lr, weight_decay=0.01,
                            betas=(0.9, 0.95))
    warmup = max(1, shape.steps // 20)

    def lr_at(step):
        if step < warmup:
            return shape.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, shape.steps - warmup)
        return shape.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))

    rng = np.random.default_rng(shape.seed)
    t0, losses = time.perf_counter(), []
    model.train()
    for step in range(shape.steps):
        starts = rng.integers(0, len(stream) - SEQ_LEN - 1, shape.batch_size)
        batch = torch.from_numpy(np.stack([stream[s:s + SEQ_LEN] for s in starts]))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if teacher is None:
            loss = model(input_ids=batch, labels=batch).loss
        else:
            with torch.no_grad():
                target_p = torch.softmax(teacher(input_ids=batch).logits, dim=-1)  # [B, S, V]
            log_q = torch.log_softmax(model(input_ids=batch).logits, dim=-1)
            loss = -(target_p * log_q).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == shape.steps - 1:
            print(f"[{shape.name}] step {step} loss {losses[-1]:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    info = {**asdict(shape), "seq_len": SEQ_LEN, "train_seconds": time.perf_counter() - t0,
            "final_loss_avg10": float(np.mean(losses[-10:])),
            "params": sum(p.numel() for p in model.parameters())}
    with open(os.path.join(out_dir, "jaxserve_trained.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def trained_dir(name: str, cache: str = TRAINED_CACHE) -> str:
    return os.path.join(cache, name)


def ensure_trained(cache: str = TRAINED_CACHE, force: bool = False,
                   roles: dict[str, TrainedShape] | None = None) -> dict[str, str]:
    """Build the tokenizer and each model not yet cached under its shape's name; returns
    {role: dir} for roles {"target": TARGET, "draft": DRAFT} unless given."""
    import torch

    roles = roles or {"target": TARGET, "draft": DRAFT}
    dirs = {role: trained_dir(s.name, cache) for role, s in roles.items()}
    todo = [(role, s) for role, s in roles.items()
            if force or not os.path.exists(os.path.join(dirs[role], "jaxserve_trained.json"))]
    if not todo:
        return dirs
    # one thread: the same float summation order on any machine (bitwise-repeatable training),
    # and no intra-op barrier stalls when the machine is oversubscribed
    torch.set_num_threads(1)
    texts = load_corpus()
    tok_dir = os.path.join(cache, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    tok = build_tokenizer(texts, tok_dir)
    stream = encode_corpus(tok, texts)
    print(f"corpus: {len(texts)} files, {sum(map(len, texts))} chars, {len(stream)} tokens, "
          f"vocab {len(tok)}", flush=True)
    for role, shape in todo:
        os.makedirs(dirs[role], exist_ok=True)
        print(json.dumps(train(shape, tok, stream, dirs[role], cache)), flush=True)
    return dirs


def trained_info(path: str) -> dict:
    """The shape and training record a fixture model was saved with."""
    with open(os.path.join(path, "jaxserve_trained.json")) as f:
        return json.load(f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=TRAINED_CACHE)
    ap.add_argument("--force", action="store_true", help="retrain even if cached")
    ap.add_argument("--target-steps", type=int, default=None,
                    help=f"training steps of the target (default {TARGET.steps})")
    ap.add_argument("--draft-steps", type=int, default=None,
                    help=f"training steps of the draft (default {DRAFT.steps})")
    ap.add_argument("--tiny", action="store_true",
                    help="the first fixture (4M-parameter target, 1-layer draft)")
    args = ap.parse_args(argv)
    target, draft = (TINY_TARGET, TINY_DRAFT) if args.tiny else (TARGET, DRAFT)
    roles = {"target": replace(target, steps=args.target_steps or target.steps),
             "draft": replace(draft, steps=args.draft_steps or draft.steps)}
    print(json.dumps(ensure_trained(args.cache, args.force, roles)))


if __name__ == "__main__":
    main()
