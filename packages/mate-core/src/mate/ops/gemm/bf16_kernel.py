"""TileLang BF16 / FP16 GEMM for Hopper (sm_90a): TMA loads into a multi-stage ring fed by a
producer warpgroup (TileLang's warp specialization of `T.Pipelined`), wgmma into fp32
accumulators held by two consumer warpgroups, and a TMA store of the tile through shared memory.
Dense calls with a 16-bit D and no accumulator run `persistent_kernel` instead (hand-written warp
roles, one CTA per SM walking the tiles of every batch; bf16_launch.tile_for picks it).

    D[g, m, n] (+)= sum_k A[g, m, k] * B[group, n, k]

Operands are 3-D (group, rows, cols) so that one prim_func serves every layout (the static
`layout` argument), as the FP8 kernel's (:mod:`mate.ops.gemm.fp8_kernel`) do:

* ``dense``       A (G, M, K), B (G, N, K), D (G, M, N): DeepGEMM's bf16_gemm_{nt,nn,tn,tt} (one
                  group) and mate.gemm.bmm_fp16 (the batch as the grid's z axis).
* ``contiguous``  A (1, M, K) with the rows of all experts stacked, B (GB, N, K); `aux` (M,) int32
                  holds each row's expert (-1: padding). Every 128-row block belongs to one expert
                  (DeepGEMM's alignment), whose B the block multiplies; rows of index -1 are zeros.
* ``psum``        as contiguous, with `aux` (GB,) int32 holding each expert's end row instead
                  (DeepGEMM's use_psum_layout): expert g owns rows [align(end[g - 1], 128), end[g]).
                  Each block finds its expert by scanning the ends; rows of no expert are zeros,
                  and blocks past every expert skip the K loop.
* ``masked``      A (G, M_max, K), B (G, N, K), D (G, M_max, N); `aux` (G,) int32 holds masked_m.
                  The grid is sized from the static shapes (CUDA-graph capturable); blocks past
                  masked_m[g] exit at once, and only rows < masked_m[g] are stored.
* ``k_grouped``   A (1, ΣK, M) and B (1, ΣK, N), MN-major, the groups' K ranges stacked; D (G, M, N)
                  float32; `aux` (G,) int32 holds each group's K (multiples of 128). Group g reads
                  rows [sum(aux[:g]), sum(aux[:g]) + aux[g]) of A and B: ΣK and every group's K are
                  runtime values (no compile per K), the prefix sum is taken in the kernel.

Storage of the operands (the `major_*` arguments):

    a   (GA, M, K) when major_a == "K", (GA, K, M) when "MN"   (DeepGEMM's tn / tt read A^T)
    b   (GB, N, K) when major_b == "K", (GB, K, N) when "MN"   (nn / tn, and torch.bmm's B)
    d   (GD, M, N) bfloat16, float16 or float32, row-major

wgmma reads 16-bit operands from shared memory in either major order (its transpose bits), so
every layout is the same kernel with the tiles loaded as stored. With `accumulate`, D holds C on
entry and the kernel adds it to the product in the epilogue (DeepGEMM copies C into D first when
they differ; C may be D). N and K are compile-time constants (the weight's shape, as DeepGEMM's
compiled_dims; K is dynamic in the k_grouped layout); M and the group counts are dynamic. Edges
of M, N and K are handled by TMA (out-of-bounds loads read zeros, stores are clipped).
"""

import tilelang.language as T

from mate.ops.gemm.tiles import panel_tile, rows_of, store_tile

# (No `from __future__ import annotations`: the prim_func annotations must be evaluated eagerly.)

DTYPES = ("bfloat16", "float16")
OUT_DTYPES = ("bfloat16", "float16", "float32")
MAJORS = ("K", "MN")
LAYOUTS = ("dense", "contiguous", "psum", "masked", "k_grouped")
M_ALIGNMENT = 128  # the rows of each expert in the contiguous / psum layouts start at multiples of it
K_GROUP_ALIGNMENT = 128  # every group's K in the k_grouped layout (a multiple of block_k)
TILES = {"m128n256": {"block_m": 128, "block_n": 256, "block_k": 64, "num_stages": 3, "threads": 256},
         "m128n192": {"block_m": 128, "block_n": 192, "block_k": 64, "num_stages": 4, "threads": 256},
         "m128n128": {"block_m": 128, "block_n": 128, "block_k": 64, "num_stages": 4, "threads": 256},
         "m64n128": {"block_m": 64, "block_n": 128, "block_k": 64, "num_stages": 6, "threads": 128},
         # persistent_kernel (dense, 16-bit D, no accumulator): one CTA per SM walks the tiles
         "p128n256": {"block_m": 128, "block_n": 256, "block_k": 64, "num_stages": 3, "threads": 256,
                      "persistent": True},
         # 6 stages (224 KB of shared memory with the staging tile): H100, against 5, bmm 64 x 1024^3 656 ->
         # 680 TFLOP/s, 8 x 4096^3 655 -> 701, dense 4096 x 32768 x 512 601 -> 622
         "p128n128": {"block_m": 128, "block_n": 128, "block_k": 64, "num_stages": 6, "threads": 256,
                      "persistent": True}}


def _check_config(n, k, major_a, major_b, dtype, out_dtype, layout, accumulate, block_m, threads):
    if dtype not in DTYPES or out_dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} and out_dtype one of {OUT_DTYPES}, got {dtype}, {out_dtype}")
    if major_a not in MAJORS or major_b not in MAJORS:
        raise ValueError(f"major_a and major_b must be one of {MAJORS}, got {major_a!r}, {major_b!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if n <= 0 or n % 8 or (layout != "k_grouped" and (k <= 0 or k % 8)):
        raise ValueError(f"n and k must be positive multiples of 8 (16-byte rows for TMA), got n {n}, k {k}")
    if block_m not in (64, 128) or threads != 2 * block_m:
        raise ValueError(f"block_m must be 64 or 128 with 128 threads per 64 rows, got {block_m}, {threads}")
    if layout in ("contiguous", "psum", "masked") and (major_a != "K" or accumulate):
        raise ValueError(f"the {layout} layout takes a K-major A and no accumulator")
    if layout == "k_grouped" and (major_a, major_b, out_dtype, accumulate) != ("MN", "MN", "float32", True):
        raise ValueError("the k_grouped layout takes MN-major A and B and accumulates into a float32 D")


def bf16_gemm_kernel(n: int, k: int, major_a: str = "K", major_b: str = "K", dtype: str = "bfloat16",
                     out_dtype: str = "bfloat16", layout: str = "dense", accumulate: bool = False, *,
                     block_m: int = 128, block_n: int = 256, block_k: int = 64, num_stages: int = 3,
                     threads: int = 256, panel: int = 8, persistent: bool = False):
    """Build the prim_func (not compiled) for a weight of shape (n, k) (k_grouped: `k` is unused,
    ΣK and every group's K are runtime values). `persistent`: `persistent_kernel`."""
    _check_config(n, k, major_a, major_b, dtype, out_dtype, layout, accumulate, block_m, threads)
    if persistent:
        if (layout, accumulate, block_m, block_k) != ("dense", False, 128, 64) or out_dtype == "float32":
            raise ValueError(f"persistent needs the dense layout, no accumulator, a 16-bit D and 128 x N x 64 "
                             f"tiles, got {layout}, accumulate {accumulate}, {out_dtype}, block_m {block_m}, "
                             f"block_k {block_k}")
        return persistent_kernel(n, k, major_a, major_b, dtype, out_dtype, block_n=block_n, num_stages=num_stages,
                                 panel=panel)
    k_grouped = layout == "k_grouped"
    M, GA, GB, GD, L = T.dynamic("M, GA, GB, GD, L")
    k_dim = T.dynamic("SK") if k_grouped else k
    a_shape = (GA, M, k_dim) if major_a == "K" else (GA, k_dim, M)
    b_shape = (GB, n, k_dim) if major_b == "K" else (GB, k_dim, n)
    a_tile = (block_m, block_k) if major_a == "K" else (block_k, block_m)
    b_tile = (block_n, block_k) if major_b == "K" else (block_k, block_n)

    @T.prim_func
    def bf16_gemm(
        a: T.Tensor(a_shape, dtype),
        b: T.Tensor(b_shape, dtype),
        d: T.Tensor((GD, M, n), out_dtype),
        aux: T.Tensor((L,), "int32"),
    ):
        with T.Kernel(T.ceildiv(n, block_n), T.ceildiv(M, block_m), GD, threads=threads) as (bx, by, bz):
            a_s = T.alloc_shared(a_tile, dtype)
            b_s = T.alloc_shared(b_tile, dtype)
            d_s = T.alloc_shared((block_m, block_n), out_dtype)
            acc = T.alloc_fragment((block_m, block_n), "float32")
            k0 = T.alloc_local((1,), "int32")  # first K row of the group (k_grouped)
            scan = T.alloc_local((3,), "int32")  # psum: an expert's start row; the block's expert, its end

            T.use_swizzle(panel_size=panel)
            m0 = by * block_m
            n0 = bx * block_n
            ga = bz if layout in ("dense", "masked") else 0  # A's group
            rows = rows_of(layout, aux, M, m0, bz)
            k0[0] = 0
            if k_grouped:
                for g in T.serial(bz):
                    k0[0] += aux[g]
            scan[0] = 0
            scan[1] = -1
            scan[2] = 0
            if layout == "psum":
                for g in T.serial(GB):
                    if m0 >= scan[0] and m0 < aux[g]:
                        scan[1] = g
                        scan[2] = aux[g]
                    scan[0] = T.ceildiv(aux[g], M_ALIGNMENT) * M_ALIGNMENT
            gb = bz  # B's group
            if layout == "contiguous":
                gb = T.max(aux[m0], 0)
            elif layout == "psum":
                gb = T.max(scan[1], 0)
            elif k_grouped:
                gb = 0
            k_blocks = T.ceildiv(k, block_k)
            if k_grouped:
                k_blocks = T.ceildiv(aux[bz], block_k)
            elif layout == "psum":
                k_blocks = T.if_then_else(scan[1] >= 0, T.ceildiv(k, block_k), 0)

            if rows > 0:
                T.clear(acc)
                for kb in T.Pipelined(k_blocks, num_stages=num_stages):
                    ks = k0[0] + kb * block_k if k_grouped else kb * block_k
                    if major_a == "K":
                        T.copy(a[ga, m0:m0 + block_m, ks:ks + block_k], a_s)
                    else:
                        T.copy(a[ga, ks:ks + block_k, m0:m0 + block_m], a_s)
                    if major_b == "K":
                        T.copy(b[gb, n0:n0 + block_n, ks:ks + block_k], b_s)
                    else:
                        T.copy(b[gb, ks:ks + block_k, n0:n0 + block_n], b_s)
                    T.gemm(a_s, b_s, acc, transpose_A=major_a == "MN", transpose_B=major_b == "K",
                           policy=T.GemmWarpPolicy.FullRow)

                if accumulate:  # D holds C: add it (tile edges read as zeros, never stored)
                    for i, j in T.Parallel(block_m, block_n):
                        inside = (m0 + i < M) and (n0 + j < n)
                        acc[i, j] += T.if_then_else(inside, d[bz, m0 + i, n0 + j], T.cast(0, out_dtype))
                if layout == "contiguous":
                    for i, j in T.Parallel(block_m, block_n):
                        acc[i, j] = T.if_then_else(aux[T.min(m0 + i, M - 1)] >= 0, acc[i, j], T.float32(0))
                if layout == "psum":
                    for i, j in T.Parallel(block_m, block_n):
                        acc[i, j] = T.if_then_else(m0 + i < scan[2], acc[i, j], T.float32(0))
                T.copy(acc, d_s)
                store_tile(d, d_s, bz, m0, n0, rows, n, layout == "masked", block_m, block_n)

    return bf16_gemm


def persistent_kernel(n: int, k: int, major_a: str = "K", major_b: str = "K", dtype: str = "bfloat16",
                      out_dtype: str = "bfloat16", *, block_n: int = 256, num_stages: int = 3, panel: int = 8):
    """The dense layout with hand-written warp roles, as the FP8 persistent kernel
    (:func:`mate.ops.gemm.fp8_kernel.persistent_kernel`): `ctas` (a scalar parameter after aux, at
    least 1) CTAs walk the 128 x block_n tiles t = cta, cta + ctas, ... of every group (the batch
    is part of the tile space: group after group, each in the panel order). The producer
    warpgroup streams A and B into a `num_stages` ring that runs on across tile boundaries, so
    short K loops (K = 128 .. 2048) keep the loads going through the epilogue; the TMA store of a
    tile is waited for only before the next tile's epilogue overwrites the staging tile."""
    bm, bk = 128, 64
    S = num_stages
    kb_count = -(-k // bk)
    n_blocks = -(-n // block_n)
    M, G = T.dynamic("M, G")
    a_shape = (G, M, k) if major_a == "K" else (G, k, M)
    b_shape = (G, n, k) if major_b == "K" else (G, k, n)
    a_tile = (bm, bk) if major_a == "K" else (bk, bm)
    b_tile = (block_n, bk) if major_b == "K" else (bk, block_n)

    @T.macro
    def locate(t):
        # (group, first row, first column) of the t-th tile, computed once per tile (as expressions
        # TileLang would inline the panel arithmetic into every K step's addresses)
        m_blocks = T.ceildiv(M, bm)
        g = T.alloc_var("int32", init=t // (m_blocks * n_blocks))
        bx, by = panel_tile(t % (m_blocks * n_blocks), m_blocks, n_blocks, panel)
        m0 = T.alloc_var("int32", init=by * bm)
        n0 = T.alloc_var("int32", init=bx * block_n)
        return g, m0, n0

    @T.prim_func
    def bf16_gemm_persistent(a: T.Tensor(a_shape, dtype), b: T.Tensor(b_shape, dtype),
                             d: T.Tensor((G, M, n), out_dtype), aux: T.Tensor((1,), "int32"), ctas: T.int32):
        with T.Kernel(ctas, threads=384) as cta:
            a_s = T.alloc_shared((S, *a_tile), dtype)
            b_s = T.alloc_shared((S, *b_tile), dtype)
            d_s = T.alloc_shared((bm, block_n), out_dtype)
            acc = T.alloc_fragment((bm, block_n), "float32")
            full = T.alloc_barrier([128] * S)
            empty = T.alloc_barrier([256] * S)
            tx = T.get_thread_binding()
            my_tiles = T.ceildiv(G * T.ceildiv(M, bm) * n_blocks - cta, ctas)
            if tx >= 256:
                T.set_max_nreg(24, 0)
                for it in T.serial(my_tiles):
                    g, m0, n0 = locate(cta + it * ctas)
                    for kb in T.serial(kb_count):
                        j = it * kb_count + kb
                        st = j % S
                        ks = kb * bk
                        T.barrier_wait(empty[st], (j // S) % 2 ^ 1)
                        if major_a == "K":
                            T.tma_copy(a[g, m0:m0 + bm, ks:ks + bk], a_s[st, :, :], barrier=full[st])
                        else:
                            T.tma_copy(a[g, ks:ks + bk, m0:m0 + bm], a_s[st, :, :], barrier=full[st])
                        if major_b == "K":
                            T.tma_copy(b[g, n0:n0 + block_n, ks:ks + bk], b_s[st, :, :], barrier=full[st])
                        else:
                            T.tma_copy(b[g, ks:ks + bk, n0:n0 + block_n], b_s[st, :, :], barrier=full[st])
                        T.barrier_arrive(full[st])
            else:
                T.set_max_nreg(240, 1)
                for it in T.serial(my_tiles):
                    g, m0, n0 = locate(cta + it * ctas)
                    T.clear(acc)
                    for kb in T.serial(kb_count):
                        j = it * kb_count + kb
                        st = j % S
                        T.barrier_wait(full[st], (j // S) % 2)
                        T.wgmma_gemm(a_s[st, :, :], b_s[st, :, :], acc, transpose_A=major_a == "MN",
                                     transpose_B=major_b == "K", policy=T.GemmWarpPolicy.FullRow)
                        # one K block's wgmma stays in flight: the previous one's stage is released
                        T.wait_wgmma(1)
                        if kb > 0:
                            T.barrier_arrive(empty[(j + S - 1) % S])
                    T.wait_wgmma(0)
                    T.barrier_arrive(empty[(it * kb_count + kb_count - 1) % S])
                    T.tma_store_wait(0)  # the previous tile's store has read the staging tile
                    T.copy(acc, d_s)
                    T.tma_copy(d_s, d[g, m0:m0 + bm, n0:n0 + block_n])
                T.tma_store_wait(0)

    return bf16_gemm_persistent


def build(n: int, k: int, major_a: str = "K", major_b: str = "K", dtype: str = "bfloat16",
          out_dtype: str = "bfloat16", tile: str = "m128n256", layout: str = "dense", accumulate: bool = False,
          **tuning):
    """The prim_func for a variant (as mate.ops.gemm.support calls it)."""
    config = dict(TILES[tile])
    if out_dtype == "float32" and config["block_n"] > 128:
        config.update(block_n=128, num_stages=4)  # a 128 x 256 fp32 staging tile would not fit beside the ring
    config.update(tuning)
    return bf16_gemm_kernel(n, k, major_a, major_b, dtype, out_dtype, layout, accumulate, **config)
