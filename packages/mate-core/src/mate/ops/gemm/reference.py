"""The GEMM family's executable specification: DeepGEMM's semantics in plain PyTorch.

Every function takes the operands in their logical K-major orientation (the public API
transposes the nn/tn/tt variants first, as upstream does), dequantizes FP8 operands with their
block scales in `compute_dtype` (float32 on the CPU backend, float64 in tests), multiplies,
adds the optional accumulator C and returns the result in `out_dtype`.

Scale factors: `sf[..., i, j]` scales the block of rows [i * gran_mn, (i + 1) * gran_mn) and
columns [j * gran_k, (j + 1) * gran_k) of its operand; the SM90 recipe is (1, 128) for A and
(128, 128) for B (gran_mn = 1 means one scale per row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def dequantize(x: torch.Tensor, sf: torch.Tensor | None, gran_mn: int, gran_k: int,
               compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x (..., MN, K) times its block scales sf (..., ceil(MN / gran_mn), ceil(K / gran_k))."""
    values = x.to(compute_dtype)
    if sf is None:
        return values
    mn, k = x.shape[-2:]
    scale = sf.to(compute_dtype).repeat_interleave(gran_mn, dim=-2)[..., :mn, :]
    scale = scale.repeat_interleave(gran_k, dim=-1)[..., :k]
    return values * scale


def gemm_nt(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None, *,
            sfa: torch.Tensor | None = None, sfb: torch.Tensor | None = None,
            gran_a: tuple[int, int] = (1, 128), gran_b: tuple[int, int] = (128, 128),
            out_dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """D = A @ B^T (+ C). a (M, K), b (N, K) (with scales when FP8), c (M, N) or None."""
    a_values = dequantize(a, sfa, *gran_a, compute_dtype)
    b_values = dequantize(b, sfb, *gran_b, compute_dtype)
    result = a_values @ b_values.transpose(-1, -2)
    if c is not None:
        result = result + c.to(compute_dtype)
    return result.to(out_dtype)


def contiguous_group_rows(grouped_layout: torch.Tensor, num_groups: int, use_psum_layout: bool = False,
                          alignment: int = 128) -> list[tuple[int, torch.Tensor]]:
    """(group, row indices) of each group in an M-grouped contiguous layout.

    Without psum: grouped_layout (M,) holds each row's group, -1 for padding rows.
    With psum: grouped_layout (G,) holds the end row of each group; group g starts at the end of
    group g - 1 rounded up to `alignment` (group 0 at row 0).
    """
    layout = grouped_layout.cpu().to(torch.int64)
    rows = []
    if use_psum_layout:
        start = 0
        for group in range(num_groups):
            end = int(layout[group])
            rows.append((group, torch.arange(start, max(start, end))))
            start = -(-end // alignment) * alignment
        return rows
    for group in range(num_groups):
        rows.append((group, torch.nonzero(layout == group).flatten()))
    return rows


def m_grouped_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, grouped_layout: torch.Tensor, *,
                                 sfa: torch.Tensor | None = None, sfb: torch.Tensor | None = None,
                                 gran_a: tuple[int, int] = (1, 128), gran_b: tuple[int, int] = (128, 128),
                                 use_psum_layout: bool = False, alignment: int = 128,
                                 out_dtype: torch.dtype = torch.bfloat16,
                                 compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a (M, K), b (G, N, K): each row of D = its row of A times B[group of the row]^T; rows of no
    group (padding) are zero."""
    m, n = a.shape[0], b.shape[1]
    a_values = dequantize(a, sfa, *gran_a, compute_dtype)
    b_values = dequantize(b, sfb, *gran_b, compute_dtype)
    result = torch.zeros((m, n), dtype=compute_dtype, device=a.device)
    for group, rows in contiguous_group_rows(grouped_layout, b.shape[0], use_psum_layout, alignment):
        rows = rows.to(a.device)
        result[rows] = a_values[rows] @ b_values[group].transpose(0, 1)
    return result.to(out_dtype)


def m_grouped_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, masked_m: torch.Tensor, *,
                             sfa: torch.Tensor | None = None, sfb: torch.Tensor | None = None,
                             gran_a: tuple[int, int] = (1, 128), gran_b: tuple[int, int] = (128, 128),
                             out_dtype: torch.dtype = torch.bfloat16,
                             compute_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """a (G, max_m, K), b (G, N, K): for each group g the first masked_m[g] rows of
    A[g] @ B[g]^T (rows beyond masked_m[g] are not part of the result)."""
    counts = masked_m.cpu().tolist()
    outputs = []
    for group, count in enumerate(counts):
        rows = min(max(int(count), 0), a.shape[1])
        a_values = dequantize(a[group, :rows], None if sfa is None else sfa[group], *gran_a, compute_dtype)
        b_values = dequantize(b[group], None if sfb is None else sfb[group], *gran_b, compute_dtype)
        outputs.append((a_values @ b_values.transpose(0, 1)).to(out_dtype))
    return outputs


def k_grouped_gemm_tn_contiguous(a: torch.Tensor, b: torch.Tensor, ks: Sequence[int], c: torch.Tensor | None = None, *,
                                 sfa: torch.Tensor | None = None, sfb: torch.Tensor | None = None, gran_k: int = 128,
                                 out_dtype: torch.dtype = torch.float32,
                                 compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a (sum K, M), b (sum K, N), MN-major, the groups' K ranges stacked: D[g] = C[g] +
    A_g^T @ B_g. FP8 scales are per channel: sfa (sum ceil(K_g / gran_k), M), each group's
    K blocks starting a new scale row."""
    m, n = a.shape[1], b.shape[1]
    result = torch.zeros((len(ks), m, n), dtype=compute_dtype, device=a.device)
    k_start = sf_start = 0
    for group, k in enumerate(ks):
        sf_rows = -(-k // gran_k)
        a_group, b_group = a[k_start:k_start + k].transpose(0, 1), b[k_start:k_start + k].transpose(0, 1)
        sfa_group = None if sfa is None else sfa[sf_start:sf_start + sf_rows].transpose(0, 1)
        sfb_group = None if sfb is None else sfb[sf_start:sf_start + sf_rows].transpose(0, 1)
        a_values = dequantize(a_group, sfa_group, 1, gran_k, compute_dtype)
        b_values = dequantize(b_group, sfb_group, 1, gran_k, compute_dtype)
        result[group] = a_values @ b_values.transpose(0, 1)
        k_start, sf_start = k_start + k, sf_start + sf_rows
    if c is not None:
        result = result + c.to(compute_dtype)
    return result.to(out_dtype)


def calc_diff(x: torch.Tensor, y: torch.Tensor):
    """DeepGEMM's similarity metric (deep_gemm.testing.calc_diff): 1 - 2 sum(x y) / sum(x^2 + y^2),
    in float64; 0 when both are all zeros. Its tests require < 0.001 for FP8 GEMMs."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return 1 - 2 * (x * y).sum() / denominator
