"""TileLang kernel that appends new keys/values to a KV cache, with rotary embedding, for
``flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, ...)``.

It runs before the attention kernels (which then read the updated cache), on the device and
without host sync, so the whole call stays CUDA-graph capturable. ``build(dtype, head_dim,
head_dim_v)`` returns an uncompiled ``T.prim_func``; everything else is a runtime value (sizes,
dense or paged cache, page size, cache_batch_idx, rotary on or off, interleaved or not, the
rotary dimension), so one compiled kernel per (dtype, head_dim, head_dim_v) serves every call.
Parameters of the prim_func, in order:

    q              dtype    (total_q, heads_q, d)          queries (read only with rotary)
    cu_seqlens_q   int32    (batch + 1,)                   query rows of each sequence
    q_rot          dtype    (total_q, heads_q, d)          written: the rotated queries
    k_new          dtype    (total_new, heads_k, d)        new keys
    v_new          dtype    (total_new, heads_k, dv)       new values
    cu_seqlens_new int32    (batch + 1,)                   new rows of each sequence
    k_cache        dtype    dense (batch_cache, seqlen_cache, heads_k, d), or paged
                            (num_pages, page_size, heads_k, d)   written in place
    v_cache        dtype    like k_cache with dv              written in place
    page_table     int32    (batch_table, pages_per_seq)   (read only when paged)
    cache_rows     int32    (batch,)  cache_batch_idx      (read only when has_rows)
    cache_seqlens  int32    (batch,)  keys already in the cache (absolute rows)
    rotary_start   int32    (batch,)  rotary position of the first new key (rotary_seqlens,
                                      default cache_seqlens)
    cos, sin       dtype    (seqlen_ro, rotary_dim / 2)   (read only when rotary_half > 0)
    q_blocks       int32    number of leading grid blocks that rotate queries (0: none)
    q_per_token    int32    1: query i rotates at rotary_start + i; 0: every query at
                            rotary_start (FlashAttention-3: per token iff causal or local)
    rotary_half    int32    rotary_dim / 2; 0 = no rotary
    interleaved    int32    1: pairs (2p, 2p + 1) (GPT-J); 0: (p, p + rotary_dim / 2) (NeoX)
    has_rows       int32    1: sequence b's cache row (or page-table row) is cache_rows[b]
    paged          int32    1: key row j of cache row r lives in page page_table[r, j //
                            page_size] at slot j % page_size; 0: dense, k_cache[r, j]

Semantics (FlashAttention-3, :func:`mate.ops.fmha.reference.attention_forward`): new key i
of sequence b (row cu_seqlens_new[b] + i) is rotated at position rotary_start[b] + i and
written, with its value, at logical cache row cache_seqlens[b] + i of cache row b (or
cache_rows[b]); pairs (a, b) -> (a cos - b sin, a sin + b cos) computed in float32 and
rounded to the cache dtype; channels past rotary_dim pass through. Query i of sequence b is
rotated likewise into q_rot. Writes that would fall outside the cache (a row past its capacity,
a page index outside [0, num_pages)) are dropped rather than corrupting memory: the caller
validates sizes it can see on the host.

Design: a grid of (q_blocks + ceil(total_new / TOKENS), heads_q) blocks of 128 threads; each
block takes TOKENS consecutive rows of one head. A block first finds each row's sequence by a
binary search in its cumulative lengths (so no per-sequence maximum is needed on the host),
then rotates one channel pair per thread and iteration.
"""

import tilelang.language as T
import torch

from mate import constants

DTYPES = ("float16", "bfloat16", "float8_e4m3fn")  # FP8: rotation in float32, rounded back to e4m3
TOKENS = 8  # rows per block
THREADS = 128
PASS_CONFIGS = {"tl.enable_fast_math": False}


def build(dtype, head_dim: int, head_dim_v: int | None = None):
    """Build the append prim_func (not compiled). See the module docstring."""
    dtype = str(dtype).replace("torch.", "")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    D = int(head_dim)
    DV = int(head_dim_v or head_dim)
    if D % 8 or DV % 8 or not (8 <= D <= 256 and 8 <= DV <= 512):
        raise ValueError(f"head dims must be multiples of 8, d in [8, 256] and dv in [8, 512], got ({D}, {DV})")
    BT = TOKENS
    half = D // 2

    total_q, heads_q, total_new, heads_k, batch_plus_1 = T.dynamic("total_q, heads_q, total_new, heads_k, "
                                                                   "batch_plus_1")
    kv0, kv1, pt0, pt1, n_rows, n_seq, ro_len, ro_half = T.dynamic("kv0, kv1, pt0, pt1, n_rows, n_seq, ro_len, "
                                                                   "ro_half")

    @T.prim_func
    def kvcache_append(
        q: T.Tensor((total_q, heads_q, D), dtype),
        cu_seqlens_q: T.Tensor((batch_plus_1,), "int32"),
        q_rot: T.Tensor((total_q, heads_q, D), dtype),
        k_new: T.Tensor((total_new, heads_k, D), dtype),
        v_new: T.Tensor((total_new, heads_k, DV), dtype),
        cu_seqlens_new: T.Tensor((batch_plus_1,), "int32"),
        k_cache: T.Tensor((kv0, kv1, heads_k, D), dtype),
        v_cache: T.Tensor((kv0, kv1, heads_k, DV), dtype),
        page_table: T.Tensor((pt0, pt1), "int32"),
        cache_rows: T.Tensor((n_rows,), "int32"),
        cache_seqlens: T.Tensor((n_seq,), "int32"),
        rotary_start: T.Tensor((n_seq,), "int32"),
        cos: T.Tensor((ro_len, ro_half), dtype),
        sin: T.Tensor((ro_len, ro_half), dtype),
        q_blocks: T.int32,
        q_per_token: T.int32,
        rotary_half: T.int32,
        interleaved: T.int32,
        has_rows: T.int32,
        paged: T.int32,
    ):
        T.annotate_pass_configs(PASS_CONFIGS)
        with T.Kernel(q_blocks + T.ceildiv(total_new, BT), heads_q, threads=THREADS) as (bx, by):
            seq = T.alloc_shared((BT,), "int32")  # sequence of each row of the block, -1: none
            idx = T.alloc_shared((BT,), "int32")  # the row's index within its sequence
            dst = T.alloc_shared((BT, 2), "int32")  # cache (page or row, slot) of each new row, -1: none
            # Per-thread scalars.
            is_q = T.alloc_var("int32", init=T.if_then_else(bx < q_blocks, 1, 0))
            t0 = T.alloc_var("int32", init=T.if_then_else(bx < q_blocks, bx, bx - q_blocks) * BT)
            batch = T.alloc_var("int32", init=batch_plus_1 - 1)
            row = T.alloc_var("int32", init=0)
            lo = T.alloc_var("int32", init=0)
            hi = T.alloc_var("int32", init=0)
            mid = T.alloc_var("int32", init=0)
            cu_lo = T.alloc_var("int32", init=0)
            cu_hi = T.alloc_var("int32", init=0)
            b = T.alloc_var("int32", init=0)
            e = T.alloc_var("int32", init=0)
            i = T.alloc_var("int32", init=0)
            p = T.alloc_var("int32", init=0)
            j0 = T.alloc_var("int32", init=0)
            j1 = T.alloc_var("int32", init=0)
            pos = T.alloc_var("int32", init=0)
            crow = T.alloc_var("int32", init=0)
            cpos = T.alloc_var("int32", init=0)
            page = T.alloc_var("int32", init=0)
            c = T.alloc_var("float32", init=1.0)
            s = T.alloc_var("float32", init=0.0)
            x0 = T.alloc_var("float32", init=0.0)
            x1 = T.alloc_var("float32", init=0.0)
            tx = T.get_thread_binding()

            # 1. Each row's sequence: the largest b with cu[b] <= row (rows outside [cu[0], cu[batch])
            #    belong to none), and for new rows their cache destination.
            if tx < BT:
                row = t0 + tx
                if is_q != 0:
                    cu_lo = cu_seqlens_q[0]
                    cu_hi = cu_seqlens_q[batch]
                else:
                    cu_lo = cu_seqlens_new[0]
                    cu_hi = cu_seqlens_new[batch]
                seq[tx] = -1
                idx[tx] = 0
                dst[tx, 0] = -1
                dst[tx, 1] = 0
                if row >= cu_lo and row < cu_hi:
                    lo = 0
                    hi = batch
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        if is_q != 0:
                            cu_lo = cu_seqlens_q[mid]
                        else:
                            cu_lo = cu_seqlens_new[mid]
                        if cu_lo <= row:
                            lo = mid
                        else:
                            hi = mid
                    if is_q != 0:
                        cu_lo = cu_seqlens_q[lo]
                    else:
                        cu_lo = cu_seqlens_new[lo]
                    seq[tx] = lo
                    idx[tx] = row - cu_lo
                    if is_q == 0:
                        crow = lo
                        if has_rows != 0:
                            crow = cache_rows[lo]
                        cpos = cache_seqlens[lo] + row - cu_lo
                        if paged != 0:
                            if cpos >= 0 and cpos < pt1 * kv1 and crow >= 0 and crow < pt0:
                                page = page_table[crow, cpos // kv1]
                                if page >= 0 and page < kv0:
                                    dst[tx, 0] = page
                                    dst[tx, 1] = cpos % kv1
                        else:
                            if cpos >= 0 and cpos < kv1 and crow >= 0 and crow < kv0:
                                dst[tx, 0] = crow
                                dst[tx, 1] = cpos
            T.sync_threads()

            # 2. One channel pair (p, row i of the block) per thread and iteration: (2p, 2p + 1)
            #    interleaved, (p, p + rotary_half) NeoX, (2p, 2p + 1) unrotated past rotary_dim.
            if is_q != 0 or by < heads_k:
                for it in T.serial(-(-BT * half // THREADS)):
                    e = T.min(it * THREADS + tx, BT * half - 1)
                    i = e // half
                    p = e % half
                    b = seq[i]
                    if it * THREADS + tx < BT * half and b >= 0 and (is_q != 0 or dst[i, 0] >= 0):
                        j0 = 2 * p
                        j1 = 2 * p + 1
                        c = 1.0
                        s = 0.0
                        if p < rotary_half:
                            if interleaved == 0:
                                j0 = p
                                j1 = p + rotary_half
                            pos = rotary_start[b]
                            if is_q == 0 or q_per_token != 0:
                                pos = pos + idx[i]
                            pos = T.max(T.min(pos, ro_len - 1), 0)
                            c = T.cast(cos[pos, p], "float32")
                            s = T.cast(sin[pos, p], "float32")
                        if is_q != 0:
                            x0 = T.cast(q[t0 + i, by, j0], "float32")
                            x1 = T.cast(q[t0 + i, by, j1], "float32")
                            q_rot[t0 + i, by, j0] = T.cast(x0 * c - x1 * s, dtype)
                            q_rot[t0 + i, by, j1] = T.cast(x0 * s + x1 * c, dtype)
                        else:
                            x0 = T.cast(k_new[t0 + i, by, j0], "float32")
                            x1 = T.cast(k_new[t0 + i, by, j1], "float32")
                            k_cache[dst[i, 0], dst[i, 1], by, j0] = T.cast(x0 * c - x1 * s, dtype)
                            k_cache[dst[i, 0], dst[i, 1], by, j1] = T.cast(x0 * s + x1 * c, dtype)
                if is_q == 0:
                    for it in T.serial(-(-BT * DV // THREADS)):
                        e = T.min(it * THREADS + tx, BT * DV - 1)
                        i = e // DV
                        if it * THREADS + tx < BT * DV and dst[i, 0] >= 0:
                            v_cache[dst[i, 0], dst[i, 1], by, e % DV] = v_new[t0 + i, by, e % DV]

    return kvcache_append


def launch(kernel, q, cu_seqlens_q, q_rot, k_new, v_new, cu_seqlens_new, k_cache, v_cache, page_table,
           cache_rows, cache_seqlens, rotary_start, cos, sin, q_per_token: bool, interleaved: bool) -> None:
    """Run a compiled append kernel on torch tensors (no host sync).

    q / q_rot (total_q, heads_q, d) (q_rot None: no query rotation), k_new / v_new (total_new,
    heads_k, d / dv), cu_seqlens_* int32 (batch + 1,), the caches 4-D and contiguous (written in
    place), page_table (or None: dense), cache_rows (or None), cache_seqlens and rotary_start
    int32 (batch,), cos / sin (seqlen_ro, rotary_dim / 2) or None (no rotary).
    """
    rotary = cos is not None
    q_blocks = -(-q.shape[0] // TOKENS) if rotary and q_rot is not None else 0
    if q_blocks == 0 and k_new.shape[0] == 0:
        return
    # Cached stand-ins for the inputs this call does not read.
    table = page_table if page_table is not None else constants.unread(torch.int32, 2, q.device)
    if not rotary:
        cos = sin = constants.unread(q.dtype, 2, q.device)
    kernel(q, cu_seqlens_q, q if q_rot is None else q_rot, k_new, v_new, cu_seqlens_new, k_cache, v_cache, table,
           cu_seqlens_new if cache_rows is None else cache_rows, cache_seqlens, rotary_start, cos, sin,
           int(q_blocks), int(bool(q_per_token)), int(cos.shape[1]) if rotary else 0, int(bool(interleaved)),
           int(cache_rows is not None), int(page_table is not None))
