"""A quantized tied lm_head that also serves the token-embedding lookups (one quantized table)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.cpu_kernels import packed_matmul as cpu_packed
from jaxserve.layers.quantized_linear import QuantizedLinear


class QuantizedEmbedding(QuantizedLinear):
    """The tied table [vocab, hidden] kept quantized (layouts in quant_scheme); `attend` is the
    quantized lm_head (the CPU decode kernel for decode rows, see QuantizedLinear.__call__).

    Token lookups dequantize only the looked-up rows (T rows of qweight and scales per step)
    rather than keeping the bf16 table beside the quantized one: a second copy would hold more
    bytes than the quantized lm_head saves (57 MB bf16 + 29 MB int8 on the small model, against
    57 MB unquantized), while the gather reads a few kB. The price is that the input
    embeddings carry the same rounding as the logits' weights: the model equals the float model
    whose tied table is the dequantized one (tests/models/test_quantized_lm_head.py)."""

    def __init__(self, vocab: int, dim: int, *, dtype, quant, matvec: bool = False):
        super().__init__(dim, vocab, bias=False, dtype=dtype, quant=quant, matvec=matvec)
        self.dtype = jnp.dtype(dtype)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """token_ids int32 [T] -> [T, hidden] in the model's dtype."""
        if self.packed:  # token v is column v % 16 of panel v // 16 (quantized_linear.py)
            panels, panel = self.panels(), cpu_packed.PANEL
            if panels.ndim == 3:  # plain [P, steps, width]: groups of one panel
                panels = panels[:, :, None]
            groups, steps, g, width = panels.shape  # [P / g, steps, g, width]
            lanes = width // panel  # 2: byte pairs (width 32); 1: int4 (width 16)
            table = panels.reshape(groups, steps, g, panel, lanes)
            p = token_ids // panel
            q = table[p // g, :, p % g, token_ids % panel, :]  # [T, steps, lanes]
            width = self.in_dim // 2 if self.method == "int4" else self.in_dim  # stored bytes
            q = q.reshape(token_ids.shape[0], -1)[:, :width]  # [T, in(/2)]
            def rows_of(per_panel):  # [P, 16] | [P, G, 16] -> the tokens' [T, G]
                if per_panel.ndim == 2:
                    per_panel = per_panel[:, None, :]
                return per_panel[token_ids // panel, :, token_ids % panel]

            zeros = self.panel_zeros()
            return self.dequantize_rows(q, rows_of(self.panel_scales()),
                                        None if zeros is None else rows_of(zeros),
                                        self.dtype)  # [T, hidden]
        q = jnp.take(self.qweight[...], token_ids, axis=0)  # [T, in(/2)]
        scales = jnp.take(self.scales[...], token_ids, axis=0)  # [T, G]
        zeros = None if self.zeros is None else jnp.take(self.zeros[...], token_ids, axis=0)
        return self.dequantize_rows(q, scales, zeros, self.dtype)  # [T, hidden]

    def attend(self, x: jax.Array) -> jax.Array:
        """x [T, hidden] -> [T, vocab]: the quantized lm_head."""
        return super().__call__(x)
