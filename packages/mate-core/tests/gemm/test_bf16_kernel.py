"""The TileLang BF16 / FP16 GEMM kernel on the GPU (`-m gpu`): DeepGEMM's bf16_gemm_{nt,nn,tn,tt}
and mate.gemm.bmm_fp16 against a float64 reference on random inputs, outputs poisoned with NaN
before every call (every element must be written), M at and off the tile edges."""

import pytest
import torch

import mate.gemm
from mate import jit
from mate.ops.gemm import api

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def _limit(out_dtype):
    # bf16 operands, fp32 accumulation: the output's rounding dominates (bf16 2^-9, fp16 2^-12).
    return {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-4}[out_dtype]


@pytest.mark.parametrize("layout", ["nt", "nn", "tn", "tt"])
@pytest.mark.parametrize("m,n,k", [(4096, 2112, 7168), (777, 4096, 512), (1, 256, 384), (129, 7168, 2048)])
def test_bf16_gemm_layouts(layout, m, n, k):
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    ref = a.double() @ b.double().T
    # Each layout gets its operands in the layout it names (transposed copies, not views).
    a_arg = a if layout[0] == "n" else a.T.contiguous()
    b_arg = b if layout[1] == "t" else b.T.contiguous()
    d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    getattr(api, f"bf16_gemm_{layout}")(a_arg, b_arg, d)
    assert not d.isnan().any()
    assert _rel_err(d, ref) < _limit(torch.bfloat16), (layout, m, n, k)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_bf16_gemm_out_dtypes_and_views(out_dtype):
    """fp32 output; operands given as transposed views (the kernel reads either major order)
    and as a row-padded view (copied by the launch); an output that is a strided view."""
    m, n, k = 300, 1024, 768
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
    ref = a.double() @ b.double()
    d = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")
    api.bf16_gemm_nt(a, b.T, d)  # B as an MN-major view
    assert not d.isnan().any() and _rel_err(d, ref) < _limit(out_dtype)
    a_wide = torch.randn(m, 2 * k, dtype=torch.bfloat16, device="cuda")
    big = torch.full((m, n + 8), float("nan"), dtype=out_dtype, device="cuda")
    d_view = big[:, :n]
    api.bf16_gemm_nn(a_wide[:, :k], b, d_view)  # row-padded A (copied), strided d (staged)
    assert not d_view.isnan().any()
    assert _rel_err(d_view, a_wide[:, :k].double() @ b.double()) < _limit(out_dtype)
    assert big[:, n:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("batch,m,k,n", [(3, 100, 256, 512), (16, 1024, 1024, 1024), (2, 4096, 512, 4096)])
def test_bmm_fp16(dtype, out_dtype, batch, m, k, n):
    out_dtype = out_dtype or dtype
    a = torch.randn(batch, m, k, dtype=dtype, device="cuda")
    b = torch.randn(batch, k, n, dtype=dtype, device="cuda")
    out = torch.full((batch, m, n), float("nan"), dtype=out_dtype, device="cuda")
    assert mate.gemm.bmm_fp16(a, b, out_dtype, out=out) is out
    assert not out.isnan().any()
    assert _rel_err(out, a.double() @ b.double()) < _limit(out_dtype)


def test_bf16_one_compile_serves_every_m():
    """M is dynamic: one compile per tile serves every M."""
    n, k = 640, 384  # a shape no other test uses
    before = jit.stats["compiled"] + jit.stats["loaded"]
    for m in (1, 3, 17, 64):
        a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        d = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        api.bf16_gemm_nt(a, b, d)
        assert _rel_err(d, a.double() @ b.double().T) < _limit(torch.bfloat16)
    assert jit.stats["compiled"] + jit.stats["loaded"] - before == 1


@pytest.mark.parametrize("tile", ["p128n256", "p128n128"])
@pytest.mark.parametrize("major_a,major_b", [("K", "K"), ("K", "MN"), ("MN", "K"), ("MN", "MN")])
def test_persistent_kernel_tiles(monkeypatch, tile, major_a, major_b):
    """Both persistent tiles in every major order, forced: several batches walked as one tile
    space, M, N and K off the tile edges (TMA zero-fills loads and clips stores), M = 8 (one
    partial tile per batch) and more tiles than SMs (each CTA walks several, the ring wraps)."""
    from mate.ops.gemm import bf16_launch, support

    monkeypatch.setattr(bf16_launch, "tile_for", lambda *args, **kwargs: tile)
    for batch, m, n, k in ((3, 296, 520, 200), (2, 8, 136, 64), (40, 520, 1000, 328)):
        a = torch.randn(batch, m, k, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(batch, n, k, dtype=torch.bfloat16, device="cuda")
        # Operands stored in the named major order, passed as logical (batch, rows, K) views.
        a_arg = a if major_a == "K" else a.transpose(1, 2).contiguous().transpose(1, 2)
        b_arg = b if major_b == "K" else b.transpose(1, 2).contiguous().transpose(1, 2)
        d = torch.full((batch, m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        bf16_launch.gemm(support.BF16_GEMM.name, support.BF16_GEMM.build, a_arg, b_arg, d)
        assert not d.isnan().any()
        assert _rel_err(d, a.double() @ b.double().transpose(1, 2)) < _limit(torch.bfloat16), (batch, m, n, k)
