"""Behaviour through the wrapper with the real mate: results against a float64 formula
(FlashAttention-3's semantics written out), with upstream's tolerance rule, on CPU (the
reference backend) and, where a GPU is present, on it.

Tests that need a mate.mha_interface function the installed mate-core does not provide yet are
skipped by `requires_mate(...)`, which names the missing function in the skip reason.
"""

import pytest
import torch

import flash_attn_interface as fai
from mate import mha_interface, testing
from mate.ops.fmha import reference
from mate.testing.fmha import combine_inputs

BACKWARD_MESSAGE = "flash_attn_3 backward is not implemented in MATE"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def reference_fallback_on_gpu(request, monkeypatch):
    """On the GPU, variants no kernel supports yet run the reference: these tests check the
    wrapper's translation; the kernels are checked against the reference in mate-core's tests."""
    if "cuda" in request.node.name:
        monkeypatch.setenv("MATE_ALLOW_REFERENCE_FALLBACK", "1")


def requires_mate(*names):
    missing = [name for name in names if not hasattr(mha_interface, name)]
    return pytest.mark.skipif(bool(missing), reason=f"mate.mha_interface has no {', '.join(missing)} yet")


def naive_attention(q, k, v, scale, causal=False, window_size=(-1, -1), softcap=0.0, qv=None, dtype=torch.float64):
    """One sequence: q (seqlen_q, nheads, d), k (seqlen_k, nheads_k, d), v (seqlen_k, nheads_k, dv).
    Scores q.k (+ qv.v) times scale, soft-capped, masked bottom-right aligned (causal means a
    right window of 0), softmax over keys. Returns out (seqlen_q, nheads, dv), lse (nheads, seqlen_q)."""
    q, k, v = (t.to(dtype).cpu() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k)
    if qv is not None:
        scores = scores + torch.einsum("qhd,khd->hqk", qv.to(dtype).cpu(), v)
    scores = scores * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    seqlen_q, seqlen_k = q.shape[0], k.shape[0]
    diagonal = torch.arange(seqlen_q).unsqueeze(1) + (seqlen_k - seqlen_q)
    keys = torch.arange(seqlen_k).unsqueeze(0)
    left, right = window_size
    right = 0 if causal else right
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if right >= 0:
        allowed &= keys <= diagonal + right
    if left >= 0:
        allowed &= keys >= diagonal - left
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores.double(), dim=-1)
    out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
    return out, lse


def naive_batched(q, k, v, scale, **options):
    """Batched (batch, seqlen, heads, d) inputs: out (batch, seqlen_q, heads, dv), lse (batch, heads, seqlen_q)."""
    results = [naive_attention(q[b], k[b], v[b], scale, **{**options, "qv": None if options.get("qv") is None
                                                              else options["qv"][b]})
               for b in range(q.shape[0])]
    return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])


def check_attention(actual_out, actual_lse, q, k, v, scale, **options):
    """Upstream's rule: error against float64 at most twice that of the same formula run in the
    inputs' precision (plus a small slack); LSE against float64."""
    batched = q.dim() == 4
    run = naive_batched if batched else naive_attention
    exact_out, exact_lse = run(q, k, v, scale, **options)
    low_out, _ = run(q, k, v, scale, dtype=q.dtype, **options)
    testing.assert_within_low_precision_error(actual_out.cpu(), exact_out, low_out, atol=1e-3)
    if actual_lse is not None:
        assert actual_lse.dtype == torch.float32 and actual_lse.shape == exact_lse.shape
        assert torch.allclose(actual_lse.double().cpu(), exact_lse, atol=1e-3, rtol=1e-3)


def random_qkv(name, batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, dtype, device, head_dim_v=None):
    generator = testing.generator(name)
    shapes = [(batch, seqlen_q, heads, head_dim), (batch, seqlen_k, heads_k, head_dim),
              (batch, seqlen_k, heads_k, head_dim_v or head_dim)]
    return [torch.randn(*shape, generator=generator).to(dtype=dtype, device=device) for shape in shapes]


# ---- flash_attn_combine (mate provides it) ----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits, batch, seqlen, heads, head_dim", [(1, 2, 3, 4, 64), (5, 3, 7, 2, 128),
                                                                         (17, 1, 1, 8, 32)])
def test_combine_matches_mate_reference(device, out_dtype, num_splits, batch, seqlen, heads, head_dim):
    out_partial, lse_partial = combine_inputs(num_splits, batch, seqlen, heads, head_dim, device=device,
                                              seed=testing.seed_for(f"combine-{num_splits}-{seqlen}-{head_dim}"))
    result = fai.flash_attn_combine(out_partial, lse_partial, out_dtype=out_dtype)
    assert isinstance(result, tuple) and len(result) == 2
    out, lse = result
    want_out, want_lse = reference.flash_attn_combine(out_partial.double().cpu(), lse_partial.double().cpu())
    assert out.dtype == (out_dtype or torch.float32) and out.shape == (batch, seqlen, heads, head_dim)
    assert lse.dtype == torch.float32 and lse.shape == (batch, seqlen, heads)
    testing.assert_within_low_precision_error(out.cpu(), want_out, want_out.to(out.dtype))
    assert torch.equal(lse.isinf().cpu(), want_lse.isinf())
    assert torch.allclose(lse.double().cpu(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_writes_into_out(device):
    out_partial, lse_partial = combine_inputs(4, 2, 5, 3, 64, device=device, seed=testing.seed_for("combine-out"))
    out = testing.poison(torch.empty(2, 5, 3, 64, dtype=torch.bfloat16, device=device))
    merged, _ = fai.flash_attn_combine(out_partial, lse_partial, out, torch.bfloat16)
    assert merged.data_ptr() == out.data_ptr() and not out.isnan().any()
    want_out, _ = reference.flash_attn_combine(out_partial.double().cpu(), lse_partial.double().cpu())
    testing.assert_within_low_precision_error(out.cpu(), want_out, want_out.bfloat16())


# ---- flash_attn_func / flash_attn_qkvpacked_func / flash_attn_varlen_func --------------------

@requires_mate("flash_attn_varlen_func")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 7), (5, 5), (6, 19)])
def test_flash_attn_func(device, dtype, causal, seqlen_q, seqlen_k):
    q, k, v = random_qkv(f"func-{dtype}-{causal}-{seqlen_q}-{seqlen_k}", 2, seqlen_q, seqlen_k, 4, 2, 64, dtype, device)
    out, lse = fai.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (2, 4, seqlen_q)
    check_attention(out, lse, q, k, v, 64 ** -0.5, causal=causal)
    plain = fai.flash_attn_func(q, k, v, causal=causal)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)


@requires_mate("flash_attn_varlen_func")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window_size, softcap, scale", [((3, 1), 0.0, None), ((-1, 2), 0.0, 0.3),
                                                          ((-1, -1), 4.0, None), ((2, 0), 6.0, 0.2)])
def test_flash_attn_func_window_softcap_scale(device, window_size, softcap, scale):
    q, k, v = random_qkv(f"func-window-{window_size}-{softcap}", 2, 6, 11, 4, 1, 64, torch.bfloat16, device)
    out, lse = fai.flash_attn_func(q, k, v, softmax_scale=scale, window_size=window_size, softcap=softcap,
                                   return_attn_probs=True)
    check_attention(out, lse, q, k, v, scale or 64 ** -0.5, window_size=window_size, softcap=softcap)


@requires_mate("flash_attn_varlen_func")
@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_func_qv_and_default_scale(device):
    # Upstream accepts qv only with q head dim <= 64 and V head dim >= 256 (the MLA shape).
    q, k, v = random_qkv("func-qv", 2, 3, 9, 4, 4, 64, torch.bfloat16, device, head_dim_v=256)
    qv = torch.randn(2, 3, 4, 256, generator=testing.generator("func-qv-qv")).to(torch.bfloat16).to(device)
    out, lse = fai.flash_attn_func(q, k, v, qv=qv, return_attn_probs=True)
    check_attention(out, lse, q, k, v, (64 + 256) ** -0.5, qv=qv)


@requires_mate("flash_attn_varlen_func")
@pytest.mark.parametrize("device", DEVICES)
def test_qkvpacked_equals_flash_attn_func(device):
    packed = torch.randn(2, 7, 3, 4, 64, generator=testing.generator("packed")).to(torch.bfloat16).to(device)
    out, lse = fai.flash_attn_qkvpacked_func(packed, causal=True, return_attn_probs=True)
    q, k, v = packed.unbind(dim=2)
    want_out, want_lse = fai.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    check_attention(out, lse, q, k, v, 64 ** -0.5, causal=True)

    gqa = torch.randn(2, 7, 4 + 2 * 2, 64, generator=testing.generator("packed-gqa")).to(torch.bfloat16).to(device)
    out = fai.flash_attn_qkvpacked_func(gqa, num_heads_q=4)
    check_attention(out, None, gqa[:, :, :4], gqa[:, :, 4:6], gqa[:, :, 6:], 64 ** -0.5)


@requires_mate("flash_attn_varlen_func")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_varlen_func(device, causal):
    seqlens_q, seqlens_k = [3, 1, 6, 2], [5, 4, 6, 9]
    generator = testing.generator(f"varlen-{causal}")
    q = torch.randn(sum(seqlens_q), 6, 64, generator=generator).to(torch.bfloat16).to(device)
    k = torch.randn(sum(seqlens_k), 2, 64, generator=generator).to(torch.bfloat16).to(device)
    v = torch.randn(sum(seqlens_k), 2, 64, generator=generator).to(torch.bfloat16).to(device)

    def cumulative(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)

    cu_q, cu_k = cumulative(seqlens_q), cumulative(seqlens_k)
    out, lse = fai.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(seqlens_q), max(seqlens_k), causal=causal,
                                          return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (6, sum(seqlens_q))
    for b in range(len(seqlens_q)):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        check_attention(out[rows], lse[:, rows], q[rows], k[keys], v[keys], 64 ** -0.5, causal=causal)


@requires_mate("flash_attn_varlen_func")
@pytest.mark.parametrize("device", DEVICES)
def test_low_level_forward_writes_out(device):
    q, k, v = random_qkv("low-level", 2, 4, 8, 4, 2, 64, torch.bfloat16, device)
    out_ = testing.poison(torch.empty_like(q))
    out, lse, out_accum, lse_accum = fai._flash_attn_forward(q, k, v, out_=out_, causal=True)
    assert out.data_ptr() == out_.data_ptr() and not out_.isnan().any()
    assert out_accum.numel() == 0 and lse_accum.numel() == 0
    check_attention(out, lse, q, k, v, 64 ** -0.5, causal=True)


@requires_mate("flash_attn_varlen_func")
def test_backward_raises_through_mate():
    q, k, v = random_qkv("backward", 1, 3, 5, 2, 2, 64, torch.bfloat16, "cpu")
    q.requires_grad_()
    out = fai.flash_attn_func(q, k, v)
    with pytest.raises(NotImplementedError, match=BACKWARD_MESSAGE):
        out.float().sum().backward()
    assert q.grad is None


@requires_mate("flash_attn_varlen_func")
def test_torch_compile_fullgraph():
    q, k, v = random_qkv("compile", 2, 3, 5, 4, 2, 64, torch.bfloat16, "cpu")

    def attention(q, k, v):
        out, lse = fai.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        return out * 2, lse

    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, backend="eager")
    out, lse = compiled(q, k, v)
    want_out, want_lse = attention(q, k, v)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


# ---- flash_attn_with_kvcache / get_scheduler_metadata ----------------------------------------

def kv_cache(name, batch_cache, seqlen_cache, heads_k, head_dim, dtype, device):
    generator = testing.generator(name)
    return [torch.randn(batch_cache, seqlen_cache, heads_k, head_dim, generator=generator).to(dtype).to(device)
            for _ in range(2)]


@requires_mate("flash_attn_with_kvcache")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_kvcache(device, causal, seqlen_q):
    k_cache, v_cache = kv_cache(f"kvcache-{causal}-{seqlen_q}", 3, 16, 2, 64, torch.bfloat16, device)
    q = torch.randn(3, seqlen_q, 4, 64, generator=testing.generator(f"kvcache-q-{seqlen_q}")).bfloat16().to(device)
    cache_seqlens = torch.tensor([5, 16, 9], dtype=torch.int32, device=device)
    out, lse, *accumulators = fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                                          causal=causal, return_softmax_lse=True)
    assert len(accumulators) == 2 and out.shape == q.shape and lse.shape == (3, 4, seqlen_q)
    for b, length in enumerate(cache_seqlens.tolist()):
        check_attention(out[b], lse[b], q[b], k_cache[b, :length], v_cache[b, :length], 64 ** -0.5, causal=causal)
    plain = fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=causal)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)


@requires_mate("flash_attn_with_kvcache")
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_int_seqlens(device):
    k_cache, v_cache = kv_cache("kvcache-int", 2, 12, 1, 64, torch.float16, device)
    q = torch.randn(2, 1, 4, 64, generator=testing.generator("kvcache-int-q")).half().to(device)
    out = fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=7)
    for b in range(2):
        check_attention(out[b], None, q[b], k_cache[b, :7], v_cache[b, :7], 64 ** -0.5)


@requires_mate("flash_attn_with_kvcache")
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_appends_new_keys_in_place(device):
    k_cache, v_cache = kv_cache("kvcache-append", 3, 16, 2, 64, torch.bfloat16, device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    generator = testing.generator("kvcache-append-new")
    q, k_new, v_new = (torch.randn(3, 2, heads, 64, generator=generator).bfloat16().to(device) for heads in (4, 2, 2))
    cache_seqlens = torch.tensor([5, 14, 0], dtype=torch.int32, device=device)
    out = fai.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, causal=True)
    for b, length in enumerate(cache_seqlens.tolist()):
        assert torch.equal(k_cache[b, length:length + 2], k_new[b]) and torch.equal(v_cache[b, length:length + 2],
                                                                                    v_new[b])
        assert torch.equal(k_cache[b, :length], before_k[b, :length])
        assert torch.equal(k_cache[b, length + 2:], before_k[b, length + 2:])
        assert torch.equal(v_cache[b, length + 2:], before_v[b, length + 2:])
        check_attention(out[b], None, q[b], k_cache[b, :length + 2], v_cache[b, :length + 2], 64 ** -0.5, causal=True)


@requires_mate("flash_attn_with_kvcache")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_kvcache_paged(device, page_size):
    seqlen_cache, batch = 32, 3
    pages_per_sequence = seqlen_cache // page_size
    k_pages, v_pages = kv_cache(f"kvcache-paged-{page_size}", batch * pages_per_sequence, page_size, 2, 64,
                                torch.bfloat16, device)
    page_table = torch.randperm(batch * pages_per_sequence, generator=testing.generator(f"pages-{page_size}"))
    page_table = page_table.reshape(batch, pages_per_sequence).to(torch.int32).to(device)
    q = torch.randn(batch, 2, 4, 64, generator=testing.generator("kvcache-paged-q")).bfloat16().to(device)
    cache_seqlens = torch.tensor([5, 32, 17], dtype=torch.int32, device=device)
    out, lse, *_ = fai.flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=cache_seqlens, page_table=page_table,
                                               causal=True, return_softmax_lse=True)
    for b, length in enumerate(cache_seqlens.tolist()):
        keys = k_pages[page_table[b].long()].flatten(0, 1)[:length]
        values = v_pages[page_table[b].long()].flatten(0, 1)[:length]
        check_attention(out[b], lse[b], q[b], keys, values, 64 ** -0.5, causal=True)


@requires_mate("flash_attn_with_kvcache", "get_scheduler_metadata")
@pytest.mark.parametrize("device", DEVICES)
def test_scheduler_metadata_feeds_kvcache(device):
    k_cache, v_cache = kv_cache("kvcache-metadata", 4, 64, 2, 128, torch.bfloat16, device)
    q = torch.randn(4, 1, 8, 128, generator=testing.generator("kvcache-metadata-q")).bfloat16().to(device)
    cache_seqlens = torch.tensor([1, 64, 33, 7], dtype=torch.int32, device=device)
    metadata = fai.get_scheduler_metadata(4, 1, 64, 8, 2, 128, cache_seqlens, qkv_dtype=torch.bfloat16, causal=True)
    assert isinstance(metadata, torch.Tensor) and metadata.device.type == torch.device(device).type
    out = fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True,
                                      scheduler_metadata=metadata)
    for b, length in enumerate(cache_seqlens.tolist()):
        check_attention(out[b], None, q[b], k_cache[b, :length], v_cache[b, :length], 128 ** -0.5, causal=True)
