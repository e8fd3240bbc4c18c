"""TileLang BF16 / FP16 GEMM for Hopper (sm_90a): TMA loads into a multi-stage ring fed by a
producer warpgroup (TileLang's warp specialization of `T.Pipelined`), wgmma into fp32
accumulators held by two consumer warpgroups, and a TMA store of the tile through shared memory.

    D[g, m, n] = sum_k A[g, m, k] * B[g, n, k]

Operands are 3-D (group or batch, rows, cols) so that one prim_func serves DeepGEMM's dense
bf16_gemm_{nt,nn,tn,tt} (one group) and mate.gemm.bmm_fp16 (the batch as the grid's z axis):

    a   (G, M, K) when major_a == "K", (G, K, M) when "MN"   (DeepGEMM's tn / tt read A^T)
    b   (G, N, K) when major_b == "K", (G, K, N) when "MN"   (nn / tn, and torch.bmm's B)
    d   (G, M, N) bfloat16, float16 or float32, row-major

wgmma reads 16-bit operands from shared memory in either major order (its transpose bits), so
every layout is the same kernel with the tiles loaded as stored. N and K are compile-time
constants (the weight's shape, as DeepGEMM's compiled_dims); M and G are dynamic. Edges of M, N
and K are handled by TMA (out-of-bounds loads read zeros, stores are clipped).
"""

import tilelang.language as T

# (No `from __future__ import annotations`: the prim_func annotations must be evaluated eagerly.)

DTYPES = ("bfloat16", "float16")
OUT_DTYPES = ("bfloat16", "float16", "float32")
MAJORS = ("K", "MN")
TILES = {"m128n256": {"block_m": 128, "block_n": 256, "block_k": 64, "num_stages": 3, "threads": 256},
         "m128n192": {"block_m": 128, "block_n": 192, "block_k": 64, "num_stages": 4, "threads": 256},
         "m128n128": {"block_m": 128, "block_n": 128, "block_k": 64, "num_stages": 4, "threads": 256},
         "m64n128": {"block_m": 64, "block_n": 128, "block_k": 64, "num_stages": 6, "threads": 128}}


def bf16_gemm_kernel(n: int, k: int, major_a: str = "K", major_b: str = "K", dtype: str = "bfloat16",
                     out_dtype: str = "bfloat16", *, block_m: int = 128, block_n: int = 256, block_k: int = 64,
                     num_stages: int = 3, threads: int = 256, panel: int = 8):
    """Build the prim_func (not compiled) for a weight of shape (n, k)."""
    if dtype not in DTYPES or out_dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} and out_dtype one of {OUT_DTYPES}, got {dtype}, {out_dtype}")
    if major_a not in MAJORS or major_b not in MAJORS:
        raise ValueError(f"major_a and major_b must be one of {MAJORS}, got {major_a!r}, {major_b!r}")
    if n <= 0 or k <= 0 or n % 8 or k % 8:
        raise ValueError(f"n and k must be positive multiples of 8 (16-byte rows for TMA), got n {n}, k {k}")
    if block_m not in (64, 128) or threads != 2 * block_m:
        raise ValueError(f"block_m must be 64 or 128 with 128 threads per 64 rows, got {block_m}, {threads}")

    M, G = T.dynamic("M, G")
    a_shape = (G, M, k) if major_a == "K" else (G, k, M)
    b_shape = (G, n, k) if major_b == "K" else (G, k, n)
    a_tile = (block_m, block_k) if major_a == "K" else (block_k, block_m)
    b_tile = (block_n, block_k) if major_b == "K" else (block_k, block_n)

    @T.prim_func
    def bf16_gemm(
        a: T.Tensor(a_shape, dtype),
        b: T.Tensor(b_shape, dtype),
        d: T.Tensor((G, M, n), out_dtype),
    ):
        with T.Kernel(T.ceildiv(n, block_n), T.ceildiv(M, block_m), G, threads=threads) as (bx, by, bz):
            a_s = T.alloc_shared(a_tile, dtype)
            b_s = T.alloc_shared(b_tile, dtype)
            d_s = T.alloc_shared((block_m, block_n), out_dtype)
            acc = T.alloc_fragment((block_m, block_n), "float32")

            T.use_swizzle(panel_size=panel)
            m0 = by * block_m
            n0 = bx * block_n
            T.clear(acc)
            for kb in T.Pipelined(T.ceildiv(k, block_k), num_stages=num_stages):
                if major_a == "K":
                    T.copy(a[bz, m0:m0 + block_m, kb * block_k:(kb + 1) * block_k], a_s)
                else:
                    T.copy(a[bz, kb * block_k:(kb + 1) * block_k, m0:m0 + block_m], a_s)
                if major_b == "K":
                    T.copy(b[bz, n0:n0 + block_n, kb * block_k:(kb + 1) * block_k], b_s)
                else:
                    T.copy(b[bz, kb * block_k:(kb + 1) * block_k, n0:n0 + block_n], b_s)
                T.gemm(a_s, b_s, acc, transpose_A=major_a == "MN", transpose_B=major_b == "K",
                       policy=T.GemmWarpPolicy.FullRow)
            T.copy(acc, d_s)
            T.copy(d_s, d[bz, m0:m0 + block_m, n0:n0 + block_n])

    return bf16_gemm


def build(n: int, k: int, major_a: str = "K", major_b: str = "K", dtype: str = "bfloat16",
          out_dtype: str = "bfloat16", tile: str = "m128n256", **tuning):
    """The prim_func for a variant (as mate.ops.gemm.support calls it)."""
    config = dict(TILES[tile])
    if out_dtype == "float32" and config["block_n"] > 128:
        config.update(block_n=128, num_stages=4)  # a 128 x 256 fp32 staging tile would not fit beside the ring
    config.update(tuning)
    return bf16_gemm_kernel(n, k, major_a, major_b, dtype, out_dtype, **config)
