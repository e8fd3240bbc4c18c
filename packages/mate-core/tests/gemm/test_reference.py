"""The GEMM reference and API against a naive float64 formula and against the unquantized
product, with DeepGEMM's similarity metric (calc_diff < 0.001), on DeepSeek-V3 shapes scaled
down for the CPU (K a multiple of 128)."""

import pytest
import torch

from mate.ops.gemm import api, layouts, reference
from mate.ops.gemm.reference import calc_diff

from .helpers import MAX_DIFF, POISON, contiguous_layout, fp8_a, fp8_b, naive_dequantize, naive_nt

# (M, N, K): DeepSeek-V3's projections (N, K) = (2112, 7168), (24576, 1536), (7168, 16384), ...
# scaled down by ~16, with small and odd token counts.
SHAPES = [(1, 128, 448 + 64), (17, 144, 384), (64, 256, 896), (128, 96, 1024)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_reference_matches_naive_float64(m, n, k):
    _, (a, sfa) = fp8_a(m, k)
    _, (b, sfb) = fp8_b(n, k)
    got = reference.gemm_nt(a, b, sfa=sfa, sfb=sfb, out_dtype=torch.float64, compute_dtype=torch.float64)
    torch.testing.assert_close(got, naive_nt(a, sfa, b, sfb), rtol=1e-10, atol=1e-10)


def test_dequantize_matches_index_formula():
    _, (b, sfb) = fp8_b(200, 384)  # N not a multiple of 128: the last scale row covers 72 rows
    assert sfb.shape == (2, 3)
    got = reference.dequantize(b, sfb, 128, 128, torch.float64)
    torch.testing.assert_close(got, naive_dequantize(b, sfb, 128, 128))


def _operands(layout, a_fp8, b_fp8):
    """The nt operands rearranged as each majorness variant takes them."""
    def t(pair):
        return pair[0].T.contiguous(), pair[1].T.contiguous()
    return {"nt": (a_fp8, b_fp8), "nn": (a_fp8, t(b_fp8)), "tn": (t(a_fp8), t(b_fp8)), "tt": (t(a_fp8), b_fp8)}[layout]


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("m,n,k", SHAPES[1:3])
def test_fp8_gemm(layout, out_dtype, accumulate, m, n, k):
    a_hp, a_fp8 = fp8_a(m, k)
    b_hp, b_fp8 = fp8_b(n, k)
    c = (torch.randn(m, n) * 32).to(out_dtype) if accumulate else None
    d = torch.full((m, n), POISON, dtype=out_dtype)
    getattr(api, f"fp8_gemm_{layout}")(*_operands(layout, a_fp8, b_fp8), d, c)
    exact = naive_nt(a_fp8[0], a_fp8[1], b_fp8[0], b_fp8[1]) + (c.double() if accumulate else 0)
    assert calc_diff(d, exact) < 1e-5
    truth = a_hp.double() @ b_hp.double().T + (c.double() if accumulate else 0)
    assert calc_diff(d, truth) < MAX_DIFF


def test_fp8_gemm_accumulates_in_place_when_c_is_d():
    _, a_fp8 = fp8_a(32, 256)
    _, b_fp8 = fp8_b(128, 256)
    d = torch.randn(32, 128)
    expected = d.double() + naive_nt(a_fp8[0], a_fp8[1], b_fp8[0], b_fp8[1])
    api.fp8_gemm_nt(a_fp8, b_fp8, d, c=d)
    assert calc_diff(d, expected) < 1e-9


def test_fp8_gemm_per_channel_b_recipe():
    _, a_fp8 = fp8_a(48, 256)
    _, b_fp8 = fp8_b(80, 256, per_channel=True)
    d = torch.full((48, 80), POISON)
    api.fp8_gemm_nt(a_fp8, b_fp8, d, recipe=(1, 1, 128))
    assert calc_diff(d, naive_nt(a_fp8[0], a_fp8[1], b_fp8[0], b_fp8[1], gran_b=(1, 128))) < 1e-9
    d2 = torch.full((48, 80), POISON)
    api.fp8_gemm_nt(a_fp8, b_fp8, d2, recipe_a=(1, 128), recipe_b=(1, 128))
    torch.testing.assert_close(d2, d)


def test_empty_k_copies_c_and_empty_m_does_nothing():
    a = (torch.empty(4, 0, dtype=torch.float8_e4m3fn), torch.empty(4, 0))
    b = (torch.empty(128, 0, dtype=torch.float8_e4m3fn), torch.empty(1, 0))
    c = torch.randn(4, 128)
    d = torch.full((4, 128), POISON)
    api.fp8_gemm_nt(a, b, d, c)
    torch.testing.assert_close(d, c)
    api.fp8_gemm_nt(a, b, d)
    assert torch.equal(d, torch.zeros_like(d))


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_bf16_gemm(layout, accumulate):
    m, n, k = 40, 96, 200
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    c = torch.randn(m, n) if accumulate else None
    d = torch.full((m, n), POISON)
    args = {"nt": (a, b), "nn": (a, b.T.contiguous()), "tn": (a.T.contiguous(), b.T.contiguous()),
            "tt": (a.T.contiguous(), b)}[layout]
    getattr(api, f"bf16_gemm_{layout}")(*args, d, c)
    expected = a.double() @ b.double().T + (c.double() if accumulate else 0)
    assert calc_diff(d, expected) < 1e-7


def test_cublaslt_gemm_float32():
    a, b = torch.randn(8, 64), torch.randn(16, 64)
    d = torch.full((8, 16), POISON)
    api.cublaslt_gemm_tt(a.T.contiguous(), b, d)
    torch.testing.assert_close(d, a @ b.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_groups,expected_m,n,k", [(4, 48, 256, 256), (2, 150, 128, 384)])
@pytest.mark.parametrize("variant", ["nt", "nn"])
def test_m_grouped_fp8_contiguous(num_groups, expected_m, n, k, variant):
    layout, actual, aligned = contiguous_layout(num_groups, expected_m)
    m = layout.numel()
    a_hp = torch.randn(m, k, dtype=torch.bfloat16)
    a_hp[layout < 0] = 0
    b_hp = torch.randn(num_groups, n, k, dtype=torch.bfloat16)
    a_fp8 = layouts.per_token_cast_to_fp8(a_hp, False)
    casts = [layouts.per_block_cast_to_fp8(b_hp[g], False) for g in range(num_groups)]
    b_fp8 = (torch.stack([x for x, _ in casts]), torch.stack([s for _, s in casts]))
    d = torch.full((m, n), POISON, dtype=torch.bfloat16)
    if variant == "nt":
        api.m_grouped_fp8_gemm_nt_contiguous(a_fp8, b_fp8, d, layout)
    else:
        b_nn = (b_fp8[0].mT.contiguous(), b_fp8[1].mT.contiguous())
        api.m_grouped_fp8_gemm_nn_contiguous(a_fp8, b_nn, d, layout)
    start = 0
    for g in range(num_groups):
        rows = slice(start, start + actual[g])
        exact = naive_nt(a_fp8[0][rows], a_fp8[1][rows], b_fp8[0][g], b_fp8[1][g])
        assert calc_diff(d[rows], exact) < 1e-5
        assert calc_diff(d[rows], a_hp[rows].double() @ b_hp[g].double().T) < MAX_DIFF
        start += aligned[g]
    assert torch.equal(d[layout < 0], torch.zeros_like(d[layout < 0])), "padding rows must be zero"


def test_m_grouped_contiguous_psum_layout():
    num_groups, n, k = 3, 64, 128
    actual = [70, 0, 130]
    ends, start = [], 0
    for count in actual:
        ends.append(start + count)
        start = layouts.align(start + count, 128)
    m = 128 + 0 + 256 + 0
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(num_groups, n, k, dtype=torch.bfloat16)
    d = torch.full((m, n), POISON, dtype=torch.bfloat16)
    api.m_grouped_bf16_gemm_nt_contiguous(a, b, d, torch.tensor(ends, dtype=torch.int32), use_psum_layout=True)
    assert calc_diff(d[:70], a[:70].double() @ b[0].double().T) < 1e-5
    assert calc_diff(d[128:258], a[128:258].double() @ b[2].double().T) < 1e-5
    assert torch.equal(d[70:128].float(), torch.zeros(58, n))


@pytest.mark.parametrize("variant", ["nt", "nn"])
def test_m_grouped_bf16_contiguous(variant):
    layout, actual, aligned = contiguous_layout(3, 60)
    m, n, k = layout.numel(), 64, 96
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(3, n, k, dtype=torch.bfloat16)
    d = torch.full((m, n), POISON, dtype=torch.bfloat16)
    if variant == "nt":
        api.m_grouped_bf16_gemm_nt_contiguous(a, b, d, layout)
    else:
        api.m_grouped_bf16_gemm_nn_contiguous(a, b.mT.contiguous(), d, layout)
    rows = (layout == 1).nonzero().flatten()
    assert calc_diff(d[rows], a[rows].double() @ b[1].double().T) < 1e-5


@pytest.mark.parametrize("fp8", [True, False])
def test_m_grouped_masked(fp8):
    num_groups, max_m, n, k, expected_m = 3, 64, 128, 256, 32
    a_hp = torch.randn(num_groups, max_m, k, dtype=torch.bfloat16)
    b_hp = torch.randn(num_groups, n, k, dtype=torch.bfloat16)
    masked_m = torch.tensor([32, 0, 64], dtype=torch.int32)
    d = torch.full((num_groups, max_m, n), POISON, dtype=torch.bfloat16)
    if fp8:
        a_casts = [layouts.per_token_cast_to_fp8(a_hp[g], False) for g in range(num_groups)]
        b_casts = [layouts.per_block_cast_to_fp8(b_hp[g], False) for g in range(num_groups)]
        a = tuple(torch.stack(parts) for parts in zip(*a_casts, strict=True))
        b = tuple(torch.stack(parts) for parts in zip(*b_casts, strict=True))
        api.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m)
    else:
        api.m_grouped_bf16_gemm_nt_masked(a_hp, b_hp, d, masked_m, expected_m)
    for g, count in enumerate(masked_m.tolist()):
        if count:
            exact = a_hp[g, :count].double() @ b_hp[g].double().T
            assert calc_diff(d[g, :count], exact) < (MAX_DIFF if fp8 else 1e-5)
        assert d[g, count:].float().isnan().all(), "rows beyond masked_m must stay untouched"


def _k_grouped_inputs(ks, m, n):
    total = sum(ks)
    a_hp, b_hp = torch.randn(total, m, dtype=torch.bfloat16), torch.randn(total, n, dtype=torch.bfloat16)
    a = torch.empty(total, m, dtype=torch.float8_e4m3fn)
    b = torch.empty(total, n, dtype=torch.float8_e4m3fn)
    sfa, sfb, start = [], [], 0
    for k in ks:
        if k:
            a[start:start + k], sa = layouts.per_channel_cast_to_fp8(a_hp[start:start + k], False)
            b[start:start + k], sb = layouts.per_channel_cast_to_fp8(b_hp[start:start + k], False)
            sfa.append(sa)
            sfb.append(sb)
        start += k
    return a_hp, b_hp, (a, torch.cat(sfa)), (b, torch.cat(sfb))


@pytest.mark.parametrize("variant", ["tn", "nt"])
def test_k_grouped_fp8(variant):
    ks, m, n = [256, 0, 128, 384], 64, 96
    a_hp, b_hp, a, b = _k_grouped_inputs(ks, m, n)
    c = torch.randn(len(ks), m, n) * 32
    d = torch.full_like(c, POISON)
    layout = torch.tensor(ks, dtype=torch.int32)
    if variant == "tn":
        api.k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks, layout, c)
    else:  # K-major: each group's (MN, K_g) block flattened in turn; scales (MN, sum K / 128)
        def flat(x):
            pieces, start = [], 0
            for k in ks:
                pieces.append(x[start:start + k].T.contiguous().flatten())
                start += k
            return torch.cat(pieces)
        api.k_grouped_fp8_gemm_nt_contiguous((flat(a[0]), a[1].T), (flat(b[0]), b[1].T), d, ks, layout, c)
    start = 0
    for g, k in enumerate(ks):
        truth = c[g].double() + a_hp[start:start + k].double().T @ b_hp[start:start + k].double()
        assert calc_diff(d[g], truth) < MAX_DIFF
        start += k


def test_k_grouped_bf16():
    ks, m, n = [128, 256], 32, 48
    a, b = torch.randn(384, m, dtype=torch.bfloat16), torch.randn(384, n, dtype=torch.bfloat16)
    d = torch.randn(2, m, n)
    c0 = d.clone()
    api.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, torch.tensor(ks, dtype=torch.int32), c=d)
    assert calc_diff(d[1], c0[1].double() + a[128:].double().T @ b[128:].double()) < 1e-7
