"""TileLang FP8 e4m3 block-scaled GEMM for Hopper (sm_90a), DeepGEMM's SM90 recipe.

    D[m, n] = sum over 128-wide K blocks kb of
              (sum_{k in kb} A[m, k] * B[n, k]) * SFA[m, kb] * SFB[n // 128, kb]

A and B are float8_e4m3fn, K-major; SFA float32 per token and 128 channels; SFB float32 per
128 x 128 block of B; D bfloat16. The scales are applied in fp32 "promotion" as DeepGEMM does:
each K block's product goes into a fresh fp32 wgmma accumulator (`partial`), which is then
added into the running fp32 accumulator times the row's A scale and the block's B scale.

One prim_func serves three layouts (the static `layout` argument), with every operand 3-D
(group, rows, cols) so that the core is shared:

* ``dense``       A (1, M, K), B (1, N, K), D (1, M, N); M is dynamic.
* ``contiguous``  A (1, M, K) with the rows of all experts stacked, B (G, N, K); `aux` (M,)
                  int32 holds each row's expert (-1: padding). Every 128-row block belongs to
                  one expert (the API checks the alignment), whose B the block multiplies; rows
                  of index -1 are written as zeros (a block of padding only multiplies expert 0's
                  weights and is zeroed).
* ``masked``      A (G, M_max, K), B (G, N, K), D (G, M_max, N); `aux` (G,) int32 holds masked_m.
                  The grid is sized from the static shapes (CUDA-graph capturable); blocks past
                  masked_m[g] exit at once (the persistent kernel counts the live tiles from
                  masked_m on the device instead), and only rows < masked_m[g] are stored.

Parameters of the prim_func, in order (shapes; the dynamic sizes are read from the tensors):

    a     float8_e4m3fn (GA, M, K)        contiguous
    b     float8_e4m3fn (GB, N, K)        contiguous
    d     bfloat16      (GA, M, N)        contiguous
    sfa   float32       (GA, K/128, M)    strides (sfa_sg, sfa_sk, 1): the MN-major scale layout
                                          (layouts.get_mn_major_tma_aligned_tensor) transposed;
                                          sfa_sk * 4 must be a multiple of 16 (TMA)
    sfb   float32       (GB, ceil(N/128), K/128) contiguous
    aux   int32         (L,)              m_indices (L = M), masked_m (L = G) or unused (dense)

N and K are compile-time constants (the weights' shape); M, GA, GB and the scale strides are
dynamic, so one compiled kernel serves every token count. Tiles: block_m 128 (two consumer
warpgroups of 64 rows) or 64 (one), block_n 16..128 inside one B scale block or 256 (two
128-column halves, `_wide_kernel`), block_k 128 (one scale block), a `num_stages` TMA ring fed by
a producer warpgroup (TileLang's warp specialization), and a swizzled rasterization of the
(N blocks, M blocks) grid for L2 reuse. Two variants add parameters after aux: `_split_kernel`
(dense split-K for small M: ws, flags) and `persistent_kernel` (every layout, the large-M path
and the unsplit small-M tiles: hand-written warp roles, at most one CTA per SM looping over the
tiles, masked walking only the tiles below masked_m: ctas). The host (fp8_launch.tile_for) picks the tile per call.
"""

from types import SimpleNamespace

import tilelang.language as T

from mate.ops.gemm.tiles import group_of, panel_tile, rows_of, store_tile

# (No `from __future__ import annotations`: the prim_func annotations must be evaluated eagerly.)

BLOCK_K = 128  # = the scale block along K
LAYOUTS = ("dense", "contiguous", "masked")
# Tile buckets (fp8_launch.tile_for picks one per call; measured on H100, benchmarks/PERFORMANCE.md):
# 128 x 256 for large M where it fills the waves (1.20-1.27x the 128 x 128 throughput), 128 x 128
# otherwise. Small M (weight-bandwidth-bound): the tile that puts the most blocks, up to one per SM,
# in flight, among 64- or 128-row tiles 64, 128, 192 or 256 wide (the persistent kernel's where it has
# them) and split-K (`splits`, `_split_kernel`) 64-wide ones where the N blocks alone are too few.
# 128 x 256 keeps 3 stages (4 do not fit beside the masked layout's staging tiles; 3 measured as fast as
# 4 for dense).
_M64 = {"block_m": 64, "threads": 128}
_M128 = {"block_m": 128, "threads": 256}
TILES = {"m128n128": {**_M128, "block_n": 128, "num_stages": 4},
         "m128n256": {**_M128, "block_n": 256, "num_stages": 3},
         "m64n256": {**_M64, "block_n": 256, "num_stages": 4},
         "m64n128": {**_M64, "block_n": 128, "num_stages": 6},
         "p128n256": {**_M128, "block_n": 256, "num_stages": 3, "persistent": True},
         "p128n192": {**_M128, "block_n": 192, "num_stages": 4, "persistent": True},
         "p128n128": {**_M128, "block_n": 128, "num_stages": 5, "persistent": True},
         "p128n64": {**_M128, "block_n": 64, "num_stages": 8, "persistent": True},
         "p64n256": {**_M64, "block_n": 256, "num_stages": 4, "persistent": True},
         "p64n192": {**_M64, "block_n": 192, "num_stages": 5, "persistent": True},
         "p64n64": {**_M64, "block_n": 64, "num_stages": 8, "persistent": True},
         **{f"m128n64s{s}": {**_M128, "block_n": 64, "num_stages": 6, "splits": s} for s in (2, 4, 8)},
         **{f"m64n64s{s}": {**_M64, "block_n": 64, "num_stages": 8, "splits": s} for s in (2, 4, 8)}}


FP8, ACC, OUT = "float8_e4m3fn", "float32", "bfloat16"
SPLIT_BARRIER = 8  # named barrier of the split-K fixup (TileLang's own syncs use lower ids)
CLUSTER_SPLITS = 2  # split-K with this many splits sums over a cluster (no workspace; see _split_kernel)

# Split-K over a cluster (see _split_kernel): a cluster-wide barrier (release / acquire), and the sum of the
# cluster's staged fp32 partial tiles over its CTAs (rank order) for this CTA's share of the rows, stored as
# bf16 to D (row-major, N columns; rows >= M and columns >= N skipped), 4 columns per thread and step.
_CLUSTER_SUM_SRC = r"""
#include <cstdint>
#include <cuda_bf16.h>
__device__ __forceinline__ void mate_cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
template <int BM, int BN, int S, int NT, int N>
__device__ __forceinline__ void mate_cluster_sum_store(void* partials, const void* out, int m0, int n0, int M,
                                                       int rank, int tid) {
  constexpr int ROWS = BM / S, C4 = BN / 4;
  __nv_bfloat16* d = reinterpret_cast<__nv_bfloat16*>(const_cast<void*>(out));
  uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(partials));
  uint32_t base[S];
#pragma unroll
  for (int s = 0; s < S; ++s) asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(base[s]) : "r"(local), "r"(s));
#pragma unroll 4
  for (int idx = tid; idx < ROWS * C4; idx += NT) {
    int r = rank * ROWS + idx / C4, c = idx % C4 * 4;
    float x = 0.f, y = 0.f, z = 0.f, w = 0.f;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      float a, b, e, f;
      asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(a), "=f"(b), "=f"(e), "=f"(f)
                   : "r"(base[s] + static_cast<uint32_t>((r * BN + c) * 4)));
      x += a; y += b; z += e; w += f;
    }
    if (m0 + r < M && n0 + c < N) {
      __nv_bfloat162 lo = __floats2bfloat162_rn(x, y), hi = __floats2bfloat162_rn(z, w);
      uint2 v;
      v.x = *reinterpret_cast<uint32_t*>(&lo);
      v.y = *reinterpret_cast<uint32_t*>(&hi);
      *reinterpret_cast<uint2*>(d + static_cast<int64_t>(m0 + r) * N + n0 + c) = v;
    }
  }
}
"""


def _signature(n: int, k: int) -> SimpleNamespace:
    """The parameters every kernel takes (the launch's contract; the split-K and persistent kernels
    add theirs after aux): A (groups_a, M, k) and B (groups_b, n, k) fp8, D (groups_a, M, n) bf16,
    A's scales MN-major with padded strides, B's 128 x 128 block scales, and the int32 layout
    vector aux (m_indices or masked_m)."""
    M, GA, GB, L = T.dynamic("M, GA, GB, L")
    sfa_sg, sfa_sk = T.dynamic("sfa_sg, sfa_sk")
    kb_count, nb_count = k // BLOCK_K, -(-n // 128)
    return SimpleNamespace(
        M=M, GA=GA,
        a=T.Tensor((GA, M, k), FP8), b=T.Tensor((GB, n, k), FP8), d=T.Tensor((GA, M, n), OUT),
        sfa=T.StridedTensor((GA, kb_count, M), (sfa_sg, sfa_sk, 1), ACC),
        sfb=T.Tensor((GB, nb_count, kb_count), ACC), aux=T.Tensor((L,), "int32"))


def default_config(n: int, k: int, layout: str) -> dict:
    """Tile configuration for a weight of shape (n, k)."""
    del k, layout
    return {"block_m": 128, "block_n": 128, "num_stages": 4, "threads": 256, "panel": 8}


def fp8_gemm_kernel(n: int, k: int, layout: str = "dense", *, block_m: int = 128, block_n: int = 128,
                    num_stages: int = 4, threads: int = 256, panel: int = 8, splits: int = 1,
                    persistent: bool = False):
    """Build the prim_func (not compiled) for weights of shape (n, k). `splits` > 1 (dense only):
    split-K over that many CTAs per tile (see `_split_kernel`); `persistent` (block_n 64, 128, 192
    or 256): `persistent_kernel`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if k <= 0 or k % BLOCK_K:
        raise ValueError(f"k must be a positive multiple of {BLOCK_K}, got {k}")
    if n <= 0 or n % 8:
        raise ValueError(f"n must be a positive multiple of 8 (16-byte rows of D), got {n}")
    if block_n not in (16, 32, 64, 128, 256) and not (persistent and block_n == 192):
        raise ValueError(f"block_n must be 16, 32, 64, 128 (inside one 128-row B scale block), 256 (two) or, "
                         f"persistent, 192, got {block_n}")
    if block_m not in (64, 128) or threads != 2 * block_m:
        raise ValueError("block_m must be 64 or 128 with one consumer warpgroup (128 threads) per 64 rows, got "
                         f"block_m {block_m}, threads {threads}")
    if splits < 1 or (splits > 1 and (layout != "dense" or block_n == 256)):
        raise ValueError(f"splits must be 1, or > 1 with the dense layout and block_n <= 128, got {splits} "
                         f"({layout}, block_n {block_n})")
    if persistent and (block_n not in (64, 128, 192, 256) or splits > 1):
        raise ValueError(f"persistent needs block_n 64, 128, 192 or 256 and no splits, got "
                         f"block_n {block_n}, splits {splits}")
    if persistent:
        return persistent_kernel(n, k, layout, block_m=block_m, block_n=block_n, num_stages=num_stages, panel=panel)
    if block_n == 256:
        return _wide_kernel(n, k, layout, block_m=block_m, num_stages=num_stages, threads=threads, panel=panel)
    parts = _narrow_parts(n, layout, block_m, block_n, num_stages)
    if k_splits(k, splits) > 1:
        return _split_kernel(n, k, parts, block_m=block_m, block_n=block_n, threads=threads, panel=panel,
                             splits=k_splits(k, splits))
    kb_count = k // BLOCK_K
    n_blocks = -(-n // block_n)

    sig = _signature(n, k)
    M, GA = sig.M, sig.GA

    @T.prim_func
    def fp8_gemm(a: sig.a, b: sig.b, d: sig.d, sfa: sig.sfa, sfb: sig.sfb, aux: sig.aux):
        with T.Kernel(n_blocks, T.ceildiv(M, block_m), GA, threads=threads) as (bx, by, bz):
            a_s = T.alloc_shared((block_m, BLOCK_K), FP8)
            b_s = T.alloc_shared((block_n, BLOCK_K), FP8)
            sa_s = T.alloc_shared((block_m,), ACC)
            sb_s = T.alloc_shared((kb_count,), ACC)
            d_s = T.alloc_shared((block_m, block_n), OUT)
            partial = T.alloc_fragment((block_m, block_n), ACC)
            acc = T.alloc_fragment((block_m, block_n), ACC)

            T.use_swizzle(panel_size=panel)
            m0 = by * block_m
            n0 = bx * block_n
            group = group_of(layout, aux, m0, bz)
            rows = rows_of(layout, aux, M, m0, bz)

            if rows > 0:
                parts.k_loop(a, b, sfa, sfb, bz, group, m0, n0, 0, kb_count, a_s, b_s, sa_s, sb_s, partial, acc)
                if layout == "contiguous":
                    for i, j in T.Parallel(block_m, block_n):
                        acc[i, j] = T.if_then_else(aux[T.min(m0 + i, M - 1)] >= 0, acc[i, j], T.float32(0))
                parts.store(d, acc, d_s, bz, m0, n0, rows)

    return fp8_gemm


def _narrow_parts(n: int, layout: str, block_m: int, block_n: int, num_stages: int) -> SimpleNamespace:
    """The macros of a block_n <= 128 tile: the K loop and the bf16 store."""

    @T.macro
    def k_loop(a, b, sfa, sfb, bz, group, m0, n0, kb0, steps, a_s, b_s, sa_s, sb_s, partial, acc):
        # acc = the tile's sum over K blocks kb0 .. kb0 + steps - 1, each promoted with its scales.
        for kk in T.Parallel(steps):
            sb_s[kk] = sfb[group, n0 // 128, kb0 + kk]
        T.clear(acc)
        for kb in T.Pipelined(steps, num_stages=num_stages):
            T.copy(a[bz, m0:m0 + block_m, (kb0 + kb) * BLOCK_K:(kb0 + kb + 1) * BLOCK_K], a_s)
            T.copy(b[group, n0:n0 + block_n, (kb0 + kb) * BLOCK_K:(kb0 + kb + 1) * BLOCK_K], b_s)
            T.copy(sfa[bz, kb0 + kb, m0:m0 + block_m], sa_s)
            T.gemm(a_s, b_s, partial, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
            for i, j in T.Parallel(block_m, block_n):
                acc[i, j] += partial[i, j] * (sa_s[i] * sb_s[kb])

    @T.macro
    def store(d, acc, d_s, bz, m0, n0, rows):
        T.copy(acc, d_s)
        store_tile(d, d_s, bz, m0, n0, rows, n, layout == "masked", block_m, block_n)

    return SimpleNamespace(k_loop=k_loop, store=store)


def k_splits(k: int, splits: int) -> int:
    """The split count a kernel built with `splits` uses: the largest divisor of the K block count
    not above it (every split then runs the same static number of K blocks)."""
    kb_count = k // BLOCK_K
    return max(s for s in range(1, min(splits, kb_count) + 1) if kb_count % s == 0)


def _split_kernel(n: int, k: int, parts: SimpleNamespace, *, block_m: int, block_n: int, threads: int, panel: int,
                  splits: int):
    """Dense split-K for small M (weight-bandwidth-bound, too few tiles to fill the SMs): the grid's
    z runs over `splits` K ranges, each CTA writes its fp32 tile into ws[split], and the last CTA
    of a tile to finish (counted in flags[tile] with an atomic add) sums the splits in a fixed
    order (deterministic), stores bf16 D and resets its counter to 0, so the zero-initialized
    flags serve the next call without a memset (CUDA-graph capturable, no host sync). Each K
    block is promoted with its own scales, so a split's partial sum is exact up to fp32 order.

    Two splits instead run as a cluster of two CTAs that sum through distributed shared memory
    (each its half of the rows, in split order, so bitwise as above) and leave ws and flags alone.

    Extra parameters: ws float32 (splits, WM, n rounded up to block_n), WM >= M rounded up to
    block_m; flags int32 (F,) with F >= the tile count, zero before the call (and left zero
    after it)."""
    steps = k // BLOCK_K // splits
    n_blocks = -(-n // block_n)
    sig = _signature(n, k)
    M = sig.M
    WM, F = T.dynamic("WM, F")
    # Two splits run as a cluster (the split index along x, where TileLang's cluster launch wants it)
    # and sum through distributed shared memory instead of the workspace: no fence or atomic round
    # trips. H100, 4096 x 7168: M = 64 17.5 -> 16.9 us, M = 128 19.4 -> 18.1. Clusters of 4 were
    # slower (2112 x 7168: 12.9 -> 18.3 us; its 33 clusters of 4 seem not to fit at once).
    paired = splits == CLUSTER_SPLITS
    if paired:
        grid, launch = (splits, n_blocks, T.ceildiv(M, block_m)), {"cluster_dims": (splits, 1, 1)}
    else:
        grid, launch = (n_blocks, T.ceildiv(M, block_m), splits), {}
    ws_t = T.Tensor((splits, WM, n_blocks * block_n), ACC)
    flags_t = T.Tensor((F,), "int32")

    @T.prim_func
    def fp8_gemm_split(a: sig.a, b: sig.b, d: sig.d, sfa: sig.sfa, sfb: sig.sfb, aux: sig.aux, ws: ws_t,
                       flags: flags_t):
        with T.Kernel(grid[0], grid[1], grid[2], threads=threads, **launch) as (gx, gy, gz):
            kz = gx if paired else gz
            bx = gy if paired else gx
            by = gz if paired else gy
            a_s = T.alloc_shared((block_m, BLOCK_K), FP8)
            b_s = T.alloc_shared((block_n, BLOCK_K), FP8)
            sa_s = T.alloc_shared((block_m,), ACC)
            sb_s = T.alloc_shared((steps,), ACC)
            d_s = T.alloc_shared((block_m, block_n), OUT)
            last = T.alloc_shared((1,), "int32")
            partial = T.alloc_fragment((block_m, block_n), ACC)
            acc = T.alloc_fragment((block_m, block_n), ACC)
            if paired:
                partials_s = T.alloc_shared((block_m, block_n), ACC)
            else:
                total = T.alloc_fragment((block_m, block_n), ACC)
            tx = T.get_thread_binding()

            if not paired:
                T.use_swizzle(panel_size=panel)
            m0 = by * block_m
            n0 = bx * block_n
            tile = by * n_blocks + bx
            if paired:
                # TileLang's runtime launches every cluster kernel with programmatic stream serialization
                # allowed: wait for the previous grid's writes (A) before reading anything.
                T.pdl_sync()
            parts.k_loop(a, b, sfa, sfb, 0, 0, m0, n0, kz * steps, steps, a_s, b_s, sa_s, sb_s, partial, acc)
            if paired:
                # Each CTA stages its partial tile, then sums and stores its half of the rows (split
                # order: bitwise as the workspace path); the second barrier keeps its shared memory
                # alive until the peer has read it.
                T.import_source(_CLUSTER_SUM_SRC)
                T.copy(acc, partials_s)
                T.call_extern("handle", "mate_cluster_sync")
                T.call_extern("handle", f"mate_cluster_sum_store<{block_m}, {block_n}, {splits}, {threads}, {n}>",
                              partials_s.data, d.data, m0, n0, M, kz, tx)
                T.call_extern("handle", "mate_cluster_sync")
            else:
                T.copy(acc, ws[kz, m0:m0 + block_m, n0:n0 + block_n])
                T.sync_threads(SPLIT_BARRIER, threads)
                if tx == 0:
                    # One thread publishes the CTA's partials and counts the split: the barrier orders the
                    # other threads' stores before its fence, as in a cooperative-groups grid sync (one
                    # fence instead of one per thread), and its second fence orders the reads below.
                    T.call_extern("handle", "__threadfence")
                    last[0] = T.atomic_add(flags[tile], 1, return_prev=True)
                    T.call_extern("handle", "__threadfence")
                T.sync_threads(SPLIT_BARRIER, threads)
                if last[0] == splits - 1:
                    # The splits summed in split order (deterministic), this CTA's own from its registers.
                    T.clear(total)
                    for s in T.unroll(splits):
                        if s == kz:
                            for i, j in T.Parallel(block_m, block_n):
                                total[i, j] += acc[i, j]
                        else:
                            for i, j in T.Parallel(block_m, block_n):
                                total[i, j] += ws[s, m0 + i, n0 + j]
                    if tx == 0:
                        flags[tile] = 0
                    parts.store(d, total, d_s, 0, m0, n0, M - m0)

    return fp8_gemm_split


def _wide_kernel(n: int, k: int, layout: str, *, block_m: int, num_stages: int, threads: int, panel: int):
    """block_n = 256: two 128-column halves (one B scale block each) per tile.

    A 64 x 256 fp32 accumulator per consumer warpgroup is 128 registers; a second 128 for the
    per-K-block product would not fit in 240, so each K block runs as two 64 x 128 wgmma passes
    (one per half, each with its own B scale) into one 64-register `partial`, promoted into the
    half's accumulator between the passes. Halving the tiles per output halves how often A is
    read from L2 (B is read as often as before): 48 KB per 8.4 MFLOP instead of 32 KB per 4.2."""
    kb_count = k // BLOCK_K
    nb_count = -(-n // 128)
    n_blocks = -(-n // 256)
    half = 128

    sig = _signature(n, k)
    M, GA = sig.M, sig.GA
    fp8, acc_t, out_t = FP8, ACC, OUT

    @T.prim_func
    def fp8_gemm(a: sig.a, b: sig.b, d: sig.d, sfa: sig.sfa, sfb: sig.sfb, aux: sig.aux):
        with T.Kernel(n_blocks, T.ceildiv(M, block_m), GA, threads=threads) as (bx, by, bz):
            a_s = T.alloc_shared((block_m, BLOCK_K), fp8)
            b0_s = T.alloc_shared((half, BLOCK_K), fp8)
            b1_s = T.alloc_shared((half, BLOCK_K), fp8)
            sa_s = T.alloc_shared((block_m,), acc_t)
            sb0_s = T.alloc_shared((kb_count,), acc_t)
            sb1_s = T.alloc_shared((kb_count,), acc_t)
            d0_s = T.alloc_shared((block_m, half), out_t)
            d1_s = T.alloc_shared((block_m, half), out_t)
            partial = T.alloc_fragment((block_m, half), acc_t)
            acc0 = T.alloc_fragment((block_m, half), acc_t)
            acc1 = T.alloc_fragment((block_m, half), acc_t)

            T.use_swizzle(panel_size=panel)
            m0 = by * block_m
            n0 = bx * 256
            group = group_of(layout, aux, m0, bz)
            rows = rows_of(layout, aux, M, m0, bz)

            if rows > 0:
                for kk in T.Parallel(kb_count):
                    sb0_s[kk] = sfb[group, bx * 2, kk]
                    # The last tile's second half may lie past N (its columns are never stored).
                    sb1_s[kk] = sfb[group, T.min(bx * 2 + 1, nb_count - 1), kk]
                T.clear(acc0)
                T.clear(acc1)
                for kb in T.Pipelined(kb_count, num_stages=num_stages):
                    T.copy(a[bz, m0:m0 + block_m, kb * BLOCK_K:(kb + 1) * BLOCK_K], a_s)
                    T.copy(b[group, n0:n0 + half, kb * BLOCK_K:(kb + 1) * BLOCK_K], b0_s)
                    T.copy(b[group, n0 + half:n0 + 2 * half, kb * BLOCK_K:(kb + 1) * BLOCK_K], b1_s)
                    T.copy(sfa[bz, kb, m0:m0 + block_m], sa_s)
                    T.gemm(a_s, b0_s, partial, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                    for i, j in T.Parallel(block_m, half):
                        acc0[i, j] += partial[i, j] * (sa_s[i] * sb0_s[kb])
                    T.gemm(a_s, b1_s, partial, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                    for i, j in T.Parallel(block_m, half):
                        acc1[i, j] += partial[i, j] * (sa_s[i] * sb1_s[kb])

                if layout == "contiguous":
                    for i, j in T.Parallel(block_m, half):
                        keep = aux[T.min(m0 + i, M - 1)] >= 0
                        acc0[i, j] = T.if_then_else(keep, acc0[i, j], T.float32(0))
                        acc1[i, j] = T.if_then_else(keep, acc1[i, j], T.float32(0))
                T.copy(acc0, d0_s)
                T.copy(acc1, d1_s)
                store_tile(d, d0_s, bz, m0, n0, rows, n, layout == "masked", block_m, half)
                store_tile(d, d1_s, bz, m0, n0 + half, rows, n, layout == "masked", block_m, half)

    return fp8_gemm


def _masked_blocks(aux, M, g, bm: int):
    """128-row blocks of masked group g (masked_m clamped to [0, M])."""
    return T.ceildiv(T.max(T.min(aux[g], M), 0), bm)


@T.macro
def _locate(layout: str, aux, M, GA, t, n_blocks: int, panel: int, bm: int):
    """(A group, N block, M block) of the persistent kernel's t-th tile. Masked: the tiles of the
    groups' live row blocks (masked_m read on the device) are numbered group after group, so only
    live tiles are walked; otherwise the one group's grid."""
    g = T.alloc_var("int32", init=0)
    m_blocks = T.alloc_var("int32", init=T.ceildiv(M, bm))
    local = T.alloc_var("int32", init=t)
    if layout == "masked":
        for gi in T.serial(GA - 1):  # walk past the groups whose tiles lie before t
            cnt = _masked_blocks(aux, M, gi, bm) * n_blocks
            if g == gi and local >= cnt:
                local = local - cnt
                g = gi + 1
        m_blocks = _masked_blocks(aux, M, g, bm)
    bx, by = panel_tile(local, m_blocks, n_blocks, panel)
    return g, bx, by


def persistent_kernel(n: int, k: int, layout: str = "dense", *, block_m: int = 128, block_n: int = 256,
                      num_stages: int = 3, panel: int = 8):
    """Persistent, with hand-written warp roles: `ctas` (a scalar parameter after aux, at least 1)
    CTAs walk the block_m x block_n tiles t = cta, cta + ctas, ... in the panel order (masked: the
    live tiles only, counted from masked_m on the device; see `_locate`); the producer warpgroup
    streams A, B, A's and B's scales into a `num_stages` ring across tile boundaries, so the next
    tile's loads overlap this tile's epilogue. block_n 256 runs as two 128-column passes (one B
    scale block each), as in `_wide_kernel`; block_n 192 as one pass whose tile may start in the
    middle of a B scale block (N = 2112 is 11 such tiles: 2.7 waves of 128 x 192 at M = 4096
    where 128 x 128 takes 4.1 and 128 x 256 2.2), so its columns take the first or the second of
    two scales. The bf16 stores are TMA stores whose reads of the staging tiles are waited for
    only before the next tile's epilogue overwrites them (masked: row-guarded stores for a
    group's last, partial block). One consumer warpgroup per 64 rows."""
    bm = block_m
    consumers = 2 * bm  # consumer threads; the producer warpgroup follows them
    width = 128 if block_n == 256 else block_n  # columns per wgmma pass
    passes = block_n // width
    straddles = block_n % 128 != 0
    kb_count = k // BLOCK_K
    nb_count = -(-n // 128)
    n_blocks = -(-n // block_n)
    S = num_stages
    sig = _signature(n, k)
    M, GA = sig.M, sig.GA

    @T.macro
    def pass_step(a_tile, b_tile, sa_s, sb_s, st, h, first_cols, partial, acc, scale0, scale1):
        # One 64 x width x 128 wgmma per warpgroup, then its promotion into the pass's accumulator:
        # pass h's columns lie in B scale block h, or (straddles) the first `first_cols` in block 0.
        # The scales are read into registers before the wgmma is issued: read after its wait, the
        # shared-memory latency would stall every pass (5% of the kernel, measured).
        if straddles:
            for i in T.Parallel(bm):
                scale0[i] = sa_s[st, i] * sb_s[st, 0]
                scale1[i] = sa_s[st, i] * sb_s[st, 1]
        else:
            for i in T.Parallel(bm):
                scale0[i] = sa_s[st, i] * sb_s[st, h]
        T.wgmma_gemm(a_tile, b_tile, partial, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
        T.wait_wgmma(0)
        if straddles:
            for i, c in T.Parallel(bm, width):
                acc[i, c] += partial[i, c] * T.if_then_else(c < first_cols, scale0[i], scale1[i])
        else:
            for i, c in T.Parallel(bm, width):
                acc[i, c] += partial[i, c] * scale0[i]

    @T.prim_func
    def fp8_gemm_persistent(a: sig.a, b: sig.b, d: sig.d, sfa: sig.sfa, sfb: sig.sfb, aux: sig.aux, ctas: T.int32):
        with T.Kernel(ctas, threads=consumers + 128) as cta:
            a_s = T.alloc_shared((S, bm, BLOCK_K), FP8)
            b0_s = T.alloc_shared((S, width, BLOCK_K), FP8)
            b1_s = T.alloc_shared((S, width, BLOCK_K), FP8)
            sa_s = T.alloc_shared((S, bm), ACC)
            sb_s = T.alloc_shared((S, 2), ACC)
            d0_s = T.alloc_shared((bm, width), OUT)
            d1_s = T.alloc_shared((bm, width), OUT)
            partial = T.alloc_fragment((bm, width), ACC)
            acc0 = T.alloc_fragment((bm, width), ACC)
            acc1 = T.alloc_fragment((bm, width), ACC)
            scale0 = T.alloc_fragment((bm,), ACC)  # the pass's row scales times its B scale
            scale1 = T.alloc_fragment((bm,), ACC)  # (straddles) those with the second B scale
            full = T.alloc_barrier([128] * S)
            empty = T.alloc_barrier([consumers] * S)
            tx = T.get_thread_binding()
            tiles = T.alloc_var("int32", init=T.ceildiv(M, bm) * n_blocks)
            if layout == "masked":
                tiles = 0
                for gi in T.serial(GA):
                    tiles = tiles + _masked_blocks(aux, M, gi, bm) * n_blocks
            my_tiles = T.ceildiv(tiles - cta, ctas)
            if tx >= consumers:
                T.set_max_nreg(24, 0)
                for it in T.serial(my_tiles):
                    g, bx, by = _locate(layout, aux, M, GA, cta + it * ctas, n_blocks, panel, bm)
                    expert = group_of(layout, aux, by * bm, g)
                    for kb in T.serial(kb_count):
                        j = it * kb_count + kb
                        st = j % S
                        # The scale blocks of the tile's first and last columns (past N: never stored).
                        sb0 = sfb[expert, bx * block_n // 128, kb]
                        sb1 = sfb[expert, T.min(bx * block_n // 128 + 1, nb_count - 1), kb]
                        T.barrier_wait(empty[st], (j // S) % 2 ^ 1)
                        T.tma_copy(a[g, by * bm:by * bm + bm, kb * BLOCK_K:kb * BLOCK_K + BLOCK_K], a_s[st, :, :],
                                   barrier=full[st])
                        T.tma_copy(b[expert, bx * block_n:bx * block_n + width, kb * BLOCK_K:kb * BLOCK_K + BLOCK_K],
                                   b0_s[st, :, :], barrier=full[st])
                        if passes == 2:
                            T.tma_copy(b[expert, bx * block_n + width:bx * block_n + 2 * width,
                                         kb * BLOCK_K:kb * BLOCK_K + BLOCK_K], b1_s[st, :, :], barrier=full[st])
                        T.tma_copy(sfa[g, kb, by * bm:by * bm + bm], sa_s[st, :], barrier=full[st])
                        if tx == consumers:
                            sb_s[st, 0] = sb0
                            sb_s[st, 1] = sb1
                        T.barrier_arrive(full[st])
            else:
                T.set_max_nreg(240, 1)
                for it in T.serial(my_tiles):
                    g, bx, by = _locate(layout, aux, M, GA, cta + it * ctas, n_blocks, panel, bm)
                    first_cols = 128 - bx * block_n % 128
                    T.clear(acc0)
                    if passes == 2:
                        T.clear(acc1)
                    for kb in T.serial(kb_count):
                        j = it * kb_count + kb
                        st = j % S
                        T.barrier_wait(full[st], (j // S) % 2)
                        pass_step(a_s[st, :, :], b0_s[st, :, :], sa_s, sb_s, st, 0, first_cols, partial, acc0,
                                  scale0, scale1)
                        if passes == 2:
                            pass_step(a_s[st, :, :], b1_s[st, :, :], sa_s, sb_s, st, 1, first_cols, partial, acc1,
                                      scale0, scale1)
                        T.barrier_arrive(empty[st])
                    m0 = by * bm
                    if layout == "contiguous":  # padding rows (expert -1) are written as zeros
                        for i, c in T.Parallel(bm, width):
                            keep = aux[T.min(m0 + i, M - 1)] >= 0
                            acc0[i, c] = T.if_then_else(keep, acc0[i, c], T.float32(0))
                            if passes == 2:
                                acc1[i, c] = T.if_then_else(keep, acc1[i, c], T.float32(0))
                    T.tma_store_wait(0)  # the previous tile's stores have read the staging tiles
                    T.copy(acc0, d0_s)
                    if passes == 2:
                        T.copy(acc1, d1_s)
                    rows = rows_of(layout, aux, M, m0, g)
                    if layout == "masked" and rows < bm:
                        store_tile(d, d0_s, g, m0, bx * block_n, rows, n, True, bm, width)
                        if passes == 2:
                            store_tile(d, d1_s, g, m0, bx * block_n + width, rows, n, True, bm, width)
                    else:
                        T.tma_copy(d0_s, d[g, m0:m0 + bm, bx * block_n:bx * block_n + width])
                        if passes == 2:
                            T.tma_copy(d1_s, d[g, m0:m0 + bm, bx * block_n + width:bx * block_n + 2 * width])
                T.tma_store_wait(0)

    return fp8_gemm_persistent


def build(n: int, k: int, layout: str = "dense", **tuning):
    """The prim_func for a variant dict (as mate.ops.gemm.support calls it)."""
    config = default_config(n, k, layout)
    config.update(tuning)
    return fp8_gemm_kernel(n, k, layout, **config)
