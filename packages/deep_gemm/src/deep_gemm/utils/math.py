"""deep_gemm.utils.math: integer helpers and the FP8 casts upstream's tests use."""

from mate.ops.gemm.layouts import (  # noqa: F401
    align,
    ceil_div,
    ceil_to_ue8m0,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_token_cast_to_fp8,
)

__all__ = ["align", "ceil_div", "ceil_to_ue8m0", "per_block_cast_to_fp8", "per_channel_cast_to_fp8",
           "per_token_cast_to_fp8"]
