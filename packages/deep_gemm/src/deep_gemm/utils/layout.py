"""deep_gemm.utils.layout: TMA alignment and contiguous-layout alignment."""

from mate.ops.gemm.layouts import (  # noqa: F401
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_tensor,
    get_theoretical_mk_alignment_for_contiguous_layout,
    get_tma_aligned_size,
    set_mk_alignment_for_contiguous_layout,
)

__all__ = ["get_mk_alignment_for_contiguous_layout", "get_mn_major_tma_aligned_tensor",
           "get_theoretical_mk_alignment_for_contiguous_layout", "get_tma_aligned_size",
           "set_mk_alignment_for_contiguous_layout"]
