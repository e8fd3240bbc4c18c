"""The torch.library ops behind the GEMM functions pass torch's operator checks (schema, fake
implementation, in-place mutation of d), so torch.compile can trace them."""

import pytest
import torch

from mate.ops.gemm import (
    api,  # noqa: F401  (registers the ops)
    layouts,
)


def _fp8(m, n, k):
    a = layouts.per_token_cast_to_fp8(torch.randn(m, k), False)
    b = layouts.per_block_cast_to_fp8(torch.randn(n, k), False)
    return a, b


@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_nt_opcheck(accumulate):
    (a, sfa), (b, sfb) = _fp8(16, 128, 256)
    d = torch.empty(16, 128, dtype=torch.bfloat16)
    c = torch.randn(16, 128).bfloat16() if accumulate else None
    # test_schema compares inputs arithmetically, which CPU fp8 tensors do not support: run the rest.
    torch.library.opcheck(torch.ops.mate.gemm_nt.default, (a, b, d, sfa, sfb, c, 1, 128),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
    a16, b16 = torch.randn(16, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.mate.gemm_nt.default, (a16, b16, torch.empty(16, 32), None, None, None, 1, 1))


def test_grouped_opchecks():
    (a, sfa), _ = _fp8(128, 128, 128)
    b = torch.randn(2, 64, 128, dtype=torch.bfloat16)
    a_bf16 = torch.randn(128, 128, dtype=torch.bfloat16)
    layout = torch.full((128,), -1, dtype=torch.int32)
    layout[:50] = 1
    d = torch.empty(128, 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.mate.gemm_m_grouped_contiguous.default,
                          (a_bf16, b, d, layout, None, None, False, 128, 1))
    masked = torch.tensor([3, 7], dtype=torch.int32)
    d3 = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.mate.gemm_m_grouped_masked.default,
                          (torch.randn(2, 8, 128, dtype=torch.bfloat16), b, d3, masked, None, None, 1))
    ka, kb = torch.randn(256, 8, dtype=torch.bfloat16), torch.randn(256, 16, dtype=torch.bfloat16)
    dk, ck = torch.empty(2, 8, 16), torch.randn(2, 8, 16)
    torch.library.opcheck(torch.ops.mate.gemm_k_grouped_tn.default,
                          (ka, kb, dk, ck, [128, 128], torch.tensor([128, 128], dtype=torch.int32), None, None))
    assert sfa.shape == (128, 1)
