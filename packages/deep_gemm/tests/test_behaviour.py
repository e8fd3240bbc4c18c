"""Behaviour through the wrapper: upstream-style test flows (cast, GEMM into d, calc_diff)."""

import pytest
import torch

import deep_gemm
from mate import platform
from mate.ops.gemm import layouts


def test_fp8_gemm_nt_as_upstream_tests_call_it():
    m, n, k = 48, 256, 384
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    c = torch.randn(m, n) * 32
    d = c.clone()
    ref_d = a.float() @ b.float().t() + c
    a_fp8 = deep_gemm.per_token_cast_to_fp8(a, use_ue8m0=False)
    b_fp8 = deep_gemm.per_block_cast_to_fp8(b, use_ue8m0=False)
    assert deep_gemm.fp8_gemm_nt(a_fp8, b_fp8, d, c=d) is None
    assert deep_gemm.testing.calc_diff(d, ref_d) < 0.001


def test_m_grouped_contiguous_through_wrapper():
    num_groups, n, k = 2, 128, 256
    alignment = deep_gemm.get_m_alignment_for_contiguous_layout()
    m = 2 * alignment
    layout = torch.full((m,), -1, dtype=torch.int32)
    layout[:100], layout[alignment:alignment + 60] = 0, 1
    a = torch.randn(m, k, dtype=torch.bfloat16)
    a[layout < 0] = 0
    b = torch.randn(num_groups, n, k, dtype=torch.bfloat16)
    d = torch.empty(m, n, dtype=torch.bfloat16)
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, layout)
    rows = slice(alignment, alignment + 60)
    assert deep_gemm.testing.calc_diff(d[rows], a[rows].float() @ b[1].float().T) < 1e-5


def test_layout_utilities():
    sf = torch.rand(10, 3)
    out = deep_gemm.get_mn_major_tma_aligned_tensor(sf)
    assert out.stride() == (1, deep_gemm.get_tma_aligned_size(10, 4)) and torch.equal(out, sf)
    assert deep_gemm.transform_sf_into_required_layout(sf, 10, 384, (1, 128, 128), is_sfa=True).stride() == (1, 12)
    assert deep_gemm.ceil_div(129, 128) == 2 and deep_gemm.align(129, 128) == 256


def test_num_sms_follows_the_device():
    assert deep_gemm.get_num_sms() == platform.device_info().multiprocessors
    deep_gemm.set_num_sms(1)
    try:
        assert deep_gemm.get_num_sms() == 1
        with pytest.raises(ValueError, match="new_num_sms"):
            deep_gemm.set_num_sms(0)
    finally:
        deep_gemm._mate._config["num_sms"] = None


@pytest.mark.parametrize("call", [
    lambda: deep_gemm.fp8_mqa_logits(None, None, None, None, None),
    lambda: deep_gemm.fp8_paged_mqa_logits(None, None, None, None, None, None, 0),
    lambda: deep_gemm.get_paged_mqa_logits_metadata(torch.ones(2, dtype=torch.int32), 64, 0),
])
def test_indexer_not_implemented(call):
    with pytest.raises(NotImplementedError, match="later MATE release"):
        call()


def test_sm100_recipes_rejected():
    x = torch.randn(16, 128, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="SM100"):
        deep_gemm.per_token_cast_to_fp8(x, use_ue8m0=True, use_packed_ue8m0=True)
    assert layouts.UE8M0_MESSAGE in str(pytest.raises(NotImplementedError, deep_gemm.transform_sf_into_required_layout,
                                                      torch.zeros(16, 4), 16, 128, (1, 32)).value)
