"""Scale-factor layout utilities with DeepGEMM's semantics (deep_gemm/utils and csrc/apis/layout.hpp).

Scale factors ("SF") of the FP8 block-scaled GEMMs are float32 tensors whose last two
dimensions are (MN blocks, K blocks). The SM90 (Hopper) recipe, which MATE implements, is:

* A (activations): (1, 128) per token and per 128 channels: shape (M, ceil(K / 128)), which the
  kernels read MN-major and TMA-aligned (see :func:`get_mn_major_tma_aligned_tensor`);
* B (weights): (128, 128) blocks: shape (ceil(N / 128), ceil(K / 128)), row- or column-major.

The SM100 recipes (UE8M0 scales packed four to an int32, K granularity 32) are not implemented.
"""

from __future__ import annotations

import torch

from mate import checks

TMA_ALIGNMENT_BYTES = 16
FP8_E4M3_MAX = 448.0
# DeepGEMM's default M (and K) alignment of the rows of each group in the contiguous layouts.
LEGACY_MK_ALIGNMENT_FOR_CONTIGUOUS_LAYOUT = 128

_mk_alignment = LEGACY_MK_ALIGNMENT_FOR_CONTIGUOUS_LAYOUT

UE8M0_MESSAGE = ("UE8M0 (packed int32) scale factors and K granularity 32 are the SM100 recipes; "
                 "MATE implements the SM90 float32 recipes ((1, 128) for A, (1, 128) or (128, 128) for B)")


def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    return ceil_div(x, y) * y


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """`x` rounded up so that `x` elements of `element_size` bytes span a multiple of 16 bytes."""
    if TMA_ALIGNMENT_BYTES % element_size != 0:
        raise checks.ArgumentError(f"element_size: {element_size} does not divide {TMA_ALIGNMENT_BYTES}")
    return align(x, TMA_ALIGNMENT_BYTES // element_size)


def _is_mn_major_tma_aligned(sf: torch.Tensor) -> bool:
    batched = sf if sf.dim() == 3 else sf.unsqueeze(0)
    _, mn, sf_k = batched.shape
    aligned_mn = get_tma_aligned_size(mn, sf.element_size())
    batch_ok = sf.dim() == 2 or batched.stride(0) == aligned_mn * sf_k or batched.shape[0] == 1
    return batch_ok and (batched.stride(1) == 1 or mn == 1) and (batched.stride(2) == aligned_mn or sf_k == 1)


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """The same values as `sf` ((MN, SF_K) or (G, MN, SF_K), float32), laid out MN-major with the
    MN stride padded to 16 bytes: strides (1, aligned_mn) (and aligned_mn * SF_K between groups).
    Returns `sf` itself when it already has that layout."""
    checks.tensor("sf", sf, dtypes=(torch.float32,), ndim=(2, 3))
    if _is_mn_major_tma_aligned(sf):
        return sf
    batched = sf if sf.dim() == 3 else sf.unsqueeze(0)
    groups, mn, sf_k = batched.shape
    aligned_mn = get_tma_aligned_size(mn, sf.element_size())
    out = torch.empty_strided((groups, mn, sf_k), (aligned_mn * sf_k, 1, aligned_mn), dtype=sf.dtype, device=sf.device)
    out.copy_(batched)
    return out if sf.dim() == 3 else out.squeeze(0)


def set_mk_alignment_for_contiguous_layout(new_value: int) -> None:
    global _mk_alignment
    _mk_alignment = int(new_value)


def get_mk_alignment_for_contiguous_layout() -> int:
    """Row alignment of each group in the M-grouped (and K-grouped) contiguous layouts."""
    return _mk_alignment


def get_theoretical_mk_alignment_for_contiguous_layout(expected_m: int | None = None) -> int:
    """The alignment the kernels need. On SM90 (and on every device MATE targets) that is 128;
    upstream's SM100 block-M heuristic does not apply."""
    del expected_m
    return LEGACY_MK_ALIGNMENT_FOR_CONTIGUOUS_LAYOUT


def get_m_alignment_for_contiguous_layout() -> int:
    return get_mk_alignment_for_contiguous_layout()


def get_k_alignment_for_contiguous_layout() -> int:
    return get_mk_alignment_for_contiguous_layout()


def recipe_granularity(recipe, is_sfa: bool | None) -> tuple[int, int]:
    """(gran_mn, gran_k) of one operand from a (gran_m, gran_n, gran_k) or (gran_mn, gran_k) recipe."""
    recipe = tuple(recipe)
    if len(recipe) == 3:
        if is_sfa is None:
            raise checks.ArgumentError("is_sfa: required with a 3-element recipe (gran_m, gran_n, gran_k)")
        return (recipe[0] if is_sfa else recipe[1]), recipe[2]
    if len(recipe) == 2:
        if is_sfa is not None:
            raise checks.ArgumentError("is_sfa: must be None with a 2-element recipe (gran_mn, gran_k)")
        return recipe[0], recipe[1]
    raise checks.ArgumentError(f"recipe: expected (gran_m, gran_n, gran_k) or (gran_mn, gran_k), got {recipe}")


def check_sf_shape(name: str, sf: torch.Tensor, mn: int, k: int, gran_mn: int, gran_k: int,
                   num_groups: int | None = None) -> None:
    """Upstream's check_sf_layout shape rules for a float32 SF."""
    if sf.dtype == torch.int32:
        raise NotImplementedError(f"{name}: {UE8M0_MESSAGE}")
    checks.tensor(name, sf, dtypes=(torch.float32,), ndim=2 if num_groups is None else 3)
    expected = (ceil_div(mn, gran_mn), ceil_div(k, gran_k))
    if num_groups is not None:
        expected = (num_groups,) + expected
    meaning = f"ceil(mn / {gran_mn}), ceil(k / {gran_k})"
    checks.shape(name, sf, expected, meaning if num_groups is None else "num_groups, " + meaning)


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe, num_groups: int | None = None,
                                      is_sfa: bool | None = None, disable_ue8m0_cast: bool = False,
                                      psum_layout: torch.Tensor | None = None) -> torch.Tensor:
    """The SF in the layout the SM90 kernels read: (1, 128) scales become MN-major and
    TMA-aligned; (128, 128) scales are checked and returned unchanged (row- or column-major)."""
    del disable_ue8m0_cast, psum_layout  # only meaningful for the SM100 recipes
    gran_mn, gran_k = recipe_granularity(recipe, is_sfa)
    if sf.dtype == torch.int32 or gran_k != 128 or gran_mn not in (1, 128):
        raise NotImplementedError(f"transform_sf_into_required_layout: recipe (gran_mn={gran_mn}, gran_k={gran_k}) "
                                  f"with {str(sf.dtype).replace('torch.', '')} scales: {UE8M0_MESSAGE}")
    check_sf_shape("sf", sf, mn, k, gran_mn, gran_k, num_groups)
    if gran_mn == 1:
        return get_mn_major_tma_aligned_tensor(sf)
    rows, cols = sf.shape[-2:]
    if num_groups is not None and sf.stride(0) != rows * cols and num_groups > 1:
        raise checks.ArgumentError(f"sf: groups must be packed (stride(0) == {rows * cols}), got strides {sf.stride()}")
    row_major = sf.stride(-1) == 1 or cols == 1
    row_major = row_major and (sf.stride(-2) == cols or rows == 1)
    col_major = (sf.stride(-2) == 1 or rows == 1) and (sf.stride(-1) == rows or cols == 1)
    if not (row_major or col_major):
        raise checks.ArgumentError(f"sf: (128, 128) scales must be contiguous or contiguous after transposing the last "
                                   f"two dimensions, got shape {tuple(sf.shape)} strides {sf.stride()}")
    return sf


# ---- quantization helpers (deep_gemm.utils.math) ------------------------------------------

def ceil_to_ue8m0(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= |x| (as float32), used by the UE8M0 recipes."""
    bits = x.abs().float().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).int()
    return (exponent.clamp(1, 254) << 23).view(torch.float32)


def _scale(amax: torch.Tensor, use_ue8m0: bool) -> torch.Tensor:
    sf = amax.clamp(min=1e-4) / FP8_E4M3_MAX
    return ceil_to_ue8m0(sf) if use_ue8m0 else sf


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128,
                          use_packed_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> fp8 (M, K) and float32 scales (M, ceil(K / gran_k)): one scale per row and per
    `gran_k` channels, amax / 448 (K padded with zeros to a multiple of gran_k)."""
    if use_packed_ue8m0:
        raise NotImplementedError(f"use_packed_ue8m0: {UE8M0_MESSAGE}")
    checks.tensor("x", x, ndim=2)
    m, k = x.shape
    padded = torch.zeros((m, align(k, gran_k)), dtype=x.dtype, device=x.device)
    padded[:, :k] = x
    blocks = padded.view(m, -1, gran_k)
    sf = _scale(blocks.abs().float().amax(dim=2), use_ue8m0)
    quantized = (blocks * (1.0 / sf.unsqueeze(2))).to(torch.float8_e4m3fn)
    return quantized.view(m, -1)[:, :k].contiguous(), sf


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N) with K a multiple of gran_k -> fp8 (K, N) and scales (K / gran_k, N): one scale per
    column and per `gran_k` rows (the K-grouped GEMMs' layout)."""
    checks.tensor("x", x, ndim=2)
    k, n = x.shape
    if k % gran_k:
        raise checks.ArgumentError(f"x: dim 0 ({k}) must be a multiple of gran_k ({gran_k})")
    blocks = x.view(-1, gran_k, n)
    sf = _scale(blocks.abs().float().amax(dim=1), use_ue8m0)
    return (blocks * (1.0 / sf.unsqueeze(1))).to(torch.float8_e4m3fn).view(k, n), sf


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> fp8 (N, K) and scales (ceil(N / gran_k), ceil(K / gran_k)): one scale per
    gran_k x gran_k block (padding with zeros)."""
    checks.tensor("x", x, ndim=2)
    rows, cols = x.shape
    padded = torch.zeros((align(rows, gran_k), align(cols, gran_k)), dtype=x.dtype, device=x.device)
    padded[:rows, :cols] = x
    blocks = padded.view(padded.shape[0] // gran_k, gran_k, padded.shape[1] // gran_k, gran_k)
    sf = _scale(blocks.abs().float().amax(dim=(1, 3), keepdim=True), use_ue8m0)
    quantized = (blocks * (1.0 / sf)).to(torch.float8_e4m3fn).view_as(padded)
    return quantized[:rows, :cols].contiguous(), sf.view(blocks.shape[0], blocks.shape[2])
