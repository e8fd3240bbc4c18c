"""Input generators and the naive float64 formula for the GEMM tests (modeled on DeepGEMM's
tests/generators.py: random bf16 inputs, cast per token / per block, compared with calc_diff)."""

import random

import torch

from mate.ops.gemm import layouts

MAX_DIFF = 0.001  # DeepGEMM's tests: calc_diff < 0.001 for FP8 x FP8 (QuantConfig.max_diff)
POISON = float("nan")


def naive_dequantize(x: torch.Tensor, sf: torch.Tensor, gran_mn: int, gran_k: int) -> torch.Tensor:
    """Element (i, j) times sf[i // gran_mn, j // gran_k], in float64, written with index arithmetic."""
    rows = torch.arange(x.shape[-2]) // gran_mn
    cols = torch.arange(x.shape[-1]) // gran_k
    return x.double() * sf.double()[..., rows, :][..., :, cols]


def naive_nt(a, sfa, b, sfb, gran_b=(128, 128)):
    """D = dequant(A) @ dequant(B)^T in float64, one output element at a time along K."""
    a64 = naive_dequantize(a, sfa, 1, 128) if sfa is not None else a.double()
    b64 = naive_dequantize(b, sfb, *gran_b) if sfb is not None else b.double()
    return (a64.unsqueeze(1) * b64.unsqueeze(0)).sum(-1)


def fp8_a(m, k):
    x = torch.randn(m, k, dtype=torch.bfloat16)
    return x, layouts.per_token_cast_to_fp8(x, use_ue8m0=False)


def fp8_b(n, k, per_channel=False):
    x = torch.randn(n, k, dtype=torch.bfloat16)
    if per_channel:
        return x, layouts.per_token_cast_to_fp8(x, use_ue8m0=False)
    return x, layouts.per_block_cast_to_fp8(x, use_ue8m0=False)


def contiguous_layout(num_groups, expected_m, alignment=128):
    """Row counts per group around expected_m, each padded to `alignment` with -1 rows."""
    actual = [int(expected_m * random.uniform(0.7, 1.3)) for _ in range(num_groups)]
    aligned = [layouts.align(m, alignment) for m in actual]
    layout = torch.full((sum(aligned),), -1, dtype=torch.int32)
    start = 0
    for group, (m, padded) in enumerate(zip(actual, aligned, strict=True)):
        layout[start:start + m] = group
        start += padded
    return layout, actual, aligned
