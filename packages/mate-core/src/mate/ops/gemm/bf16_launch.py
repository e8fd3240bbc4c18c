"""Host side of the TileLang BF16 / FP16 GEMM (:mod:`mate.ops.gemm.bf16_kernel`): operand
views, the kernel variant and tile, the launch. No host sync (CUDA-graph capturable).

The kernel reads A as (G, M, K) or (G, K, M) and B as (G, N, K) or (G, K, N), whichever is how
the caller's tensor is stored, so DeepGEMM's nt / nn / tn / tt layouts and torch.bmm's (batch,
k, n) B need no copy. A copy is made only when an operand is neither (a strided view) or when
A is stored M-major with M not a multiple of 8 (TMA wants 16-byte aligned strides).

Accumulation (DeepGEMM's C): the kernel adds what D holds on entry, so the callers copy C into D
first unless C is D (as DeepGEMM does).
"""

from __future__ import annotations

import torch

from mate import constants, jit, platform

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
FILL = 0.75
# Large tiles and their throughput per SM relative to 128 x 256, measured on H100 at M = 4096 where
# the waves are full (benchmarks/PERFORMANCE.md "gemm"): 128 x 192 0.89-1.0x, 128 x 128 0.85-0.86x
# (more L2 bytes per FLOP).
TILE_SPEED = {"m128n256": 1.0, "m128n192": 0.9, "m128n128": 0.85}
PERSISTENT = {"m128n256": "p128n256", "m128n128": "p128n128"}  # bf16_kernel.persistent_kernel's tiles
# Short K loops spend a larger share on each tile's epilogue; 128 x 128 tiles (a smaller staging tile,
# a deeper ring) measured faster for K in SHORT_K (H100, TFLOP/s, 128 x 256 -> 128 x 128: bmm 64 x 1024^3
# 659 -> 680, 32 x 2048 x 512 x 2048 625 -> 636, dense 4096 x 32768 x 512 565 -> 622), the same at K = 1536
# and slower at K = 2048 (746 -> 729), 4096 (766 -> 701) and 128 (bmm 128 x 512 x 128 x 512: 41 -> 44 us,
# where twice the tiles cost more than the deeper ring gains).
SHORT_K = (512, 1024)


def tile_for(m: int, n: int, k: int, groups: int, sms: int, persistent: bool = False) -> str:
    """64 x 128 for small M with few blocks (weight-bandwidth-bound); otherwise the 128-row tile
    that finishes first counting whole waves over the SMs: waves x block_n / the tile's speed
    (128 x 192 fills the waves of N = 2112 where 128 x 256 leaves 2.2 waves). With `persistent`
    (the dense layout, a 16-bit D, no accumulator) the 128 x 256 and 128 x 128 tiles run in the
    persistent kernel (H100: 1.0-1.25x the one-CTA-per-tile kernel; 128 x 192 stays, for N = 2112
    it measured 173 us against 205-219 us persistent), and K in SHORT_K takes 128 x 128 tiles."""
    if m <= 64 and groups * -(-n // 128) < FILL * sms:
        return "m64n128"
    if persistent and SHORT_K[0] <= k <= SHORT_K[1]:
        return "p128n128"
    best, best_cost = None, None
    for tile, speed in TILE_SPEED.items():
        bn = int(tile.split("n")[-1])
        tiles = groups * -(-m // 128) * -(-n // bn)
        cost = -(-tiles // sms) * bn / speed
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = tile, cost
    return PERSISTENT.get(best, best) if persistent else best


def ctas(tile: str, m: int, n: int, groups: int, sms: int) -> int:
    """The persistent kernel's CTA count: one per SM, or per tile where there are fewer."""
    bn = int(tile.split("n")[-1])
    return max(1, min(sms, groups * -(-m // 128) * -(-n // bn)))


def variant(ab_dtype: torch.dtype, major_a: str, major_b: str, out_dtype: torch.dtype, accumulate: bool,
            n: int, k: int) -> dict:
    """The dispatch variant of a dense GEMM (gemm_support.BF16_GEMM's features)."""
    return {"ab_dtype": ab_dtype, "major_a": major_a, "major_b": major_b, "out_dtype": out_dtype,
            "accumulate": bool(accumulate), "n_multiple_of_8": n % 8 == 0, "k_multiple_of_8": k % 8 == 0}


def m_grouped_variant(layout: str, major_b: str, out_dtype: torch.dtype, psum: bool, n: int, k: int,
                      ab_dtype: torch.dtype = torch.bfloat16) -> dict:
    """The dispatch variant of an M-grouped GEMM (gemm_support.M_GROUPED_BF16_GEMM's features)."""
    return {"layout": layout, "ab_dtype": ab_dtype, "major_a": "K", "major_b": major_b, "out_dtype": out_dtype,
            "psum": bool(psum), "n_multiple_of_8": n % 8 == 0, "k_multiple_of_8": k % 8 == 0}


def k_grouped_variant(major_a: str, major_b: str, out_dtype: torch.dtype, psum: bool, m: int, n: int,
                      ab_dtype: torch.dtype = torch.bfloat16) -> dict:
    """The dispatch variant of a K-grouped GEMM (gemm_support.K_GROUPED_BF16_GEMM's features)."""
    return {"ab_dtype": ab_dtype, "major_a": major_a, "major_b": major_b, "out_dtype": out_dtype,
            "psum": bool(psum), "mn_multiple_of_8": m % 8 == 0 and n % 8 == 0}


def major_of(t: torch.Tensor) -> str:
    """"MN" when the rows dimension (the one before K) is the contiguous one, else "K" (any other
    stride pattern is copied to K-major by the launch)."""
    return "MN" if t.stride(-1) != 1 and t.stride(-2) == 1 and t.shape[-1] > 1 else "K"


def _packed(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def _operand(t: torch.Tensor, rows_aligned: bool) -> tuple[torch.Tensor, str]:
    """(G, rows, K) logical -> the tensor the kernel reads and its major ("K": (G, rows, K),
    "MN": (G, K, rows))."""
    if _packed(t):
        return t, "K"
    tt = t.transpose(1, 2)
    if rows_aligned and _packed(tt):
        return tt, "MN"
    if rows_aligned and t.stride(1) == 1:
        return tt.contiguous(), "MN"
    return t.contiguous() if t.data_ptr() % 16 == 0 or not t.is_contiguous() else t.clone(), "K"


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t if t.is_contiguous() else t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _fits_int32(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.numel() >= 2**31:
            raise NotImplementedError(f"the BF16 GEMM kernel indexes with 32-bit integers; a tensor of shape "
                                      f"{tuple(t.shape)} has {t.numel()} elements (at most 2**31 - 1 supported)")


def _launch(op_name: str, build, key: dict, m: int, n: int, groups: int, a, b, d, aux, keep: bool) -> None:
    """Pick the tile, get the kernel of `key` and run it on d. A strided d is staged through a
    packed copy; with `keep` (the kernel adds to D or leaves some of its rows) the copy carries
    D's values in."""
    info = platform.device_info(a.device)
    sms = info.multiprocessors
    persistent = key["layout"] == "dense" and not key["accumulate"] and key["out_dtype"] != torch.float32
    tile = tile_for(m, n, key["k"], groups, sms, persistent)
    kernel = jit.get_kernel(op_name, dict(key, n=int(n), tile=tile), info.tilelang_target, build)
    out = d if _packed(d) else (d.contiguous() if keep else torch.empty(d.shape, dtype=d.dtype, device=d.device))
    kernel(a, b, out, aux, *((ctas(tile, m, n, groups, sms),) if tile.startswith("p") else ()))
    if out is not d:
        d.copy_(out)


def gemm(op_name: str, build, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, accumulate: bool = False) -> None:
    """d (G, M, N) (+)= A (G, M, K) . B (G, N, K)^T per group; 2-D operands are one group. A and B
    are logical views (any major); d row-major, holding C when `accumulate`."""
    if a.dim() == 2:
        a, b, d = a.unsqueeze(0), b.unsqueeze(0), d.unsqueeze(0)
    groups, m, k = a.shape
    n = b.shape[1]
    _fits_int32(a, b, d)
    a_k, major_a = _operand(a, m % 8 == 0)
    b_k, major_b = _operand(b, True)
    key = variant(a.dtype, major_a, major_b, d.dtype, accumulate, n, k)
    key.update(k=int(k), layout="dense")
    _launch(op_name, build, key, m, n, groups, a_k, b_k, d, constants.zeros(1, a.device), accumulate)


def m_grouped_contiguous(op_name: str, build, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                         grouped_layout: torch.Tensor, psum: bool = False) -> None:
    """d (M, N) = each 128-row block of A (M, K) times B[its expert]^T, b (G, N, K) any major.
    grouped_layout is each row's expert (-1: padding) or, with `psum`, each expert's end row
    (expert g starts at end[g - 1] rounded up to 128); rows of no expert are zero. The kernel
    reads the expert of each block's first row (groups padded to 128 rows, DeepGEMM's contract;
    not checked here, which would need a host sync)."""
    m, k = a.shape
    n = b.shape[1]
    _fits_int32(a, b, d)
    b_k, major_b = _operand(b, True)
    key = m_grouped_variant("contiguous", major_b, d.dtype, psum, n, k, a.dtype)
    key.update(k=int(k), layout="psum" if psum else "contiguous")
    _launch(op_name, build, key, m, n, 1, _aligned(a).unsqueeze(0), b_k, d.unsqueeze(0), _aligned(grouped_layout),
            False)


def m_grouped_masked(op_name: str, build, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                     masked_m: torch.Tensor) -> None:
    """d[g, :masked_m[g]] = A[g, :masked_m[g]] . B[g]^T; other rows of d are not written. No host
    sync (CUDA-graph capturable): the kernel clamps masked_m to [0, max_m]."""
    groups, max_m, k = a.shape
    n = b.shape[1]
    _fits_int32(a, b, d)
    b_k, major_b = _operand(b, True)
    key = m_grouped_variant("masked", major_b, d.dtype, False, n, k, a.dtype)
    key.update(k=int(k))
    _launch(op_name, build, key, max_m, n, groups, _aligned(a), b_k, d, _aligned(masked_m), True)


def k_grouped(op_name: str, build, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, ks: torch.Tensor) -> None:
    """d[g] += A_g^T . B_g for the groups' K ranges stacked along the rows of a (ΣK, M) and
    b (ΣK, N) (MN-major, contiguous); ks (G,) int32 on the device holds each group's K (multiples
    of 128; the kernel takes the prefix sums). d (G, M, N) float32 holds C on entry."""
    m, n = a.shape[1], b.shape[1]
    _fits_int32(a, b, d)
    key = k_grouped_variant("MN", "MN", d.dtype, False, m, n, a.dtype)
    key.update(k=0, layout="k_grouped", accumulate=True)
    _launch(op_name, build, key, m, n, d.shape[0], _aligned(a).unsqueeze(0), _aligned(b).unsqueeze(0), d,
            _aligned(ks), True)
