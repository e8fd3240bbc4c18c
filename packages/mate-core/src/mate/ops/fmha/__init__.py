"""Attention (FMHA): FlashAttention-3 compatible forward paths."""

from mate.ops.fmha.api import flash_attn_combine  # noqa: F401
from mate.ops.fmha.attention import (  # noqa: F401
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    get_scheduler_metadata,
)
