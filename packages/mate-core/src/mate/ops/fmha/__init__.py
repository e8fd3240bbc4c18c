"""Attention (FMHA): FlashAttention-3 compatible forward paths."""

from mate.ops.fmha.api import flash_attn_combine  # noqa: F401
