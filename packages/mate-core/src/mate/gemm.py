"""`mate.gemm`: MATE's GEMM module (DeepGEMM-style FP8 block-scaled and BF16 GEMMs).

A facade over :mod:`mate.ops.gemm`: the functions take DeepGEMM's arguments and write into `d`.
The scale-factor utilities are in :mod:`mate.ops.gemm.layouts` (re-exported here).
"""

from mate.ops.gemm import *  # noqa: F401,F403
from mate.ops.gemm import api as _api
from mate.ops.gemm.dense import bmm_fp8, bmm_fp16, gemm_fp8_nt_groupwise  # noqa: F401
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
from mate.ops.gemm.moe import masked_moe_gemm_8bit, ragged_k_moe_gemm_8bit, ragged_m_moe_gemm_8bit  # noqa: F401

__all__ = [name for name in dir(_api) if "gemm" in name and not name.startswith("_")] + [
    "align", "ceil_div", "get_mn_major_tma_aligned_tensor", "get_tma_aligned_size", "per_block_cast_to_fp8",
    "per_channel_cast_to_fp8", "per_token_cast_to_fp8", "transform_sf_into_required_layout"] + [
    "gemm_fp8_nt_groupwise", "bmm_fp8", "bmm_fp16", "ragged_m_moe_gemm_8bit", "ragged_k_moe_gemm_8bit",
    "masked_moe_gemm_8bit"]
