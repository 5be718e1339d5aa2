"""Weight-only quantized projection (int8 / int4 / fp8 weights + float32 scales, W*A16)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.cpu_kernels import matvec_quant as cpu_matvec_quant
from jaxserve.cpu_kernels import packed_matmul as cpu_packed
from jaxserve.layers.linear import Linear, cpu_matmul
from jaxserve.layers.quant_scheme import QWEIGHT_DTYPES, QuantConfig

logger = logging.getLogger(__name__)

# Up to this many tokens per step the matmul is written as multiply + reduce over the input
# axis: XLA:CPU fuses the int8 -> f32 convert (and the int4 / fp8 decode) into that reduction
# (one YNNPACK fusion reading the quantized bytes), while its dot_general first materialises
# an f32 copy of the whole weight every step. Past it (prefill) the copy is amortised over the
# tokens and the dot wins; the decode arithmetic of int4 / fp8 makes their reduction lose
# sooner. Measured with benchmarks/quant_matvec.py (results/quant_matvec_cpu.txt).
REDUCE_MAX_TOKENS = {"int8": 64, "int4": 8, "fp8": 8}
# Up to this many token rows of bf16 activations the weight-only product runs the C++ decode
# kernel (cpu_kernels/matvec_quant.cc) when the cpu_matvec switch is on: it reads each quantized
# byte once for all rows, its work growing with the rows; past these the bf16 dot on the weight
# dequantized in the step was faster over all the small model's projections
# (benchmarks/quant_matvec_probe.py --model --rows 8 16 32, with and without --kernel-max-rows).
# Packed layers (see QuantizedLinear) skip all of this: one kernel for every row count.
KERNEL_MAX_ROWS = {"int8": 16, "int4": 8, "fp8": 4}
# Methods whose weights (symmetric or with zero points) the packed-weight kernel reads as stored
# (int8 and fp8 per channel, int4 per channel or group).
PACKED_METHODS = ("int8", "fp8", "int4")


class QuantizedLinear(nnx.Module):
    """y = x @ dequant(qweight).T (+ bias), the weight kept quantized; layouts in quant_scheme.

    qweight: int8 [out, in] | uint8 [out, in / 2] (int4 pairs) | uint8 [out, in] (fp8 bits)
    scales: float32 [out, G] (G = in / group); zeros: float32 [out, G] when asymmetric.
    Per-channel int8 and fp8, and group-wise int4, symmetric or not, with the CPU kernels on a
    CPU that takes the packed-weight kernel are packed after loading (pack), under the same
    names: qweight int8 | uint8 [ceil(out/16), ceil(in/2), 32] (int4: its bytes, [ceil(out/16),
    in/2, 16]), scales f32 [ceil(out/16), 16] (int4: [ceil(out/16), G, 16]) and zeros like
    scales (cpu_kernels/packed_matmul.py); every row count then runs that kernel on the bytes.
    """

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool, dtype, quant: QuantConfig,
                 matvec: bool = False):
        self.matvec = matvec  # static: decode rows on the CPU kernel (see kernel_plan)
        self.method = quant.method
        self.int8_activations = quant.int8_activations
        self.group = quant.group_for(in_dim)
        groups = in_dim // self.group
        packed_in = in_dim // 2 if quant.method == "int4" else in_dim
        self.qweight = nnx.Param(jnp.zeros((out_dim, packed_in), QWEIGHT_DTYPES[quant.method]))
        self.scales = nnx.Param(jnp.ones((out_dim, groups), jnp.float32))  # [out, G]
        self.zeros = (None if quant.symmetric
                      else nnx.Param(jnp.zeros((out_dim, groups), jnp.float32)))  # [out, G]
        self.bias = nnx.Param(jnp.zeros((out_dim,), dtype=dtype)) if bias else None  # [out]
        self.in_dim, self.out_dim = in_dim, out_dim
        self.packed = False
        self.f32_out = False  # packed only: y in f32, not rounded (an lm_head's logits)

    def packable(self) -> bool:
        """Whether pack applies: weights per output channel (int8, fp8) or in even input groups
        (int4), with bf16 activations (W*A16), the CPU kernels on (matvec), and a CPU that
        takes the packed-weight kernel."""
        return (self.matvec and (self.method != "int4" or self.group % 2 == 0)  # byte pairs
                and packs_weights(self.method, per_channel=self.group == self.in_dim,
                                  int8_activations=self.int8_activations))

    def pack(self) -> bool:
        """Replace qweight and scales by their packed panels (see the class), once, where
        packable."""
        if self.packed or not self.packable():
            return False
        q = self.qweight[...]  # [out, in(/2)]
        int4 = self.method == "int4"

        def panels_of(per_group):  # [out, G] -> [ceil(out/16), (G,) 16]
            return nnx.Param(jax.device_put(
                cpu_packed.pack_scales(per_group if int4 else per_group[:, 0]), q.sharding))

        panels = cpu_packed.stored_panels(cpu_packed.pack(q, lanes=int4))
        self.qweight = nnx.Param(jax.device_put(panels, q.sharding))
        self.scales = panels_of(self.scales[...])
        if self.zeros is not None:
            self.zeros = panels_of(self.zeros[...])
        self.packed = True
        return True

    def panels(self) -> jax.Array:
        """The packed weight: int8 / fp8 / int4 bytes (after pack), plain [P, steps, width] or
        grouped [P / 8, steps, 8, width] (cpu_kernels/packed_matmul.py: group_panels)."""
        return self.qweight[...]

    def panel_scales(self) -> jax.Array:
        """The packed scales [ceil(out/16), 16] (int4: [ceil(out/16), G, 16]) (after pack)."""
        return self.scales[...]

    def panel_zeros(self) -> jax.Array | None:
        """The packed zero points, shaped as panel_scales (after pack), or None: symmetric."""
        return None if self.zeros is None else self.zeros[...]

    def values(self, q: jax.Array | None = None,
               scales: jax.Array | None = None) -> tuple[tuple[jax.Array, ...], float]:
        """(stored values as float32, offset): one [out, G, group] array, or for int4 the low-
        and high-nibble halves [out, G, group / 2] (the even and odd inputs); the weight is
        (value - offset - zero) * scale.

        Only convert / multiply / add / floor touch the weight: XLA:CPU fuses those into its
        YNNPACK reduction, but not bitwise ops, bitcasts, selects or f8 converts, which first
        materialise a full-size copy (benchmarks/quant_matvec.py). Constants are made per layer
        (`_per_layer`): a scalar constant shared by several same-shaped layers is broadcast
        once to the weight's shape and materialised for all of them."""
        q = self.qweight[...] if q is None else q
        out_dim = q.shape[0]
        const = _per_layer(self.scales[...] if scales is None else scales)
        if self.method == "int4":  # uint8 [out, in / 2]: byte = lo + 16 * hi, stored q + 8
            b = q.astype(jnp.float32)
            # hi = floor(b / 16) without floor(): y = b / 16 - 15/32 (exact) is never a tie, and
            # y + 1.5 * 2^23 lies where the f32 spacing is 1, so the add rounds y to an integer.
            magic = const(1.5 * 2.0**23)
            hi = ((b * const(1.0 / 16.0) - const(15.0 / 32.0)) + magic) - magic
            lo = b - const(16.0) * hi
            half = self.group // 2
            return (lo.reshape(out_dim, -1, half), hi.reshape(out_dim, -1, half)), 8.0
        v = fp8_e4m3_to_f32(q, const) if self.method == "fp8" else q.astype(jnp.float32)
        return (v.reshape(out_dim, -1, self.group),), 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.packed:  # bf16 x, every row count: the packed-weight kernel
            f32 = self.f32_out or self.bias is not None
            y = cpu_packed.packed_matmul(x, self.panels(), self.out_dim,
                                         jnp.float32 if f32 else None, self.panel_scales(),
                                         self.panel_zeros())
            return y if self.f32_out else self._finish(y, x.dtype)  # [T, out]
        if self.int8_activations:
            return self._w8a8(x)
        t = x.shape[0]
        bf16 = x.dtype == jnp.bfloat16 and x.ndim == 2
        if self.matvec and bf16 and t <= KERNEL_MAX_ROWS[self.method]:
            zeros = None if self.zeros is None else self.zeros[...]
            y = cpu_matvec_quant.matvec_quant(x, self.qweight[...], self.scales[...], zeros,
                                              self.method)  # [T, out] f32
            return self._finish(y, x.dtype)
        if bf16 and (self.matvec or t > REDUCE_MAX_TOKENS[self.method]):
            # More bf16 rows: one pass writes the dequantized weight in bf16, then XLA's bf16
            # dot (f32 sums): the pass is amortised over the rows, and at 256 rows this ran 5x
            # (int8) to 30x (int4) faster than the float32 dot below.
            w = self.dequantized(jnp.bfloat16, after=x)  # [out, in]
            y = cpu_matmul(self.matvec, x, w)  # [T, out] on the AMX kernel, or None: XLA's
            if y is None:
                y = jnp.einsum("ti,oi->to", x, w, preferred_element_type=jnp.float32)
            return self._finish(y, x.dtype)
        values, offset = self.values()
        parts = len(values)  # int4: inputs split into even / odd halves
        xf = x.astype(jnp.float32).reshape(t, -1, self.group // parts, parts)  # [T, G, k, p]
        scales = self.scales[...]  # [out, G]
        grouped = scales.shape[1] > 1
        if t <= REDUCE_MAX_TOKENS[self.method]:
            # One reduction over all inputs with the group scales applied inside it: XLA:CPU's
            # fused reduction ran ~10x slower as a reduction per group and one over groups.
            prod = sum(xf[:, None, ..., i] * v[None] for i, v in enumerate(values))
            if grouped:
                prod = prod * scales[None, :, :, None]  # [T, out, G, k]
                y = jnp.sum(prod.reshape(t, prod.shape[1], -1), axis=-1)  # [T, out]
            else:
                y = jnp.sum(prod, axis=-1)[..., 0] * scales[:, 0]  # [T, out]
        else:
            part = sum(jnp.einsum("tgk,ogk->tog", xf[..., i], v) for i, v in enumerate(values))
            y = jnp.sum(part * scales[None], axis=-1)  # [T, out]
        if offset or self.zeros is not None:
            xsum = jnp.sum(xf, axis=(-2, -1))[:, None, :]  # [T, 1, G]
            shift = offset if self.zeros is None else self.zeros[...][None] + offset  # [1, out, G]
            y = y - jnp.sum(shift * scales[None] * xsum, axis=-1)  # [T, out]
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)

    def dequantized(self, dtype, after: jax.Array | None = None) -> jax.Array:
        """The weight [out, in] in `dtype`, (value - offset - zero) * scale rounded once (of an
        unpacked layer: once packed, __call__ runs the packed kernel for every row count).

        With the CPU kernels on (matvec) a bf16 copy is written by matvec_quant.cc's dequant
        (XLA's fusion of the int4 decode ran several times slower in a whole model step).
        after: computed only once this array exists (an optimization barrier): XLA would
        otherwise hoist every layer's dequantization, which does not depend on the activations,
        to the start of the step and keep all the bf16 copies at once (4x slower at 16 rows)."""
        q, scales = self.qweight[...], self.scales[...]
        zeros = None if self.zeros is None else self.zeros[...]
        if after is not None:
            q, scales, zeros, _ = jax.lax.optimization_barrier((q, scales, zeros, after))
        if self.matvec and jnp.dtype(dtype) == jnp.bfloat16:  # the CPU kernels are built
            return cpu_matvec_quant.dequant_bf16(q, scales, zeros, self.method)
        return self.dequantize_rows(q, scales, zeros, dtype)

    def dequantize_rows(self, q: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                        dtype) -> jax.Array:
        """Rows of this layer's quantized arrays (q [R, in(/2)], scales / zeros [R, G]) -> the
        weight rows [R, in] in `dtype`, (value - offset - zero) * scale rounded once."""
        values, offset = self.values(q, scales)
        v = values[0] if len(values) == 1 else jnp.stack(values, axis=-1)  # int4: even, odd
        v = v.reshape(v.shape[0], -1, self.group) - offset  # [out, G, group]
        if zeros is not None:
            v = v - zeros[:, :, None]
        w = v * scales[:, :, None]
        return w.reshape(w.shape[0], -1).astype(dtype)

    def _finish(self, y: jax.Array, dtype) -> jax.Array:
        """f32 [T, out] + bias, in the activations' dtype."""
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)

    def _w8a8(self, x: jax.Array) -> jax.Array:
        """int8 x int8 -> int32 matmul on per-token int8 activations: the one int8 matmul
        XLA:CPU runs as a YNNPACK dot without first converting the weight to float."""
        xf = x.astype(jnp.float32)  # [T, in]
        x_scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0  # [T, 1]
        x_scale = jnp.where(x_scale == 0, 1.0, x_scale)
        xq = jnp.clip(jnp.round(xf / x_scale), -127, 127).astype(jnp.int8)  # [T, in]
        acc = jax.lax.dot_general(xq, self.qweight[...], (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.int32)  # [T, out], exact
        y = acc.astype(jnp.float32) * x_scale * self.scales[...][:, 0]  # [T, out]
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def _per_layer(anchor: jax.Array):
    """c -> a float32 scalar equal to c but computed from this layer's `anchor` (finite), so
    XLA neither shares it with other layers nor hoists its broadcast out of the fusion."""
    zero = anchor.reshape(-1)[0] * 0.0
    return lambda c: zero + jnp.float32(c)


def fp8_e4m3_to_f32(q: jax.Array, const=jnp.float32) -> jax.Array:
    """float8_e4m3fn bit patterns (uint8) -> float32 with convert / floor / multiply / add only (the
    ops XLA:CPU fuses into its reduction). Exact for every finite value (NaN is not kept)."""
    c = const
    u = q.astype(jnp.float32)  # the byte, [0, 255]
    neg = jnp.floor(u * c(1.0 / 128.0))  # sign bit
    mag = u - c(128.0) * neg
    e = jnp.floor(mag * c(1.0 / 8.0))  # exponent field 0..15
    m = mag - c(8.0) * e  # mantissa 0..7
    b3 = jnp.floor(e * c(1.0 / 8.0))
    r = e - c(8.0) * b3
    b2 = jnp.floor(r * c(1.0 / 4.0))
    r = r - c(4.0) * b2
    b1 = jnp.floor(r * c(0.5))
    b0 = r - c(2.0) * b1
    one = c(1.0)
    pow2 = ((one + c(255.0) * b3) * (one + c(15.0) * b2) * (one + c(3.0) * b1)
            * (one + b0))  # 2^e
    normal = one - jnp.floor((c(15.0) - e) * c(1.0 / 15.0))  # 1 if e >= 1 else 0
    # e >= 1: (8 + m) * 2^(e - 10); e == 0 (subnormal): m * 2^-9 = m * 2 * 2^-10.
    value = (m + c(8.0) * normal) * (pow2 + one - normal) * c(2.0**-10)
    return value * (one - c(2.0) * neg)


def make_linear(in_dim: int, out_dim: int, *, bias: bool, dtype, rngs: nnx.Rngs,
                quant: QuantConfig | None = None, matvec: bool = False) -> nnx.Module:
    """A float Linear (matvec: see linear.select_cpu_matvec), or a QuantizedLinear when the
    model is quantized."""
    if quant is None:
        return Linear(in_dim, out_dim, bias=bias, dtype=dtype, rngs=rngs, matvec=matvec)
    return QuantizedLinear(in_dim, out_dim, bias=bias, dtype=dtype, quant=quant,
                           matvec=kernel_plan(quant, dtype, matvec))


def kernel_plan(quant: QuantConfig, dtype, matvec: bool) -> bool:
    """Whether the quantized projections' decode rows run the CPU kernel (matvec_quant.cc):
    the cpu_matvec switch is on and the activations are bf16 weight-only (W*A16)."""
    return matvec and not quant.int8_activations and jnp.dtype(dtype) == jnp.bfloat16


def packs_weights(method: str, *, per_channel: bool, int8_activations: bool) -> bool:
    """Whether weights of this kind are packed for the packed-weight kernel (given the CPU
    kernels on and bf16 activations): per-channel int8 or fp8, or int4 per channel or group,
    symmetric or with zero points, weight-only, on a CPU that takes that kernel."""
    return (method in PACKED_METHODS and not int8_activations
            and (per_channel or method == "int4") and cpu_packed.available())


def log_kernel_plan(quant: QuantConfig | None, dtype, matvec: bool) -> None:
    """Say once at start-up which path the quantized projections' decode steps take."""
    if quant is None:
        return
    packed = packs_weights(quant.method, per_channel=quant.group_size is None,
                           int8_activations=quant.int8_activations)
    if kernel_plan(quant, dtype, matvec) and packed:
        logger.info("quantized linear: %s projections are packed at load into 16-column "
                    "panels; steps of every row count (decode and prefill) run the packed-weight "
                    "AVX-512 kernel on the %s bytes", quant.name, quant.name)
    elif kernel_plan(quant, dtype, matvec):
        logger.info("quantized linear: %s projections of up to %d bf16 rows run the CPU decode "
                    "kernel; more rows dequantize the weight to bf16 per step for the bf16 "
                    "matmul (the AMX kernel up to 64 rows where the CPU has it, else XLA's)",
                    quant.name, KERNEL_MAX_ROWS[quant.method])
    elif not matvec:
        logger.info("quantized linear: the CPU decode kernel is off (cpu_matvec); %s "
                    "projections use XLA for every step (slower decode)", quant.name)
    elif quant.int8_activations:
        logger.info("quantized linear: w8a8 projections use XLA's int8 x int8 dot, not the "
                    "CPU decode kernel (it takes bf16 activations)")
    else:
        logger.warning("quantized linear: %s activations are not bf16; %s projections use XLA "
                       "for every step (slower decode than the bf16 CPU kernel)",
                       jnp.dtype(dtype).name, quant.name)
