"""Argument translation: what each wrapper passes to mate.mha_interface, and what it returns.

mate's functions are replaced by recorders here, so these tests pin the wrapper's own job (the
mapping of upstream arguments onto mate's, upstream's defaults and return structures, forward-
only autograd) independently of mate's implementation; test_behaviour.py runs the real thing.
"""

import math

import pytest
import torch

import flash_attn_interface as fai
from mate import mha_interface

BACKWARD_MESSAGE = "flash_attn_3 backward is not implemented in MATE"


class Recorder:
    """Stands in for a mate function: records each call, answers with `respond(*args, **kwargs)`."""

    def __init__(self, respond):
        self.respond = respond
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.respond(*args, **kwargs)

    @property
    def kwargs(self):
        assert len(self.calls) == 1, f"expected one call, got {len(self.calls)}"
        return self.calls[0][1]

    @property
    def args(self):
        assert len(self.calls) == 1, f"expected one call, got {len(self.calls)}"
        return self.calls[0][0]


def attention_result(q, k, v, cu_seqlens_q=None, return_softmax_lse=False, **_):
    """Random out/lse of upstream's shapes: (..., nheads, headdim_v) and (b, nheads, s) or (nheads, total)."""
    out = torch.randn(*q.shape[:-1], v.shape[-1])
    if not return_softmax_lse:
        return out
    lse = torch.randn(q.shape[1], q.shape[0]) if q.dim() == 3 else torch.randn(q.shape[0], q.shape[2], q.shape[1])
    return out, lse


@pytest.fixture
def fake_mate(monkeypatch):
    fakes = {
        "flash_attn_varlen_func": Recorder(attention_result),
        "flash_attn_with_kvcache": Recorder(lambda q, k_cache, v_cache, cu_seqlens_q=None, return_softmax_lse=False,
                                            **_: attention_result(q, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q,
                                                                  return_softmax_lse=return_softmax_lse)),
        "get_scheduler_metadata": Recorder(lambda *a, **kw: torch.arange(7, dtype=torch.int32)),
        "flash_attn_combine": Recorder(lambda o, lse, out=None, out_dtype=None: (o.sum(0), lse.sum(0))),
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(mha_interface, name, fake, raising=False)
    return fakes


def qkv(batch=2, seqlen_q=3, seqlen_k=5, heads=4, heads_k=2, head_dim=16, head_dim_v=None, dtype=torch.bfloat16):
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_k, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen_k, heads_k, head_dim_v or head_dim, dtype=dtype)
    return q, k, v


def test_flash_attn_func_maps_to_varlen_without_cu_seqlens(fake_mate):
    q, k, v = qkv()
    out = fai.flash_attn_func(q, k, v)
    call = fake_mate["flash_attn_varlen_func"]
    assert call.args[0] is q and call.args[1] is k and call.args[2] is v
    assert call.kwargs == dict(
        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, seqused_q=None, seqused_k=None,
        softmax_scale=16 ** -0.5, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
        window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
        sm_margin=0, return_softmax_lse=False)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 4, 16)


def test_flash_attn_func_passes_every_argument(fake_mate):
    q, k, v = qkv(head_dim_v=8)
    qv = torch.randn(2, 3, 4, 8, dtype=torch.bfloat16)
    descales = [torch.rand(2, 2) for _ in range(3)]
    fai.flash_attn_func(q, k, v, 0.25, True, qv, *descales, (3, 0), 4, 30.0, 2, True, True, 5, False)
    kwargs = fake_mate["flash_attn_varlen_func"].kwargs
    assert kwargs["softmax_scale"] == 0.25 and kwargs["causal"] is True and kwargs["qv"] is qv
    assert [kwargs[f"{n}_descale"] for n in "qkv"] == descales
    assert (kwargs["window_size"], kwargs["attention_chunk"], kwargs["softcap"]) == ((3, 0), 4, 30.0)
    assert (kwargs["num_splits"], kwargs["pack_gqa"], kwargs["deterministic"], kwargs["sm_margin"]) == \
        (2, True, True, 5)


def test_default_softmax_scale_counts_qv_head_dim(fake_mate):
    q, k, v = qkv(head_dim=64, head_dim_v=32)
    qv = torch.randn(2, 3, 4, 32, dtype=torch.bfloat16)
    fai.flash_attn_func(q, k, v, qv=qv)
    assert math.isclose(fake_mate["flash_attn_varlen_func"].kwargs["softmax_scale"], 96 ** -0.5)


@pytest.mark.parametrize("function", ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func"])
def test_return_attn_probs_gives_out_and_lse(fake_mate, function):
    q, k, v = qkv(seqlen_k=3, heads_k=4)
    if function == "flash_attn_func":
        result = fai.flash_attn_func(q, k, v, return_attn_probs=True)
        lse_shape = (2, 4, 3)
    elif function == "flash_attn_varlen_func":
        cu = torch.tensor([0, 2, 6], dtype=torch.int32)
        result = fai.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 4, 4,
                                            return_attn_probs=True)
        lse_shape = (4, 6)
    else:
        result = fai.flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2), return_attn_probs=True)
        lse_shape = (2, 4, 3)
    assert isinstance(result, tuple) and len(result) == 2
    assert result[1].shape == lse_shape
    assert fake_mate["flash_attn_varlen_func"].kwargs["return_softmax_lse"] is True


def test_varlen_maps_positional_arguments_by_name(fake_mate):
    q, k, v = (t.flatten(0, 1) for t in qkv())
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32)
    used_q, used_k = torch.tensor([2, 3], dtype=torch.int32), torch.tensor([4, 5], dtype=torch.int32)
    out = fai.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 6, used_q, used_k, 0.5, True, window_size=[2, 1])
    kwargs = fake_mate["flash_attn_varlen_func"].kwargs
    assert kwargs["cu_seqlens_q"] is cu_q and kwargs["cu_seqlens_k"] is cu_k
    assert (kwargs["max_seqlen_q"], kwargs["max_seqlen_k"]) == (4, 6)
    assert kwargs["seqused_q"] is used_q and kwargs["seqused_k"] is used_k
    assert (kwargs["softmax_scale"], kwargs["causal"], list(kwargs["window_size"])) == (0.5, True, [2, 1])
    assert kwargs["num_splits"] == 1 and out.shape == q.shape


def test_qkvpacked_5d_passes_views_of_qkv(fake_mate):
    packed = torch.randn(2, 5, 3, 4, 16, dtype=torch.float16)
    fai.flash_attn_qkvpacked_func(packed, causal=True, window_size=(4, 0))
    args, kwargs = fake_mate["flash_attn_varlen_func"].calls[0]
    for index, tensor in enumerate(args):
        assert tensor.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()  # a view, no copy
        assert torch.equal(tensor, packed[:, :, index])
    assert kwargs["softmax_scale"] == 16 ** -0.5 and kwargs["causal"] is True and kwargs["window_size"] == (4, 0)
    assert kwargs["num_splits"] == 1 and kwargs["pack_gqa"] is None and kwargs["cu_seqlens_q"] is None


def test_qkvpacked_4d_splits_heads_for_gqa(fake_mate):
    packed = torch.randn(2, 5, 6 + 2 * 2, 16, dtype=torch.float16)
    out = fai.flash_attn_qkvpacked_func(packed, num_heads_q=6)
    q, k, v = fake_mate["flash_attn_varlen_func"].args
    assert (q.shape, k.shape, v.shape) == ((2, 5, 6, 16), (2, 5, 2, 16), (2, 5, 2, 16))
    assert torch.equal(q, packed[:, :, :6]) and torch.equal(k, packed[:, :, 6:8]) and torch.equal(v, packed[:, :, 8:])
    assert all(t.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr() for t in (q, k, v))
    assert out.shape == (2, 5, 6, 16)


@pytest.mark.parametrize("shape, num_heads_q, match", [
    ((2, 5, 4, 4, 16), None, "3 at dim -3"),
    ((2, 5, 8, 16), None, "num_heads_q"),
    ((2, 5, 9, 16), 6, "twice"),
    ((2, 16), None, "5-D"),
])
def test_qkvpacked_bad_shapes(fake_mate, shape, num_heads_q, match):
    with pytest.raises(ValueError, match=match):
        fai.flash_attn_qkvpacked_func(torch.randn(*shape), num_heads_q=num_heads_q)


def test_kvcache_translation_and_return_structure(fake_mate):
    q, k_cache, v_cache = qkv(batch=3, seqlen_q=1, seqlen_k=32)
    k_new, v_new = torch.randn(3, 1, 2, 16), torch.randn(3, 1, 2, 16)
    seqlens = torch.tensor([3, 9, 20], dtype=torch.int32)
    tensors = {name: torch.zeros(3, dtype=torch.int32) for name in
               ("cache_batch_idx", "cache_leftpad", "page_table", "cu_seqlens_q", "cu_seqlens_k_new", "rotary_seqlens")}
    cos, sin, metadata = torch.randn(32, 8), torch.randn(32, 8), torch.zeros(4, dtype=torch.int32)
    out = fai.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, None, cos, sin, seqlens, **tensors,
                                      max_seqlen_q=1, causal=True, window_size=(8, 0), attention_chunk=0, softcap=5.0,
                                      rotary_interleaved=False, scheduler_metadata=metadata, num_splits=3,
                                      pack_gqa=False, sm_margin=2)
    call = fake_mate["flash_attn_with_kvcache"]
    assert call.args == (q, k_cache, v_cache)
    kwargs = call.kwargs
    assert kwargs["k"] is k_new and kwargs["v"] is v_new and kwargs["qv"] is None
    assert kwargs["rotary_cos"] is cos and kwargs["rotary_sin"] is sin and kwargs["cache_seqlens"] is seqlens
    assert all(kwargs[name] is value for name, value in tensors.items())
    assert kwargs["scheduler_metadata"] is metadata and kwargs["softmax_scale"] == 16 ** -0.5
    assert (kwargs["max_seqlen_q"], kwargs["causal"], kwargs["window_size"], kwargs["softcap"]) == \
        (1, True, (8, 0), 5.0)
    assert (kwargs["rotary_interleaved"], kwargs["num_splits"], kwargs["pack_gqa"], kwargs["sm_margin"]) == \
        (False, 3, False, 2)
    assert kwargs["return_softmax_lse"] is False
    assert isinstance(out, torch.Tensor) and out.shape == (3, 1, 4, 16)


def test_kvcache_with_lse_returns_upstreams_four_values(fake_mate):
    q, k_cache, v_cache = qkv(seqlen_q=2, seqlen_k=8)
    result = fai.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6, return_softmax_lse=True)
    assert fake_mate["flash_attn_with_kvcache"].kwargs["cache_seqlens"] == 6
    assert isinstance(result, tuple) and len(result) == 4
    out, lse, out_accum, lse_accum = result
    assert out.shape == (2, 2, 4, 16) and lse.shape == (2, 4, 2)
    for accumulator in (out_accum, lse_accum):
        assert accumulator.numel() == 0 and accumulator.dtype == torch.float32 and accumulator.device == out.device
    o, softmax_lse, *rest = result  # how serving stacks unpack it
    assert len(rest) == 2


def test_scheduler_metadata_translation(fake_mate):
    seqlens = torch.tensor([5, 7], dtype=torch.int32)
    cu_q, cu_new, leftpad = (torch.zeros(3, dtype=torch.int32) for _ in range(3))
    result = fai.get_scheduler_metadata(2, 1, 64, 8, 2, 128, seqlens, torch.float16, 64, cu_q, cu_new, leftpad,
                                        16, 1, True, (32, 0), 0, True, 4, True, 3)
    call = fake_mate["get_scheduler_metadata"]
    assert call.args == (2, 1, 64, 8, 2, 128)
    assert call.kwargs == dict(
        seqused_k=seqlens, qkv_dtype=torch.float16, headdim_v=64, cu_seqlens_q=cu_q, cu_seqlens_k_new=cu_new,
        cache_leftpad=leftpad, page_size=16, max_seqlen_k_new=1, causal=True, window_size=(32, 0), attention_chunk=0,
        has_softcap=True, num_splits=4, pack_gqa=True, mp_margin=3)
    assert torch.equal(result, torch.arange(7, dtype=torch.int32))


def test_scheduler_metadata_defaults(fake_mate):
    fai.get_scheduler_metadata(2, 1, 64, 8, 2, 128, torch.tensor([5, 7], dtype=torch.int32))
    kwargs = fake_mate["get_scheduler_metadata"].kwargs
    assert kwargs["qkv_dtype"] == torch.bfloat16 and kwargs["headdim_v"] is None and kwargs["page_size"] is None
    assert (kwargs["max_seqlen_k_new"], kwargs["num_splits"], kwargs["mp_margin"]) == (0, 0, 0)


def test_combine_translation(fake_mate):
    out_partial, lse_partial = torch.randn(3, 2, 4, 5, 8), torch.randn(3, 2, 4, 5)
    out = torch.empty(2, 4, 5, 8)
    result = fai.flash_attn_combine(out_partial, lse_partial, out, torch.float32)
    call = fake_mate["flash_attn_combine"]
    assert call.args == (out_partial, lse_partial) and call.kwargs == dict(out=out, out_dtype=torch.float32)
    assert isinstance(result, tuple) and len(result) == 2


def test_low_level_forward_routes_to_varlen(fake_mate):
    q, k, v = (t.flatten(0, 1) for t in qkv())
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32)
    page_table, metadata = torch.zeros(2, 1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    out_ = torch.empty(6, 4, 16, dtype=torch.bfloat16)
    result = fai._flash_attn_forward(q, k, v, None, None, None, out_, cu_q, cu_k, None, None, None, 4, 6, page_table,
                                     softmax_scale=None, causal=True, window_size_left=3, window_size_right=0,
                                     scheduler_metadata=metadata)
    kwargs = fake_mate["flash_attn_varlen_func"].kwargs
    assert kwargs["out"] is out_ and kwargs["page_table"] is page_table and kwargs["scheduler_metadata"] is metadata
    assert kwargs["window_size"] == (3, 0) and kwargs["return_softmax_lse"] is True and kwargs["num_splits"] == 1
    assert kwargs["softmax_scale"] == 16 ** -0.5
    assert not fake_mate["flash_attn_with_kvcache"].calls
    assert isinstance(result, tuple) and len(result) == 4 and result[2].numel() == 0 and result[3].numel() == 0


def test_low_level_forward_routes_appends_to_kvcache(fake_mate):
    q, k_cache, v_cache = qkv(seqlen_q=1, seqlen_k=8)
    k_new, v_new = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    seqlens, batch_idx = torch.tensor([3, 4], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32)
    out_ = torch.full((2, 1, 4, 16), float("nan"))
    result = fai._flash_attn_forward(q, k_cache, v_cache, k_new, v_new, out_=out_, seqused_k=seqlens,
                                     kv_batch_idx=batch_idx, softmax_scale=0.3, num_splits=2)
    kwargs = fake_mate["flash_attn_with_kvcache"].kwargs
    assert kwargs["k"] is k_new and kwargs["v"] is v_new and kwargs["cache_seqlens"] is seqlens
    assert kwargs["cache_batch_idx"] is batch_idx and kwargs["softmax_scale"] == 0.3 and kwargs["num_splits"] == 2
    assert kwargs["return_softmax_lse"] is True
    assert result[0] is out_ and not out_.isnan().any()
    assert len(result) == 4


def test_low_level_forward_rejects_what_mate_cannot_take(fake_mate):
    q, k_cache, v_cache = qkv(seqlen_q=1, seqlen_k=8)
    with pytest.raises(NotImplementedError, match="seqused_q"):
        fai._flash_attn_forward(q, k_cache, v_cache, torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16),
                                seqused_q=torch.ones(2, dtype=torch.int32))


@pytest.mark.parametrize("return_attn_probs", [False, True])
@pytest.mark.parametrize("function", ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func"])
def test_backward_raises(fake_mate, function, return_attn_probs):
    q, k, v = qkv(seqlen_k=3, heads_k=4)
    if function == "flash_attn_func":
        q.requires_grad_()
        result = fai.flash_attn_func(q, k, v, return_attn_probs=return_attn_probs)
    elif function == "flash_attn_varlen_func":
        cu = torch.tensor([0, 2, 6], dtype=torch.int32)
        k = k.flatten(0, 1).requires_grad_()
        result = fai.flash_attn_varlen_func(q.flatten(0, 1), k, v.flatten(0, 1), cu, cu, 4, 4,
                                            return_attn_probs=return_attn_probs)
    else:
        packed = torch.stack([q, k, v], dim=2).requires_grad_()
        result = fai.flash_attn_qkvpacked_func(packed, return_attn_probs=return_attn_probs)
    out = result[0] if return_attn_probs else result
    assert out.requires_grad
    with pytest.raises(NotImplementedError, match=BACKWARD_MESSAGE):
        out.float().sum().backward()
    if return_attn_probs:
        with pytest.raises(NotImplementedError, match=BACKWARD_MESSAGE):
            result[1].sum().backward()


def test_no_graph_without_grad(fake_mate):
    q, k, v = qkv()
    assert not fai.flash_attn_func(q, k, v).requires_grad


def test_low_level_backward_raises():
    tensors = [torch.randn(1, 2, 1, 8) for _ in range(5)]
    with pytest.raises(NotImplementedError, match=BACKWARD_MESSAGE):
        fai._flash_attn_backward(*tensors, torch.randn(1, 1, 2))


def test_missing_mate_function_is_named(monkeypatch):
    monkeypatch.delattr(mha_interface, "flash_attn_varlen_func", raising=False)
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="mate.mha_interface.flash_attn_varlen_func"):
        fai.flash_attn_func(q, k, v)
