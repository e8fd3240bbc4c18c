"""The GEMM launchers on the CPU: on a fake GPU with the kernels recorded, every call hands its
kernel arguments that fit the TileLang signature (dtypes, ranks, sizes, strides, scalars), for
dense, M-grouped contiguous and masked FP8 GEMMs and the BF16 GEMM layouts."""

import pytest
import torch

pytest.importorskip("tilelang")

import mate.gemm  # noqa: E402
from mate.ops.gemm import api, layouts, support  # noqa: E402
from mate.testing import kernels as kernel_checks  # noqa: E402


def _fp8_a(rows, k):
    return layouts.per_token_cast_to_fp8(torch.randn(rows, k), use_ue8m0=False)


def _fp8_b(n, k):
    return layouts.per_block_cast_to_fp8(torch.randn(n, k), use_ue8m0=False)


def _check(calls, count=1):
    assert len(calls) == count
    for call in calls:
        kernel_checks.assert_call_matches_signature(call)


@pytest.mark.parametrize("m,n,k", [(1, 2112, 512), (64, 384, 256), (300, 1024, 384), (4096, 512, 256)])
def test_fp8_gemm_nt(monkeypatch, m, n, k):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    a, b = _fp8_a(m, k), _fp8_b(n, k)
    api.fp8_gemm_nt(a, b, torch.empty(m, n, dtype=torch.bfloat16))
    # Scales already in DeepGEMM's MN-major, TMA-aligned layout take the same path.
    api.fp8_gemm_nt((a[0], layouts.get_mn_major_tma_aligned_tensor(a[1])), b, torch.empty(m, n, dtype=torch.bfloat16))
    _check(calls, 2)


def test_m_grouped_contiguous_and_masked(monkeypatch):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    groups, n, k = 4, 512, 256
    m_indices = torch.arange(groups, dtype=torch.int32).repeat_interleave(128)
    a = _fp8_a(groups * 128, k)
    b_rows = [_fp8_b(n, k) for _ in range(groups)]
    b = torch.stack([x[0] for x in b_rows]), torch.stack([x[1] for x in b_rows])
    api.m_grouped_fp8_gemm_nt_contiguous(a, b, torch.empty(groups * 128, n, dtype=torch.bfloat16), m_indices)
    max_m = 256
    a_masked = _fp8_a(groups * max_m, k)
    a_masked = a_masked[0].view(groups, max_m, k), a_masked[1].view(groups, max_m, -1)
    masked_m = torch.tensor([0, 100, 256, 7], dtype=torch.int32)
    api.m_grouped_fp8_gemm_nt_masked(a_masked, b, torch.empty(groups, max_m, n, dtype=torch.bfloat16), masked_m, 96)
    _check(calls, 2)


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
def test_bf16_gemm_layouts(monkeypatch, layout):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    m, n, k = 200, 384, 256
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    a_arg = a if layout[0] == "n" else a.T.contiguous()
    b_arg = b if layout[1] == "t" else b.T.contiguous()
    getattr(api, f"bf16_gemm_{layout}")(a_arg, b_arg, torch.empty(m, n, dtype=torch.float32))
    _check(calls)


def test_bmm_fp16(monkeypatch):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    a = torch.randn(3, 100, 256, dtype=torch.float16)
    b = torch.randn(3, 256, 512, dtype=torch.float16)
    mate.gemm.bmm_fp16(a, b, torch.float16)
    _check(calls)


@pytest.mark.parametrize("layout", ["nt", "tn"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_bf16_gemm_with_c(monkeypatch, layout, out_dtype):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    m, n, k = 200, 384, 256
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    d = torch.randn(m, n).to(out_dtype)
    c = torch.randn(m, n).to(out_dtype)
    a_arg, b_arg = (a, b) if layout == "nt" else (a.T.contiguous(), b.T.contiguous())
    getattr(api, f"bf16_gemm_{layout}")(a_arg, b_arg, d, c=c)
    assert torch.equal(d, c)  # C is copied into D, which the kernel accumulates into
    getattr(api, f"bf16_gemm_{layout}")(a_arg, b_arg, d, c=d)
    _check(calls, 2)
    assert all(call.variant["accumulate"] for call in calls)


def test_bmm_fp16_with_c(monkeypatch):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    a = torch.randn(3, 100, 256, dtype=torch.bfloat16)
    b = torch.randn(3, 256, 512, dtype=torch.bfloat16)
    c = torch.randn(3, 100, 512)
    mate.gemm.bmm_fp16(a, b, torch.float32, c=c)
    mate.gemm.bmm_fp16(a, b, torch.bfloat16, c=c)  # accumulates in a float32 staging tensor
    _check(calls, 2)
    assert all(call.variant["out_dtype"] == torch.float32 and call.variant["accumulate"] for call in calls)


@pytest.mark.parametrize("b_major", ["K", "MN"])
def test_m_grouped_bf16(monkeypatch, b_major):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    groups, n, k = 3, 384, 256
    m_indices = torch.arange(groups, dtype=torch.int32).repeat_interleave(128)
    m_indices[100:128] = -1
    a = torch.randn(groups * 128, k, dtype=torch.bfloat16)
    b = torch.randn(groups, n, k, dtype=torch.bfloat16)
    d = torch.empty(groups * 128, n, dtype=torch.bfloat16)
    if b_major == "K":
        api.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)
    else:
        api.m_grouped_bf16_gemm_nn_contiguous(a, b.transpose(1, 2).contiguous(), d, m_indices)
    max_m = 256
    a3 = torch.randn(groups, max_m, k, dtype=torch.bfloat16)
    masked_m = torch.tensor([0, 100, 256], dtype=torch.int32)
    api.m_grouped_bf16_gemm_nt_masked(a3, b, torch.empty(groups, max_m, n, dtype=torch.bfloat16), masked_m, 128)
    ends = torch.tensor([100, 128, 300], dtype=torch.int32)  # the psum layout: each group's end row
    api.m_grouped_bf16_gemm_nt_contiguous(a, b, d, ends, use_psum_layout=True)
    _check(calls, 3)
    assert [call.variant["layout"] for call in calls] == ["contiguous", "masked", "psum"]
    assert calls[0].variant["major_b"] == b_major


def test_k_grouped_bf16(monkeypatch):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    ks, m, n = [256, 0, 128], 96, 200
    a = torch.randn(sum(ks), m, dtype=torch.bfloat16)
    b = torch.randn(sum(ks), n, dtype=torch.bfloat16)
    d = torch.randn(len(ks), m, n)
    api.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, torch.tensor(ks, dtype=torch.int32), c=d)
    _check(calls)
    assert calls[0].variant["layout"] == "k_grouped"


def _k_grouped_fp8(ks, mn):
    """Per-channel FP8 operands of the groups' (K_g, mn) blocks: data (ΣK, mn), scales (ΣK/128, mn)."""
    x = torch.randn(sum(ks), mn)
    return layouts.per_channel_cast_to_fp8(x, use_ue8m0=False)


@pytest.mark.parametrize("m", [96, 130])  # 130: scales copied to 16-byte rows
def test_k_grouped_fp8(monkeypatch, m):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    ks, n = [256, 0, 128], 200
    (a, sfa), (b, sfb) = _k_grouped_fp8(ks, m), _k_grouped_fp8(ks, n)
    grouped_layout = torch.tensor(ks, dtype=torch.int32)
    d = torch.randn(len(ks), m, n)
    api.k_grouped_fp8_gemm_tn_contiguous((a, sfa), (b, sfb), d, ks, grouped_layout, c=d)
    flat_a = torch.cat([blk.T.flatten() for blk in a.split(ks)])
    flat_b = torch.cat([blk.T.flatten() for blk in b.split(ks)])
    api.k_grouped_fp8_gemm_nt_contiguous((flat_a, sfa.T), (flat_b, sfb.T), d, ks, grouped_layout, c=d)
    info = torch.tensor(ks, dtype=torch.int64)
    mate.gemm.ragged_k_moe_gemm_8bit((a, sfa), (b, sfb), info, d)  # default: M / N major
    mate.gemm.ragged_k_moe_gemm_8bit((a.T.contiguous().T, sfa), (b.T.contiguous().T, sfb), info, d,
                                     major_a_mode="K", major_b_mode="K")
    _check(calls, 4)


@pytest.mark.parametrize("op_name", [op.name for op in support.OPS])
def test_check_cases_reach_their_kernels(monkeypatch, op_name):
    """`mate check`'s case of each GEMM op runs that op's kernel (on a GPU) with fitting arguments."""
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    op = next(op for op in support.OPS if op.name == op_name)
    run, _ = op.check_case(torch.device("cpu"))
    run()
    _check(calls)
    assert calls[0].op == op_name
