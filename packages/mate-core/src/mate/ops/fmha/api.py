"""Public attention functions (FlashAttention-3 semantics)."""

from __future__ import annotations

import torch

from mate import checks, dispatch, jit, platform
from mate.api import call_op, mate_api
from mate.ops.fmha import reference
from mate.ops.fmha.support import COMBINE

COMBINE_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMBINE_MAX_SPLITS = 256
COMBINE_MAX_HEAD_DIM = 512


@mate_api(name="fmha.flash_attn_combine", tolerance=COMBINE.tolerance)
def flash_attn_combine(out_partial: torch.Tensor, lse_partial: torch.Tensor, out: torch.Tensor | None = None,
                       out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partial attention outputs with their log-sum-exp.

    out_partial: (num_splits, batch, seqlen, heads, head_dim) float32, last dim contiguous.
    lse_partial: (num_splits, batch, seqlen, heads) float32, seqlen dim contiguous.
    Returns (out, softmax_lse): out (batch, seqlen, heads, head_dim) in out_dtype (default
    float32; written into `out` when given), softmax_lse (batch, seqlen, heads) float32, a
    transposed view of a contiguous (batch, heads, seqlen) tensor as upstream returns it.
    """
    checks.tensor("out_partial", out_partial, dtypes=(torch.float32,), ndim=5, last_dim_contiguous=True)
    device = out_partial.device
    checks.tensor("lse_partial", lse_partial, dtypes=(torch.float32,), ndim=4, device=device)
    num_splits, batch, seqlen, heads, head_dim = out_partial.shape
    checks.shape("lse_partial", lse_partial, (num_splits, batch, seqlen, heads), "num_splits, batch, seqlen, heads")
    if seqlen > 1 and lse_partial.stride(2) != 1:
        raise checks.ArgumentError(f"lse_partial: the seqlen dimension must be contiguous (stride 1), "
                                   f"got strides {lse_partial.stride()}")
    checks.at_most("out_partial", num_splits, COMBINE_MAX_SPLITS, "num_splits (dim 0)")
    checks.at_most("out_partial", head_dim, COMBINE_MAX_HEAD_DIM, "head_dim (dim 4)")
    out_dtype = checks.dtype_choice("out_dtype", out_dtype or out_partial.dtype, COMBINE_OUT_DTYPES)
    if out is not None:
        checks.tensor("out", out, dtypes=(out_dtype,), ndim=4, device=device, last_dim_contiguous=True)
        checks.shape("out", out, (batch, seqlen, heads, head_dim), "batch, seqlen, heads, head_dim")
    else:
        out = torch.empty((batch, seqlen, heads, head_dim), dtype=out_dtype, device=device)
    softmax_lse = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=device).transpose(1, 2)
    if out.numel():
        call_op(torch.ops.mate.fmha_combine, _combine, out_partial, lse_partial, out, softmax_lse)
    return out, softmax_lse


def combine_variant(head_dim: int, out_dtype: torch.dtype) -> dict:
    return {"head_dim": head_dim, "out_dtype": out_dtype}


def _combine(out_partial: torch.Tensor, lse_partial: torch.Tensor, out: torch.Tensor,
             softmax_lse: torch.Tensor) -> None:
    """The mate::fmha_combine op (its schema: the four tensors), on any layout flash_attn_combine accepts."""
    combine_into(out_partial, lse_partial, out, softmax_lse)


def combine_into(out_partial: torch.Tensor, lse_partial: torch.Tensor, out: torch.Tensor, softmax_lse: torch.Tensor,
                 laid_out: bool = False, backend: str = "auto") -> None:
    """The combine op's body. laid_out: the caller guarantees what combine_kernel.check_layout checks
    (decode_kernel.launch does for the partials it allocates), so it is not checked again. backend:
    dispatch.select's per-call choice."""
    head_dim = out_partial.shape[-1]
    # The kernel works on head dims that are multiples of 4 (16-byte loads); like upstream,
    # other head dims run padded.
    kernel_head_dim = -(-head_dim // 4) * 4
    variant = combine_variant(kernel_head_dim, out.dtype)
    if dispatch.select(COMBINE, variant, out_partial.device, backend) == "reference":
        merged, lse = reference.flash_attn_combine(out_partial, lse_partial)
        out.copy_(merged)
        softmax_lse.copy_(lse)
        return
    from mate.ops.fmha import combine_kernel

    target = platform.device_info(out_partial.device).tilelang_target
    kernel = jit.get_kernel(COMBINE.name, variant, target, COMBINE.build)
    if kernel_head_dim == head_dim and (
            laid_out or combine_kernel.check_layout(out_partial, lse_partial, out, softmax_lse)):
        kernel(*combine_kernel.launch_args(out_partial, lse_partial, out, softmax_lse))
        return
    # Layouts the kernel cannot address with aligned vector loads: compact, padded copies.
    padding = (0, kernel_head_dim - head_dim)
    compact_partial = torch.nn.functional.pad(out_partial, padding)
    compact_out = torch.empty(out.shape[:-1] + (kernel_head_dim,), dtype=out.dtype, device=out.device)
    kernel(*combine_kernel.launch_args(compact_partial, lse_partial, compact_out, softmax_lse))
    out.copy_(compact_out[..., :head_dim])


_combine_op = torch.library.custom_op("mate::fmha_combine", _combine, mutates_args=("out", "softmax_lse"))
_combine_op.register_fake(lambda out_partial, lse_partial, out, softmax_lse: None)
