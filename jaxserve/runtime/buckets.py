"""Bucket sizes: the few fixed shapes the model step is compiled for."""

from __future__ import annotations

from dataclasses import dataclass


MIN_SEQS = 2  # smallest padded request count: see BucketSpec
MIN_LOGIT_ROWS = 2  # a 1-request step still gathers 2 logit rows: the samplers start at 2


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2*lo, ... up to and including hi (hi itself is added when not a power of two)."""
    out, v = [], max(1, lo)
    while v < hi:
        out.append(v)
        v *= 2
    out.append(hi)
    return tuple(out)


def seq_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Decode row counts: powers of two, plus the midpoint 1.5x of each from 32 on (48, 96, ...),
    up to and including hi. A decode step's projections cost grows in 16-row steps on the CPU
    kernels (dpbf16_matmul, AMX tiles), so 33-48 rows padded to 64 wasted up to half the step."""
    base = powers_of_two(lo, hi)
    return tuple(sorted({*base, *(3 * p // 2 for p in base if 32 <= p and 3 * p // 2 < hi)}))


def pick(buckets: tuple[int, ...], n: int) -> int:
    """The smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class BucketSpec:
    """The shape buckets of one engine configuration.

    tokens: padded length of the flat token axis (mixed prefill/decode steps);
    seqs: padded request count (decode-only steps have tokens == seqs). The smallest is 2 where
    XLA writes the KV cache (min_seqs): with a single token, XLA turns the KV-cache scatter into
    a dynamic-update-slice that it duplicates into its two consumers (attention and the
    returned cache), copying the whole cache per layer; such a step ran ~40x slower on CPU than
    a 2-row one. The CPU attention kernel writes the cache in its own call, so there a lone
    request decodes in a 1-row step (the projections' kernels do no work for a padding row);
    widths: padded block-table width (blocks per request); one full width when the attention
    loops stop at the real lengths by themselves (blockwise, pallas) — width buckets only pay
    for the reference, which reads the whole padded width;
    decode_programs: whether a decode-only step compiles to another program than a mixed step
    of the same size (only when the attention reads the static max_query_len bound, see
    decode_has_own_program); otherwise the two are one executable;
    verify_tokens: with speculation, k + 1: a lone request's verification step (a mixed step of
    k + 1 tokens) gets a token bucket of exactly that size, compiled with fewer request rows
    (2, 4, ...) as well; token buckets from 32 on get 1.5x midpoints. On the CPU the
    projections cost grows with the padded rows (8 rows of f32 weights are compute-bound on 2
    cores), so k = 4 verifies 5 rows instead of 8, and 8 requests 48 instead of 64.
    """

    tokens: tuple[int, ...]
    seqs: tuple[int, ...]
    widths: tuple[int, ...]
    decode_programs: bool = True
    verify_tokens: int = 0

    @classmethod
    def build(cls, max_num_batched_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
              min_tokens: int = 16, bucket_widths: bool = True,
              decode_programs: bool = True, min_seqs: int = MIN_SEQS,
              verify_tokens: int = 0) -> BucketSpec:
        widths = []
        w = 4
        while bucket_widths and w < max_blocks_per_seq:  # every 4x: at most 4x over-read
            widths.append(w)
            w *= 4
        widths.append(max_blocks_per_seq)
        # speculation: b requests verify b * (k + 1) tokens, so steps of 32 tokens and more
        # get the 1.5x midpoints as decode rows do (k = 4: 8 requests verify 40 tokens in 48)
        sizes = seq_buckets if verify_tokens else powers_of_two
        tokens = sizes(min(min_tokens, max_num_batched_tokens), max_num_batched_tokens)
        verify = verify_tokens if 1 < verify_tokens <= max_num_batched_tokens else 0
        return cls(
            tokens=tuple(sorted({*tokens, verify} - {0})),
            seqs=seq_buckets(min_seqs, max(min_seqs, max_num_seqs)),
            widths=tuple(sorted(set(widths))),
            decode_programs=decode_programs,
            verify_tokens=verify,
        )

    def step_key(self, shape: tuple[int, int, int, bool]) -> tuple[int, int, int, bool]:
        """The executable key of a (tokens, seqs, width, decode_only) step shape."""
        t, s, w, decode_only = shape
        return (t, s, w, decode_only and self.decode_programs)

    def mixed_seqs(self, t: int) -> tuple[int, ...]:
        """Request-row buckets of a mixed step of t tokens: min(t, the most rows); for the
        verification bucket, every row bucket below that too."""
        top = min(t, self.seqs[-1])
        if t != self.verify_tokens:
            return (top,)
        return tuple(sorted({s for s in self.seqs if s < top} | {top}))

    def step_shapes(self) -> list[tuple[int, int, int, bool]]:
        """Every distinct executable key the runner can ask for; all are warmed up."""
        shapes = []
        for w in self.widths:
            for s in self.seqs:
                shapes.append(self.step_key((s, s, w, True)))
            for t in self.tokens:
                for s in self.mixed_seqs(t):
                    shapes.append((t, s, w, False))
        return list(dict.fromkeys(shapes))


def decode_has_own_program(attention_backend: str) -> bool:
    """Only the reference attention reads AttentionMetadata.max_query_len (a static bound that
    makes decode-only steps a program of their own); blockwise and pallas ignore it, so their
    decode-only step is the mixed step of the same size (tests/llm/test_step_executables.py
    checks that the two lower to the same program)."""
    return attention_backend == "reference"
