"""The attention launchers on the CPU: public calls on a fake GPU with the kernels recorded; every
kernel (prefill, decode, combine, append) gets arguments that fit its TileLang signature."""

import pytest
import torch

pytest.importorskip("tilelang")

from mate import testing  # noqa: E402
from mate.mha_interface import flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: E402
from mate.testing import kernels as kernel_checks  # noqa: E402


def _randn(gen, *shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen).to(dtype)


def _check(calls, ops):
    assert sorted(call.op for call in calls) == sorted(ops)
    for call in calls:
        kernel_checks.assert_call_matches_signature(call)


@pytest.mark.parametrize("head_dim, head_dim_v", [(128, 128), (80, 80), (192, 128)])
@pytest.mark.parametrize("extras", ["", "seqused-sink", "window-softcap"])
def test_prefill_varlen(monkeypatch, head_dim, head_dim_v, extras):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator(f"launch-prefill{head_dim}{extras}")
    cu_q = torch.tensor([0, 5, 70, 100], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 90, 200], dtype=torch.int32)
    q = _randn(gen, 100, 4, head_dim)
    k, v = _randn(gen, 200, 2, head_dim), _randn(gen, 200, 2, head_dim_v)
    kwargs = {}
    if "seqused" in extras:
        kwargs.update(seqused_q=torch.tensor([5, 60, 30], dtype=torch.int32),
                      seqused_k=torch.tensor([40, 45, 110], dtype=torch.int32), learnable_sink=torch.randn(4))
    if "window" in extras:
        kwargs.update(window_size=(32, 8), softcap=5.0)
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, 65, 110, causal=True, **kwargs)
    _check(calls, ["fmha.attention_forward"])


@pytest.mark.parametrize("page_size", [None, 1, 64])
@pytest.mark.parametrize("seqlen_q", [1, 40])
def test_kvcache_with_append_and_rotary(monkeypatch, page_size, seqlen_q):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator(f"launch-kvcache{page_size}{seqlen_q}")
    batch, heads, heads_k, d, capacity = 2, 8, 2, 128, 256
    if page_size is None:
        k_cache, v_cache = (_randn(gen, batch, capacity, heads_k, d) for _ in range(2))
        page_table = None
    else:
        pages = capacity // page_size
        k_cache, v_cache = (_randn(gen, batch * pages, page_size, heads_k, d) for _ in range(2))
        page_table = torch.randperm(batch * pages, generator=gen).to(torch.int32).view(batch, pages)
    q = _randn(gen, batch, seqlen_q, heads, d)
    k_new, v_new = _randn(gen, batch, seqlen_q, heads_k, d), _randn(gen, batch, seqlen_q, heads_k, d)
    angles = torch.rand(capacity, d // 2, generator=gen)
    cache_seqlens = torch.tensor([100, 7], dtype=torch.int32)
    flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=angles.cos().to(torch.bfloat16),
                            rotary_sin=angles.sin().to(torch.bfloat16), cache_seqlens=cache_seqlens,
                            page_table=page_table, causal=True, num_splits=3)
    decode_or_prefill = ("fmha.decode_splitkv", "fmha.flash_attn_combine") if page_table is not None or seqlen_q <= 8 \
        else ("fmha.attention_forward",)
    _check(calls, ["fmha.kvcache_append", *decode_or_prefill])


def test_fp8_varlen_packed_keys(monkeypatch):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator("launch-fp8")
    cu_q = torch.tensor([0, 3, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 30], dtype=torch.int32)
    q, k, v = (_randn(gen, n, 2, 64, dtype=torch.float8_e4m3fn) for n in (20, 30, 30))
    descale = torch.rand(2, 2)
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 21, causal=True, q_descale=descale, k_descale=descale,
                           v_descale=descale)
    _check(calls, ["fmha.decode_splitkv", "fmha.flash_attn_combine"])
