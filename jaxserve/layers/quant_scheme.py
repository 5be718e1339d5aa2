"""Quantization schemes and post-training quantization in numpy: int8 / int4 / fp8 + scales.

Layouts (shared with QuantizedLinear and the compressed-tensors reader); a weight is [out, in]
(HF's layout), split along `in` into G groups of `group_size`:
  int8: qweight int8 [out, in], symmetric, q in [-127, 127], w ~ q * scale
  int4: qweight uint8 [out, in / 2]; byte j of a row holds element 2j in its low nibble and
        2j+1 in its high nibble, each stored as q + 8 (q in [-8, 7]); w ~ q * scale (or
        (q - zero) * scale when asymmetric)
  fp8:  qweight uint8 [out, in] holding float8_e4m3fn bit patterns; w ~ fp8(q) * scale
        (raw bytes: XLA:CPU fuses a byte -> f32 decode into its matmul, not an f8 convert)
  scales float32 [out, G]; zeros (asymmetric only) float32 [out, G]
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

METHODS = ("int8", "int4", "fp8")  # weight formats
# Names accepted by `quantization=` for PTQ at load: the weight formats (weight-only, W*A16),
# and w8a8: int8 weights with int8 activations quantized per token at run time.
ONLINE_NAMES = METHODS + ("w8a8",)
INT4_GROUP = 128  # the default int4 group; smaller where the input dimension needs it
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
QWEIGHT_DTYPES = {"int8": np.int8, "int4": np.uint8, "fp8": np.uint8}


class QuantizationError(ValueError):
    """A quantization setting or a quantized tensor that cannot be served; names the field."""


@dataclass(frozen=True)
class QuantConfig:
    """How the decoder's linear layers are quantized (norms never are; the lm_head only when
    `lm_head`, the token embeddings only as a tied lm_head).

    method: int8 | int4 | fp8; group_size: None = one group per output channel (the whole
    input row), else the size of the input groups (int4's default 128); symmetric: no zero
    points; source: "online" (quantized here at load) or the checkpoint format it came from;
    int8_activations: each token's activations are quantized to int8 (symmetric, scale
    max|x| / 127) before an int8 x int8 -> int32 matmul (W8A8; int8 channel weights only);
    lm_head: the lm_head is quantized the same way (with tied embeddings the one quantized table
    also serves the token lookups, see layers/quantized_embedding.py).
    """

    method: str
    group_size: int | None = None
    symmetric: bool = True
    source: str = "online"
    int8_activations: bool = False
    lm_head: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(
                f"quantization: unknown method {self.method!r}; supported: {', '.join(METHODS)}")
        if self.group_size is not None and self.group_size < 2:
            raise QuantizationError(f"quantization group_size: must be >= 2, got {self.group_size}")
        if self.method == "fp8" and not self.symmetric:
            raise QuantizationError("quantization: fp8 weights are symmetric only")
        if self.int8_activations and (self.method != "int8" or self.group_size is not None
                                      or not self.symmetric):
            raise QuantizationError("quantization: int8 activations need symmetric per-channel "
                                    "int8 weights")

    @classmethod
    def online(cls, method: str, lm_head: bool = False) -> QuantConfig:
        """The PTQ scheme of a `quantization=` name (ONLINE_NAMES); lm_head: quantize it too."""
        if method not in ONLINE_NAMES:
            raise QuantizationError(
                f"quantization: unknown method {method!r}; supported: {', '.join(ONLINE_NAMES)}")
        if method == "w8a8":
            return cls("int8", None, int8_activations=True, lm_head=lm_head)
        return cls(method, INT4_GROUP if method == "int4" else None, lm_head=lm_head)

    @property
    def name(self) -> str:
        return "w8a8" if self.int8_activations else self.method

    def group_for(self, in_dim: int) -> int:
        """The group size used for a layer with `in_dim` inputs."""
        if self.group_size is None:
            return in_dim
        if self.source == "online" and in_dim % self.group_size:
            return online_group(in_dim, self.group_size)
        if in_dim % self.group_size:
            raise QuantizationError(
                f"quantization group_size {self.group_size} does not divide the input "
                f"dimension {in_dim}")
        return self.group_size


def online_group(in_dim: int, largest: int) -> int:
    """The largest even divisor of in_dim that is <= largest (the group when 128 does not fit)."""
    for g in range(min(largest, in_dim), 1, -1):
        if in_dim % g == 0 and g % 2 == 0:
            return g
    raise QuantizationError(f"quantization: input dimension {in_dim} has no even group size")


def _grouped(w: np.ndarray, group: int, name: str) -> np.ndarray:
    """[out, in] -> float32 [out, G, group], checking that the group divides `in`."""
    if w.ndim != 2:
        raise QuantizationError(f"tensor {name!r}: expected a 2-D weight, got shape {w.shape}")
    out_dim, in_dim = w.shape
    if group <= 0 or in_dim % group:
        raise QuantizationError(
            f"tensor {name!r}: group size {group} does not divide its input dimension {in_dim}")
    return np.asarray(w, dtype=np.float32).reshape(out_dim, in_dim // group, group)


def _safe_scale(absmax: np.ndarray, qmax: float) -> np.ndarray:
    """absmax / qmax with all-zero groups given scale 1 (their q is 0 either way)."""
    scale = absmax / np.float32(qmax)
    return np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)


def quantize(w: np.ndarray, method: str, group: int, name: str = "weight") -> dict[str, np.ndarray]:
    """Symmetric PTQ of one [out, in] weight -> {"qweight", "scales"} (layouts above)."""
    g = _grouped(w, group, name)  # [out, G, group]
    absmax = np.max(np.abs(g), axis=-1)  # [out, G]
    if method == "int8":
        scale = _safe_scale(absmax, 127.0)
        q = np.clip(np.round(g / scale[..., None]), -127, 127).astype(np.int8)
        return {"qweight": q.reshape(w.shape), "scales": scale}
    if method == "int4":
        scale = _safe_scale(absmax, 7.0)
        q = np.clip(np.round(g / scale[..., None]), -8, 7).astype(np.int8)
        return {"qweight": pack_int4(q.reshape(w.shape)), "scales": scale}
    if method == "fp8":
        scale = _safe_scale(absmax, FP8_MAX)
        q = (g / scale[..., None]).astype(ml_dtypes.float8_e4m3fn)  # round to nearest even
        return {"qweight": q.reshape(w.shape).view(np.uint8), "scales": scale}
    raise QuantizationError(f"quantization: unknown method {method!r} for tensor {name!r}")


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 values int8 [out, in] (in even) -> uint8 [out, in / 2], low nibble first."""
    if q.shape[-1] % 2:
        raise QuantizationError(f"int4 packing needs an even input dimension, got {q.shape[-1]}")
    u = (q.astype(np.int16) + 8).astype(np.uint8)  # [out, in], each in [0, 15]
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [out, in / 2] -> int8 [out, in] values in [-8, 7]."""
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    return np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def integer_values(method: str, qweight: np.ndarray) -> np.ndarray:
    """The stored values as float32 [out, in] (before scales / zero points)."""
    if method == "int4":
        return unpack_int4(qweight).astype(np.float32)
    if method == "fp8":
        return np.asarray(qweight).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return np.asarray(qweight).astype(np.float32)


def dequantize(method: str, qweight: np.ndarray, scales: np.ndarray,
               zeros: np.ndarray | None = None) -> np.ndarray:
    """float32 [out, in] weight that the quantized tensors stand for."""
    v = integer_values(method, qweight)  # [out, in]
    out_dim, in_dim = v.shape
    groups = scales.shape[-1]
    v = v.reshape(out_dim, groups, in_dim // groups)
    if zeros is not None:
        v = v - zeros[..., None]
    return (v * scales[..., None]).reshape(out_dim, in_dim)


def quantized_nbytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))
