"""The attention forward reference against a naive float64 formula written independently:
explicit loops over heads, queries and keys, the masks as position inequalities, the softmax
with math.exp/log, rotary embedding pair by pair and the cache append row by row."""

import math

import pytest
import torch

from mate import testing
from mate.ops.fmha import reference

F64 = torch.float64


# ---- the naive formula ---------------------------------------------------------------------

def naive_sequence(q, k, v, *, scale, causal=False, window=(-1, -1), chunk=0, softcap=0.0, sink=None, qv=None,
                   key_stride=1, key_offset=0, total_k=None):
    """One sequence: q (sq, hq, d), k (sk, hk, d), v (sk, hk, dv) -> out (sq, hq, dv), lse (hq, sq)."""
    sq, hq, _ = q.shape
    sk, hk, dv = v.shape
    aligned = sk if total_k is None else total_k
    out = torch.zeros(sq, hq, dv, dtype=F64)
    lse = torch.full((hq, sq), -math.inf, dtype=F64)
    for h in range(hq):
        kh = h * hk // hq
        dots = (q[:, h].double() @ k[:, kh].double().T).tolist()
        extra = (qv[:, h].double() @ v[:, kh].double().T).tolist() if qv is not None else None
        for i in range(sq):
            here = aligned - sq + i
            picked = []
            for j in range(sk):
                there = j * key_stride + key_offset
                if there >= aligned or (causal and there > here):
                    continue
                if window[0] >= 0 and there < here - window[0]:
                    continue
                if window[1] >= 0 and there > here + window[1]:
                    continue
                if chunk and math.floor(there / chunk) != math.floor(here / chunk):
                    continue
                score = (dots[i][j] + (extra[i][j] if extra else 0.0)) * scale
                if softcap:
                    score = softcap * math.tanh(score / softcap)
                picked.append((j, score))
            logits = [s for _, s in picked] + ([float(sink[h])] if sink is not None else [])
            if not logits:
                continue
            top = max(logits)
            norm = top + math.log(sum(math.exp(x - top) for x in logits))
            lse[h, i] = norm
            for j, score in picked:
                out[i, h] += math.exp(score - norm) * v[j, kh].double()
    return out, lse


def naive_rotate(x, cos_row, sin_row, interleaved):
    """x (heads, d): rotate the pairs of the first 2 * len(cos_row) channels one by one."""
    x = x.double()
    result = x.clone()
    half = cos_row.shape[0]
    for p in range(half):
        i0, i1 = (2 * p, 2 * p + 1) if interleaved else (p, p + half)
        c, s = float(cos_row[p]), float(sin_row[p])
        result[:, i0] = x[:, i0] * c - x[:, i1] * s
        result[:, i1] = x[:, i0] * s + x[:, i1] * c
    return result


def assert_close(got, want, what, atol=1e-10):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf pattern differs"
    finite = ~torch.isneginf(want)
    error = (got[finite].double() - want[finite].double()).abs().max().item() if finite.any() else 0.0
    assert error <= atol, f"{what}: max abs error {error:.3e} > {atol:.1e}"


def randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=F64) * scale


# ---- fixed-length batches: every mask and score feature ---------------------------------------

FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_size": (3, 1)},
    "window_left_only": {"window_size": (2, -1)},
    "window_right_only": {"window_size": (-1, 0)},
    "causal_window": {"causal": True, "window_size": (4, -1)},
    "softcap": {"softcap": 2.5},
    "sink": {"sink": True},
    "chunk": {"attention_chunk": 4},
    "causal_chunk": {"causal": True, "attention_chunk": 3},
    "window_chunk": {"window_size": (5, 2), "attention_chunk": 6},
    "causal_sink_softcap_scale": {"causal": True, "sink": True, "softcap": 1.5, "softmax_scale": 0.4},
}


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("seqlens", [(5, 13), (13, 5), (1, 9), (8, 8)], ids=lambda s: f"q{s[0]}k{s[1]}")
@pytest.mark.parametrize("feature", list(FEATURES))
def test_fixed_length_matches_naive(feature, seqlens, heads):
    options = dict(FEATURES[feature])
    (seqlen_q, seqlen_k), (hq, hk) = seqlens, heads
    gen = testing.generator(f"fixed-{feature}-{seqlens}-{heads}")
    batch, d, dv = 2, 16, 24
    q = randn(gen, batch, seqlen_q, hq, d)
    k, v = randn(gen, batch, seqlen_k, hk, d), randn(gen, batch, seqlen_k, hk, dv)
    sink = randn(gen, hq, scale=2.0) if options.pop("sink", False) else None
    scale = options.get("softmax_scale", d ** -0.5)
    out, lse = reference.attention_forward(q, k, v, learnable_sink=sink, **options)
    assert out.shape == (batch, seqlen_q, hq, dv) and lse.shape == (batch, hq, seqlen_q) and out.dtype == F64
    for b in range(batch):
        want_out, want_lse = naive_sequence(
            q[b], k[b], v[b], scale=scale, causal=options.get("causal", False),
            window=options.get("window_size", (-1, -1)), chunk=options.get("attention_chunk", 0),
            softcap=options.get("softcap", 0.0), sink=sink)
        assert_close(out[b], want_out, f"out[{b}]")
        assert_close(lse[b], want_lse, f"lse[{b}]")


def test_qv_adds_its_scores_and_changes_the_default_scale():
    gen = testing.generator("qv")
    q, qv = randn(gen, 2, 6, 4, 16), randn(gen, 2, 6, 4, 32)
    k, v = randn(gen, 2, 11, 2, 16), randn(gen, 2, 11, 2, 32)
    out, lse = reference.attention_forward(q, k, v, qv=qv, causal=True)
    for b in range(2):
        want_out, want_lse = naive_sequence(q[b], k[b], v[b], qv=qv[b], scale=(16 + 32) ** -0.5, causal=True)
        assert_close(out[b], want_out, "out")
        assert_close(lse[b], want_lse, "lse")


def test_weights_dtype_rounds_the_normalized_weights():
    # The low-precision counterpart of the FP8 kernels: softmax weights rounded to e4m3, then times v.
    gen = testing.generator("weights-dtype")
    q, k, v = (torch.randn(n, 2, 16, generator=gen, dtype=torch.float64) for n in (5, 9, 9))
    out, lse = reference.attention_sequence(q, k, v, softmax_scale=0.3, weights_dtype=torch.float8_e4m3fn)
    weights = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * 0.3, dim=-1)
    want = torch.einsum("hqk,khd->qhd", weights.to(torch.float8_e4m3fn).double(), v)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, torch.einsum("hqk,khd->qhd", weights, v))
    torch.testing.assert_close(lse, torch.logsumexp(torch.einsum("qhd,khd->hqk", q, k) * 0.3, dim=-1))


def test_float32_inputs_compute_in_float32():
    gen = testing.generator("float32")
    q, k, v = (randn(gen, 1, 4, 2, 8).float(), randn(gen, 1, 6, 2, 8).float(), randn(gen, 1, 6, 2, 8).float())
    out, lse = reference.attention_forward(q, k, v)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    want_out, want_lse = naive_sequence(q[0], k[0], v[0], scale=8 ** -0.5)
    assert_close(out[0], want_out, "out", atol=1e-5)
    assert_close(lse[0], want_lse, "lse", atol=1e-5)


def test_rows_without_keys_give_zero_and_minus_infinity_or_the_sink():
    gen = testing.generator("empty-rows")
    q, k, v = randn(gen, 1, 6, 2, 8), randn(gen, 1, 3, 2, 8), randn(gen, 1, 3, 2, 8)
    out, lse = reference.attention_forward(q, k, v, causal=True)  # queries 0..2 see no key
    assert torch.equal(out[0, :3], torch.zeros(3, 2, 8, dtype=F64))
    assert torch.isneginf(lse[0, :, :3]).all() and torch.isfinite(lse[0, :, 3:]).all()
    sink = torch.tensor([0.5, -1.25], dtype=F64)
    out, lse = reference.attention_forward(q, k, v, causal=True, learnable_sink=sink)
    assert torch.equal(out[0, :3], torch.zeros(3, 2, 8, dtype=F64))
    assert torch.equal(lse[0, :, :3], sink[:, None].expand(2, 3))
    # No keys at all (seqused_k = 0).
    out, lse = reference.attention_forward(q, k, v, seqused_k=torch.tensor([0], dtype=torch.int32))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ---- varlen, seqused, paged --------------------------------------------------------------------

def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window_size": (2, 1)},
                                     {"causal": True, "softcap": 3.0, "sink": True}],
                         ids=["plain", "causal", "window", "causal_softcap_sink"])
def test_varlen_matches_naive(options):
    options = dict(options)
    lengths_q, lengths_k = [1, 6, 3, 5], [9, 1, 12, 4]
    used_q, used_k = [1, 4, 3, 5], [9, 1, 7, 4]
    gen = testing.generator(f"varlen-{sorted(options)}")
    hq, hk, d, dv = 4, 2, 16, 16
    q = randn(gen, sum(lengths_q) + 2, hq, d)  # two trailing rows belong to no sequence
    k, v = randn(gen, sum(lengths_k), hk, d), randn(gen, sum(lengths_k), hk, dv)
    sink = randn(gen, hq) if options.pop("sink", False) else None
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    seqused_q, seqused_k = torch.tensor(used_q, dtype=torch.int32), torch.tensor(used_k, dtype=torch.int32)
    out, lse = reference.attention_forward(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_q=seqused_q,
                                           seqused_k=seqused_k, max_seqlen_q=6, max_seqlen_k=12,
                                           learnable_sink=sink, **options)
    assert out.shape == (q.shape[0], hq, dv) and lse.shape == (hq, q.shape[0])
    written = torch.zeros(q.shape[0], dtype=torch.bool)
    for b in range(4):
        qs, ks = cu_q[b].item(), cu_k[b].item()
        want_out, want_lse = naive_sequence(
            q[qs:qs + used_q[b]], k[ks:ks + used_k[b]], v[ks:ks + used_k[b]], scale=d ** -0.5,
            causal=options.get("causal", False), window=options.get("window_size", (-1, -1)),
            softcap=options.get("softcap", 0.0), sink=sink)
        assert_close(out[qs:qs + used_q[b]], want_out, f"out batch {b}")
        assert_close(lse[:, qs:qs + used_q[b]], want_lse, f"lse batch {b}")
        written[qs:qs + used_q[b]] = True
    # Rows outside every used sequence: 0 and -inf.
    assert torch.equal(out[~written], torch.zeros_like(out[~written])) and torch.isneginf(lse[:, ~written]).all()


def test_fixed_length_queries_with_packed_keys():
    gen = testing.generator("fixed-q-packed-k")
    lengths_k = [4, 10]
    q, k, v = randn(gen, 2, 3, 2, 8), randn(gen, 14, 2, 8), randn(gen, 14, 2, 8)
    out, lse = reference.attention_forward(q, k, v, cu_seqlens_k=_cu(lengths_k), max_seqlen_k=10, causal=True)
    for b, (start, length) in enumerate([(0, 4), (4, 10)]):
        want_out, want_lse = naive_sequence(q[b], k[start:start + length], v[start:start + length],
                                            scale=8 ** -0.5, causal=True)
        assert_close(out[b], want_out, "out")
        assert_close(lse[b], want_lse, "lse")


def _paged(gen, dense_k, dense_v, page_size, extra_pages=3):
    """Scatter dense (batch, seqlen, ...) caches into shuffled pages; unused table slots hold -1."""
    batch, seqlen = dense_k.shape[:2]
    per_seq = -(-seqlen // page_size)
    num_pages = batch * per_seq + extra_pages
    order = torch.randperm(num_pages, generator=gen)[: batch * per_seq].reshape(batch, per_seq)
    k_pages = randn(gen, num_pages, page_size, *dense_k.shape[2:])
    v_pages = randn(gen, num_pages, page_size, *dense_v.shape[2:])
    for b in range(batch):
        for p in range(per_seq):
            rows = slice(p * page_size, min(seqlen, (p + 1) * page_size))
            count = rows.stop - rows.start
            k_pages[order[b, p], :count] = dense_k[b, rows]
            v_pages[order[b, p], :count] = dense_v[b, rows]
    table = torch.full((batch, per_seq + 2), -1, dtype=torch.int32)
    table[:, :per_seq] = order.to(torch.int32)
    return k_pages, v_pages, table


@pytest.mark.parametrize("page_size", [1, 16, 5])
def test_paged_cache_matches_naive(page_size):
    gen = testing.generator(f"paged-{page_size}")
    batch, seqlen, hq, hk, d = 3, 37, 4, 1, 16
    dense_k, dense_v = randn(gen, batch, seqlen, hk, d), randn(gen, batch, seqlen, hk, d)
    k_pages, v_pages, table = _paged(gen, dense_k, dense_v, page_size)
    used = [37, 1, 20]
    q = randn(gen, batch, 3, hq, d)
    out, lse = reference.attention_forward(q, k_pages, v_pages, page_table=table,
                                           seqused_k=torch.tensor(used, dtype=torch.int32), causal=True)
    for b in range(batch):
        want_out, want_lse = naive_sequence(q[b], dense_k[b, :used[b]], dense_v[b, :used[b]], scale=d ** -0.5,
                                            causal=True)
        assert_close(out[b], want_out, f"out[{b}]")
        assert_close(lse[b], want_lse, f"lse[{b}]")


def test_reference_rejects_pages_outside_the_cache():
    gen = testing.generator("bad-page")
    k_pages, v_pages = randn(gen, 4, 2, 1, 8), randn(gen, 4, 2, 1, 8)
    table = torch.tensor([[0, 9]], dtype=torch.int32)
    with pytest.raises(ValueError, match="page_table: batch 0"):
        reference.attention_forward(randn(gen, 1, 1, 1, 8), k_pages, v_pages, page_table=table)


# ---- KV cache: append, rotary, leftpad, cache_batch_idx ----------------------------------------

@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
@pytest.mark.parametrize("mode", ["causal", "local", "full"])
@pytest.mark.parametrize("layout", ["dense", "paged16", "packed_new"])
def test_cache_append_with_rotary_leftpad_and_batch_idx(layout, mode, interleaved):
    gen = testing.generator(f"append-{layout}-{mode}-{interleaved}")
    batch, cache_rows, capacity, hq, hk, d, rotary_dim = 3, 5, 48, 4, 2, 32, 16
    seqlen_q, new_lengths = 4, [4, 2, 3]
    cache_seqlens = [10, 0, 31]
    leftpad = [3, 0, 7]
    batch_idx = [4, 0, 2]
    rotary_start = [10, 5, 33]
    k_cache, v_cache = randn(gen, cache_rows, capacity, hk, d), randn(gen, cache_rows, capacity, hk, d)
    k_new = randn(gen, batch, max(new_lengths), hk, d)
    v_new = randn(gen, batch, max(new_lengths), hk, d)
    q = randn(gen, batch, seqlen_q, hq, d)
    angles = torch.rand(64, rotary_dim // 2, generator=gen, dtype=F64) * 2 * math.pi
    cos, sin = angles.cos(), angles.sin()
    causal, window = mode == "causal", ((6, 0) if mode == "local" else (-1, -1))
    if layout != "packed_new":
        new_lengths = [k_new.shape[1]] * batch

    # Expected cache, row by row.
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b in range(batch):
        for i in range(new_lengths[b]):
            pos = rotary_start[b] + i
            want_k[batch_idx[b], cache_seqlens[b] + i] = naive_rotate(k_new[b, i], cos[pos], sin[pos], interleaved)
            want_v[batch_idx[b], cache_seqlens[b] + i] = v_new[b, i]

    kwargs = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, causal=causal, window_size=window,
                  seqused_k=torch.tensor(cache_seqlens, dtype=torch.int32),
                  leftpad_k=torch.tensor(leftpad, dtype=torch.int32),
                  kv_batch_idx=torch.tensor(batch_idx, dtype=torch.int32),
                  seqlens_rotary=torch.tensor(rotary_start, dtype=torch.int32))
    k_arg, v_arg = k_new, v_new
    if layout == "packed_new":
        kwargs["cu_seqlens_k_new"] = _cu(new_lengths)
        k_arg = torch.cat([k_new[b, :new_lengths[b]] for b in range(batch)])
        v_arg = torch.cat([v_new[b, :new_lengths[b]] for b in range(batch)])
    if layout == "paged16":
        k_store, v_store, table = _paged(gen, k_cache, v_cache, 16)
        kwargs["page_table"] = table
    else:
        k_store, v_store = k_cache.clone(), v_cache.clone()

    out, lse = reference.attention_forward(q, k_store, v_store, k_new=k_arg, v_new=v_arg, **kwargs)

    if layout == "paged16":  # read the pages back into rows
        got_k = torch.stack([k_store[table[r, :3].long()].reshape(48, hk, d) for r in range(cache_rows)])
        got_v = torch.stack([v_store[table[r, :3].long()].reshape(48, hk, d) for r in range(cache_rows)])
    else:
        got_k, got_v = k_store, v_store
    assert torch.allclose(got_k, want_k, atol=1e-12, rtol=0) and torch.equal(got_v, want_v)

    for b in range(batch):
        row, end = batch_idx[b], cache_seqlens[b] + new_lengths[b]
        per_token = mode != "full"
        q_rot = torch.stack([naive_rotate(q[b, i], cos[rotary_start[b] + (i if per_token else 0)],
                                          sin[rotary_start[b] + (i if per_token else 0)], interleaved)
                             for i in range(seqlen_q)])
        want_out, want_lse = naive_sequence(q_rot, want_k[row, leftpad[b]:end], want_v[row, leftpad[b]:end],
                                            scale=d ** -0.5, causal=causal, window=window)
        assert_close(out[b], want_out, f"out[{b}]")
        assert_close(lse[b], want_lse, f"lse[{b}]")


def test_append_past_the_cache_is_refused():
    gen = testing.generator("overflow")
    k_cache, v_cache = randn(gen, 1, 8, 1, 8), randn(gen, 1, 8, 1, 8)
    with pytest.raises(ValueError, match="overflows the cache"):
        reference.attention_forward(randn(gen, 1, 2, 1, 8), k_cache, v_cache, k_new=randn(gen, 1, 2, 1, 8),
                                    v_new=randn(gen, 1, 2, 1, 8), seqused_k=torch.tensor([7], dtype=torch.int32))


# ---- FP8 with descales ---------------------------------------------------------------------------

def test_fp8_inputs_are_dequantized_with_their_descales():
    gen = testing.generator("fp8")
    batch, sq, sk, hq, hk, d = 2, 5, 9, 6, 2, 32
    fp8 = torch.float8_e4m3fn
    q, k, v = (randn(gen, batch, sq, hq, d).to(fp8), randn(gen, batch, sk, hk, d).to(fp8),
               randn(gen, batch, sk, hk, d).to(fp8))
    q_descale, k_descale, v_descale = [torch.rand(batch, hk, generator=gen) + 0.5 for _ in range(3)]
    out, lse = reference.attention_forward(q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                                           causal=True, softcap=4.0)
    assert out.dtype == torch.float32
    for b in range(batch):
        q_b = q[b].double() * q_descale[b].double().repeat_interleave(hq // hk)[:, None]
        k_b = k[b].double() * k_descale[b].double()[:, None]
        v_b = v[b].double() * v_descale[b].double()[:, None]
        want_out, want_lse = naive_sequence(q_b, k_b, v_b, scale=d ** -0.5, causal=True, softcap=4.0)
        assert_close(out[b], want_out, "out", atol=2e-5)
        assert_close(lse[b], want_lse, "lse", atol=2e-5)


# ---- context parallelism -------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_context_parallel_ranks_combine_to_full_attention(world, causal):
    gen = testing.generator(f"cp-{world}-{causal}")
    lengths_q, lengths_k = [1, 4, 3], [7, 11, 3]
    hq, hk, d = 4, 2, 16
    q = randn(gen, sum(lengths_q), hq, d)
    k_full = [randn(gen, n, hk, d) for n in lengths_k]
    v_full = [randn(gen, n, hk, d) for n in lengths_k]
    outs, lses = [], []
    for rank in range(world):
        k_local = [kk[rank::world] for kk in k_full]
        v_local = [vv[rank::world] for vv in v_full]
        out, lse = reference.attention_forward(
            q, torch.cat(k_local), torch.cat(v_local), cu_seqlens_q=_cu(lengths_q),
            cu_seqlens_k=_cu([x.shape[0] for x in k_local]), max_seqlen_q=4, max_seqlen_k=11, causal=causal,
            cp_world_size=world, cp_rank=rank, cp_tot_seqused_k=torch.tensor(lengths_k, dtype=torch.int32))
        outs.append(out)
        lses.append(lse.T)
    out, lse = reference.flash_attn_combine(torch.stack(outs), torch.stack(lses))
    start = 0
    for b, n in enumerate(lengths_q):
        want_out, want_lse = naive_sequence(q[start:start + n], k_full[b], v_full[b], scale=d ** -0.5, causal=causal)
        assert_close(out[start:start + n], want_out, f"out batch {b}")
        assert_close(lse[start:start + n].T, want_lse, f"lse batch {b}")
        start += n


def test_context_parallel_mask_matches_global_positions():
    """One rank alone: local key j is global key j * W + r, queries aligned to the global count."""
    gen = testing.generator("cp-single")
    world, rank, total = 4, 1, 13
    local = len(range(rank, total, world))
    q, k, v = randn(gen, 1, 5, 2, 8), randn(gen, 1, local, 2, 8), randn(gen, 1, local, 2, 8)
    out, lse = reference.attention_forward(q, k, v, causal=True, cp_world_size=world, cp_rank=rank,
                                           cp_tot_seqused_k=torch.tensor([total], dtype=torch.int32))
    want_out, want_lse = naive_sequence(q[0], k[0], v[0], scale=8 ** -0.5, causal=True, key_stride=world,
                                        key_offset=rank, total_k=total)
    assert_close(out[0], want_out, "out")
    assert_close(lse[0], want_lse, "lse")
