"""FlashAttention-3 compatible attention API (the original MATE's `mate.mha_interface`)."""

from mate.ops.fmha.api import flash_attn_combine
from mate.ops.fmha.attention import flash_attn_varlen_func, flash_attn_with_kvcache, get_scheduler_metadata

__all__ = ["flash_attn_combine", "flash_attn_varlen_func", "flash_attn_with_kvcache", "get_scheduler_metadata"]
