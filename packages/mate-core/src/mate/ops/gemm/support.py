"""What the future TileLang GEMM kernels will accept (the SM90 DeepGEMM feature set).

These Ops are declared but NOT registered with dispatch: registration waits for the kernels.
Until then every GEMM call on a GPU raises UnsupportedError ("no TileLang GEMM kernel yet"),
or runs the reference under MATE_ALLOW_REFERENCE_FALLBACK=1; on the CPU the reference runs.
"""

from __future__ import annotations

import torch

from mate import dispatch

SM90_RECIPES = ((1, 128, 128), (1, 1, 128))
OUT_DTYPES = (torch.bfloat16, torch.float32)


def _no_kernel(**variant):
    raise NotImplementedError("no TileLang GEMM kernel yet")


def _gemm_check_case(device: torch.device):
    from mate.ops.gemm import api, layouts, reference

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 256, generator=generator)
    b = torch.randn(128, 256, generator=generator)
    a_fp8, b_fp8 = layouts.per_token_cast_to_fp8(a, False), layouts.per_block_cast_to_fp8(b, False)
    a_fp8 = tuple(t.to(device) for t in a_fp8)
    b_fp8 = tuple(t.to(device) for t in b_fp8)

    def run():
        d = torch.empty(64, 128, dtype=torch.bfloat16, device=device)
        api.fp8_gemm_nt(a_fp8, b_fp8, d)
        return d

    def expected():
        return reference.gemm_nt(a_fp8[0].cpu(), b_fp8[0].cpu(), sfa=a_fp8[1].cpu(), sfb=b_fp8[1].cpu(),
                                 out_dtype=torch.float64, compute_dtype=torch.float64)

    return run, expected


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return {torch.bfloat16: (2e-2, 2e-2), torch.float32: (1e-3, 1e-3)}.get(dtype, (1e-5, 1e-5))


def _op(name: str, features: dict) -> dispatch.Op:
    return dispatch.Op(name=name, family="gemm", support=dispatch.Support(features), build=_no_kernel,
                       check_case=_gemm_check_case, tolerance=_tolerance)


FP8_GEMM = _op("gemm.fp8_gemm", {
    "major_a": ("K",), "major_b": ("K",), "out_dtype": OUT_DTYPES, "recipe": SM90_RECIPES, "accumulate": (False, True)})
M_GROUPED_FP8_GEMM = _op("gemm.m_grouped_fp8_gemm", {
    "layout": ("contiguous", "masked"), "major_a": ("K",), "major_b": ("K",), "out_dtype": (torch.bfloat16,),
    "recipe": ((1, 128, 128),), "psum": (False,)})
K_GROUPED_FP8_GEMM = _op("gemm.k_grouped_fp8_gemm", {
    "major_a": ("K",), "major_b": ("K",), "out_dtype": (torch.float32,), "recipe": ((1, 1, 128),), "psum": (False,)})
BF16_GEMM = _op("gemm.bf16_gemm", {
    "major_a": ("K", "MN"), "major_b": ("K", "MN"), "out_dtype": OUT_DTYPES, "accumulate": (False, True)})
M_GROUPED_BF16_GEMM = _op("gemm.m_grouped_bf16_gemm", {
    "layout": ("contiguous", "masked"), "major_a": ("K",), "major_b": ("K", "MN"), "out_dtype": (torch.bfloat16,),
    "psum": (False,)})
K_GROUPED_BF16_GEMM = _op("gemm.k_grouped_bf16_gemm", {
    "major_a": ("MN",), "major_b": ("MN",), "out_dtype": (torch.float32,), "psum": (False,)})

OPS = (FP8_GEMM, M_GROUPED_FP8_GEMM, K_GROUPED_FP8_GEMM, BF16_GEMM, M_GROUPED_BF16_GEMM, K_GROUPED_BF16_GEMM)
