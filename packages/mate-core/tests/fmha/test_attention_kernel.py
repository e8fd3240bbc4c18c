"""The TileLang prefill kernel vs the reference on the GPU, over a grid modeled on upstream's
hopper/test_flash_attn.py, with upstream's tolerance rule."""

import pytest
import torch

from mate import testing
from mate.mha_interface import flash_attn_varlen_func
from mate.ops.fmha import reference

pytestmark = pytest.mark.gpu

HEAD_DIMS = [(64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (192, 128)]
SEQLENS = [(1, 1), (113, 203), (128, 217), (239, 799), (799, 2048), (2048, 2048), (1024, 799)]
# Upstream's absolute slack: twice the rounding of values near 0.3 in the dtype.
ATOL = {torch.bfloat16: 4e-3, torch.float16: 5e-4}


def _check(out, lse, q, k, v, **kwargs):
    """Upstream's rule: the kernel's error is at most twice that of the reference rounded to the
    low-precision dtype, plus a small absolute slack; LSE close to the float64 reference."""
    exact, exact_lse = reference.attention_forward(q.double(), k.double(), v.double(), **kwargs)
    testing.assert_within_low_precision_error(out, exact, exact.to(out.dtype), atol=ATOL[out.dtype])
    assert torch.equal(lse.isinf(), exact_lse.isinf())
    assert testing.max_abs_error(lse, exact_lse) <= 2e-3


def _randn(generator, *shape, dtype):
    return torch.randn(*shape, generator=generator, device="cuda").to(dtype)


# Every head-dim pair in bf16, and fp16 at d=128 (each static variant is a ~30 s compile).
DTYPE_HEAD_DIMS = [(torch.bfloat16, dims) for dims in HEAD_DIMS] + [(torch.float16, (128, 128))]


@pytest.mark.parametrize("dtype, head_dims", DTYPE_HEAD_DIMS)
@pytest.mark.parametrize("seqlens", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
def test_fixed_length(dtype, head_dims, seqlens, causal):
    (d, dv), (seqlen_q, seqlen_k) = head_dims, seqlens
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"{dtype}{head_dims}{seqlens}{causal}"))
    batch, heads, heads_k = 2, 6, 2
    q = _randn(gen, batch, seqlen_q, heads, d, dtype=dtype)
    k = _randn(gen, batch, seqlen_k, heads_k, d, dtype=dtype)
    v = _randn(gen, batch, seqlen_k, heads_k, dv, dtype=dtype)
    out = testing.poison(torch.empty(batch, seqlen_q, heads, dv, dtype=dtype, device="cuda"))
    out, lse = flash_attn_varlen_func(q, k, v, causal=causal, out=out, return_softmax_lse=True)
    assert lse.shape == (batch, heads, seqlen_q)
    _check(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mha_type", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask", ["none", "causal", "window", "causal+window"])
@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_varlen_features(dtype, head_dim, mha_type, mask, softcap):
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"v{dtype}{head_dim}{mha_type}{mask}{softcap}"))
    lengths_q = [1, 113, 64, 333, 7]
    lengths_k = [1, 203, 64, 301, 517]
    heads = 8
    heads_k = {"mha": 8, "gqa": 2, "mqa": 1}[mha_type]
    cu_q = torch.tensor([0] + lengths_q, device="cuda").cumsum(0).int()
    cu_k = torch.tensor([0] + lengths_k, device="cuda").cumsum(0).int()
    q = _randn(gen, sum(lengths_q), heads, head_dim, dtype=dtype)
    k = _randn(gen, sum(lengths_k), heads_k, head_dim, dtype=dtype)
    v = _randn(gen, sum(lengths_k), heads_k, head_dim, dtype=dtype)
    causal = "causal" in mask
    window = (37, 11) if "window" in mask else (-1, -1)
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                                      window_size=window, softcap=softcap, return_softmax_lse=True)
    assert lse.shape == (heads, sum(lengths_q))
    _check(out, lse, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q),
           max_seqlen_k=max(lengths_k), causal=causal, window_size=window, softcap=softcap)


def test_one_kernel_serves_every_length():
    from mate import jit

    before = jit.stats["compiled"] + jit.stats["loaded"]
    gen = torch.Generator(device="cuda").manual_seed(7)
    for seqlen in (17, 200, 1000, 64):
        q, k, v = (_randn(gen, 3, seqlen, 4, 128, dtype=torch.bfloat16) for _ in range(3))
        out, lse = flash_attn_varlen_func(q, k, v, causal=True, return_softmax_lse=True)
        _check(out, lse, q, k, v, causal=True)
    assert jit.stats["compiled"] + jit.stats["loaded"] - before <= 1


def _check_rows(out, lse, exact, exact_lse, rows):
    """_check restricted to the query rows the kernel computes (upstream leaves the others unwritten)."""
    testing.assert_within_low_precision_error(out[rows], exact[rows], exact[rows].to(out.dtype), atol=ATOL[out.dtype])
    assert torch.equal(lse[:, rows].isinf(), exact_lse[:, rows].isinf())
    assert testing.max_abs_error(lse[:, rows], exact_lse[:, rows]) <= 2e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (45, 7)])
def test_varlen_seqused_and_sink(causal, sink, window):
    """seqused_q / seqused_k below the cu_seqlens extents (0 included: rows that see no key get
    LSE -inf, or the sink), and a learnable sink joining the softmax denominator."""
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"seqused{causal}{sink}{window}"))
    dtype, heads, heads_k, d = torch.bfloat16, 8, 2, 128
    lengths_q, used_q = [1, 113, 64, 333, 7, 5], [1, 100, 0, 333, 3, 5]
    lengths_k, used_k = [1, 203, 64, 301, 517, 9], [1, 150, 64, 0, 500, 9]
    cu_q = torch.tensor([0] + lengths_q, device="cuda").cumsum(0).int()
    cu_k = torch.tensor([0] + lengths_k, device="cuda").cumsum(0).int()
    seqused_q = torch.tensor(used_q, dtype=torch.int32, device="cuda")
    seqused_k = torch.tensor(used_k, dtype=torch.int32, device="cuda")
    q = _randn(gen, sum(lengths_q), heads, d, dtype=dtype)
    k = _randn(gen, sum(lengths_k), heads_k, d, dtype=dtype)
    v = _randn(gen, sum(lengths_k), heads_k, d, dtype=dtype)
    learnable_sink = torch.randn(heads, generator=gen, device="cuda") * 2 if sink else None
    out = testing.poison(torch.empty_like(q))
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), seqused_q=seqused_q,
                                      seqused_k=seqused_k, causal=causal, window_size=window,
                                      learnable_sink=learnable_sink, out=out, return_softmax_lse=True)
    exact, exact_lse = reference.attention_forward(
        q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q),
        max_seqlen_k=max(lengths_k), seqused_q=seqused_q, seqused_k=seqused_k, causal=causal, window_size=window,
        learnable_sink=None if learnable_sink is None else learnable_sink.double())
    rows = torch.cat([torch.arange(start, start + used) for start, used in zip(cu_q.tolist(), used_q, strict=False)])
    _check_rows(out, lse, exact, exact_lse, rows.cuda())


@pytest.mark.parametrize("page_size", [1, 16, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_prefill(page_size, causal):
    """A chunked-prefill-sized query block over a paged cache (any page size), with seqused_k."""
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"paged-prefill{page_size}{causal}"))
    dtype, batch, seqlen_q, heads, heads_k, d = torch.bfloat16, 3, 128, 8, 2, 128
    pages_per_seq = -(-1000 // page_size)
    num_pages = batch * pages_per_seq + 5
    k_pages = _randn(gen, num_pages, page_size, heads_k, d, dtype=dtype)
    v_pages = _randn(gen, num_pages, page_size, heads_k, d, dtype=dtype)
    table = torch.randperm(num_pages, generator=gen, device="cuda")[:batch * pages_per_seq].view(batch, -1).int()
    seqused_k = torch.tensor([128, 1000, 517], dtype=torch.int32, device="cuda")
    q = _randn(gen, batch, seqlen_q, heads, d, dtype=dtype)
    out = testing.poison(torch.empty_like(q))
    out, lse = flash_attn_varlen_func(q, k_pages, v_pages, page_table=table, seqused_k=seqused_k, causal=causal,
                                      out=out, return_softmax_lse=True)
    _check(out, lse, q, k_pages, v_pages, page_table=table, seqused_k=seqused_k, causal=causal)


@pytest.mark.parametrize("head_dim, head_dim_v", [(80, 80), (40, 40), (160, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_between_compiled_ones(head_dim, head_dim_v, causal):
    """Upstream accepts any head dim <= 256 (multiple of 8): ours run zero-padded on the next kernel."""
    gen = torch.Generator(device="cuda").manual_seed(testing.seed_for(f"odd-hd{head_dim}{head_dim_v}{causal}"))
    lengths_q, lengths_k = [5, 130, 64], [70, 130, 200]
    q = _randn(gen, sum(lengths_q), 4, head_dim, dtype=torch.bfloat16)
    k = _randn(gen, sum(lengths_k), 2, head_dim, dtype=torch.bfloat16)
    v = _randn(gen, sum(lengths_k), 2, head_dim_v, dtype=torch.bfloat16)
    cu_q = torch.tensor([0] + lengths_q, device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k, device="cuda").cumsum(0).to(torch.int32)
    out = testing.poison(torch.empty(q.shape[0], 4, head_dim_v, dtype=torch.bfloat16, device="cuda"))
    result, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                                         return_softmax_lse=True, out=out)
    exact, exact_lse = reference.attention_forward(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q,
                                                   cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q),
                                                   max_seqlen_k=max(lengths_k), causal=causal)
    testing.assert_within_low_precision_error(result, exact, exact.to(torch.bfloat16), atol=4e-3)
    assert result.data_ptr() == out.data_ptr()
    assert testing.max_abs_error(lse, exact_lse) <= 2e-3
