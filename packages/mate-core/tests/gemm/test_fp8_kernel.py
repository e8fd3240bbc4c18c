"""The TileLang FP8 block-scaled GEMM kernel on the GPU (`-m gpu`) against the reference, with
DeepGEMM's calc_diff metric and threshold: dense over the DeepSeek-V3 projection shapes, M-grouped
contiguous and masked MoE layouts, a CUDA-graph replay with new masked_m values, and one compile
serving every M. Outputs are poisoned with NaN before every call."""

import random

import pytest
import torch

import mate.gemm
from mate import jit
from mate.ops.gemm import api, fp8_launch, layouts, reference
from mate.ops.gemm.reference import calc_diff

from .helpers import MAX_DIFF

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEEPSEEK_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
MS = [1, 64, 128, 777, 4096]


def _quant_a(x):
    return layouts.per_token_cast_to_fp8(x, use_ue8m0=False)


def _quant_b(x):
    return layouts.per_block_cast_to_fp8(x, use_ue8m0=False)


def _dense_inputs(m, n, k):
    a = _quant_a(torch.randn(m, k, dtype=torch.bfloat16, device="cuda"))
    b = _quant_b(torch.randn(n, k, dtype=torch.bfloat16, device="cuda"))
    return a, b


def _expected(a, b):
    return reference.gemm_nt(a[0], b[0], sfa=a[1], sfb=b[1], out_dtype=torch.float32)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", DEEPSEEK_NK)
def test_fp8_gemm_nt_deepseek_shapes(n, k, m):
    a, b = _dense_inputs(m, n, k)
    d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    api.fp8_gemm_nt(a, b, d)
    assert not d.isnan().any()
    diff = calc_diff(d, _expected(a, b))
    assert diff < MAX_DIFF, (m, n, k, float(diff))


def test_fp8_gemm_nt_unaligned_and_prepared_scales():
    """N not a multiple of the 128-wide tile, M of 1..3 rows past a tile, and scales already in the
    MN-major TMA-aligned layout (DeepGEMM's transform), or column-major B scales."""
    for m, n, k in [(129, 200, 256), (3, 136, 384), (255, 4104, 1024)]:
        a, b = _dense_inputs(m, n, k)
        for sfa in (a[1], layouts.get_mn_major_tma_aligned_tensor(a[1])):
            for sfb in (b[1], b[1].t().contiguous().t()):
                d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                api.fp8_gemm_nt((a[0], sfa), (b[0], sfb), d)
                diff = calc_diff(d, _expected(a, b))
                assert diff < MAX_DIFF, (m, n, k, float(diff))


def test_one_compile_serves_every_m():
    """M is dynamic: one compile per tile bucket (fp8_launch.tile_for) serves every M."""
    n, k = 384, 640  # a shape no other test uses
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    buckets = ((1, 7, 33, 64), (65, 128, 300, 1500, 4097))
    counts = []
    for bucket in buckets:
        before = jit.stats["compiled"] + jit.stats["loaded"]
        for m in bucket:
            a, b = _dense_inputs(m, n, k)
            d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            api.fp8_gemm_nt(a, b, d)
            assert calc_diff(d, _expected(a, b)) < MAX_DIFF
        counts.append(jit.stats["compiled"] + jit.stats["loaded"] - before)
    tiles = [{fp8_launch.tile_for(m, n, k, "dense", sms) for m in bucket} for bucket in buckets]
    assert counts == [len(tiles[0]), len(tiles[1] - tiles[0])] and len(tiles[0]) == 1
    assert len([vid for vid in jit._kernels if "n=384," in vid and "k=640," in vid]) == len(tiles[0] | tiles[1])


@pytest.mark.parametrize("tile", ["m64n64s4", "m64n64s2", "m128n64s2", "m128n64s8"])
def test_split_k_tiles(monkeypatch, tile):
    """Split-K (the last CTA of a tile sums the splits and resets its counter; two splits sum over a
    cluster instead): split tiles on ragged M and N, repeated calls (the counters must come back to
    zero) and a CUDA-graph replay."""
    monkeypatch.setattr(fp8_launch, "tile_for", lambda *args, **kwargs: tile)
    for m, n, k in [(1, 2112, 7168), (64, 200, 1024), (100, 4096, 512), (128, 136, 384)]:
        a, b = _dense_inputs(m, n, k)
        expected = _expected(a, b)
        for _ in range(2):
            d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            api.fp8_gemm_nt(a, b, d)
            diff = calc_diff(d, expected)
            assert diff < MAX_DIFF, (tile, m, n, k, float(diff))
    d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        api.fp8_gemm_nt(a, b, d)
    for _ in range(3):
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert calc_diff(d, expected) < MAX_DIFF


def test_mate_gemm_fp8_nt_groupwise_and_bmm_fp8():
    a, b = _dense_inputs(300, 512, 1024)
    out = mate.gemm.gemm_fp8_nt_groupwise(a[0], b[0], a[1], b[1])
    assert calc_diff(out, _expected(a, b)) < MAX_DIFF
    out_mn = mate.gemm.gemm_fp8_nt_groupwise(a[0], b[0], a[1].t().contiguous(), b[1].t().contiguous(),
                                             scale_major_mode="MN")
    assert calc_diff(out_mn, _expected(a, b)) < MAX_DIFF
    batch = [_dense_inputs(100, 256, 512) for _ in range(3)]
    a3 = torch.stack([x[0][0] for x in batch]), torch.stack([x[0][1] for x in batch])
    b3 = torch.stack([x[1][0] for x in batch]), torch.stack([x[1][1] for x in batch])
    out3 = torch.full((3, 100, 256), float("nan"), dtype=torch.bfloat16, device="cuda")
    mate.gemm.bmm_fp8(a3[0], b3[0], a3[1], b3[1], torch.bfloat16, out=out3, scale_granularity_mnk=(1, 128, 128))
    for i, (x, y) in enumerate(batch):
        assert calc_diff(out3[i], _expected(x, y)) < MAX_DIFF


# ---- M-grouped contiguous ---------------------------------------------------------------------

def _contiguous_case(num_groups, expected_m, n, k):
    counts = [max(1, int(expected_m * random.uniform(0.7, 1.3))) for _ in range(num_groups)]
    counts[0] = max(1, counts[0] // 3 * 3 + 1)  # an unaligned count for sure
    aligned = [layouts.align(c, 128) for c in counts]
    m = sum(aligned)
    m_indices = torch.full((m,), -1, dtype=torch.int32)
    start = 0
    for group, (count, padded) in enumerate(zip(counts, aligned, strict=True)):
        m_indices[start:start + count] = group
        start += padded
    a = _quant_a(torch.randn(m, k, dtype=torch.bfloat16, device="cuda"))
    b_rows = [_quant_b(torch.randn(n, k, dtype=torch.bfloat16, device="cuda")) for _ in range(num_groups)]
    b = torch.stack([x[0] for x in b_rows]), torch.stack([x[1] for x in b_rows])
    return a, b, m_indices.cuda()


@pytest.mark.parametrize("num_groups,expected_m,n,k", [
    (4, 64, 4096, 7168), (8, 192, 7168, 2048), (4, 1000, 4096, 7168), (8, 4096, 7168, 2048), (4, 8192, 4096, 7168)])
def test_m_grouped_contiguous(num_groups, expected_m, n, k):
    a, b, m_indices = _contiguous_case(num_groups, expected_m, n, k)
    d = torch.full((a[0].shape[0], n), float("nan"), dtype=torch.bfloat16, device="cuda")
    api.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices)
    expected = reference.m_grouped_gemm_nt_contiguous(a[0], b[0], m_indices, sfa=a[1], sfb=b[1],
                                                      out_dtype=torch.float32)
    assert not d.isnan().any()
    assert (d[m_indices < 0] == 0).all(), "padding rows are zero"
    diff = calc_diff(d, expected)
    assert diff < MAX_DIFF, float(diff)


def test_ragged_m_moe_gemm_8bit_modes():
    a, b, m_indices = _contiguous_case(4, 200, 512, 1024)
    expected = reference.m_grouped_gemm_nt_contiguous(a[0], b[0], m_indices, sfa=a[1], sfb=b[1],
                                                      out_dtype=torch.float32)
    out = torch.full((a[0].shape[0], 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    mate.gemm.ragged_m_moe_gemm_8bit(a, b, m_indices, out)
    assert calc_diff(out, expected) < MAX_DIFF
    counts = torch.stack([(m_indices == g).sum() for g in range(4)]).to(torch.int32)
    out2 = torch.full_like(out, float("nan"))
    mate.gemm.ragged_m_moe_gemm_8bit(a, b, counts, out2, gemm_mode="per_expert")
    assert calc_diff(out2, expected) < MAX_DIFF


# ---- M-grouped masked -------------------------------------------------------------------------

def _masked_case(num_groups, max_m, n, k):
    a = _quant_a(torch.randn(num_groups * max_m, k, dtype=torch.bfloat16, device="cuda"))
    a = a[0].view(num_groups, max_m, k), a[1].view(num_groups, max_m, -1)
    b_rows = [_quant_b(torch.randn(n, k, dtype=torch.bfloat16, device="cuda")) for _ in range(num_groups)]
    b = torch.stack([x[0] for x in b_rows]), torch.stack([x[1] for x in b_rows])
    return a, b


def _check_masked(d, a, b, masked_m):
    for g, count in enumerate(masked_m.tolist()):
        if count:
            expected = reference.gemm_nt(a[0][g, :count], b[0][g], sfa=a[1][g, :count], sfb=b[1][g],
                                         out_dtype=torch.float32)
            diff = calc_diff(d[g, :count], expected)
            assert diff < MAX_DIFF, (g, count, float(diff))
        assert d[g, count:].isnan().all(), f"group {g}: rows past masked_m = {count} were written"


@pytest.mark.parametrize("num_groups,max_m,expected_m,n,k", [
    (4, 256, 64, 4096, 7168), (8, 512, 200, 7168, 2048), (6, 1024, 700, 4096, 7168)])
def test_m_grouped_masked(num_groups, max_m, expected_m, n, k):
    a, b = _masked_case(num_groups, max_m, n, k)
    counts = [min(max_m, int(expected_m * random.uniform(0.5, 1.5))) for _ in range(num_groups)]
    counts[0], counts[-1] = 0, max_m  # an empty group and a full one
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    d = torch.full((num_groups, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    api.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m)
    _check_masked(d, a, b, masked_m)


def test_m_grouped_masked_cuda_graph_replay():
    num_groups, max_m, n, k = 4, 384, 2048, 1024
    a, b = _masked_case(num_groups, max_m, n, k)
    masked_m = torch.tensor([100, 0, 384, 7], dtype=torch.int32, device="cuda")
    d = torch.full((num_groups, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    api.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, 128)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        api.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, 128)
    for counts in ([1, 200, 0, 384], [383, 129, 128, 5]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        d.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check_masked(d, a, b, masked_m)


@pytest.mark.parametrize("tile", ["p128n192", "p128n64", "p64n64", "p64n192"])
def test_persistent_narrow_tiles_every_layout(monkeypatch, tile):
    """128 x 192 tiles (persistent kernel) start in the middle of every other 128-row B scale block,
    so a tile's columns take one of two scales: N = 2112 (11 whole tiles), 200 and 4104 (a partial
    last tile whose second scale block lies past N), under each layout; 64-wide tiles (taken at
    small M) share a scale block in pairs; 64-row tiles run one consumer warpgroup."""
    monkeypatch.setattr(fp8_launch, "tile_for", lambda *args, **kwargs: tile)
    for m, n, k in [(129, 200, 256), (777, 2112, 1024), (300, 4104, 512)]:
        a, b = _dense_inputs(m, n, k)
        d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        api.fp8_gemm_nt(a, b, d)
        assert calc_diff(d, _expected(a, b)) < MAX_DIFF, (m, n, k)
    a, b, m_indices = _contiguous_case(4, 200, 2112, 512)
    d = torch.full((a[0].shape[0], 2112), float("nan"), dtype=torch.bfloat16, device="cuda")
    api.m_grouped_fp8_gemm_nt_contiguous(a, b, d, m_indices)
    expected = reference.m_grouped_gemm_nt_contiguous(a[0], b[0], m_indices, sfa=a[1], sfb=b[1],
                                                      out_dtype=torch.float32)
    assert (d[m_indices < 0] == 0).all() and calc_diff(d, expected) < MAX_DIFF
    a, b = _masked_case(3, 256, 4104, 512)
    masked_m = torch.tensor([0, 130, 256], dtype=torch.int32, device="cuda")
    d = torch.full((3, 256, 4104), float("nan"), dtype=torch.bfloat16, device="cuda")
    api.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, 128)
    _check_masked(d, a, b, masked_m)


def test_masked_moe_gemm_8bit_with_signal():
    num_groups, max_m, n, k = 3, 256, 384, 512
    a, b = _masked_case(num_groups, max_m, n, k)
    info = torch.tensor([130, 0, 256], dtype=torch.int32, device="cuda")
    out = torch.full((num_groups, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    out, signal, block_m, threshold = mate.gemm.masked_moe_gemm_8bit(a, b, info, out, enable_overlap=True)
    _check_masked(out, a, b, info)
    assert (block_m, threshold) == (64, 3)
    assert signal.cpu().tolist() == [3, 3, 3, 0, 0, 0, 0, 0, 3, 3, 3, 3]
