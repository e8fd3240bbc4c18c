"""sm_90a compile checks (`-m compile`: nvcc, no GPU) of the BF16 kernel's accumulating, M-grouped and
K-grouped variants and of the K-grouped FP8 kernel. Each variant is the one the launcher asks for (the
call recorded on a fake GPU), compiled with TileLang; the generated CUDA is checked for the TMA ring,
wgmma, the warp-specialized split and the layout's epilogue, and ptxas for register spills."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mate import jit, platform

pytest.importorskip("tilelang")

import mate.gemm  # noqa: E402
from mate.ops.gemm import api, bf16_kernel, kgrouped_kernel, layouts  # noqa: E402
from mate.testing import kernels as kernel_checks  # noqa: E402


def _recorded(monkeypatch, call) -> kernel_checks.KernelCall:
    """The kernel variant the launcher picks for `call()` (run on a fake sm_90a GPU)."""
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    call()
    monkeypatch.undo()
    assert len(calls) == 1
    return calls[0]


def _compiled_source(record: kernel_checks.KernelCall) -> str:
    kernel = jit.get_kernel(record.op, record.variant, platform.tilelang_target("sm_90a"), record.build)
    return kernel.get_kernel_source()


def _spill_bytes(src: str, tmp_path: Path) -> int:
    """Spill stores + loads ptxas reports for the generated CUDA (TileLang's headers on the path)."""
    import tilelang

    root = Path(tilelang.__file__).parent
    cu = tmp_path / "kernel.cu"
    cu.write_text(src)
    result = subprocess.run(
        [shutil.which("nvcc"), "-gencode", "arch=compute_90a,code=sm_90a", "-std=c++17", "-O3", "-cubin", "-w",
         "-o", str(tmp_path / "kernel.cubin"), f"-I{root / 'src'}", f"-I{root / '3rdparty' / 'cutlass' / 'include'}",
         "-Xptxas", "-v", str(cu)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr))


def _bf16(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)


def _common(src: str, register_split: bool = True) -> None:
    """TMA loads into an mbarrier ring, a runtime M. The K-grouped kernels come out warp-specialized
    without the producer/consumer register reallocation (TileLang leaves it out there)."""
    assert "tl::tma_load(a_desc" in src and "tl::tma_load(b_desc" in src and "arrive_and_expect_tx" in src
    assert ("warpgroup_reg_alloc" in src and "warpgroup_reg_dealloc" in src) == register_split
    assert "int M" in src  # M is a runtime argument


@pytest.mark.compile
def test_bf16_accumulate(monkeypatch, tmp_path):
    """C = D added in the epilogue; the 128 x 256 bf16 tile must not spill (128 accumulator registers)."""
    m, n, k = 4096, 4096, 7168
    d = _bf16(m, n)
    record = _recorded(monkeypatch, lambda: api.bf16_gemm_nt(_bf16(m, k), _bf16(n, k), d, c=d))
    assert record.variant["accumulate"] and record.variant["tile"] == "m128n256"
    src = _compiled_source(record)
    _common(src)
    assert re.search(r"wgmma_ss<tl::DataType::kBFloat16, tl::DataType::kBFloat16, tl::DataType::kFloat32, 64, 256",
                     src)
    assert "tl::tma_store(d_desc" in src and "kb < 112" in src
    assert _spill_bytes(src, tmp_path) == 0


@pytest.mark.compile
@pytest.mark.parametrize("major_b", ["K", "MN", "psum"])
def test_m_grouped_bf16_contiguous(monkeypatch, tmp_path, major_b):
    groups, n, k = 8, 4096, 7168
    m_indices = torch.arange(groups, dtype=torch.int32).repeat_interleave(512)
    a, b = _bf16(groups * 512, k), _bf16(groups, n, k)
    d = torch.empty(groups * 512, n, dtype=torch.bfloat16)
    if major_b == "K":
        record = _recorded(monkeypatch, lambda: api.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices))
    elif major_b == "MN":
        b_kn = b.transpose(1, 2).contiguous()
        record = _recorded(monkeypatch, lambda: api.m_grouped_bf16_gemm_nn_contiguous(a, b_kn, d, m_indices))
    else:
        ends = torch.arange(1, groups + 1, dtype=torch.int32) * 500
        record = _recorded(monkeypatch, lambda: api.m_grouped_bf16_gemm_nt_contiguous(a, b, d, ends,
                                                                                       use_psum_layout=True))
    src = _compiled_source(record)
    _common(src, register_split=major_b != "psum")
    if major_b == "psum":  # each block scans the experts' end rows; blocks past them skip the K loop
        assert record.variant["layout"] == "psum" and "scan[1] = g" in src
        assert _spill_bytes(src, tmp_path) == 0
    else:
        assert "aux[(((int64_t)((int)blockIdx.y)) * (int64_t)128)]" in src  # the expert of the block's first row
    assert "tl::tma_store(d_desc" in src


@pytest.mark.compile
def test_m_grouped_bf16_masked(monkeypatch):
    groups, max_m, n, k = 6, 1024, 4096, 7168
    a, b = _bf16(groups, max_m, k), _bf16(groups, n, k)
    d = torch.empty(groups, max_m, n, dtype=torch.bfloat16)
    masked_m = torch.full((groups,), 500, dtype=torch.int32)
    record = _recorded(monkeypatch, lambda: api.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, 500))
    src = _compiled_source(record)
    _common(src)
    assert "tl::tma_store" not in src  # rows past masked_m are not written


@pytest.mark.compile
def test_k_grouped_bf16(monkeypatch, tmp_path):
    ks, m, n = [1024, 0, 2048], 4096, 7168
    a, b = _bf16(sum(ks), m), _bf16(sum(ks), n)
    d = torch.randn(len(ks), m, n)
    layout = torch.tensor(ks, dtype=torch.int32)
    record = _recorded(monkeypatch, lambda: api.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, layout, d))
    src = _compiled_source(record)
    _common(src, register_split=False)
    assert "aux[" in src and "(int)blockIdx.z" in src  # the group's K and its prefix sum, read on the device
    assert not re.search(r"kb < \d+;", src)  # no compile-time K trip count
    assert _spill_bytes(src, tmp_path) == 0


@pytest.mark.compile
@pytest.mark.parametrize("m,n", [(4096, 7168), (128, 2048)])  # the 128- and 64-row tiles
def test_k_grouped_fp8(monkeypatch, tmp_path, m, n):
    ks = [1024, 0, 2048]
    a = layouts.per_channel_cast_to_fp8(torch.randn(sum(ks), m), use_ue8m0=False)
    b = layouts.per_channel_cast_to_fp8(torch.randn(sum(ks), n), use_ue8m0=False)
    d = torch.randn(len(ks), m, n)
    info = torch.tensor(ks, dtype=torch.int32)
    record = _recorded(monkeypatch, lambda: mate.gemm.ragged_k_moe_gemm_8bit(a, b, info, d))
    assert record.variant["tile"] == ("m128n128" if m == 4096 else "m64n128")
    src = _compiled_source(record)
    _common(src, register_split=False)
    assert "tl::tma_load(sfa_desc" in src and "tl::tma_load(sfb_desc" in src
    assert re.search(r"wgmma_ss<tl::DataType::kFloat8_e4m3, tl::DataType::kFloat8_e4m3, tl::DataType::kFloat32, "
                     r"64, 128, 32", src)
    assert "tl::tma_store(d_desc" in src
    assert _spill_bytes(src, tmp_path) == 0


def test_build_rejects_bad_layouts():
    with pytest.raises(ValueError, match="the k_grouped layout takes MN-major A and B"):
        bf16_kernel.bf16_gemm_kernel(256, 0, "K", "K", "bfloat16", "float32", "k_grouped", True)
    with pytest.raises(ValueError, match="the masked layout takes a K-major A and no accumulator"):
        bf16_kernel.bf16_gemm_kernel(256, 256, "K", "K", layout="masked", accumulate=True)
    with pytest.raises(ValueError, match="n must be a positive multiple of 4"):
        kgrouped_kernel.k_grouped_fp8_kernel(6)


@pytest.mark.compile
@pytest.mark.parametrize("layout,batch,m,k,n", [("bmm", 128, 512, 128, 512), ("tn", 1, 4096, 512, 32768),
                                                ("nt", 3, 100, 256, 512)])
def test_bf16_persistent(monkeypatch, tmp_path, layout, batch, m, k, n):
    """The persistent kernel (bmm and dense calls with a 16-bit D): `ctas` CTAs walk the tiles of
    every batch, the ring's stages are released one wgmma late, and the TMA store is waited for
    one tile later; no spills (128 accumulator registers per consumer thread)."""
    if layout == "bmm":
        a, b = _bf16(batch, m, k), _bf16(batch, k, n)
        record = _recorded(monkeypatch, lambda: mate.gemm.bmm_fp16(a, b, torch.bfloat16,
                                                                   out=torch.empty(batch, m, n, dtype=torch.bfloat16)))
    else:
        a = _bf16(batch, m, k) if layout == "nt" else _bf16(k, m)  # tn: A (K, M), B (K, N), both MN-major
        b = _bf16(batch, n, k) if layout == "nt" else _bf16(k, n)
        d = torch.empty(*((batch,) if layout == "nt" else ()), m, n, dtype=torch.bfloat16)
        call = (lambda: mate.gemm.bmm_fp16(a, b.transpose(1, 2), torch.bfloat16, out=d)) if layout == "nt" else (
            lambda: api.bf16_gemm_tn(a, b, d))
        record = _recorded(monkeypatch, call)
    tile = record.variant["tile"]
    assert tile.startswith("p")
    src = _compiled_source(record)
    # hand-written warp roles: the producer's expected bytes, then every producer thread arrives
    assert "tl::tma_load(a_desc" in src and "tl::tma_load(b_desc" in src and ".expect_transaction(" in src
    assert "warpgroup_reg_alloc<240>" in src and "warpgroup_reg_dealloc<24>" in src and "int M" in src
    block_n = bf16_kernel.TILES[tile]["block_n"]
    assert re.search(rf"wgmma_ss<tl::DataType::kBFloat16, tl::DataType::kBFloat16, tl::DataType::kFloat32, 64, "
                     rf"{block_n}, 16, {'true' if layout == 'tn' else 'false'}", src)
    assert "int ctas" in src and "for (int it = 0;" in src and f"kb < {k // 64}" in src
    assert "tl::wait_wgmma<1>();" in src and "tl::tma_store_wait<0, true>();" in src
    assert "tl::tma_store(d_desc" in src
    assert _spill_bytes(src, tmp_path) == 0
