"""MATE's own `mate.gemm` API (gemm_fp8_nt_groupwise, bmm_fp8, bmm_fp16 and the 8-bit MoE GEMMs)
on the reference path: each against a naive float64 dequantize-and-multiply, the signatures
against MATE's documentation, and bad inputs."""

import inspect

import pytest
import torch

import mate
import mate.gemm
from mate import dispatch, platform
from mate.ops.gemm import layouts
from mate.ops.gemm.reference import calc_diff

from .helpers import MAX_DIFF, contiguous_layout, fp8_a, fp8_b, naive_dequantize

FP8 = torch.float8_e4m3fn

# The documented signatures: (name, default), inspect.Parameter.empty where there is none.
_ = inspect.Parameter.empty
SIGNATURES = {
    "ragged_m_moe_gemm_8bit": [
        ("input_a", _), ("input_b", _), ("ragged_tokens_info", _), ("out", _), ("gemm_mode", "per_token"),
        ("major_a_mode", "K"), ("major_b_mode", "K"), ("scale_granularity_mnk", None), ("num_mp", None),
        ("alignment_m", None), ("backend", "auto")],
    "ragged_k_moe_gemm_8bit": [
        ("input_a", _), ("input_b", _), ("ragged_tokens_info", _), ("out", _), ("gemm_mode", "per_expert"),
        ("major_a_mode", "M"), ("major_b_mode", "N"), ("scale_granularity_mnk", None), ("num_mp", None)],
    "masked_moe_gemm_8bit": [
        ("input_a", _), ("input_b", _), ("masked_tokens_info", _), ("out", _), ("scale_granularity_mnk", None),
        ("expect_tokens", None), ("enable_overlap", False), ("signal", None), ("backend", "auto")],
    "bmm_fp16": [("a", _), ("b", _), ("out_dtype", _), ("out", None), ("backend", "auto"), ("c", None)],
    "bmm_fp8": [
        ("a", _), ("b", _), ("a_scale", _), ("b_scale", _), ("out_dtype", _), ("out", None), ("backend", "auto"),
        ("scale_granularity_mnk", None), ("output_scale", None), ("c", None), ("major_a_mode", "K"),
        ("major_b_mode", "K")],
    "gemm_fp8_nt_groupwise": [
        ("a", _), ("b", _), ("a_scale", _), ("b_scale", _), ("scale_major_mode", None), ("mma_sm", None),
        ("scale_granularity_mnk", None), ("out", None), ("out_dtype", None), ("backend", "auto"),
        ("output_scale", None)],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_matches_documentation(name):
    fn = getattr(mate.gemm, name)
    assert name in mate.gemm.__all__
    params = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
    assert params == SIGNATURES[name]
    assert fn.__mate_api__ == f"gemm.{name}"


def per_tensor_fp8(x):
    """(fp8 x / s, s) with one float32 scale s per leading index (batch)."""
    amax = x.float().abs().flatten(1).amax(1).clamp(min=1e-4)
    scale = amax / 448.0
    return (x.float() / scale[:, None, None]).to(FP8), scale


def naive(a64, b64):
    """sum over K of a64[..., m, None, k] * b64[..., None, n, k] (no matmul)."""
    return (a64.unsqueeze(-2) * b64.unsqueeze(-3)).sum(-1)


# ---- dense ---------------------------------------------------------------------------------

@pytest.mark.parametrize("gran_n", [128, 1])
@pytest.mark.parametrize("scale_major_mode", ["K", "MN"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gemm_fp8_nt_groupwise(gran_n, scale_major_mode, out_dtype):
    m, n, k = 40, 256, 384
    _, (a, sfa) = fp8_a(m, k)
    _, (b, sfb) = fp8_b(n, k, per_channel=gran_n == 1)
    expected = naive(naive_dequantize(a, sfa, 1, 128), naive_dequantize(b, sfb, gran_n, 128))
    a_scale, b_scale = (sfa, sfb) if scale_major_mode == "K" else (sfa.T.contiguous(), sfb.T.contiguous())
    result = mate.gemm.gemm_fp8_nt_groupwise(a, b, a_scale, b_scale, scale_major_mode=scale_major_mode,
                                             scale_granularity_mnk=(1, gran_n, 128), out_dtype=out_dtype)
    assert result.dtype == out_dtype and result.shape == (m, n)
    assert calc_diff(result, expected) < MAX_DIFF
    out = torch.full((m, n), float("nan"), dtype=out_dtype)
    returned = mate.gemm.gemm_fp8_nt_groupwise(a, b, a_scale, b_scale, scale_major_mode=scale_major_mode,
                                               scale_granularity_mnk=(1, gran_n, 128), out=out, backend="reference")
    assert returned is out and torch.equal(out, result)


def test_gemm_fp8_nt_groupwise_fp8_output():
    m, n, k = 32, 128, 256
    _, (a, sfa) = fp8_a(m, k)
    _, (b, sfb) = fp8_b(n, k)
    expected = naive(naive_dequantize(a, sfa, 1, 128), naive_dequantize(b, sfb, 128, 128))
    output_scale = torch.tensor([float(expected.abs().max()) / 448.0])
    result = mate.gemm.gemm_fp8_nt_groupwise(a, b, sfa, sfb, output_scale=output_scale)
    assert result.dtype == FP8
    assert calc_diff(result.double() * output_scale.double(), expected) < 0.01


@pytest.mark.parametrize("gran", [(-1, -1, -1), (1, -1, -1), (1, 128, 128), (1, 1, 128)])
@pytest.mark.parametrize("majors", [("K", "K"), ("M", "N")])
def test_bmm_fp8(gran, majors):
    batch, m, n, k = 3, 24, 256, 256
    x, y = torch.randn(batch, m, k), torch.randn(batch, n, k)
    if gran == (-1, -1, -1):
        (a, sfa), (b, sfb) = per_tensor_fp8(x), per_tensor_fp8(y)
        a64, b64 = a.double() * sfa.double()[:, None, None], b.double() * sfb.double()[:, None, None]
    elif gran == (1, -1, -1):
        sfa = x.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0  # one scale per row of A
        a = (x / sfa).to(FP8)
        b, sfb = per_tensor_fp8(y)
        a64, b64 = a.double() * sfa.double(), b.double() * sfb.double()[:, None, None]
    else:
        pairs_a = [layouts.per_token_cast_to_fp8(x[i], use_ue8m0=False) for i in range(batch)]
        cast_b = layouts.per_token_cast_to_fp8 if gran[1] == 1 else layouts.per_block_cast_to_fp8
        pairs_b = [cast_b(y[i], use_ue8m0=False) for i in range(batch)]
        a, sfa = torch.stack([p[0] for p in pairs_a]), torch.stack([p[1] for p in pairs_a])
        b, sfb = torch.stack([p[0] for p in pairs_b]), torch.stack([p[1] for p in pairs_b])
        a64, b64 = naive_dequantize(a, sfa, 1, 128), naive_dequantize(b, sfb, gran[1], 128)
    c = torch.randn(batch, m, n)
    expected = naive(a64, b64) + c.double()
    a_in = a if majors[0] == "K" else a.transpose(1, 2).contiguous()
    b_in = b if majors[1] == "K" else b.transpose(1, 2).contiguous()
    result = mate.gemm.bmm_fp8(a_in, b_in, sfa, sfb, torch.float32, scale_granularity_mnk=gran, c=c,
                               major_a_mode=majors[0], major_b_mode=majors[1])
    assert result.shape == (batch, m, n) and result.dtype == torch.float32
    assert calc_diff(result, expected) < MAX_DIFF
    out = torch.empty(batch, m, n, dtype=torch.bfloat16)
    assert mate.gemm.bmm_fp8(a_in, b_in, sfa, sfb, torch.bfloat16, out=out, scale_granularity_mnk=gran,
                             major_a_mode=majors[0], major_b_mode=majors[1]) is out
    assert calc_diff(out, naive(a64, b64)) < MAX_DIFF


def test_bmm_fp8_per_tensor_scalar_scales():
    x, y = torch.randn(1, 16, 128), torch.randn(1, 64, 128)
    (a, sfa), (b, sfb) = per_tensor_fp8(x), per_tensor_fp8(y)
    expected = naive(a.double() * float(sfa), b.double() * float(sfb))
    result = mate.gemm.bmm_fp8(a, b, sfa.reshape(()), sfb.reshape(()), torch.bfloat16)
    assert calc_diff(result, expected) < MAX_DIFF


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bmm_fp16(dtype):
    a, b, c = torch.randn(2, 20, 64, dtype=dtype), torch.randn(2, 64, 48, dtype=dtype), torch.randn(2, 20, 48)
    expected = naive(a.double(), b.double().transpose(1, 2))
    result = mate.gemm.bmm_fp16(a, b, torch.float32)
    assert calc_diff(result, expected) < 1e-6
    out = torch.empty(2, 20, 48, dtype=dtype)
    assert mate.gemm.bmm_fp16(a, b, dtype, out=out, c=c) is out
    assert calc_diff(out, expected + c.double()) < 1e-4


# ---- MoE -----------------------------------------------------------------------------------

def _experts(num_expert, n, k, per_channel=False):
    pairs = [fp8_b(n, k, per_channel)[1] for _ in range(num_expert)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@pytest.mark.parametrize("gemm_mode", ["per_token", "psum_expert", "per_expert"])
@pytest.mark.parametrize("gran_n", [128, 1])
def test_ragged_m_moe_gemm_8bit(gemm_mode, gran_n):
    num_expert, n, k = 3, 256, 256
    layout, actual, aligned = contiguous_layout(num_expert, 100)
    total = sum(aligned)
    _, (a, sfa) = fp8_a(total, k)
    b, sfb = _experts(num_expert, n, k, per_channel=gran_n == 1)
    a64, b64 = naive_dequantize(a, sfa, 1, 128), naive_dequantize(b, sfb, gran_n, 128)
    expected = torch.zeros(total, n, dtype=torch.float64)
    for row, expert in enumerate(layout.tolist()):
        if expert >= 0:
            expected[row] = naive(a64[row:row + 1], b64[expert])[0]
    starts = [0] + torch.tensor(aligned).cumsum(0)[:-1].tolist()
    ends = torch.tensor([start + m for start, m in zip(starts, actual, strict=True)])
    info = {"per_token": layout, "psum_expert": ends.to(torch.int32),
            "per_expert": torch.tensor(actual, dtype=torch.int32)}[gemm_mode]
    out = torch.full((total, n), float("nan"), dtype=torch.bfloat16)
    result = mate.gemm.ragged_m_moe_gemm_8bit((a, sfa), (b, sfb), info, out, gemm_mode=gemm_mode,
                                              scale_granularity_mnk=(1, gran_n, 128))
    assert result is out
    assert calc_diff(out, expected) < MAX_DIFF
    assert not out.float().isnan().any()


def test_ragged_m_moe_gemm_8bit_major_modes_and_alignment():
    num_expert, n, k = 2, 128, 128
    counts = [100, 60]
    total = 256 + 60
    _, (a, sfa) = fp8_a(total, k)
    b, sfb = _experts(num_expert, n, k)
    a_m = a.T.contiguous().T  # (total, k) with the token dimension contiguous
    b_n = b.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.empty(total, n, dtype=torch.float16)
    mate.gemm.ragged_m_moe_gemm_8bit((a_m, sfa), (b_n, sfb), torch.tensor(counts, dtype=torch.int32), out,
                                     gemm_mode="per_expert", major_a_mode="M", major_b_mode="N", alignment_m=256)
    a64, b64 = naive_dequantize(a, sfa, 1, 128), naive_dequantize(b, sfb, 128, 128)
    assert calc_diff(out[:100], naive(a64[:100], b64[0])) < MAX_DIFF
    assert calc_diff(out[256:], naive(a64[256:], b64[1])) < MAX_DIFF
    assert not out[100:256].any()


def test_ragged_k_moe_gemm_8bit_accumulates():
    m, n = 64, 128
    counts = [128, 0, 256]
    k = sum(counts) + 128  # a tail of unused tokens
    x, y = torch.randn(k, m, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    a, sfa = layouts.per_channel_cast_to_fp8(x, use_ue8m0=False)  # (k, m), scales (k / 128, m)
    b, sfb = layouts.per_channel_cast_to_fp8(y, use_ue8m0=False)
    a64 = naive_dequantize(a.T, sfa.T, 1, 128).T
    b64 = naive_dequantize(b.T, sfb.T, 1, 128).T
    out = torch.randn(len(counts), m, n)
    expected = out.double().clone()
    start = 0
    for expert, count in enumerate(counts):
        expected[expert] += naive(a64[start:start + count].T, b64[start:start + count].T)
        start += count
    result = mate.gemm.ragged_k_moe_gemm_8bit((a, sfa), (b, sfb), torch.tensor(counts, dtype=torch.int32), out)
    assert result is out
    assert calc_diff(out, expected) < MAX_DIFF


@pytest.mark.parametrize("gran_n", [128, 1])
def test_masked_moe_gemm_8bit(gran_n):
    num_expert, max_m, n, k = 3, 96, 256, 256
    counts = [96, 0, 37]
    pairs = [fp8_a(max_m, k)[1] for _ in range(num_expert)]
    a, sfa = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    b, sfb = _experts(num_expert, n, k, per_channel=gran_n == 1)
    a64, b64 = naive_dequantize(a, sfa, 1, 128), naive_dequantize(b, sfb, gran_n, 128)
    info = torch.tensor(counts, dtype=torch.int32)
    out = torch.full((num_expert, max_m, n), float("nan"), dtype=torch.bfloat16)
    result = mate.gemm.masked_moe_gemm_8bit((a, sfa), (b, sfb), info, out, scale_granularity_mnk=(1, gran_n, 128),
                                            expect_tokens=48)
    assert result is out
    for expert, count in enumerate(counts):
        assert calc_diff(out[expert, :count], naive(a64[expert, :count], b64[expert])) < MAX_DIFF
        assert out[expert, count:].float().isnan().all()  # rows past the count are left alone

    fresh = mate.gemm.masked_moe_gemm_8bit((a, sfa), (b, sfb), info, None, scale_granularity_mnk=(1, gran_n, 128))
    assert fresh.shape == (num_expert, max_m, n) and torch.equal(fresh[0], out[0])


def test_masked_moe_gemm_8bit_overlap_signal():
    num_expert, max_m, n, k = 2, 130, 256, 128
    counts = [130, 65]
    pairs = [fp8_a(max_m, k)[1] for _ in range(num_expert)]
    a, sfa = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    b, sfb = _experts(num_expert, n, k)
    out = torch.zeros(num_expert, max_m, n, dtype=torch.float16)
    result, signal, block_m, threshold = mate.gemm.masked_moe_gemm_8bit(
        (a, sfa), (b, sfb), torch.tensor(counts, dtype=torch.int32), out, enable_overlap=True)
    assert result is out and block_m == 64 and threshold == 2
    assert signal.dtype == torch.int32 and signal.shape == (num_expert * 3,)
    assert signal.tolist() == [2, 2, 2, 2, 2, 0]  # expert 0: 3 blocks done; expert 1: 65 rows = 2 blocks
    given = torch.full((6,), -1, dtype=torch.int32)
    _, same, _, _ = mate.gemm.masked_moe_gemm_8bit((a, sfa), (b, sfb), torch.tensor(counts, dtype=torch.int32), out,
                                                   enable_overlap=True, signal=given)
    assert same is given and given.tolist() == signal.tolist()
    assert isinstance(mate.gemm.masked_moe_gemm_8bit((a, sfa), (b, sfb), torch.tensor(counts, dtype=torch.int32),
                                                     out), torch.Tensor)


# ---- bad inputs and backends -----------------------------------------------------------------

def _masked_inputs(num_expert=2, max_m=64, n=128, k=128):
    pairs = [fp8_a(max_m, k)[1] for _ in range(num_expert)]
    a = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
    return a, _experts(num_expert, n, k), torch.tensor([max_m] * num_expert, dtype=torch.int32)


def test_bad_inputs_dense():
    _, (a, sfa) = fp8_a(32, 256)
    _, (b, sfb) = fp8_b(128, 256)
    with pytest.raises(TypeError, match="a: dtype bfloat16"):
        mate.gemm.gemm_fp8_nt_groupwise(a.to(torch.bfloat16), b, sfa, sfb)
    with pytest.raises(ValueError, match=r"a_scale: expected shape \(32, 2\)"):
        mate.gemm.gemm_fp8_nt_groupwise(a, b, sfa[:, :1].contiguous(), sfb)
    with pytest.raises(ValueError, match=r"b_scale: expected shape \(2, 1\)"):
        mate.gemm.gemm_fp8_nt_groupwise(a, b, sfa.T.contiguous(), sfb, scale_major_mode="MN")
    with pytest.raises(ValueError, match="scale_major_mode"):
        mate.gemm.gemm_fp8_nt_groupwise(a, b, sfa, sfb, scale_major_mode="N")
    with pytest.raises(ValueError, match="mma_sm"):
        mate.gemm.gemm_fp8_nt_groupwise(a, b, sfa, sfb, mma_sm=2)
    with pytest.raises(ValueError, match="scale_granularity_mnk"):
        mate.gemm.gemm_fp8_nt_groupwise(a, b, sfa, sfb, scale_granularity_mnk=(1, 64, 128))
    with pytest.raises(TypeError, match="out: dtype bfloat16"):
        mate.gemm.gemm_fp8_nt_groupwise(a, b, sfa, sfb, out=torch.empty(32, 128, dtype=torch.bfloat16),
                                        output_scale=torch.ones(1))
    with pytest.raises(TypeError, match="out_dtype"):
        mate.gemm.gemm_fp8_nt_groupwise(a, b, sfa, sfb, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        mate.gemm.gemm_fp8_nt_groupwise(a, b, sfa, sfb, backend="cutlass")
    a3, b3 = a.unsqueeze(0), b.unsqueeze(0)
    with pytest.raises(ValueError, match="a_scale: expected 1 scales"):
        mate.gemm.bmm_fp8(a3, b3, torch.ones(2), torch.ones(1), torch.bfloat16)
    with pytest.raises(ValueError, match="major_a_mode"):
        mate.gemm.bmm_fp8(a3, b3, torch.ones(1), torch.ones(1), torch.bfloat16, major_a_mode="N")
    with pytest.raises(ValueError, match="b: major_b_mode='K' needs dimension 2 contiguous"):
        mate.gemm.bmm_fp8(a3, b3.transpose(1, 2).contiguous().transpose(1, 2), torch.ones(1), torch.ones(1),
                          torch.bfloat16)
    with pytest.raises(TypeError, match="out_dtype"):
        mate.gemm.bmm_fp8(a3, b3, torch.ones(1), torch.ones(1), torch.int8)
    with pytest.raises(ValueError, match=r"c: expected shape \(1, 32, 128\)"):
        mate.gemm.bmm_fp8(a3, b3, torch.ones(1), torch.ones(1), torch.bfloat16, c=torch.zeros(1, 32, 64))
    half = torch.zeros(1, 4, 8, dtype=torch.float16)
    with pytest.raises(TypeError, match="b: dtype bfloat16"):
        mate.gemm.bmm_fp16(half, torch.zeros(1, 8, 4, dtype=torch.bfloat16), torch.float16)
    with pytest.raises(ValueError, match=r"b: expected shape \(1, 8, n\)"):
        mate.gemm.bmm_fp16(half, torch.zeros(1, 4, 8, dtype=torch.float16), torch.float16)


def test_bad_inputs_moe():
    a, b, info = _masked_inputs()
    out = torch.empty(2, 64, 128, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="input_a: expected a .fp8_tensor, scale_tensor. pair"):
        mate.gemm.masked_moe_gemm_8bit(a[0], b, info, out)
    with pytest.raises(ValueError, match=r"masked_tokens_info: token counts must be in \[0, 64\]"):
        mate.gemm.masked_moe_gemm_8bit(a, b, torch.tensor([65, 1], dtype=torch.int32), out)
    with pytest.raises(TypeError, match="masked_tokens_info: dtype float32"):
        mate.gemm.masked_moe_gemm_8bit(a, b, info.float(), out)
    with pytest.raises(ValueError, match=r"signal: expected shape \(2,\)"):
        mate.gemm.masked_moe_gemm_8bit(a, b, info, out, enable_overlap=True, signal=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="out: dtype float32"):
        mate.gemm.masked_moe_gemm_8bit(a, b, info, out.float())
    with pytest.raises(ValueError, match=r"input_b\[1\]: expected shape \(2, 1, 1\)"):
        mate.gemm.masked_moe_gemm_8bit(a, (b[0], b[1][:, :, :0]), info, out)

    flat = (a[0].reshape(128, 128), a[1].reshape(128, 1))
    out2 = torch.empty(128, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gemm_mode"):
        mate.gemm.ragged_m_moe_gemm_8bit(flat, b, info, out2, gemm_mode="masked")
    with pytest.raises(ValueError, match=r"ragged_tokens_info: expected shape \(128,\)"):
        mate.gemm.ragged_m_moe_gemm_8bit(flat, b, info, out2)
    with pytest.raises(ValueError, match="ragged_tokens_info: expert indices"):
        mate.gemm.ragged_m_moe_gemm_8bit(flat, b, torch.full((128,), 2, dtype=torch.int32), out2)
    with pytest.raises(ValueError, match="ragged_tokens_info: the experts need 192 rows"):
        mate.gemm.ragged_m_moe_gemm_8bit(flat, b, torch.tensor([100, 64], dtype=torch.int32), out2,
                                         gemm_mode="per_expert")
    with pytest.raises(ValueError, match="alignment_m"):
        mate.gemm.ragged_m_moe_gemm_8bit(flat, b, info, out2, gemm_mode="per_expert", alignment_m=64)
    with pytest.raises(ValueError, match="input_a\\[0\\]: major_a_mode='M' needs dimension 0"):
        mate.gemm.ragged_m_moe_gemm_8bit(flat, b, info, out2, gemm_mode="per_expert", major_a_mode="M")

    ka = (torch.zeros(256, 64, dtype=FP8), torch.ones(2, 64))
    kb = (torch.zeros(256, 32, dtype=FP8), torch.ones(2, 32))
    kout = torch.zeros(2, 64, 32)
    with pytest.raises(ValueError, match="ragged_tokens_info: token counts must be non-negative multiples of 128"):
        mate.gemm.ragged_k_moe_gemm_8bit(ka, kb, torch.tensor([100, 156], dtype=torch.int32), kout)
    with pytest.raises(ValueError, match="ragged_tokens_info: the counts sum to 384"):
        mate.gemm.ragged_k_moe_gemm_8bit(ka, kb, torch.tensor([128, 256], dtype=torch.int32), kout)
    with pytest.raises(ValueError, match="scale_granularity_mnk"):
        mate.gemm.ragged_k_moe_gemm_8bit(ka, kb, torch.tensor([128, 128], dtype=torch.int32), kout,
                                         scale_granularity_mnk=(1, 128, 128))
    with pytest.raises(TypeError, match="out: dtype bfloat16"):
        mate.gemm.ragged_k_moe_gemm_8bit(ka, kb, torch.tensor([128, 128], dtype=torch.int32), kout.bfloat16())


@pytest.fixture
def fake_gpu(monkeypatch):
    info = platform.DeviceInfo("cuda", "Fake H100", "sm_90a", 132, 227 * 1024)
    monkeypatch.setattr(platform, "device_info", lambda device=None: info)
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv("MATE_BACKEND", raising=False)
    return info


def test_gpu_without_kernel_raises_unsupported(fake_gpu, monkeypatch):
    monkeypatch.delenv("MATE_ALLOW_REFERENCE_FALLBACK", raising=False)
    a, b, info = _masked_inputs()
    out = torch.empty(2, 64, 128, dtype=torch.float16)
    with pytest.raises(mate.UnsupportedError, match="does not support out_dtype=float16"):
        mate.gemm.masked_moe_gemm_8bit(a, b, info, out)
    with pytest.raises(mate.UnsupportedError, match="does not support n_multiple_of_8=False"):
        mate.gemm.bmm_fp16(torch.zeros(1, 4, 8, dtype=torch.float16), torch.zeros(1, 8, 4, dtype=torch.float16),
                           torch.float16)


def test_gpu_fallback_runs_reference(fake_gpu, monkeypatch):
    monkeypatch.setenv("MATE_ALLOW_REFERENCE_FALLBACK", "1")
    a, b, info = _masked_inputs()
    out = torch.full((2, 64, 128), float("nan"), dtype=torch.float16)
    with pytest.warns(UserWarning, match="running the PyTorch reference because the kernel does not support "
                                         "out_dtype=float16"):
        mate.gemm.masked_moe_gemm_8bit(a, b, info, out)
    assert not out.float().isnan().any()


@pytest.mark.parametrize("backend", ["mubin", "mutlass", "mudnn", "tilelang"])
def test_kernel_backends_raise_unsupported(backend):
    a, b, info = _masked_inputs()
    with pytest.raises(mate.UnsupportedError, match="the tilelang backend needs a GPU"):
        mate.gemm.masked_moe_gemm_8bit(a, b, info, None, backend=backend)
    with pytest.raises(mate.UnsupportedError, match="the tilelang backend needs a GPU"):
        mate.gemm.bmm_fp16(torch.zeros(1, 4, 8, dtype=torch.float16), torch.zeros(1, 8, 4, dtype=torch.float16),
                           torch.float16, backend=backend)


def test_reference_backend_runs_on_a_gpu(fake_gpu, monkeypatch):
    monkeypatch.delenv("MATE_ALLOW_REFERENCE_FALLBACK", raising=False)
    _, (a, sfa) = fp8_a(16, 128)
    _, (b, sfb) = fp8_b(128, 128)
    result = mate.gemm.gemm_fp8_nt_groupwise(a, b, sfa, sfb, backend="reference")
    assert calc_diff(result, naive(naive_dequantize(a, sfa, 1, 128), naive_dequantize(b, sfb, 128, 128))) < MAX_DIFF
