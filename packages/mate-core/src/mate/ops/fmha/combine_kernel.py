"""TileLang kernel for FlashAttention-3's ``flash_attn_combine``.

Merges split-KV partial attention results. For every row r = (b, l, h):

    lse_max  = max_s lse_partial[s, r]
    m        = 0 if lse_max == -inf else lse_max
    sum      = sum_s exp(lse_partial[s, r] - m)
    lse[r]   = log(sum) + lse_max                      (-inf if every split is -inf)
    scale_s  = exp(lse_partial[s, r] - m) / sum        (0 if sum is 0 or NaN)
    out[r,:] = sum over s with scale_s > 0 of scale_s * out_partial[s, r, :]

Splits whose scale is not > 0 are never read, so garbage (even NaN) in empty
splits cannot leak into ``out``.

``combine_kernel(head_dim, out_dtype)`` returns an uncompiled ``T.prim_func``.
Only head_dim, out_dtype and the tuning constants are baked in; num_splits,
batch, seqlen, heads and every stride are runtime values, so one compiled
kernel serves all sizes. The prim_func's parameters, in order:

    out_partial  float32   (num_splits, batch, seqlen, heads, head_dim)  stride[-1] == 1
    lse_partial  float32   (num_splits, batch, seqlen, heads)            any strides
    out          out_dtype (batch, seqlen, heads, head_dim)              stride[-1] == 1
    lse          float32   (batch, seqlen, heads)                        any strides

They are strided tensors, so the compiled kernel takes torch tensors (views)
directly: ``kernel(out_partial, lse_partial, out, lse)`` (see ``launch_args``).
The generated host code binds shapes and strides from each tensor, checks that
the shared sizes agree, dtypes, devices and stride[-1] == 1, and launches on
torch's current CUDA stream.

The caller must also guarantee what the kernel assumes but cannot check (it
uses 16-byte loads of out_partial and 4-element stores to out):
  * 1 <= num_splits <= max_splits (256 by default);
  * out_partial and out: data_ptr divisible by 16 (out_partial) and by
    4 * out.element_size() (out), and every stride of a dimension whose size
    is > 1 divisible by 4 (strides of size-1 dimensions are never used);
  * batch * seqlen * heads < 2**31.
Anything else (e.g. an odd stride from a sliced view) must be made contiguous
by the caller first.
"""

import tilelang.language as T

_VEC = 4  # fp32 elements per 16-byte load of out_partial


def _pick_block_m(num_vecs: int, threads: int) -> int:
    """Rows per block: a power of two whose row tile splits evenly over the
    threads with 2 (else 3, 1, 4) 16-byte vectors per thread."""
    for per_thread in (2, 3, 1, 4):
        for block_m in (64, 32, 16, 8, 4, 2, 1):
            if block_m * num_vecs == per_thread * threads:
                return block_m
    # head_dim / 4 shares no power of two with the thread count: take the
    # largest tile that still needs at most 2 vectors per thread (the last
    # vector slot is then predicated off for some threads).
    block_m = 1
    while block_m * 2 * num_vecs <= 2 * threads:
        block_m *= 2
    return block_m


def combine_kernel(
    head_dim: int,
    out_dtype: str,
    *,
    threads: int = 128,
    block_m: int | None = None,
    max_splits: int = 256,
    unroll: int = 4,
):
    """Build the combine prim_func (not compiled).

    head_dim: a multiple of 4, at most 512. out_dtype: "float32", "float16"
    or "bfloat16". threads, block_m (rows per thread block, a power of two),
    max_splits and unroll (split-loop unroll factor) are tuning constants.
    """
    if head_dim % _VEC != 0 or not 0 < head_dim <= 512:
        raise ValueError(f"head_dim must be a multiple of {_VEC} in [4, 512], got {head_dim}")
    if out_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unsupported out_dtype {out_dtype!r}")
    if threads % 32 != 0:
        raise ValueError("threads must be a multiple of the warp size")

    num_vecs = head_dim // _VEC
    if block_m is None:
        block_m = _pick_block_m(num_vecs, threads)
    if block_m & (block_m - 1) or block_m > threads:
        raise ValueError("block_m must be a power of two no larger than threads")

    # Phase 2 work split: the tile's block_m * num_vecs vectors, dealt round-robin.
    tile_vecs = block_m * num_vecs
    vecs_per_thread = -(-tile_vecs // threads)
    ragged = tile_vecs % threads != 0
    # Phase 1 work split: `group` adjacent lanes reduce one row (shuffles stay
    # inside a warp); rows_per_pass rows are reduced at once.
    group = min(32, threads // block_m)
    rows_per_pass = threads // group
    lse_threads_per_split = threads // block_m  # phase-1 load: rows fastest
    # Pad the smem rows so the `group` lanes reading consecutive splits of a
    # row hit different banks.
    pitch = block_m + 1
    shfl_offsets = [1 << i for i in reversed(range(group.bit_length() - 1))]  # group/2, ..., 1

    S, B, L, H = T.dynamic("num_splits, batch, seqlen, heads")
    op_ss, op_sb, op_sl, op_sh = T.dynamic("op_ss, op_sb, op_sl, op_sh")
    lp_ss, lp_sb, lp_sl, lp_sh = T.dynamic("lp_ss, lp_sb, lp_sl, lp_sh")
    o_sb, o_sl, o_sh = T.dynamic("o_sb, o_sl, o_sh")
    l_sb, l_sl, l_sh = T.dynamic("l_sb, l_sl, l_sh")

    D = head_dim
    neg_inf = -T.infinity("float32")

    @T.prim_func
    def flash_attn_combine(
        out_partial: T.StridedTensor((S, B, L, H, D), (op_ss, op_sb, op_sl, op_sh, 1), "float32"),
        lse_partial: T.StridedTensor((S, B, L, H), (lp_ss, lp_sb, lp_sl, lp_sh), "float32"),
        out: T.StridedTensor((B, L, H, D), (o_sb, o_sl, o_sh, 1), out_dtype),
        lse: T.StridedTensor((B, L, H), (l_sb, l_sl, l_sh), "float32"),
    ):
        # Rows are r = (b * H + h) * L + l: seqlen fastest, like upstream, so
        # that lse loads/stores are coalesced for its (b, h, l)-major layouts.
        # Flattening b, h and l fills the tiles even when seqlen == 1 (decode).
        num_rows = B * H * L
        with T.Kernel(T.ceildiv(num_rows, block_m), threads=threads) as bx:
            tx = T.get_thread_binding()
            # Contract (see module docstring): lets the vectorizer emit
            # 16-byte loads / 4-element stores despite runtime strides.
            T.assume(op_ss % _VEC == 0)
            T.assume(op_sb % _VEC == 0)
            T.assume(op_sl % _VEC == 0)
            T.assume(op_sh % _VEC == 0)
            T.assume(o_sb % _VEC == 0)
            T.assume(o_sl % _VEC == 0)
            T.assume(o_sh % _VEC == 0)

            # lse_partial of the tile, then turned in place into the scales.
            scales = T.alloc_shared((max_splits, pitch), "float32")
            acc = T.alloc_local((vecs_per_thread * _VEC,), "float32")
            vec_row = T.alloc_local((vecs_per_thread,), "int32")
            vec_b = T.alloc_local((vecs_per_thread,), "int32")
            vec_l = T.alloc_local((vecs_per_thread,), "int32")
            vec_h = T.alloc_local((vecs_per_thread,), "int32")

            # ---- Phase 1a: lse_partial tile -> smem (rows outside the problem read as -inf,
            # which makes their scales 0 so phase 2 never touches them).
            m1 = tx % block_m
            r1 = bx * block_m + m1
            l1 = r1 % L
            h1 = (r1 // L) % H
            b1 = r1 // (L * H)
            for k in T.serial(T.ceildiv(S, lse_threads_per_split)):
                s = tx // block_m + k * lse_threads_per_split
                if s < S:
                    if r1 < num_rows:
                        scales[s, m1] = lse_partial[s, b1, l1, h1]
                    else:
                        scales[s, m1] = neg_inf
            T.sync_threads()

            # ---- Phase 1b: per row max / sum over splits, written back as scales.
            # Every lane of a warp runs the shuffles (the guard is warp-uniform).
            if tx < rows_per_pass * group:
                lane = tx % group
                for p in T.serial(T.ceildiv(block_m, rows_per_pass)):
                    m2 = p * rows_per_pass + tx // group
                    lse_max = T.alloc_var("float32", init=neg_inf)
                    for k in T.serial(T.ceildiv(S, group)):
                        s = lane + k * group
                        if s < S:
                            lse_max = T.max(lse_max, scales[s, m2])
                    for off in shfl_offsets:
                        lse_max = T.max(lse_max, T.shfl_xor(lse_max, off))
                    # All splits -inf: shift by 0 so exp() gives 0, not NaN.
                    shift = T.if_then_else(lse_max == neg_inf, T.float32(0), lse_max)
                    total = T.alloc_var("float32", init=0.0)
                    for k in T.serial(T.ceildiv(S, group)):
                        s = lane + k * group
                        if s < S:
                            total = total + T.exp(scales[s, m2] - shift)
                    for off in shfl_offsets:
                        total = total + T.shfl_xor(total, off)
                    inv_sum = T.if_then_else((total == 0) | (total != total), T.float32(0), 1.0 / total)
                    for k in T.serial(T.ceildiv(S, group)):
                        s = lane + k * group
                        if s < S:
                            scales[s, m2] = T.exp(scales[s, m2] - shift) * inv_sum
                    r2 = bx * block_m + m2
                    if lane == 0 and r2 < num_rows:
                        lse[r2 // (L * H), r2 % L, (r2 // L) % H] = T.log(total) + lse_max
            T.sync_threads()

            # ---- Phase 2: stream out_partial. Vector slot i of the tile is
            # row i // num_vecs, columns 4 * (i % num_vecs) + [0, 4).
            for j in T.unroll(vecs_per_thread):
                slot = tx + j * threads
                m = T.min(slot // num_vecs, block_m - 1) if ragged else slot // num_vecs
                r = bx * block_m + m
                # Rows outside the problem (and ragged slots) get row -1: no loads, no store.
                vec_row[j] = T.if_then_else((r < num_rows) & (slot < tile_vecs), m, -1)
                vec_b[j] = r // (L * H)
                vec_l[j] = r % L
                vec_h[j] = (r // L) % H
                for q in T.vectorized(_VEC):
                    acc[j * _VEC + q] = 0.0

            for s in T.unroll(S, annotations={"pragma_unroll_factor": unroll}):
                for j in T.unroll(vecs_per_thread):
                    if vec_row[j] >= 0:
                        sc = scales[s, vec_row[j]]
                        if sc > 0:
                            col = (tx + j * threads) % num_vecs * _VEC
                            for q in T.vectorized(_VEC):
                                acc[j * _VEC + q] += sc * out_partial[s, vec_b[j], vec_l[j], vec_h[j], col + q]

            for j in T.unroll(vecs_per_thread):
                if vec_row[j] >= 0:
                    col = (tx + j * threads) % num_vecs * _VEC
                    for q in T.vectorized(_VEC):
                        out[vec_b[j], vec_l[j], vec_h[j], col + q] = T.Cast(out_dtype, acc[j * _VEC + q])

    return flash_attn_combine
