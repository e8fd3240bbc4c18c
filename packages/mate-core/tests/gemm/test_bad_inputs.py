"""Bad inputs raise errors naming the argument; GPU calls without a kernel raise UnsupportedError."""

import pytest
import torch

import mate
import mate.gemm
from mate import dispatch, platform
from mate.ops.gemm import api, layouts

from .helpers import contiguous_layout, fp8_a, fp8_b


def _ab(m=32, n=128, k=256):
    return fp8_a(m, k)[1], fp8_b(n, k)[1]


def test_wrong_dtypes():
    a, b = _ab()
    d = torch.empty(32, 128, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"a\[0\]: dtype bfloat16"):
        api.fp8_gemm_nt((a[0].to(torch.bfloat16), a[1]), b, d)
    with pytest.raises(TypeError, match=r"b\[1\]: dtype float16"):
        api.fp8_gemm_nt(a, (b[0], b[1].half()), d)
    with pytest.raises(TypeError, match="d: dtype float16"):
        api.fp8_gemm_nt(a, b, d.half())
    with pytest.raises(TypeError, match="c: dtype float32"):
        api.fp8_gemm_nt(a, b, d, torch.zeros(32, 128))
    with pytest.raises(TypeError, match="a: expected a .tensor, scale_factors. pair"):
        api.fp8_gemm_nt(a[0], b, d)
    with pytest.raises(TypeError, match="a: dtype float32"):
        api.bf16_gemm_nt(torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.bfloat16), torch.empty(4, 4))


def test_k_not_multiple_of_128():
    a, b = _ab(k=256)
    a = (a[0][:, :200], a[1])
    b = (b[0][:, :200], b[1])
    with pytest.raises(ValueError, match=r"a\[0\]: K = 200 must be a multiple of 128"):
        api.fp8_gemm_nt(a, b, torch.empty(32, 128, dtype=torch.bfloat16))


def test_shape_mismatches():
    a, b = _ab()
    d = torch.empty(32, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"a\[1\]: expected shape \(32, 2\)"):
        api.fp8_gemm_nt((a[0], a[1][:, :1]), b, d)
    with pytest.raises(ValueError, match=r"b\[1\]: expected shape \(1, 2\)"):
        api.fp8_gemm_nt(a, (b[0], torch.ones(2, 2)), d)
    with pytest.raises(ValueError, match=r"d: expected shape \(32, 128\)"):
        api.fp8_gemm_nt(a, b, torch.empty(32, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="b.T\\[0\\]: K = 128 does not match"):
        api.fp8_gemm_nn(a, b, d)  # b given as (N, K) where nn wants (K, N)
    with pytest.raises(ValueError, match="recipe: give either"):
        api.fp8_gemm_nt(a, b, d, recipe=(1, 128, 128), recipe_a=(1, 128), recipe_b=(128, 128))
    with pytest.raises(NotImplementedError, match="SM100"):
        api.fp8_gemm_nt(a, b, d, recipe=(1, 128, 32))
    with pytest.raises(NotImplementedError, match="SM100"):
        api.fp8_gemm_nt(a, (b[0], b[1].to(torch.int32)), d)
    with pytest.raises(ValueError, match="d: must be row-major"):
        api.fp8_gemm_nt(a, b, torch.empty(128, 32, dtype=torch.bfloat16).T)


def test_contiguous_layout_errors():
    layout, _, _ = contiguous_layout(2, 100)
    m = layout.numel()
    a = fp8_a(m, 128)[1]
    b = (torch.zeros(2, 128, 128, dtype=torch.float8_e4m3fn), torch.ones(2, 1, 1))
    d = torch.empty(m, 128, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="grouped_layout: dtype int64"):
        api.m_grouped_fp8_gemm_nt_contiguous(a, b, d, layout.long())
    with pytest.raises(ValueError, match="grouped_layout: expected shape"):
        api.m_grouped_fp8_gemm_nt_contiguous(a, b, d, layout[:-1])
    with pytest.raises(TypeError, match="d: dtype float32"):
        api.m_grouped_fp8_gemm_nt_contiguous(a, b, d.float(), layout)
    short = fp8_a(m - 8, 128)[1]
    with pytest.raises(ValueError, match="a: M = .* must be a multiple of 128"):
        api.m_grouped_fp8_gemm_nt_contiguous(short, b, d[:-8], layout[:-8])
    mixed = layout.clone()
    mixed[:] = 0
    mixed[64:128] = 1
    with pytest.raises(ValueError, match="grouped_layout: rows 0..127 mix groups"):
        api.m_grouped_fp8_gemm_nt_contiguous(a, b, d, mixed)
    bad = layout.clone()
    bad[0] = 5
    with pytest.raises(ValueError, match=r"grouped_layout: group indices must be in \[-1, 2\)"):
        api.m_grouped_fp8_gemm_nt_contiguous(a, b, d, bad)


def test_masked_errors():
    a = (torch.zeros(2, 16, 128, dtype=torch.float8_e4m3fn), torch.ones(2, 16, 1))
    b = (torch.zeros(2, 128, 128, dtype=torch.float8_e4m3fn), torch.ones(2, 1, 1))
    d = torch.empty(2, 16, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="masked_m: each count must be in"):
        api.m_grouped_fp8_gemm_nt_masked(a, b, d, torch.tensor([4, 17], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="expected_m: must be a positive int"):
        api.m_grouped_fp8_gemm_nt_masked(a, b, d, torch.tensor([4, 1], dtype=torch.int32), 0)
    with pytest.raises(ValueError, match=r"masked_m: expected shape \(2,\)"):
        api.m_grouped_fp8_gemm_nt_masked(a, b, d, torch.tensor([4], dtype=torch.int32), 8)


def test_k_grouped_errors():
    a = (torch.zeros(256, 32, dtype=torch.float8_e4m3fn), torch.ones(2, 32))
    b = (torch.zeros(256, 48, dtype=torch.float8_e4m3fn), torch.ones(2, 48))
    d = torch.zeros(2, 32, 48)
    layout = torch.tensor([128, 128], dtype=torch.int32)
    with pytest.raises(ValueError, match="c: the K-grouped GEMMs accumulate"):
        api.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [128, 128], layout)
    with pytest.raises(ValueError, match="ks_cpu: each K must be a non-negative multiple of 128"):
        api.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [64, 192], layout, d)
    with pytest.raises(ValueError, match="ks_cpu: 3 groups"):
        api.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [128, 128, 0], layout, d)
    with pytest.raises(NotImplementedError, match="PSUM"):
        api.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [128, 128], layout, d, use_psum_layout=True)
    with pytest.raises(ValueError, match="recipe: the K-grouped GEMMs take per-channel scales"):
        api.k_grouped_fp8_gemm_tn_contiguous(a, b, d, [128, 128], layout, d, recipe=(1, 128, 128))


def test_c_errors():
    a, b = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(24, 16, dtype=torch.bfloat16)
    rows = torch.zeros(8, 32)
    d = rows[:, :24]  # row stride 32
    with pytest.raises(ValueError, match="c: shares d's memory with other strides"):
        api.bf16_gemm_nt(a, b, d, c=rows.view(-1)[:192].view(8, 24))
    with pytest.raises(ValueError, match=r"c: expected shape \(8, 24\)"):
        api.bf16_gemm_nt(a, b, d, c=torch.zeros(8, 16))
    with pytest.raises(TypeError, match="c: dtype bfloat16"):
        api.bf16_gemm_nt(a, b, d, c=torch.zeros(8, 24, dtype=torch.bfloat16))
    ka = layouts.per_channel_cast_to_fp8(torch.randn(256, 32), use_ue8m0=False)
    kb = layouts.per_channel_cast_to_fp8(torch.randn(256, 48), use_ue8m0=False)
    out = torch.zeros(2, 48, 32).transpose(1, 2)  # (2, 32, 48), not contiguous
    with pytest.raises(ValueError, match="out: must be contiguous"):
        mate.gemm.ragged_k_moe_gemm_8bit(ka, kb, torch.tensor([128, 128], dtype=torch.int32), out)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend the CPU is a GPU so the backend choice sees a device without a GEMM kernel."""
    info = platform.DeviceInfo("cuda", "Fake H100", "sm_90a", 132, 227 * 1024)
    monkeypatch.setattr(platform, "device_info", lambda device=None: info)
    monkeypatch.setattr(dispatch, "_warned", set())
    return info


def _ab_per_channel(m=32, n=128, k=256):
    return fp8_a(m, k)[1], fp8_b(n, k, per_channel=True)[1]


def test_gpu_without_kernel_raises_unsupported(fake_gpu, monkeypatch):
    monkeypatch.delenv("MATE_ALLOW_REFERENCE_FALLBACK", raising=False)
    monkeypatch.delenv("MATE_BACKEND", raising=False)
    a, b = _ab_per_channel()
    d = torch.empty(32, 128, dtype=torch.bfloat16)
    with pytest.raises(mate.UnsupportedError, match=r"does not support recipe=\(1, 1, 128\)"):
        api.fp8_gemm_nt(a, b, d, recipe=(1, 1, 128))
    with pytest.raises(mate.UnsupportedError, match="out_dtype=float32"):
        api.fp8_gemm_nt(_ab()[0], _ab()[1], torch.empty(32, 128))
    with pytest.raises(mate.UnsupportedError, match="does not support n_multiple_of_8=False"):
        api.bf16_gemm_nt(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16),
                         torch.empty(4, 4))
    b_fp8 = fp8_b(128, 256)[1]
    with pytest.raises(mate.UnsupportedError, match="does not support psum=True"):
        api.m_grouped_fp8_gemm_nt_contiguous(fp8_a(128, 256)[1], (b_fp8[0][None], b_fp8[1][None]),
                                             torch.empty(128, 128, dtype=torch.bfloat16),
                                             torch.tensor([100], dtype=torch.int32), use_psum_layout=True)
    k_a = (torch.zeros(128, 8, dtype=torch.float8_e4m3fn), torch.ones(1, 8))
    k_b = (torch.zeros(128, 6, dtype=torch.float8_e4m3fn), torch.ones(1, 6))
    with pytest.raises(mate.UnsupportedError, match="does not support n_multiple_of_4=False"):
        api.k_grouped_fp8_gemm_tn_contiguous(k_a, k_b, torch.zeros(1, 8, 6), [128],
                                             torch.tensor([128], dtype=torch.int32), torch.zeros(1, 8, 6))


def test_gpu_fallback_runs_reference(fake_gpu, monkeypatch):
    monkeypatch.setenv("MATE_ALLOW_REFERENCE_FALLBACK", "1")
    a, b = _ab()
    d = torch.full((32, 128), float("nan"), dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="running the PyTorch reference because the kernel does not support "
                                         "n_multiple_of_8=False"):
        api.bf16_gemm_nt(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16),
                         torch.empty(4, 4))
    a, b = _ab_per_channel()
    with pytest.warns(UserWarning, match="gemm.fp8_gemm: running the PyTorch reference because the kernel does "
                                         r"not support recipe=\(1, 1, 128\)"):
        api.fp8_gemm_nt(a, b, d, recipe=(1, 1, 128))
    assert not d.float().isnan().any()


def test_every_gemm_op_is_registered():
    from mate.ops.gemm import support

    registered = {op.name for op in dispatch.ops()}
    assert {op.name for op in support.OPS} <= registered
    assert support.FP8_GEMM.support.features["major_a"] == ("K",)
    assert support.FP8_GEMM.support.features["recipe"] == ((1, 128, 128),)
    run, expected = support.FP8_GEMM.check_case(torch.device("cpu"))
    from mate.ops.gemm.reference import calc_diff
    assert calc_diff(run(), expected()) < 1e-5
    assert layouts.UE8M0_MESSAGE
