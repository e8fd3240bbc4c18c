"""Scale-factor utilities against their documented (upstream) semantics."""

import pytest
import torch

from mate.ops.gemm import layouts


def test_integer_helpers():
    assert [layouts.ceil_div(x, 128) for x in (0, 1, 128, 129)] == [0, 1, 1, 2]
    assert [layouts.align(x, 128) for x in (0, 1, 128, 129)] == [0, 128, 128, 256]
    # 16-byte TMA alignment: 4 float32, 8 bf16, 16 fp8 elements
    assert layouts.get_tma_aligned_size(5, 4) == 8
    assert layouts.get_tma_aligned_size(8, 4) == 8
    assert layouts.get_tma_aligned_size(9, 2) == 16
    assert layouts.get_tma_aligned_size(1, 1) == 16
    with pytest.raises(ValueError, match="element_size"):
        layouts.get_tma_aligned_size(4, 3)


@pytest.mark.parametrize("shape", [(5, 3), (8, 1), (2, 7, 4), (1, 1)])
def test_mn_major_tma_aligned_tensor(shape):
    sf = torch.randn(shape)
    out = layouts.get_mn_major_tma_aligned_tensor(sf)
    torch.testing.assert_close(out, sf, rtol=0, atol=0)
    mn, sf_k = shape[-2:]
    aligned = layouts.get_tma_aligned_size(mn, 4)
    assert out.stride(-2) == 1
    if sf_k > 1:
        assert out.stride(-1) == aligned
    if len(shape) == 3:
        assert out.stride(0) == aligned * sf_k
    # Already in the layout: returned as is.
    assert layouts.get_mn_major_tma_aligned_tensor(out) is out


def test_mk_alignment_settings():
    assert layouts.get_mk_alignment_for_contiguous_layout() == 128
    assert layouts.get_m_alignment_for_contiguous_layout() == 128
    assert layouts.get_theoretical_mk_alignment_for_contiguous_layout(64) == 128
    try:
        layouts.set_mk_alignment_for_contiguous_layout(256)
        assert layouts.get_k_alignment_for_contiguous_layout() == 256
    finally:
        layouts.set_mk_alignment_for_contiguous_layout(128)


def test_transform_sf_sm90_recipes():
    sfa = torch.rand(100, 4)
    out = layouts.transform_sf_into_required_layout(sfa, 100, 512, (1, 128, 128), is_sfa=True)
    torch.testing.assert_close(out, sfa, rtol=0, atol=0)
    assert out.stride() == (1, 100)
    sfb = torch.rand(3, 4)
    assert layouts.transform_sf_into_required_layout(sfb, 300, 512, (1, 128, 128), is_sfa=False) is sfb
    assert layouts.transform_sf_into_required_layout(sfb.T.contiguous().T, 300, 512, (128, 128)) is not None
    grouped = torch.rand(2, 64, 2)
    out = layouts.transform_sf_into_required_layout(grouped, 64, 256, (1, 128), num_groups=2)
    assert out.stride() == (128, 1, 64)


def test_transform_sf_rejects():
    with pytest.raises(NotImplementedError, match="SM100"):
        layouts.transform_sf_into_required_layout(torch.zeros(8, 1, dtype=torch.int32), 8, 512, (1, 128))
    with pytest.raises(NotImplementedError, match="SM100"):
        layouts.transform_sf_into_required_layout(torch.zeros(8, 16), 8, 512, (1, 32))
    with pytest.raises(ValueError, match="sf: expected shape"):
        layouts.transform_sf_into_required_layout(torch.zeros(8, 3), 8, 512, (1, 128))
    with pytest.raises(ValueError, match="is_sfa"):
        layouts.transform_sf_into_required_layout(torch.zeros(8, 4), 8, 512, (1, 128, 128))


def test_per_token_cast():
    x = torch.randn(5, 300, dtype=torch.bfloat16)
    x[1, :] = 0  # an all-zero row uses the 1e-4 floor
    q, sf = layouts.per_token_cast_to_fp8(x, use_ue8m0=False)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (5, 300) and sf.shape == (5, 3)
    padded = torch.nn.functional.pad(x.float(), (0, 84)).view(5, 3, 128)
    torch.testing.assert_close(sf, padded.abs().amax(-1).clamp(min=1e-4) / 448)
    back = q.float() * sf.repeat_interleave(128, 1)[:, :300]
    assert (back - x.float()).abs().max() <= x.float().abs().max() / 16  # e4m3 keeps 3 mantissa bits
    q8, sf8 = layouts.per_token_cast_to_fp8(x, use_ue8m0=True)
    exponents = torch.frexp(sf8).mantissa
    assert torch.all(exponents == 0.5), "UE8M0 scales are powers of two"
    assert torch.all(sf8 >= sf)


def test_per_block_and_per_channel_cast():
    x = torch.randn(200, 256)
    q, sf = layouts.per_block_cast_to_fp8(x, use_ue8m0=False)
    assert q.shape == (200, 256) and sf.shape == (2, 2)
    torch.testing.assert_close(sf[1, 0], x[128:, :128].abs().max() / 448)
    q, sf = layouts.per_channel_cast_to_fp8(x[:128], use_ue8m0=False)
    assert sf.shape == (1, 256)
    torch.testing.assert_close(sf[0], x[:128].abs().amax(0) / 448)
    with pytest.raises(ValueError, match="multiple of gran_k"):
        layouts.per_channel_cast_to_fp8(x, use_ue8m0=False)
