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

import functools

import torch

from mate import constants, jit, platform
from mate.ops.gemm import layouts

_split_flags: dict[tuple[torch.device, torch.Stream], torch.Tensor] = {}

SMALL_M = 128  # dense calls with M <= SMALL_M are weight-bandwidth-bound: tiles chosen to fill the SMs
# The compute-bound tiles' measured throughput per SM relative to 128 x 128 (H100, M = 4096: 128 x 256
# tiles 1.20-1.27x faster, as they read A from L2 half as often; 128 x 192 as fast as 128 x 256 where
# both fill their waves (24576 x 1536), counted lower so that it is taken only where the waves call for
# it, as at N = 2112: 1.2x 128 x 128 there; benchmarks/PERFORMANCE.md "gemm").
TILE_SPEED = {"m128n128": 1.0, "m128n192": 1.1, "m128n256": 1.2}
# K <= SHORT_K (a few K blocks a tile, the epilogue's share large): 128 x 192 tiles, whose 4-stage ring runs
# deeper through the epilogue than 128 x 256's 3 stages. H100, TFLOP/s, 128 x 256 / 128 x 192 / 128 x 128:
# 4096 x 32768 x 512 864 / 918 / 865, M = 8192 881 / 938 / 876; at K = 1536 and 2048 128 x 256 stays
# faster (1177 / 1144 / 1084, 1190 / 1100 / 1085).
SHORT_K = 512
# Small-M tile buckets (split-K ones included) that tile_for chooses among. The persistent kernel's (p*, one
# tile per CTA here) stream the B scales through the producer instead of a prologue before the first load, and
# its 192-wide tiles put 128 CTAs on N = 24576 where 256-wide ones put 96. H100, against the one-CTA-per-tile
# kernel's tiles: M = 128 7168 x 16384 52.0 -> 48.9 us, 7168 x 2048 10.6 -> 10.2, 32768 x 512 13.5 -> 13.2,
# 24576 x 1536 21.9 -> 20.9; M = 64 (64-row tiles) 48.5 -> 46.9, 9.7 -> 9.2, 11.4 -> 11.1, 21.1 -> 19.2.
SMALL_M_TILES = ("m128n256", "m128n128", "m64n256", "m64n128", "m128n64s2", "m128n64s4", "m128n64s8", "m64n64s2",
                 "m64n64s4", "m64n64s8", "p128n256", "p128n192", "p128n64", "p64n256", "p64n192", "p64n64")
SPLIT_FLAGS = 1 << 14  # split-K tile counters per (device, stream); more tiles than this are not split


def _tile_shape(tile: str, k: int) -> tuple[int, int, int]:
    """(block_m, block_n, K splits) of a tile bucket for K = k (the kernel module imports TileLang,
    hence the late import)."""
    from mate.ops.gemm import fp8_kernel

    cfg = fp8_kernel.TILES[tile]
    return cfg["block_m"], cfg["block_n"], fp8_kernel.k_splits(k, cfg.get("splits", 1))


@functools.lru_cache(maxsize=4096)  # on every call's path; scoring the small-M buckets takes ~30 us
def tile_for(m: int, n: int, k: int, layout: str, sms: int = 132, groups: int = 1) -> str:
    """The tile bucket of a call. `m` is the rows per group (masked: the static M_max), `groups`
    the groups of a masked call.

    * Dense M <= SMALL_M (weight-bandwidth-bound): among SMALL_M_TILES of at most M rows (rounded
      up to 64), the one with the most blocks (K splits included) that still fit in one wave over
      the SMs, ties to the taller tile (B read once), then to fewer splits, then to the persistent
      kernel; if none fits, the one with the fewest blocks (one-CTA-per-tile kernel on ties).
      Measured at M = 64 and 128 on the six DeepSeek-V3 shapes against 6 to 18 candidate tiles
      each, this picks the fastest in 11 of 12 cases (the 12th within 3%); the persistent tiles
      were measured against the rule's earlier picks (SMALL_M_TILES).
    * Otherwise (compute-bound; the M-grouped layouts always, with their 128-row blocks): 128 x 128,
      128 x 192 or 128 x 256, whichever finishes first counting whole waves over the SMs: waves x tile
      area / the tile's measured speed (DeepGEMM's heuristic in spirit), run by the persistent
      kernel (p128n*; H100: 1.04-1.24x the one-CTA-per-tile kernel on DeepGEMM's grouped shapes,
      1.09x on dense 4096 x 7168 x 16384; benchmarks/PERFORMANCE.md "gemm"); 128 x 192 for
      K <= SHORT_K."""
    if layout == "dense" and m <= SMALL_M:
        rows = -(-m // 64) * 64
        keys = {}  # tile -> (blocks, block_m, -splits, persistent)
        for tile in SMALL_M_TILES:
            bm, bn, splits = _tile_shape(tile, k)
            tiles = -(-m // bm) * -(-n // bn)
            if bm <= rows and (splits == 1 or tiles <= SPLIT_FLAGS):
                keys[tile] = (tiles * splits, bm, -splits, tile.startswith("p"))
        fitting = [tile for tile, key in keys.items() if key[0] <= sms]
        if fitting:
            return max(fitting, key=keys.get)
        return min(keys, key=lambda tile: (keys[tile][0], -keys[tile][1], -keys[tile][2]))
    if k <= SHORT_K:
        return "p128n192"
    best, best_cost = None, None
    for tile in TILE_SPEED:
        bm, bn, _ = _tile_shape("p" + tile[1:], k)
        tiles = groups * -(-m // bm) * -(-n // bn)
        cost = -(-tiles // sms) * bm * bn / TILE_SPEED[tile]
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = tile, cost
    return "p" + best[1:]


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


def _fits_int32(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.numel() >= 2**31:
            raise NotImplementedError(f"the FP8 GEMM kernel indexes with 32-bit integers; a tensor of shape "
                                      f"{tuple(t.shape)} has {t.numel()} elements (at most 2**31 - 1 supported)")


def _split_args(m: int, n: int, tile_shape: tuple[int, int, int], device: torch.device) -> list[torch.Tensor]:
    """The split-K kernel's extra arguments: the fp32 partial-tile workspace (whole tiles) and the
    tile counters of the current stream (zeroed once; every call leaves them zero). The cluster
    form (CLUSTER_SPLITS) reads neither: it gets a one-row workspace."""
    from mate.ops.gemm import fp8_kernel

    bm, bn, splits = tile_shape
    rows = 1 if splits == fp8_kernel.CLUSTER_SPLITS else -(-m // bm) * bm
    ws = torch.empty((splits, rows, -(-n // bn) * bn), dtype=torch.float32, device=device)
    key = (device, torch.get_device_module(device.type).current_stream(device))
    flags = _split_flags.get(key)
    if flags is None:
        flags = _split_flags[key] = torch.zeros(SPLIT_FLAGS, dtype=torch.int32, device=device)
    return [ws, flags]


def _persistent_args(tile: str, rows: int, n: int, k: int, device: torch.device, groups: int = 1) -> list[int]:
    """The persistent kernel's `ctas`: one CTA per SM, or per tile where there are fewer (counting
    `groups` x `rows` rows; masked: every row of every group, an upper bound of the live tiles).
    Empty for the other kernels."""
    if not tile.startswith("p"):
        return []
    bm, bn, _ = _tile_shape(tile, k)
    return [max(1, min(_sms(device), groups * -(-rows // bm) * -(-n // bn)))]


def fp8_gemm_nt(op_name: str, build, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                d: torch.Tensor) -> None:
    """d (M, N) bf16 = A (M, K) . B (N, K)^T with (1, 128) / (128, 128) float32 scales."""
    m, k = a.shape
    n = b.shape[0]
    _fits_int32(a, b, d)
    tile = tile_for(m, n, k, "dense", _sms(a.device))
    kernel = _kernel(op_name, build, n, k, "dense", a.device, tile)
    out = d if d.is_contiguous() and d.data_ptr() % 16 == 0 else torch.empty(d.shape, dtype=d.dtype, device=d.device)
    args = [_aligned(a).unsqueeze(0), _aligned(b).unsqueeze(0), out.unsqueeze(0), _sfa_view(sfa),
            _aligned(sfb).unsqueeze(0), constants.zeros(1, a.device)]
    shape = _tile_shape(tile, k)
    args += _persistent_args(tile, m, n, k, a.device)
    kernel(*args, *(_split_args(m, n, shape, a.device) if shape[2] > 1 else ()))
    if out is not d:
        d.copy_(out)


def m_grouped_contiguous(op_name: str, build, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor,
                         sfb: torch.Tensor, d: torch.Tensor, m_indices: torch.Tensor) -> None:
    """d (M, N) = each 128-row block of A times B[its expert]^T; rows of expert -1 are zero.
    b (G, N, K), sfb (G, N/128, K/128), m_indices (M,) int32."""
    m, k = a.shape
    n = b.shape[1]
    _fits_int32(a, b, d)
    tile = tile_for(m, n, k, "contiguous", _sms(a.device))
    kernel = _kernel(op_name, build, n, k, "contiguous", a.device, tile)
    out = d if d.is_contiguous() and d.data_ptr() % 16 == 0 else torch.empty(d.shape, dtype=d.dtype, device=d.device)
    kernel(_aligned(a).unsqueeze(0), _aligned(b), out.unsqueeze(0), _sfa_view(sfa), _aligned(sfb),
           _aligned(m_indices), *_persistent_args(tile, m, n, k, a.device))
    if out is not d:
        d.copy_(out)


def m_grouped_masked(op_name: str, build, a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                     d: torch.Tensor, masked_m: torch.Tensor) -> None:
    """d[g, :masked_m[g]] = A[g, :masked_m[g]] . B[g]^T; other rows of d are not written.
    a (G, M_max, K), sfa (G, M_max, K/128), b (G, N, K), sfb (G, N/128, K/128)."""
    groups, max_m, k = a.shape
    n = b.shape[1]
    _fits_int32(a, b, d)
    tile = tile_for(max_m, n, k, "masked", _sms(a.device), groups)
    kernel = _kernel(op_name, build, n, k, "masked", a.device, tile)
    extra = _persistent_args(tile, max_m, n, k, a.device, groups)
    if not (d.is_contiguous() and d.data_ptr() % 16 == 0):
        out = d.contiguous()
        kernel(_aligned(a), _aligned(b), out, _sfa_view(sfa), _aligned(sfb), _aligned(masked_m), *extra)
        d.copy_(out)
        return
    kernel(_aligned(a), _aligned(b), d, _sfa_view(sfa), _aligned(sfb), _aligned(masked_m), *extra)
