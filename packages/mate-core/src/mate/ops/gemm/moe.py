"""MATE's own MoE GEMM API (`mate.gemm.ragged_m_moe_gemm_8bit`, `ragged_k_moe_gemm_8bit`,
`masked_moe_gemm_8bit`): on a GPU the TileLang FP8 kernels (ragged_m and masked: the M-grouped
contiguous and masked kernel, :mod:`mate.ops.gemm.fp8_kernel`; ragged_k: the K-grouped kernel,
:mod:`mate.ops.gemm.kgrouped_kernel`, which reads "K"-major operands in place and transposes
"M"/"N"-major ones by one copy), on the CPU the reference (:mod:`mate.ops.gemm.reference`).

Layouts of `ragged_tokens_info` in ragged_m_moe_gemm_8bit:
  * per_token (total_tokens,): each row's expert, -1 for unused rows;
  * psum_expert (num_expert,): the end row of each expert; expert e starts at the end of expert
    e - 1 rounded up to `alignment_m` (DeepGEMM's psum layout);
  * per_expert (num_expert,): each expert's token count, laid out as psum_expert is.
Rows of no expert are written as zeros.

masked_moe_gemm_8bit with enable_overlap: the signal tensor (int32, num_expert * ceil(max_m / 64))
holds, per expert and 64-row block, the number of finished 128-column output tiles; a block is
complete when it reaches the returned threshold (ceil(n / 128)). The reference computes
everything before returning, so every block holding masked rows is set to the threshold (the
blocks past an expert's count are 0, as no kernel would touch them).
"""

from __future__ import annotations

import torch

from mate import checks
from mate.api import call_op, mate_api
from mate.ops.gemm import api as _gemm_api
from mate.ops.gemm import kgrouped_launch, reference
from mate.ops.gemm import support as gemm_support
from mate.ops.gemm.dense import (
    HALF_DTYPES,
    _ab_dtype,
    blocks,
    check_out,
    fp8_pair,
    granularity,
    major,
    require_granularity,
    resolve_backend,
)

INFO_DTYPES = (torch.int32, torch.int64)
M_RECIPES = ((1, 128, 128), (1, 1, 128))
SIGNAL_BLOCK_M = 64
SIGNAL_BLOCK_N = 128


def _info(name: str, info, length: int, meaning: str, device: torch.device) -> torch.Tensor:
    checks.tensor(name, info, dtypes=INFO_DTYPES, ndim=1, device=device)
    checks.shape(name, info, (length,), meaning)
    return info


def _check_b(b_data: torch.Tensor, b_sf: torch.Tensor, k: int, gn: int, gk: int) -> tuple[int, int]:
    num_expert, n, k_b = b_data.shape
    if k_b != k:
        raise checks.ArgumentError(f"input_b[0]: K = {k_b} does not match input_a[0]'s hidden_size = {k}")
    checks.shape("input_b[1]", b_sf, (num_expert, blocks(n, gn), blocks(k, gk)),
                 f"num_expert, ceil(out_hidden_size/{gn}), ceil(hidden_size/{gk})")
    return num_expert, n


def _rows_of_counts(counts: list[int], alignment: int) -> torch.Tensor:
    """End rows (psum layout) of experts holding `counts` tokens, each starting aligned."""
    ends, start = [], 0
    for count in counts:
        ends.append(start + count)
        start = -(-(start + count) // alignment) * alignment
    return torch.tensor(ends, dtype=torch.int64)


def _rows_of_ends(ends: torch.Tensor, total: int, alignment: int) -> torch.Tensor:
    """Per-row expert indices (-1: no expert) of a psum layout given by its end rows (on the host)."""
    rows = torch.full((total,), -1, dtype=torch.int32)
    start = 0
    for expert, end in enumerate(ends.tolist()):
        rows[start:end] = expert
        start = -(-end // alignment) * alignment
    return rows


@mate_api(name="gemm.ragged_m_moe_gemm_8bit")
def ragged_m_moe_gemm_8bit(input_a, input_b, ragged_tokens_info: torch.Tensor, out: torch.Tensor,
                           gemm_mode="per_token", major_a_mode="K", major_b_mode="K", scale_granularity_mnk=None,
                           num_mp=None, alignment_m=None, backend="auto") -> torch.Tensor:
    """out[rows of expert e] = dequant(A[rows]) @ dequant(B[e])^T: input_a = (fp8 (T, K),
    scales (T, K/gk)), input_b = (fp8 (E, N, K), scales (E, N/gn, K/gk)), out (T, N) fp16/bf16."""
    a_data, a_sf = fp8_pair("input_a", input_a, 2)
    device = a_data.device
    b_data, b_sf = fp8_pair("input_b", input_b, 3, device)
    major("input_a[0]", a_data, major_a_mode, {"K": -1, "M": -2}, "major_a_mode")
    major("input_b[0]", b_data, major_b_mode, {"K": -1, "N": -2}, "major_b_mode")
    total, k = a_data.shape
    gm, gn, gk = granularity(scale_granularity_mnk, (1, 128, 128))
    require_granularity((gm, gn, gk), M_RECIPES)
    checks.shape("input_a[1]", a_sf, (total, blocks(k, gk)), f"total_tokens, ceil(hidden_size/{gk})")
    num_expert, n = _check_b(b_data, b_sf, k, gn, gk)
    alignment = 128 if alignment_m is None else alignment_m
    if alignment not in (128, 256):
        raise checks.ArgumentError(f"alignment_m: must be 128 or 256, got {alignment_m!r}")
    if num_mp is not None and (not isinstance(num_mp, int) or num_mp <= 0):
        raise checks.ArgumentError(f"num_mp: must be a positive int or None, got {num_mp!r}")
    if gemm_mode == "per_token":
        info = _info("ragged_tokens_info", ragged_tokens_info, total, "total_tokens", device)
        bad = (info < -1) | (info >= num_expert)
        if bool(bad.any()):
            raise checks.ArgumentError(f"ragged_tokens_info: expert indices must be -1 or in [0, {num_expert}), "
                                       f"got {int(info[bad][0])}")
        layout, psum = info, False
    elif gemm_mode in ("psum_expert", "per_expert"):
        info = _info("ragged_tokens_info", ragged_tokens_info, num_expert, "num_expert", device)
        values = info.cpu().tolist()
        if gemm_mode == "per_expert":
            if any(v < 0 for v in values):
                raise checks.ArgumentError(f"ragged_tokens_info: token counts must be >= 0, got {values}")
            ends = _rows_of_counts(values, alignment)
        else:
            ends = torch.tensor(values, dtype=torch.int64)
            starts = [0] + [-(-e // alignment) * alignment for e in values[:-1]]
            if any(e < s for s, e in zip(starts, values, strict=True)):
                raise checks.ArgumentError(f"ragged_tokens_info: psum ends must not decrease, got {values}")
        if num_expert and int(ends[-1]) > total:
            raise checks.ArgumentError(f"ragged_tokens_info: the experts need {int(ends[-1])} rows, but input_a[0] "
                                       f"has total_tokens = {total}")
        layout, psum = ends, True
    else:
        raise checks.ArgumentError(f"gemm_mode: {gemm_mode!r} is not accepted; expected 'per_token', "
                                   "'psum_expert' or 'per_expert'")
    check_out(out, (total, n), "total_tokens, out_hidden_size", HALF_DTYPES, device)
    # psum layouts reach the kernel as per-row expert indices (built from the ends already on the host).
    variant = _gemm_api.fp8_grouped_variant("contiguous", major_a_mode, major_b_mode, out.dtype, (gm, gn, gk), False,
                                            n, _ab_dtype(a_data, b_data))
    if resolve_backend(backend, gemm_support.M_GROUPED_FP8_GEMM, variant, device) == "tilelang":
        rows = layout.to(torch.int32) if not psum else _rows_of_ends(layout, total, alignment).to(device)
        call_op(torch.ops.mate.gemm_m_grouped_contiguous, _gemm_api._gemm_m_grouped_contiguous, a_data, b_data, out,
                rows, a_sf, b_sf, False, 128, gn)
        return out
    out.copy_(reference.m_grouped_gemm_nt_contiguous(
        a_data, b_data, layout, sfa=a_sf, sfb=b_sf, gran_a=(gm, gk), gran_b=(gn, gk), use_psum_layout=psum,
        alignment=alignment, out_dtype=torch.float32))
    return out


@mate_api(name="gemm.ragged_k_moe_gemm_8bit")
def ragged_k_moe_gemm_8bit(input_a, input_b, ragged_tokens_info: torch.Tensor, out: torch.Tensor,
                           gemm_mode="per_expert", major_a_mode="M", major_b_mode="N", scale_granularity_mnk=None,
                           num_mp=None) -> torch.Tensor:
    """out[e] += dequant(A_e)^T @ dequant(B_e) where A_e, B_e are expert e's rows (tokens) of
    input_a = (fp8 (K, M), scales (K/128, M)) and input_b = (fp8 (K, N), scales (K/128, N)), the
    experts' token ranges stacked along K; counts are multiples of 128; out float32 (E, M, N)."""
    a_data, a_sf = fp8_pair("input_a", input_a, 2)
    device = a_data.device
    b_data, b_sf = fp8_pair("input_b", input_b, 2, device)
    major("input_a[0]", a_data, major_a_mode, {"M": -1, "K": -2}, "major_a_mode")
    major("input_b[0]", b_data, major_b_mode, {"N": -1, "K": -2}, "major_b_mode")
    if gemm_mode != "per_expert":
        raise checks.ArgumentError(f"gemm_mode: {gemm_mode!r} is not accepted; expected 'per_expert'")
    gm, gn, gk = granularity(scale_granularity_mnk, (1, 1, 128))
    require_granularity((gm, gn, gk), ((1, 1, 128),))
    k, m = a_data.shape
    if b_data.shape[0] != k:
        raise checks.ArgumentError(f"input_b[0]: K = {b_data.shape[0]} does not match input_a[0]'s K = {k}")
    n = b_data.shape[1]
    checks.shape("input_a[1]", a_sf, (blocks(k, gk), m), f"ceil(k/{gk}), m")
    checks.shape("input_b[1]", b_sf, (blocks(k, gk), n), f"ceil(k/{gk}), n")
    checks.tensor("ragged_tokens_info", ragged_tokens_info, dtypes=INFO_DTYPES, ndim=1, device=device)
    counts = [int(v) for v in ragged_tokens_info.cpu().tolist()]
    if any(c < 0 or c % gk for c in counts):
        raise checks.ArgumentError(f"ragged_tokens_info: token counts must be non-negative multiples of {gk}, "
                                   f"got {counts}")
    if sum(counts) > k:
        raise checks.ArgumentError(f"ragged_tokens_info: the counts sum to {sum(counts)}, more than input_a[0]'s "
                                   f"K = {k}")
    if num_mp is not None and (not isinstance(num_mp, int) or num_mp <= 0):
        raise checks.ArgumentError(f"num_mp: must be a positive int or None, got {num_mp!r}")
    check_out(out, (len(counts), m, n), "num_expert, m, n", (torch.float32,), device)
    if not out.is_contiguous():
        raise checks.ArgumentError(f"out: must be contiguous, got strides {out.stride()}")
    variant = kgrouped_launch.variant("MN" if major_a_mode == "M" else "K", "MN" if major_b_mode == "N" else "K",
                                      out.dtype, (gm, gn, gk), n, _ab_dtype(a_data, b_data))
    resolve_backend("auto", gemm_support.K_GROUPED_FP8_GEMM, variant, device)
    used, used_sf = sum(counts), sum(counts) // gk
    if not counts or used == 0 or m == 0 or n == 0:
        return out
    # DeepGEMM's K-grouped GEMM with C = out (the kernel reads the counts from the device tensor).
    call_op(torch.ops.mate.gemm_k_grouped_tn, _gemm_api._gemm_k_grouped_tn, a_data[:used], b_data[:used], out, out,
            counts, ragged_tokens_info.to(torch.int32), a_sf[:used_sf], b_sf[:used_sf])
    return out


@mate_api(name="gemm.masked_moe_gemm_8bit")
def masked_moe_gemm_8bit(input_a, input_b, masked_tokens_info: torch.Tensor, out, scale_granularity_mnk=None,
                         expect_tokens=None, enable_overlap: bool = False, signal=None, backend="auto"):
    """out[e, :count_e] = dequant(A[e, :count_e]) @ dequant(B[e])^T: input_a = (fp8 (E, max_m, K),
    scales (E, max_m, K/gk)), input_b = (fp8 (E, N, K), scales (E, N/gn, K/gk)); rows past count_e
    are left as they were. Returns out, or (out, signal, block_m, threshold) with enable_overlap."""
    a_data, a_sf = fp8_pair("input_a", input_a, 3)
    device = a_data.device
    b_data, b_sf = fp8_pair("input_b", input_b, 3, device)
    major("input_a[0]", a_data, "K", {"K": -1}, "input_a major")
    major("input_b[0]", b_data, "K", {"K": -1}, "input_b major")
    num_expert, max_m, k = a_data.shape
    gm, gn, gk = granularity(scale_granularity_mnk, (1, 128, 128))
    require_granularity((gm, gn, gk), M_RECIPES)
    checks.shape("input_a[1]", a_sf, (num_expert, max_m, blocks(k, gk)),
                 f"num_expert, max_tokens, ceil(hidden_size/{gk})")
    if b_data.shape[0] != num_expert:
        raise checks.ArgumentError(f"input_b[0]: {b_data.shape[0]} experts, but input_a[0] has {num_expert}")
    _, n = _check_b(b_data, b_sf, k, gn, gk)
    info = _info("masked_tokens_info", masked_tokens_info, num_expert, "num_expert", device)
    counts = [int(v) for v in info.cpu().tolist()]
    if any(c < 0 or c > max_m for c in counts):
        raise checks.ArgumentError(f"masked_tokens_info: token counts must be in [0, {max_m}] (max_tokens), "
                                   f"got {counts}")
    if expect_tokens is not None and (not isinstance(expect_tokens, int) or isinstance(expect_tokens, bool)
                                      or expect_tokens < 0):
        raise checks.ArgumentError(f"expect_tokens: must be a non-negative int or None, got {expect_tokens!r}")
    if not isinstance(enable_overlap, bool):
        raise checks.ArgumentTypeError(f"enable_overlap: expected a bool, got {type(enable_overlap).__name__}")
    if out is None:
        out = torch.zeros((num_expert, max_m, n), dtype=torch.bfloat16, device=device)
    else:
        check_out(out, (num_expert, max_m, n), "num_expert, max_tokens, out_hidden_size", HALF_DTYPES, device)
    num_blocks = blocks(max_m, SIGNAL_BLOCK_M)
    if enable_overlap:
        if signal is None:
            signal = torch.zeros((num_expert * num_blocks,), dtype=torch.int32, device=device)
        else:
            checks.tensor("signal", signal, dtypes=(torch.int32,), ndim=1, device=device)
            checks.shape("signal", signal, (num_expert * num_blocks,),
                         f"num_expert * ceil(max_tokens/{SIGNAL_BLOCK_M})")
    variant = _gemm_api.fp8_grouped_variant("masked", "K", "K", out.dtype, (gm, gn, gk), False, n,
                                            _ab_dtype(a_data, b_data))
    if resolve_backend(backend, gemm_support.M_GROUPED_FP8_GEMM, variant, device) == "tilelang":
        call_op(torch.ops.mate.gemm_m_grouped_masked, _gemm_api._gemm_m_grouped_masked, a_data, b_data, out,
                info.to(torch.int32), a_sf, b_sf, gn)
        if not enable_overlap:
            return out
        threshold = blocks(n, SIGNAL_BLOCK_N)
        done_blocks = (info.to(torch.int64) + SIGNAL_BLOCK_M - 1) // SIGNAL_BLOCK_M
        finished = torch.arange(num_blocks, device=device).unsqueeze(0) < done_blocks.unsqueeze(1)
        signal.copy_((finished.to(torch.int32) * threshold).flatten())
        return out, signal, SIGNAL_BLOCK_M, threshold
    results = reference.m_grouped_gemm_nt_masked(a_data, b_data, info, sfa=a_sf, sfb=b_sf, gran_a=(gm, gk),
                                                 gran_b=(gn, gk), out_dtype=torch.float32)
    for expert, result in enumerate(results):
        out[expert, :result.shape[0]] = result.to(out.dtype)
    if not enable_overlap:
        return out
    threshold = blocks(n, SIGNAL_BLOCK_N)
    finished = torch.zeros((num_expert, num_blocks), dtype=torch.int32)
    for expert, count in enumerate(counts):
        finished[expert, :blocks(count, SIGNAL_BLOCK_M)] = threshold
    signal.copy_(finished.flatten())
    return out, signal, SIGNAL_BLOCK_M, threshold
