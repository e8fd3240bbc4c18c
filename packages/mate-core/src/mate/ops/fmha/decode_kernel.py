"""TileLang split-KV decode kernel for ``flash_attn_with_kvcache`` (no append), for Hopper.

``build(dtype, head_dim, paged, causal)`` returns an uncompiled ``T.prim_func``. Only those
static parameters and the tile configuration are baked in; batch, seqlen_q, head counts, the
cache's sizes (page count, page size, seqlen_cache), num_splits and the cache_seqlens values are
runtime values, so one compiled kernel serves every size and every page size (1 included).
Parameters of the prim_func, in order:

    q              dtype    (batch, seqlen_q, heads_q, d)                     contiguous
    k              dtype    paged: (num_pages, page_size, heads_k, d)         contiguous
                            dense: (batch_cache, seqlen_cache, heads_k, d)    contiguous
    v              dtype    same shape as k                                   contiguous
    page_table     int32    (batch, max_pages)   (paged only)                 contiguous
    cache_seqlens  int32    (batch,)  keys of each sequence (seqused_k)
    out_partial    float32  (num_splits, batch, seqlen_q, heads_q, d)         contiguous, written
    lse_partial    float32  (num_splits, batch, heads_q, seqlen_q)            contiguous, written
    softmax_scale  float32

Semantics (FlashAttention-3): sequence b has seqlen_k = cache_seqlens[b] keys: rows 0..seqlen_k-1
of its dense cache, or key j at k[page_table[b, j // page_size], j % page_size]. Query head h
reads kv head h // (heads_q // heads_k). Causal is bottom-right aligned: query i sees key j when
j <= seqlen_k - seqlen_q + i. Scores are softmax_scale * q.k.

Work split: grid (num_splits, batch, heads_k * row_blocks). GQA is packed: the seqlen_q * group
query rows of one kv head (row r = query i * group + head offset g, group = heads_q // heads_k)
share one tile of block_m = 64 rows (row_blocks = ceil(seqlen_q * group / 64) tiles when there
are more). The key blocks of block_n keys of a sequence, n_blocks = ceil(seqlen_k / block_n), are
dealt in contiguous runs of ceil(n_blocks / num_splits) blocks: split s takes blocks
[s * per, min((s + 1) * per, n_blocks)). Each split writes its normalized partial output and
its lse (natural log) for its rows; a split with no block, or a row that sees no key of the
split, writes out 0 and lse -inf, so ``combine_kernel`` gives it weight 0. The caller's combine
then merges the splits (``launch`` does both).

Kernel design: 128 threads (one warpgroup). Q is loaded once into shared memory; K and V blocks
are gathered row by row (each row a run of d contiguous elements, copied as 16-byte vectors,
page-table lookup per row) into shared memory by a T.Pipelined loop, which lowers the
global->shared copies to 16-byte cp.async (K and V in separate groups, see ``default_config``):
the next block's gathers are in flight while the current one is computed, which matters most for
page size 1, where every row is a gather. S = Q K^T (wgmma, shared operands) and O += P V
(wgmma, P in registers) run on the tensor cores (T.gemm); online softmax with exp2, a row whose
max is still -inf using 0 as its max. Rows of a tail block past seqlen_k load a clamped (valid)
row and are masked to -inf, so no out-of-range address is formed and no garbage reaches P V. A
split with no key block still runs one fully masked block (its loads clamped to row 0 of the
sequence's first page), so every path issues the same gemms.
"""

import math

import tilelang.language as T

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
PASS_CONFIGS = {"tl.enable_fast_math": True}
DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (64, 128, 256)
BLOCK_M = 64
THREADS = 128
MAX_SPLITS = 128  # combine_kernel's scale table holds 256


def default_config(head_dim: int) -> tuple[int, int]:
    """(block_n, num_stages). num_stages must stay 1 with TileLang 0.1.15: a T.Pipelined loop of
    runtime trip count with num_stages >= 2 gets an epilogue loop whose cp.async wait count
    depends on the loop variable (``ptx_wait_group(3 - t * 2)``), which the CUDA codegen rejects
    ("Downcast from tirx.Sub to ir.IntImm"). With 1 stage, K and V are separate cp.async groups:
    K of block t + 1 loads during P V of block t and V of block t + 1 during S of block t + 1, so
    a K or V block is always in flight; shared memory (Q + K + V) is 48 KB at d 128, so several
    CTAs share an SM and their loads overlap."""
    if head_dim <= 64:
        return 128, 1
    if head_dim <= 128:
        return 64, 1
    return 32, 1


def build(dtype, head_dim: int, paged: bool, causal: bool, block_n: int | None = None,
          num_stages: int | None = None, min_blocks: int | None = None):
    """Build the decode prim_func (not compiled). See the module docstring.

    Tuning: block_n (keys per block), num_stages (keep 1, see ``default_config``), min_blocks
    (register cap via __launch_bounds__; unset, d 128 uses 255 registers, i.e. 2 CTAs per SM;
    3 caps it at 168 registers and spills ~300 bytes, so it is off by default)."""
    dtype = str(dtype).replace("torch.", "")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    D = int(head_dim)
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {D}")
    bn0, st0 = default_config(D)
    bn = int(block_n or bn0)
    stages = int(num_stages or st0)

    bm = BLOCK_M
    acc = "float32"
    NEG_INF = -T.infinity(acc)

    batch, seqlen_q, heads_q, heads_k, num_splits = T.dynamic("batch, seqlen_q, heads_q, heads_k, num_splits")
    kv0, kv1, max_pages = T.dynamic("kv0, kv1, max_pages")

    @T.macro
    def body(q, k, v, page_table, cache_seqlens, out_partial, lse_partial, softmax_scale):
        with T.Kernel(num_splits, batch, heads_k * T.ceildiv(seqlen_q * (heads_q // heads_k), bm),
                      threads=THREADS) as (bs, bb, bz):
            if min_blocks:
                T.annotate_min_blocks_per_sm(min_blocks)
            q_s = T.alloc_shared((bm, D), dtype)
            k_s = T.alloc_shared((bn, D), dtype)
            v_s = T.alloc_shared((bn, D), dtype)
            s = T.alloc_fragment((bm, bn), acc)
            p = T.alloc_fragment((bm, bn), dtype)
            o = T.alloc_fragment((bm, D), acc)
            m = T.alloc_fragment((bm,), acc)
            m_prev = T.alloc_fragment((bm,), acc)
            alpha = T.alloc_fragment((bm,), acc)
            rs = T.alloc_fragment((bm,), acc)
            row_sum = T.alloc_fragment((bm,), acc)

            # Per-CTA scalars in int32 registers (keeps the index expressions small).
            group = T.alloc_var("int32", init=heads_q // heads_k)
            rows = T.alloc_var("int32", init=seqlen_q * group)
            row_blocks = T.alloc_var("int32", init=T.ceildiv(rows, bm))
            kh = T.alloc_var("int32", init=bz // row_blocks)
            r0 = T.alloc_var("int32", init=(bz % row_blocks) * bm)
            seqlen_k = T.alloc_var("int32", init=cache_seqlens[bb])
            off = T.alloc_var("int32", init=seqlen_k - seqlen_q)
            n_blocks = T.alloc_var("int32", init=T.ceildiv(T.max(seqlen_k, 0), bn))
            per = T.alloc_var("int32", init=T.ceildiv(n_blocks, num_splits))
            blk_lo = T.alloc_var("int32", init=T.min(bs * per, n_blocks))
            count = T.alloc_var("int32", init=T.min(blk_lo + per, n_blocks) - blk_lo)
            empty = count <= 0
            nb = T.alloc_var("int32", init=T.max(count, 1))
            # Last valid key row (0 when the sequence is empty: the loads then read row 0 of the
            # first page / dense row 0, which exist; every score is masked anyway).
            last_key = T.alloc_var("int32", init=T.max(seqlen_k - 1, 0))
            cs = softmax_scale * LOG2E

            # Q tile: row r -> (query i = r // group, head kh * group + r % group); padding rows 0.
            for i, j in T.Parallel(bm, D):
                r = r0 + i
                q_s[i, j] = T.if_then_else(r < rows, q[bb, r // group, kh * group + r % group, j],
                                           T.cast(0, dtype))
            T.fill(o, 0)
            T.fill(row_sum, 0)
            T.fill(m, NEG_INF)

            for t in (T.Pipelined(nb, num_stages=stages) if stages > 0 else T.serial(nb)):
                n0 = (blk_lo + t) * bn
                # Gather the block's K / V rows (clamped to a valid row past seqlen_k).
                for i, j in T.Parallel(bn, D):
                    key = T.min(n0 + i, last_key)
                    if paged:
                        ps = kv1
                        page = T.if_then_else(seqlen_k > 0, page_table[bb, key // ps], 0)
                        k_s[i, j] = k[page, key % ps, kh, j]
                    else:
                        k_s[i, j] = k[bb, key, kh, j]
                for i, j in T.Parallel(bn, D):
                    key = T.min(n0 + i, last_key)
                    if paged:
                        ps = kv1
                        page = T.if_then_else(seqlen_k > 0, page_table[bb, key // ps], 0)
                        v_s[i, j] = v[page, key % ps, kh, j]
                    else:
                        v_s[i, j] = v[bb, key, kh, j]
                T.gemm(q_s, k_s, s, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
                for i, j in T.Parallel(bm, bn):
                    key = n0 + j
                    ok = T.Not(empty) and key < seqlen_k
                    if causal:
                        ok = ok and key <= off + (r0 + i) // group
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
                for i, j in T.Parallel(bm, D):
                    o[i, j] *= alpha[i]
                T.copy(s, p)
                T.gemm(p, v_s, o, policy=T.GemmWarpPolicy.FullRow)

            # Epilogue: normalized partial output and lse of the rows of this tile.
            for i, j in T.Parallel(bm, D):
                r = r0 + i
                if r < rows:
                    out_partial[bs, bb, r // group, kh * group + r % group, j] = T.if_then_else(
                        row_sum[i] > 0, o[i, j] / row_sum[i], 0)
            for i in T.Parallel(bm):
                r = r0 + i
                if r < rows:
                    lse_partial[bs, bb, kh * group + r % group, r // group] = T.if_then_else(
                        row_sum[i] > 0, (m[i] * cs + T.log2(row_sum[i])) * LN2, NEG_INF)

    if paged:
        @T.prim_func
        def flash_attn_decode_paged(
            q: T.Tensor((batch, seqlen_q, heads_q, D), dtype),
            k: T.Tensor((kv0, kv1, heads_k, D), dtype),
            v: T.Tensor((kv0, kv1, heads_k, D), dtype),
            page_table: T.Tensor((batch, max_pages), "int32"),
            cache_seqlens: T.Tensor((batch,), "int32"),
            out_partial: T.Tensor((num_splits, batch, seqlen_q, heads_q, D), acc),
            lse_partial: T.Tensor((num_splits, batch, heads_q, seqlen_q), acc),
            softmax_scale: T.float32,
        ):
            T.annotate_pass_configs(PASS_CONFIGS)
            body(q, k, v, page_table, cache_seqlens, out_partial, lse_partial, softmax_scale)

        return flash_attn_decode_paged

    @T.prim_func
    def flash_attn_decode(
        q: T.Tensor((batch, seqlen_q, heads_q, D), dtype),
        k: T.Tensor((kv0, kv1, heads_k, D), dtype),
        v: T.Tensor((kv0, kv1, heads_k, D), dtype),
        cache_seqlens: T.Tensor((batch,), "int32"),
        out_partial: T.Tensor((num_splits, batch, seqlen_q, heads_q, D), acc),
        lse_partial: T.Tensor((num_splits, batch, heads_q, seqlen_q), acc),
        softmax_scale: T.float32,
    ):
        T.annotate_pass_configs(PASS_CONFIGS)
        body(q, k, v, None, cache_seqlens, out_partial, lse_partial, softmax_scale)

    return flash_attn_decode


# ---- host side --------------------------------------------------------------------------------

def num_splits_heuristic(batch: int, heads_k: int, row_blocks: int, max_seqlen_k: int, head_dim: int,
                         multiprocessors: int, max_splits: int = MAX_SPLITS) -> int:
    """Splits per sequence from static sizes only (FA3's rule): none when the grid already fills
    0.8 of the SMs; else the smallest count whose wave efficiency is >= 85% of the best."""
    tiles = batch * heads_k * row_blocks
    bn, _ = default_config(head_dim)
    n_blocks = max(1, -(-max_seqlen_k // bn))
    if tiles >= 0.8 * multiprocessors:
        return 1
    limit = min(max_splits, multiprocessors, n_blocks)
    if limit <= 1:
        return 1
    sms = 2 * multiprocessors  # CTAs resident at once (at least 2 per SM: 48-96 KB smem each)

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
           num_splits: int = 0, kernel=None) -> None:
    """Split kernel + combine on torch tensors; no host sync (CUDA-graph capturable).

    q (batch, seqlen_q, heads_q, d); k / v the dense or paged cache (see the module docstring);
    page_table int32 (batch, max_pages) or None; seqused_k int32 (batch,) or None (every cached
    key); out (batch, seqlen_q, heads_q, d) and softmax_lse (batch, heads_q, seqlen_q) written in
    place. num_splits <= 0 picks the count from static sizes.
    """
    import torch

    from mate import jit, platform
    from mate.ops.fmha.api import _combine
    from mate.ops.fmha.attention import DECODE

    batch, seqlen_q, heads_q, d = q.shape
    heads_k = k.shape[2]
    if batch == 0 or seqlen_q == 0 or heads_q == 0:
        return
    device = q.device
    paged = page_table is not None
    info = platform.device_info(device)
    if kernel is None:
        var = {"dtype": q.dtype, "head_dim": d, "paged": paged, "causal": bool(causal)}
        kernel = jit.get_kernel(DECODE.name, var, info.tilelang_target, DECODE.build)
    max_seqlen_k = page_table.shape[1] * k.shape[1] if paged else k.shape[1]
    rows = seqlen_q * (heads_q // heads_k)
    if num_splits <= 0:
        num_splits = num_splits_heuristic(batch, heads_k, -(-rows // BLOCK_M), max_seqlen_k, d,
                                          info.multiprocessors)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out_partial = torch.empty(num_splits, batch, seqlen_q, heads_q, d, dtype=torch.float32, device=device)
    lse_partial = torch.empty(num_splits, batch, heads_q, seqlen_q, dtype=torch.float32, device=device)
    if seqused_k is None:
        seqused_k = torch.full((batch,), max_seqlen_k, dtype=torch.int32, device=device)
    seqused_k = seqused_k.to(torch.int32).contiguous()
    if paged:
        kernel(q, k, v, page_table.to(torch.int32).contiguous(), seqused_k, out_partial, lse_partial,
               float(softmax_scale))
    else:
        kernel(q, k, v, seqused_k, out_partial, lse_partial, float(softmax_scale))
    lse = softmax_lse.transpose(1, 2)  # (batch, seqlen_q, heads_q) view for the combine
    _combine(out_partial, lse_partial.transpose(2, 3), out, lse)
