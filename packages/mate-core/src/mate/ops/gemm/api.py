"""DeepGEMM's GEMM functions (deep_gemm 2.x signatures), with its semantics and checks.

Every function writes its result into the caller's `d` (and returns None), as upstream does.
FP8 operands are (tensor, scale_factors) pairs: A fp8 e4m3 (M, K) with float32 scales
(M, K / 128) (per token, per 128 channels); B fp8 e4m3 (N, K) with float32 scales
(N / 128, K / 128) (128 x 128 blocks) or (N, K / 128) under recipe (1, 1, 128). The nn/tn/tt
variants take transposed operands (B as (K, N), A as (K, M), scales transposed alike).

Backends: the PyTorch reference (:mod:`mate.ops.gemm.reference`) on the CPU; on a GPU, within the
support matrices of :mod:`mate.ops.gemm.support`, three TileLang kernels:

* :mod:`mate.ops.gemm.fp8_kernel`: the FP8 NT GEMMs, dense and M-grouped (contiguous, masked);
* :mod:`mate.ops.gemm.bf16_kernel`: the BF16 / FP16 GEMMs, dense (any of nt/nn/tn/tt, with or
  without C), M-grouped (contiguous with K- or MN-major B, with per-row indices or the PSUM
  layout; masked) and K-grouped (k_grouped_bf16_gemm_tn_contiguous);
* :mod:`mate.ops.gemm.kgrouped_kernel`: the K-grouped FP8 GEMMs (k_grouped_fp8_gemm_nt_contiguous,
  DeepGEMM's SM90 form, and k_grouped_fp8_gemm_tn_contiguous, an SM100 form upstream, whose
  MN-major operands are transposed by one copy).

Other variants (the PSUM layouts of the FP8 M-grouped and the K-grouped GEMMs, MN-major FP8
operands of the normal and M-grouped GEMMs, per-channel B scales, FP8 float32 out / C) raise
:class:`mate.UnsupportedError` on a GPU, or run the reference (with one warning) under
MATE_ALLOW_REFERENCE_FALLBACK=1 or MATE_BACKEND=reference.
With C, D = A B^T + C is computed by copying C into D (unless C is D) and accumulating into D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mate import checks, dispatch, platform
from mate.api import call_op, mate_api
from mate.ops.gemm import bf16_launch, fp8_launch, kgrouped_launch, layouts, reference
from mate.ops.gemm import support as gemm_support

FP8 = torch.float8_e4m3fn
SCALE_BLOCK_K = 128
OUT_DTYPES = (torch.bfloat16, torch.float32)


# ---- dispatch variants -------------------------------------------------------------------

def fp8_dense_variant(major_a: str, major_b: str, out_dtype: torch.dtype, recipe, accumulate: bool, n: int,
                      ab_dtype: torch.dtype = FP8) -> dict:
    """The dispatch variant of an FP8 GEMM (gemm_support.FP8_GEMM's features)."""
    return {"ab_dtype": ab_dtype, "major_a": major_a, "major_b": major_b, "out_dtype": out_dtype,
            "recipe": tuple(recipe), "accumulate": bool(accumulate), "n_multiple_of_8": n % 8 == 0}


def fp8_grouped_variant(layout: str, major_a: str, major_b: str, out_dtype: torch.dtype, recipe, psum: bool,
                        n: int, ab_dtype: torch.dtype = FP8) -> dict:
    """The dispatch variant of an M-grouped FP8 GEMM (gemm_support.M_GROUPED_FP8_GEMM's features)."""
    return {"layout": layout, "ab_dtype": ab_dtype, "major_a": major_a, "major_b": major_b, "out_dtype": out_dtype,
            "recipe": tuple(recipe),
            "psum": bool(psum), "n_multiple_of_8": n % 8 == 0}


def _runs_kernel(op: dispatch.Op, variant: dict, device: torch.device) -> bool:
    """Inside the torch.library ops: whether the kernel runs (the public function has already
    raised for unsupported variants, so this only repeats its choice)."""
    return platform.device_info(device).is_gpu and dispatch.select(op, variant, device) == "tilelang"


# ---- argument checks -----------------------------------------------------------------------

def _pair(name: str, value) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise checks.ArgumentTypeError(f"{name}: expected a (tensor, scale_factors) pair, got {type(value).__name__}")
    return value[0], value[1]


def _major(name: str, t: torch.Tensor) -> str:
    """'K' when the last dim is contiguous, 'MN' when the one before is (upstream's get_major_type_ab)."""
    if t.dim() == 3 and t.shape[0] > 1 and t.stride(0) != t.shape[-2] * t.shape[-1]:
        raise checks.ArgumentError(f"{name}: groups must be packed (stride(0) == {t.shape[-2] * t.shape[-1]}), "
                                   f"got strides {t.stride()}")
    if t.stride(-1) == 1 or t.shape[-1] <= 1:
        return "K"
    if t.stride(-2) == 1 or t.shape[-2] <= 1:
        return "MN"
    raise checks.ArgumentError(f"{name}: one of the last two dimensions must be contiguous (stride 1), "
                               f"got strides {t.stride()}")


def _check_d(d: torch.Tensor, expected: Sequence[int], meaning: str, dtypes, device: torch.device) -> None:
    checks.tensor("d", d, dtypes=dtypes, ndim=len(expected), device=device)
    checks.shape("d", d, expected, meaning)
    if d.numel() and d.stride(-1) != 1 and d.shape[-1] > 1:
        raise checks.ArgumentError(f"d: must be row-major (N contiguous), got strides {d.stride()}")


def _check_c(c: torch.Tensor | None, d: torch.Tensor) -> None:
    if c is None:
        return
    checks.tensor("c", c, dtypes=(d.dtype,), ndim=d.dim(), device=d.device)
    checks.shape("c", c, tuple(d.shape), "the shape of d")
    if c.numel() and c.stride(-1) != 1 and c.shape[-1] > 1:
        raise checks.ArgumentError(f"c: must be row-major (N contiguous), got strides {c.stride()}")
    if c.data_ptr() == d.data_ptr() and c.stride() != d.stride():
        raise checks.ArgumentError(f"c: shares d's memory with other strides ({c.stride()} vs {d.stride()}); "
                                   "pass d itself or a separate tensor")


def _load_c(c: torch.Tensor, d: torch.Tensor) -> None:
    """D holds C before an accumulating kernel runs (DeepGEMM copies it likewise unless C is D)."""
    if c.data_ptr() != d.data_ptr():
        d.copy_(c)


def _check_k(name: str, k: int) -> None:
    if k % SCALE_BLOCK_K:
        raise checks.ArgumentError(f"{name}: K = {k} must be a multiple of {SCALE_BLOCK_K} (the FP8 scale block)")


def _granularities(recipe, recipe_a, recipe_b) -> tuple[tuple[int, int], tuple[int, int], tuple]:
    """(gran_mn, gran_k) of A and of B from upstream's recipe arguments."""
    if recipe is None and recipe_a is None and recipe_b is None:
        recipe = (1, 128, 128)
    if (recipe_a is None) != (recipe_b is None):
        raise checks.ArgumentError("recipe_a, recipe_b: give both or neither")
    if (recipe is None) == (recipe_a is None):
        raise checks.ArgumentError("recipe: give either recipe or the recipe_a/recipe_b pair, not both")
    if recipe is not None:
        recipe = tuple(recipe)
        if len(recipe) != 3:
            raise checks.ArgumentError(f"recipe: expected (gran_m, gran_n, gran_k), got {recipe}")
        gran_a, gran_b = (recipe[0], recipe[2]), (recipe[1], recipe[2])
    else:
        gran_a, gran_b, recipe = tuple(recipe_a), tuple(recipe_b), (recipe_a[0], recipe_b[0], recipe_a[1])
    for name, (gran_mn, gran_k) in (("recipe (A)", gran_a), ("recipe (B)", gran_b)):
        if gran_k != SCALE_BLOCK_K:
            raise NotImplementedError(f"{name}: K granularity {gran_k}: {layouts.UE8M0_MESSAGE}")
        if gran_mn not in (1, 128):
            raise NotImplementedError(f"{name}: MN granularity {gran_mn} is not supported (1 or 128)")
    if gran_a[0] != 1:
        raise NotImplementedError(f"recipe: A's scales are per token (gran_m = 1) on SM90, got gran_m = {gran_a[0]}")
    return gran_a, gran_b, tuple(recipe)


def _check_fp8(name: str, x, sf, ndim: int, device: torch.device | None = None) -> torch.Tensor:
    checks.tensor(f"{name}[0]", x, dtypes=(FP8,), ndim=ndim, device=device)
    if isinstance(sf, torch.Tensor) and sf.dtype == torch.int32:
        raise NotImplementedError(f"{name}[1]: {layouts.UE8M0_MESSAGE}")
    checks.tensor(f"{name}[1]", sf, dtypes=(torch.float32,), ndim=ndim, device=x.device)
    return x


def _check_sf_shape(name: str, sf: torch.Tensor, mn: int, k: int, gran: tuple[int, int], groups: int | None = None):
    expected = (layouts.ceil_div(mn, gran[0]), layouts.ceil_div(k, gran[1]))
    meaning = f"ceil(MN / {gran[0]}), K / {gran[1]}"
    if groups is not None:
        expected, meaning = (groups,) + expected, "num_groups, " + meaning
    checks.shape(name, sf, expected, meaning)


def _early_return(m: int, n: int, k: int, d: torch.Tensor, c: torch.Tensor | None) -> bool:
    if m == 0 or n == 0:
        return True
    if k == 0:
        if c is None:
            d.zero_()
        elif c.data_ptr() != d.data_ptr():
            d.copy_(c)
        return True
    return False


# ---- normal GEMMs -----------------------------------------------------------------------------

def _fp8_gemm(a, b, d, c, recipe, recipe_a, recipe_b, names: tuple[str, str]) -> None:
    (a_data, sfa), (b_data, sfb) = a, b
    _check_fp8(names[0], a_data, sfa, 2)
    device = a_data.device
    _check_fp8(names[1], b_data, sfb, 2, device)
    major_a, major_b = _major(f"{names[0]}[0]", a_data), _major(f"{names[1]}[0]", b_data)
    m, k = a_data.shape
    n, k_b = b_data.shape
    if k_b != k:
        raise checks.ArgumentError(f"{names[1]}[0]: K = {k_b} does not match {names[0]}[0]'s K = {k}")
    _check_k(f"{names[0]}[0]", k)
    gran_a, gran_b, recipe = _granularities(recipe, recipe_a, recipe_b)
    _check_sf_shape(f"{names[0]}[1]", sfa, m, k, gran_a)
    _check_sf_shape(f"{names[1]}[1]", sfb, n, k, gran_b)
    _check_d(d, (m, n), "M, N", OUT_DTYPES, device)
    _check_c(c, d)
    if _early_return(m, n, k, d, c):
        return
    variant = fp8_dense_variant(major_a, major_b, d.dtype, recipe, c is not None, n)
    dispatch.select(gemm_support.FP8_GEMM, variant, device)
    call_op(torch.ops.mate.gemm_nt, _gemm_nt, a_data, b_data, d, sfa, sfb, c, gran_a[0], gran_b[0])


def _t(pair):
    return pair[0].transpose(0, 1), pair[1].transpose(0, 1)


@mate_api(name="gemm.fp8_gemm_nt")
def fp8_gemm_nt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk",
                disable_ue8m0_cast=False):
    """D = A @ B^T (+ C): a = (fp8 (M, K), sf (M, K/128)), b = (fp8 (N, K), sf (N/128, K/128)),
    d (M, N) bf16 or float32, c like d (may be d itself)."""
    _fp8_gemm(_pair("a", a), _pair("b", b), d, c, recipe, recipe_a, recipe_b, ("a", "b"))


@mate_api(name="gemm.fp8_gemm_nn")
def fp8_gemm_nn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk",
                disable_ue8m0_cast=False):
    """D = A @ B (+ C): b = (fp8 (K, N), sf (K/128, N/128))."""
    _fp8_gemm(_pair("a", a), _t(_pair("b", b)), d, c, recipe, recipe_a, recipe_b, ("a", "b.T"))


@mate_api(name="gemm.fp8_gemm_tn")
def fp8_gemm_tn(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="mn",
                disable_ue8m0_cast=False):
    """D = A^T @ B (+ C): a = (fp8 (K, M), sf (K/128, M)), b = (fp8 (K, N), sf (K/128, N/128))."""
    _fp8_gemm(_t(_pair("a", a)), _t(_pair("b", b)), d, c, recipe, recipe_a, recipe_b, ("a.T", "b.T"))


@mate_api(name="gemm.fp8_gemm_tt")
def fp8_gemm_tt(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="mn",
                disable_ue8m0_cast=False):
    """D = A^T @ B^T (+ C): a = (fp8 (K, M), sf (K/128, M)), b = (fp8 (N, K), sf (N/128, K/128))."""
    _fp8_gemm(_t(_pair("a", a)), _pair("b", b), d, c, recipe, recipe_a, recipe_b, ("a.T", "b"))


def _bf16_gemm(a, b, d, c, names: tuple[str, str]) -> None:
    checks.tensor(names[0], a, dtypes=(torch.bfloat16,), ndim=2)
    device = a.device
    checks.tensor(names[1], b, dtypes=(torch.bfloat16,), ndim=2, device=device)
    major_a, major_b = _major(names[0], a), _major(names[1], b)
    m, k = a.shape
    n, k_b = b.shape
    if k_b != k:
        raise checks.ArgumentError(f"{names[1]}: K = {k_b} does not match {names[0]}'s K = {k}")
    _check_d(d, (m, n), "M, N", OUT_DTYPES, device)
    _check_c(c, d)
    if _early_return(m, n, k, d, c):
        return
    dispatch.select(gemm_support.BF16_GEMM,
                    bf16_launch.variant(a.dtype, major_a, major_b, d.dtype, c is not None, n, k), device)
    call_op(torch.ops.mate.gemm_nt, _gemm_nt, a, b, d, None, None, c, 1, 1)


@mate_api(name="gemm.bf16_gemm_nt")
def bf16_gemm_nt(a, b, d, c=None, compiled_dims="nk"):
    """D = A @ B^T (+ C): a (M, K), b (N, K) bf16; d (M, N) bf16 or float32."""
    _bf16_gemm(a, b, d, c, ("a", "b"))


@mate_api(name="gemm.bf16_gemm_nn")
def bf16_gemm_nn(a, b, d, c=None, compiled_dims="nk"):
    """D = A @ B (+ C): b (K, N)."""
    _bf16_gemm(a, _tensor_t("b", b), d, c, ("a", "b.T"))


@mate_api(name="gemm.bf16_gemm_tn")
def bf16_gemm_tn(a, b, d, c=None, compiled_dims="mn"):
    """D = A^T @ B (+ C): a (K, M), b (K, N)."""
    _bf16_gemm(_tensor_t("a", a), _tensor_t("b", b), d, c, ("a.T", "b.T"))


@mate_api(name="gemm.bf16_gemm_tt")
def bf16_gemm_tt(a, b, d, c=None, compiled_dims="mn"):
    """D = A^T @ B^T (+ C): a (K, M), b (N, K)."""
    _bf16_gemm(_tensor_t("a", a), b, d, c, ("a.T", "b"))


def _tensor_t(name: str, t) -> torch.Tensor:
    checks.tensor(name, t, ndim=2)
    return t.transpose(0, 1)


def cublaslt_gemm_nt(a, b, d, c=None):
    """DeepGEMM's cuBLASLt-backed GEMM (any operand dtype torch matmul accepts): D = A @ B^T (+ C)."""
    _plain_gemm(a, b, d, c, ("a", "b"))


def cublaslt_gemm_nn(a, b, d, c=None):
    _plain_gemm(a, _tensor_t("b", b), d, c, ("a", "b.T"))


def cublaslt_gemm_tn(a, b, d, c=None):
    _plain_gemm(_tensor_t("a", a), _tensor_t("b", b), d, c, ("a.T", "b.T"))


def cublaslt_gemm_tt(a, b, d, c=None):
    _plain_gemm(_tensor_t("a", a), b, d, c, ("a.T", "b"))


@mate_api(name="gemm.cublaslt_gemm")
def _plain_gemm(a, b, d, c, names):
    if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16:
        return _bf16_gemm(a, b, d, c, names)
    checks.tensor(names[0], a, dtypes=(torch.float32, torch.float16), ndim=2)
    checks.tensor(names[1], b, dtypes=(a.dtype,), ndim=2, device=a.device)
    if b.shape[1] != a.shape[1]:
        raise checks.ArgumentError(f"{names[1]}: K = {b.shape[1]} does not match {names[0]}'s K = {a.shape[1]}")
    _check_d(d, (a.shape[0], b.shape[0]), "M, N", (torch.bfloat16, torch.float32, torch.float16), a.device)
    _check_c(c, d)
    if _early_return(a.shape[0], b.shape[0], a.shape[1], d, c):
        return
    dispatch.select(gemm_support.BF16_GEMM, bf16_launch.variant(a.dtype, _major(names[0], a), _major(names[1], b),
                                                                d.dtype, c is not None, b.shape[0], a.shape[1]),
                    a.device)
    call_op(torch.ops.mate.gemm_nt, _gemm_nt, a, b, d, None, None, c, 1, 1)


# ---- M-grouped GEMMs --------------------------------------------------------------------------

def _check_grouped_layout(grouped_layout, expected_len: int, meaning: str, device: torch.device) -> None:
    checks.tensor("grouped_layout", grouped_layout, dtypes=(torch.int32,), ndim=1, device=device)
    checks.shape("grouped_layout", grouped_layout, (expected_len,), meaning)
    if not grouped_layout.is_contiguous():
        raise checks.ArgumentError("grouped_layout: must be contiguous")


def _check_contiguous_values(grouped_layout: torch.Tensor, num_groups: int, alignment: int) -> None:
    """Each group index is in [-1, num_groups), and every `alignment`-row block belongs to one group
    (its padding rows -1): the kernels read the group once per block of rows."""
    layout = grouped_layout.cpu().to(torch.int64)
    if layout.numel() and (int(layout.min()) < -1 or int(layout.max()) >= num_groups):
        raise checks.ArgumentError(f"grouped_layout: group indices must be in [-1, {num_groups}), got values in "
                                   f"[{int(layout.min())}, {int(layout.max())}]")
    blocks = layout.view(-1, alignment)
    used = blocks.masked_fill(blocks < 0, -1)
    highest, lowest = used.amax(dim=1), used.masked_fill(used < 0, num_groups).amin(dim=1)
    mixed = (highest >= 0) & (lowest != highest)
    if bool(mixed.any()):
        block = int(torch.nonzero(mixed)[0])
        first, last = block * alignment, (block + 1) * alignment - 1
        raise checks.ArgumentError(f"grouped_layout: rows {first}..{last} mix groups; "
                                   f"each group's rows must be padded to a multiple of {alignment} "
                                   "(get_mk_alignment_for_contiguous_layout()) with -1")


def _m_grouped_contiguous(a, b, d, grouped_layout, use_psum_layout, expected_m_for_psum_layout, fp8: bool,
                          recipe=None, recipe_a=None, recipe_b=None, b_name: str = "b") -> None:
    if fp8:
        (a_data, sfa), (b_data, sfb) = a, b
        _check_fp8("a", a_data, sfa, 2)
        device = a_data.device
        _check_fp8(b_name, b_data, sfb, 3, device)
        a_name, b_data_name = "a[0]", f"{b_name}[0]"
    else:
        a_data, b_data, sfa, sfb = a, b, None, None
        checks.tensor("a", a_data, dtypes=(torch.bfloat16,), ndim=2)
        device = a_data.device
        checks.tensor(b_name, b_data, dtypes=(torch.bfloat16,), ndim=3, device=device)
        a_name, b_data_name = "a", b_name
    major_a, major_b = _major(a_name, a_data), _major(b_data_name, b_data)
    if major_a != "K":
        raise checks.ArgumentError(
            f"{a_name}: must be K-major (last dimension contiguous), got strides {a_data.stride()}")
    m, k = a_data.shape
    num_groups, n, k_b = b_data.shape
    if k_b != k:
        raise checks.ArgumentError(f"{b_data_name}: K = {k_b} does not match {a_name}'s K = {k}")
    if num_groups == 0 or n == 0 or k == 0:
        raise checks.ArgumentError(f"{b_data_name}: num_groups, N and K must be positive, got {tuple(b_data.shape)}")
    gran_a = gran_b = recipe_used = None
    if fp8:
        _check_k("a[0]", k)
        gran_a, gran_b, recipe_used = _granularities(recipe, recipe_a, recipe_b)
        _check_sf_shape("a[1]", sfa, m, k, gran_a)
        _check_sf_shape(f"{b_name}[1]", sfb, n, k, gran_b, num_groups)
    _check_d(d, (m, n), "M, N", (torch.bfloat16,), device)
    alignment = layouts.get_mk_alignment_for_contiguous_layout()
    if use_psum_layout:
        _check_grouped_layout(grouped_layout, num_groups, "num_groups: the end row of each group", device)
    else:
        _check_grouped_layout(grouped_layout, m, "M: the group of each row, -1 for padding", device)
        if expected_m_for_psum_layout is not None:
            raise checks.ArgumentError("expected_m_for_psum_layout: only meaningful with use_psum_layout=True")
        if m % alignment:
            raise checks.ArgumentError(f"a: M = {m} must be a multiple of {alignment} "
                                       "(get_mk_alignment_for_contiguous_layout()) in the contiguous layout")
    if m == 0:
        return
    if fp8:
        variant = fp8_grouped_variant("contiguous", major_a, major_b, d.dtype, recipe_used, use_psum_layout, n)
    else:
        variant = bf16_launch.m_grouped_variant("contiguous", major_b, d.dtype, use_psum_layout, n, k, a_data.dtype)
    dispatch.select(gemm_support.M_GROUPED_FP8_GEMM if fp8 else gemm_support.M_GROUPED_BF16_GEMM, variant, device)
    call_op(torch.ops.mate.gemm_m_grouped_contiguous, _gemm_m_grouped_contiguous, a_data, b_data, d, grouped_layout,
            sfa, sfb, bool(use_psum_layout), alignment, gran_b[0] if fp8 else 1)


def _t3(pair):
    return pair[0].transpose(1, 2), pair[1].transpose(1, 2)


@mate_api(name="gemm.m_grouped_fp8_gemm_nt_contiguous")
def m_grouped_fp8_gemm_nt_contiguous(a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims="nk", disable_ue8m0_cast=False, use_psum_layout=False,
                                     ensure_zero_padding=True, expected_m_for_psum_layout=None):
    """MoE GEMM over experts' rows stacked in one tensor: a = (fp8 (M, K), sf (M, K/128)),
    b = (fp8 (G, N, K), sf (G, N/128, K/128)), d (M, N) bf16; grouped_layout (M,) int32 holds the
    expert of each row, -1 for the padding rows that align each expert to
    get_mk_alignment_for_contiguous_layout() rows (their output rows are zero). With
    use_psum_layout, grouped_layout (G,) holds each expert's end row instead."""
    _m_grouped_contiguous(_pair("a", a), _pair("b", b), d, grouped_layout, use_psum_layout,
                          expected_m_for_psum_layout, True, recipe, recipe_a, recipe_b)


@mate_api(name="gemm.m_grouped_fp8_gemm_nn_contiguous")
def m_grouped_fp8_gemm_nn_contiguous(a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims="nk", disable_ue8m0_cast=False, use_psum_layout=False,
                                     ensure_zero_padding=True):
    """As m_grouped_fp8_gemm_nt_contiguous with b = (fp8 (G, K, N), sf (G, K/128, N/128))."""
    _m_grouped_contiguous(_pair("a", a), _t3(_pair("b", b)), d, grouped_layout, use_psum_layout, None, True,
                          recipe, recipe_a, recipe_b, b_name="b.mT")


@mate_api(name="gemm.m_grouped_bf16_gemm_nt_contiguous")
def m_grouped_bf16_gemm_nt_contiguous(a, b, d, grouped_layout, compiled_dims="nk", use_psum_layout=False,
                                      ensure_zero_padding=True, expected_m_for_psum_layout=None):
    """bf16 counterpart of m_grouped_fp8_gemm_nt_contiguous: a (M, K), b (G, N, K) bf16."""
    _m_grouped_contiguous(a, b, d, grouped_layout, use_psum_layout, expected_m_for_psum_layout, False)


@mate_api(name="gemm.m_grouped_bf16_gemm_nn_contiguous")
def m_grouped_bf16_gemm_nn_contiguous(a, b, d, grouped_layout, compiled_dims="nk", use_psum_layout=False,
                                      ensure_zero_padding=True):
    """bf16 counterpart of m_grouped_fp8_gemm_nn_contiguous: b (G, K, N) bf16."""
    checks.tensor("b", b, ndim=3)
    _m_grouped_contiguous(a, b.transpose(1, 2), d, grouped_layout, use_psum_layout, None, False, b_name="b.mT")


def _m_grouped_masked(a, b, d, masked_m, expected_m, fp8: bool, recipe=None, recipe_a=None, recipe_b=None) -> None:
    if fp8:
        (a_data, sfa), (b_data, sfb) = a, b
        _check_fp8("a", a_data, sfa, 3)
        device = a_data.device
        _check_fp8("b", b_data, sfb, 3, device)
        a_name, b_name = "a[0]", "b[0]"
    else:
        a_data, b_data, sfa, sfb = a, b, None, None
        checks.tensor("a", a_data, dtypes=(torch.bfloat16,), ndim=3)
        device = a_data.device
        checks.tensor("b", b_data, dtypes=(torch.bfloat16,), ndim=3, device=device)
        a_name, b_name = "a", "b"
    for name, t in ((a_name, a_data), (b_name, b_data)):
        if _major(name, t) != "K":
            raise checks.ArgumentError(f"{name}: must be K-major (last dimension contiguous), got strides {t.stride()}")
    num_groups, max_m, k = a_data.shape
    if b_data.shape[0] != num_groups or b_data.shape[2] != k:
        raise checks.ArgumentError(f"{b_name}: expected shape ({num_groups}, N, {k}) (num_groups, N, K), "
                                   f"got {tuple(b_data.shape)}")
    n = b_data.shape[1]
    checks.tensor("masked_m", masked_m, dtypes=(torch.int32,), ndim=1, device=device)
    checks.shape("masked_m", masked_m, (num_groups,), "num_groups")
    if not masked_m.is_contiguous():
        raise checks.ArgumentError("masked_m: must be contiguous")
    if not isinstance(expected_m, int) or isinstance(expected_m, bool) or expected_m <= 0:
        raise checks.ArgumentError(f"expected_m: must be a positive int, got {expected_m!r}")
    if min(num_groups, max_m, n, k) <= 0:
        raise checks.ArgumentError(f"{a_name}: num_groups, max_m, N and K must be positive, got "
                                   f"{tuple(a_data.shape)} and N = {n}")
    gran_a = gran_b = recipe_used = None
    if fp8:
        _check_k("a[0]", k)
        gran_a, gran_b, recipe_used = _granularities(recipe, recipe_a, recipe_b)
        _check_sf_shape("a[1]", sfa, max_m, k, gran_a, num_groups)
        _check_sf_shape("b[1]", sfb, n, k, gran_b, num_groups)
    _check_d(d, (num_groups, max_m, n), "num_groups, max_m, N", (torch.bfloat16,), device)
    if fp8:
        variant = fp8_grouped_variant("masked", "K", "K", d.dtype, recipe_used, False, n)
    else:
        variant = bf16_launch.m_grouped_variant("masked", "K", d.dtype, False, n, k, a_data.dtype)
    dispatch.select(gemm_support.M_GROUPED_FP8_GEMM if fp8 else gemm_support.M_GROUPED_BF16_GEMM, variant, device)
    call_op(torch.ops.mate.gemm_m_grouped_masked, _gemm_m_grouped_masked, a_data, b_data, d, masked_m, sfa, sfb,
            gran_b[0] if fp8 else 1)


@mate_api(name="gemm.m_grouped_fp8_gemm_nt_masked")
def m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None,
                                 compiled_dims="nk", disable_ue8m0_cast=False):
    """Per-expert padded batches (decode MoE): a = (fp8 (G, max_m, K), sf (G, max_m, K/128)),
    b = (fp8 (G, N, K), sf (G, N/128, K/128)), d (G, max_m, N) bf16. Only the first masked_m[g]
    rows of d[g] are written; expected_m is a scheduling hint."""
    _m_grouped_masked(_pair("a", a), _pair("b", b), d, masked_m, expected_m, True, recipe, recipe_a, recipe_b)


@mate_api(name="gemm.m_grouped_bf16_gemm_nt_masked")
def m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m, compiled_dims="nk"):
    """bf16 counterpart of m_grouped_fp8_gemm_nt_masked."""
    _m_grouped_masked(a, b, d, masked_m, expected_m, False)


# ---- K-grouped GEMMs --------------------------------------------------------------------------

def _k_grouped_common(d, ks_cpu, grouped_layout, c, use_psum_layout, device) -> tuple[int, int, int, list[int]]:
    if use_psum_layout:
        raise NotImplementedError("use_psum_layout: the PSUM K-grouped layout is an SM100 feature; MATE implements "
                                  "the ks_cpu layout")
    checks.tensor("d", d, dtypes=(torch.float32,), ndim=3, device=device)
    if not d.is_contiguous():
        raise checks.ArgumentError("d: must be contiguous")
    num_groups, m, n = d.shape
    if ks_cpu is None or len(ks_cpu) == 0:
        raise checks.ArgumentError("ks_cpu: the K of each group is required (a non-empty list of ints)")
    ks = [int(k) for k in ks_cpu]
    if len(ks) != num_groups:
        raise checks.ArgumentError(f"ks_cpu: {len(ks)} groups, but d has {num_groups} (dim 0)")
    alignment = layouts.get_mk_alignment_for_contiguous_layout()
    bad = [k for k in ks if k % alignment or k < 0]
    if bad:
        raise checks.ArgumentError(f"ks_cpu: each K must be a non-negative multiple of {alignment} "
                                   f"(get_mk_alignment_for_contiguous_layout()), got {ks}")
    checks.tensor("grouped_layout", grouped_layout, dtypes=(torch.int32,), device=device)
    if grouped_layout.numel() != num_groups or not grouped_layout.is_contiguous():
        raise checks.ArgumentError(f"grouped_layout: expected a contiguous int32 tensor of {num_groups} elements "
                                   f"(the K of each group), got shape {tuple(grouped_layout.shape)}")
    if c is None:
        raise checks.ArgumentError("c: the K-grouped GEMMs accumulate into C; c is required (it may be d itself)")
    _check_c(c, d)
    if not c.is_contiguous():
        raise checks.ArgumentError("c: must be contiguous")
    return num_groups, m, n, ks


def _k_grouped(a, b, d, ks_cpu, grouped_layout, c, recipe, use_psum_layout, fp8: bool, flat_k_major: bool) -> None:
    if fp8:
        (a_data, sfa), (b_data, sfb) = a, b
        checks.tensor("a[0]", a_data, dtypes=(FP8,), ndim=1 if flat_k_major else 2)
        device = a_data.device
        checks.tensor("b[0]", b_data, dtypes=(FP8,), ndim=1 if flat_k_major else 2, device=device)
        if isinstance(sfa, torch.Tensor) and sfa.dtype == torch.int32:
            raise NotImplementedError(f"a[1]: {layouts.UE8M0_MESSAGE}")
        checks.tensor("a[1]", sfa, dtypes=(torch.float32,), ndim=2, device=device)
        checks.tensor("b[1]", sfb, dtypes=(torch.float32,), ndim=2, device=device)
        recipe = tuple(recipe)
        if len(recipe) != 3 or recipe[:2] != (1, 1):
            raise checks.ArgumentError(
                f"recipe: the K-grouped GEMMs take per-channel scales (1, 1, gran_k), got {recipe}")
        if recipe[2] != SCALE_BLOCK_K:
            raise NotImplementedError(f"recipe: gran_k = {recipe[2]}: {layouts.UE8M0_MESSAGE}")
        names = ("a[0]", "b[0]")
    else:
        a_data, b_data, sfa, sfb = a, b, None, None
        checks.tensor("a", a_data, dtypes=(torch.bfloat16,), ndim=2)
        device = a_data.device
        checks.tensor("b", b_data, dtypes=(torch.bfloat16,), ndim=2, device=device)
        names = ("a", "b")
    for name, t in zip(names, (a_data, b_data), strict=True):
        if not t.is_contiguous():
            raise checks.ArgumentError(f"{name}: must be contiguous")
    num_groups, m, n, ks = _k_grouped_common(d, ks_cpu, grouped_layout, c, use_psum_layout, device)
    sum_k = sum(ks)
    if flat_k_major:
        for name, t, mn in ((names[0], a_data, m), (names[1], b_data, n)):
            if t.numel() != sum_k * mn:
                raise checks.ArgumentError(f"{name}: expected sum(ks_cpu) * {'M' if mn == m else 'N'} = {sum_k * mn} "
                                           f"elements (each group's (MN, K_g) block, K-major), got {t.numel()}")
    else:
        checks.shape(names[0], a_data, (sum_k, m), "sum(ks_cpu), M")
        checks.shape(names[1], b_data, (sum_k, n), "sum(ks_cpu), N")
    sf_rows = sum(layouts.ceil_div(k, SCALE_BLOCK_K) for k in ks)
    if fp8:
        if flat_k_major:  # scales given (MN, sum K blocks), as the K-major kernels read them
            checks.shape("a[1]", sfa, (m, sf_rows), "M, sum(ks_cpu) / 128")
            checks.shape("b[1]", sfb, (n, sf_rows), "N, sum(ks_cpu) / 128")
        else:
            checks.shape("a[1]", sfa, (sf_rows, m), "sum(ks_cpu) / 128, M")
            checks.shape("b[1]", sfb, (sf_rows, n), "sum(ks_cpu) / 128, N")
    if _early_return(m, n, sum_k, d, c):
        return
    major = "K" if flat_k_major else "MN"
    if fp8:
        variant = kgrouped_launch.variant(major, major, d.dtype, recipe, n, a_data.dtype)
    else:
        variant = bf16_launch.k_grouped_variant(major, major, d.dtype, False, m, n, a_data.dtype)
    dispatch.select(gemm_support.K_GROUPED_FP8_GEMM if fp8 else gemm_support.K_GROUPED_BF16_GEMM, variant, device)
    if flat_k_major:
        a_data, b_data = _flat_to_k_major(a_data, m, ks), _flat_to_k_major(b_data, n, ks)
        sfa, sfb = sfa.transpose(0, 1), sfb.transpose(0, 1)
    call_op(torch.ops.mate.gemm_k_grouped_tn, _gemm_k_grouped_tn, a_data, b_data, d, c, ks, grouped_layout, sfa, sfb)


def _flat_to_k_major(flat: torch.Tensor, mn: int, ks: list[int]) -> torch.Tensor:
    """The flat layout (each group's (MN, K_g) block row-major, one after another) as the logical
    (ΣK, MN) operand, stored K-major: the blocks side by side in one (MN, ΣK) tensor (one copy; a
    TMA descriptor has one row stride, and the flat blocks' row strides differ per group)."""
    pieces, start = [], 0
    for k in ks:
        pieces.append(flat[start:start + mn * k].view(mn, k))
        start += mn * k
    return torch.cat(pieces, dim=1).transpose(0, 1)


@mate_api(name="gemm.k_grouped_fp8_gemm_tn_contiguous")
def k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks_cpu, grouped_layout, c=None, recipe=(1, 1, 128),
                                     compiled_dims="mn", use_psum_layout=False):
    """Weight-gradient GEMM over groups stacked along K: a = (fp8 (sum K, M), sf (sum K/128, M)),
    b = (fp8 (sum K, N), sf (sum K/128, N)); d[g] = c[g] + A_g^T @ B_g, d and c (G, M, N) float32;
    ks_cpu the K of each group (multiples of 128), grouped_layout the same as an int32 tensor."""
    _k_grouped(_pair("a", a), _pair("b", b), d, ks_cpu, grouped_layout, c, recipe, use_psum_layout, True, False)


@mate_api(name="gemm.k_grouped_fp8_gemm_nt_contiguous")
def k_grouped_fp8_gemm_nt_contiguous(a, b, d, ks_cpu, grouped_layout, c=None, recipe=(1, 1, 128),
                                     compiled_dims="mn", use_psum_layout=False):
    """The K-major (SM90) form of k_grouped_fp8_gemm_tn_contiguous: a[0] is flat, each group's
    (M, K_g) block row-major one after another (likewise b[0] with N); scales (M, sum K/128) and
    (N, sum K/128)."""
    _k_grouped(_pair("a", a), _pair("b", b), d, ks_cpu, grouped_layout, c, recipe, use_psum_layout, True, True)


@mate_api(name="gemm.k_grouped_bf16_gemm_tn_contiguous")
def k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks_cpu, grouped_layout, c=None, compiled_dims="mn",
                                      use_psum_layout=False):
    """bf16 counterpart of k_grouped_fp8_gemm_tn_contiguous: a (sum K, M), b (sum K, N)."""
    _k_grouped(a, b, d, ks_cpu, grouped_layout, c, None, use_psum_layout, False, False)


# ---- torch.library ops: the compute behind the public functions (torch.compile sees one op) -------
# Inputs are already checked; d is written in place. The reference runs here until kernels exist.

def _gemm_nt(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sfa: torch.Tensor | None, sfb: torch.Tensor | None,
             c: torch.Tensor | None, gran_a_mn: int, gran_b_mn: int) -> None:
    if a.dtype == FP8 and b.dtype == FP8 and sfa is not None and sfb is not None and gran_a_mn == 1:
        variant = fp8_dense_variant(_major("a", a), _major("b", b), d.dtype, (1, gran_b_mn, SCALE_BLOCK_K),
                                    c is not None, b.shape[0], b.dtype)
        if _runs_kernel(gemm_support.FP8_GEMM, variant, a.device):
            fp8_launch.fp8_gemm_nt(gemm_support.FP8_GEMM.name, gemm_support.FP8_GEMM.build, a, sfa, b, sfb, d)
            return
    if sfa is None and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype and a.dim() == 2:
        variant = bf16_launch.variant(a.dtype, _major("a", a), _major("b", b), d.dtype, c is not None, b.shape[0],
                                      a.shape[1])
        if _runs_kernel(gemm_support.BF16_GEMM, variant, a.device):
            if c is not None:
                _load_c(c, d)
            bf16_launch.gemm(gemm_support.BF16_GEMM.name, gemm_support.BF16_GEMM.build, a, b, d, c is not None)
            return
    d.copy_(reference.gemm_nt(a, b, c, sfa=sfa, sfb=sfb, gran_a=(gran_a_mn, SCALE_BLOCK_K),
                              gran_b=(gran_b_mn, SCALE_BLOCK_K), out_dtype=d.dtype))


def _grouped_kernel(layout: str, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sfa, sfb, gran_b_mn: int,
                    psum: bool = False) -> dispatch.Op | None:
    """The M-grouped op whose kernel runs this call (FP8 or BF16), or None (the reference runs)."""
    if a.dtype in (torch.bfloat16, torch.float16) and sfa is None:
        variant = bf16_launch.m_grouped_variant(layout, bf16_launch.major_of(b), d.dtype, psum, b.shape[1],
                                                a.shape[-1], a.dtype)
        op = gemm_support.M_GROUPED_BF16_GEMM
    elif a.dtype in (FP8, torch.float8_e5m2) and sfa is not None and sfb is not None:
        variant = fp8_grouped_variant(layout, _major("a", a), _major("b", b), d.dtype, (1, gran_b_mn, SCALE_BLOCK_K),
                                      psum, b.shape[1], a.dtype if a.dtype == b.dtype else torch.float8_e5m2)
        op = gemm_support.M_GROUPED_FP8_GEMM
    else:
        return None
    return op if _runs_kernel(op, variant, a.device) else None


def _gemm_m_grouped_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, grouped_layout: torch.Tensor,
                               sfa: torch.Tensor | None, sfb: torch.Tensor | None, use_psum_layout: bool,
                               alignment: int, gran_b_mn: int) -> None:
    op = _grouped_kernel("contiguous", a, b, d, sfa, sfb, gran_b_mn, use_psum_layout) if alignment == 128 else None
    # The kernels read each 128-row block's expert from its first row (upstream's contract: groups
    # padded to the alignment; not checked here, which would need a host sync).
    if op is gemm_support.M_GROUPED_FP8_GEMM:
        fp8_launch.m_grouped_contiguous(op.name, op.build, a, sfa, b, sfb, d, grouped_layout)
        return
    if op is gemm_support.M_GROUPED_BF16_GEMM:
        bf16_launch.m_grouped_contiguous(op.name, op.build, a, b, d, grouped_layout, use_psum_layout)
        return
    if not use_psum_layout:
        _check_contiguous_values(grouped_layout, b.shape[0], alignment)
    d.copy_(reference.m_grouped_gemm_nt_contiguous(a, b, grouped_layout, sfa=sfa, sfb=sfb, gran_a=(1, SCALE_BLOCK_K),
                                                   gran_b=(gran_b_mn, SCALE_BLOCK_K), use_psum_layout=use_psum_layout,
                                                   alignment=alignment, out_dtype=d.dtype))


def _gemm_m_grouped_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                           sfa: torch.Tensor | None, sfb: torch.Tensor | None, gran_b_mn: int) -> None:
    # No host sync (CUDA-graph capturable): the kernels clamp masked_m to [0, max_m].
    op = _grouped_kernel("masked", a, b, d, sfa, sfb, gran_b_mn)
    if op is gemm_support.M_GROUPED_FP8_GEMM:
        fp8_launch.m_grouped_masked(op.name, op.build, a, sfa, b, sfb, d, masked_m)
        return
    if op is gemm_support.M_GROUPED_BF16_GEMM:
        bf16_launch.m_grouped_masked(op.name, op.build, a, b, d, masked_m)
        return
    max_m = a.shape[1]
    counts = masked_m.cpu()
    if bool((counts < 0).any()) or bool((counts > max_m).any()):
        raise checks.ArgumentError(f"masked_m: each count must be in [0, {max_m}] (max_m), got {counts.tolist()}")
    outputs = reference.m_grouped_gemm_nt_masked(a, b, counts, sfa=sfa, sfb=sfb, gran_a=(1, SCALE_BLOCK_K),
                                                 gran_b=(gran_b_mn, SCALE_BLOCK_K), out_dtype=d.dtype)
    for group, out in enumerate(outputs):
        d[group, :out.shape[0]].copy_(out)


def _gemm_k_grouped_tn(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor, ks: list[int],
                       grouped_layout: torch.Tensor, sfa: torch.Tensor | None, sfb: torch.Tensor | None) -> None:
    """d[g] = c[g] + A_g^T B_g: a (ΣK, M), b (ΣK, N) logical (any strides); the kernels read each
    group's K from grouped_layout on the device (no host sync; it must hold ks, as upstream's)."""
    m, n = a.shape[1], b.shape[1]
    if sfa is None and a.dtype == torch.bfloat16:
        major_a, major_b = ("MN" if t.is_contiguous() else "K" for t in (a, b))
        op, variant = gemm_support.K_GROUPED_BF16_GEMM, bf16_launch.k_grouped_variant(major_a, major_b, d.dtype,
                                                                                       False, m, n, a.dtype)
        if _runs_kernel(op, variant, a.device):
            _load_c(c, d)
            bf16_launch.k_grouped(op.name, op.build, a, b, d, grouped_layout)
            return
    elif sfa is not None and sfb is not None:
        op = gemm_support.K_GROUPED_FP8_GEMM
        variant = kgrouped_launch.variant(kgrouped_launch.major_of(a), kgrouped_launch.major_of(b), d.dtype,
                                          (1, 1, SCALE_BLOCK_K), n, a.dtype if a.dtype == b.dtype else None)
        if _runs_kernel(op, variant, a.device):
            _load_c(c, d)
            kgrouped_launch.k_grouped(op.name, op.build, a, b, sfa, sfb, d, grouped_layout)
            return
    d.copy_(reference.k_grouped_gemm_tn_contiguous(a, b, ks, c, sfa=sfa, sfb=sfb, gran_k=SCALE_BLOCK_K,
                                                   out_dtype=d.dtype))


def _register_ops() -> None:
    for name, impl in (("gemm_nt", _gemm_nt), ("gemm_m_grouped_contiguous", _gemm_m_grouped_contiguous),
                       ("gemm_m_grouped_masked", _gemm_m_grouped_masked), ("gemm_k_grouped_tn", _gemm_k_grouped_tn)):
        op = torch.library.custom_op(f"mate::{name}", impl, mutates_args=("d",))
        op.register_fake(lambda *args, **kwargs: None)


_register_ops()


# Upstream's FP8/FP4 names: the same functions (FP4 operands are an SM100 feature MATE does not implement).
fp8_fp4_gemm_nt, fp8_fp4_gemm_nn, fp8_fp4_gemm_tn, fp8_fp4_gemm_tt = fp8_gemm_nt, fp8_gemm_nn, fp8_gemm_tn, fp8_gemm_tt
m_grouped_fp8_fp4_gemm_nt_contiguous = m_grouped_fp8_gemm_nt_contiguous
m_grouped_fp8_fp4_gemm_nn_contiguous = m_grouped_fp8_gemm_nn_contiguous
m_grouped_fp8_fp4_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked
# Legacy aliases upstream keeps.
fp8_m_grouped_gemm_nt_masked = m_grouped_fp8_gemm_nt_masked
bf16_m_grouped_gemm_nt_masked = m_grouped_bf16_gemm_nt_masked
