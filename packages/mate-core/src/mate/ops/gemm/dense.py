"""MATE's own dense GEMM API (`mate.gemm.gemm_fp8_nt_groupwise`, `bmm_fp8`, `bmm_fp16`).

The math is :mod:`mate.ops.gemm.reference` (dequantize, then multiply in float32); this module
only checks the arguments, maps the original `backend` names and lays the result into `out`.

Backends: the original names kernel libraries ("mudnn", "mubin", "mutlass"); they map to
"tilelang" here, "auto" stays "auto" (MATE_BACKEND, then the CPU reference, or the reference on a
GPU under MATE_ALLOW_REFERENCE_FALLBACK=1), "reference" forces the reference. The TileLang FP8
kernel serves gemm_fp8_nt_groupwise and bmm_fp8 (as the masked M-grouped kernel, one group per
batch) with e4m3 operands, recipe (1, 128, 128) and bf16 out; the TileLang BF16 kernel
(:mod:`mate.ops.gemm.bf16_kernel`, the batch as its grid's z axis) serves bmm_fp16 (with c, it
accumulates into a float32 output; a 16-bit out is rounded from a float32 staging tensor).

Scale tensors: a granularity of -1 means "the whole dimension" (one scale along it).
"""

from __future__ import annotations

import torch

from mate import checks, dispatch
from mate.api import call_op, mate_api
from mate.ops.gemm import api as _gemm_api
from mate.ops.gemm import bf16_launch, reference
from mate.ops.gemm import support as gemm_support

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_OUT = torch.float8_e4m3fn
HALF_DTYPES = (torch.bfloat16, torch.float16)
_BACKENDS = {"auto": "auto", "reference": "reference", "tilelang": "tilelang",
             "mudnn": "tilelang", "mubin": "tilelang", "mutlass": "tilelang"}


# ---- shared helpers (moe.py uses them too) ----------------------------------------------------

def resolve_backend(backend, op: dispatch.Op, variant: dict, device: torch.device) -> str:
    """"tilelang" or "reference" for this call; raises UnsupportedError when neither may run."""
    if backend is None:
        backend = "auto"
    if backend not in _BACKENDS:
        raise checks.ArgumentError(f"backend: {backend!r} is not accepted; expected one of {sorted(_BACKENDS)}")
    return dispatch.select(op, variant, device, backend=_BACKENDS[backend])


def _ab_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The operand dtype of the dispatch variant (mixed e4m3/e5m2 counts as e5m2)."""
    return a.dtype if a.dtype == b.dtype else torch.float8_e5m2


def granularity(value, default: tuple[int, int, int], name: str = "scale_granularity_mnk") -> tuple[int, int, int]:
    if value is None:
        return default
    if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(
            isinstance(g, int) and not isinstance(g, bool) for g in value):
        raise checks.ArgumentError(f"{name}: expected a tuple of three ints (m, n, k), got {value!r}")
    value = tuple(value)
    if any(g == 0 or g < -1 for g in value):
        raise checks.ArgumentError(f"{name}: each granularity must be positive or -1, got {value}")
    return value


def require_granularity(value: tuple[int, int, int], accepted, name: str = "scale_granularity_mnk") -> None:
    if value not in tuple(accepted):
        raise checks.ArgumentError(f"{name}: {value} is not supported; expected one of {list(accepted)}")


def blocks(extent: int, gran: int) -> int:
    """Number of scale entries along a dimension of `extent` (gran -1: one)."""
    return 1 if gran == -1 else -(-extent // gran)


def span(extent: int, gran: int) -> int:
    return max(extent, 1) if gran == -1 else gran


def fp8_pair(name: str, value, ndim: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise checks.ArgumentTypeError(
            f"{name}: expected a (fp8_tensor, scale_tensor) pair, got {type(value).__name__}")
    x, sf = value
    checks.tensor(f"{name}[0]", x, dtypes=FP8_DTYPES, ndim=ndim, device=device)
    checks.tensor(f"{name}[1]", sf, dtypes=(torch.float32,), ndim=ndim, device=x.device)
    return x, sf


def major(name: str, t: torch.Tensor, mode, accepted: dict[str, int], arg: str) -> None:
    """`accepted` maps each mode to the dimension that must have stride 1."""
    if mode not in accepted:
        raise checks.ArgumentError(f"{arg}: {mode!r} is not accepted; expected one of {list(accepted)}")
    dim = accepted[mode]
    if t.numel() and t.shape[dim] > 1 and t.stride(dim) != 1:
        raise checks.ArgumentError(f"{name}: {arg}={mode!r} needs dimension {dim % t.dim()} contiguous (stride 1), "
                                   f"got shape {tuple(t.shape)} strides {t.stride()}")


def check_out(out: torch.Tensor, expected, meaning: str, dtypes, device: torch.device) -> torch.Tensor:
    checks.tensor("out", out, dtypes=dtypes, ndim=len(expected), device=device)
    checks.shape("out", out, expected, meaning)
    return out


def _batched_out_and_accumulator(out, c, shape, out_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The bmm output (allocated, or the caller's checked) and a check of the float32 accumulator c."""
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=device)
    else:
        check_out(out, shape, "batch, m, n", (out_dtype,), device)
    if c is not None:
        checks.tensor("c", c, dtypes=(torch.float32,), ndim=3, device=device)
        checks.shape("c", c, shape, "batch, m, n")
    return out


def quantize_output(result: torch.Tensor, output_scale: torch.Tensor) -> torch.Tensor:
    """FP8 output: result / output_scale, clamped to e4m3's range (out * output_scale dequantizes)."""
    limit = torch.finfo(FP8_OUT).max
    return (result / output_scale.to(result.dtype).reshape(())).clamp(-limit, limit).to(FP8_OUT)


def _check_output_scale(output_scale, device: torch.device) -> None:
    if output_scale is None:
        return
    checks.tensor("output_scale", output_scale, dtypes=(torch.float32,), device=device)
    if output_scale.numel() != 1:
        raise checks.ArgumentError(f"output_scale: expected one scale (a per-tensor scale), got shape "
                                   f"{tuple(output_scale.shape)}")


def _out_dtypes(output_scale, plain) -> tuple[torch.dtype, ...]:
    return (FP8_OUT,) if output_scale is not None else tuple(plain)


# ---- gemm_fp8_nt_groupwise ------------------------------------------------------------------

@mate_api(name="gemm.gemm_fp8_nt_groupwise")
def gemm_fp8_nt_groupwise(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                          scale_major_mode=None, mma_sm=None, scale_granularity_mnk=None, out=None, out_dtype=None,
                          backend: str = "auto", output_scale=None) -> torch.Tensor:
    """D = A @ B^T with groupwise FP8 scales: a (m, k), b (n, k); with scale_major_mode "K"
    a_scale (m/gm, k/gk), b_scale (n/gn, k/gk); with "MN" their transposes. bf16/fp16 out, or
    fp8 e4m3 out = D / output_scale when output_scale is given."""
    checks.tensor("a", a, dtypes=FP8_DTYPES, ndim=2)
    device = a.device
    checks.tensor("b", b, dtypes=FP8_DTYPES, ndim=2, device=device)
    for name, t in (("a", a), ("b", b)):
        if not t.is_contiguous():
            raise checks.ArgumentError(f"{name}: must be contiguous, got strides {t.stride()}")
    m, k = a.shape
    n, k_b = b.shape
    if k_b != k:
        raise checks.ArgumentError(f"b: K = {k_b} does not match a's K = {k}")
    mode = "K" if scale_major_mode is None else scale_major_mode
    if mode not in ("K", "MN"):
        raise checks.ArgumentError(f"scale_major_mode: {scale_major_mode!r} is not accepted; expected 'K' or 'MN'")
    if mma_sm not in (None, 1):
        raise checks.ArgumentError(f"mma_sm: only 1 is supported, got {mma_sm!r}")
    gm, gn, gk = granularity(scale_granularity_mnk, (1, 128, 128))
    require_granularity((gm, gn, gk), ((1, 128, 128), (1, 1, 128), (128, 128, 128)))
    expected_a, expected_b = (blocks(m, gm), blocks(k, gk)), (blocks(n, gn), blocks(k, gk))
    if mode == "MN":
        expected_a, expected_b = expected_a[::-1], expected_b[::-1]
    for name, sf, expected, dim in (("a_scale", a_scale, expected_a, "m"), ("b_scale", b_scale, expected_b, "n")):
        checks.tensor(name, sf, dtypes=(torch.float32,), ndim=2, device=device)
        meaning = f"ceil({dim}/{gm if dim == 'm' else gn}), ceil(k/{gk})"
        checks.shape(name, sf, expected, meaning if mode == "K" else f"transposed: {meaning}")
        if not sf.is_contiguous():
            raise checks.ArgumentError(f"{name}: must be contiguous, got strides {sf.stride()}")
    _check_output_scale(output_scale, device)
    accepted = _out_dtypes(output_scale, HALF_DTYPES)
    if out is None:
        dtype = out_dtype if out_dtype is not None else accepted[0]
        checks.dtype_choice("out_dtype", dtype, accepted)
        out = torch.empty((m, n), dtype=dtype, device=device)
    else:
        check_out(out, (m, n), "m, n", accepted, device)
    variant = _gemm_api.fp8_dense_variant("K", "K", out.dtype, (gm, gn, gk), False, n, _ab_dtype(a, b))
    choice = resolve_backend(backend, gemm_support.FP8_GEMM, variant, device)
    if m == 0 or n == 0:
        return out
    sfa, sfb = (a_scale, b_scale) if mode == "K" else (a_scale.transpose(0, 1), b_scale.transpose(0, 1))
    if choice == "tilelang":
        call_op(torch.ops.mate.gemm_nt, _gemm_api._gemm_nt, a, b, out, sfa, sfb, None, 1, gn)
        return out
    result = reference.gemm_nt(a, b, sfa=sfa, sfb=sfb, gran_a=(span(m, gm), span(k, gk)),
                               gran_b=(span(n, gn), span(k, gk)), out_dtype=torch.float32)
    out.copy_(result if output_scale is None else quantize_output(result, output_scale))
    return out


# ---- bmm_fp8 / bmm_fp16 ---------------------------------------------------------------------

def _batched_scale(name: str, sf, batch: int, mn: int, k: int, gran_mn: int, gran_k: int,
                   device: torch.device) -> torch.Tensor:
    """The scale as (batch, ceil(mn/gran_mn), ceil(k/gran_k)); any tensor with that many elements
    is accepted (per-tensor: one element, or one per batch when batch > 1)."""
    checks.tensor(name, sf, dtypes=(torch.float32,), device=device)
    full = (batch, blocks(mn, gran_mn), blocks(k, gran_k))
    if sf.numel() == batch * full[1] * full[2]:
        return sf.reshape(full)
    if full[1] == full[2] == 1 and sf.numel() == 1:
        return sf.reshape(1, 1, 1).expand(full)
    raise checks.ArgumentError(f"{name}: expected {full[0] * full[1] * full[2]} scales (batch, ceil(mn/{gran_mn}), "
                               f"ceil(k/{gran_k})) = {full}, got shape {tuple(sf.shape)}")


@mate_api(name="gemm.bmm_fp8")
def bmm_fp8(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype,
            out=None, backend: str = "auto", scale_granularity_mnk=None, output_scale=None, c=None,
            major_a_mode="K", major_b_mode="K") -> torch.Tensor:
    """out[i] = dequant(A[i]) @ dequant(B[i])^T (+ c[i]): A (batch, m, k) ("K") or (batch, k, m)
    ("M"); B (batch, n, k) ("K") or (batch, k, n) ("N"); scales follow scale_granularity_mnk in
    the logical (batch, m-or-n blocks, k blocks) order."""
    checks.tensor("a", a, dtypes=FP8_DTYPES, ndim=3)
    device = a.device
    checks.tensor("b", b, dtypes=FP8_DTYPES, ndim=3, device=device)
    major("a", a, major_a_mode, {"K": -1, "M": -1}, "major_a_mode")
    major("b", b, major_b_mode, {"K": -1, "N": -1}, "major_b_mode")
    a_mk = a if major_a_mode == "K" else a.transpose(1, 2)
    b_nk = b if major_b_mode == "K" else b.transpose(1, 2)
    batch, m, k = a_mk.shape
    if b_nk.shape[0] != batch or b_nk.shape[2] != k:
        raise checks.ArgumentError(f"b: expected batch {batch} and K {k} (major_b_mode={major_b_mode!r}), "
                                   f"got shape {tuple(b.shape)}")
    n = b_nk.shape[1]
    gm, gn, gk = granularity(scale_granularity_mnk, (-1, -1, -1))
    require_granularity((gm, gn, gk), ((-1, -1, -1), (1, -1, -1), (1, 128, 128), (1, 1, 128)))
    # (1, -1, -1): one scale per row of A (per token), one per batch for B.
    sfa = _batched_scale("a_scale", a_scale, batch, m, k, gm, gk, device)
    sfb = _batched_scale("b_scale", b_scale, batch, n, k, gn, gk, device)
    _check_output_scale(output_scale, device)
    accepted = _out_dtypes(output_scale, HALF_DTYPES + (torch.float32,))
    checks.dtype_choice("out_dtype", out_dtype, accepted)
    out = _batched_out_and_accumulator(out, c, (batch, m, n), out_dtype, device)
    variant = _gemm_api.fp8_dense_variant(major_a_mode, major_b_mode, out_dtype, (gm, gn, gk), c is not None, n,
                                          _ab_dtype(a, b))
    choice = resolve_backend(backend, gemm_support.FP8_GEMM, variant, device)
    if choice == "tilelang" and batch and m and n:
        # The batches are the groups of the masked M-grouped kernel, each with all m rows.
        masked_m = torch.full((batch,), m, dtype=torch.int32, device=device)
        call_op(torch.ops.mate.gemm_m_grouped_masked, _gemm_api._gemm_m_grouped_masked, a_mk, b_nk, out, masked_m,
                sfa, sfb, gn)
        return out
    result = reference.gemm_nt(a_mk, b_nk, c, sfa=sfa, sfb=sfb, gran_a=(span(m, gm), span(k, gk)),
                               gran_b=(span(n, gn), span(k, gk)), out_dtype=torch.float32)
    out.copy_(result if output_scale is None else quantize_output(result, output_scale))
    return out


@mate_api(name="gemm.bmm_fp16")
def bmm_fp16(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, out=None, backend: str = "auto",
             c=None) -> torch.Tensor:
    """out[i] = A[i] @ B[i] (+ c[i]) like torch.bmm: a (batch, m, k), b (batch, k, n), fp16 or bf16
    (the same dtype); c float32 (batch, m, n)."""
    checks.tensor("a", a, dtypes=HALF_DTYPES, ndim=3)
    device = a.device
    checks.tensor("b", b, dtypes=(a.dtype,), ndim=3, device=device)
    batch, m, k = a.shape
    if b.shape[0] != batch or b.shape[1] != k:
        raise checks.ArgumentError(f"b: expected shape ({batch}, {k}, n) (batch, k, n), got {tuple(b.shape)}")
    n = b.shape[2]
    checks.dtype_choice("out_dtype", out_dtype, HALF_DTYPES + (torch.float32,))
    out = _batched_out_and_accumulator(out, c, (batch, m, n), out_dtype, device)
    # With c, the kernel accumulates into a float32 output (a 16-bit out is rounded from it).
    variant = bf16_launch.variant(a.dtype, bf16_launch.major_of(a), bf16_launch.major_of(b.transpose(1, 2)),
                                  torch.float32 if c is not None else out_dtype, c is not None, n, k)
    choice = resolve_backend(backend, gemm_support.BF16_GEMM, variant, device)
    if choice == "tilelang" and batch and m and n:
        op = gemm_support.BF16_GEMM
        if k == 0 and c is not None:
            out.copy_(c)
        elif k == 0:
            out.zero_()
        elif c is None:
            bf16_launch.gemm(op.name, op.build, a, b.transpose(1, 2), out)
        else:  # the kernel adds what its float32 output holds; a 16-bit out gets the rounded sum
            acc = out if out_dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=device)
            if acc.data_ptr() != c.data_ptr():
                acc.copy_(c)
            bf16_launch.gemm(op.name, op.build, a, b.transpose(1, 2), acc, accumulate=True)
            if acc is not out:
                out.copy_(acc)
        return out
    out.copy_(reference.gemm_nt(a, b.transpose(1, 2), c, out_dtype=torch.float32))
    return out
