"""The packed-weight matmul (packed_matmul.cc): y = x @ W^T for any row count, bf16 or f32, or
int8 / fp8 weights with a scale per output column and int4 with a scale per column and input
group (W*A16), symmetric or with zero points shaped as the scales, with W packed once at load
into panels of 16 output columns (CPUs with AVX-512 BF16 but no AMX)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.cpu_kernels import amx_matmul, build
from jaxserve.cpu_kernels import dpbf16_matmul

SOURCE = Path(__file__).with_name("packed_matmul.cc")
TARGET = "jaxserve_cpu_packed_matmul"
SYMBOL = "JaxserveCpuPackedMatmul"
GLU_TARGET = "jaxserve_cpu_packed_glu_matmul"
GLU_SYMBOL = "JaxserveCpuPackedGluMatmul"
PANEL = 16  # output columns per panel: one 64-byte vector of bf16 pairs or f32 values
logger = logging.getLogger(__name__)


def ensure_built() -> None:
    """Compile (or load the cached) kernel and register it; raises build.KernelBuildError."""
    build.register(SOURCE, SYMBOL, TARGET)
    build.register(SOURCE, GLU_SYMBOL, GLU_TARGET)


@functools.cache
def available() -> bool:
    """Whether bf16 and f32 weights are packed for this kernel: the CPU has AVX-512 BF16 and
    no AMX (with AMX the tile kernel reads bf16 weights as stored), and the kernel builds.
    Decided once per process; a build failure is logged as a warning."""
    if not dpbf16_matmul.cpu_has_avx512_bf16() or amx_matmul.available():
        return False
    try:
        ensure_built()
    except build.KernelBuildError as e:
        logger.warning("linear: the packed-weight matmul kernel is unusable: %s", e)
        return False
    return True


def packed_shape(n: int, k: int, dtype=jnp.bfloat16,
                 lanes: bool = False) -> tuple[int, int, int]:
    """The packed layout of a [n, k] weight: bf16, int8 and fp8 bits (uint8) [ceil(n / 16),
    ceil(k / 2), 32] (pairs of k), f32 (or any dtype with lanes: int4's bytes, each holding a
    pair of inputs) [ceil(n / 16), k, 16]."""
    if lanes or jnp.dtype(dtype) == jnp.float32:
        return (-(-n // PANEL), k, PANEL)
    return (-(-n // PANEL), -(-k // 2), 2 * PANEL)


@functools.partial(jax.jit, static_argnames="lanes")
def pack(w: jax.Array, lanes: bool = False) -> jax.Array:
    """w [N, K] (bf16, int8, uint8 fp8 bits or f32) -> its panels: wp[p, j, 2c:2c+2] =
    w[16p + c, 2j:2j+2] (pairs), wp[p, k, c] = w[16p + c, k] for f32 and with lanes (int4's
    stored bytes [N, K / 2]); zero past N and K. One jitted transpose per weight shape: the
    small model's 85 weights pack (and its gate/up fuse) in 0.49 s with their compiles, 1.46 s
    in numpy."""
    n, k = w.shape
    p, steps, width = packed_shape(n, k, w.dtype, lanes)
    pair = width // PANEL  # k values per lane: 2 (pairs) or 1
    padded = jnp.pad(w, ((0, p * PANEL - n), (0, steps * pair - k)))
    # [P, 16, steps, pair] -> [P, steps, 16, pair]
    return padded.reshape(p, PANEL, steps, pair).transpose(0, 2, 1, 3).reshape(p, steps, width)


# Short quantized panels (under SHORT_PANEL_BYTES) are stored in groups of GROUP
# (group_panels) where P divides into at least MIN_GROUPS of them: a decode row reads a group as
# one stream, where plain panels are as many short streams (packed_matmul.cc). Long panels read
# fast as they are (and their 4-16-row steps slower grouped); fewer than MIN_GROUPS groups would
# share out badly over the cores (k and v projections of a few panels stay plain).
GROUP = 8
SHORT_PANEL_BYTES = 32 << 10
MIN_GROUPS = 4


def panel_group(shape: tuple[int, int, int]) -> int:
    """Panels per group for quantized (one byte per element) plain panels [P, steps, width]:
    GROUP, or 1 to keep them plain."""
    p, steps, width = shape
    short = steps * width < SHORT_PANEL_BYTES
    return GROUP if short and p % GROUP == 0 and p >= MIN_GROUPS * GROUP else 1


@functools.partial(jax.jit, static_argnames="group")
def group_panels(wp: jax.Array, group: int) -> jax.Array:
    """Plain quantized panels [P, steps, width] -> [P / group, steps, group, width]: each
    group's vectors pair step by pair step (group 1: wp as it is; else GROUP)."""
    if group == 1:
        return wp
    p, steps, width = wp.shape
    return wp.reshape(p // group, group, steps, width).transpose(0, 2, 1, 3)


def stored_panels(wp: jax.Array) -> jax.Array:
    """Plain quantized panels in the layout they are kept in: grouped where panel_group says."""
    return group_panels(wp, panel_group(wp.shape))


def ungroup_panels(wp):
    """The inverse of group_panels: plain panels [P, steps, width] from either layout."""
    if wp.ndim == 3:
        return wp
    groups, steps, group, width = wp.shape
    return wp.transpose(0, 2, 1, 3).reshape(groups * group, steps, width)


def unpack(wp: np.ndarray, n: int, k: int) -> np.ndarray:
    """The inverse of pack (and group_panels): wp [ceil(N/16), steps, 16 * pair] -> w [n, k]."""
    wp = ungroup_panels(wp)
    p, steps, width = wp.shape
    pair = width // PANEL
    return wp.reshape(p, steps, PANEL, pair).transpose(0, 2, 1, 3).reshape(
        p * PANEL, steps * pair)[:n, :k]


@jax.jit
def interleave(gate: jax.Array, up: jax.Array) -> jax.Array:
    """The gated kernel's weight: packed gate and up [P, steps, width] -> [2P, steps, width]
    with gate panel i at 2i and up panel i at 2i + 1 (and so for scales [P, (G,) 16])."""
    return jnp.stack([gate, up], axis=1).reshape(2 * gate.shape[0], *gate.shape[1:])


@jax.jit
def pack_scales(scales: jax.Array) -> jax.Array:
    """A quantized weight's scales f32 [N] (one per column: int8, fp8) or [N, G] (per column and
    input group: int4) -> [ceil(N / 16), 16] or [ceil(N / 16), G, 16]: each panel's columns
    last (zero past N)."""
    grouped = scales.ndim == 2
    s = (scales if grouped else scales[:, None]).astype(jnp.float32)  # [N, G]
    p = -(-s.shape[0] // PANEL)
    s = jnp.pad(s, ((0, p * PANEL - s.shape[0]), (0, 0))).reshape(p, PANEL, -1)
    s = s.transpose(0, 2, 1)  # [P, G, 16]
    return s if grouped else s[:, 0]


def unpack_scales(sp: np.ndarray, n: int) -> np.ndarray:
    """The inverse of pack_scales: [P, 16] -> [n], [P, G, 16] -> [n, G]."""
    if sp.ndim == 2:
        return sp.reshape(-1)[:n]
    return sp.transpose(0, 2, 1).reshape(-1, sp.shape[1])[:n]


def _scales_arg(scales: jax.Array | None) -> jax.Array:  # scales or zero points
    return jnp.zeros((0,), jnp.float32) if scales is None else scales


def packed_matmul(x: jax.Array, wp: jax.Array, n: int, out_dtype=None,
                  scales: jax.Array | None = None, zeros: jax.Array | None = None) -> jax.Array:
    """x [T, K], wp = pack(w [n, K]) -> [T, n] (f32 accumulation) in out_dtype: x's dtype (the
    default) or, for bf16 x, f32 (no rounding: logits). w is of x's dtype, or for bf16 x int8 /
    uint8 (float8_e4m3fn bits) with scales = pack_scales(per-column scales [n]):
    y = (x @ w^T) * scales; or int4's stored bytes (uint8 [n, K / 2], pack(.., lanes=True))
    with pack_scales(scales [n, G]), each group of K / G inputs scaled by its own. Asymmetric
    weights, w = (q - zero) * scale, add zeros = pack_scales(zero points), shaped as scales.
    Quantized panels may be grouped (group_panels)."""
    ensure_built()
    out = jnp.dtype(out_dtype or x.dtype)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), out))
    return call(x, wp, _scales_arg(scales), _scales_arg(zeros))


def packed_glu_matmul(x: jax.Array, wp: jax.Array, m: int,
                      scales: jax.Array | None = None,
                      zeros: jax.Array | None = None) -> jax.Array:
    """x [T, K], wp = interleave(pack(gate [m, K]), pack(up [m, K])) -> [T, m] in x's dtype:
    silu(x @ gate^T) * (x @ up^T), in f32 until the one rounding. Quantized gate and up take
    scales = interleave(pack_scales(gate's), pack_scales(up's)) [2 ceil(m / 16), (G,) 16]
    (and zeros, interleaved alike, when asymmetric)."""
    ensure_built()
    call = jax.ffi.ffi_call(GLU_TARGET, jax.ShapeDtypeStruct((x.shape[0], m), x.dtype))
    return call(x, wp, _scales_arg(scales), _scales_arg(zeros))
