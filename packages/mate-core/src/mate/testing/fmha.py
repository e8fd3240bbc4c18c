"""Input generators for the attention family's tests, checks and benchmarks."""

from __future__ import annotations

import torch


def combine_inputs(num_splits: int, batch: int, seqlen: int, heads: int, head_dim: int,
                   device: torch.device | str = "cpu", seed: int = 0, empty_splits: bool = True):
    """(out_partial, lse_partial) laid out as upstream's test builds them: strided views (the
    head and seqlen dims of out_partial transposed, seqlen-contiguous LSE), and, when
    `empty_splits`, the trailing half of the splits of the first third of the batch at -inf."""
    generator = torch.Generator().manual_seed(seed)
    out_partial = torch.randn(num_splits * 2, batch, heads, seqlen, head_dim, generator=generator)
    out_partial = out_partial.to(device).transpose(2, 3)[:num_splits]
    lse_partial = torch.randn(num_splits, batch, heads * 2, seqlen, generator=generator)
    lse_partial = lse_partial.to(device).transpose(-1, -2)[:, :, :, :heads]
    if empty_splits:
        lse_partial[num_splits // 2:, : max(batch // 3, 1)] = float("-inf")
    return out_partial, lse_partial
