"""TileLang K-grouped FP8 e4m3 GEMM for Hopper (sm_90a): DeepGEMM's SM90 weight-gradient GEMM
(k_grouped_fp8_gemm_nt_contiguous, the "1D1D" recipe: per-channel scales on both operands).

    D[g, m, n] = C[g, m, n] + sum over 128-wide K blocks kb of group g of
                 (sum_{k in kb} A[m, k] * B[n, k]) * SFA[kb, m] * SFB[kb, n]

The groups' K ranges are stacked along K: group g owns columns [K_0 + ... + K_{g-1}, ... + K_g) of
A and B and scale rows [(K_0 + ... + K_{g-1}) / 128, ...). Every K_g is a multiple of 128 (zero
allowed: D[g] = C[g]); the K of each group is read from `ks` on the device and its start is the
prefix sum taken in the kernel, so ΣK and the group sizes are runtime values (no compile per K, no
host sync). Parameters, in order:

    a     float8_e4m3fn (M, ΣK)      strides (a_row, 1), a_row a multiple of 16 (TMA)
    b     float8_e4m3fn (N, ΣK)      strides (b_row, 1), likewise
    sfa   float32       (ΣK/128, M)  strides (sfa_row, 1), sfa_row * 4 a multiple of 16 (TMA)
    sfb   float32       (ΣK/128, N)  strides (sfb_row, 1), likewise
    d     float32       (G, M, N)    contiguous, holds C on entry (DeepGEMM copies C into D first)
    ks    int32         (G,)         each group's K

Each K block's wgmma product goes into a fresh fp32 accumulator (`partial`) that is promoted into
the running one times the row's A scale and the column's B scale, as DeepGEMM's 1D1D kernels do.
N is a compile-time constant (one compile per weight shape); M, ΣK and G are dynamic. Tiles:
block_m 128 (two consumer warpgroups of 64 rows) or 64 (one), block_n 128, block_k 128 (one scale
block), a `num_stages` TMA ring fed by a producer warpgroup (TileLang's warp specialization).
"""

import tilelang.language as T

# (No `from __future__ import annotations`: the prim_func annotations must be evaluated eagerly.)

BLOCK_K = 128  # = the scale block along K = the K alignment of every group
FP8, ACC = "float8_e4m3fn", "float32"
TILES = {"m128n128": {"block_m": 128, "block_n": 128, "threads": 256, "num_stages": 4},
         "m64n128": {"block_m": 64, "block_n": 128, "threads": 128, "num_stages": 6}}


def k_grouped_fp8_kernel(n: int, *, block_m: int = 128, block_n: int = 128, num_stages: int = 4,
                         threads: int = 256, panel: int = 8):
    """Build the prim_func (not compiled) for outputs with n columns."""
    if n <= 0 or n % 4:
        raise ValueError(f"n must be a positive multiple of 4 (16-byte rows of the float32 D), got {n}")
    if block_n not in (64, 128):
        raise ValueError(f"block_n must be 64 or 128, got {block_n}")
    if block_m not in (64, 128) or threads != 2 * block_m:
        raise ValueError("block_m must be 64 or 128 with one consumer warpgroup (128 threads) per 64 rows, got "
                         f"block_m {block_m}, threads {threads}")
    M, SK, SKB, G = T.dynamic("M, SK, SKB, G")
    a_row, b_row, sfa_row, sfb_row = T.dynamic("a_row, b_row, sfa_row, sfb_row")

    @T.prim_func
    def k_grouped_fp8_gemm(
        a: T.StridedTensor((M, SK), (a_row, 1), FP8),
        b: T.StridedTensor((n, SK), (b_row, 1), FP8),
        sfa: T.StridedTensor((SKB, M), (sfa_row, 1), ACC),
        sfb: T.StridedTensor((SKB, n), (sfb_row, 1), ACC),
        d: T.Tensor((G, M, n), ACC),
        ks: T.Tensor((G,), "int32"),
    ):
        with T.Kernel(T.ceildiv(n, block_n), T.ceildiv(M, block_m), G, threads=threads) as (bx, by, bz):
            a_s = T.alloc_shared((block_m, BLOCK_K), FP8)
            b_s = T.alloc_shared((block_n, BLOCK_K), FP8)
            sa_s = T.alloc_shared((block_m,), ACC)
            sb_s = T.alloc_shared((block_n,), ACC)
            d_s = T.alloc_shared((block_m, block_n), ACC)
            partial = T.alloc_fragment((block_m, block_n), ACC)
            acc = T.alloc_fragment((block_m, block_n), ACC)
            kb0 = T.alloc_local((1,), "int32")  # the group's first K block

            T.use_swizzle(panel_size=panel)
            m0 = by * block_m
            n0 = bx * block_n
            kb0[0] = 0
            for g in T.serial(bz):
                kb0[0] += ks[g] // BLOCK_K

            T.clear(acc)
            for kb in T.Pipelined(ks[bz] // BLOCK_K, num_stages=num_stages):
                k_row = kb0[0] + kb
                T.copy(a[m0:m0 + block_m, k_row * BLOCK_K:(k_row + 1) * BLOCK_K], a_s)
                T.copy(b[n0:n0 + block_n, k_row * BLOCK_K:(k_row + 1) * BLOCK_K], b_s)
                T.copy(sfa[k_row, m0:m0 + block_m], sa_s)
                T.copy(sfb[k_row, n0:n0 + block_n], sb_s)
                T.gemm(a_s, b_s, partial, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                for i, j in T.Parallel(block_m, block_n):
                    acc[i, j] += partial[i, j] * (sa_s[i] * sb_s[j])

            for i, j in T.Parallel(block_m, block_n):  # + C (tile edges read as zeros, never stored)
                inside = (m0 + i < M) and (n0 + j < n)
                acc[i, j] += T.if_then_else(inside, d[bz, m0 + i, n0 + j], T.float32(0))
            T.copy(acc, d_s)
            T.copy(d_s, d[bz, m0:m0 + block_m, n0:n0 + block_n])

    return k_grouped_fp8_gemm


def build(n: int, tile: str = "m128n128", **tuning):
    """The prim_func for a variant (as mate.ops.gemm.support calls it)."""
    config = dict(TILES[tile])
    config.update(tuning)
    return k_grouped_fp8_kernel(n, **config)
