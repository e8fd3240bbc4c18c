"""The BF16 GEMM launcher's kernel choice on the CPU (fake sm_90a GPU, kernels recorded): which
calls run the persistent kernel, with which tile and how many CTAs, and which stay on the
one-CTA-per-tile kernel."""

import pytest
import torch

pytest.importorskip("tilelang")

import mate.gemm  # noqa: E402
from mate.ops.gemm import api, bf16_launch  # noqa: E402
from mate.testing import kernels as kernel_checks  # noqa: E402

SMS = kernel_checks.FAKE_GPU.multiprocessors


@pytest.mark.parametrize("m,n,k,groups,tile", [
    (64, 2112, 7168, 1, "m64n128"),  # few rows, few blocks: weight-bandwidth-bound
    (4096, 7168, 2048, 1, "p128n256"),
    (4096, 2112, 7168, 1, "m128n192"),  # fills the waves; measured faster than either persistent tile
    (4096, 32768, 2048, 1, "p128n256"),
    (512, 512, 4096, 128, "p128n256"),  # bmm: the batch is part of the tile space
    (100, 512, 4096, 3, "p128n128"),  # 128 x 256 tiles would leave SMs idle
    (1024, 1024, 4096, 2, "p128n128"),
    (4096, 32768, 512, 1, "p128n128"),  # short K
    (1024, 1024, 1024, 64, "p128n128"),
    (512, 512, 128, 128, "p128n256"),  # shorter still: the larger tile's fewer epilogues win
])
def test_persistent_tile_rule(m, n, k, groups, tile):
    assert bf16_launch.tile_for(m, n, k, groups, 132, persistent=True) == tile


def test_ctas_one_per_sm_or_per_tile():
    assert bf16_launch.ctas("p128n256", 4096, 7168, 1, 132) == 132
    assert bf16_launch.ctas("p128n128", 100, 512, 3, 132) == 12
    assert bf16_launch.ctas("p128n128", 0, 512, 1, 132) == 1  # no rows: one CTA that walks no tile


def _recorded(monkeypatch, call):
    calls = kernel_checks.record_kernel_calls(monkeypatch)
    call()
    assert len(calls) == 1
    kernel_checks.assert_call_matches_signature(calls[0])
    return calls[0]


def test_bmm_runs_persistent_with_the_batch_in_the_tile_space(monkeypatch):
    batch, m, k, n = 128, 512, 128, 512
    a, b = torch.randn(batch, m, k, dtype=torch.float16), torch.randn(batch, k, n, dtype=torch.float16)
    out = torch.empty(batch, m, n, dtype=torch.float16)
    call = _recorded(monkeypatch, lambda: mate.gemm.bmm_fp16(a, b, torch.float16, out=out))
    assert call.variant["tile"] == "p128n256" and call.variant["major_b"] == "MN"
    assert call.args[-1] == min(SMS, batch * 4 * 2)  # ctas


@pytest.mark.parametrize("case", ["accumulate", "float32", "masked"])
def test_other_calls_keep_the_one_cta_per_tile_kernel(monkeypatch, case):
    m, n, k = 4096, 4096, 512
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    if case == "accumulate":
        d = torch.randn(m, n, dtype=torch.float32)
        call = _recorded(monkeypatch, lambda: api.bf16_gemm_nt(a, b, d, c=d))
    elif case == "float32":
        d = torch.empty(m, n, dtype=torch.float32)
        call = _recorded(monkeypatch, lambda: api.bf16_gemm_nt(a, b, d))
    else:
        groups = 2
        a3, b3 = a.view(groups, m // groups, k), torch.randn(groups, n, k, dtype=torch.bfloat16)
        d = torch.empty(groups, m // groups, n, dtype=torch.bfloat16)
        masked_m = torch.tensor([5, 2048], dtype=torch.int32)
        call = _recorded(monkeypatch, lambda: api.m_grouped_bf16_gemm_nt_masked(a3, b3, d, masked_m, 2048))
    assert not call.variant["tile"].startswith("p")
