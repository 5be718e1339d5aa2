"""Dense projection whose weight layout follows the kernel that reads it: on a CPU with AVX-512
BF16 and no AMX, panels packed once at load for the packed-weight kernel (every row count,
bf16 and f32); elsewhere what XLA:CPU's matmul reads fastest per dtype, with the CPU kernels
below for decode-sized bf16 steps (and for weights not packed, e.g. dequantized ones)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.cpu_kernels import amx_matmul
from jaxserve.cpu_kernels import build as cpu_build
from jaxserve.cpu_kernels import dpbf16_matmul
from jaxserve.cpu_kernels import matvec as cpu_matvec
from jaxserve.cpu_kernels import matvec_quant as cpu_matvec_quant
from jaxserve.cpu_kernels import packed_matmul as cpu_packed

logger = logging.getLogger(__name__)

# Up to this many token rows a bf16 projection on the CPU runs the C++ decode kernel
# (cpu_kernels/matvec.cc), which streams the weight once; past it XLA's matmul, whose per-call
# packing of the weight is amortised over the rows (benchmarks/decode_probe.py --cpu-matvec).
MATVEC_MAX_ROWS = 4
# On a CPU without AMX the matvec kernel also serves steps of up to this many rows: on a 2-core
# Zen 4 the small model's 84 projections + lm_head took 24.3-24.7 ms at 8 rows through it
# against 30.3-30.4 ms through the broadcast-weight kernel (at 16 rows that one wins, 31.5 vs
# 33.2 ms). With AMX the tile kernel takes over from MATVEC_MAX_ROWS + 1, and on a CPU with
# neither XLA's matmul does.
MATVEC_MAX_ROWS_NO_AMX = 8
# From there up to this many rows (decode batches), on a CPU with AMX, the tile kernel
# (cpu_kernels/amx_matmul.cc), which also reads the weight in place and splits every projection
# over all threads (XLA runs most decode-sized fusions on one thread); on a CPU with AVX-512 BF16
# but no AMX (AMD Zen 4), the broadcast-weight kernel (cpu_kernels/dpbf16_matmul.cc). Prefill
# chunks stay on XLA's matmul, faster there.
AMX_MAX_ROWS = 64


def rows_major(dtype) -> bool:
    """True: store the weight [out, in] as HF does (param `weight`); False: [in, out] (`kernel`).

    XLA:CPU 0.12 runs these matmuls in YNNPACK. Its bf16 kernel repacks the weight on every call
    whatever the layout, and from [out, in] the bf16 matvecs took ~20% less CPU (perf: the pack
    is most of a decode matvec). Its f32 kernel reads [in, out] as it is, with no packing pass,
    while [out, in] is repacked every call: f32 keeps [in, out].
    """
    return jnp.dtype(dtype) != jnp.float32


def select_cpu_matvec(requested: str = "auto", tensor_parallel_size: int = 1) -> bool:
    """Whether bf16 decode projections use the CPU kernel; decided once at start-up, logged.

    auto: on the CPU platform with tensor_parallel_size 1 (the kernel is not sharded), when it
    builds; a failed build is logged with its reason and XLA's matmul is used. off: never."""
    if requested not in ("auto", "off"):
        raise ValueError(f"cpu_matvec: {requested!r} is not one of auto, off")
    if requested == "off" or jax.default_backend() != "cpu":
        return False
    if tensor_parallel_size > 1:
        logger.info("linear: the CPU decode kernel is not sharded; tensor_parallel_size %d uses "
                    "XLA's matmul", tensor_parallel_size)
        return False
    try:
        cpu_matvec.ensure_built()
        cpu_matvec_quant.ensure_built()  # the quantized projections' kernel, same switch
    except cpu_build.KernelBuildError as e:
        logger.warning("linear: the CPU decode kernel could not be built, using XLA's slower "
                       "matmul for decode steps: %s", e)
        return False
    if cpu_packed.available():
        logger.info("linear: no AMX; bf16 and f32 weights are packed at load into 16-column "
                    "panels and projections of every row count (decode and prefill) run the "
                    "packed-weight AVX-512 kernel")
        return True
    logger.info("linear: bf16 projections of up to %d rows run the CPU decode kernel",
                matvec_max_rows())
    if amx_matmul.available():
        logger.info("linear: bf16 projections of %d-%d rows run the AMX tile kernel",
                    MATVEC_MAX_ROWS + 1, AMX_MAX_ROWS)
    elif dpbf16_matmul.available():
        logger.info("linear: no AMX; bf16 projections of %d-%d rows run the AVX-512 BF16 kernel",
                    matvec_max_rows() + 1, AMX_MAX_ROWS)
    else:
        logger.info("linear: neither AMX nor AVX-512 BF16 on this CPU; XLA's matmul runs the "
                    "%d-%d row projections", matvec_max_rows() + 1, AMX_MAX_ROWS)
    return True


def matvec_max_rows() -> int:
    """The most rows a projection sends to the matvec kernel on this CPU: 8 where the next
    kernel would be the AVX-512 BF16 one (no AMX), else 4."""
    if dpbf16_matmul.available() and not amx_matmul.available():
        return MATVEC_MAX_ROWS_NO_AMX
    return MATVEC_MAX_ROWS


def cpu_matmul(use: bool, x: jax.Array, w: jax.Array) -> jax.Array | None:
    """y = x @ w^T [T, N] on a CPU kernel for a bf16 x [T, K] and w [N, K], or None where XLA's
    matmul serves the shape (a static choice, made at trace time)."""
    if not (use and x.ndim == 2 and x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16):
        return None
    rows = x.shape[0]
    if rows <= matvec_max_rows():
        return cpu_matvec.matvec(x, w)
    if rows > AMX_MAX_ROWS:
        return None
    if amx_matmul.available():
        if amx_matmul.shape_ok(x, w):
            return amx_matmul.amx_matmul(x, w)
        instead = "the AVX-512 BF16 kernel" if dpbf16_matmul.available() else "XLA's matmul"
        logger.info("linear: [%d, %d] weight does not fit the AMX tiles (K %% %d, N %% %d): %s",
                    *w.shape, amx_matmul.K_MULTIPLE, amx_matmul.N_MULTIPLE, instead)
    if dpbf16_matmul.available():
        return dpbf16_matmul.dpbf16_matmul(x, w)
    return None


def packable(matvec: bool, weight: jax.Array) -> bool:
    """Whether a float weight is packed at load for the packed-weight kernel: its module runs
    the CPU kernels (matvec), it is bf16 or f32, and this CPU takes that kernel."""
    return (matvec and weight.dtype in (jnp.bfloat16, jnp.float32)
            and cpu_packed.available())


def packed_param(weight: jax.Array) -> nnx.Param:
    """weight [N, K] packed into 16-column panels (bf16 [ceil(N/16), ceil(K/2), 32], f32
    [ceil(N/16), K, 16]; see cpu_kernels/packed_matmul.py), on the weight's device/sharding."""
    return nnx.Param(jax.device_put(cpu_packed.pack(weight), weight.sharding))


def pack_weights(model: nnx.Module, kinds: tuple[type, ...]) -> int:
    """Pack, in place, every module of model of one of `kinds` (classes with a pack() method:
    Linear, Embedding, QuantizedLinear) that runs the CPU kernels, once after loading (one
    tensor at a time); returns how many were packed."""
    count = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, kinds) and node.pack():
            count += 1
    return count


class Linear(nnx.Module):
    """y = x @ W (+ bias); W is `weight` [out, in] or `kernel` [in, out] (see rows_major), or,
    under the same name, packed into 16-column panels after loading (pack, on CPUs with
    AVX-512 BF16 and no AMX).

    matvec: decode-sized bf16 inputs run the CPU kernel (see select_cpu_matvec)."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool, dtype, rngs: nnx.Rngs,
                 matvec: bool = False):
        init = jax.random.normal(rngs.params(), (out_dim, in_dim), dtype=dtype) * (in_dim**-0.5)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.matvec = matvec
        self.packed = False
        self.f32_out = False  # packed only: y in f32, not rounded to bf16 (an lm_head's logits)
        self.rows_major = rows_major(dtype)
        if self.rows_major:
            self.weight = nnx.Param(init)  # [out, in]
        else:
            self.kernel = nnx.Param(init.T)  # [in, out]
        self.bias = nnx.Param(jnp.zeros((out_dim,), dtype=dtype)) if bias else None  # [out]

    def pack(self) -> bool:
        """Replace the loaded weight (`weight` [out, in], or f32's `kernel` [in, out]) by its
        packed panels, under the same name, where packable."""
        if self.packed:
            return False
        w = self.weight[...] if self.rows_major else self.kernel[...].T  # [out, in]
        if not packable(self.matvec, w):
            return False
        if self.rows_major:
            self.weight = packed_param(w)
        else:
            self.kernel = packed_param(w)
        self.packed = True
        return True

    def panels(self) -> jax.Array:
        """The packed weight (after pack)."""
        return (self.weight if self.rows_major else self.kernel)[...]

    def panel_scales(self) -> None:
        """Float panels carry no scales (a packed QuantizedLinear's do)."""
        return None

    def panel_zeros(self) -> None:
        """Float panels carry no zero points (an asymmetric QuantizedLinear's do)."""
        return None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.packed:
            y = cpu_packed.packed_matmul(x, self.panels(), self.out_dim,
                                         jnp.float32 if self.f32_out else None)  # [T, out]
        elif self.rows_major:
            w = self.weight[...]
            y = cpu_matmul(self.matvec, x, w)  # [T, out], or None: XLA's matmul
            if y is None:
                y = jnp.einsum("ti,oi->to", x, w)
        else:
            y = jnp.einsum("ti,io->to", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def _joined(parts: list[nnx.Module], join) -> tuple[jax.Array, jax.Array | None,
                                                    jax.Array | None]:
    """(panels, scales, zero points) of packed projections of one input joined into one weight:
    join(list of [P_i, ...]) -> [sum P_i, ...] (concatenation, or gate/up interleaving);
    quantized panels regrouped as one weight (cpu_kernels/packed_matmul.py: group_panels)."""
    sharding = parts[0].panels().sharding
    panels = join([cpu_packed.ungroup_panels(p.panels()) for p in parts])
    scales = None if parts[0].panel_scales() is None else join([p.panel_scales() for p in parts])
    zeros = None if parts[0].panel_zeros() is None else join([p.panel_zeros() for p in parts])
    if scales is not None:
        panels = cpu_packed.stored_panels(panels)
    put = lambda a: None if a is None else jax.device_put(a, sharding)  # noqa: E731
    return put(panels), put(scales), put(zeros)


def _same_kind(parts: list[nnx.Module]) -> bool:
    """Packed projections of one input that one kernel call can run as one weight: same class,
    panel dtype and width, scale groups, and zero points (all or none)."""
    first = parts[0]
    if not all(getattr(p, "packed", False) and type(p) is type(first) for p in parts):
        return False

    def kind(p):
        panels, scales = p.panels(), p.panel_scales()
        return (p.in_dim, panels.dtype, panels.shape[-1],
                None if scales is None else scales.shape[1:], p.panel_zeros() is None)

    return all(kind(p) == kind(first) for p in parts)


class PackedGateUp(nnx.Module):
    """silu(h @ Wg^T) * (h @ Wu^T) of a gated MLP in one call of the packed kernel, from two
    packed projections (no bias), both Linear or both quantized (QuantizedLinear): their panels
    interleaved, gate panel i then up panel i (and so their scales and zero points)."""

    def __init__(self, gate: nnx.Module, up: nnx.Module):
        panels, scales, zeros = _joined([gate, up], lambda a: cpu_packed.interleave(*a))
        self.scales = None if scales is None else nnx.Param(scales)  # [2P, (G,) 16]
        self.zeros = None if zeros is None else nnx.Param(zeros)  # like scales
        # named as the layers they fuse name theirs (weight reports count qweight as quantized)
        if self.scales is not None:
            self.qweight = nnx.Param(panels)
        else:
            self.weight = nnx.Param(panels)
        self.out_dim = gate.out_dim

    @staticmethod
    def fusable(gate: nnx.Module, up: nnx.Module, act_name: str) -> bool:
        """Packed, bias-free, same-shaped, same-kind gate and up under a silu activation (both
        symmetric or both with zero points)."""
        return (act_name in ("silu", "swish") and _same_kind([gate, up])
                and gate.bias is None and up.bias is None and gate.out_dim == up.out_dim)

    def __call__(self, h: jax.Array) -> jax.Array:
        if self.scales is not None:
            zeros = None if self.zeros is None else self.zeros[...]
            return cpu_packed.packed_glu_matmul(h, self.qweight[...], self.out_dim,
                                                self.scales[...], zeros)  # [T, out]
        return cpu_packed.packed_glu_matmul(h, self.weight[...], self.out_dim)  # [T, out]


class PackedProjections(nnx.Module):
    """Projections of the same input (an attention layer's q, k and v) in one call of the packed
    kernel: their panels, scales, zero points and biases concatenated, the output split. Each
    part's result is what its own layer computes (the same sums, bias and rounding); the
    kernel's fixed cost per call is paid once (on the small model, k and v each took ~8 us for
    115 KB of int8 panels)."""

    def __init__(self, parts: list[nnx.Module]):
        panels, scales, zeros = _joined(parts, jnp.concatenate)
        self.scales = None if scales is None else nnx.Param(scales)  # [sum P, (G,) 16]
        self.zeros = None if zeros is None else nnx.Param(zeros)
        if self.scales is not None:
            self.qweight = nnx.Param(panels)
        else:
            self.weight = nnx.Param(panels)
        bias = parts[0].bias
        self.bias = None if bias is None else nnx.Param(jax.device_put(
            jnp.concatenate([p.bias[...] for p in parts]), bias[...].sharding))  # [sum out]
        self.sizes = tuple(p.out_dim for p in parts)

    @staticmethod
    def fusable(parts: list[nnx.Module]) -> bool:
        """Packed projections of one kind, each but the last a whole number of panels, with a
        bias each or none."""
        return (_same_kind(parts) and all(p.out_dim % cpu_packed.PANEL == 0 for p in parts[:-1])
                and len({p.bias is None for p in parts}) == 1)

    def __call__(self, h: jax.Array) -> tuple[jax.Array, ...]:
        """h [T, in] -> one [T, out_i] per part, in h's dtype."""
        n = sum(self.sizes)
        bias = None if self.bias is None else self.bias[...]
        if self.scales is None:  # as Linear: rounded, then its bias added
            y = cpu_packed.packed_matmul(h, self.weight[...], n)  # [T, n]
            y = y if bias is None else y + bias
        else:  # as QuantizedLinear: the bias added to the f32 sums, then one rounding
            zeros = None if self.zeros is None else self.zeros[...]
            y = cpu_packed.packed_matmul(h, self.qweight[...], n,
                                         None if bias is None else jnp.float32,
                                         self.scales[...], zeros)
            y = y if bias is None else (y + bias.astype(jnp.float32)).astype(h.dtype)
        return tuple(jnp.split(y, np.cumsum(self.sizes)[:-1], axis=-1))


class Embedding(nnx.Module):
    """Token embedding table [vocab, hidden]; doubles as a tied lm_head. Packed like a Linear
    weight (pack): the lookup then reads each token's row out of its panel."""

    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs, matvec: bool = False):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim), dtype=dtype))
        self.vocab, self.dim = vocab, dim
        self.matvec = matvec
        self.packed = False

    def pack(self) -> bool:
        """Replace the loaded table [vocab, hidden] by its packed panels where packable."""
        if self.packed or not packable(self.matvec, self.embedding[...]):
            return False
        self.embedding = packed_param(self.embedding[...])
        self.packed = True
        return True

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        if self.packed:  # token v is column v % 16 of panel v // 16: [P, steps, 16, pair]
            panels = self.embedding[...]
            pair = panels.shape[2] // cpu_packed.PANEL  # 2 (bf16) or 1 (f32)
            table = panels.reshape(panels.shape[0], panels.shape[1], cpu_packed.PANEL, pair)
            rows = table[token_ids // cpu_packed.PANEL, :, token_ids % cpu_packed.PANEL, :]
            return rows.reshape(token_ids.shape[0], -1)[:, : self.dim]  # [T, hidden]
        return jnp.take(self.embedding[...], token_ids, axis=0)  # [T, hidden]

    def attend(self, x: jax.Array) -> jax.Array:
        if self.packed:  # f32 [T, vocab]: the logits, never rounded
            return cpu_packed.packed_matmul(x, self.embedding[...], self.vocab, jnp.float32)
        y = cpu_matmul(self.matvec, x, self.embedding[...])  # [T, vocab]
        if y is not None:
            return y
        return jnp.einsum("td,vd->tv", x, self.embedding[...])  # [T, vocab]
