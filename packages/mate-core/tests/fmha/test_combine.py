"""flash_attn_combine: reference vs a float64 formula, kernel vs reference, bad inputs."""

import math

import pytest
import torch

from mate import jit, testing
from mate.checks import ArgumentError, ArgumentTypeError
from mate.mha_interface import flash_attn_combine
from mate.ops.fmha import reference
from mate.ops.fmha.support import COMBINE
from mate.testing.fmha import combine_inputs


def naive_combine(out_partial, lse_partial):
    """Row by row in float64 with math.exp/log: the formula written out."""
    num_splits = out_partial.shape[0]
    rows_out = out_partial.double().reshape(num_splits, -1, out_partial.shape[-1])
    rows_lse = lse_partial.double().reshape(num_splits, -1)
    out = torch.zeros(rows_out.shape[1:], dtype=torch.float64)
    lse = torch.empty(rows_lse.shape[1], dtype=torch.float64)
    for r in range(rows_lse.shape[1]):
        values = rows_lse[:, r].tolist()
        finite = [v for v in values if v != -math.inf]
        if not finite:
            lse[r] = -math.inf
            continue
        peak = max(finite)
        lse[r] = peak + math.log(sum(math.exp(v - peak) for v in finite))
        for s, v in enumerate(values):
            if v != -math.inf:
                out[r] += math.exp(v - lse[r].item()) * rows_out[s, r]
    return out.reshape(out_partial.shape[1:]), lse.reshape(lse_partial.shape[1:])


@pytest.mark.parametrize("num_splits", [1, 2, 5, 17])
@pytest.mark.parametrize("seqlen", [1, 3, 13])
def test_reference_matches_float64_formula(num_splits, seqlen):
    out_partial, lse_partial = combine_inputs(num_splits, 4, seqlen, 3, 8, seed=num_splits * 100 + seqlen)
    out, lse = reference.flash_attn_combine(out_partial.double(), lse_partial.double())
    want_out, want_lse = naive_combine(out_partial, lse_partial)
    assert torch.allclose(out, want_out, atol=1e-12, rtol=1e-12)
    assert torch.equal(lse.isinf(), want_lse.isinf())
    assert torch.allclose(lse, want_lse, atol=1e-12, rtol=1e-12)


def test_reference_ignores_garbage_in_empty_splits():
    out_partial, lse_partial = combine_inputs(4, 3, 5, 2, 8)
    poisoned = out_partial.clone()
    poisoned[lse_partial == float("-inf")] = float("nan")
    out, lse = reference.flash_attn_combine(poisoned, lse_partial)
    assert not out.isnan().any()
    assert torch.equal(out, reference.flash_attn_combine(out_partial, lse_partial)[0])


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_public_function_on_cpu(out_dtype):
    out_partial, lse_partial = combine_inputs(5, 3, 7, 4, 16, seed=7)
    out, lse = flash_attn_combine(out_partial, lse_partial, out_dtype=out_dtype)
    want_out, want_lse = naive_combine(out_partial, lse_partial)
    assert out.dtype == (out_dtype or torch.float32) and out.shape == (3, 7, 4, 16)
    assert lse.dtype == torch.float32 and lse.shape == (3, 7, 4) and lse.transpose(1, 2).is_contiguous()
    testing.assert_within_low_precision_error(out, want_out, want_out.to(out.dtype))
    assert torch.allclose(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_out_argument_is_written_and_returned():
    out_partial, lse_partial = combine_inputs(3, 2, 4, 2, 8)
    out = testing.poison(torch.empty(2, 4, 2, 8, dtype=torch.bfloat16))
    result, _ = flash_attn_combine(out_partial, lse_partial, out=out, out_dtype=torch.bfloat16)
    assert result.data_ptr() == out.data_ptr() and not out.isnan().any()


def test_torch_compile_fullgraph():
    out_partial, lse_partial = combine_inputs(3, 2, 4, 2, 8)

    def merged(o, partial_lse):
        out, lse = flash_attn_combine(o, partial_lse, out_dtype=torch.float32)
        return out * 2, lse

    compiled = torch.compile(merged, fullgraph=True, backend="aot_eager")
    out, lse = compiled(out_partial, lse_partial)
    want_out, want_lse = merged(out_partial, lse_partial)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


def _good():
    return combine_inputs(3, 2, 4, 2, 8)


@pytest.mark.parametrize("make, error, message", [
    (lambda o, lse: (o.half(), lse), ArgumentTypeError, "out_partial: dtype float16 is not accepted"),
    (lambda o, lse: (o, lse.double()), ArgumentTypeError, "lse_partial: dtype float64 is not accepted"),
    (lambda o, lse: (o[0], lse), ArgumentError, "out_partial: expected a 5-D tensor"),
    (lambda o, lse: (o, lse[0]), ArgumentError, "lse_partial: expected a 4-D tensor"),
    (lambda o, lse: (o, lse[:, :1]), ArgumentError, r"lse_partial: expected shape \(3, 2, 4, 2\)"),
    (lambda o, lse: (o.transpose(-1, -2), lse), ArgumentError, "out_partial: the last dimension must be contiguous"),
    (lambda o, lse: (o, lse.contiguous()), ArgumentError, "lse_partial: the seqlen dimension must be contiguous"),
    (lambda o, lse: ("tensor", lse), ArgumentTypeError, "out_partial: expected a torch.Tensor, got str"),
    (lambda o, lse: (o[:1].expand(257, -1, -1, -1, -1), lse[:1].expand(257, -1, -1, -1)), ArgumentError,
     "num_splits .* is 257; at most 256"),
    (lambda o, lse: (torch.randn(3, 2, 4, 2, 516), lse), ArgumentError, "head_dim .* is 516; at most 512"),
])
def test_bad_inputs(make, error, message):
    out_partial, lse_partial = make(*_good())
    with pytest.raises(error, match=message):
        flash_attn_combine(out_partial, lse_partial)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"out_dtype": torch.float64}, ArgumentTypeError, "out_dtype: float64 is not accepted"),
    ({"out_dtype": "bf16"}, ArgumentTypeError, "out_dtype: 'bf16' is not accepted"),
    ({"out": torch.empty(2, 4, 2, 8, dtype=torch.bfloat16)}, ArgumentTypeError, "out: dtype bfloat16 is not accepted"),
    ({"out": torch.empty(2, 4, 2, 9)}, ArgumentError, r"out: expected shape \(2, 4, 2, 8\)"),
    ({"out": torch.empty(2, 4, 8, 2).transpose(-1, -2)}, ArgumentError, "out: the last dimension must be contiguous"),
    ({"out": torch.empty(2, 4, 2, 8)[None]}, ArgumentError, "out: expected a 4-D tensor"),
])
def test_bad_output_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        flash_attn_combine(*_good(), **kwargs)


@pytest.mark.gpu
def test_inputs_on_different_devices_are_rejected():
    out_partial, lse_partial = _good()
    with pytest.raises(ArgumentError, match="lse_partial: on cpu, but the other inputs are on cuda"):
        flash_attn_combine(out_partial.cuda(), lse_partial)


# ---- GPU: kernel vs reference over a grid modeled on upstream's test ------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 192, 256, 512])
@pytest.mark.parametrize("seqlen", [1, 2, 3, 32, 113, 640])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, 17, 55, 133])
def test_kernel_matches_reference(num_splits, seqlen, head_dim, out_dtype):
    # Upstream's batch 5 x 16 heads, shrunk where the partials would pass 2^26 elements.
    per_row = num_splits * seqlen * head_dim
    batch = max(1, min(5, 2**26 // (per_row * 16)))
    heads = max(1, min(16, 2**26 // (per_row * batch)))
    out_partial, lse_partial = combine_inputs(num_splits, batch, seqlen, heads, head_dim, device="cuda",
                                                    seed=testing.seed_for(f"{num_splits}-{seqlen}-{head_dim}"))
    out = testing.poison(torch.empty(batch, seqlen, heads, head_dim, dtype=out_dtype, device="cuda"))
    out, lse = flash_attn_combine(out_partial, lse_partial, out=out, out_dtype=out_dtype)
    want_out, want_lse = reference.flash_attn_combine(out_partial.double(), lse_partial.double())
    assert torch.equal(lse.isinf().cpu(), want_lse.isinf().cpu())
    assert torch.allclose(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    testing.assert_within_low_precision_error(out, want_out, want_out.to(out_dtype))


@pytest.mark.gpu
def test_kernel_ignores_garbage_in_empty_splits():
    out_partial, lse_partial = combine_inputs(6, 4, 33, 8, 128, device="cuda")
    clean, _ = flash_attn_combine(out_partial, lse_partial)
    out_partial[lse_partial == float("-inf")] = float("nan")
    dirty, _ = flash_attn_combine(out_partial, lse_partial)
    assert torch.equal(clean, dirty)


@pytest.mark.gpu
def test_one_compile_serves_every_size():
    before = dict(jit.stats)
    for index, (splits, batch, seqlen) in enumerate([(2, 1, 1), (7, 3, 100), (33, 2, 517), (256, 1, 9)]):
        out_partial, lse_partial = combine_inputs(splits, batch, seqlen, 4, 64, device="cuda", seed=index)
        out, lse = flash_attn_combine(out_partial, lse_partial, out_dtype=torch.float16)
        want_out, want_lse = reference.flash_attn_combine(out_partial.double(), lse_partial.double())
        testing.assert_within_low_precision_error(out, want_out, want_out.half())
    builds = jit.stats["compiled"] + jit.stats["loaded"] - before["compiled"] - before["loaded"]
    assert builds <= 1


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    out_partial, lse_partial = combine_inputs(4, 8, 1, 32, 128, device="cuda")
    out = torch.empty(8, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
    flash_attn_combine(out_partial, lse_partial, out=out, out_dtype=torch.bfloat16)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = flash_attn_combine(out_partial, lse_partial, out=out, out_dtype=torch.bfloat16)
    fresh_out, fresh_lse = combine_inputs(4, 8, 1, 32, 128, device="cuda", seed=99)
    out_partial.copy_(fresh_out)
    lse_partial.copy_(fresh_lse)
    testing.poison(out)
    graph.replay()
    want_out, want_lse = reference.flash_attn_combine(out_partial.double(), lse_partial.double())
    testing.assert_within_low_precision_error(out, want_out, want_out.bfloat16())
    assert torch.allclose(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.compile
@pytest.mark.parametrize("variant", [{"head_dim": 128, "out_dtype": torch.bfloat16},
                                     {"head_dim": 64, "out_dtype": torch.float32},
                                     {"head_dim": 200, "out_dtype": torch.float16}])
def test_kernel_compiles_for_sm90a(variant):
    from mate import platform

    kernel = jit.get_kernel(COMBINE.name, variant, platform.tilelang_target("sm_90a"), COMBINE.build)
    assert "__global__" in kernel.get_kernel_source()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [30, 66])
def test_kernel_pads_head_dims_and_compacts_unaligned_layouts(head_dim):
    out_partial, lse_partial = combine_inputs(5, 3, 17, 4, head_dim + 1, device="cuda")
    out_partial = out_partial[..., 1:]  # misaligned start: the kernel's 16-byte loads cannot use it
    out, lse = flash_attn_combine(out_partial, lse_partial, out_dtype=torch.bfloat16)
    want_out, want_lse = reference.flash_attn_combine(out_partial.double(), lse_partial.double())
    testing.assert_within_low_precision_error(out, want_out, want_out.bfloat16())
    assert torch.allclose(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
