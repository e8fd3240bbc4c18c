"""The TileLang kernels of the BF16 GEMMs with C, the M-grouped BF16 GEMMs and the K-grouped GEMMs on
the GPU (`-m gpu`), against the reference with DeepGEMM's calc_diff thresholds (1e-5 for BF16,
0.001 for FP8) over grids modeled on DeepGEMM's tests/test_bf16.py, test_fp8_fp4.py and
generators.py (SM90 cases). Outputs are poisoned with NaN before every call (C is random)."""

import random

import pytest
import torch

import mate.gemm
from mate.ops.gemm import api, layouts, reference
from mate.ops.gemm.reference import calc_diff

from .helpers import MAX_DIFF, POISON, contiguous_layout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_MAX_DIFF = 1e-5  # DeepGEMM's test_bf16.py
GROUPED_NK = [(6144, 7168), (7168, 3072), (4096, 4096), (4096, 2048)]  # enumerate_m_grouped_*
K_GROUPED = [(4, 4096, 7168, 8192), (4, 7168, 2048, 8192), (8, 4096, 7168, 4096), (8, 7168, 2048, 4096),
             (16, 4096, 7168, 2048), (16, 7168, 2048, 2048)]  # (groups, m, n, expected K), enumerate_k_grouped


def _bf16(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16, device="cuda")


@pytest.fixture
def one_at_a_time(tmp_path_factory):
    """The upstream-sized cases (several GiB of GPU memory each, with their references) run one at a
    time across pytest-xdist workers and give their cached memory back afterwards."""
    from filelock import FileLock

    with FileLock(str(tmp_path_factory.getbasetemp().parent / "mate-gemm-grouped-large.lock")):
        yield
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- dense BF16 with C ------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 128, 4096])
@pytest.mark.parametrize("n,k", [(2112, 7168), (576, 7168), (4096, 7168), (7168, 2048)])
def test_bf16_gemm_accumulate_bf16(m, n, k):
    """Forward GEMMs with BF16 accumulation (C = D, bf16), as enumerate_normal yields them."""
    a, b = _bf16(m, k), _bf16(n, k)
    d = _bf16(m, n) * 32
    expected = a.float() @ b.float().T + d.float()
    api.bf16_gemm_nt(a, b, d, c=d)
    assert calc_diff(d, expected) < BF16_MAX_DIFF


@pytest.mark.parametrize("layout", ["nt", "tn"])
@pytest.mark.parametrize("m,n,k", [(2112, 4096, 7168), (7168, 4096, 2048), (300, 520, 384)])
def test_bf16_gemm_accumulate_fp32_wgrad(layout, m, n, k):
    """Weight-gradient GEMMs (MN-major operands, float32 D and C) and a separate C (copied into D)."""
    a, b = _bf16(m, k), _bf16(n, k)
    c = torch.randn(m, n, device="cuda") * 32
    expected = a.float() @ b.float().T + c
    d = torch.full((m, n), POISON, device="cuda")
    if layout == "nt":  # MN-major views, the wgrad layout
        api.bf16_gemm_nt(a.T.contiguous().T, b.T.contiguous().T, d, c=c)
    else:
        api.bf16_gemm_tn(a.T.contiguous(), b.T.contiguous(), d, c=c)
    assert calc_diff(d, expected) < BF16_MAX_DIFF
    api.bf16_gemm_nt(a, b, c, c=c)  # C is D
    assert calc_diff(c, expected) < BF16_MAX_DIFF


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_bmm_fp16_with_c(out_dtype):
    a, b, c = _bf16(4, 300, 256), _bf16(4, 256, 512), torch.randn(4, 300, 512, device="cuda")
    out = torch.full((4, 300, 512), POISON, dtype=out_dtype, device="cuda")
    mate.gemm.bmm_fp16(a, b, out_dtype, out=out, c=c)
    assert calc_diff(out, a.float() @ b.float() + c) < BF16_MAX_DIFF


# ---- M-grouped BF16 ---------------------------------------------------------------------------

@pytest.mark.parametrize("major_b", ["K", "MN"])
@pytest.mark.parametrize("n,k", GROUPED_NK)
@pytest.mark.parametrize("num_groups,expected_m", [(4, 8192), (8, 4096)])
def test_m_grouped_bf16_contiguous(num_groups, expected_m, n, k, major_b, one_at_a_time):
    grouped_layout, _, _ = contiguous_layout(num_groups, expected_m)
    grouped_layout = grouped_layout.cuda()
    m = grouped_layout.numel()
    a, b = _bf16(m, k), _bf16(num_groups, n, k)
    a[grouped_layout < 0] = 0  # DeepGEMM zeroes the padding rows of A
    d = torch.full((m, n), POISON, dtype=torch.bfloat16, device="cuda")
    if major_b == "K":
        api.m_grouped_bf16_gemm_nt_contiguous(a, b, d, grouped_layout)
    else:  # the nn alias with B (G, K, N) contiguous
        api.m_grouped_bf16_gemm_nn_contiguous(a, b.transpose(1, 2).contiguous(), d, grouped_layout)
    expected = reference.m_grouped_gemm_nt_contiguous(a, b, grouped_layout, out_dtype=torch.float32)
    assert not d.isnan().any()
    assert (d[grouped_layout < 0] == 0).all(), "padding rows are zero"
    assert calc_diff(d, expected) < BF16_MAX_DIFF


@pytest.mark.parametrize("n,k", GROUPED_NK[::3])
@pytest.mark.parametrize("num_groups,expected_m", [(4, 8192), (8, 4096)])
def test_m_grouped_bf16_psum(num_groups, expected_m, n, k, one_at_a_time):
    """use_psum_layout: grouped_layout holds each group's end row; group g starts at the previous end
    rounded up to 128 (generate_m_grouped_contiguous(use_psum_layout=True)); rows of no group are 0."""
    counts = [int(expected_m * random.uniform(0.7, 1.3)) for _ in range(num_groups)]
    counts[1] = 0  # an empty group
    starts, ends, start = [], [], 0
    for count in counts:
        starts.append(start)
        ends.append(start + count)
        start = layouts.align(start + count, 128)
    m = start + 256  # rows past the last group
    a, b = _bf16(m, k), _bf16(num_groups, n, k)
    d = torch.full((m, n), POISON, dtype=torch.bfloat16, device="cuda")
    grouped_layout = torch.tensor(ends, dtype=torch.int32, device="cuda")
    api.m_grouped_bf16_gemm_nt_contiguous(a, b, d, grouped_layout, use_psum_layout=True)
    for g, (first, end) in enumerate(zip(starts, ends, strict=True)):
        if end > first:
            assert calc_diff(d[first:end], a[first:end].float() @ b[g].float().T) < BF16_MAX_DIFF, g
    expected = reference.m_grouped_gemm_nt_contiguous(a, b, grouped_layout, use_psum_layout=True,
                                                      out_dtype=torch.float32)
    assert not d.isnan().any() and calc_diff(d, expected) < BF16_MAX_DIFF  # padding rows are zeros


def test_m_grouped_bf16_masked_as_psum():
    """DeepGEMM's masked test in its psum form (layout_masked_to_psum, expected_m_for_psum_layout)."""
    num_groups, max_m, expected_m, n, k = 32, 1024, 192, 4096, 2048
    a, b = _bf16(num_groups, max_m, k), _bf16(num_groups, n, k)
    counts = [int(expected_m * random.uniform(0.7, 1.3)) for _ in range(num_groups)]
    ends, start, a_psum = [], 0, _bf16(num_groups * max_m, k)
    for g, count in enumerate(counts):
        a_psum[start:start + count] = a[g, :count]
        ends.append(start + count)
        start = layouts.align(start + count, 128)
    d = torch.full((num_groups * max_m, n), POISON, dtype=torch.bfloat16, device="cuda")
    api.m_grouped_bf16_gemm_nt_contiguous(a_psum, b, d, torch.tensor(ends, dtype=torch.int32, device="cuda"),
                                          use_psum_layout=True, expected_m_for_psum_layout=expected_m)
    for g, (count, end) in enumerate(zip(counts, ends, strict=True)):
        assert calc_diff(d[end - count:end], a[g, :count].float() @ b[g].float().T) < BF16_MAX_DIFF, g


def _check_masked(d, a, b, masked_m):
    for g, count in enumerate(masked_m.tolist()):
        if count:
            expected = a[g, :count].float() @ b[g].float().T
            assert calc_diff(d[g, :count], expected) < BF16_MAX_DIFF, (g, count)
        assert d[g, count:].isnan().all(), f"group {g}: rows past masked_m = {count} were written"


@pytest.mark.parametrize("n,k", GROUPED_NK[:2] + GROUPED_NK[3:])
@pytest.mark.parametrize("num_groups,max_m,expected_m", [(32, 1024, 192), (6, 4096, 1024), (32, 256, 20),
                                                         (6, 256, 20)])
def test_m_grouped_bf16_masked(num_groups, max_m, expected_m, n, k, one_at_a_time):
    a, b = _bf16(num_groups, max_m, k), _bf16(num_groups, n, k)
    counts = [min(max_m, int(expected_m * random.uniform(0.7, 1.3))) for _ in range(num_groups)]
    counts[0], counts[-1] = 0, max_m  # an empty group and a full one
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    d = torch.full((num_groups, max_m, n), POISON, dtype=torch.bfloat16, device="cuda")
    api.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m)
    _check_masked(d, a, b, masked_m)


def test_m_grouped_bf16_masked_cuda_graph_replay():
    num_groups, max_m, n, k = 4, 384, 2048, 1024
    a, b = _bf16(num_groups, max_m, k), _bf16(num_groups, n, k)
    masked_m = torch.tensor([100, 0, 384, 7], dtype=torch.int32, device="cuda")
    d = torch.full((num_groups, max_m, n), POISON, dtype=torch.bfloat16, device="cuda")
    api.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 128)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        api.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 128)
    for counts in ([1, 200, 0, 384], [383, 129, 128, 5]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        d.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        _check_masked(d, a, b, masked_m)


# ---- K-grouped --------------------------------------------------------------------------------

def _k_grouped_ks(num_groups, expected_k, empty_group):
    """enumerate_k_grouped_contiguous's K values (aligned to 128), one of them 0 when `empty_group`."""
    ks = [layouts.align(max(1, int(expected_k * random.uniform(0.7, 1.3))), 128) for _ in range(num_groups)]
    if empty_group:
        ks[random.randrange(num_groups)] = 0
    return ks


def _k_grouped_expected(a, b, ks, c, sfa=None, sfb=None):
    """The reference group by group (the whole (G, M, N) float32 result at once would double the memory)."""
    expected = torch.empty_like(c)
    start = 0
    for g, k in enumerate(ks):
        blocks = slice(start // 128, (start + k) // 128)
        expected[g] = reference.k_grouped_gemm_tn_contiguous(
            a[start:start + k], b[start:start + k], [k], c[g:g + 1], sfa=None if sfa is None else sfa[blocks],
            sfb=None if sfb is None else sfb[blocks])[0]
        start += k
    return expected


@pytest.mark.parametrize("empty_group", [False, True])
@pytest.mark.parametrize("num_groups,m,n,expected_k", K_GROUPED)
def test_k_grouped_bf16(num_groups, m, n, expected_k, empty_group, one_at_a_time):
    ks = _k_grouped_ks(num_groups, expected_k, empty_group)
    a, b = _bf16(sum(ks), m), _bf16(sum(ks), n)
    c = torch.randn(num_groups, m, n, device="cuda") * 32
    expected = _k_grouped_expected(a, b, ks, c)
    d = c  # DeepGEMM's test accumulates in place
    api.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, torch.tensor(ks, dtype=torch.int32, device="cuda"), c)
    assert calc_diff(d, expected) < BF16_MAX_DIFF


def _k_grouped_fp8(ks, mn):
    """generators.k_grouped_per_channel_cast_to_fp8: each group cast on its own (ΣK, mn) rows."""
    x = _bf16(sum(ks), mn)
    pieces = [layouts.per_channel_cast_to_fp8(blk, use_ue8m0=False) for blk in x.split(ks) if blk.shape[0]]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def _flat(x, ks):
    """The SM90 K-major flat layout: each group's (MN, K_g) block row-major, one after another."""
    return torch.cat([blk.T.flatten() for blk in x.split(ks)])


@pytest.mark.parametrize("empty_group", [False, True])
@pytest.mark.parametrize("num_groups,m,n,expected_k", K_GROUPED)
def test_k_grouped_fp8_nt(num_groups, m, n, expected_k, empty_group, one_at_a_time):
    ks = _k_grouped_ks(num_groups, expected_k, empty_group)
    (a, sfa), (b, sfb) = _k_grouped_fp8(ks, m), _k_grouped_fp8(ks, n)
    c = torch.randn(num_groups, m, n, device="cuda") * 32
    expected = _k_grouped_expected(a, b, ks, c, sfa, sfb)
    d = c
    api.k_grouped_fp8_gemm_nt_contiguous((_flat(a, ks), sfa.T), (_flat(b, ks), sfb.T), d, ks,
                                         torch.tensor(ks, dtype=torch.int32, device="cuda"), c)
    assert calc_diff(d, expected) < MAX_DIFF


def test_k_grouped_fp8_tn_and_ragged_k():
    """MN-major operands (k_grouped_fp8_gemm_tn_contiguous, ragged_k_moe_gemm_8bit's default modes),
    K-major ones through ragged_k's "K" modes, M not a multiple of 4 (scales copied), a separate C."""
    ks, m, n = [384, 0, 1024, 128], 1030, 2048
    (a, sfa), (b, sfb) = _k_grouped_fp8(ks, m), _k_grouped_fp8(ks, n)
    c = torch.randn(len(ks), m, n, device="cuda")
    expected = reference.k_grouped_gemm_tn_contiguous(a, b, ks, c, sfa=sfa, sfb=sfb)
    layout = torch.tensor(ks, dtype=torch.int32, device="cuda")
    d = torch.full_like(c, POISON)
    api.k_grouped_fp8_gemm_tn_contiguous((a, sfa), (b, sfb), d, ks, layout, c)
    assert calc_diff(d, expected) < MAX_DIFF
    out = c.clone()
    mate.gemm.ragged_k_moe_gemm_8bit((a, sfa), (b, sfb), layout.long(), out)
    assert calc_diff(out, expected) < MAX_DIFF
    out = c.clone()
    mate.gemm.ragged_k_moe_gemm_8bit((a.T.contiguous().T, sfa), (b.T.contiguous().T, sfb), layout, out,
                                     major_a_mode="K", major_b_mode="K")
    assert calc_diff(out, expected) < MAX_DIFF
