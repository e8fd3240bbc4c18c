"""PyTorch reference of the attention family: the executable specification.

Follows FlashAttention-3's semantics exactly; computes in float32 (or in the inputs' dtype
when that is float64, as the tests do).
"""

from __future__ import annotations

import torch


def flash_attn_combine(out_partial: torch.Tensor, lse_partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partial results.

    out_partial: (num_splits, *rows, head_dim); lse_partial: (num_splits, *rows), the natural-log
    sum of exponentials of each split's scores. Returns (out, lse) over the rows, in the
    compute dtype. A split whose LSE is -inf contributes nothing (its partial output is not
    read, so garbage there cannot leak); rows whose splits are all -inf give out 0, lse -inf.
    """
    compute = torch.float64 if out_partial.dtype == torch.float64 else torch.float32
    lse_partial = lse_partial.to(compute)
    lse_max = lse_partial.amax(dim=0)
    shift = torch.where(lse_max == float("-inf"), torch.zeros_like(lse_max), lse_max)
    weights = torch.exp(lse_partial - shift)
    total = weights.sum(dim=0)
    lse = torch.log(total) + lse_max
    valid_total = (total > 0) & ~total.isnan()
    scale = torch.where(valid_total, weights / torch.where(valid_total, total, 1.0), 0.0)
    used = (scale > 0).unsqueeze(-1)
    contributions = torch.where(used, scale.unsqueeze(-1) * out_partial.to(compute), 0.0)
    return contributions.sum(dim=0), lse
