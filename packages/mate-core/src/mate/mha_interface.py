"""FlashAttention-3 compatible attention API (the original MATE's `mate.mha_interface`)."""

from mate.ops.fmha.api import flash_attn_combine

__all__ = ["flash_attn_combine"]
