"""TileLang kernel for FlashAttention-3's ``flash_attn_combine``.

Merges split-KV partial attention results. For every row r = (b, l, h):

    lse_max  = max_s lse_partial[s, r]
    m        = 0 if lse_max == -inf else lse_max
    sum      = sum_s exp(lse_partial[s, r] - m)
    lse[r]   = log(sum) + lse_max                      (-inf if every split is -inf)
    scale_s  = exp(lse_partial[s, r] - m) * (1 / sum)  (0 if sum is 0 or NaN)
    out[r,:] = sum over s with scale_s > 0 of scale_s * out_partial[s, r, :]

Splits whose scale is not > 0 are never added, so garbage (even NaN) in empty
splits cannot leak into ``out``. They are not read either, except the first
``prefetch`` (default 1) splits, which are loaded speculatively while the
scales are computed (as upstream does) and dropped if their scale is 0. The
arithmetic follows upstream (expf, logf, fmaxf, reciprocal of the sum, fp32
accumulation in split order). One difference: upstream's kernel returns early
when num_splits <= 1; this one applies the formula for every num_splits >= 1.

``combine_kernel(head_dim, out_dtype)`` returns an uncompiled ``T.prim_func``.
Only head_dim, out_dtype and the tuning constants are baked in; num_splits,
batch, seqlen, heads and every stride are runtime values, so one compiled
kernel serves all sizes. Parameters of the prim_func, in order:

    out_partial  float32    (num_splits, batch, seqlen, heads, head_dim)  stride[-1] == 1
    lse_partial  float32    (num_splits, batch, seqlen, heads)            any strides
    out          out_dtype  (batch, seqlen, heads, head_dim)              stride[-1] == 1
    lse          float32    (batch, seqlen, heads)                        any strides

All four are strided tensors: the compiled kernel takes the torch tensors
(views) as they are, ``kernel(*launch_args(out_partial, lse_partial, out, lse))``.
Its host code reads shapes and strides from them, checks dtypes, devices,
stride[-1] == 1 and that shared sizes agree, and launches on torch's current
CUDA stream. One launch: grid ceil(batch * seqlen * heads / block_m), no
workspace, no host sync, so it can be captured in a CUDA graph.

What the kernel assumes but cannot check, and the caller must guarantee
(``check_layout`` does it; fall back to ``.contiguous()`` copies otherwise):
  * 1 <= num_splits <= max_splits (256 by default);
  * out_partial.data_ptr() % 16 == 0 and out.data_ptr() % (4 * out.element_size()) == 0;
  * for out_partial and out, the stride of every dimension of size > 1 is a
    multiple of 4 (16-byte loads / 4-element stores with runtime strides);
  * batch * seqlen * heads < 2**31 and every stride < 2**31 (int32 kernel
    arguments; offsets are computed in int64).
Skip the launch when batch * seqlen * heads == 0 (an empty grid is a launch
error).
"""

import tilelang.language as T

_VEC = 4  # fp32 elements per 16-byte load of out_partial

# Compiler passes this kernel does by hand: __syncthreads() are placed
# explicitly (the automatic pass cannot see that each smem element of phase 1b
# has a single owner lane), and the out_partial/out accesses are in bounds by
# construction (guarded by row < num_rows), so no extra bounds checks.
_PASS_CONFIGS = {
    "tl.disable_thread_storage_sync": True,
    "tl.disable_safe_memory_legalize": True,
}


def _pick_block_m(num_vecs: int, threads: int) -> int:
    """Rows per block: a power of two whose tile of 16-byte vectors splits
    evenly over the threads, preferring 2 (then 3, 1, 4) vectors per thread."""
    for per_thread in (2, 3, 1, 4):
        for block_m in (64, 32, 16, 8, 4, 2, 1):
            if block_m * num_vecs == per_thread * threads:
                return block_m
    # head_dim / 4 has an odd factor that the thread count lacks: take the
    # largest tile with at most 2 vectors per thread (some slots idle).
    block_m = 1
    while 2 * block_m * num_vecs <= 2 * threads and 2 * block_m <= 64:
        block_m *= 2
    return block_m


def combine_kernel(
    head_dim: int,
    out_dtype: str,
    *,
    threads: int = 128,
    block_m: int | None = None,
    max_splits: int = 256,
    unroll: int = 2,
    prefetch: int = 1,
    min_blocks_per_sm: int | None = None,
):
    """Build the combine prim_func (not compiled).

    head_dim: a multiple of 4 in [4, 512]. out_dtype: "float32", "float16" or
    "bfloat16". Tuning constants: threads per block, block_m (rows per block,
    a power of two; default picked from head_dim), max_splits (size of the
    scale table in shared memory), unroll (split-loop unroll factor),
    prefetch (leading splits of out_partial loaded before the scales are
    known, to overlap phase 1's latency) and min_blocks_per_sm (register cap).
    """
    if head_dim % _VEC != 0 or not 0 < head_dim <= 512:
        raise ValueError(f"head_dim must be a multiple of {_VEC} in [4, 512], got {head_dim}")
    if out_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unsupported out_dtype {out_dtype!r}")
    if threads % 32 != 0 or threads > 1024:
        raise ValueError("threads must be a multiple of 32, at most 1024")
    num_vecs = head_dim // _VEC
    if block_m is None:
        block_m = _pick_block_m(num_vecs, threads)
    if block_m & (block_m - 1) or block_m > threads:
        raise ValueError("block_m must be a power of two no larger than threads")
    if prefetch < 0:
        raise ValueError("prefetch must be >= 0")

    # Phase 2: the tile's block_m * num_vecs vectors are dealt round-robin;
    # slot i is row i // num_vecs, columns 4 * (i % num_vecs) + [0, 4).
    tile_vecs = block_m * num_vecs
    vecs_per_thread = -(-tile_vecs // threads)
    ragged = tile_vecs % threads != 0
    # Phase 1a (lse -> smem): rows fastest across threads, so the loads are
    # coalesced for upstream's seqlen-contiguous lse_partial.
    split_step = threads // block_m
    # Phase 1b: `group` adjacent lanes (inside one warp) reduce one row.
    group = min(32, threads // block_m)
    shfl_offsets = [group >> k for k in range(1, group.bit_length())]  # group/2, ..., 1
    # +1 pads the smem rows: lanes of a group read consecutive splits of one
    # row, which would otherwise hit the same bank when block_m % 32 == 0 or
    # share banks for smaller powers of two.
    pitch = block_m + 1

    S, B, L, H = T.dynamic("num_splits, batch, seqlen, heads")
    op_ss, op_sb, op_sl, op_sh = T.dynamic("op_ss, op_sb, op_sl, op_sh")
    lp_ss, lp_sb, lp_sl, lp_sh = T.dynamic("lp_ss, lp_sb, lp_sl, lp_sh")
    o_sb, o_sl, o_sh = T.dynamic("o_sb, o_sl, o_sh")
    l_sb, l_sl, l_sh = T.dynamic("l_sb, l_sl, l_sh")
    D = head_dim

    @T.prim_func
    def flash_attn_combine(
        out_partial: T.StridedTensor((S, B, L, H, D), (op_ss, op_sb, op_sl, op_sh, 1), "float32"),
        lse_partial: T.StridedTensor((S, B, L, H), (lp_ss, lp_sb, lp_sl, lp_sh), "float32"),
        out: T.StridedTensor((B, L, H, D), (o_sb, o_sl, o_sh, 1), out_dtype),
        lse: T.StridedTensor((B, L, H), (l_sb, l_sl, l_sh), "float32"),
    ):
        T.annotate_pass_configs(_PASS_CONFIGS)
        # Row r = (b * heads + h) * seqlen + l: seqlen fastest, like upstream.
        # One flat row space (not a batch grid axis) keeps tiles full when
        # seqlen == 1 (decode).
        num_rows = B * H * L
        with T.Kernel(T.ceildiv(num_rows, block_m), threads=threads) as bx:
            tx = T.get_thread_binding()
            # The caller's layout contract: lets the vectorizer emit 16-byte
            # loads and 4-element stores although the strides are runtime values.
            T.assume(op_ss % _VEC == 0)
            T.assume(op_sb % _VEC == 0)
            T.assume(op_sl % _VEC == 0)
            T.assume(op_sh % _VEC == 0)
            T.assume(o_sb % _VEC == 0)
            T.assume(o_sl % _VEC == 0)
            T.assume(o_sh % _VEC == 0)

            if min_blocks_per_sm:
                T.annotate_min_blocks_per_sm(min_blocks_per_sm)

            # lse_partial of the tile's rows, turned in place into the scales.
            scales = T.alloc_shared((max_splits, pitch), "float32")
            acc = T.alloc_local((vecs_per_thread * _VEC,), "float32")
            ahead = T.alloc_local((max(prefetch, 1), vecs_per_thread * _VEC), "float32")
            vec_b = T.alloc_local((vecs_per_thread,), "int32")
            vec_l = T.alloc_local((vecs_per_thread,), "int32")
            vec_h = T.alloc_local((vecs_per_thread,), "int32")

            # ---- Phase 0: this thread's vector slots (slot i of the tile is row
            # i // num_vecs, columns 4 * (i % num_vecs) + [0, 4)), and loads of
            # the first `prefetch` splits, issued now so they are in flight
            # while phase 1 computes the scales. They are speculative: phase 2
            # adds them only where the scale is > 0, so an empty split's
            # contents never reach `out` (it only costs the read).
            for j in T.unroll(vecs_per_thread):
                slot = tx + j * threads
                r = bx * block_m + slot // num_vecs
                vec_b[j] = T.truncdiv(r, L * H)
                vec_l[j] = T.truncmod(r, L)
                vec_h[j] = T.truncmod(T.truncdiv(r, L), H)
                col = slot % num_vecs * _VEC
                for p in T.unroll(prefetch):
                    if p < S and r < num_rows and slot < tile_vecs:
                        for q in T.vectorized(_VEC):
                            ahead[p, j * _VEC + q] = out_partial[p, vec_b[j], vec_l[j], vec_h[j], col + q]

            # ---- Phase 1a: lse_partial -> smem. Rows past the end read as
            # -inf, so their scales come out 0 and phase 2 never loads them.
            # (b, l, h) go through int32 registers: indexing with the raw
            # expressions would redo the divisions in int64 per access.
            m1 = tx % block_m
            r1 = bx * block_m + m1
            b1 = T.alloc_var("int32", init=T.truncdiv(r1, L * H))
            l1 = T.alloc_var("int32", init=T.truncmod(r1, L))
            h1 = T.alloc_var("int32", init=T.truncmod(T.truncdiv(r1, L), H))
            for k in T.serial(T.ceildiv(S, split_step)):
                s = tx // block_m + k * split_step
                if s < S:
                    scales[s, m1] = T.if_then_else(r1 < num_rows, lse_partial[s, b1, l1, h1], -T.infinity("float32"))
            T.sync_threads()

            # ---- Phase 1b: max / sum over the splits of row m2 by the `group`
            # lanes, then scale = exp(lse - shift) / sum back into smem.
            # Each smem element is read and rewritten by the same lane only.
            # The guard is warp-uniform (whole warps), so shuffles see full warps.
            if tx < block_m * group:
                lane = tx % group
                m2 = tx // group
                lse_max = T.alloc_var("float32", init=-T.infinity("float32"))
                for k in T.serial(T.ceildiv(S, group)):
                    s = lane + k * group
                    if s < S:
                        lse_max = T.max(lse_max, scales[s, m2])
                for off in shfl_offsets:
                    lse_max = T.max(lse_max, T.shfl_xor(lse_max, off))
                # All splits -inf: shift by 0 so the exps are 0, not NaN.
                shift = T.if_then_else(lse_max == -T.infinity("float32"), T.float32(0), lse_max)
                total = T.alloc_var("float32", init=0.0)
                for k in T.serial(T.ceildiv(S, group)):
                    s = lane + k * group
                    if s < S:
                        total = total + T.exp(scales[s, m2] - shift)
                for off in shfl_offsets:
                    total = total + T.shfl_xor(total, off)
                inv_sum = T.if_then_else((total == 0) | T.isnan(total), T.float32(0), 1.0 / total)
                for k in T.serial(T.ceildiv(S, group)):
                    s = lane + k * group
                    if s < S:
                        scales[s, m2] = T.exp(scales[s, m2] - shift) * inv_sum
                r2 = bx * block_m + m2
                if lane == 0 and r2 < num_rows:
                    b2 = T.alloc_var("int32", init=T.truncdiv(r2, L * H))
                    l2 = T.alloc_var("int32", init=T.truncmod(r2, L))
                    h2 = T.alloc_var("int32", init=T.truncmod(T.truncdiv(r2, L), H))
                    lse[b2, l2, h2] = T.log(total) + lse_max
            T.sync_threads()

            # ---- Phase 2: stream out_partial with 16-byte loads, fp32 accumulate.
            # Select, not multiply-by-0: a NaN scale or a skipped load adds nothing.
            for j in T.unroll(vecs_per_thread):
                for q in T.vectorized(_VEC):
                    acc[j * _VEC + q] = 0.0
            for p in T.unroll(prefetch):
                if p < S:
                    for j in T.unroll(vecs_per_thread):
                        slot = tx + j * threads
                        sc = scales[p, T.min(slot // num_vecs, block_m - 1) if ragged else slot // num_vecs]
                        use = (sc > 0) & (slot < tile_vecs) if ragged else sc > 0
                        for q in T.vectorized(_VEC):
                            acc[j * _VEC + q] += T.if_then_else(use, sc * ahead[p, j * _VEC + q], T.float32(0))

            for s in T.unroll(prefetch, S, annotations={"pragma_unroll_factor": unroll}):
                for j in T.unroll(vecs_per_thread):
                    slot = tx + j * threads
                    # Ragged tiles: idle slots point at a real row, so mask them.
                    sc = scales[s, T.min(slot // num_vecs, block_m - 1) if ragged else slot // num_vecs]
                    use = (sc > 0) & (slot < tile_vecs) if ragged else sc > 0
                    col = slot % num_vecs * _VEC
                    # The load must stay inside if_then_else (a Python temporary
                    # would hoist it out of the condition and read every split).
                    for q in T.vectorized(_VEC):
                        acc[j * _VEC + q] += T.if_then_else(
                            use, sc * out_partial[s, vec_b[j], vec_l[j], vec_h[j], col + q], T.float32(0))

            for j in T.unroll(vecs_per_thread):
                slot = tx + j * threads
                if bx * block_m + slot // num_vecs < num_rows and slot < tile_vecs:
                    col = slot % num_vecs * _VEC
                    for q in T.vectorized(_VEC):
                        out[vec_b[j], vec_l[j], vec_h[j], col + q] = T.Cast(out_dtype, acc[j * _VEC + q])

    return flash_attn_combine


def build(head_dim: int, out_dtype, **tuning):
    """``combine_kernel`` for a torch dtype (or tilelang dtype string) out_dtype,
    as ``mate.ops.fmha.support`` calls it with a variant dict."""
    name = str(out_dtype).removeprefix("torch.")
    return combine_kernel(head_dim, name, **tuning)


def launch_args(out_partial, lse_partial, out, lse):
    """Arguments for the compiled kernel, in prim_func order.

    The kernel reads shapes and strides from the tensors themselves, so this
    is the identity on the four views: no copies, no host sync. Shapes:
    out_partial (S, B, L, H, D) fp32, lse_partial (S, B, L, H) fp32,
    out (B, L, H, D) out_dtype, lse (B, L, H) fp32; e.g. upstream's lse output
    is ``torch.empty(B, H, L).transpose(1, 2)``.
    """
    return (out_partial, lse_partial, out, lse)


def check_layout(out_partial, lse_partial, out, lse, max_splits: int = 256) -> bool:
    """True if the tensors meet the kernel's unchecked assumptions (module
    docstring); shapes, dtypes and devices are checked by the kernel's host
    code. Reads only metadata: no host sync."""
    if not 1 <= out_partial.shape[0] <= max_splits:
        return False
    if out_partial.data_ptr() % 16 or out.data_ptr() % (_VEC * out.element_size()):
        return False
    for t in (out_partial, out):
        if t.stride(-1) != 1:
            return False
        # Contiguous with a last size that is a multiple of 4 (the usual case): so is every stride,
        # no per-dimension loop (a generator costs a few us of host time per call).
        if not (t.shape[-1] % _VEC == 0 and t.is_contiguous()) and any(
                n > 1 and st % _VEC for n, st in zip(t.shape[:-1], t.stride()[:-1], strict=True)):
            return False
    rows = out.shape[0] * out.shape[1] * out.shape[2]
    strides = out_partial.stride() + lse_partial.stride() + out.stride() + lse.stride()
    return rows < 2**31 and min(strides) >= 0 and max(strides) < 2**31
