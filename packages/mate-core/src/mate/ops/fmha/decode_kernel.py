"""TileLang split-KV attention over a KV cache, for Hopper: ``flash_attn_with_kvcache`` decode
(1-8 queries per sequence), and every call on a paged cache or with FP8 inputs (any query count,
fixed or varlen, mixed prefill/decode batches included).

``build(dtype, head_dim, paged, causal, leftpad, batch_idx, sink, local, softcap, cp, varlen_q,
head_dim_v, qv, split_kv)`` returns an uncompiled ``T.prim_func``. Only those static parameters and the
tile configuration are baked in; batch, query counts, head counts, the cache's sizes (page count, page size,
seqlen_cache), num_splits and the cache_seqlens values are runtime values, so one compiled kernel
serves every size and every page size (1 included). Parameters of the prim_func, in order:

    q              dtype    (total_q, heads_q, d): queries of all sequences   contiguous
    qv             dtype    (total_q, heads_q, dv)                                (qv)
    k              dtype    paged: (num_pages, page_size, heads_k, d)         contiguous
                            dense: (batch_cache, seqlen_cache, heads_k, d)    contiguous
    v              dtype    like k, with dv (= d unless qv) as last size      contiguous
    page_table     int32    (batch_cache, max_pages)                          (paged)
    cu_seqlens_q   int32    (batch + 1,) query rows of each sequence           (varlen_q)
    tile_seq, tile_row int32 (tiles,) sequence and first row of each 64-row tile (varlen_q)
    cache_seqlens  int32    (batch,)  end of each sequence's keys (seqused_k)
    cache_batch_idx int32   (batch,)  cache (or page-table) row of each sequence   (batch_idx)
    cache_leftpad  int32    (batch,)  first key row of each sequence               (leftpad)
    sink           float32  (heads_q,) learnable sink logits                       (sink)
    cp_total       int32    (batch,)  global key count of each sequence            (cp)
    q/k/v_descale  float32  (batch, heads_k) dequantization factors         (float8 dtype)
    out_partial    float32  (num_splits, total_q, heads_q, dv)                contiguous, written
    lse_partial    float32  (num_splits, heads_q, total_q)                    contiguous, written
                   without split_kv (one split, no combine): out (total_q, heads_q, dv) in the
                   output dtype (bfloat16 for FP8) and lse flat: (heads_q, total_q) with varlen_q,
                   else (batch, heads_q, max_seqlen_q)
    tile_count     int32    tiles in the grid
    max_seqlen_q   int32    queries per sequence (the most, with varlen_q)
    softmax_scale  float32
    window_left, window_right, attention_chunk  int32   (local; -1 / 0: unbounded)
    softcap_value  float32                                                     (softcap)
    cp_world_size, cp_rank            int32   (cp)

Without varlen_q, sequence b's queries are rows b * max_seqlen_q ... of q (a (batch, seqlen_q,
...) tensor viewed flat).
When a static flag is off its tensor is not read (the host passes any int32 / float32 1-D
tensor, e.g. cache_seqlens itself), so no dummy is allocated per call.

Semantics (FlashAttention-3): sequence b reads cache row c = cache_batch_idx[b] (default b) and has
seqlen_k = cache_seqlens[b] - cache_leftpad[b] keys: key j is cache row leftpad + j, i.e. dense k[c,
leftpad + j] or paged k[page_table[c, (leftpad + j) // page_size], (leftpad + j) % page_size]. Query
head h reads kv head h // (heads_q // heads_k). With qv (FA3's, for MLA-style absorbed attention: d
= 64, dv = 256 or 512, fp16/bf16) the scores gain qv . v: q.k + qv.v. Causal is bottom-right
aligned: query i sits at position i + seqlen_k - seqlen_q and key j at j (with context parallelism,
key j at j * cp_world_size + cp_rank and queries aligned to cp_total[b]); causal: key position <=
query position; local: query position - window_left <= key position <= query position +
window_right, and both in the same attention_chunk. Scores are softmax_scale * q.k, then softcap *
tanh(scores / softcap). A learnable sink adds exp(sink[h]) to the softmax denominator only. Each
tile walks only the key blocks its rows can see (a window of 128 keys reads ~2 blocks).

Work split: grid (tiles, num_splits, heads_k). GQA is packed: the seqlen_q * group
query rows of one kv head (row r = query i * group + head offset g, group = heads_q // heads_k)
share one tile of block_m = 64 rows (row_blocks = ceil(seqlen_q * group / 64) tiles when there
are more; with varlen_q the host's tile map lists only the tiles that exist). The n_blocks key blocks of
block_n keys that a tile's rows can see are dealt in contiguous runs of ceil(n_blocks /
num_splits) blocks: split s takes the tile's blocks
[s * per, min((s + 1) * per, n_blocks)). Each split writes its normalized partial output and
its lse (natural log) for its rows; a split with no block, or a row that sees no key of the
split, writes out 0 and lse -inf, so ``combine_kernel`` gives it weight 0. The sink joins split 0
as one more score (value 0): split 0 starts its online softmax from max = sink, sum = 1, so the
combine's merge counts it exactly once. The caller's combine then merges the splits (``launch``
does both).

Kernel design: 128 threads (one warpgroup). Q is loaded once into shared memory. K and V blocks
stream through a ring of ``stages`` shared-memory slots, written by hand-issued 16-byte cp.async
(TileLang's T.Pipelined cannot pipeline deeper than one block when the trip count is a runtime
value: see ``default_config``): iteration t issues block t + stages - 1 and waits only for block
t, so stages - 1 blocks are in flight while block t is computed. Each thread copies fixed rows
of a block, so it looks their pages up itself, one iteration ahead: the page-table loads for
block t + stages are issued before block t's math and used by the next iteration, which hides
their latency (the old single-stage kernel waited on them before every gather). Rows past
seqlen_k load a clamped (valid) row and are masked to -inf; blocks past the split's end are
predicated off (cp.async zero-fills, no global read). S = Q K^T (wgmma, shared operands) and O +=
P V (wgmma, P in registers) run on the tensor cores (T.gemm); online softmax with exp2, a row
whose max is still -inf using 0 as its max. A split with no key block still runs one fully
masked block, so every path issues the same gemms. FP8 K/V blocks stream as fp8 (16 per copy);
S = Q K^T runs on fp8 wgmma and each V block is widened to fp16 in shared memory for P V (fp8
wgmma needs both operands K-major, V is not); q's and k's descales scale the scores,
v's the output. With qv the (64, dv) output accumulator is too large for one warpgroup's registers:
two warpgroups (256 threads) split the gemms' columns (key columns of S, value columns of O), so P
goes through shared memory, and S = Q K^T + QV V^T reads each V block twice from shared memory.
"""

import functools
import math

import tilelang.language as T
import torch

from mate import constants, jit, platform
from mate.ops.fmha import api as fmha_api
from mate.ops.fmha import attention

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
PASS_CONFIGS = {"tl.enable_fast_math": True}
DTYPES = ("float16", "bfloat16", "float8_e4m3fn")
HEAD_DIMS = (64, 128, 256)
QV_HEAD_DIMS = ((64, 256), (64, 512))  # (d, dv) with qv, as upstream accepts (d <= 64, dv >= 256)
BLOCK_M = 64
COPY_BYTES = 16  # one cp.async
MAX_SPLITS = 128  # combine_kernel's scale table holds 256
UNBOUNDED = 1 << 30  # a key position bound no sequence reaches


def default_config(head_dim: int, head_dim_v: int | None = None, fp8: bool = False) -> tuple[int, int]:
    """(block_n, stages). T.Pipelined(num_stages >= 2) over a runtime trip count fails in
    TileLang 0.1.15 (its epilogue waits on ``ptx_wait_group(3 - t * 2)``, which the CUDA codegen
    rejects), hence the hand-written cp.async ring. Shared memory stays <= 112 KB (Q + the ring of
    K and V slots) so that two CTAs share an SM; with qv (dv 512: QV 64 KB, 36 KB per slot) one
    CTA holds ~184 KB. FP8 at d = 128 / 256 takes blocks of bf16's bytes (twice the keys) in 2 slots,
    measured fastest on the H100 (benchmarks/PERFORMANCE.md, "split-KV decode")."""
    if head_dim_v is not None and head_dim_v != head_dim:
        return 32, 3
    if fp8 and head_dim >= 128:
        return 16384 // head_dim, 2  # 16 KB K and V blocks
    if head_dim <= 64:
        return 128, 3
    if head_dim <= 128:
        return 64, 3
    return 32, 2


def build(dtype, head_dim: int, paged: bool, causal: bool, leftpad: bool = False, batch_idx: bool = False,
          sink: bool = False, local: bool = False, softcap: bool = False, cp: bool = False, varlen_q: bool = False,
          head_dim_v: int | None = None, qv: bool = False, split_kv: bool = True, block_n: int | None = None,
          stages: int | None = None):
    """Build the decode prim_func (not compiled). See the module docstring."""
    dtype = str(dtype).replace("torch.", "")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    # FP8 caches stream as fp8 (half the bytes). S = Q K^T runs on fp8 wgmma (both operands K-major);
    # V is widened to fp16 in shared memory for P V (fp8 wgmma would need V transposed): e4m3 ->
    # f16x2 is one cvt per 2 values on sm_90 (bf16 takes three), and every e4m3 value is exact in
    # fp16. The descales fold into the score scale (q, k) and the output (v).
    fp8 = dtype == "float8_e4m3fn"
    math_dtype = "float16" if fp8 else dtype
    chunk = COPY_BYTES // (1 if fp8 else 2)  # elements per cp.async
    D = int(head_dim)
    DV = int(head_dim_v or head_dim)
    if qv:
        if (D, DV) not in QV_HEAD_DIMS or fp8:
            raise ValueError(f"qv needs (head_dim, head_dim_v) in {QV_HEAD_DIMS} and fp16/bf16, got ({D}, {DV}), "
                             f"{dtype}")
    elif D not in HEAD_DIMS or DV != D:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS} (head_dim_v equal), got ({D}, {DV})")
    bn0, st0 = default_config(D, DV, fp8)
    bn = int(block_n or bn0)
    ring = int(stages or st0)
    # qv: two warpgroups split the gemms' columns (FullCol); else one warpgroup owns whole rows.
    threads = 256 if qv else 128
    policy = T.GemmWarpPolicy.FullCol if qv else T.GemmWarpPolicy.FullRow
    chunks_per_row = D // chunk  # each thread copies one chunk of a K row and DV // D chunks of its V row
    rows_per_pass = threads // chunks_per_row
    passes = bn // rows_per_pass
    if ring < 2 or bn % rows_per_pass:
        raise ValueError(f"need stages >= 2 and block_n a multiple of {rows_per_pass}, got {ring}, {bn}")

    bm = BLOCK_M
    acc = "float32"
    NEG_INF = -T.infinity(acc)

    batch, total_q, heads_q, heads_k, num_splits = T.dynamic("batch, total_q, heads_q, heads_k, num_splits")
    n_lse = T.dynamic("n_lse")
    # Without split_kv the kernel is the whole attention: out in the output dtype and lse in the
    # caller's layout, (heads_q, total_q) with varlen_q, else (batch, heads_q, max_seqlen_q).
    out_dtype = "bfloat16" if fp8 else dtype
    out_shape = (num_splits, total_q, heads_q, DV) if split_kv else (total_q, heads_q, DV)
    lse_shape = (num_splits, heads_q, total_q) if split_kv else (n_lse,)
    kv0, kv1, cache_rows, max_pages = T.dynamic("kv0, kv1, cache_rows, max_pages")
    n_idx, n_pad, n_sink, n_tot, n_cu, n_tiles = T.dynamic("n_idx, n_pad, n_sink, n_tot, n_cu, n_tiles")
    n_desc0, n_desc1 = T.dynamic("n_desc0, n_desc1")
    # Without qv the qv tensor is not read (the host passes q).
    qv_shape = (total_q, heads_q, DV) if qv else T.dynamic("n_qv0, n_qv1, n_qv2")

    # Visible key positions of the query at position qpos: [lowest(qpos), highest(qpos)], both
    # non-decreasing in qpos, so a tile's keys lie between its first query's lowest and its last
    # query's highest. Windows of -1 and chunk 0 are unbounded.
    def highest(qpos, window_right, span):
        hi = qpos if causal else UNBOUNDED
        if local:
            hi = T.if_then_else(window_right >= 0, T.min(hi, qpos + window_right), hi)
            hi = T.if_then_else(span > 0, T.min(hi, T.floordiv(qpos, T.max(span, 1)) * span + span - 1), hi)
        return hi

    def lowest(qpos, window_left, span):  # span: the attention chunk
        if not local:
            return -UNBOUNDED
        lo = T.if_then_else(window_left >= 0, qpos - window_left, -UNBOUNDED)
        return T.if_then_else(span > 0, T.max(lo, T.floordiv(qpos, T.max(span, 1)) * span), lo)

    @T.macro
    def look_up_pages(pages, slots, page_table, cache_row, first_key, last_key, blk, my_row, page_size):
        # Page and slot of this thread's rows of key block blk, for the next issue. The one division
        # is in int32 here: as index expressions, // and % by the runtime page size became int64
        # divisions in every copy's address, which made the paged kernel instruction-bound.
        for i in T.unroll(passes):
            key = T.min(first_key + blk * bn + i * rows_per_pass + my_row, last_key)
            slots[i] = T.truncdiv(key, page_size)  # keys are >= 0: C division, no floor fix-up
            pages[i] = page_table[cache_row, slots[i]]
            slots[i] = key - slots[i] * page_size

    @T.macro
    def issue(k, v, k_s, v_s, pages, slots, cache_row, kh, first_key, last_key, blk, blk_end, slot, my_row,
              my_col):
        # This thread's 16-byte chunks of key block blk into ring slot `slot`, one commit group.
        for i in T.unroll(passes):
            row = i * rows_per_pass + my_row
            if paged:
                T.ptx_cp_async(T.access_ptr(k_s[slot, row, my_col], "w", chunk),
                               T.access_ptr(k[pages[i], slots[i], kh, my_col], "r", chunk), chunk, blk < blk_end)
                for c in T.unroll(DV // D):
                    T.ptx_cp_async(T.access_ptr(v_s[slot, row, c * D + my_col], "w", chunk),
                                   T.access_ptr(v[pages[i], slots[i], kh, c * D + my_col], "r", chunk), chunk,
                                   blk < blk_end)
            else:
                key = T.min(first_key + blk * bn + row, last_key)
                T.ptx_cp_async(T.access_ptr(k_s[slot, row, my_col], "w", chunk),
                               T.access_ptr(k[cache_row, key, kh, my_col], "r", chunk), chunk, blk < blk_end)
                for c in T.unroll(DV // D):
                    T.ptx_cp_async(T.access_ptr(v_s[slot, row, c * D + my_col], "w", chunk),
                                   T.access_ptr(v[cache_row, key, kh, c * D + my_col], "r", chunk), chunk,
                                   blk < blk_end)
        T.ptx_commit_group()

    @T.macro
    def body(q, qv_in, k, v, page_table, cu_seqlens_q, tile_seq, tile_row, cache_seqlens, cache_batch_idx,
             cache_leftpad, sinks, cp_total, q_descale, k_descale, v_descale, out_partial, lse_partial, tile_count,
             max_seqlen_q, softmax_scale, window_left, window_right, attention_chunk, softcap_value, cp_world_size,
             cp_rank):
        with T.Kernel(tile_count, num_splits if split_kv else 1, heads_k, threads=threads) as (bt, bs, kh):
            q_s = T.alloc_shared((bm, D), dtype)
            k_s = T.alloc_shared((ring, bn, D), dtype)
            v_s = T.alloc_shared((ring, bn, DV), dtype)
            if fp8:  # the current V block, widened for the P V gemm
                v_wide = T.alloc_shared((bn, D), math_dtype)
            if qv:
                qv_s = T.alloc_shared((bm, DV), dtype)
                p = T.alloc_shared((bm, bn), dtype)  # both warpgroups read every row of P
            else:
                p = T.alloc_fragment((bm, bn), math_dtype)
            s = T.alloc_fragment((bm, bn), acc)
            o = T.alloc_fragment((bm, DV), acc)
            m = T.alloc_fragment((bm,), acc)
            m_prev = T.alloc_fragment((bm,), acc)
            alpha = T.alloc_fragment((bm,), acc)
            rs = T.alloc_fragment((bm,), acc)
            row_sum = T.alloc_fragment((bm,), acc)
            row_lo = T.alloc_fragment((bm,), "int32")  # visible key positions of each row
            row_hi = T.alloc_fragment((bm,), "int32")
            pages = T.alloc_local((passes,), "int32")  # this thread's rows in the next block to issue:
            slots = T.alloc_local((passes,), "int32")  # their pages and rows within the page

            # Per-CTA scalars in int32 registers (keeps the index expressions small).
            tx = T.get_thread_binding()
            group = T.alloc_var("int32", init=heads_q // heads_k)
            # Tile bt: rows r0 .. r0 + 63 of sequence bb. Fixed-length sequences have row_blocks tiles
            # each; varlen ones read the host-made tile map (tiles past the last sequence's have bb =
            # batch and do nothing), so a mixed prefill/decode batch launches no empty tiles.
            row_blocks = T.alloc_var("int32", init=T.ceildiv(max_seqlen_q * group, bm))
            live = T.alloc_var("bool", init=tile_seq[bt] < batch if varlen_q else True)
            bb = T.alloc_var("int32", init=T.if_then_else(live, tile_seq[bt], 0) if varlen_q else bt // row_blocks)
            r0 = T.alloc_var("int32", init=tile_row[bt] if varlen_q else (bt % row_blocks) * bm)
            # This sequence's queries: rows q_start .. q_start + seqlen_q - 1 of the flat q.
            q_start = T.alloc_var("int32", init=cu_seqlens_q[bb] if varlen_q else bb * max_seqlen_q)
            seqlen_q = T.alloc_var("int32", init=T.if_then_else(live, cu_seqlens_q[bb + 1] - q_start, 0)
                                   if varlen_q else max_seqlen_q)
            rows = T.alloc_var("int32", init=seqlen_q * group)
            cache_row = T.alloc_var("int32", init=cache_batch_idx[bb] if batch_idx else bb)
            first_key = T.alloc_var("int32", init=cache_leftpad[bb] if leftpad else 0)
            seqlen_k = T.alloc_var("int32", init=cache_seqlens[bb] - first_key)
            # Query q sits at position q + q_off; key j at j * cp_world_size + cp_rank with context
            # parallelism (queries then align to the global key count), else at j.
            q_off = T.alloc_var("int32", init=(cp_total[bb] if cp else seqlen_k) - seqlen_q)
            tile_lo = T.alloc_var("int32", init=lowest(r0 // group + q_off, window_left, attention_chunk))
            tile_hi = T.alloc_var("int32", init=highest((T.min(r0 + bm, rows) - 1) // group + q_off, window_right,
                                                        attention_chunk))
            if cp:
                key_lo = T.alloc_var("int32", init=T.ceildiv(T.max(tile_lo - cp_rank, 0), cp_world_size))
                key_hi = T.alloc_var("int32", init=T.if_then_else(
                    tile_hi < cp_rank, -1, T.min(T.truncdiv(tile_hi - cp_rank, cp_world_size), seqlen_k - 1)))
            else:
                key_lo = T.alloc_var("int32", init=T.max(tile_lo, 0))
                key_hi = T.alloc_var("int32", init=T.min(tile_hi, seqlen_k - 1))
            # The tile's key blocks [blk_first, blk_first + n_blocks), dealt out to the splits.
            blk_first = T.alloc_var("int32", init=T.truncdiv(key_lo, bn))
            n_blocks = T.alloc_var("int32", init=T.if_then_else(key_hi >= key_lo and r0 < rows,
                                                                T.truncdiv(key_hi, bn) - blk_first + 1, 0))
            per = T.alloc_var("int32", init=T.ceildiv(n_blocks, num_splits) if split_kv else n_blocks)
            blk_lo = T.alloc_var("int32", init=blk_first + T.min(bs * per, n_blocks))
            blk_end = T.alloc_var("int32", init=blk_first + T.min(bs * per + per, n_blocks))
            empty = blk_end <= blk_lo
            nb = T.alloc_var("int32", init=T.max(blk_end - blk_lo, 1))
            # Last valid key row (the first row when the sequence is empty: it exists, and every
            # score is masked anyway).
            last_key = T.alloc_var("int32", init=first_key + T.max(seqlen_k - 1, 0))
            my_row = tx // chunks_per_row
            my_col = (tx % chunks_per_row) * chunk
            # Scores: score_scale * q.k (raw units: q.k of the stored values), exp2 units: * log2(e).
            score_scale = T.alloc_var(acc, init=softmax_scale * q_descale[bb, kh] * k_descale[bb, kh] if fp8
                                      else softmax_scale)
            cs = score_scale * LOG2E

            # Q tile: row r -> (query i = r // group, head kh * group + r % group); padding rows 0.
            for i, j in T.Parallel(bm, D):
                r = r0 + i
                q_s[i, j] = T.if_then_else(r < rows, q[q_start + r // group, kh * group + r % group, j],
                                           T.cast(0, dtype))
            if qv:
                for i, j in T.Parallel(bm, DV):
                    r = r0 + i
                    qv_s[i, j] = T.if_then_else(r < rows, qv_in[q_start + r // group, kh * group + r % group, j],
                                                T.cast(0, dtype))
            T.fill(o, 0)
            for i in T.Parallel(bm):
                row_lo[i] = lowest((r0 + i) // group + q_off, window_left, attention_chunk)
                row_hi[i] = highest((r0 + i) // group + q_off, window_right, attention_chunk)
                if sink:
                    # Split 0 starts from the sink's score: max = sink / scale (raw units), sum 1.
                    head = kh * group + (r0 + i) % group
                    start = T.if_then_else(bs == 0 and r0 + i < rows, sinks[T.min(head, heads_q - 1)], NEG_INF)
                    m[i] = start / score_scale
                    row_sum[i] = T.if_then_else(start == NEG_INF, 0, 1)
                else:
                    m[i] = NEG_INF
                    row_sum[i] = 0

            for slot in T.unroll(ring - 1):
                if paged:
                    look_up_pages(pages, slots, page_table, cache_row, first_key, last_key, blk_lo + slot, my_row,
                                  kv1)
                issue(k, v, k_s, v_s, pages, slots, cache_row, kh, first_key, last_key, blk_lo + slot, blk_end, slot,
                      my_row, my_col)
            if paged:
                look_up_pages(pages, slots, page_table, cache_row, first_key, last_key, blk_lo + ring - 1, my_row,
                              kv1)
            for t in T.serial(nb):
                issue(k, v, k_s, v_s, pages, slots, cache_row, kh, first_key, last_key, blk_lo + t + ring - 1,
                      blk_end, (t + ring - 1) % ring, my_row, my_col)
                if paged:  # used by the next iteration's issue: the loads' latency hides behind the math
                    look_up_pages(pages, slots, page_table, cache_row, first_key, last_key, blk_lo + t + ring,
                                  my_row, kv1)
                T.ptx_wait_group(ring - 1)
                T.sync_threads()
                n0 = (blk_lo + t) * bn
                T.gemm(q_s, k_s[t % ring, :, :], s, transpose_B=True, clear_accum=True, policy=policy)
                if fp8:
                    for i, j in T.Parallel(bn, D):
                        v_wide[i, j] = T.cast(v_s[t % ring, i, j], math_dtype)
                if qv:
                    T.gemm(qv_s, v_s[t % ring, :, :], s, transpose_B=True, policy=policy)
                for i, j in T.Parallel(bm, bn):
                    key = n0 + j
                    position = key * cp_world_size + cp_rank if cp else key
                    ok = T.Not(empty) and key < seqlen_k and position >= row_lo[i] and position <= row_hi[i]
                    if softcap:  # in raw-score units: softcap * tanh(scaled / softcap) / scale
                        s[i, j] = T.tanh(s[i, j] * (score_scale / softcap_value)) * (softcap_value / score_scale)
                    s[i, j] = T.if_then_else(ok, s[i, j], NEG_INF)
                T.copy(m, m_prev)
                T.reduce_max(s, m, dim=1, clear=False)
                for i in T.Parallel(bm):
                    alpha[i] = T.exp2(m_prev[i] * cs - T.if_then_else(m[i] == NEG_INF, 0, m[i] * cs))
                for i, j in T.Parallel(bm, bn):
                    s[i, j] = T.exp2(s[i, j] * cs - T.if_then_else(m[i] == NEG_INF, 0, m[i] * cs))
                T.reduce_sum(s, rs, dim=1)
                for i in T.Parallel(bm):
                    row_sum[i] = row_sum[i] * alpha[i] + rs[i]
                for i, j in T.Parallel(bm, DV):
                    o[i, j] *= alpha[i]
                T.copy(s, p)
                if fp8:
                    T.gemm(p, v_wide, o, policy=policy)
                else:
                    T.gemm(p, v_s[t % ring, :, :], o, policy=policy)
                T.sync_threads()  # the slot is refilled by the next iteration's issue
            T.ptx_wait_group(0)

            # Epilogue: normalized partial output and lse of the rows of this tile.
            value_scale = T.alloc_var(acc, init=v_descale[bb, kh] if fp8 else 1.0)
            for i, j in T.Parallel(bm, DV):
                r = r0 + i
                if r < rows:
                    value = T.if_then_else(row_sum[i] > 0, o[i, j] * value_scale / row_sum[i], 0)
                    if split_kv:
                        out_partial[bs, q_start + r // group, kh * group + r % group, j] = value
                    else:
                        out_partial[q_start + r // group, kh * group + r % group, j] = T.Cast(out_dtype, value)
            for i in T.Parallel(bm):
                r = r0 + i
                if r < rows:
                    value = T.if_then_else(row_sum[i] > 0, (m[i] * cs + T.log2(row_sum[i])) * LN2, NEG_INF)
                    if split_kv:
                        lse_partial[bs, kh * group + r % group, q_start + r // group] = value
                    elif varlen_q:
                        lse_partial[(kh * group + r % group) * total_q + q_start + r // group] = value
                    else:  # q_start = b * max_seqlen_q
                        lse_partial[(q_start * heads_q + (kh * group + r % group) * max_seqlen_q) + r // group] = value

    @T.prim_func
    def flash_attn_decode(
        q: T.Tensor((total_q, heads_q, D), dtype),
        qv_in: T.Tensor(qv_shape, dtype),
        k: T.Tensor((kv0, kv1, heads_k, D), dtype),
        v: T.Tensor((kv0, kv1, heads_k, DV), dtype),
        page_table: T.Tensor((cache_rows, max_pages), "int32"),
        cu_seqlens_q: T.Tensor((n_cu,), "int32"),
        tile_seq: T.Tensor((n_tiles,), "int32"),
        tile_row: T.Tensor((n_tiles,), "int32"),
        cache_seqlens: T.Tensor((batch,), "int32"),
        cache_batch_idx: T.Tensor((n_idx,), "int32"),
        cache_leftpad: T.Tensor((n_pad,), "int32"),
        sinks: T.Tensor((n_sink,), acc),
        cp_total: T.Tensor((n_tot,), "int32"),
        q_descale: T.Tensor((n_desc0, n_desc1), acc),
        k_descale: T.Tensor((n_desc0, n_desc1), acc),
        v_descale: T.Tensor((n_desc0, n_desc1), acc),
        out_partial: T.Tensor(out_shape, acc if split_kv else out_dtype),
        lse_partial: T.Tensor(lse_shape, acc),
        tile_count: T.int32, max_seqlen_q: T.int32, softmax_scale: T.float32, window_left: T.int32,
        window_right: T.int32, attention_chunk: T.int32, softcap_value: T.float32, cp_world_size: T.int32,
        cp_rank: T.int32,
    ):
        T.annotate_pass_configs(PASS_CONFIGS)
        body(q, qv_in, k, v, page_table, cu_seqlens_q, tile_seq, tile_row, cache_seqlens, cache_batch_idx,
             cache_leftpad, sinks, cp_total, q_descale, k_descale, v_descale, out_partial, lse_partial, tile_count,
             max_seqlen_q, softmax_scale, window_left, window_right, attention_chunk, softcap_value, cp_world_size,
             cp_rank)

    return flash_attn_decode


# ---- host side --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)  # static sizes repeat call after call
def num_splits_heuristic(batch: int, heads_k: int, row_blocks: int, max_seqlen_k: int, head_dim: int,
                         multiprocessors: int, max_splits: int = MAX_SPLITS, head_dim_v: int | None = None,
                         fp8: bool = False) -> int:
    """Splits per sequence from static sizes only (FA3's rule): none when the grid already fills
    0.8 of the SMs; else the smallest count whose wave efficiency is >= 85% of the best."""
    tiles = batch * heads_k * row_blocks
    bn, _ = default_config(head_dim, head_dim_v, fp8)
    n_blocks = max(1, -(-max_seqlen_k // bn))
    if tiles >= 0.8 * multiprocessors:
        return 1
    limit = min(max_splits, multiprocessors, n_blocks)
    if limit <= 1:
        return 1
    # CTAs resident at once: 2 per SM (48-112 KB of shared memory each), 1 with qv (~184 KB).
    sms = multiprocessors * (1 if head_dim_v not in (None, head_dim) else 2)

    def eligible(n):  # splits that leave no split without a block: ceil stays distinct
        return n == 1 or -(-n_blocks // n) != -(-n_blocks // (n - 1))

    def efficiency(n):
        waves = tiles * n / sms
        return waves / math.ceil(waves)

    best = max(efficiency(n) for n in range(1, limit + 1) if eligible(n))
    for n in range(1, limit + 1):
        if eligible(n) and efficiency(n) >= 0.85 * best:
            return n
    return 1


def launch(q, k, v, page_table, seqused_k, softmax_scale: float, causal: bool, out, softmax_lse,
           num_splits: int = 0, kernel=None, cache_batch_idx=None, cache_leftpad=None, learnable_sink=None,
           window: tuple[int, int] = (-1, -1), attention_chunk: int = 0, softcap: float = 0.0,
           cp_world_size: int = 1, cp_rank: int = 0, cp_tot_seqused_k=None, cu_seqlens_q=None,
           max_seqlen_q: int | None = None, q_descale=None, k_descale=None, v_descale=None, qv=None,
           combine_backend: str = "auto") -> None:
    """Split kernel + combine on torch tensors; no host sync (CUDA-graph capturable).

    q (batch, seqlen_q, heads_q, d), or (total_q, heads_q, d) with cu_seqlens_q (batch + 1,) int32
    and max_seqlen_q; k / v the dense or paged cache (see the module docstring); page_table int32
    (batch_cache, max_pages) or None; seqused_k int32 (batch,) or None (every cached key);
    cache_batch_idx / cache_leftpad int32 (batch,) or None; learnable_sink (heads_q,) or None;
    window (left, right), -1 unbounded, on top of causal; attention_chunk (0: none); softcap (0:
    none); context parallelism: this rank's key j is global key j * cp_world_size + cp_rank and
    queries align to cp_tot_seqused_k (batch,). float8_e4m3fn q / k / v take q/k/v_descale (batch,
    heads_k) (None: 1) and write a bfloat16 out. qv (shaped like q, with v's head dim; d = 64, dv 256 or
    512) adds qv . v to the scores. out (shaped like q, v's head dim) and softmax_lse ((batch,
    heads_q, seqlen_q), or (heads_q, total_q) with cu_seqlens_q) are written in place.
    num_splits <= 0 picks the count from static sizes. combine_backend: the combine's dispatch choice
    (see dispatch.select).
    """
    varlen_q = cu_seqlens_q is not None
    heads_q, d = q.shape[-2:]
    heads_k, dv = k.shape[2], v.shape[-1]
    if varlen_q:
        batch, total_q, seqlen_q = cu_seqlens_q.shape[0] - 1, q.shape[0], int(max_seqlen_q)
    else:
        batch, seqlen_q = q.shape[:2]
        total_q = batch * seqlen_q
    if batch == 0 or total_q == 0 or seqlen_q == 0 or heads_q == 0:
        return
    device = q.device
    paged = page_table is not None
    info = platform.device_info(device)
    left, right = int(window[0]), int(window[1])
    cp = cp_world_size > 1
    max_seqlen_k = page_table.shape[1] * k.shape[1] if paged else k.shape[1]
    # Keys a query can see at most, for the split count (a window or chunk bounds them).
    span = max_seqlen_k
    if left >= 0:
        span = min(span, left + seqlen_q + max(right, 0))
    if attention_chunk > 0:
        span = min(span, attention_chunk + seqlen_q)
    rows = seqlen_q * (heads_q // heads_k)
    if num_splits <= 0:
        num_splits = num_splits_heuristic(batch, heads_k, -(-rows // BLOCK_M), -(-span // max(cp_world_size, 1)), d,
                                          info.multiprocessors, MAX_SPLITS, dv, q.dtype == torch.float8_e4m3fn)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    # One split writes out and lse itself (no combine), as upstream does; the combine stays for
    # splits and for outputs the kernel cannot address (a strided out=).
    split_kv = num_splits > 1 or not (out.is_contiguous() and softmax_lse.is_contiguous())
    if kernel is None:
        var = {"dtype": q.dtype, "head_dim": d, "paged": paged, "causal": bool(causal),
               "leftpad": cache_leftpad is not None, "batch_idx": cache_batch_idx is not None,
               "sink": learnable_sink is not None,
               "local": left >= 0 or (right >= 0 and not causal) or attention_chunk > 0,
               "softcap": softcap > 0, "cp": cp, "varlen_q": varlen_q, "head_dim_v": dv, "qv": qv is not None,
               "split_kv": split_kv}
        kernel = jit.get_kernel(attention.DECODE.name, var, info.tilelang_target, attention.DECODE.build)
    # Views only where the rank differs: each is a torch op (a few us of host time on the GPU machine).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q = q if varlen_q else q.view(total_q, heads_q, d)
    if split_kv:
        # The kernel writes every query row once per split: (splits, total_q, heads, d) and its LSE
        # (splits, heads, total_q); the combine reads them as (splits, batch, seqlen, heads, d) views.
        out_partial = torch.empty(num_splits, total_q, heads_q, dv, dtype=torch.float32, device=device)
        lse_partial = torch.empty(num_splits, heads_q, total_q, dtype=torch.float32, device=device)
    else:
        out_partial, lse_partial = (out if varlen_q else out.view(total_q, heads_q, dv)), softmax_lse.view(-1)
    if seqused_k is None:
        seqused_k = torch.full((batch,), max_seqlen_k, dtype=torch.int32, device=device)
    seqused_k = _as(seqused_k, torch.int32)

    def int_vector(value):  # an unused flag's tensor is never read: pass seqused_k
        return seqused_k if value is None else _as(value, torch.int32)

    # Cached stand-ins for the inputs a kernel variant does not read.
    sinks = _as(learnable_sink, torch.float32) if learnable_sink is not None else constants.unread(
        torch.float32, 1, device)
    if q.dtype == torch.float8_e4m3fn:  # float32 (batch, heads_k) descales, 1 where not given
        ones = None if all(t is not None for t in (q_descale, k_descale, v_descale)) else torch.ones(
            batch, heads_k, dtype=torch.float32, device=device)
        descales = [ones if t is None else t.to(torch.float32).expand(batch, heads_k).contiguous()
                    for t in (q_descale, k_descale, v_descale)]
    else:
        descales = (constants.unread(torch.float32, 2, device),) * 3
    table = _as(page_table, torch.int32) if paged else constants.unread(torch.int32, 2, device)
    if varlen_q:
        tile_seq, tile_row = _varlen_tiles(cu_seqlens_q, heads_q // heads_k, total_q, seqlen_q)
        tile_count = tile_seq.shape[0]
    else:
        tile_seq = tile_row = seqused_k
        tile_count = batch * -(-rows // BLOCK_M)
    qv = q if qv is None else qv.contiguous().view(total_q, heads_q, dv)
    kernel(q, qv, k, v, table, int_vector(cu_seqlens_q), tile_seq, tile_row, seqused_k,
           int_vector(cache_batch_idx), int_vector(cache_leftpad), sinks, int_vector(cp_tot_seqused_k if cp else None),
           *descales, out_partial, lse_partial, tile_count,
           seqlen_q, float(softmax_scale), left, right, int(attention_chunk), float(softcap),
           int(cp_world_size) if cp else 1, int(cp_rank) if cp else 0)
    if not split_kv:
        return
    # The fresh partials meet the combine kernel's layout rules (aligned, strides multiples of dv), and
    # so do contiguous outputs at a 4-element boundary while every stride stays below 2**31: skip the
    # re-check (a few us of host time).
    laid_out = (out.is_contiguous() and softmax_lse.is_contiguous() and out.data_ptr() % (4 * out.element_size()) == 0
                and total_q * heads_q * dv < 2**31)
    if varlen_q:  # one "batch" of total_q rows; the LSE is (heads, total_q)
        fmha_api.combine_into(out_partial.view(num_splits, 1, total_q, heads_q, dv),
                              lse_partial.view(num_splits, heads_q, 1, total_q).permute(0, 2, 3, 1),
                              out.unsqueeze(0), softmax_lse.unsqueeze(1).permute(1, 2, 0), laid_out,
                              combine_backend)
    else:
        fmha_api.combine_into(out_partial.view(num_splits, batch, seqlen_q, heads_q, dv),
                              lse_partial.view(num_splits, heads_q, batch, seqlen_q).permute(0, 2, 3, 1),
                              out, softmax_lse.transpose(1, 2), laid_out, combine_backend)


def _as(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` in `dtype`, contiguous (.to() is a torch op even when the dtype already matches)."""
    return (value if value.dtype == dtype else value.to(dtype)).contiguous()


def _varlen_tiles(cu_seqlens_q, group: int, total_q: int, max_seqlen_q: int):
    """The varlen tile map, on the device without a host sync: tile t covers rows tile_row[t] ..
    + 63 of sequence tile_seq[t] (== batch past the last tile). Its length, an upper bound on the
    tiles that static sizes give, is ceil(total_q * group / 64) + batch. When every sequence fits
    one tile (decode), tile t is sequence t from row 0: cached constants, no kernel launches."""
    batch = cu_seqlens_q.shape[0] - 1
    if max_seqlen_q * group <= BLOCK_M:
        return constants.iota(batch, cu_seqlens_q.device), constants.zeros(batch, cu_seqlens_q.device)
    tiles = (cu_seqlens_q.diff() * group + BLOCK_M - 1) // BLOCK_M
    ends = tiles.cumsum(0, dtype=torch.int32)
    index = torch.arange(-(-total_q * group // BLOCK_M) + batch, dtype=torch.int32, device=cu_seqlens_q.device)
    tile_seq = torch.searchsorted(ends, index, right=True, out_int32=True)
    first = (ends - tiles).index_select(0, tile_seq.clamp(max=batch - 1))
    return tile_seq, (index - first) * BLOCK_M

