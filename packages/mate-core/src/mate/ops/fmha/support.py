"""What the attention kernels accept: the data behind dispatch, tests, show-config and docs."""

from __future__ import annotations

import torch

from mate import dispatch

# Kernel head dims: multiples of 4 up to 512 (the API pads other head dims to the next
# multiple of 4, as upstream does); one kernel per head dim, the common ones prebuilt by `mate aot`.
COMBINE_HEAD_DIMS = range(4, 513, 4)
COMBINE_AOT_HEAD_DIMS = (64, 96, 128, 192, 256, 512)
COMBINE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _combine_check_case(device: torch.device):
    from mate.ops.fmha import reference
    from mate.ops.fmha.api import flash_attn_combine
    from mate.testing.fmha import combine_inputs

    out_partial, lse_partial = combine_inputs(3, 2, 5, 4, 64, device=device)

    def run():
        return flash_attn_combine(out_partial, lse_partial, out_dtype=torch.bfloat16)

    def expected():
        out, lse = reference.flash_attn_combine(out_partial.cpu().double(), lse_partial.cpu().double())
        return out, lse

    return run, expected


def _build_combine(**variant):
    from mate.ops.fmha import combine_kernel

    return combine_kernel.build(**variant)


def _combine_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return {torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}.get(dtype, (1e-5, 1e-5))


COMBINE = dispatch.register(dispatch.Op(
    name="fmha.flash_attn_combine",
    family="fmha",
    support=dispatch.Support({"head_dim": COMBINE_HEAD_DIMS, "out_dtype": COMBINE_DTYPES}),
    build=_build_combine,
    check_case=_combine_check_case,
    aot_variants=lambda: [{"head_dim": d, "out_dtype": t} for d in COMBINE_AOT_HEAD_DIMS for t in COMBINE_DTYPES],
    tolerance=_combine_tolerance,
))
