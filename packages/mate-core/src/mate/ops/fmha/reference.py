"""PyTorch reference of the attention family: the executable specification.

Follows FlashAttention-3's semantics exactly; computes in float32 (or in the inputs' dtype
when that is float64, as the tests do).
"""

from __future__ import annotations

import torch


def flash_attn_combine(out_partial: torch.Tensor, lse_partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partial results.

    out_partial: (num_splits, *rows, head_dim); lse_partial: (num_splits, *rows), the natural-log
    sum of exponentials of each split's scores. Returns (out, lse) over the rows, in the
    compute dtype. A split whose LSE is -inf contributes nothing (its partial output is not
    read, so garbage there cannot leak); rows whose splits are all -inf give out 0, lse -inf.
    """
    compute = torch.float64 if out_partial.dtype == torch.float64 else torch.float32
    lse_partial = lse_partial.to(compute)
    lse_max = lse_partial.amax(dim=0)
    shift = torch.where(lse_max == float("-inf"), torch.zeros_like(lse_max), lse_max)
    weights = torch.exp(lse_partial - shift)
    total = weights.sum(dim=0)
    lse = torch.log(total) + lse_max
    valid_total = (total > 0) & ~total.isnan()
    scale = torch.where(valid_total, weights / torch.where(valid_total, total, 1.0), 0.0)
    used = (scale > 0).unsqueeze(-1)
    contributions = torch.where(used, scale.unsqueeze(-1) * out_partial.to(compute), 0.0)
    return contributions.sum(dim=0), lse


# ---- attention forward ---------------------------------------------------------------------
#
# Conventions (FlashAttention-3's, hopper/flash_api.cpp and the kernels' mask/seqlen code):
#
# * One sequence has seqlen_q queries and seqlen_k keys. Query i sits at position
#   i + seqlen_k - seqlen_q and key j at position j: masks are aligned to the bottom-right
#   corner, so the last query sees the last key.
# * causal: key position <= query position. Local window (left, right), -1 = unbounded:
#   query position - left <= key position <= query position + right. attention_chunk c > 0:
#   the key lies in the query position's chunk, floor(pos / c) equal for both. All masks
#   intersect.
# * Scores are (q . k + qv . v) * softmax_scale, then softcap * tanh(scores / softcap) when
#   softcap > 0, then masked. A learnable sink adds exp(sink[h]) to the softmax denominator
#   (in the same units as the scaled scores) without contributing to the output.
# * The LSE is the natural log of the denominator. A query that sees no key gets output 0
#   and LSE -inf, or LSE sink[h] with a sink (the kernels' finalize step with an empty row).
# * Context parallelism (cp_world_size W > 1, MATE's extension from vLLM's FlashAttention
#   fork): this rank holds every W-th token of the global key sequence starting at cp_rank,
#   so its local key j is global key j * W + cp_rank, and the query alignment uses the
#   global key count cp_tot_seqused_k[b] instead of the local one.

_SCORE_ELEMENTS_PER_BLOCK = 1 << 22  # bounds the (heads, queries, keys) score block's memory


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference computes in float32, or in float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_keys(query_pos: torch.Tensor, key_pos: torch.Tensor, seqlen_k: int, *, causal: bool = False,
                 window_size: tuple[int, int] = (-1, -1), attention_chunk: int = 0) -> torch.Tensor:
    """Boolean (queries, keys) matrix: which keys each query attends to (positions as above)."""
    qp = query_pos[:, None]
    kp = key_pos[None, :]
    keep = kp < seqlen_k
    if causal:
        keep = keep & (kp <= qp)
    left, right = window_size
    if left >= 0:
        keep = keep & (kp >= qp - left)
    if right >= 0:
        keep = keep & (kp <= qp + right)
    if attention_chunk > 0:
        keep = keep & (torch.div(kp, attention_chunk, rounding_mode="floor")
                       == torch.div(qp, attention_chunk, rounding_mode="floor"))
    return keep


def attention_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float,
                       causal: bool = False, window_size: tuple[int, int] = (-1, -1), attention_chunk: int = 0,
                       softcap: float = 0.0, learnable_sink: torch.Tensor | None = None,
                       qv: torch.Tensor | None = None, key_stride: int = 1, key_offset: int = 0,
                       seqlen_k_total: int | None = None,
                       weights_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence, the core every layout reduces to.

    q: (seqlen_q, nheads, headdim); k: (seqlen_k, nheads_k, headdim); v: (seqlen_k, nheads_k,
    headdim_v); qv: (seqlen_q, nheads, headdim_v); learnable_sink: (nheads,). All already
    dequantized, in one floating dtype (the compute dtype). Query head h reads key/value head
    h // (nheads // nheads_k). Key j sits at position j * key_stride + key_offset and queries
    are aligned to seqlen_k_total keys (default: this sequence's seqlen_k); both only differ
    from the defaults under context parallelism. weights_dtype rounds the normalized attention
    weights to that dtype before they multiply v (upstream's attention_ref(intermediate_dtype=...):
    the low-precision counterpart of the FP8 kernels, whose P V gemm takes fp8 weights).

    Returns out (seqlen_q, nheads, headdim_v) and lse (nheads, seqlen_q), natural log.
    """
    seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k, headdim_v = v.shape
    dtype = q.dtype
    total = seqlen_k if seqlen_k_total is None else seqlen_k_total
    out = torch.zeros(seqlen_q, nheads, headdim_v, dtype=dtype, device=q.device)
    sink = None if learnable_sink is None else learnable_sink.to(dtype)[:, None]  # (nheads, 1)
    empty_lse = float("-inf")
    lse = torch.full((nheads, seqlen_q), empty_lse, dtype=dtype, device=q.device)
    if sink is not None:
        lse.copy_(sink.expand(nheads, seqlen_q))
    if seqlen_q == 0 or seqlen_k == 0:
        return out, lse
    group = nheads // nheads_k
    k_heads = k.repeat_interleave(group, dim=1)
    v_heads = v.repeat_interleave(group, dim=1)
    query_pos = torch.arange(seqlen_q, device=q.device) + (total - seqlen_q)
    key_pos = torch.arange(seqlen_k, device=q.device) * key_stride + key_offset
    rows_per_block = max(1, _SCORE_ELEMENTS_PER_BLOCK // max(1, nheads * seqlen_k))
    for start in range(0, seqlen_q, rows_per_block):
        rows = slice(start, min(seqlen_q, start + rows_per_block))
        scores = torch.einsum("qhd,khd->hqk", q[rows], k_heads)
        if qv is not None:
            scores = scores + torch.einsum("qhd,khd->hqk", qv[rows], v_heads)
        scores = scores * softmax_scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        keep = visible_keys(query_pos[rows], key_pos, total, causal=causal, window_size=window_size,
                            attention_chunk=attention_chunk)
        scores = scores.masked_fill(~keep, float("-inf"))
        peak = scores.amax(dim=-1)  # (nheads, rows); -inf where no key is visible
        if sink is not None:
            peak = torch.maximum(peak, sink)
        shift = torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak)
        weights = torch.exp(scores - shift[..., None])  # masked keys give exactly 0
        total_weight = weights.sum(dim=-1)
        if sink is not None:
            total_weight = total_weight + torch.exp(sink - shift)
        has_weight = total_weight > 0
        inverse = torch.where(has_weight, 1.0 / torch.where(has_weight, total_weight, 1.0), 0.0)
        weights = weights * inverse[..., None]
        if weights_dtype is not None:
            weights = weights.to(weights_dtype).to(dtype)
        out[rows] = torch.einsum("hqk,khd->qhd", weights, v_heads)
        lse[:, rows] = torch.where(has_weight, torch.log(total_weight) + shift, empty_lse)
    return out, lse


def mask_kind(causal: bool, window_size: tuple[int, int], attention_chunk: int, seqlen_q: int,
              seqlen_k: int) -> tuple[bool, bool]:
    """(is_causal, is_local) as FlashAttention-3's host code derives them from the static
    (maximum) sequence lengths: windows covering everything become unbounded, causal is a
    window (-1, 0) without chunking, local is any other bounded window or chunking. The
    masks themselves do not depend on this (the normalization never changes which keys are
    visible); the rotary position of the queries does (see `attention_forward`)."""
    left, right = window_size
    if left >= seqlen_k - 1:
        left = -1
    if right >= seqlen_q - 1:
        right = -1
    if causal:
        right = 0
    is_causal = left < 0 and right == 0 and attention_chunk == 0
    is_local = (left >= 0 or right >= 0 or attention_chunk >= 1) and not is_causal
    return is_causal, is_local


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x (tokens, heads, headdim) at `positions` (tokens,).

    cos/sin: (seqlen_ro, rotary_dim / 2), converted to x's dtype. The first rotary_dim
    channels rotate in pairs, (0, 1), (2, 3), ... when interleaved (GPT-J), else
    (i, i + rotary_dim / 2) (GPT-NeoX): (a, b) -> (a cos - b sin, a sin + b cos). The rest
    pass through unchanged.
    """
    rotary_dim = 2 * cos.shape[1]
    c = cos.to(x.dtype)[positions][:, None, :]
    s = sin.to(x.dtype)[positions][:, None, :]
    head, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        a, b = head[..., 0::2], head[..., 1::2]
        rotated = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        a, b = head[..., : rotary_dim // 2], head[..., rotary_dim // 2:]
        rotated = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return torch.cat((rotated, tail), dim=-1)


def _host_ints(tensor: torch.Tensor | None) -> list | None:
    return None if tensor is None else tensor.tolist()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class _KeySource:
    """The logical key/value rows of each batch element: dense (batch_k, capacity, ...),
    packed with cu_seqlens_k (total_k, ...) or paged (num_pages, page_size, ...)."""

    def __init__(self, k, v, cu_seqlens_k, page_table, kv_batch_idx, batch_size):
        self.k, self.v = k, v
        self.cu = _host_ints(cu_seqlens_k)
        self.page_table = page_table
        self.page_size = k.shape[1] if page_table is not None else 1
        self.rows = _host_ints(kv_batch_idx) or list(range(batch_size))
        if self.cu is not None:
            _require(all(0 <= a <= b <= k.shape[0] for a, b in zip(self.cu, self.cu[1:], strict=False)),
                     f"cu_seqlens_k: must be non-decreasing and within [0, {k.shape[0]}], got {self.cu}")
        limit = page_table.shape[0] if page_table is not None else k.shape[0]
        if kv_batch_idx is not None:
            _require(all(0 <= r < limit for r in self.rows),
                     f"cache_batch_idx: values must lie in [0, {limit}), got {self.rows}")

    def capacity(self, b: int) -> int:
        if self.cu is not None:
            return self.cu[b + 1] - self.cu[b]
        if self.page_table is not None:
            return self.page_table.shape[1] * self.page_size
        return self.k.shape[1]

    def index(self, b: int, positions: torch.Tensor) -> tuple:
        """Index tuple into k/v for the logical positions of batch element b."""
        if self.cu is not None:
            return (positions + self.cu[b],)
        row = self.rows[b]
        if self.page_table is not None:
            # Only the pages a sequence reaches are read: the rest of its row may hold anything.
            pages = self.page_table[row].long()[torch.div(positions, self.page_size, rounding_mode="floor")]
            _require(bool(((pages >= 0) & (pages < self.k.shape[0])).all()),
                     f"page_table: batch {b} (row {row}) points at pages outside [0, {self.k.shape[0]})")
            return pages, positions % self.page_size
        return torch.full_like(positions, row), positions


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                      qv: torch.Tensor | None = None,
                      cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                      cu_seqlens_k_new: torch.Tensor | None = None,
                      seqused_q: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None,
                      max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                      page_table: torch.Tensor | None = None, kv_batch_idx: torch.Tensor | None = None,
                      leftpad_k: torch.Tensor | None = None,
                      rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                      seqlens_rotary: torch.Tensor | None = None, rotary_interleaved: bool = True,
                      q_descale: torch.Tensor | None = None, k_descale: torch.Tensor | None = None,
                      v_descale: torch.Tensor | None = None,
                      softmax_scale: float | None = None, causal: bool = False,
                      window_size: tuple[int, int] = (-1, -1), attention_chunk: int = 0, softcap: float = 0.0,
                      learnable_sink: torch.Tensor | None = None,
                      cp_world_size: int = 1, cp_rank: int = 0,
                      cp_tot_seqused_k: torch.Tensor | None = None,
                      weights_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-3's forward (``mha_fwd``) over every layout; the arguments are upstream's.

    Queries: q (batch, seqlen_q, nheads, headdim), or (total_q, nheads, headdim) packed by
    cu_seqlens_q (with max_seqlen_q); seqused_q[b] limits the queries used. Keys/values: k, v
    dense (batch_k, seqlen_k, nheads_k, headdim[_v]), packed (total_k, ...) by cu_seqlens_k,
    or paged (num_pages, page_size, ...) through page_table (batch_k, pages_per_seq); the
    cache row of batch element b is kv_batch_idx[b] (default b). Batch element b's keys are
    the logical rows [leftpad_k[b], seqused_k[b]) (defaults: 0 and all rows).

    Appending (k_new/v_new, seqused_k required): batch element b's new rows (k_new[b], or
    its cu_seqlens_k_new slice) are written into k/v *in place* at logical rows seqused_k[b],
    seqused_k[b] + 1, ..., in the cache's dtype, and attended to with the old ones. With
    rotary_cos/sin, new key i is rotated at position r + i and query i at r + i when the
    mask is causal or local, else every query at r, where r = seqlens_rotary[b], default
    seqused_k[b] (the rotated values are rounded to the storage dtype as the kernels do).

    FP8 (float8_e4m3fn) inputs are dequantized with q/k/v_descale (batch, nheads_k) (query
    head h uses q_descale[b, h // (nheads // nheads_k)]; qv uses q_descale too); missing
    descales are 1. softmax_scale defaults to 1 / sqrt(headdim + headdim_v if qv else
    headdim) as upstream's Python layer does. weights_dtype: see `attention_sequence`.

    Returns (out, lse) in the compute dtype: out shaped like q with headdim_v; lse
    (batch, nheads, seqlen_q), or (nheads, total_q) when cu_seqlens_q is given. Query rows
    outside every sequence (past seqused_q or cu_seqlens_q[-1]) are not computed by
    upstream's kernels; here they hold 0 and -inf.
    """
    dtype = compute_dtype(q.dtype)
    varlen_q = cu_seqlens_q is not None
    nheads, headdim = q.shape[-2], q.shape[-1]
    nheads_k, headdim_v = k.shape[-2], v.shape[-1]
    group = nheads // nheads_k
    batch_size = cu_seqlens_q.shape[0] - 1 if varlen_q else q.shape[0]
    seqlen_q_static = (max_seqlen_q if max_seqlen_q is not None else 0) if varlen_q else q.shape[1]
    if softmax_scale is None:
        softmax_scale = (headdim + (headdim_v if qv is not None else 0)) ** -0.5
    fp8 = q.dtype == torch.float8_e4m3fn
    window_size = tuple(window_size)

    keys = _KeySource(k, v, cu_seqlens_k, page_table, kv_batch_idx, batch_size)
    if page_table is not None:
        seqlen_k_static = page_table.shape[1] * keys.page_size
    elif cu_seqlens_k is not None:
        seqlen_k_static = max_seqlen_k if max_seqlen_k is not None else max(
            [keys.capacity(b) for b in range(batch_size)], default=0)
    else:
        seqlen_k_static = k.shape[1]
    is_causal, is_local = mask_kind(causal, window_size, attention_chunk, seqlen_q_static, seqlen_k_static)

    cu_q = _host_ints(cu_seqlens_q)
    used_q = _host_ints(seqused_q)
    used_k = _host_ints(seqused_k)
    leftpad = _host_ints(leftpad_k)
    cu_new = _host_ints(cu_seqlens_k_new)
    ro_lens = _host_ints(seqlens_rotary)
    cp_total = _host_ints(cp_tot_seqused_k) if cp_world_size > 1 else None
    if cu_q is not None:
        _require(all(0 <= a <= b <= q.shape[0] for a, b in zip(cu_q, cu_q[1:], strict=False)),
                 f"cu_seqlens_q: must be non-decreasing and within [0, {q.shape[0]}], got {cu_q}")
    if cu_new is not None:
        _require(all(0 <= a <= b <= k_new.shape[0] for a, b in zip(cu_new, cu_new[1:], strict=False)),
                 f"cu_seqlens_k_new: must be non-decreasing and within [0, {k_new.shape[0]}], got {cu_new}")

    def query_rows(b: int) -> tuple[int, int]:
        """(first row, count) of batch element b's queries in q's leading dims."""
        start, length = (cu_q[b], cu_q[b + 1] - cu_q[b]) if varlen_q else (0, q.shape[1])
        if used_q is not None:
            _require(0 <= used_q[b] <= length, f"seqused_q: {used_q[b]} for batch {b} exceeds its {length} queries")
            length = used_q[b]
        return start, length

    def key_range(b: int) -> tuple[int, int]:
        """Batch element b's old keys as logical rows [first, end)."""
        capacity = keys.capacity(b)
        end = used_k[b] if used_k is not None else capacity
        first = leftpad[b] if leftpad is not None else 0
        _require(0 <= first <= end <= capacity,
                 f"seqused_k/cache_seqlens and leftpad: batch {b} uses keys [{first}, {end}) of {capacity}")
        return first, end

    def new_rows(b: int) -> tuple[int, int]:
        if cu_new is not None:
            return cu_new[b], cu_new[b + 1] - cu_new[b]
        return 0, k_new.shape[1]

    def rotary_start(b: int) -> int:
        return ro_lens[b] if ro_lens is not None else key_range(b)[1]

    def rotate(x: torch.Tensor, b: int, per_token: bool, storage: torch.dtype) -> torch.Tensor:
        count = x.shape[0]
        positions = torch.arange(count, device=x.device) if per_token else torch.zeros(count, dtype=torch.long,
                                                                                        device=x.device)
        positions = positions + rotary_start(b)
        if count:
            _require(int(positions.max()) < rotary_cos.shape[0],
                     f"rotary_cos: batch {b} needs rotary position {int(positions.max())} but rotary_cos has "
                     f"{rotary_cos.shape[0]} rows")
            _require(int(positions.min()) >= 0, f"rotary_seqlens: negative rotary position for batch {b}")
        rotated = apply_rotary(x.to(dtype), rotary_cos, rotary_sin, positions, rotary_interleaved)
        return rotated.to(storage).to(dtype)

    def dequantize(x: torch.Tensor, descale: torch.Tensor | None, b: int, per_query_head: bool) -> torch.Tensor:
        x = x.to(dtype)
        if not fp8 or descale is None:
            return x
        scale = descale[b].to(dtype)
        if per_query_head:
            scale = scale.repeat_interleave(group)
        return x * scale[:, None]

    # 1. Append the new keys/values into the cache (all batch elements first, then attend).
    if k_new is not None:
        for b in range(batch_size):
            _, end = key_range(b)
            start, count = new_rows(b)
            _require(end + count <= keys.capacity(b),
                     f"k: appending {count} rows at cache_seqlens={end} overflows the cache of batch {b} "
                     f"({keys.capacity(b)} rows)")
            chunk_k = k_new[start:start + count] if cu_new is not None else k_new[b]
            chunk_v = v_new[start:start + count] if cu_new is not None else v_new[b]
            if rotary_cos is not None:
                chunk_k = rotate(chunk_k, b, True, k.dtype)
            where = keys.index(b, torch.arange(end, end + count, device=k.device))
            k[where] = chunk_k.to(k.dtype)
            v[where] = chunk_v.to(v.dtype)

    # 2. Attend, one sequence at a time.
    out_rows = (q.shape[0],) if varlen_q else (batch_size, q.shape[1])
    out = torch.zeros(*out_rows, nheads, headdim_v, dtype=dtype, device=q.device)
    lse = torch.full((nheads, q.shape[0]) if varlen_q else (batch_size, nheads, q.shape[1]), float("-inf"),
                     dtype=dtype, device=q.device)
    sink = None if learnable_sink is None else learnable_sink.to(dtype)
    for b in range(batch_size):
        q_start, seqlen_q = query_rows(b)
        first, end = key_range(b)
        if k_new is not None:
            end += new_rows(b)[1]
        where = keys.index(b, torch.arange(first, end, device=k.device))
        k_seq = dequantize(k[where], k_descale, b, False)
        v_seq = dequantize(v[where], v_descale, b, False)
        q_seq = q[q_start:q_start + seqlen_q] if varlen_q else q[b, :seqlen_q]
        qv_seq = None
        if qv is not None:
            qv_seq = qv[q_start:q_start + seqlen_q] if varlen_q else qv[b, :seqlen_q]
        if rotary_cos is not None:
            q_seq = rotate(q_seq, b, is_causal or is_local, q.dtype)
        q_seq = dequantize(q_seq, q_descale, b, True)
        if qv_seq is not None:
            qv_seq = dequantize(qv_seq, q_descale, b, True)
        cp = {}
        if cp_total is not None:
            cp = {"key_stride": cp_world_size, "key_offset": cp_rank, "seqlen_k_total": cp_total[b]}
        seq_out, seq_lse = attention_sequence(q_seq, k_seq, v_seq, softmax_scale=softmax_scale, causal=causal,
                                              window_size=window_size, attention_chunk=attention_chunk,
                                              softcap=softcap, learnable_sink=sink, qv=qv_seq, **cp,
                                              weights_dtype=weights_dtype)
        if varlen_q:
            out[q_start:q_start + seqlen_q] = seq_out
            lse[:, q_start:q_start + seqlen_q] = seq_lse
        else:
            out[b, :seqlen_q] = seq_out
            lse[b, :, :seqlen_q] = seq_lse
    return out, lse
