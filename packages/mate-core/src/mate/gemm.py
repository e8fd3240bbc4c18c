"""`mate.gemm`: MATE's GEMM module (DeepGEMM-style FP8 block-scaled and BF16 GEMMs).

A facade over :mod:`mate.ops.gemm`: the functions take DeepGEMM's arguments and write into `d`.
The scale-factor utilities are in :mod:`mate.ops.gemm.layouts` (re-exported here).
"""

from mate.ops.gemm import *  # noqa: F401,F403
from mate.ops.gemm import api as _api
from mate.ops.gemm.layouts import (  # noqa: F401
    align,
    ceil_div,
    get_mn_major_tma_aligned_tensor,
    get_tma_aligned_size,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_token_cast_to_fp8,
    transform_sf_into_required_layout,
)

__all__ = [name for name in dir(_api) if "gemm" in name and not name.startswith("_")] + [
    "align", "ceil_div", "get_mn_major_tma_aligned_tensor", "get_tma_aligned_size", "per_block_cast_to_fp8",
    "per_channel_cast_to_fp8", "per_token_cast_to_fp8", "transform_sf_into_required_layout"]
