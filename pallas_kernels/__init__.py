"""pallas_kernels: Pallas paged-attention kernels, each beside its plain-jnp reference.

The kernels currently use Pallas's generic GPU API (Triton lowering) as a stepping stone towards
Mosaic GPU; see `pallas_kernels/_flash.py`.
"""

from pallas_kernels.paged_attention import DecodeBlockSizes
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels.ragged_paged_attention import RaggedBlockSizes
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

__all__ = [
    "DecodeBlockSizes",
    "RaggedBlockSizes",
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]
