"""mate.mha_interface's attention forward on the CPU: shapes, dtypes and LSE layouts, values
against the float64 reference (which test_attention_reference checks against a naive
formula), the in-place cache append, scheduler metadata, bad inputs, dispatch on a GPU
without a kernel, and torch.compile."""

import math

import pytest
import torch

from mate import dispatch, platform, testing
from mate.checks import ArgumentError, ArgumentTypeError
from mate.mha_interface import flash_attn_varlen_func, flash_attn_with_kvcache, get_scheduler_metadata
from mate.ops.fmha import attention, reference

BF16, FP16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
I32 = torch.int32


def randn(gen, *shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def ints(values):
    return torch.tensor(values, dtype=I32)


def cu(lengths):
    return ints([0] + torch.tensor(lengths).cumsum(0).tolist())


def check_output(out, exact, what="out"):
    """Upstream's rule: error at most twice that of the exact result rounded to out's dtype."""
    testing.assert_within_low_precision_error(out, exact, exact.to(out.dtype), what=what)


def check_lse(lse, exact, atol=1e-4):
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact))
    finite = ~torch.isneginf(exact)
    assert torch.allclose(lse[finite].double(), exact[finite], atol=atol, rtol=atol)


def upcast(*tensors):
    return [None if t is None else t.double() if t.is_floating_point() else t for t in tensors]


# ---- flash_attn_varlen_func ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window_size": (3, 0), "softcap": 5.0},
                                     {"causal": True, "attention_chunk": 4}],
                         ids=["plain", "causal", "window_softcap", "causal_chunk"])
def test_fixed_length_shapes_and_values(dtype, options):
    gen = testing.generator(f"api-fixed-{dtype}-{sorted(options)}")
    q, k, v = randn(gen, 2, 7, 6, 64, dtype=dtype), randn(gen, 2, 19, 2, 64, dtype=dtype), randn(gen, 2, 19, 2, 64,
                                                                                                 dtype=dtype)
    out, lse = flash_attn_varlen_func(q, k, v, return_softmax_lse=True, **options)
    assert out.shape == (2, 7, 6, 64) and out.dtype == dtype
    assert lse.shape == (2, 6, 7) and lse.dtype == torch.float32 and lse.is_contiguous()
    want_out, want_lse = reference.attention_forward(*upcast(q, k, v), **options)
    check_output(out, want_out)
    check_lse(lse, want_lse)
    alone = flash_attn_varlen_func(q, k, v, **options)
    assert isinstance(alone, torch.Tensor) and torch.equal(alone, out)


def test_packed_sequences_with_seqused_and_sink():
    gen = testing.generator("api-varlen")
    lengths_q, lengths_k = [1, 6, 3], [9, 1, 12]
    q = randn(gen, sum(lengths_q), 4, 128)
    k, v = randn(gen, sum(lengths_k), 1, 128), randn(gen, sum(lengths_k), 1, 128)
    sink = torch.randn(4, generator=gen)
    kwargs = dict(cu_seqlens_q=cu(lengths_q), cu_seqlens_k=cu(lengths_k), max_seqlen_q=6, max_seqlen_k=12,
                  seqused_k=ints([5, 1, 12]), causal=True, learnable_sink=sink)
    out, lse = flash_attn_varlen_func(q, k, v, return_softmax_lse=True, **kwargs)
    assert out.shape == (10, 4, 128) and lse.shape == (4, 10)
    want_out, want_lse = reference.attention_forward(*upcast(q, k, v), **{**kwargs, "learnable_sink": sink.double()})
    check_output(out, want_out)
    check_lse(lse, want_lse)


def test_paged_keys_and_out_argument():
    gen = testing.generator("api-paged")
    k_pages, v_pages = randn(gen, 9, 16, 2, 64), randn(gen, 9, 16, 2, 64)
    table = ints([[3, 7, 0], [8, 1, 5]])
    q = randn(gen, 2, 3, 4, 64)
    out = testing.poison(torch.empty(2, 3, 4, 64, dtype=BF16))
    result = flash_attn_varlen_func(q, k_pages, v_pages, page_table=table, seqused_k=ints([40, 17]), causal=True,
                                    out=out)
    assert result.data_ptr() == out.data_ptr() and not out.isnan().any()
    want, _ = reference.attention_forward(*upcast(q, k_pages, v_pages), page_table=table, seqused_k=ints([40, 17]),
                                          causal=True)
    check_output(out, want)


def test_fp8_outputs_bfloat16():
    gen = testing.generator("api-fp8")
    q, k, v = randn(gen, 2, 4, 4, 64, dtype=FP8), randn(gen, 2, 8, 2, 64, dtype=FP8), randn(gen, 2, 8, 2, 64, dtype=FP8)
    descales = [torch.rand(2, 2, generator=gen) + 0.5 for _ in range(3)]
    out, lse = flash_attn_varlen_func(q, k, v, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
                                      causal=True, return_softmax_lse=True)
    assert out.dtype == BF16 and lse.dtype == torch.float32
    want_out, want_lse = reference.attention_forward(q, k, v, q_descale=descales[0], k_descale=descales[1],
                                                     v_descale=descales[2], causal=True)
    check_output(out, want_out.double())
    check_lse(lse, want_lse.double())


def test_qv_with_small_qk_head_dim():
    gen = testing.generator("api-qv")
    q, qv = randn(gen, 1, 3, 2, 64), randn(gen, 1, 3, 2, 256)
    k, v = randn(gen, 1, 10, 1, 64), randn(gen, 1, 10, 1, 256)
    out = flash_attn_varlen_func(q, k, v, qv=qv, causal=True)
    want, _ = reference.attention_forward(*upcast(q, k, v), qv=qv.double(), causal=True)
    check_output(out, want)


def test_strided_inputs_are_copied_like_upstream():
    gen = testing.generator("api-strided")
    q = randn(gen, 2, 5, 64, 4).transpose(-1, -2)  # last dim strided
    k, v = randn(gen, 2, 9, 4, 64), randn(gen, 2, 9, 4, 64)
    assert q.stride(-1) != 1
    assert torch.equal(flash_attn_varlen_func(q, k, v), flash_attn_varlen_func(q.contiguous(), k, v))


def test_reference_backend_and_mate_backend_names():
    gen = testing.generator("api-backend")
    q, k, v = randn(gen, 1, 2, 2, 64), randn(gen, 1, 3, 2, 64), randn(gen, 1, 3, 2, 64)
    assert torch.equal(flash_attn_varlen_func(q, k, v, backend="reference"), flash_attn_varlen_func(q, k, v))
    with pytest.raises(dispatch.UnsupportedError, match="needs a GPU"):
        flash_attn_varlen_func(q, k, v, backend="mutlass")


# ---- flash_attn_with_kvcache ---------------------------------------------------------------------

def _pages_to_rows(pages, table):
    return torch.stack([pages[row.long()].flatten(0, 1) for row in table])


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("paged", [False, True])
def test_cache_append_in_place_with_rotary(paged, interleaved):
    gen = testing.generator(f"api-append-{paged}-{interleaved}")
    batch, capacity, hq, hk, d = 3, 64, 4, 2, 64
    k_rows, v_rows = randn(gen, 4, capacity, hk, d), randn(gen, 4, capacity, hk, d)
    q = randn(gen, batch, 2, hq, d)
    k_new, v_new = randn(gen, batch, 2, hk, d), randn(gen, batch, 2, hk, d)
    angles = torch.rand(capacity, 16, generator=gen) * 2 * math.pi
    cos, sin = angles.cos().to(BF16), angles.sin().to(BF16)
    cache_seqlens, batch_idx, leftpad = ints([5, 0, 40]), ints([3, 0, 1]), ints([2, 0, 11])
    kwargs = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens, cache_batch_idx=batch_idx,
                  cache_leftpad=leftpad, causal=True, rotary_interleaved=interleaved, return_softmax_lse=True)
    if paged:
        table = torch.randperm(4 * 4, generator=gen).reshape(4, 4).to(I32)
        k_cache = torch.empty(16, 16, hk, d, dtype=BF16)
        v_cache = torch.empty(16, 16, hk, d, dtype=BF16)
        for row in range(4):
            k_cache[table[row].long()] = k_rows[row].reshape(4, 16, hk, d)
            v_cache[table[row].long()] = v_rows[row].reshape(4, 16, hk, d)
        kwargs["page_table"] = table
    else:
        k_cache, v_cache = k_rows.clone(), v_rows.clone()
    before_k = k_cache.clone()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kwargs)
    assert out.shape == (batch, 2, hq, d) and out.dtype == BF16 and lse.shape == (batch, hq, 2)

    exact_k, exact_v = k_rows.double(), v_rows.double()
    ref_kwargs = {key: value for key, value in kwargs.items() if key not in ("cache_seqlens", "cache_batch_idx",
                                                                              "cache_leftpad", "return_softmax_lse",
                                                                              "page_table")}
    ref_kwargs.update(seqused_k=cache_seqlens, kv_batch_idx=batch_idx, leftpad_k=leftpad,
                      rotary_interleaved=interleaved)
    want_out, want_lse = reference.attention_forward(q.double(), exact_k, exact_v, k_new=k_new.double(),
                                                     v_new=v_new.double(), **ref_kwargs)
    got_k = _pages_to_rows(k_cache, kwargs["page_table"]) if paged else k_cache
    got_v = _pages_to_rows(v_cache, kwargs["page_table"]) if paged else v_cache
    # Appended rows hold the (rotated) new keys; everything else is untouched.
    assert torch.equal(got_v, exact_v.to(BF16))
    assert torch.allclose(got_k.double(), exact_k, atol=1e-2, rtol=1e-2)
    touched = torch.zeros(4, capacity, dtype=torch.bool)
    for b in range(batch):
        touched[batch_idx[b], cache_seqlens[b]:cache_seqlens[b] + 2] = True
    rows_before_k = _pages_to_rows(before_k, kwargs["page_table"]) if paged else before_k
    assert torch.equal(got_k[~touched], rows_before_k[~touched])
    check_output(out, want_out)
    check_lse(lse, want_lse, atol=2e-2)  # the kernels round rotated queries to bfloat16; the exact path does not


def test_varlen_queries_and_packed_new_keys():
    gen = testing.generator("api-kv-varlen")
    k_cache, v_cache = randn(gen, 2, 32, 1, 64), randn(gen, 2, 32, 1, 64)
    q = randn(gen, 5, 4, 64)
    k_new, v_new = randn(gen, 4, 1, 64), randn(gen, 4, 1, 64)
    cu_q, cu_new = cu([2, 3]), cu([1, 3])
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=ints([7, 20]),
                                       cu_seqlens_q=cu_q, cu_seqlens_k_new=cu_new, max_seqlen_q=3, causal=True,
                                       return_softmax_lse=True)
    assert out.shape == (5, 4, 64) and lse.shape == (4, 5)
    assert torch.equal(k_cache[0, 7], k_new[0]) and torch.equal(k_cache[1, 20:23], k_new[1:])


def test_cache_seqlens_int_and_no_append():
    gen = testing.generator("api-kv-int")
    k_cache, v_cache = randn(gen, 2, 16, 2, 64), randn(gen, 2, 16, 2, 64)
    q = randn(gen, 2, 1, 4, 64)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=9)
    same = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=ints([9, 9]))
    assert torch.equal(out, same)
    want, _ = reference.attention_forward(*upcast(q, k_cache, v_cache), seqused_k=ints([9, 9]))
    check_output(out, want)


def test_num_splits_and_scheduler_metadata_never_change_results():
    gen = testing.generator("api-splits")
    k_cache, v_cache = randn(gen, 3, 48, 2, 64), randn(gen, 3, 48, 2, 64)
    q, cache_seqlens = randn(gen, 3, 1, 8, 64), ints([48, 3, 17])
    metadata = get_scheduler_metadata(3, 1, 48, 8, 2, 64, seqused_k=cache_seqlens, causal=True)
    results = [flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True,
                                       num_splits=splits, scheduler_metadata=meta)
               for splits in (0, 1, 3, 256) for meta in (None, metadata)]
    assert all(torch.equal(r, results[0]) for r in results)


def test_scheduler_metadata_layout():
    md = get_scheduler_metadata(3, 4, 64, 8, 2, 128, seqused_k=ints([10, 0, 64]), cu_seqlens_q=cu([4, 1, 2]),
                                cache_leftpad=ints([2, 0, 4]), max_seqlen_k_new=4, num_splits=5)
    assert md.dtype == I32 and md.shape == (attention.scheduler_metadata_length(3),)
    assert md.tolist() == [attention.SCHEDULER_METADATA_VERSION, 3, 4, 1, 2, 12, 4, 64, 5, 5, 5]
    heuristic = get_scheduler_metadata(2, 1, 300, 4, 4, 64, seqused_k=ints([300, 1]))
    assert heuristic.tolist()[:6] == [attention.SCHEDULER_METADATA_VERSION, 2, 1, 1, 300, 1]
    assert heuristic.tolist()[6:] == [1, 1]  # no multiprocessors on the CPU: never split


@pytest.mark.parametrize("kwargs, error, message", [
    ({"num_heads_kv": 3}, ArgumentError, "num_heads_kv: 3 must divide num_heads_q=8"),
    ({"headdim": 512}, ArgumentError, "headdim: .* is 512; at most 256"),
    ({"qkv_dtype": torch.float32}, ArgumentTypeError, "qkv_dtype: float32 is not accepted"),
    ({"seqused_k": torch.zeros(3, dtype=torch.int64)}, ArgumentTypeError, "seqused_k: dtype int64"),
    ({"cu_seqlens_q": ints([0, 1])}, ArgumentError, r"cu_seqlens_q: expected shape \(3,\)"),
    ({"num_splits": 300}, ArgumentError, "num_splits: .* is 300; at most 256"),
    ({"batch_size": -1}, ArgumentError, "batch_size: must be at least 0"),
])
def test_scheduler_metadata_bad_inputs(kwargs, error, message):
    args = dict(batch_size=2, max_seqlen_q=1, max_seqlen_k=8, num_heads_q=8, num_heads_kv=2, headdim=64)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        get_scheduler_metadata(**args)


# ---- bad inputs ------------------------------------------------------------------------------------

def _varlen_inputs():
    gen = testing.generator("api-bad")
    return dict(q=randn(gen, 2, 5, 4, 64), k=randn(gen, 2, 9, 2, 64), v=randn(gen, 2, 9, 2, 64))


def _packed_inputs():
    gen = testing.generator("api-bad-packed")
    return dict(q=randn(gen, 7, 4, 64), k=randn(gen, 11, 2, 64), v=randn(gen, 11, 2, 64), cu_seqlens_q=cu([3, 4]),
                cu_seqlens_k=cu([5, 6]), max_seqlen_q=4, max_seqlen_k=6)


META = torch.device("meta")
VARLEN_BAD = [
    (lambda a: a.update(q="x"), ArgumentTypeError, "q: expected a torch.Tensor, got str"),
    (lambda a: a.update(q=a["q"].float()), ArgumentTypeError, "q: dtype float32 is not accepted"),
    (lambda a: a.update(q=a["q"][0]), ArgumentError, "q: expected a 4-D tensor"),
    (lambda a: a.update(k=a["k"].half()), ArgumentTypeError, "k: dtype float16 does not match q's bfloat16"),
    (lambda a: a.update(v=a["v"].half()), ArgumentTypeError, "v: dtype float16 does not match q's bfloat16"),
    (lambda a: a.update(k=a["k"][0]), ArgumentError, "k: expected a 4-D tensor"),
    (lambda a: a.update(v=a["v"][None]), ArgumentError, "v: expected a 4-D tensor"),
    (lambda a: a.update(k=a["k"].to(META)), ArgumentError, "k: on meta, but the other inputs are on cpu"),
    (lambda a: a.update(v=a["v"].to(META)), ArgumentError, "v: on meta, but the other inputs are on cpu"),
    (lambda a: a.update(v=a["v"][:, :8]), ArgumentError, r"v: expected shape \(2, 9, 2, 64\)"),
    (lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), ArgumentError, "k: batch size 1 does not match q's batch size 2"),
    (lambda a: a.update(k=a["k"][..., :32]), ArgumentError, r"k: expected shape \(2, 9, 2, 64\)"),
    (lambda a: a.update(k=torch.cat([a["k"]] * 3, 2)[:, :, :3], v=torch.cat([a["v"]] * 3, 2)[:, :, :3]),
     ArgumentError, "k: nheads_k=3 must divide q's nheads=4"),
    (lambda a: a.update(q=torch.cat([a["q"]] * 2, -1), k=torch.cat([a["k"]] * 2, -1)), ArgumentError,
     "v: head dimension 64 differs from q's 128"),
    (lambda a: a.update(q=a["q"][..., :60], k=a["k"][..., :60], v=a["v"][..., :60]), ArgumentError,
     "q: head dimension 60 must be a multiple of 8"),
    (lambda a: a.update(q=torch.cat([a["q"]] * 5, -1)[..., :264], k=torch.cat([a["k"]] * 5, -1)[..., :264],
                        v=torch.cat([a["v"]] * 5, -1)[..., :264]), ArgumentError,
     "q: the head dimension .* is 264; at most 256"),
    (lambda a: a.update(q=a["q"].to(FP8), k=a["k"].to(FP8), v=a["v"].to(FP8)[..., :40]), ArgumentError,
     "v: head dimension 40 must be a multiple of 16"),
    (lambda a: a.update(seqused_q=torch.zeros(2, dtype=torch.int64)), ArgumentTypeError,
     "seqused_q: dtype int64 is not accepted"),
    (lambda a: a.update(seqused_k=ints([1, 2, 3])), ArgumentError, r"seqused_k: expected shape \(2,\)"),
    (lambda a: a.update(seqused_k=ints([1, 2]).to(META)), ArgumentError, "seqused_k: on meta"),
    (lambda a: a.update(page_table=ints([[0], [1]]).long()), ArgumentTypeError, "page_table: dtype int64"),
    (lambda a: a.update(page_table=ints([0, 1])), ArgumentError, "page_table: expected a 2-D tensor"),
    (lambda a: a.update(page_table=ints([[0]])), ArgumentError, "page_table: batch size 1 does not match"),
    (lambda a: a.update(out=torch.empty(2, 5, 4, 64, dtype=FP16)), ArgumentTypeError,
     "out: dtype float16 is not accepted; expected bfloat16"),
    (lambda a: a.update(out=torch.empty(2, 5, 4, 32, dtype=BF16)), ArgumentError,
     r"out: expected shape \(2, 5, 4, 64\)"),
    (lambda a: a.update(out=torch.empty(2, 5, 64, 4, dtype=BF16).transpose(-1, -2)), ArgumentError,
     "out: the last dimension must be contiguous"),
    (lambda a: a.update(out=torch.empty(2, 5, 4, 64, dtype=BF16, device=META)), ArgumentError, "out: on meta"),
    (lambda a: a.update(out=torch.empty(5, 4, 64, dtype=BF16)), ArgumentError, "out: expected a 4-D tensor"),
    (lambda a: a.update(qv=torch.zeros(2, 5, 4, 64, dtype=BF16) + 1), ArgumentError,
     "qv: only supported for V head dimension >= 256"),
    (lambda a: a.update(learnable_sink=torch.ones(3)), ArgumentError, r"learnable_sink: expected shape \(4,\)"),
    (lambda a: a.update(learnable_sink=ints([1, 2, 3, 4])), ArgumentTypeError, "learnable_sink: dtype int32"),
    (lambda a: a.update(learnable_sink=torch.ones(4, device=META)), ArgumentError, "learnable_sink: on meta"),
    (lambda a: a.update(learnable_sink=torch.ones(1, 4)), ArgumentError, "learnable_sink: expected a 1-D tensor"),
    (lambda a: a.update(window_size="ab"), ArgumentTypeError, "window_size: expected a .left, right. pair"),
    (lambda a: a.update(window_size=(1, "x")), ArgumentTypeError, "window_size: expected an int, got str"),
    (lambda a: a.update(window_size=(1, 2, 3)), ArgumentTypeError, "window_size: expected a .left, right. pair"),
    (lambda a: a.update(softcap=-1.0), ArgumentError, "softcap: must be >= 0"),
    (lambda a: a.update(softcap="big"), ArgumentTypeError, "softcap: expected a float"),
    (lambda a: a.update(attention_chunk=-4), ArgumentError, "attention_chunk: must be at least 0"),
    (lambda a: a.update(num_splits=257), ArgumentError, "num_splits: .* is 257; at most 256"),
    (lambda a: a.update(scheduler_metadata=ints([1, 2, 3])), ArgumentError,
     r"scheduler_metadata: expected shape \(8,\)"),
    (lambda a: a.update(scheduler_metadata=torch.zeros(8, dtype=torch.int64)), ArgumentTypeError,
     "scheduler_metadata: dtype int64"),
    (lambda a: a.update(cp_world_size=0), ArgumentError, "cp_world_size: must be positive"),
    (lambda a: a.update(cp_rank=1), ArgumentError, "cp_rank: must be 0 when context parallelism is disabled"),
    (lambda a: a.update(cp_world_size=2, cp_rank=1), ArgumentError, "cp_tot_seqused_k: must be given"),
    (lambda a: a.update(cp_world_size=2, cp_rank=2, cp_tot_seqused_k=ints([9, 9])), ArgumentError,
     r"cp_rank: must lie in \[0, 2\)"),
    (lambda a: a.update(cp_world_size=2, cp_tot_seqused_k=ints([9])), ArgumentError,
     r"cp_tot_seqused_k: expected shape \(2,\)"),
    (lambda a: a.update(cp_world_size=2, cp_tot_seqused_k=ints([18, 18]), window_size=(3, 0)), ArgumentError,
     "window_size: local .* not supported with context parallelism"),
    (lambda a: a.update(backend="cuda"), ArgumentError, "backend: 'cuda' is not one of"),
    (lambda a: a.update(causal="yes"), ArgumentTypeError, "causal: expected a bool"),
]


@pytest.mark.parametrize("change, error, message", VARLEN_BAD)
def test_varlen_bad_inputs(change, error, message):
    args = _varlen_inputs()
    change(args)
    with pytest.raises(error, match=message):
        flash_attn_varlen_func(**args)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(q=a["q"][None]), ArgumentError, "q: expected a 3-D tensor"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), ArgumentTypeError, "cu_seqlens_q: dtype int64"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][None]), ArgumentError, "cu_seqlens_q: expected a 1-D"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].to(META)), ArgumentError, "cu_seqlens_q: on meta"),
    (lambda a: a.update(max_seqlen_q=None), ArgumentError, "max_seqlen_q: must be given when cu_seqlens_q"),
    (lambda a: a.update(max_seqlen_k=None), ArgumentError, "max_seqlen_k: must be given when cu_seqlens_k"),
    (lambda a: a.update(cu_seqlens_k=ints([0, 11])), ArgumentError, "cu_seqlens_k: batch size 1 does not match"),
    (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"].long()), ArgumentTypeError, "cu_seqlens_k: dtype int64"),
    (lambda a: a.update(k=a["k"][None]), ArgumentError, "k: expected a 3-D tensor"),
    (lambda a: a.update(v=a["v"][:10]), ArgumentError, r"v: expected shape \(11, 2, 64\)"),
    (lambda a: a.update(page_table=ints([[0], [1]])), ArgumentError, "cu_seqlens_k: a paged KV cache"),
    (lambda a: a.update(seqused_q=ints([1])), ArgumentError, r"seqused_q: expected shape \(2,\)"),
    (lambda a: a.update(out=torch.empty(2, 4, 4, 64, dtype=BF16)), ArgumentError, "out: expected a 3-D tensor"),
])
def test_packed_bad_inputs(change, error, message):
    args = _packed_inputs()
    change(args)
    with pytest.raises(error, match=message):
        flash_attn_varlen_func(**args)


def _kvcache_inputs():
    gen = testing.generator("api-bad-kv")
    angles = torch.rand(32, 16, generator=gen)
    return dict(q=randn(gen, 2, 1, 4, 64), k_cache=randn(gen, 2, 32, 2, 64), v_cache=randn(gen, 2, 32, 2, 64),
                k=randn(gen, 2, 1, 2, 64), v=randn(gen, 2, 1, 2, 64), cache_seqlens=ints([3, 9]),
                rotary_cos=angles.cos().to(BF16), rotary_sin=angles.sin().to(BF16))


KVCACHE_BAD = [
    (lambda a: a.update(k_cache=torch.empty(2, 32, 64, 2, dtype=BF16).transpose(-1, -2)), ArgumentError,
     "k_cache: the last dimension must be contiguous"),
    (lambda a: a.update(v_cache=torch.empty(2, 32, 64, 2, dtype=BF16).transpose(-1, -2)), ArgumentError,
     "v_cache: the last dimension must be contiguous"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), ArgumentTypeError, "k_cache: dtype float16 does not match"),
    (lambda a: a.update(v_cache=a["v_cache"].to(META)), ArgumentError, "v_cache: on meta"),
    (lambda a: a.update(k_cache=a["k_cache"][0]), ArgumentError, "k_cache: expected a 4-D tensor"),
    (lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ArgumentError,
     "k_cache: batch size 1 does not match q's batch size 2"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :16]), ArgumentError, r"v_cache: expected shape \(2, 32, 2, 64\)"),
    (lambda a: a.update(v=None), ArgumentError, "v: must be given together with k"),
    (lambda a: a.update(k=None, rotary_cos=None, rotary_sin=None), ArgumentError, "k: must be given together with v"),
    (lambda a: a.update(cache_seqlens=None), ArgumentError, "cache_seqlens: must be given when appending"),
    (lambda a: a.update(k=a["k"].half()), ArgumentTypeError, "k: dtype float16 does not match q's bfloat16"),
    (lambda a: a.update(v=a["v"][:, :, :1]), ArgumentError, r"v: expected shape \(2, 1, 2, 64\)"),
    (lambda a: a.update(k=a["k"][0]), ArgumentError, "k: expected a 4-D tensor"),
    (lambda a: a.update(k=a["k"].to(META)), ArgumentError, "k: on meta"),
    (lambda a: a.update(cache_seqlens=ints([3, 9]).long()), ArgumentTypeError, "cache_seqlens: dtype int64"),
    (lambda a: a.update(cache_seqlens=ints([3])), ArgumentError, r"cache_seqlens: expected shape \(2,\)"),
    (lambda a: a.update(cache_seqlens=ints([3, 9]).to(META)), ArgumentError, "cache_seqlens: on meta"),
    (lambda a: a.update(cache_seqlens=-1), ArgumentError, "cache_seqlens: must be at least 0"),
    (lambda a: a.update(cache_batch_idx=ints([0])), ArgumentError, r"cache_batch_idx: expected shape \(2,\)"),
    (lambda a: a.update(cache_batch_idx=ints([0, 1]).long()), ArgumentTypeError, "cache_batch_idx: dtype int64"),
    (lambda a: a.update(cache_leftpad=ints([0, 1, 2])), ArgumentError, r"cache_leftpad: expected shape \(2,\)"),
    (lambda a: a.update(cache_leftpad=torch.zeros(2)), ArgumentTypeError, "cache_leftpad: dtype float32"),
    (lambda a: a.update(k=None, v=None), ArgumentError, "rotary_cos: rotary embedding needs new keys"),
    (lambda a: a.update(rotary_sin=None), ArgumentError, "rotary_sin: must be given together with rotary_cos"),
    (lambda a: a.update(rotary_cos=None), ArgumentError, "rotary_sin: given without rotary_cos"),
    (lambda a: a.update(rotary_cos=a["rotary_cos"][:, :12], rotary_sin=a["rotary_sin"][:, :12].contiguous()),
     ArgumentError, "rotary_cos: must be contiguous"),
    (lambda a: a.update(rotary_cos=a["rotary_cos"][:, :12].contiguous(),
                        rotary_sin=a["rotary_sin"][:, :12].contiguous()),
     ArgumentError, "rotary_cos: rotary_dim .* is 24; it must be divisible by 16"),
    (lambda a: a.update(rotary_cos=torch.ones(32, 40, dtype=BF16), rotary_sin=torch.ones(32, 40, dtype=BF16)),
     ArgumentError, "rotary_cos: rotary_dim .* is 80; at most 64"),
    (lambda a: a.update(rotary_cos=a["rotary_cos"].float()), ArgumentTypeError, "rotary_cos: dtype float32 does not"),
    (lambda a: a.update(rotary_sin=a["rotary_sin"][:16]), ArgumentError, r"rotary_sin: expected shape \(32, 16\)"),
    (lambda a: a.update(rotary_cos=a["rotary_cos"][0]), ArgumentError, "rotary_cos: expected a 2-D tensor"),
    (lambda a: a.update(rotary_seqlens=ints([1])), ArgumentError, r"rotary_seqlens: expected shape \(2,\)"),
    (lambda a: a.update(rotary_cos=None, rotary_sin=None, rotary_seqlens=ints([1, 1])), ArgumentError,
     "rotary_seqlens: given without rotary_cos"),
    (lambda a: a.update(cu_seqlens_k_new=cu([1, 1]), k=None, v=None, rotary_cos=None, rotary_sin=None),
     ArgumentError, "cu_seqlens_k_new: given without new keys"),
    (lambda a: a.update(q=torch.cat([a["q"]] * 40, 1)), ArgumentError, "k: appending needs seqlen_q .40."),
    (lambda a: a.update(page_table=ints([[0, 1], [2, 3]]), k_cache=a["k_cache"].reshape(8, 8, 2, 64),
                        v_cache=a["v_cache"].reshape(8, 8, 2, 64), rotary_cos=a["rotary_cos"][:8].contiguous(),
                        rotary_sin=a["rotary_sin"][:8].contiguous()),
     ArgumentError, "rotary_cos: 8 positions .* a paged cache needs at least its seqlen .16."),
    (lambda a: a.update(q_descale=torch.ones(2, 2)), None, None),  # ignored for bfloat16, as upstream
]


@pytest.mark.parametrize("change, error, message", KVCACHE_BAD)
def test_kvcache_bad_inputs(change, error, message):
    args = _kvcache_inputs()
    change(args)
    if error is None:
        flash_attn_with_kvcache(**args)
        return
    with pytest.raises(error, match=message):
        flash_attn_with_kvcache(**args)


def test_fp8_descale_checks():
    gen = testing.generator("api-bad-fp8")
    q, k, v = randn(gen, 2, 3, 4, 64, dtype=FP8), randn(gen, 2, 5, 2, 64, dtype=FP8), randn(gen, 2, 5, 2, 64, dtype=FP8)
    with pytest.raises(ArgumentError, match=r"q_descale: expected shape \(2, 2\)"):
        flash_attn_varlen_func(q, k, v, q_descale=torch.ones(2, 4))
    with pytest.raises(ArgumentTypeError, match="k_descale: dtype float16 is not accepted"):
        flash_attn_varlen_func(q, k, v, k_descale=torch.ones(2, 2, dtype=FP16))
    with pytest.raises(ArgumentError, match="v_descale: on meta"):
        flash_attn_varlen_func(q, k, v, v_descale=torch.ones(2, 2, device=META))
    with pytest.raises(ArgumentError, match="q: head dimension 56 must be a multiple of 16"):
        flash_attn_varlen_func(q[..., :56], k[..., :56], v[..., :56])


def _qv_inputs():
    gen = testing.generator("api-bad-qv")
    return dict(q=randn(gen, 2, 3, 4, 64), k=randn(gen, 2, 5, 2, 64), v=randn(gen, 2, 5, 2, 256),
                qv=randn(gen, 2, 3, 4, 256))


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(qv=a["qv"].half()), ArgumentTypeError, "qv: dtype float16 does not match q's bfloat16"),
    (lambda a: a.update(qv=a["qv"][0]), ArgumentError, "qv: expected a 4-D tensor"),
    (lambda a: a.update(qv=a["qv"][:, :2]), ArgumentError, r"qv: expected shape \(2, 3, 4, 256\)"),
    (lambda a: a.update(qv=a["qv"].to(META)), ArgumentError, "qv: on meta"),
    (lambda a: a.update(q=torch.cat([a["q"]] * 2, -1), k=torch.cat([a["k"]] * 2, -1)), ArgumentError,
     "v: head dimension 256 differs from q's 128"),
    (lambda a: a.update(cp_world_size=2, cp_tot_seqused_k=torch.tensor([5, 5])), ArgumentTypeError,
     "cp_tot_seqused_k: dtype int64"),
])
def test_qv_and_context_parallel_bad_inputs(change, error, message):
    args = _qv_inputs()
    change(args)
    with pytest.raises(error, match=message):
        flash_attn_varlen_func(**args)


def test_data_dependent_errors_surface_from_the_reference():
    args = _kvcache_inputs()
    args["cache_seqlens"] = ints([3, 32])  # appending one more row overflows batch 1's cache
    with pytest.raises(ValueError, match="overflows the cache of batch 1"):
        flash_attn_with_kvcache(**args)


# ---- dispatch on a (fake) GPU ---------------------------------------------------------------------

GPU = platform.DeviceInfo("cuda", "fake GPU", "sm_90a", 132, 232448)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(platform, "device_info", lambda device=None: GPU)
    monkeypatch.setattr(platform, "tilelang_version", lambda: "0.1.15")
    monkeypatch.setattr(dispatch, "_warned", set())


def _small(head_dim=64):
    gen = testing.generator("api-dispatch")
    return (randn(gen, 1, 2, 2, head_dim), randn(gen, 1, 3, 2, head_dim), randn(gen, 1, 3, 2, head_dim))


def test_gpu_kvcache_append_runs_the_append_kernel_then_attention(fake_gpu, monkeypatch):
    appended, decoded = [], []

    def fake_append(kernel, q, cu_q, q_rot, *rest, q_per_token, interleaved):
        appended.append((q.shape, q_rot is not None, q_per_token, interleaved))

    monkeypatch.setattr("mate.jit.get_kernel", lambda *args: None)
    monkeypatch.setattr("mate.ops.fmha.append_kernel.launch", fake_append)
    monkeypatch.setattr("mate.ops.fmha.decode_kernel.launch", lambda *args, **kwargs: decoded.append(args))
    args = _kvcache_inputs()
    flash_attn_with_kvcache(**args, causal=True)
    assert appended == [((2, 4, 64), True, False, True)]  # one query per sequence: not per token
    # The attention reads the updated cache: cache_seqlens + the new rows.
    assert len(decoded) == 1 and decoded[0][4].tolist() == [4, 10]


def test_gpu_kvcache_unsupported_feature_appends_nothing(fake_gpu, monkeypatch):
    # An attention chunk over a head dim of 96: the prefill kernel lacks chunks and the decode kernel
    # head dim 96, so nothing may be appended before the refusal.
    monkeypatch.setattr("mate.ops.fmha.append_kernel.launch", lambda *args, **kwargs: pytest.fail("appended"))
    args = {name: torch.nn.functional.pad(t, (0, 32)) if name in ("q", "k_cache", "v_cache", "k", "v") else t
            for name, t in _kvcache_inputs().items()}
    k_cache = args["k_cache"].clone()
    with pytest.raises(dispatch.UnsupportedError, match=r"attention_chunk=True \(supported: False\)"):
        flash_attn_with_kvcache(**args, attention_chunk=4)
    assert torch.equal(args["k_cache"], k_cache)


def test_gpu_kvcache_append_with_attention_chunk_runs_append_then_decode(fake_gpu, monkeypatch):
    # Llama 4's decode step: new keys appended (rotated), then chunked attention on the decode kernel.
    launched = []
    monkeypatch.setattr("mate.jit.get_kernel", lambda *args: None)
    monkeypatch.setattr("mate.ops.fmha.append_kernel.launch", lambda *args, **kwargs: launched.append("append"))
    monkeypatch.setattr("mate.ops.fmha.decode_kernel.launch",
                        lambda *args, **kwargs: launched.append(("decode", kwargs["attention_chunk"])))
    flash_attn_with_kvcache(**_kvcache_inputs(), causal=True, attention_chunk=4)
    assert launched == ["append", ("decode", 4)]


def test_gpu_unsupported_variant_names_the_feature(fake_gpu):
    # Attention chunks run only on the decode kernel, which has no head dim 96: the prefill kernel's
    # refusal shows.
    q, k, v = (t.to(FP8) for t in _small(96))
    with pytest.raises(dispatch.UnsupportedError, match=r"attention_chunk=True \(supported: False\)"):
        flash_attn_varlen_func(q, k, v, attention_chunk=2)


def test_gpu_fallback_warns_once_and_runs_the_reference(fake_gpu, monkeypatch):
    q, k, v = (t.to(FP8) for t in _small(96))
    monkeypatch.setenv("MATE_ALLOW_REFERENCE_FALLBACK", "1")
    with pytest.warns(UserWarning, match="running the PyTorch reference"):
        out = flash_attn_varlen_func(q, k, v, attention_chunk=2)
    monkeypatch.delenv("MATE_ALLOW_REFERENCE_FALLBACK")
    assert torch.equal(out, flash_attn_varlen_func(q, k, v, attention_chunk=2, backend="reference"))


def test_kernel_receives_the_variant_and_arguments(fake_gpu, monkeypatch):
    calls = []

    def launcher(variant, args):
        calls.append(variant)
        args["out"].fill_(1.0)
        args["softmax_lse"].fill_(2.0)

    monkeypatch.setattr(attention, "_launch_kernel", launcher)
    monkeypatch.setattr(attention, "_decode_variant", lambda variant, args: None)  # the prefill path
    out, lse = flash_attn_varlen_func(*_small(), causal=True, return_softmax_lse=True)
    assert calls and calls[0]["causal"] and calls[0]["head_dim"] == 64 and calls[0]["dtype"] == BF16
    assert (out == 1).all() and (lse == 2).all()


def test_short_queries_on_a_cache_take_the_decode_kernel(fake_gpu, monkeypatch):
    calls = []
    monkeypatch.setattr("mate.ops.fmha.decode_kernel.launch", lambda *args, **kwargs: calls.append(args))
    gen = testing.generator("api-decode")
    q, k_cache, v_cache = randn(gen, 2, 1, 4, 64), randn(gen, 2, 32, 2, 64), randn(gen, 2, 32, 2, 64)
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=ints([3, 9]))
    assert len(calls) == 1


def test_support_declaration_covers_the_variant_key():
    variant = attention.fwd_variant(dtype=BF16, head_dim=80, head_dim_v=80, causal=True, local=False, softcap=False,
                                    learnable_sink=False, varlen_q=True, varlen_k=True, seqused=False, paged_kv=False,
                                    append_kv=False, rotary=False, qv=False, attention_chunk=False, leftpad_k=False,
                                    kv_batch_idx=False, context_parallel=False)
    assert variant["head_dim"] == 96 and attention.FWD.support.violations(variant) == []
    assert set(variant) == set(attention.FWD.support.features)


# ---- torch.compile ------------------------------------------------------------------------------------

def test_torch_compile_fullgraph_varlen():
    gen = testing.generator("api-compile-varlen")

    def attend(q, k, v, cu_q, cu_k, max_q, max_k):
        out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, return_softmax_lse=True)
        return out.float() * 2, lse

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    for lengths_q, lengths_k in (([3, 4], [5, 6]), ([4, 5], [6, 8]), ([6, 1], [10, 3])):  # sizes go symbolic
        q = randn(gen, sum(lengths_q), 4, 64)
        k, v = randn(gen, sum(lengths_k), 2, 64), randn(gen, sum(lengths_k), 2, 64)
        args = (q, k, v, cu(lengths_q), cu(lengths_k), max(lengths_q), max(lengths_k))
        got, want = compiled(*args), attend(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_torch_compile_fullgraph_kvcache_append():
    gen = testing.generator("api-compile-kv")
    k_cache, v_cache = randn(gen, 2, 16, 2, 64), randn(gen, 2, 16, 2, 64)
    q, k_new, v_new = randn(gen, 2, 1, 4, 64), randn(gen, 2, 1, 2, 64), randn(gen, 2, 1, 2, 64)
    cache_seqlens = ints([4, 9])

    def step(q, k_cache, v_cache, k, v, cache_seqlens):
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True,
                                      num_splits=1)
        return out + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    caches = [k_cache.clone(), v_cache.clone()]
    got = compiled(q, *caches, k_new, v_new, cache_seqlens)
    want = step(q, k_cache, v_cache, k_new, v_new, cache_seqlens)
    assert torch.equal(got, want)
    assert torch.equal(caches[0], k_cache) and torch.equal(caches[1], v_cache)
    assert torch.equal(k_cache[1, 9], k_new[1, 0])


@pytest.mark.parametrize("num_splits", [0, 2])
def test_torch_compile_fullgraph_scheduler_metadata(num_splits):
    def metadata(seqused_k):
        return get_scheduler_metadata(2, 1, 64, 8, 2, 128, seqused_k=seqused_k, num_splits=num_splits)

    compiled = torch.compile(metadata, fullgraph=True, backend="aot_eager")
    seqused = ints([5, 64])
    assert torch.equal(compiled(seqused), metadata(seqused))


# ---- signatures: the original MATE's mate.mha_interface (names, order, defaults) ----------------------

SIGNATURES = {
    flash_attn_varlen_func: [
        ("q", None), ("k", None), ("v", None), ("cu_seqlens_q", None), ("cu_seqlens_k", None), ("max_seqlen_q", None),
        ("max_seqlen_k", None), ("seqused_q", None), ("seqused_k", None), ("page_table", None),
        ("softmax_scale", None), ("causal", False), ("qv", None), ("q_descale", None), ("k_descale", None),
        ("v_descale", None), ("window_size", (-1, -1)), ("learnable_sink", None), ("attention_chunk", 0),
        ("softcap", 0.0), ("scheduler_metadata", None), ("num_splits", 0), ("pack_gqa", None),
        ("deterministic", False), ("sm_margin", 0), ("return_softmax_lse", False), ("backend", "auto"),
        ("cp_world_size", 1), ("cp_rank", 0), ("cp_tot_seqused_k", None), ("out", None)],
    flash_attn_with_kvcache: [
        ("q", None), ("k_cache", None), ("v_cache", None), ("k", None), ("v", None), ("qv", None),
        ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None),
        ("cache_leftpad", None), ("page_table", None), ("cu_seqlens_q", None), ("cu_seqlens_k_new", None),
        ("max_seqlen_q", None), ("rotary_seqlens", None), ("q_descale", None), ("k_descale", None),
        ("v_descale", None), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("learnable_sink", None), ("attention_chunk", 0), ("softcap", 0.0), ("rotary_interleaved", True),
        ("scheduler_metadata", None), ("num_splits", 0), ("pack_gqa", None), ("sm_margin", 0),
        ("return_softmax_lse", False), ("cp_world_size", 1), ("cp_rank", 0), ("cp_tot_seqused_k", None)],
    get_scheduler_metadata: [
        ("batch_size", None), ("max_seqlen_q", None), ("max_seqlen_k", None), ("num_heads_q", None),
        ("num_heads_kv", None), ("headdim", None), ("seqused_q", None), ("seqused_k", None),
        ("qkv_dtype", torch.bfloat16), ("headdim_v", None), ("cu_seqlens_q", None), ("cu_seqlens_k", None),
        ("cu_seqlens_k_new", None), ("cache_leftpad", None), ("page_size", None), ("max_seqlen_k_new", 0),
        ("causal", False), ("window_size", (-1, -1)), ("attention_chunk", 0), ("has_softcap", False),
        ("num_splits", 0), ("pack_gqa", None), ("has_qv", False), ("mp_margin", 0)],
}


@pytest.mark.parametrize("function", list(SIGNATURES), ids=lambda f: f.__name__)
def test_signature_matches_the_original(function):
    import inspect

    required = {flash_attn_varlen_func: 3, flash_attn_with_kvcache: 3, get_scheduler_metadata: 6}[function]
    params = list(inspect.signature(function).parameters.values())
    assert [p.name for p in params] == [name for name, _ in SIGNATURES[function]]
    assert all(p.default is inspect.Parameter.empty for p in params[:required])
    for param, (name, default) in zip(params[required:], SIGNATURES[function][required:], strict=True):
        assert param.default == default, name
    assert function.__mate_api__ == f"fmha.{function.__name__}"


@pytest.mark.parametrize("seqused, leftpad", [(False, False), (True, False), (True, True)])
def test_packed_keys_as_one_cache_row_mean_the_same_keys(seqused, leftpad):
    # FP8 varlen calls run the decode kernel by viewing packed keys as a single cache row.
    from mate.ops.fmha.attention import _packed_keys_as_cache

    gen = testing.generator(f"packed-keys{seqused}{leftpad}")
    lengths_q, lengths_k = [3, 1, 4], [9, 5, 12]
    cu_q = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 14, 26], dtype=torch.int32)
    q, k, v = randn(gen, 8, 4, 64), randn(gen, 26, 2, 64), randn(gen, 26, 2, 64)
    used = torch.tensor([7, 5, 10], dtype=torch.int32) if seqused else None
    pad = torch.tensor([2, 0, 3], dtype=torch.int32) if leftpad else None
    common = dict(cu_seqlens_q=cu_q, max_seqlen_q=max(lengths_q), causal=True)
    want = reference.attention_forward(q, k, v, cu_seqlens_k=cu_k, max_seqlen_k=max(lengths_k), seqused_k=used,
                                       leftpad_k=pad, **common)
    k_row, v_row, rows, start, end = _packed_keys_as_cache(k, v, cu_k, used, pad)
    got = reference.attention_forward(q, k_row, v_row, kv_batch_idx=rows, leftpad_k=start, seqused_k=end, **common)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_fp8_varlen_call_takes_the_decode_kernel_with_packed_keys(fake_gpu, monkeypatch):
    calls = []
    monkeypatch.setattr("mate.ops.fmha.decode_kernel.launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    gen = testing.generator("fp8-varlen-dispatch")
    # Decode-size (at most 8 queries per sequence); more queries take the FP8 prefill kernel.
    cu_q = torch.tensor([0, 3, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 30], dtype=torch.int32)
    q, k, v = (randn(gen, n, 2, 64).to(FP8) for n in (11, 30, 30))
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 21, causal=True)
    (args, kwargs), = calls
    assert args[1].shape == (1, 30, 2, 64) and args[3] is None  # one dense cache row, not paged
    assert kwargs["cache_batch_idx"].tolist() == [0, 0] and kwargs["cache_leftpad"].tolist() == [0, 9]
    assert args[4].tolist() == [9, 30] and kwargs["cu_seqlens_q"] is not None
