"""Host side of the TileLang K-grouped FP8 GEMM (:mod:`mate.ops.gemm.kgrouped_kernel`): operand
views, the kernel variant and tile, the launch. No host sync: the groups' K values are read by the
kernel from the device tensor (DeepGEMM's grouped_layout), so nothing here waits on the GPU.

The kernel reads A as (M, ΣK) and B as (N, ΣK) with K contiguous (FP8 wgmma reads K-major
operands only) and the scales as (ΣK / 128, MN) with MN contiguous. The callers hand over the
logical (ΣK, M) / (ΣK, N) operands of DeepGEMM's tn form (any strides):

* stored K-major (a transposed view of an (M, ΣK) tensor): read in place;
* stored MN-major ((ΣK, M) contiguous: k_grouped_fp8_gemm_tn_contiguous, mate.gemm's
  ragged_k_moe_gemm_8bit in its default "M"/"N" modes): one transposing copy per operand;
* scales not M-contiguous with 16-byte rows: one small copy.
"""

from __future__ import annotations

import torch

from mate import jit, platform
from mate.ops.gemm import layouts

FILL = 0.75  # the 128-row tile unless it leaves fewer than FILL x SMs blocks in flight


def variant(major_a: str, major_b: str, out_dtype: torch.dtype, recipe, n: int, ab_dtype: torch.dtype) -> dict:
    """The dispatch variant (gemm_support.K_GROUPED_FP8_GEMM's features)."""
    return {"ab_dtype": ab_dtype, "major_a": major_a, "major_b": major_b, "out_dtype": out_dtype,
            "recipe": tuple(recipe), "psum": False, "n_multiple_of_4": n % 4 == 0}


def major_of(t: torch.Tensor) -> str:
    """"K" when the logical (ΣK, MN) operand is stored K-major (dim 0 contiguous), else "MN"."""
    return "K" if t.stride(0) == 1 and t.shape[1] > 1 else "MN"


def tile_for(m: int, n: int, groups: int, sms: int) -> str:
    return "m64n128" if groups * -(-m // 128) * -(-n // 128) < FILL * sms else "m128n128"


def _k_major(t: torch.Tensor) -> torch.Tensor:
    """Logical (ΣK, MN) -> the (MN, ΣK) tensor with K contiguous and 16-byte rows that TMA reads."""
    view = t.transpose(0, 1)
    if view.stride(1) == 1 and view.stride(0) % 16 == 0 and view.data_ptr() % 16 == 0:
        return view
    return view.clone() if view.is_contiguous() else view.contiguous()


def _sf_rows(sf: torch.Tensor) -> torch.Tensor:
    """(ΣK / 128, MN) float32 scales with MN contiguous and 16-byte aligned rows."""
    rows, mn = sf.shape
    if (sf.stride(1) == 1 or mn == 1) and (sf.stride(0) % 4 == 0 or rows == 1) and sf.data_ptr() % 16 == 0:
        return sf.as_strided(sf.shape, (layouts.align(sf.stride(0), 4) if rows == 1 else sf.stride(0), 1))
    fresh = torch.empty_strided((rows, mn), (layouts.get_tma_aligned_size(mn, 4), 1), dtype=sf.dtype,
                                device=sf.device)
    fresh.copy_(sf)
    return fresh


def k_grouped(op_name: str, build, a: torch.Tensor, b: torch.Tensor, sfa: torch.Tensor, sfb: torch.Tensor,
              d: torch.Tensor, ks: torch.Tensor) -> None:
    """d[g] += dequant(A_g)^T . dequant(B_g) for the groups' K ranges stacked along dim 0 of the
    logical a (ΣK, M) and b (ΣK, N), scales sfa (ΣK/128, M) and sfb (ΣK/128, N) per channel and
    128 rows of K; ks (G,) int32 on the device holds each group's K (multiples of 128, summing to
    ΣK); d (G, M, N) float32 holds C on entry."""
    m, n = a.shape[1], b.shape[1]
    for t in (a, b, d):
        if t.numel() >= 2**31:
            raise NotImplementedError(f"the K-grouped FP8 GEMM kernel indexes with 32-bit integers; a tensor of "
                                      f"shape {tuple(t.shape)} has {t.numel()} elements (at most 2**31 - 1)")
    info = platform.device_info(a.device)
    key = variant("K", "K", d.dtype, (1, 1, 128), n, a.dtype)
    key.update(n=int(n), tile=tile_for(m, n, d.shape[0], info.multiprocessors))
    kernel = jit.get_kernel(op_name, key, info.tilelang_target, build)
    out = d if d.is_contiguous() and d.data_ptr() % 16 == 0 else d.contiguous()
    ks = ks if ks.is_contiguous() and ks.dtype == torch.int32 else ks.to(torch.int32).contiguous()
    kernel(_k_major(a), _k_major(b), _sf_rows(sfa), _sf_rows(sfb), out, ks)
    if out is not d:
        d.copy_(out)
