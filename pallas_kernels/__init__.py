"""pallas_kernels: Mosaic GPU (Hopper) paged-attention kernels, each beside its plain-jnp reference.

The kernels share one body, `pallas_kernels/_mgpu.py`; `Tiling`, `choose_tiling` and
`check_supported` say which shapes they serve (the engine checks them at start-up).
"""

from pallas_kernels._mgpu import Tiling
from pallas_kernels._mgpu import UnsupportedConfig
from pallas_kernels._mgpu import check_supported
from pallas_kernels._mgpu import choose_tiling
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

__all__ = [
    "Tiling",
    "UnsupportedConfig",
    "check_supported",
    "choose_tiling",
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]
