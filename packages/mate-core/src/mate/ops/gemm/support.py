"""What the TileLang GEMM kernels accept: the data behind dispatch, tests, show-config and docs.

Every op is registered with dispatch (each has a TileLang kernel):

* `gemm.fp8_gemm` and `gemm.m_grouped_fp8_gemm` (:mod:`mate.ops.gemm.fp8_kernel`): the FP8
  block-scaled NT GEMM, recipe (1, 128, 128), bf16 out, no accumulator; dense, M-grouped
  contiguous and masked;
* `gemm.bf16_gemm`, `gemm.m_grouped_bf16_gemm`, `gemm.k_grouped_bf16_gemm`
  (:mod:`mate.ops.gemm.bf16_kernel`): DeepGEMM's bf16_gemm_{nt,nn,tn,tt} with or without C and
  mate.gemm.bmm_fp16; m_grouped_bf16_gemm_{nt,nn}_contiguous (PSUM layout too) and _nt_masked;
  k_grouped_bf16_gemm_tn_contiguous;
* `gemm.k_grouped_fp8_gemm` (:mod:`mate.ops.gemm.kgrouped_kernel`): k_grouped_fp8_gemm_{nt,tn}
  _contiguous and mate.gemm.ragged_k_moe_gemm_8bit (recipe (1, 1, 128), float32 D with C).

A variant outside its op's matrix raises UnsupportedError on a GPU (or runs the reference under
MATE_ALLOW_REFERENCE_FALLBACK=1); on the CPU every GEMM runs the reference.

The kernels take N (and K, except the K-grouped ones) as compile-time constants (one compile per
weight shape and layout, every M served by it) and need N % 8 == 0 (16-byte rows of D for TMA;
N % 4 for the float32 D of the K-grouped FP8 GEMM) and K % 128 == 0 (the API requires that of
every FP8 GEMM). The K-grouped GEMMs read each group's K from the device (no compile per K).
"""

from __future__ import annotations

import torch

from mate import dispatch

SM90_RECIPES = ((1, 128, 128), (1, 1, 128))
OUT_DTYPES = (torch.bfloat16, torch.float32)


def _build_fp8(n: int, k: int, layout: str, tile: str = "m128n128", **features):
    """The kernel of a variant from fp8_launch.kernel_variant (the feature values are fixed)."""
    from mate.ops.gemm import fp8_kernel

    return fp8_kernel.build(n, k, layout, **fp8_kernel.TILES[tile])


def _build_bf16(n: int, k: int, ab_dtype, major_a: str, major_b: str, out_dtype, tile: str = "m128n256",
                layout: str = "dense", accumulate: bool = False, **features):
    """The kernel of a variant from bf16_launch (the feature values other than these are fixed)."""
    from mate.ops.gemm import bf16_kernel
    from mate.ops.gemm.bf16_launch import DTYPE_NAMES

    return bf16_kernel.build(n, k, major_a, major_b, DTYPE_NAMES[ab_dtype], DTYPE_NAMES[out_dtype], tile, layout,
                             accumulate)


def _build_k_grouped_fp8(n: int, tile: str = "m128n128", **features):
    """The kernel of a variant from kgrouped_launch (the feature values are fixed)."""
    from mate.ops.gemm import kgrouped_kernel

    return kgrouped_kernel.build(n, tile)


def _fp8_aot(shapes, layouts):
    from mate.ops.gemm.fp8_kernel import TILES
    from mate.ops.gemm.fp8_launch import kernel_variant

    # The M-grouped layouts take 128-row tiles without split-K.
    return [kernel_variant(n, k, layout, tile) for n, k in shapes for layout in layouts for tile, cfg in TILES.items()
            if layout == "dense" or (cfg["block_m"] == 128 and cfg.get("splits", 1) == 1)]


# DeepSeek-V3's dense projections (N, K) and MoE expert shapes that `mate aot` prebuilds.
DENSE_AOT_SHAPES = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
GROUPED_AOT_SHAPES = ((4096, 7168), (7168, 2048))


def _check_inputs(device: torch.device):
    """Seeded inputs for `mate check` (bf16 operands, their FP8 casts, float32 accumulators)."""
    from mate.ops.gemm import layouts

    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=generator).to(dtype)

    def fp8(cast, x):
        return tuple(t.to(device) for t in cast(x, False))

    return randn, fp8, layouts


def _fp8_check_case(device: torch.device):
    """gemm.fp8_gemm: a 64 x 128 x 256 FP8 GEMM."""
    from mate.ops.gemm import api, reference

    randn, fp8, layouts = _check_inputs(device)
    a_fp8 = fp8(layouts.per_token_cast_to_fp8, randn(64, 256, dtype=torch.float32))
    b_fp8 = fp8(layouts.per_block_cast_to_fp8, randn(128, 256, dtype=torch.float32))

    def run():
        d = torch.empty(64, 128, dtype=torch.bfloat16, device=device)
        api.fp8_gemm_nt(a_fp8, b_fp8, d)
        return d

    def expected():
        return reference.gemm_nt(a_fp8[0].cpu(), b_fp8[0].cpu(), sfa=a_fp8[1].cpu(), sfb=b_fp8[1].cpu(),
                                 out_dtype=torch.float64, compute_dtype=torch.float64)

    return run, expected


def _m_grouped_fp8_check_case(device: torch.device):
    """gemm.m_grouped_fp8_gemm: two experts' 128-row blocks, the second one partly padding."""
    from mate.ops.gemm import api, reference

    randn, fp8, layouts = _check_inputs(device)
    a_fp8 = fp8(layouts.per_token_cast_to_fp8, randn(256, 256, dtype=torch.float32))
    b_fp8 = [fp8(layouts.per_block_cast_to_fp8, randn(128, 256, dtype=torch.float32)) for _ in range(2)]
    b_fp8 = torch.stack([x[0] for x in b_fp8]), torch.stack([x[1] for x in b_fp8])
    m_indices = torch.tensor([0] * 128 + [1] * 100 + [-1] * 28, dtype=torch.int32, device=device)

    def run():
        d = torch.empty(256, 128, dtype=torch.bfloat16, device=device)
        api.m_grouped_fp8_gemm_nt_contiguous(a_fp8, b_fp8, d, m_indices)
        return d

    def expected():
        return reference.m_grouped_gemm_nt_contiguous(
            a_fp8[0].cpu(), b_fp8[0].cpu(), m_indices.cpu(), sfa=a_fp8[1].cpu(), sfb=b_fp8[1].cpu(),
            out_dtype=torch.float64, compute_dtype=torch.float64)

    return run, expected


def _bf16_check_case(device: torch.device):
    """gemm.bf16_gemm: D = A B^T + C in float32, 128 x 128 x 256."""
    from mate.ops.gemm import api, reference

    randn, _, _ = _check_inputs(device)
    a, b, c = randn(128, 256), randn(128, 256), randn(128, 128, dtype=torch.float32)

    def run():
        d = c.to(device, copy=True)
        api.bf16_gemm_nt(a.to(device), b.to(device), d, c=d)
        return d

    def expected():
        return reference.gemm_nt(a, b, c, out_dtype=torch.float64, compute_dtype=torch.float64)

    return run, expected


def _m_grouped_bf16_check_case(device: torch.device):
    """gemm.m_grouped_bf16_gemm: masked, two groups of 128 rows at most (30 and 128 valid)."""
    from mate.ops.gemm import api

    randn, _, _ = _check_inputs(device)
    a, b = randn(2, 128, 256), randn(2, 128, 256)
    masked_m = torch.tensor([30, 128], dtype=torch.int32)

    def run():
        d = torch.zeros(2, 128, 128, dtype=torch.bfloat16, device=device)
        api.m_grouped_bf16_gemm_nt_masked(a.to(device), b.to(device), d, masked_m.to(device), 128)
        return d

    def expected():
        out = a.double() @ b.double().transpose(1, 2)
        out[0, 30:] = 0  # rows past masked_m are left as they were
        return out

    return run, expected


def _k_grouped_check_case(fp8: bool):
    """gemm.k_grouped_{bf16,fp8}_gemm: groups of K 128, 0 and 256, M 64, N 128, D = C + A_g^T B_g."""

    def case(device: torch.device):
        from mate.ops.gemm import api, reference

        randn, cast, layouts = _check_inputs(device)
        ks, m, n = [128, 0, 256], 64, 128
        a, b, c = randn(sum(ks), m), randn(sum(ks), n), randn(len(ks), m, n, dtype=torch.float32)
        grouped_layout = torch.tensor(ks, dtype=torch.int32, device=device)
        if fp8:
            a, b = cast(layouts.per_channel_cast_to_fp8, a.float()), cast(layouts.per_channel_cast_to_fp8, b.float())

        def flat(x):  # the SM90 K-major layout: each group's (MN, K_g) block, one after another
            return torch.cat([blk.T.flatten() for blk in x.split(ks)])

        def run():
            d = c.to(device, copy=True)
            if fp8:
                api.k_grouped_fp8_gemm_nt_contiguous((flat(a[0]), a[1].T), (flat(b[0]), b[1].T), d, ks,
                                                     grouped_layout, d)
            else:
                api.k_grouped_bf16_gemm_tn_contiguous(a.to(device), b.to(device), d, ks, grouped_layout, d)
            return d

        def expected():
            operands = (a[0].cpu(), b[0].cpu()) if fp8 else (a, b)
            scales = {"sfa": a[1].cpu(), "sfb": b[1].cpu()} if fp8 else {}
            return reference.k_grouped_gemm_tn_contiguous(*operands, ks, c, **scales, out_dtype=torch.float64,
                                                          compute_dtype=torch.float64)

        return run, expected

    return case


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return {torch.bfloat16: (2e-2, 2e-2), torch.float32: (1e-3, 1e-3)}.get(dtype, (1e-5, 1e-5))


def _fp8_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """FP8 products accumulate in the tensor cores with fewer bits than fp32 (upstream's too): a
    float32 out is as close to the exact product as a bfloat16 one (H100: 1.7e-2 on the K-grouped
    check case)."""
    return (2e-2, 2e-2)


def _op(name: str, features: dict, build, check_case, aot_variants=list, tolerance=_tolerance) -> dispatch.Op:
    return dispatch.Op(name=name, family="gemm", support=dispatch.Support(features), build=build,
                       check_case=check_case, tolerance=tolerance, aot_variants=aot_variants)


FP8_GEMM = dispatch.register(_op("gemm.fp8_gemm", {
    "ab_dtype": (torch.float8_e4m3fn,), "major_a": ("K",), "major_b": ("K",), "out_dtype": (torch.bfloat16,),
    "recipe": ((1, 128, 128),), "accumulate": (False,), "n_multiple_of_8": (True,)}, _build_fp8, _fp8_check_case,
    lambda: _fp8_aot(DENSE_AOT_SHAPES, ("dense",))))
M_GROUPED_FP8_GEMM = dispatch.register(_op("gemm.m_grouped_fp8_gemm", {
    "layout": ("contiguous", "masked"), "ab_dtype": (torch.float8_e4m3fn,), "major_a": ("K",), "major_b": ("K",),
    "out_dtype": (torch.bfloat16,), "recipe": ((1, 128, 128),), "psum": (False,), "n_multiple_of_8": (True,)},
    _build_fp8, _m_grouped_fp8_check_case,
    lambda: _fp8_aot(GROUPED_AOT_SHAPES, ("contiguous", "masked"))))
K_GROUPED_FP8_GEMM = dispatch.register(_op("gemm.k_grouped_fp8_gemm", {
    "ab_dtype": (torch.float8_e4m3fn,), "major_a": ("K", "MN"), "major_b": ("K", "MN"), "out_dtype": (torch.float32,),
    "recipe": ((1, 1, 128),), "psum": (False,), "n_multiple_of_4": (True,)}, _build_k_grouped_fp8,
    _k_grouped_check_case(fp8=True), tolerance=_fp8_tolerance))
BF16_GEMM = dispatch.register(_op("gemm.bf16_gemm", {
    "ab_dtype": (torch.bfloat16, torch.float16), "major_a": ("K", "MN"), "major_b": ("K", "MN"),
    "out_dtype": (torch.bfloat16, torch.float16, torch.float32), "accumulate": (False, True),
    "n_multiple_of_8": (True,), "k_multiple_of_8": (True,)}, _build_bf16, _bf16_check_case))
M_GROUPED_BF16_GEMM = dispatch.register(_op("gemm.m_grouped_bf16_gemm", {
    "layout": ("contiguous", "masked"), "ab_dtype": (torch.bfloat16,), "major_a": ("K",), "major_b": ("K", "MN"),
    "out_dtype": (torch.bfloat16,), "psum": (False, True), "n_multiple_of_8": (True,), "k_multiple_of_8": (True,)},
    _build_bf16, _m_grouped_bf16_check_case))
K_GROUPED_BF16_GEMM = dispatch.register(_op("gemm.k_grouped_bf16_gemm", {
    "ab_dtype": (torch.bfloat16,), "major_a": ("MN",), "major_b": ("MN",), "out_dtype": (torch.float32,),
    "psum": (False,), "mn_multiple_of_8": (True,)}, _build_bf16, _k_grouped_check_case(fp8=False)))

OPS = (FP8_GEMM, M_GROUPED_FP8_GEMM, K_GROUPED_FP8_GEMM, BF16_GEMM, M_GROUPED_BF16_GEMM, K_GROUPED_BF16_GEMM)
