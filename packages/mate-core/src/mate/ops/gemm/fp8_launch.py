"""Host side of the TileLang FP8 GEMM (:mod:`mate.ops.gemm.fp8_kernel`): operand views, the
kernel variant, the launch. No host sync: everything here reads metadata only, so the calls can
be captured in CUDA graphs.

The callers (the torch.library ops in :mod:`mate.ops.gemm.api`) have checked shapes, dtypes and
the recipe; here the operands are brought to the layouts the kernel reads (TMA: 16-byte aligned
base addresses and strides):

* A, B contiguous K-major (a copy only when they are not);
* A's scales MN-major with the M stride padded to 16 bytes (DeepGEMM's required layout,
  :func:`mate.ops.gemm.layouts.get_mn_major_tma_aligned_tensor`: a no-op when the caller already
  passes that layout, one small transposing copy otherwise);
* B's scales row-major.
"""

from __future__ import annotations

import torch

from mate import jit, platform
from mate.ops.gemm import layouts

_dummy_aux: dict[torch.device, torch.Tensor] = {}


SMALL_M = 128  # dense calls with M <= SMALL_M are weight-bandwidth-bound: tiles chosen to fill the SMs
# Tile buckets (one compile each) as (block_m, block_n), and the compute-bound tiles' measured
# throughput per SM relative to 128 x 128 (H100, M = 4096: 128 x 256 tiles 1.20-1.27x faster, as
# they read A from L2 half as often; benchmarks/PERFORMANCE.md "gemm").
TILE_SHAPES = {"m128n256": (128, 256), "m128n128": (128, 128), "m64n128": (64, 128), "m64n64": (64, 64)}
TILE_SPEED = {"m128n128": 1.0, "m128n256": 1.2}
FILL = 0.75  # small M: the largest tile that still puts FILL x SMs blocks in flight


def tile_for(m: int, n: int, layout: str, sms: int = 132, groups: int = 1) -> str:
    """The tile bucket of a call. `m` is the rows per group (masked: the static M_max), `groups`
    the groups of a masked call.

    * Dense M <= SMALL_M (weight-bandwidth-bound): the largest tile of at most M rows (rounded up
      to 64) whose block count reaches FILL x the SMs, else the one with the most blocks (measured
      at M = 64 and 128 on five DeepSeek-V3 shapes, this picks the fastest of 64x64, 64x128 and
      128x128 in all 10 cases).
    * Otherwise (compute-bound; the M-grouped layouts always, with their 128-row blocks): 128 x 128
      or 128 x 256, whichever finishes first counting whole waves over the SMs: waves x tile
      area / the tile's measured speed (DeepGEMM's heuristic in spirit)."""
    if layout == "dense" and m <= SMALL_M:
        shapes = [(t, bm, bn) for t, (bm, bn) in TILE_SHAPES.items() if bm <= -(-m // 64) * 64]
        counts = {t: -(-m // bm) * -(-n // bn) for t, bm, bn in shapes}
        for t, _, _ in shapes:  # largest tile first
            if counts[t] >= FILL * sms:
                return t
        return max(shapes, key=lambda s: (counts[s[0]], -s[1] * s[2]))[0]
    best, best_cost = None, None
    for tile in ("m128n128", "m128n256"):
        bm, bn = TILE_SHAPES[tile]
        tiles = groups * -(-m // bm) * -(-n // bn)
        cost = -(-tiles // sms) * bm * bn / TILE_SPEED[tile]
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = tile, cost
    return best


def kernel_variant(n: int, k: int, layout: str, tile: str = "m128n128") -> dict:
    """The compile-time key: the weight shape (n, k) and the layout (M is dynamic), with the values
    of the support matrix's features the kernel has (so it is also a supported dispatch variant)."""
    variant = {"ab_dtype": torch.float8_e4m3fn, "major_a": "K", "major_b": "K", "out_dtype": torch.bfloat16,
               "recipe": (1, 128, 128), "n_multiple_of_8": True, "n": int(n), "k": int(k), "layout": layout,
               "tile": tile}
    variant.update({"accumulate": False} if layout == "dense" else {"psum": False})
    return variant


def _sms(device: torch.device) -> int:
    return platform.device_info(device).multiprocessors


def _kernel(op_name: str, build, n: int, k: int, layout: str, device: torch.device, tile: str = "m128n128"):
    target = platform.device_info(device).tilelang_target
    return jit.get_kernel(op_name, kernel_variant(n, k, layout, tile), target, build)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t if t.is_contiguous() else t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _sfa_view(sfa: torch.Tensor) -> torch.Tensor:
    """(..., M, KB) float32 -> the kernel's (G, KB, M) view of the MN-major TMA-aligned layout."""
    sf = layouts.get_mn_major_tma_aligned_tensor(sfa)
    view = (sf if sf.dim() == 3 else sf.unsqueeze(0)).transpose(1, 2)
    groups, kb, mn = view.shape
    if groups == 1 and view.stride(2) == 1:
        # A lone group's stride is never used, but TMA wants every stride 16-byte aligned.
        view = view.as_strided(view.shape, (-(-view.stride(1) * kb // 4) * 4, view.stride(1), 1))
    if view.stride(2) != 1 or view.stride(1) % 4 or view.data_ptr() % 16 or (groups > 1 and view.stride(0) % 4):
        # Degenerate shapes (M == 1 or one K block) keep other strides; TMA needs these.
        aligned = layouts.get_tma_aligned_size(mn, 4)
        fresh = torch.empty_strided((groups, kb, mn), (aligned * kb, aligned, 1), dtype=sf.dtype, device=sf.device)
        fresh.copy_(view)
        view = fresh
    return view


def _aux_placeholder(device: torch.device) -> torch.Tensor:
    aux = _dummy_aux.get(device)
    if aux is None:
        aux = _dummy_aux[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return aux


def _fits_int32(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.numel() >= 2**31:
            raise NotImplementedError(f"the FP8 GEMM kernel indexes with 32-bit integers; a tensor of shape "
                                      f"{tuple(t.shape)} has {t.numel()} elements (at most 2**31 - 1 supported)")


def fp8_gemm_nt(op_name: str, build, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                d: torch.Tensor) -> None:
    """d (M, N) bf16 = A (M, K) . B (N, K)^T with (1, 128) / (128, 128) float32 scales."""
    m, k = a.shape
    n = b.shape[0]
    _fits_int32(a, b, d)
    kernel = _kernel(op_name, build, n, k, "dense", a.device, tile_for(m, n, "dense", _sms(a.device)))
    out = d if d.is_contiguous() and d.data_ptr() % 16 == 0 else torch.empty(d.shape, dtype=d.dtype, device=d.device)
    kernel(_aligned(a).unsqueeze(0), _aligned(b).unsqueeze(0), out.unsqueeze(0), _sfa_view(sfa),
           _aligned(sfb).unsqueeze(0), _aux_placeholder(a.device))
    if out is not d:
        d.copy_(out)


def m_grouped_contiguous(op_name: str, build, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor,
                         sfb: torch.Tensor, d: torch.Tensor, m_indices: torch.Tensor) -> None:
    """d (M, N) = each 128-row block of A times B[its expert]^T; rows of expert -1 are zero.
    b (G, N, K), sfb (G, N/128, K/128), m_indices (M,) int32."""
    m, k = a.shape
    n = b.shape[1]
    _fits_int32(a, b, d)
    kernel = _kernel(op_name, build, n, k, "contiguous", a.device, tile_for(m, n, "contiguous", _sms(a.device)))
    out = d if d.is_contiguous() and d.data_ptr() % 16 == 0 else torch.empty(d.shape, dtype=d.dtype, device=d.device)
    kernel(_aligned(a).unsqueeze(0), _aligned(b), out.unsqueeze(0), _sfa_view(sfa), _aligned(sfb),
           _aligned(m_indices))
    if out is not d:
        d.copy_(out)


def m_grouped_masked(op_name: str, build, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                     d: torch.Tensor, masked_m: torch.Tensor) -> None:
    """d[g, :masked_m[g]] = A[g, :masked_m[g]] . B[g]^T; other rows of d are not written.
    a (G, M_max, K), sfa (G, M_max, K/128), b (G, N, K), sfb (G, N/128, K/128)."""
    groups, max_m, k = a.shape
    n = b.shape[1]
    _fits_int32(a, b, d)
    kernel = _kernel(op_name, build, n, k, "masked", a.device, tile_for(max_m, n, "masked", _sms(a.device), groups))
    if not (d.is_contiguous() and d.data_ptr() % 16 == 0):
        out = d.contiguous()
        kernel(_aligned(a), _aligned(b), out, _sfa_view(sfa), _aligned(sfb), _aligned(masked_m))
        d.copy_(out)
        return
    kernel(_aligned(a), _aligned(b), d, _sfa_view(sfa), _aligned(sfb), _aligned(masked_m))
