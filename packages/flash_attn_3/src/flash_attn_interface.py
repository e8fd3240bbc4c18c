"""FlashAttention-3's Python interface (`import flash_attn_interface`), served by MATE.

Same public names, signatures and return structures as upstream's
`hopper/flash_attn_interface.py` (Dao-AILab/flash-attention); every call is translated into
one call of `mate.mha_interface` (`flash_attn_varlen_func`, `flash_attn_with_kvcache`,
`get_scheduler_metadata`, `flash_attn_combine`), which validates the inputs, picks a backend
(TileLang kernels on a GPU, the PyTorch reference on CPU) and runs it.

Differences from upstream, all deliberate:
- Forward only. The autograd Functions exist (serving code and `torch.compile` see the same
  objects), but their backward raises NotImplementedError instead of computing a gradient.
- Split-KV accumulators: upstream's `flash_attn_with_kvcache(..., return_softmax_lse=True)`
  and `_flash_attn_forward` also return `out_accum` and `softmax_lse_accum`, which are empty
  tensors unless its kernel split the KV sequence. MATE combines splits internally, so these
  two are always the empty tensors (unless `mate` itself returns accumulators).
"""

from typing import Optional, Tuple, Union

import torch

import mate
from mate import mha_interface as _mate

__all__ = [
    "FlashAttnFunc",
    "FlashAttnQKVPackedFunc",
    "FlashAttnVarlenFunc",
    "flash_attn_combine",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "get_scheduler_metadata",
    "maybe_contiguous",
    "round_multiple",
    "round_up_headdim",
]

BACKWARD_NOT_IMPLEMENTED = (
    "flash_attn_3 backward is not implemented in MATE: the flash_attn_3 wrapper serves "
    "FlashAttention-3's forward paths (inference) only. Run the attention under torch.no_grad() "
    "or torch.inference_mode(), or detach its inputs."
)


def _mate_function(name: str):
    """`mate.mha_interface.<name>`, looked up per call so that a missing one fails only the
    functions that need it, with a message that says what is missing."""
    function = getattr(_mate, name, None)
    if function is None:
        raise NotImplementedError(
            f"flash_attn_3 needs mate.mha_interface.{name}, which the installed mate-core "
            f"({mate.__version__}) does not provide")
    return function


def _default_softmax_scale(q: torch.Tensor, qv: Optional[torch.Tensor]) -> float:
    """Upstream's Python-level default: 1 / sqrt(head dim of q, plus that of qv when given)."""
    head_dim = q.shape[-1] + (qv.shape[-1] if qv is not None else 0)
    return head_dim ** (-0.5)


def _empty_split_accumulators(out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """What upstream returns for (out_accum, softmax_lse_accum) when the KV was not split."""
    return (torch.empty(0, dtype=torch.float32, device=out.device),
            torch.empty(0, dtype=torch.float32, device=out.device))


def _with_accumulators(result) -> Tuple[torch.Tensor, ...]:
    out, softmax_lse, *accumulators = result
    if not accumulators:
        accumulators = _empty_split_accumulators(out)
    return (out, softmax_lse, *accumulators)


def _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal, qv, q_descale, k_descale, v_descale, window_size, attention_chunk,
                softcap, num_splits, pack_gqa, deterministic, sm_margin, return_softmax_lse):
    """The forward shared by flash_attn_func (cu_seqlens None), flash_attn_varlen_func and
    flash_attn_qkvpacked_func: `out`, or `(out, softmax_lse)` when `return_softmax_lse`."""
    result = _mate_function("flash_attn_varlen_func")(
        q, k, v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        softmax_scale=softmax_scale,
        causal=causal,
        qv=qv,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        window_size=window_size,
        attention_chunk=attention_chunk,
        softcap=softcap,
        num_splits=num_splits,
        pack_gqa=pack_gqa,
        deterministic=deterministic,
        sm_margin=sm_margin,
        return_softmax_lse=return_softmax_lse,
    )
    if return_softmax_lse:
        out, softmax_lse = result[0], result[1]
        return out, softmax_lse
    return result


def maybe_contiguous(x):
    """`x` with a contiguous last dimension (a copy only when it is not); None stays None."""
    if x is None or x.stride(-1) == 1:
        return x
    return x.contiguous()


def round_multiple(x, m):
    """The smallest multiple of `m` that is at least `x`."""
    return -(-x // m) * m


def round_up_headdim(head_size: int) -> int:
    """The head dimension of the kernel that serves `head_size`, from the build flags in
    `flash_attn_config.CONFIG` (MATE builds every one of upstream's head dimensions)."""
    from flash_attn_config import CONFIG

    flags = CONFIG["build_flags"]
    for kernel_head_dim in (64, 96, 128, 192, 256):
        if not flags[f"FLASHATTENTION_DISABLE_HDIM{kernel_head_dim}"] and head_size <= kernel_head_dim:
            return kernel_head_dim
    return 256


def _flash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_new: Optional[torch.Tensor] = None,
    v_new: Optional[torch.Tensor] = None,
    qv: Optional[torch.Tensor] = None,
    out_: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    seqused_q: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    page_table: Optional[torch.Tensor] = None,
    kv_batch_idx: Optional[torch.Tensor] = None,
    leftpad_k: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    seqlens_rotary: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size_left: int = -1,
    window_size_right: int = -1,
    attention_chunk: int = 0,
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    scheduler_metadata: Optional[torch.Tensor] = None,
    num_splits: int = 1,
    pack_gqa: Optional[bool] = None,
    sm_margin: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upstream's low-level forward (used directly by ring-attention and compiler code that
    needs the LSE): `(out, softmax_lse, out_accum, softmax_lse_accum)`.

    Calls that append new keys/values to a cache (k_new/v_new, cu_seqlens_k_new, kv_batch_idx,
    leftpad_k, rotary) go to mate's flash_attn_with_kvcache, with seqused_k as the cache
    lengths; all others to mate's flash_attn_varlen_func.
    """
    if softmax_scale is None:
        # The op's own default, which (unlike the public functions) leaves qv out.
        softmax_scale = q.shape[-1] ** (-0.5)
    window_size = (window_size_left, window_size_right)
    appends_to_cache = any(x is not None for x in (
        k_new, v_new, cu_seqlens_k_new, kv_batch_idx, leftpad_k, rotary_cos, rotary_sin, seqlens_rotary))
    if appends_to_cache:
        unsupported = [name for name, value in (
            ("cu_seqlens_k", cu_seqlens_k), ("seqused_q", seqused_q), ("max_seqlen_k", max_seqlen_k))
            if value is not None]
        if unsupported:
            raise NotImplementedError(
                f"_flash_attn_forward: {', '.join(unsupported)} together with new keys/values for the cache "
                f"(k_new/v_new/cu_seqlens_k_new/kv_batch_idx/leftpad_k/rotary) is not supported in MATE; "
                f"use cache lengths (seqused_k) for the cache")
        result = _mate_function("flash_attn_with_kvcache")(
            q, k, v,
            k=k_new,
            v=v_new,
            qv=qv,
            rotary_cos=rotary_cos,
            rotary_sin=rotary_sin,
            cache_seqlens=seqused_k,
            cache_batch_idx=kv_batch_idx,
            cache_leftpad=leftpad_k,
            page_table=page_table,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k_new=cu_seqlens_k_new,
            max_seqlen_q=max_seqlen_q,
            rotary_seqlens=seqlens_rotary,
            q_descale=q_descale,
            k_descale=k_descale,
            v_descale=v_descale,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            attention_chunk=attention_chunk,
            softcap=softcap,
            rotary_interleaved=rotary_interleaved,
            scheduler_metadata=scheduler_metadata,
            num_splits=num_splits,
            pack_gqa=pack_gqa,
            sm_margin=sm_margin,
            return_softmax_lse=True,
        )
        out, softmax_lse, *rest = _with_accumulators(result)
        if out_ is not None:
            out_.copy_(out)  # mate's kvcache path has no out= argument
            out = out_
        return (out, softmax_lse, *rest)
    result = _mate_function("flash_attn_varlen_func")(
        q, k, v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        page_table=page_table,
        softmax_scale=softmax_scale,
        causal=causal,
        qv=qv,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        window_size=window_size,
        attention_chunk=attention_chunk,
        softcap=softcap,
        scheduler_metadata=scheduler_metadata,
        num_splits=num_splits,
        pack_gqa=pack_gqa,
        sm_margin=sm_margin,
        return_softmax_lse=True,
        out=out_,
    )
    return _with_accumulators(result)


def _flash_attn_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    sequed_q: Optional[torch.Tensor] = None,
    sequed_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    dq: Optional[torch.Tensor] = None,
    dk: Optional[torch.Tensor] = None,
    dv: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    is_causal: bool = False,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = False,
    sm_margin: int = 0,
) -> torch.Tensor:
    """Upstream's low-level backward: not implemented in MATE."""
    raise NotImplementedError(BACKWARD_NOT_IMPLEMENTED)


class _ForwardOnlyFunction(torch.autograd.Function):
    """An autograd Function whose backward refuses rather than return a wrong gradient."""

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise NotImplementedError(BACKWARD_NOT_IMPLEMENTED)

    @classmethod
    def run(cls, *args):
        """`apply` when autograd would record the call (an input requires grad), else the forward
        itself: inference records nothing, and `apply` costs ~15 us of host time per call."""
        if torch.is_grad_enabled():
            for a in args:  # a loop: any(<generator>) over the ~17 arguments costs ~2 us more
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return cls.apply(*args)
        return cls.forward(None, *args)


class FlashAttnQKVPackedFunc(_ForwardOnlyFunction):
    @staticmethod
    def forward(
        ctx,
        qkv,
        softmax_scale,
        causal,
        q_descale=None, k_descale=None, v_descale=None,
        window_size=(-1, -1),
        attention_chunk=0,
        softcap=0.0,
        deterministic=False,
        num_heads_q=None,
        sm_margin=0,
        return_softmax=False,
    ):
        if softmax_scale is None:
            softmax_scale = qkv.shape[-1] ** (-0.5)
        if qkv.dim() == 5:
            # (batch, seqlen, 3, heads, head_dim)
            if qkv.shape[-3] != 3:
                raise ValueError(f"qkv: a 5-D qkv must have 3 at dim -3 (batch, seqlen, 3, nheads, headdim), "
                                 f"got shape {tuple(qkv.shape)}")
            q, k, v = qkv.unbind(dim=-3)
        elif qkv.dim() == 4:
            # (batch, seqlen, num_heads_q + 2 * num_heads_k, head_dim)
            if num_heads_q is None:
                raise ValueError("num_heads_q: required when qkv is 4-D "
                                 "(batch, seqlen, num_heads_q + 2 * num_heads_k, headdim)")
            num_heads_k, remainder = divmod(qkv.shape[2] - num_heads_q, 2)
            if remainder or num_heads_k <= 0:
                raise ValueError(f"qkv: dim 2 ({qkv.shape[2]}) must be num_heads_q ({num_heads_q}) plus twice "
                                 f"the number of key/value heads")
            q, k, v = qkv.split([num_heads_q, num_heads_k, num_heads_k], dim=-2)
        else:
            raise ValueError(f"qkv: expected a 5-D (batch, seqlen, 3, nheads, headdim) or 4-D "
                             f"(batch, seqlen, nheads_q + 2 * nheads_k, headdim) tensor, got shape {tuple(qkv.shape)}")
        return _run_varlen(
            q, k, v, None, None, None, None, None, None, softmax_scale, causal, None,
            q_descale, k_descale, v_descale, window_size, attention_chunk, softcap,
            1,  # num_splits: upstream's packed path does not split
            None,  # pack_gqa
            deterministic, sm_margin, return_softmax)


class FlashAttnFunc(_ForwardOnlyFunction):
    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        softmax_scale,
        causal,
        qv=None,
        q_descale=None, k_descale=None, v_descale=None,
        window_size=(-1, -1),
        attention_chunk=0,
        softcap=0.0,
        num_splits=1,
        pack_gqa=None,
        deterministic=False,
        sm_margin=0,
        return_softmax=False,
    ):
        if softmax_scale is None:
            softmax_scale = _default_softmax_scale(q, qv)
        return _run_varlen(
            q, k, v, None, None, None, None, None, None, softmax_scale, causal, qv,
            q_descale, k_descale, v_descale, window_size, attention_chunk, softcap,
            num_splits, pack_gqa, deterministic, sm_margin, return_softmax)


class FlashAttnVarlenFunc(_ForwardOnlyFunction):
    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        seqused_q,
        seqused_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        causal,
        qv=None,
        q_descale=None, k_descale=None, v_descale=None,
        window_size=(-1, -1),
        attention_chunk=0,
        softcap=0.0,
        num_splits=1,
        pack_gqa=None,
        deterministic=False,
        sm_margin=0,
        return_softmax=False,
    ):
        if softmax_scale is None:
            softmax_scale = _default_softmax_scale(q, qv)
        return _run_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
            softmax_scale, causal, qv, q_descale, k_descale, v_descale, window_size, attention_chunk,
            softcap, num_splits, pack_gqa, deterministic, sm_margin, return_softmax)


def flash_attn_qkvpacked_func(
    qkv,
    softmax_scale=None,
    causal=False,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    deterministic=False,
    num_heads_q=None,
    sm_margin=0,
    return_attn_probs=False,
):
    """Attention over a packed qkv: (batch, seqlen, 3, nheads, headdim), or
    (batch, seqlen, nheads_q + 2 * nheads_k, headdim) with `num_heads_q` (GQA/MQA).
    q, k and v are views of `qkv` (no copies).

    Returns out (batch, seqlen, nheads, headdim), or (out, softmax_lse) with softmax_lse
    (batch, nheads, seqlen) when `return_attn_probs`.
    """
    return FlashAttnQKVPackedFunc.run(
        qkv, softmax_scale, causal, q_descale, k_descale, v_descale, window_size, attention_chunk,
        softcap, deterministic, num_heads_q, sm_margin, return_attn_probs)


def flash_attn_func(
    q,
    k,
    v,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
):
    """Fixed-length attention: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k,
    nheads_k, headdim[_v]); nheads must be a multiple of nheads_k (GQA/MQA). The causal mask
    and the window [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right] are
    aligned to the bottom-right corner. softmax_scale defaults to 1/sqrt(headdim (+ qv's)).

    Returns out (batch, seqlen_q, nheads, headdim_v), or (out, softmax_lse) with softmax_lse
    (batch, nheads, seqlen_q) when `return_attn_probs`.
    """
    return FlashAttnFunc.run(
        q, k, v, softmax_scale, causal, qv, q_descale, k_descale, v_descale, window_size,
        attention_chunk, softcap, num_splits, pack_gqa, deterministic, sm_margin, return_attn_probs)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    seqused_q=None,
    seqused_k=None,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
):
    """Variable-length attention over packed sequences: q (total_q, nheads, headdim), k/v
    (total_k, nheads_k, headdim[_v]), sequence b spanning cu_seqlens[b]:cu_seqlens[b + 1]
    (seqused_q/seqused_k, when given, limit how many of those rows are used).

    Returns out (total_q, nheads, headdim_v), or (out, softmax_lse) with softmax_lse
    (nheads, total_q) when `return_attn_probs`.
    """
    return FlashAttnVarlenFunc.run(
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
        softmax_scale, causal, qv, q_descale, k_descale, v_descale, window_size, attention_chunk,
        softcap, num_splits, pack_gqa, deterministic, sm_margin, return_attn_probs)


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Merge split-KV partial results: out_partial (num_splits, batch, seqlen, nheads, headdim)
    and lse_partial (num_splits, batch, seqlen, nheads), float32.

    Returns (out, softmax_lse): out (batch, seqlen, nheads, headdim) in out_dtype (written into
    `out` when given), softmax_lse (batch, seqlen, nheads) float32.
    """
    merged, softmax_lse = _mate_function("flash_attn_combine")(out_partial, lse_partial, out=out,
                                                               out_dtype=out_dtype)
    return merged, softmax_lse


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    qv=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    rotary_seqlens: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    attention_chunk=0,
    softcap=0.0,  # 0.0 means deactivated
    rotary_interleaved=True,
    scheduler_metadata=None,
    num_splits=0,  # Can be tuned for speed
    pack_gqa=None,  # Can be tuned for speed
    sm_margin=0,  # Can be tuned if some SMs are used for communication
    return_softmax_lse=False,
):
    """Attention against a KV cache (contiguous or paged through `page_table`), appending
    `k`/`v` in place at `cache_seqlens` first (with rotary embedding when rotary_cos/sin are
    given). Forward only, as upstream.

    Returns out (batch, seqlen, nheads, headdim_v) (or (total_q, ...) with cu_seqlens_q), or,
    when `return_softmax_lse`, (out, softmax_lse, out_accum, softmax_lse_accum) with softmax_lse
    (batch, nheads, seqlen) (or (nheads, total_q)); the two accumulators are upstream's split-KV
    scratch and are empty here (MATE merges splits internally).
    """
    if softmax_scale is None:
        softmax_scale = _default_softmax_scale(q, qv)
    result = _mate_function("flash_attn_with_kvcache")(
        q, k_cache, v_cache,
        k=k,
        v=v,
        qv=qv,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        page_table=page_table,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k_new=cu_seqlens_k_new,
        max_seqlen_q=max_seqlen_q,
        rotary_seqlens=rotary_seqlens,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        attention_chunk=attention_chunk,
        softcap=softcap,
        rotary_interleaved=rotary_interleaved,
        scheduler_metadata=scheduler_metadata,
        num_splits=num_splits,
        pack_gqa=pack_gqa,
        sm_margin=sm_margin,
        return_softmax_lse=return_softmax_lse,
    )
    if return_softmax_lse:
        return _with_accumulators(result)
    return result


def get_scheduler_metadata(
    batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
    cache_seqlens: torch.Tensor,
    qkv_dtype=torch.bfloat16,
    headdim_v=None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_size: Optional[int] = None,
    max_seqlen_k_new=0,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    attention_chunk=0,
    has_softcap=False,
    num_splits=0,  # Can be tuned for speed
    pack_gqa=None,  # Can be tuned for speed
    sm_margin=0,  # Can be tuned if some SMs are used for communication
):
    """Precompute the `scheduler_metadata` tensor for a flash_attn_with_kvcache call with the
    same arguments (cache_seqlens are the per-sequence cache lengths)."""
    return _mate_function("get_scheduler_metadata")(
        batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
        seqused_k=cache_seqlens,
        qkv_dtype=qkv_dtype,
        headdim_v=headdim_v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k_new=cu_seqlens_k_new,
        cache_leftpad=cache_leftpad,
        page_size=page_size,
        max_seqlen_k_new=max_seqlen_k_new,
        causal=causal,
        window_size=window_size,
        attention_chunk=attention_chunk,
        has_softcap=has_softcap,
        num_splits=num_splits,
        pack_gqa=pack_gqa,
        mp_margin=sm_margin,
    )
