"""The attention launchers on the CPU: public calls on a fake GPU with the kernels recorded; every
kernel (prefill, decode, combine, append) gets arguments that fit its TileLang signature."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("head_dim, head_dim_v", [(128, 128), (80, 80), (192, 128)])
@pytest.mark.parametrize("extras", ["", "seqused-sink", "window-softcap"])
def test_prefill_varlen(monkeypatch, dtype, head_dim, head_dim_v, extras):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator(f"launch-prefill{dtype}{head_dim}{extras}")
    cu_q = torch.tensor([0, 5, 70, 100], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 90, 200], dtype=torch.int32)
    q = _randn(gen, 100, 4, head_dim, dtype=dtype)
    k, v = _randn(gen, 200, 2, head_dim, dtype=dtype), _randn(gen, 200, 2, head_dim_v, dtype=dtype)
    kwargs = {}
    if dtype == torch.float8_e4m3fn:
        kwargs.update(q_descale=torch.rand(3, 2), v_descale=torch.rand(3, 2))  # k_descale defaults to 1
    if "seqused" in extras:
        kwargs.update(seqused_q=torch.tensor([5, 60, 30], dtype=torch.int32),
                      seqused_k=torch.tensor([40, 45, 110], dtype=torch.int32), learnable_sink=torch.randn(4))
    if "window" in extras:
        kwargs.update(window_size=(32, 8), softcap=5.0)
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, 65, 110, causal=True, **kwargs)
    _check(calls, ["fmha.attention_forward"] + (["fmha.fp8_v_transpose"] if dtype == torch.float8_e4m3fn else []))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("page_size", [None, 1, 64])
@pytest.mark.parametrize("seqlen_q", [1, 40])
def test_kvcache_with_append_and_rotary(monkeypatch, dtype, page_size, seqlen_q):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator(f"launch-kvcache{dtype}{page_size}{seqlen_q}")
    batch, heads, heads_k, d, capacity = 2, 8, 2, 128, 256
    if page_size is None:
        k_cache, v_cache = (_randn(gen, batch, capacity, heads_k, d, dtype=dtype) for _ in range(2))
        page_table = None
    else:
        pages = capacity // page_size
        k_cache, v_cache = (_randn(gen, batch * pages, page_size, heads_k, d, dtype=dtype) for _ in range(2))
        page_table = torch.randperm(batch * pages, generator=gen).to(torch.int32).view(batch, pages)
    q = _randn(gen, batch, seqlen_q, heads, d, dtype=dtype)
    k_new, v_new = (_randn(gen, batch, seqlen_q, heads_k, d, dtype=dtype) for _ in range(2))
    angles = torch.rand(capacity, d // 2, generator=gen)
    cache_seqlens = torch.tensor([100, 7], dtype=torch.int32)
    flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=angles.cos().to(dtype),
                            rotary_sin=angles.sin().to(dtype), cache_seqlens=cache_seqlens,
                            page_table=page_table, causal=True, num_splits=3)
    prefill = ("fmha.attention_forward",) + (("fmha.fp8_v_transpose",) if dtype == torch.float8_e4m3fn else ())
    decode_or_prefill = ("fmha.decode_splitkv", "fmha.flash_attn_combine") if page_table is not None or seqlen_q <= 8 \
        else prefill  # 3 splits: the decode kernel's partials are combined
    _check(calls, ["fmha.kvcache_append", *decode_or_prefill])


@pytest.mark.parametrize("total_q, max_seqlen_q, ops", [
    (20, 17, ["fmha.fp8_v_transpose", "fmha.attention_forward"]),  # prefill
    (11, 8, ["fmha.decode_splitkv"]),  # decode-size, one split: no combine
])
def test_fp8_varlen_packed_keys(monkeypatch, total_q, max_seqlen_q, ops):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator("launch-fp8")
    cu_q = torch.tensor([0, 3, total_q], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 30], dtype=torch.int32)
    q, k, v = (_randn(gen, n, 2, 64, dtype=torch.float8_e4m3fn) for n in (total_q, 30, 30))
    descale = torch.rand(2, 2)
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q, 21, causal=True, q_descale=descale,
                           k_descale=descale, v_descale=descale)
    _check(calls, ops)


@pytest.mark.parametrize("seqlen_q", [40, 4])
def test_fp8_fixed_length_and_dense_cache(monkeypatch, seqlen_q):
    # Fixed-length FP8 prefill, and a dense FP8 cache with cache_seqlens / leftpad / batch_idx:
    # the prefill kernel for more than 8 queries, the decode kernel up to 8.
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator(f"launch-fp8-fixed{seqlen_q}")
    fp8 = torch.float8_e4m3fn
    q, k, v = (_randn(gen, 2, n, 4, 128, dtype=fp8) for n in (seqlen_q, 64, 64))
    flash_attn_varlen_func(q, k[:, :, :2], v[:, :, :2], q_descale=torch.rand(2, 2))
    prefill = ["fmha.fp8_v_transpose", "fmha.attention_forward"]
    decode = ["fmha.decode_splitkv"]  # one split: no combine
    _check(calls, prefill if seqlen_q > 8 else decode)
    calls.clear()
    k_cache, v_cache = (_randn(gen, 3, 96, 2, 128, dtype=fp8) for _ in range(2))
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([70, 50], dtype=torch.int32),
                            cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32),
                            cache_leftpad=torch.tensor([3, 0], dtype=torch.int32), causal=True, num_splits=2)
    _check(calls, prefill if seqlen_q > 8 else decode + ["fmha.flash_attn_combine"])


class _DeviceOps(TorchDispatchMode):
    """Records the torch ops that would launch device work (views and allocations launch none)."""

    ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in self.ALLOCATIONS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_decode_steps_launch_only_their_kernel(monkeypatch):
    # Outside CUDA graphs each extra torch op costs a serving stack ~5 us of host time per layer:
    # a one-split paged decode step (flash_attn_with_kvcache) and vLLM's varlen decode with a block
    # table run the decode kernel and no other device op (no combine, no tile-map ops).
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator("launch-eager-decode")
    batch, heads, heads_k, d, page_size, pages = 3, 8, 2, 128, 16, 4
    k_cache, v_cache = (_randn(gen, batch * pages, page_size, heads_k, d) for _ in range(2))
    page_table = torch.randperm(batch * pages, generator=gen).to(torch.int32).view(batch, pages)
    cache_seqlens = torch.tensor([40, 7, 64], dtype=torch.int32)
    q = _randn(gen, batch, 1, heads, d)
    cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32)
    for call in (lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                                 page_table=page_table, causal=True, num_splits=1),
                 lambda: flash_attn_varlen_func(q.view(batch, heads, d), k_cache, v_cache, cu_seqlens_q, None, 1, 64,
                                                seqused_k=cache_seqlens, page_table=page_table, causal=True,
                                                num_splits=1)):
        call()  # first calls make the cached index vectors
        calls.clear()
        with _DeviceOps() as device_ops:
            call()
        assert device_ops.ops == []
        _check(calls, ["fmha.decode_splitkv"])


def test_eager_prefill_of_one_sequence_launches_one_index_op(monkeypatch):
    # Hugging Face's prefill (flash_attn_func: fixed length, batch 1, self-attention): one cu_seqlens
    # for queries and keys, and the kernel's (heads, tokens) LSE is already (1, heads, seqlen): no copy.
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    gen = testing.generator("launch-eager-prefill")
    q, k, v = _randn(gen, 1, 40, 8, 128), _randn(gen, 1, 40, 2, 128), _randn(gen, 1, 40, 2, 128)
    with _DeviceOps() as device_ops:
        flash_attn_varlen_func(q, k, v, causal=True, return_softmax_lse=True)
    assert device_ops.ops == ["aten.arange.start_step"]
    _check(calls, ["fmha.attention_forward"])
    assert calls[0].args[3] is calls[0].args[4]  # cu_seqlens_q is cu_seqlens_k
