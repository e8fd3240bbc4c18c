"""TileLang kernel for the FlashAttention forward pass (prefill), varlen-first, for Hopper.

``build(dtype, head_dim, head_dim_v, causal, has_window, has_softcap, ...)`` returns an
uncompiled ``T.prim_func``. Only those static parameters and the tile configuration are baked
in; token counts, batch, head counts and ``max_seqlen_q`` are symbolic, so one compiled kernel
serves every sequence length and batch. Parameters of the prim_func, in order:

    q              dtype    (total_q, heads_q, head_dim)      contiguous
    k              dtype    (total_k, heads_k, head_dim)      contiguous
    v              dtype    (total_k, heads_k, head_dim_v)    contiguous; FP8: transposed values
                            (heads_k, head_dim_v, total_vt) from ``build_v_transpose`` (below)
    cu_seqlens_q   int32    (batch + 1,)
    cu_seqlens_k   int32    (batch + 1,)
    seqused_q      int32    (batch,)   read only when has_seqused (else any int32 vector)
    seqused_k      int32    (batch,)   read only when has_seqused (else any int32 vector)
    out            dtype    (total_q, heads_q, head_dim_v)    contiguous, written (bfloat16 for FP8)
    lse            float32  (heads_q, total_q)                contiguous, written
    sink           float32  (heads_q,) read only when has_sink (else any float32 vector)
    v_block        int32    (batch,)   FP8 only: first block_n-column block of sequence b in v
    q_descale      float32  (batch, heads_k)  FP8 only (else any float32 matrix): dequantization
    k_descale      float32  (batch, heads_k)  factors of q, k and v per sequence and kv head
    v_descale      float32  (batch, heads_k)
    max_seqlen_q   int32    sizes the grid (>= every seqlen_q; larger only wastes empty blocks)
    softmax_scale  float32  > 0 (the row max is taken on unscaled scores)
    window_left    int32    -1 = unbounded (read only when has_window)
    window_right   int32    -1 = unbounded (read only when has_window)
    softcap        float32  > 0 (read only when has_softcap; 0 there divides by zero)

``launch(kernel, ...)`` passes torch tensors in that order. Semantics (FlashAttention-3):
sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1] and key rows
cu_seqlens_k[b]:cu_seqlens_k[b+1]; with has_seqused it owns the seqused_q[b] query rows from
cu_seqlens_q[b] and the seqused_k[b] key rows from cu_seqlens_k[b] instead (the entries
cu_seqlens_*[b + 1] are then not read: cu_seqlens_k may hold arbitrary start rows, e.g. the
rows of a dense KV cache); query head h reads kv head h // (heads_q // heads_k).
With off = seqlen_k - seqlen_q (bottom-right alignment), query i sees key j when
j < seqlen_k, and j <= i + off if causal, and i + off - window_left <= j <= i + off +
window_right if has_window (a side set to -1 is unbounded). Scores are
s = softmax_scale * q.k, or softcap * tanh(softmax_scale * q.k / softcap) with softcap.
out = softmax(s) @ v over the visible keys; lse = logsumexp(s) (natural log). A row that
sees no key gets out = 0 and lse = -inf. Rows past a sequence's end are never written. With
has_sink, the learnable sink of head h joins the softmax denominator only:
lse = log(exp(sink[h]) + sum exp(s)), out = sum exp(s - lse) v; a row that sees no key gets
out = 0 and lse = sink[h].

Design (per CTA: one block of block_m query rows of one head of one sequence):
  * warp specialization: the last warpgroup is the producer, which loads the Q tile once and
    streams K and V blocks with TMA into `num_stages`-deep rings guarded by mbarriers; it
    drops to 24 registers. The first block_m // 64 warpgroups are consumers (240 registers),
    each owning 64 query rows.
  * consumer loop per key block t: S_t = Q K_t^T (wgmma, shared-memory operands) is issued
    together with O += P_{t-1} V_{t-1} (wgmma, P from registers). With several consumer
    warpgroups, named barriers hand the tensor cores round-robin from one warpgroup to the next
    (ping-pong), so one warpgroup's softmax overlaps another's gemms. ptxas schedules the wait
    for P V first in its basic block, i.e. before the softmax of S_t; an mbarrier wait between
    them (a block boundary) gets the softmax to overlap its own P V gemm, but measured slower
    (H100, d=128: 560 against 610 TFLOP/s), so it is not done.
  * exp2 with log2(e) folded into the scale (one FFMA per score), online softmax with
    per-iteration rescaling of O; -inf rows are handled by treating the row max as 0. With two
    consumer warpgroups the row max and row sums come from small CUDA helpers on the thread's
    registers (_ROWS_SRC): 4 max chains per row, and per-thread partial row sums that are
    all-reduced over the quad once, in the epilogue.
  * key blocks are visited from the last visible one down to the first; only blocks that can
    hold a visible key are loaded (causal and window block skipping), and the element-wise
    mask is applied only to blocks that straddle a boundary. Causal grids start the longest
    query blocks of every group of 8 (head, sequence) pairs first (``tile_coords``).
  * a tile that sees no key runs one fully masked block rather than branching around the
    gemms: ptxas serializes every wgmma of a kernel when one sits on a divergent path.
  * epilogue: O / row_sum in registers -> shared memory (reusing the Q tile when head_dim_v ==
    head_dim) -> 16-byte global stores guarded by the sequence length; lse likewise.

FP8 (float8_e4m3fn q / k / v, bfloat16 out): the same kernel with 8-bit wgmma (32-deep k steps,
twice the bf16 rate). FP8 wgmma reads both shared-memory operands K-major, so the P V gemm takes
V transposed, (head_dim_v, keys) per block: ``build_v_transpose`` writes it once per call (one
read and one write of V), each sequence starting at a block_n-aligned column and padded with zero
columns to whole blocks (at least one), so every block the kernel loads is written data. P goes to
the tensor cores from registers as fp8 (values in [0, 1]). The accumulator layout of S and the
8-bit A-operand layout give a thread different key columns of a 32-key group; rather than moving
values between threads, the A operand takes the thread's own S values in order, which permutes
the keys inside every group of 32 (``fp8_key_of``), and the transposed V is written with the same
permutation, so P V sums the right products. q_descale * k_descale fold into the score scale and
v_descale into the output, per (sequence, kv head).
"""

from dataclasses import dataclass

import tilelang.language as T
import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Compile with fast math (ex2.approx for exp2, approximate division and log2); the prim_func
# carries it, so it applies however the kernel is compiled (mate.jit passes no pass configs).
PASS_CONFIGS = {"tl.enable_fast_math": True}

# tanh.approx.f32 (one SFU instruction); CUDA's tanhf is a long software sequence.
_TANH_SRC = ('__device__ __forceinline__ float mate_tanh_approx(float x) '
             '{ float y; asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }\n')

# Row reductions over the fp32 wgmma accumulator, on a thread's own registers. A consumer thread
# holds n = block_n / 2 scores of two rows (r and r + 8): in each 8-column chunk 4 values, (row r,
# 2 columns) then (row r + 8, 2 columns); a row is spread over the 4 lanes of a quad. TileLang's
# reduce_max / reduce_sum run one serial chain per row and all-reduce the quad every time: the
# max here uses 4 chains per row; the row sums stay per-thread partial sums (all-reduced once, in
# the epilogue: a sum of partial sums rescaled by the same alphas is the row sum). H100, b=8, h=32,
# s=4096: d=128 610 / 538 TFLOP/s (non-causal / causal) against 603 / 528 with TileLang's; used with
# two consumer warpgroups only (d=64 with three, at 160 registers: 462 against 483).
_ROWS_SRC = r"""
template <int N>
__device__ __forceinline__ void mate_row_max(const float* s, float* m) {
  float a[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) a[k] = s[k];
#pragma unroll
  for (int c = 8; c < N; c += 4)
#pragma unroll
    for (int k = 0; k < 4; ++k) a[(c >> 2 & 1) * 4 + k] = fmaxf(a[(c >> 2 & 1) * 4 + k], s[c + k]);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float x = fmaxf(fmaxf(a[2 * r], a[2 * r + 1]), fmaxf(a[2 * r + 4], a[2 * r + 5]));
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
    m[r] = fmaxf(m[r], x);
  }
}
template <int N>
__device__ __forceinline__ void mate_row_sums(const float* s, float* rs) {
  float a[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) a[k] = s[k];
#pragma unroll
  for (int c = 8; c < N; c += 4)
#pragma unroll
    for (int k = 0; k < 4; ++k) a[(c >> 2 & 1) * 4 + k] += s[c + k];
#pragma unroll
  for (int r = 0; r < 2; ++r) rs[r] = (a[2 * r] + a[2 * r + 1]) + (a[2 * r + 4] + a[2 * r + 5]);
}
__device__ __forceinline__ void mate_quad_sums(float* rs) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rs[r] += __shfl_xor_sync(0xffffffff, rs[r], 1);
    rs[r] += __shfl_xor_sync(0xffffffff, rs[r], 2);
  }
}
"""

# Named-barrier ids for the consumer warpgroups' ping-pong (TileLang's own syncs use low ids).
_PINGPONG_BARRIER = 10
# Causal CTAs take their tiles in groups of this many (head, sequence) pairs (see tile_coords).
TILE_GROUP = 8
_SMEM_LIMIT = 227 * 1024  # Hopper: dynamic shared memory a block may opt into
FP8 = "float8_e4m3fn"
DTYPES = ("float16", "bfloat16", FP8)
_FP8_K = 32  # keys per k step of an 8-bit wgmma; the P / V key permutation works in such groups
FP8_P_SHIFT = 8.0  # log2 of the factor on FP8 P (see build)


def fp8_key_of(j):
    """The key (within its group of 32) whose score a thread holds at FP8 A-operand column j.

    Per row, the fp32 accumulator gives a thread (lane % 4 = c) the columns 2c, 2c + 1, 8 + 2c,
    9 + 2c, 16 + 2c, ... of a 32-key group, and the 8-bit A operand wants columns 4c..4c + 3 and
    16 + 4c..16 + 4c + 3 from it: with j = 16 h + 4 c + e, column j takes key
    16 h + 8 (e // 2) + 2 c + e % 2. Works on ints and on TileLang expressions."""
    return (j // _FP8_K) * _FP8_K + (j % _FP8_K) // 16 * 16 + (j % 4) // 2 * 8 + (j % 16) // 4 * 2 + j % 2


@dataclass(frozen=True)
class Config:
    """Tile configuration. block_m is 64 rows per consumer warpgroup."""

    block_m: int
    block_n: int
    num_stages: int = 2
    pingpong: bool = True

    @property
    def consumers(self) -> int:
        return self.block_m // 64

    @property
    def threads(self) -> int:
        return 128 * (self.consumers + 1)


def default_config(head_dim: int, head_dim_v: int | None = None, causal: bool = False,
                   has_window: bool = False, has_softcap: bool = False, dtype: str = "bfloat16") -> Config:
    """Tile sizes per head dim (register budget: 240 per consumer thread with two consumer
    warpgroups, 160 with three; shared memory: Q + num_stages * (K + V) [+ O]). FP8 takes the
    same tiles with block_n rounded down to a multiple of 32 (the 8-bit k step)."""
    cfg = _default_config(head_dim, head_dim_v or head_dim, causal, has_window, has_softcap)
    if str(dtype).replace("torch.", "") != FP8:
        return cfg
    block_n = cfg.block_n // _FP8_K * _FP8_K
    d = max(head_dim, head_dim_v or head_dim)
    if 64 < d <= 128 and not (causal or has_window or has_softcap):
        # Wider key blocks spread the per-row softmax work (max, rescale) over more keys: d=128 on an
        # H100, 815 TFLOP/s at 192 against 771 at 128 (kernel alone; 3 stages: 752).
        block_n = 192
    block_m = cfg.block_m
    if d <= 64 and causal and not (has_window or has_softcap):
        # Three consumer warpgroups, as non-causal d=64 (FA3's FP8 d=64 tile): kernel alone on an H100,
        # three rounds, TFLOP/s: b=8 h=32 s=4096 447 against 412 for 128x192 (192x128: 437-442);
        # b=1 s=16384 556-564 against 494; b=32 s=1024 227 against 238 (short sequences pay for the
        # taller diagonal blocks).
        block_m, block_n = 192, 160
    if d == 256 and (head_dim_v or head_dim) == head_dim and not (causal or has_window or has_softcap):
        # Half the bytes of bf16 leave room for 128 keys (224 KB of shared memory): 1004 TFLOP/s
        # against 866 at 64 on an H100 (kernel alone).
        block_n = 128
    return Config(block_m=block_m, block_n=block_n, num_stages=cfg.num_stages)


def _default_config(head_dim: int, dv: int, causal: bool, has_window: bool, has_softcap: bool) -> Config:
    d = max(head_dim, dv)
    if d <= 64:
        # Small head dims are softmax-bound: three consumer warpgroups keep the tensor cores fed,
        # but at 160 registers a thread the masking code of causal / local variants spills (and
        # measured slower with smaller block_n).
        return Config(block_m=128 if (causal or has_window or has_softcap) else 192, block_n=128)
    if d <= 128:
        return Config(block_m=128, block_n=128)
    if d <= 192:
        return Config(block_m=128, block_n=112 if dv <= 128 else 96)
    return Config(block_m=128, block_n=80)


def shared_memory_bytes(head_dim: int, head_dim_v: int, cfg: Config, dtype: str = "bfloat16") -> int:
    fp8 = str(dtype).replace("torch.", "") == FP8
    q = cfg.block_m * head_dim
    kv = cfg.num_stages * cfg.block_n * (head_dim + head_dim_v)
    if fp8:  # fp8 operands, a separate bfloat16 output tile
        return q + kv + 2 * cfg.block_m * head_dim_v
    o = 0 if head_dim_v == head_dim else cfg.block_m * head_dim_v
    return (q + kv + o) * 2


def build(dtype: str, head_dim: int, head_dim_v: int | None, causal: bool, has_window: bool, has_softcap: bool,
          has_seqused: bool = False, has_sink: bool = False, block_m: int | None = None, block_n: int | None = None,
          num_stages: int | None = None, pingpong: bool | None = None):
    """Build the forward prim_func (not compiled). See the module docstring for the signature."""
    dtype = str(dtype).replace("torch.", "")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    fp8 = dtype == FP8
    D = int(head_dim)
    DV = int(head_dim_v or head_dim)
    if D % 16 or DV % 16 or not (16 <= D <= 256 and 16 <= DV <= 256):
        raise ValueError(f"head dims must be multiples of 16 in [16, 256], got ({D}, {DV})")
    if fp8 and D % _FP8_K:
        raise ValueError(f"FP8 needs a head dim that is a multiple of {_FP8_K}, got {D}")
    base = default_config(D, DV, causal, has_window, has_softcap, dtype)
    cfg = Config(block_m=block_m or base.block_m, block_n=block_n or base.block_n,
                 num_stages=num_stages or base.num_stages,
                 pingpong=base.pingpong if pingpong is None else bool(pingpong))
    if cfg.block_m % 64 or not 1 <= cfg.consumers <= 3:
        raise ValueError(f"block_m must be 64, 128 or 192, got {cfg.block_m}")
    step = _FP8_K if fp8 else 16
    if cfg.block_n % step or not 16 <= cfg.block_n <= 256:
        raise ValueError(f"block_n must be a multiple of {step} in [16, 256] for {dtype}, got {cfg.block_n}")
    if shared_memory_bytes(D, DV, cfg, dtype) > _SMEM_LIMIT:
        raise ValueError(f"config {cfg} needs {shared_memory_bytes(D, DV, cfg, dtype)} bytes of shared memory")

    bm, bn, S = cfg.block_m, cfg.block_n, cfg.num_stages
    n_cons = cfg.consumers
    cons_threads = 128 * n_cons
    pingpong = cfg.pingpong and n_cons > 1
    own_rows = n_cons <= 2  # row max / sums with the _ROWS_SRC helpers (see there)
    # Register split: setmaxnreg needs (producer + consumers) <= the registers the CTA launched with.
    launch_regs = min(255, (65536 // cfg.threads) // 8 * 8)
    cons_regs = 240 if n_cons <= 2 else 160
    prod_regs = 24
    assert 128 * prod_regs + cons_threads * cons_regs <= launch_regs * cfg.threads
    acc = "float32"
    out_dtype = "bfloat16" if fp8 else dtype
    # FP8: P = 2^p_shift * exp2(score - row max), in (0, 256] instead of (0, 1], so that the e4m3 P
    # keeps 3 mantissa bits down to a weight of 2^-14 instead of rounding weights below 2^-6 to
    # subnormals and those below 2^-10 to 0 (256 < 448, e4m3's largest value). H100, b=2, h=8,
    # s=4096, error against float32 attention on the same fp8 inputs: relative 0.0098 -> 0.0087 with
    # q scaled by 4 (peaked rows), 0.0252 -> 0.0249 unscaled; speed unchanged.
    p_shift = FP8_P_SHIFT if fp8 else 0.0
    NEG_INF = -T.infinity(acc)
    BIG = 1 << 30  # stands for an unbounded window side
    BAR = _PINGPONG_BARRIER
    total_q, total_k, heads_q, heads_k, batch_plus_1 = T.dynamic("total_q, total_k, heads_q, heads_k, batch_plus_1")
    n_used_q, n_used_k, n_sink = T.dynamic("n_used_q, n_used_k, n_sink")
    n_vblock, n_desc0, n_desc1, total_vt = T.dynamic("n_vblock, n_desc0, n_desc1, total_vt")
    # FP8 values come transposed (see build_v_transpose): a block is (DV, bn), K-major for the gemm.
    v_shape = (heads_k, DV, total_vt) if fp8 else (total_k, heads_k, DV)
    v_tile = (DV, bn) if fp8 else (bn, DV)

    @T.macro
    def score_mod_and_mask(s, key_lo, key_n, kb, empty, m0, m_last, off, seqlen_k, wl, wr, sc_in, sc_out):
        # s <- softcap transform (log2 units), then -inf where key j is not visible from row i.
        if has_softcap:
            for i, j in T.Parallel(bm, bn):
                s[i, j] = T.call_extern("float32", "mate_tanh_approx", s[i, j] * sc_in) * sc_out
        c0 = kb * bn
        need_mask = empty or c0 + bn > seqlen_k
        if causal:
            need_mask = need_mask or (c0 + bn - 1 > m0 + off)
        if has_window:
            need_mask = need_mask or (c0 + bn - 1 > m0 + off + wr) or (c0 < m_last + off - wl)
        if need_mask:
            # Row i sees the keys key_lo[i] + [0, key_n[i]): one subtract and one unsigned compare a
            # score. Written as a chain of && (or a min that TileLang expands into one), nvcc branched
            # around every score (~15 instructions each, on each causal tile's first block).
            for i in T.Parallel(bm):
                r = m0 + i + off  # the query row's position on the key axis
                hi = T.if_then_else(empty, 0, seqlen_k)
                if causal:
                    hi = T.min(hi, r + 1)
                if has_window:
                    hi = T.min(hi, r + wr + 1)
                key_lo[i] = r - wl if has_window else 0
                key_n[i] = T.max(hi - key_lo[i], 0)
            for i, j in T.Parallel(bm, bn):
                ok = T.Cast("uint32", c0 + j - key_lo[i]) < T.Cast("uint32", key_n[i])
                s[i, j] = T.if_then_else(ok, s[i, j], NEG_INF)

    def exp_offset(m, i, cs):
        # What row i's scores (log2 units) lose before exp2: its max (0 while -inf), less p_shift.
        offset = T.if_then_else(m[i] == NEG_INF, 0, m[i] * cs)
        return offset - p_shift if fp8 else offset

    @T.macro
    def online_softmax(s, m, m_prev, alpha, rs, cs):
        # m <- running row max; alpha <- rescale of the previous partial results;
        # s <- exp2(s * cs - max * cs + p_shift); rs <- row sums. A row whose max is still -inf uses
        # 0 as its max, so its scores exp to 0 instead of NaN.
        T.copy(m, m_prev)
        if own_rows:
            T.call_extern("handle", f"mate_row_max<{bn // 2}>", s.data, m.data)
        else:
            T.reduce_max(s, m, dim=1, clear=False)
        for i in T.Parallel(bm):
            alpha[i] = T.exp2(m_prev[i] * cs - T.if_then_else(m[i] == NEG_INF, 0, m[i] * cs))
        for i, j in T.Parallel(bm, bn):
            s[i, j] = T.exp2(s[i, j] * cs - exp_offset(m, i, cs))
        if own_rows:
            T.call_extern("handle", f"mate_row_sums<{bn // 2}>", s.data, rs.data)
        else:
            T.reduce_sum(s, rs, dim=1)

    @T.macro
    def scores_to_p(s, p):
        # P in the A-operand dtype. FP8: each thread keeps its own scores, which permutes the keys
        # inside every group of 32 (fp8_key_of); V was transposed with the same permutation.
        if fp8:
            for i, j in T.Parallel(bm, bn):
                p[i, j] = s[i, fp8_key_of(j)]
        else:
            T.copy(s, p)

    def tile_coords(gx, gy, gz, n_mblk, heads, batch):
        # CTA -> (query block, query head, sequence). CTAs start in launch order (x fastest).
        # Non-causal tiles cost the same: query blocks fastest, so running CTAs share a head's keys
        # in L2. Causal tiles cost their query block's index: in groups of TILE_GROUP (head,
        # sequence) pairs, the group's longest query blocks start first across its heads, so short
        # tiles fill the end of the launch (modeled, 132 SMs taking blocks as they free up: b=8,
        # h=32, s=4096 ends 1.7% after the mean load with one head's blocks after another, 0.1% in
        # groups of 8; b=1, h=32: 13.6% and 0.1%).
        if not causal:
            return gx, gy, gz
        pairs = heads * batch
        cta = gx + n_mblk * (gy + heads * gz)
        group = cta // (n_mblk * TILE_GROUP)
        rank = cta % (n_mblk * TILE_GROUP)
        size = T.min(TILE_GROUP, pairs - group * TILE_GROUP)
        pair = group * TILE_GROUP + rank % size
        return n_mblk - 1 - rank // size, pair % heads, pair // heads

    @T.prim_func
    def flash_attn_fwd(
        q: T.Tensor((total_q, heads_q, D), dtype),
        k: T.Tensor((total_k, heads_k, D), dtype),
        v: T.Tensor(v_shape, dtype),
        cu_seqlens_q: T.Tensor((batch_plus_1,), "int32"),
        cu_seqlens_k: T.Tensor((batch_plus_1,), "int32"),
        seqused_q: T.Tensor((n_used_q,), "int32"),
        seqused_k: T.Tensor((n_used_k,), "int32"),
        out: T.Tensor((total_q, heads_q, DV), out_dtype),
        lse: T.Tensor((heads_q, total_q), "float32"),
        sink: T.Tensor((n_sink,), "float32"),
        v_block: T.Tensor((n_vblock,), "int32"),
        q_descale: T.Tensor((n_desc0, n_desc1), "float32"),
        k_descale: T.Tensor((n_desc0, n_desc1), "float32"),
        v_descale: T.Tensor((n_desc0, n_desc1), "float32"),
        max_seqlen_q: T.int32,
        softmax_scale: T.float32,
        window_left: T.int32,
        window_right: T.int32,
        softcap: T.float32,
    ):
        T.annotate_pass_configs(PASS_CONFIGS)
        with T.Kernel(T.ceildiv(max_seqlen_q, bm), heads_q, batch_plus_1 - 1, threads=cfg.threads) as (gx, gy, gz):
            if own_rows or has_softcap:
                T.import_source((_ROWS_SRC if own_rows else "") + (_TANH_SRC if has_softcap else ""))
            q_s = T.alloc_shared((bm, D), dtype)
            k_s = T.alloc_shared((S, bn, D), dtype)
            v_s = T.alloc_shared((S, *v_tile), dtype)
            o_s = q_s if D == DV and not fp8 else T.alloc_shared((bm, DV), out_dtype)
            s = T.alloc_fragment((bm, bn), acc)
            p = T.alloc_fragment((bm, bn), dtype)
            o = T.alloc_fragment((bm, DV), acc)
            m = T.alloc_fragment((bm,), acc)
            m_prev = T.alloc_fragment((bm,), acc)
            alpha = T.alloc_fragment((bm,), acc)
            rs = T.alloc_fragment((bm,), acc)
            row_sum = T.alloc_fragment((bm,), acc)
            key_lo = T.alloc_fragment((bm,), "int32")
            key_n = T.alloc_fragment((bm,), "int32")
            q_full = T.alloc_barrier(128)
            k_full = T.alloc_barrier([128] * S)
            v_full = T.alloc_barrier([128] * S)
            k_empty = T.alloc_barrier([cons_threads] * S)
            v_empty = T.alloc_barrier([cons_threads] * S)

            tx = T.get_thread_binding()
            # (Held in registers: as let-bound expressions they made TileLang's sync planner ask for a
            # barrier inside the producer's single-thread TMA branch.)
            coords = tile_coords(gx, gy, gz, T.ceildiv(max_seqlen_q, bm), heads_q, batch_plus_1 - 1)
            mblk = T.alloc_var("int32", init=coords[0])
            by = T.alloc_var("int32", init=coords[1])
            bz = T.alloc_var("int32", init=coords[2])
            q0 = cu_seqlens_q[bz]
            k0 = cu_seqlens_k[bz]
            seqlen_q = seqused_q[bz] if has_seqused else cu_seqlens_q[bz + 1] - q0
            seqlen_k = seqused_k[bz] if has_seqused else cu_seqlens_k[bz + 1] - k0
            m0 = mblk * bm
            if m0 < seqlen_q:
                kh = by // (heads_q // heads_k)
                off = seqlen_k - seqlen_q
                m_last = T.min(m0 + bm, seqlen_q) - 1
                # Window sides, unbounded (-1) or huge ones clamped to BIG so that sums stay in int32.
                wl = T.if_then_else(window_left >= 0, T.min(window_left, BIG), BIG)
                wr = T.if_then_else(window_right >= 0, T.min(window_right, BIG), BIG)
                # Keys any row of this tile can see: [lo_key, hi_key).
                hi_key = seqlen_k
                if causal:
                    hi_key = T.min(hi_key, m_last + off + 1)
                if has_window:
                    hi_key = T.min(hi_key, m_last + off + wr + 1)
                lo_key = 0
                if has_window:
                    lo_key = T.max(0, m0 + off - wl)
                n_max = T.ceildiv(T.max(hi_key, 0), bn)
                n_min = lo_key // bn
                nblk = T.max(n_max - n_min, 0)
                empty = nblk == 0
                nb = T.max(nblk, 1)  # an empty tile still runs one block, fully masked

                if tx >= cons_threads:
                    # ---- producer warpgroup: TMA loads ----
                    T.set_max_nreg(prod_regs, 0)
                    T.tma_copy(q[q0 + m0:q0 + m0 + bm, by, :], q_s, barrier=q_full)
                    T.barrier_arrive(q_full)
                    for t in T.serial(nb):
                        kb = T.max(n_max - 1 - t, 0)
                        st = t % S
                        ph = (t // S) % 2
                        T.barrier_wait(k_empty[st], ph ^ 1)
                        T.tma_copy(k[k0 + kb * bn:k0 + kb * bn + bn, kh, :], k_s[st, :, :], barrier=k_full[st])
                        T.barrier_arrive(k_full[st])
                        T.barrier_wait(v_empty[st], ph ^ 1)
                        if fp8:
                            c0 = (v_block[bz] + kb) * bn
                            T.tma_copy(v[kh, :, c0:c0 + bn], v_s[st, :, :], barrier=v_full[st])
                        else:
                            T.tma_copy(v[k0 + kb * bn:k0 + kb * bn + bn, kh, :], v_s[st, :, :], barrier=v_full[st])
                        T.barrier_arrive(v_full[st])
                else:
                    # ---- consumer warpgroups ----
                    T.set_max_nreg(cons_regs, 1)
                    # FP8: the q and k descales fold into the score scale, v's into the output.
                    scale = T.alloc_var(acc, init=softmax_scale * q_descale[bz, kh] * k_descale[bz, kh]
                                        if fp8 else softmax_scale)
                    cs = 1.0 if has_softcap else scale * LOG2E
                    sc_in = scale / softcap
                    sc_out = softcap * LOG2E
                    wg = tx // 128
                    T.fill(o, 0)
                    T.fill(row_sum, 0)
                    T.fill(m, NEG_INF)
                    if pingpong:
                        # The last warpgroup lets the first one take the tensor cores first.
                        if wg == n_cons - 1:
                            T.named_barrier_arrive(BAR, 128 * 2)
                    T.barrier_wait(q_full, 0)

                    # first key block: S = Q K^T, softmax, P
                    T.barrier_wait(k_full[0], 0)
                    if pingpong:
                        T.sync_threads(BAR + wg, 128 * 2)
                    T.wgmma_gemm(q_s, k_s[0, :, :], s, transpose_B=True, clear_accum=True,
                                 policy=T.GemmWarpPolicy.FullRow)
                    if pingpong:
                        T.named_barrier_arrive(BAR + (wg + 1) % n_cons, 128 * 2)
                    T.wait_wgmma(0)
                    T.barrier_arrive(k_empty[0])
                    score_mod_and_mask(s, key_lo, key_n, T.max(n_max - 1, 0), empty, m0, m_last, off, seqlen_k, wl, wr,
                                       sc_in, sc_out)
                    online_softmax(s, m, m_prev, alpha, rs, cs)
                    T.copy(rs, row_sum)
                    scores_to_p(s, p)

                    # steady state: S_t = Q K_t^T and O += P_{t-1} V_{t-1} in flight together;
                    # the softmax of S_t overlaps the second gemm.
                    for t in T.serial(1, nb):
                        kb = n_max - 1 - t
                        st = t % S
                        pst = (t - 1) % S
                        T.barrier_wait(k_full[st], (t // S) % 2)
                        if pingpong:
                            T.sync_threads(BAR + wg, 128 * 2)
                        T.wgmma_gemm(q_s, k_s[st, :, :], s, transpose_B=True, clear_accum=True,
                                     policy=T.GemmWarpPolicy.FullRow)
                        T.barrier_wait(v_full[pst], ((t - 1) // S) % 2)
                        T.wgmma_gemm(p, v_s[pst, :, :], o, transpose_B=fp8, policy=T.GemmWarpPolicy.FullRow)
                        if pingpong:
                            T.named_barrier_arrive(BAR + (wg + 1) % n_cons, 128 * 2)
                        T.wait_wgmma(1)
                        T.barrier_arrive(k_empty[st])
                        score_mod_and_mask(s, key_lo, key_n, kb, empty, m0, m_last, off, seqlen_k, wl, wr,
                                           sc_in, sc_out)
                        online_softmax(s, m, m_prev, alpha, rs, cs)
                        T.wait_wgmma(0)
                        T.barrier_arrive(v_empty[pst])
                        for i in T.Parallel(bm):
                            row_sum[i] = row_sum[i] * alpha[i] + rs[i]
                        for i, j in T.Parallel(bm, DV):
                            o[i, j] *= alpha[i]
                        scores_to_p(s, p)

                    # last block: O += P V
                    lst = (nb - 1) % S
                    T.barrier_wait(v_full[lst], ((nb - 1) // S) % 2)
                    if pingpong:
                        T.sync_threads(BAR + wg, 128 * 2)
                    T.wgmma_gemm(p, v_s[lst, :, :], o, transpose_B=fp8, policy=T.GemmWarpPolicy.FullRow)
                    if pingpong:
                        T.named_barrier_arrive(BAR + (wg + 1) % n_cons, 128 * 2)
                    T.wait_wgmma(0)
                    T.barrier_arrive(v_empty[lst])
                    if pingpong:
                        # Consume the last warpgroup's final hand-over (every barrier completes).
                        if wg == 0:
                            T.sync_threads(BAR, 128 * 2)

                    # ---- epilogue ----
                    if own_rows:
                        T.call_extern("handle", "mate_quad_sums", row_sum.data)  # partial -> full row sums
                    # out = O * value_scale / row_sum; value_scale is v's descale (FP8) or 1. FP8: O and
                    # the row sums carry P's factor 2^p_shift; the sums drop it, value_scale takes it.
                    value_scale = T.alloc_var(acc, init=v_descale[bz, kh] * 2.0 ** -p_shift if fp8 else 1.0)
                    if fp8:
                        for i in T.Parallel(bm):
                            row_sum[i] = row_sum[i] * 2.0 ** -p_shift
                    if has_sink:
                        # The sink joins the denominator (log2 units, like m * cs): with
                        # top = max(m * cs, sink), O / (row_sum * 2^(m cs - top) + 2^(sink - top))
                        # scaled by 2^(m cs - top); never overflows, and an empty row gets
                        # O = 0, lse = sink.
                        sink_l2 = sink[by] * LOG2E
                        for i in T.Parallel(bm):
                            m_prev[i] = T.if_then_else(row_sum[i] > 0, T.max(m[i] * cs, sink_l2), sink_l2)
                            alpha[i] = T.if_then_else(row_sum[i] > 0, T.exp2(m[i] * cs - m_prev[i]), 0)
                            row_sum[i] = row_sum[i] * alpha[i] + T.exp2(sink_l2 - m_prev[i])
                        for i in T.Parallel(bm):
                            rs[i] = alpha[i] * value_scale / row_sum[i]
                        for i, j in T.Parallel(bm, DV):
                            o[i, j] = o[i, j] * rs[i]
                    else:
                        for i in T.Parallel(bm):
                            rs[i] = value_scale / row_sum[i]
                        for i, j in T.Parallel(bm, DV):
                            o[i, j] = T.if_then_else(row_sum[i] > 0, o[i, j] * rs[i], 0)
                    T.copy(o, o_s)
                    for i, j in T.Parallel(bm, DV):
                        if m0 + i < seqlen_q:
                            out[q0 + m0 + i, by, j] = o_s[i, j]
                    for i in T.Parallel(bm):
                        if m0 + i < seqlen_q:
                            if has_sink:
                                lse[by, q0 + m0 + i] = (m_prev[i] + T.log2(row_sum[i])) * LN2
                            else:
                                lse[by, q0 + m0 + i] = T.if_then_else(
                                    row_sum[i] > 0, (m[i] * cs + T.log2(row_sum[i])) * LN2, NEG_INF)

    return flash_attn_fwd


def launch(kernel, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, out, lse, softmax_scale: float,
           window: tuple[int, int] = (-1, -1), softcap: float = 0.0, seqused_q=None, seqused_k=None,
           sink=None, v_block=None, descales=None) -> None:
    """Run a compiled forward kernel on torch tensors (no host sync, no copies).

    q (total_q, heads_q, d), k (total_k, heads_k, d), v (total_k, heads_k, dv), cu_seqlens_*
    int32 (batch + 1,), out (total_q, heads_q, dv) and lse (heads_q, total_q) float32 written in
    place. window = (left, right) with -1 for an unbounded side; softcap 0 means none (the
    kernel must have been built with has_softcap / has_window for them to take effect).
    seqused_q / seqused_k int32 (batch,) (both, for a kernel built with has_seqused) and sink
    float32 (heads_q,) (has_sink); kernels built without them get placeholders.
    FP8 kernels take v transposed by ``transpose_values`` with its v_block, and descales =
    (q_descale, k_descale, v_descale), float32 (batch, heads_k) each.
    Nothing is launched when there is nothing to compute (no sequence, or max_seqlen_q <= 0).
    """
    if max_seqlen_q <= 0 or cu_seqlens_q.shape[0] <= 1:
        return
    kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q if seqused_q is None else seqused_q,
           cu_seqlens_k if seqused_k is None else seqused_k, out, lse, lse[0] if sink is None else sink,
           cu_seqlens_k if v_block is None else v_block, *((lse,) * 3 if descales is None else descales),
           int(max_seqlen_q), float(softmax_scale), int(window[0]), int(window[1]), float(softcap))


# ---- FP8: values transposed for the P V gemm ----------------------------------------------------

# H100, 8 x 4096 keys, 32 heads (bytes read + written; copy bandwidth 3.0 TB/s): dv=128 2.43 / 2.58 TB/s
# (block_n 192 / 128), dv=256 2.60; 128 threads a block 1-2% slower. The shared-memory transpose with
# TMA stores it replaces: 2.51 / 2.47, 2.23.
_TRANSPOSE_THREADS = 256

# A thread's piece of the transpose: 16 dims of the keys key, key + 1, key + 8 and key + 9, which
# fp8_key_of puts in 4 consecutive columns. Four 16-byte loads (rows at or past `count` read as
# zeros), 4x4 byte transposes in registers (PRMT), and one 4-byte store per dim; the 8 pieces of a
# 32-key group sit in neighbouring lanes, so each store instruction writes whole 32-byte sectors.
_VT_SRC = r"""
__device__ __forceinline__ void mate_fp8_vt_piece(const void* v, long long v_offset, int row_bytes, int count,
                                                  const void* vt, long long vt_offset, long long dst_row_bytes) {
  // TileLang declares vt const: it sees no store to it (they happen here).
  const char* src = (const char*)v + v_offset;
  char* dst = (char*)vt + vt_offset;
  const int rows[4] = {0, 1, 8, 9};
  uint4 r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    r[i] = rows[i] < count ? *(const uint4*)(src + (long long)rows[i] * row_bytes)
                           : make_uint4(0u, 0u, 0u, 0u);
  const unsigned* w[4] = {&r[0].x, &r[1].x, &r[2].x, &r[3].x};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const unsigned lo01 = __byte_perm(w[0][c], w[1][c], 0x5140), hi01 = __byte_perm(w[0][c], w[1][c], 0x7362);
    const unsigned lo23 = __byte_perm(w[2][c], w[3][c], 0x5140), hi23 = __byte_perm(w[2][c], w[3][c], 0x7362);
    const unsigned out[4] = {__byte_perm(lo01, lo23, 0x5410), __byte_perm(lo01, lo23, 0x7632),
                             __byte_perm(hi01, hi23, 0x5410), __byte_perm(hi01, hi23, 0x7632)};
#pragma unroll
    for (int e = 0; e < 4; ++e) *(unsigned*)(dst + (4 * c + e) * dst_row_bytes) = out[e];
  }
}
"""


def build_v_transpose(head_dim_v: int, block_n: int):
    """The FP8 pre-pass: values (total_k, heads_k, dv) -> (heads_k, dv, total_vt), K-major blocks
    for the forward kernel's P V gemm. Parameters, in order:

        v            float8_e4m3fn (total_k, heads_k, dv)   contiguous, 16-byte aligned (as TMA wants k)
        key_start    int32 (batch,)   first row of sequence b in v
        key_count    int32 (batch,)   its number of keys
        v_block      int32 (batch,)   its first block in vt (blocks of block_n columns)
        vt           float8_e4m3fn (heads_k, dv, total_vt)  written; total_vt a multiple of 4
        max_seqlen_k int32            sizes the grid only (>= 1; smaller values loop)

    Sequence b owns the blocks v_block[b], ..., v_block[b] + max(1, ceil(key_count[b] / block_n))
    - 1: column c of its block t holds key t * block_n + fp8_key_of(c) (the forward kernel's key
    permutation), zeros past its last key. Columns past total_vt are dropped (never written).
    A thread writes 4 columns x 16 dims (_VT_SRC): a 32-key group is dv / 2 such pieces."""
    DV, bn = int(head_dim_v), int(block_n)
    if DV % 16 or not 16 <= DV <= 256 or bn % _FP8_K or not _FP8_K <= bn <= 256:
        raise ValueError(f"head_dim_v must be a multiple of 16 in [16, 256] and block_n a multiple of {_FP8_K} "
                         f"in [{_FP8_K}, 256], got ({DV}, {bn})")
    dims = DV // 16
    per_block = bn // _FP8_K * 8 * dims  # pieces in a block of bn columns
    threads = _TRANSPOSE_THREADS
    total_k, heads_k, batch, total_vt = T.dynamic("total_k, heads_k, batch, total_vt")

    @T.prim_func
    def fp8_v_transpose(
        v: T.Tensor((total_k, heads_k, DV), FP8),
        key_start: T.Tensor((batch,), "int32"),
        key_count: T.Tensor((batch,), "int32"),
        v_block: T.Tensor((batch,), "int32"),
        vt: T.Tensor((heads_k, DV, total_vt), FP8),
        max_seqlen_k: T.int32,
    ):
        grid = T.ceildiv(T.max(T.ceildiv(max_seqlen_k, bn), 1) * per_block, threads)
        with T.Kernel(grid, heads_k, batch, threads=threads) as (bx, h, b):
            T.import_source(_VT_SRC)
            tx = T.get_thread_binding()
            n = key_count[b]
            pieces = T.max(T.ceildiv(n, bn), 1) * per_block  # whole blocks, at least one
            for t in T.serial(T.ceildiv(T.max(pieces - bx * threads, 0), grid * threads)):
                u = (bx + t * grid) * threads + tx
                lane = u % 8  # the piece's 4 columns in its 32-key group
                dim = u // 8 % dims * 16
                group = u // (8 * dims) * _FP8_K
                key = group + lane // 4 * 16 + lane % 4 * 2
                col = v_block[b] * bn + group + lane * 4
                if u < pieces and col < total_vt:
                    # Raw offsets: rows past the sequence (zero padding) may lie past v's end, unread.
                    row = T.Cast("int64", key_start[b] + key) * heads_k + h
                    T.call_extern("handle", "mate_fp8_vt_piece", v.data, row * DV + dim, heads_k * DV, n - key,
                                  vt.data, (T.Cast("int64", h) * DV + dim) * total_vt + col, total_vt)

    return fp8_v_transpose


def transposed_values_reference(v, key_start, key_count, block_n: int):
    """What ``build_v_transpose``'s kernel writes, in PyTorch (for checks): float32 (heads_k, dv,
    columns) for v (total_k, heads_k, dv) and per-sequence key_start / key_count (ints)."""
    order = torch.tensor([fp8_key_of(c) for c in range(block_n)])
    columns = []
    for start, count in zip(key_start, key_count, strict=True):
        keys = torch.zeros(max(1, -(-count // block_n)) * block_n, *v.shape[1:])
        keys[:count] = v[start:start + count].float()
        columns.append(keys.view(-1, block_n, *v.shape[1:])[:, order].flatten(0, 1))
    return torch.cat(columns).permute(1, 2, 0)


def transpose_values(kernel, v, key_start, key_count, max_seqlen_k: int, block_n: int, max_blocks: int):
    """FP8 values for the forward kernel: run ``build_v_transpose``'s kernel and return (vt,
    v_block). key_start / key_count int32 (batch,); max_blocks >= the sum over the sequences of
    max(1, ceil(key_count / block_n)) (device-side sizes are not read back: no host sync)."""
    blocks = torch.clamp((key_count + (block_n - 1)) // block_n, min=1)
    v_block = (torch.cumsum(blocks, 0) - blocks).to(torch.int32)
    vt = torch.empty(v.shape[1], v.shape[2], max_blocks * block_n, dtype=v.dtype, device=v.device)
    if key_count.shape[0]:
        kernel(v, key_start, key_count, v_block, vt, max(int(max_seqlen_k), 1))
    return vt, v_block
