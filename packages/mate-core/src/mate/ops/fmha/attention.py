"""FlashAttention-3's forward API: flash_attn_varlen_func, flash_attn_with_kvcache and
get_scheduler_metadata, with the signatures of the original MATE's ``mate.mha_interface``.

Every call validates its inputs as upstream's ``hopper/flash_api.cpp`` does (errors name the
argument), describes itself as a variant key, and runs through one ``torch.library`` custom
op that writes caller-visible outputs in place: ``mate::fmha_fwd`` (writes out and
softmax_lse) or, when new keys/values are appended to the cache, ``mate::fmha_fwd_kvcache``
(also writes k_cache and v_cache). The op picks its backend with :mod:`mate.dispatch`:
the PyTorch reference (:func:`mate.ops.fmha.reference.attention_forward`) on the CPU, a
TileLang kernel on a GPU.

The TileLang forward kernel (:mod:`mate.ops.fmha.forward_kernel`) covers prefill: fp16/bf16 and
FP8 e4m3 (descales per sequence and kv head, bf16 output; values transposed by a pre-pass),
head dims 64-256 (and 192/128), MHA/GQA/MQA, causal, local windows, softcap, learnable sinks,
fixed-length and varlen (cu_seqlens) batches with seqused_q / seqused_k, dense KV caches with
cache_seqlens, cache_leftpad and cache_batch_idx, and prefill-dominated calls on paged caches
(gathered into a dense copy first). The split-KV decode kernel (:mod:`mate.ops.fmha.decode_kernel`,
op ``DECODE``) serves 1-8 queries per sequence, other calls on paged caches (mixed prefill/decode
batches), FP8 calls the prefill kernel does not take, and at any query count what the prefill
kernel lacks: qv (FA3's MLA-style absorbed query), attention chunks and context parallelism
(packed keys then run as one cache row); with windows, softcap, sinks, leftpad and
cache_batch_idx. New keys/values of flash_attn_with_kvcache (with rotary embedding) are written
into the cache by the append kernel (:mod:`mate.ops.fmha.append_kernel`, op ``APPEND``) before
either attention kernel runs.
``FWD.support`` and ``DECODE.support`` say exactly what they accept; on a GPU any other
variant raises :class:`mate.UnsupportedError` naming the feature (or runs the reference with one
warning under MATE_ALLOW_REFERENCE_FALLBACK=1).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch

from mate import checks, constants, dispatch, jit, platform
from mate.api import mate_api
from mate.ops.fmha import reference

FWD_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
SINK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # Q/K head dimension (upstream's get_max_headdim)
MAX_HEAD_DIM_V = 512  # V head dimension, only with Q/K head dimension <= 64
MAX_SPLITS = 256
BACKENDS = ("auto", "tilelang", "reference", "mutlass", "mubin")  # the last two: the original MATE's names
KERNEL_BACKENDS = ("tilelang", "mutlass", "mubin")

# get_scheduler_metadata's tensor (int32, 1-D, length 3 * batch_size + 2):
#   [0]                      SCHEDULER_METADATA_VERSION
#   [1]                      batch_size
#   [2 : 2 + b]              seqlen_q of each batch element (seqused_q, cu_seqlens_q or max_seqlen_q)
#   [2 + b : 2 + 2b]         seqlen_k of each batch element: its cached keys (seqused_k, cu_seqlens_k or
#                            max_seqlen_k) minus cache_leftpad, plus its new keys (cu_seqlens_k_new or
#                            max_seqlen_k_new)
#   [2 + 2b : 2 + 3b]        suggested number of KV splits of each batch element (num_splits when > 0,
#                            else a heuristic from the multiprocessor count)
# All computed with device ops from the arguments (no host sync), so it can be built inside a CUDA graph.
# The reference path accepts it and ignores it: results never depend on it or on num_splits.
SCHEDULER_METADATA_VERSION = 1
_SPLIT_BLOCK_N = 128  # keys per block in the split heuristic


def scheduler_metadata_length(batch_size: int) -> int:
    return 3 * batch_size + 2


# ---- what a TileLang kernel accepts ------------------------------------------------------

def round_up_head_dim(head_dim: int) -> int:
    """The compiled Q/K head dimension a head dimension runs with (upstream's round_up_headdim)."""
    for size in (64, 96, 128, 192, 256):
        if head_dim <= size:
            return size
    return 256


def round_up_head_dim_v(head_dim_v: int) -> int:
    for size in (64, 96, 128, 192, 256):
        if head_dim_v <= size:
            return size
    return 512


# What the TileLang forward kernel accepts. Dispatch, `mate show-config`, the tests and the
# README read it; widen it as the kernel grows.
FWD_SUPPORT = dispatch.Support({
    "dtype": (torch.float16, torch.bfloat16, torch.float8_e4m3fn),
    "head_dim": (64, 96, 128, 192, 256),
    "head_dim_v": (64, 96, 128, 192, 256),
    "causal": (False, True),
    "local": (False, True),
    "softcap": (False, True),
    "learnable_sink": (False, True),
    "varlen_q": (False, True),
    "varlen_k": (False, True),
    "seqused": (False, True),
    "paged_kv": (False, True),
    "append_kv": (False, True),
    "rotary": (False, True),
    "qv": (False,),
    "attention_chunk": (False,),
    "leftpad_k": (False, True),
    "kv_batch_idx": (False, True),
    "context_parallel": (False,),
}, combinations={
    ("head_dim", "head_dim_v"): ((64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (192, 128)),
})


def fwd_variant(*, dtype: torch.dtype, head_dim: int, head_dim_v: int, causal: bool, local: bool, softcap: bool,
                learnable_sink: bool, varlen_q: bool, varlen_k: bool, seqused: bool, paged_kv: bool, append_kv: bool,
                rotary: bool, qv: bool, attention_chunk: bool, leftpad_k: bool, kv_batch_idx: bool,
                context_parallel: bool) -> dict:
    """The variant key of a forward call (head dims rounded as the kernels are compiled)."""
    rounded = round_up_head_dim(head_dim)
    return {
        "dtype": dtype, "head_dim": rounded,
        "head_dim_v": rounded if head_dim_v == head_dim else round_up_head_dim_v(head_dim_v),
        "causal": causal, "local": local, "softcap": softcap, "learnable_sink": learnable_sink,
        "varlen_q": varlen_q, "varlen_k": varlen_k, "seqused": seqused, "paged_kv": paged_kv, "append_kv": append_kv,
        "rotary": rotary, "qv": qv, "attention_chunk": attention_chunk, "leftpad_k": leftpad_k,
        "kv_batch_idx": kv_batch_idx, "context_parallel": context_parallel,
    }


def _build_fwd(*, dtype: torch.dtype, head_dim: int, head_dim_v: int, causal: bool, local: bool, softcap: bool,
               learnable_sink: bool = False, seqused: bool = False, **unused_features):
    from mate.ops.fmha import forward_kernel

    return forward_kernel.build(dtype, head_dim, head_dim_v, causal, has_window=local, has_softcap=softcap,
                                has_seqused=seqused, has_sink=learnable_sink)


# The FP8 prefill's pre-pass (forward_kernel.build_v_transpose), keyed by the V head dim and block_n.
FP8_V_TRANSPOSE = "fmha.fp8_v_transpose"




# Features the prefill launcher turns into the kernel's per-sequence start rows and used lengths
# (one compiled kernel, keyed seqused=True, serves them all) or gathers (paged_kv); appends run
# before it (append_kernel).
_PREFILL_HOST_FEATURES = ("varlen_q", "varlen_k", "seqused", "paged_kv", "append_kv", "rotary", "leftpad_k",
                          "kv_batch_idx")


def prefill_kernel_variant(variant: dict, seqused: bool) -> dict:
    """The compile key of the prefill kernel serving a forward variant: only what the kernel bakes in."""
    return {**variant, **{name: False for name in _PREFILL_HOST_FEATURES}, "varlen_q": True, "varlen_k": True,
            "seqused": seqused}


def _fwd_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return {torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}.get(dtype, (1e-5, 1e-5))


def _fwd_check_case(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    lengths_q, lengths_k = [3, 1, 5], [7, 4, 9]
    cu_q = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 11, 20], dtype=torch.int32)
    q = torch.randn(sum(lengths_q), 4, 64, generator=generator).to(torch.bfloat16)
    k = torch.randn(sum(lengths_k), 2, 64, generator=generator).to(torch.bfloat16)
    v = torch.randn(sum(lengths_k), 2, 64, generator=generator).to(torch.bfloat16)

    def run():
        return flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                                      max(lengths_q), max(lengths_k), causal=True, return_softmax_lse=True)

    def expected():
        return reference.attention_forward(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                           max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k), causal=True)

    return run, expected


def _aot_variants() -> list[dict]:
    """Prefill variants `mate aot` prebuilds: bf16/fp16/FP8 x the head dims x causal or not (varlen;
    fixed-length calls build the same kernel; FP8's V transposes are FP8_V_TRANSPOSE's)."""
    dims = [(64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (192, 128)]
    return [fwd_variant(dtype=dtype, head_dim=d, head_dim_v=dv, causal=causal, local=False, softcap=False,
                        learnable_sink=False, varlen_q=True, varlen_k=True, seqused=False, paged_kv=False,
                        append_kv=False, rotary=False, qv=False, attention_chunk=False, leftpad_k=False,
                        kv_batch_idx=False, context_parallel=False)
            for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn) for d, dv in dims
            for causal in (False, True)]


FWD = dispatch.register(dispatch.Op(name="fmha.attention_forward", family="fmha", support=FWD_SUPPORT,
                                    build=_build_fwd, check_case=_fwd_check_case, aot_variants=_aot_variants,
                                    tolerance=_fwd_tolerance))


def _build_fp8_v_transpose(*, head_dim_v: int, block_n: int):
    from mate.ops.fmha import forward_kernel

    return forward_kernel.build_v_transpose(head_dim_v, block_n)


def _fp8_v_transpose_check_case(device: torch.device):
    from mate.ops.fmha import forward_kernel

    generator = torch.Generator().manual_seed(0)
    starts, counts, block_n = [0, 5, 5], [5, 0, 200], 128  # 1 + 1 + 2 blocks
    v = torch.randn(sum(counts), 2, 64, generator=generator).to(torch.float8_e4m3fn)

    def expected():
        return forward_kernel.transposed_values_reference(v, starts, counts, block_n)

    def run():
        if not platform.device_info(device).is_gpu:
            return expected()
        kernel = jit.get_kernel(FP8_V_TRANSPOSE, {"head_dim_v": 64, "block_n": block_n},
                                platform.device_info(device).tilelang_target, _build_fp8_v_transpose)
        as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
        vt, _ = forward_kernel.transpose_values(kernel, v.to(device), as_int32(starts), as_int32(counts), 200,
                                                block_n, 4)
        return vt.float().cpu()

    return run, expected


def _fp8_v_transpose_aot_variants() -> list[tuple[int, int]]:
    from mate.ops.fmha import forward_kernel

    return sorted({(variant["head_dim_v"], forward_kernel.default_config(
        variant["head_dim"], variant["head_dim_v"], variant["causal"], dtype="float8_e4m3fn").block_n)
        for variant in _aot_variants() if variant["dtype"] == torch.float8_e4m3fn})


FP8_V_TRANSPOSE_OP = dispatch.register(dispatch.Op(
    name=FP8_V_TRANSPOSE, family="fmha",
    support=dispatch.Support({"head_dim_v": (64, 96, 128, 192, 256), "block_n": range(32, 257, 32)}),
    build=_build_fp8_v_transpose, check_case=_fp8_v_transpose_check_case,
    aot_variants=lambda: [{"head_dim_v": dv, "block_n": bn} for dv, bn in _fp8_v_transpose_aot_variants()]))


# The KV-cache append kernel (mate.ops.fmha.append_kernel): flash_attn_with_kvcache's new keys /
# values written into the cache (rotary applied to them and, into a temporary, to q) before the
# attention kernels run over the updated cache. Keyed by the call's own head dims.
APPEND_HEAD_DIMS = ((64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (192, 128))


def _build_append(*, dtype: torch.dtype, head_dim: int, head_dim_v: int):
    from mate.ops.fmha import append_kernel

    return append_kernel.build(dtype, head_dim, head_dim_v)


def _append_check_case(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 64, generator=generator).to(torch.bfloat16)
    k_cache = torch.randn(2, 40, 2, 64, generator=generator).to(torch.bfloat16)
    v_cache = torch.randn(2, 40, 2, 64, generator=generator).to(torch.bfloat16)
    k_new = torch.randn(2, 3, 2, 64, generator=generator).to(torch.bfloat16)
    v_new = torch.randn(2, 3, 2, 64, generator=generator).to(torch.bfloat16)
    angles = torch.rand(40, 16, generator=generator) * 6.28
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    cache_seqlens = torch.tensor([7, 30], dtype=torch.int32)

    def run():
        k_dev, v_dev = k_cache.to(device), v_cache.to(device)
        out, lse = flash_attn_with_kvcache(q.to(device), k_dev, v_dev, k_new.to(device), v_new.to(device),
                                           rotary_cos=cos.to(device), rotary_sin=sin.to(device),
                                           cache_seqlens=cache_seqlens.to(device), causal=True,
                                           return_softmax_lse=True)
        return out, lse, k_dev, v_dev

    def expected():
        # In bfloat16 (computing in float32): the rotated values are rounded as the kernels round them.
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        out, lse = reference.attention_forward(q, k_ref, v_ref, k_new=k_new, v_new=v_new, seqused_k=cache_seqlens,
                                               rotary_cos=cos, rotary_sin=sin, causal=True)
        return out, lse, k_ref, v_ref

    return run, expected


APPEND = dispatch.register(dispatch.Op(
    name="fmha.kvcache_append", family="fmha",
    support=dispatch.Support({"dtype": (torch.float16, torch.bfloat16, torch.float8_e4m3fn),
                              "head_dim": (64, 96, 128, 192, 256), "head_dim_v": (64, 96, 128, 192, 256)},
                             combinations={("head_dim", "head_dim_v"): APPEND_HEAD_DIMS}),
    build=_build_append, check_case=_append_check_case, tolerance=_fwd_tolerance,
    aot_variants=lambda: [{"dtype": dtype, "head_dim": d, "head_dim_v": dv}
                          for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn)
                          for d, dv in APPEND_HEAD_DIMS]))


# The split-KV decode kernel (mate.ops.fmha.decode_kernel): 1-8 queries per sequence (fixed or
# varlen) over a dense cache, or any number over a paged cache (any page size), with FP8 inputs or
# with qv, GQA packed; appends run before it.
DECODE_MAX_SEQLEN_Q = 8
DECODE_FEATURES_OFF = ("append_kv", "rotary")


def _build_decode(*, dtype: torch.dtype, head_dim: int, paged: bool, causal: bool, **flags):
    from mate.ops.fmha import decode_kernel

    return decode_kernel.build(dtype, head_dim, paged, causal, **flags)


def _decode_check_case(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 8, 128, generator=generator).to(torch.bfloat16)
    k_cache = torch.randn(6, 16, 2, 128, generator=generator).to(torch.bfloat16)
    v_cache = torch.randn(6, 16, 2, 128, generator=generator).to(torch.bfloat16)
    page_table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    cache_seqlens = torch.tensor([37, 5], dtype=torch.int32)

    def run():
        return flash_attn_with_kvcache(q.to(device), k_cache.to(device), v_cache.to(device),
                                       cache_seqlens=cache_seqlens.to(device), page_table=page_table.to(device),
                                       causal=True, return_softmax_lse=True)

    def expected():
        return reference.attention_forward(q.double(), k_cache.double(), v_cache.double(), page_table=page_table,
                                           seqused_k=cache_seqlens, causal=True)

    return run, expected


DECODE = dispatch.register(dispatch.Op(
    name="fmha.decode_splitkv", family="fmha",
    support=dispatch.Support({"dtype": (torch.float16, torch.bfloat16, torch.float8_e4m3fn), "head_dim": (64, 128, 256),
                              "head_dim_v": (64, 128, 256, 512), "qv": (False, True),
                              "paged": (False, True), "causal": (False, True), "leftpad": (False, True),
                              "batch_idx": (False, True), "sink": (False, True), "local": (False, True),
                              "softcap": (False, True), "cp": (False, True), "varlen_q": (False, True)},
                             combinations={("head_dim", "head_dim_v", "qv"): (
                                 (64, 64, False), (128, 128, False), (256, 256, False), (64, 256, True),
                                 (64, 512, True)),
                                 ("dtype", "qv"): ((torch.float16, False), (torch.bfloat16, False),
                                                   (torch.float8_e4m3fn, False), (torch.float16, True),
                                                   (torch.bfloat16, True))}),
    build=_build_decode, check_case=_decode_check_case, tolerance=_fwd_tolerance,
    aot_variants=lambda: [{"dtype": dtype, "head_dim": d, "head_dim_v": dv, "qv": dv != d, "paged": paged,
                           "causal": causal, "leftpad": False, "batch_idx": False, "sink": False, "local": False,
                           "softcap": False, "cp": False, "varlen_q": False, "split_kv": split_kv}
                          for split_kv in (False, True)
                          for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn)
                          for d, dv in ((64, 64), (128, 128), (256, 256), (64, 256), (64, 512))
                          if dv == d or dtype != torch.float8_e4m3fn
                          for paged in (False, True) for causal in (False, True)]))


def _decode_variant(variant: dict, args: dict[str, Any]) -> dict | None:
    """The decode kernel's variant for a call it can serve (else None: the prefill path decides)."""
    q, varlen_q = args["q"], args["cu_seqlens_q"] is not None
    decode = _decode_variant_of(
        tuple(variant), tuple(variant.values()), q.dim() == (3 if varlen_q else 4),
        (args["max_seqlen_q"] if varlen_q else q.shape[1]) <= DECODE_MAX_SEQLEN_Q, varlen_q,
        args["cu_seqlens_k"] is not None, args["seqused_q"] is not None, q.shape[-1], args["v"].shape[-1],
        variant["paged_kv"] and _gathered_prefill_is_faster(args))
    return None if decode is None else dict(decode)


@functools.lru_cache(maxsize=1024)  # a function of static facts: the same few recur call after call
def _decode_variant_of(features: tuple, values: tuple, rank_fits: bool, few_queries: bool, varlen_q: bool,
                       packed_keys: bool, seqused_q: bool, head_dim: int, head_dim_v: int,
                       gathered_faster: bool) -> dict | None:
    """_decode_variant from the variant (its features and values) and the facts of the call that
    decide it: `gathered_faster` is _gathered_prefill_is_faster (asked of paged calls only), and
    `packed_keys` says the call has cu_seqlens_k (served as one cache row, see _packed_keys_as_cache)."""
    variant = dict(zip(features, values, strict=True))
    # It serves decode-size calls, paged caches at any query count (the prefill kernel needs a dense
    # copy) unless the call is mostly prefill, FP8 calls the prefill kernel does not take, and what
    # the prefill kernel lacks altogether (qv, attention chunks, context parallelism).
    prefill_lacks = bool(FWD.support.violations(variant))
    fp8 = variant["dtype"] == torch.float8_e4m3fn and (few_queries or variant["paged_kv"] or prefill_lacks)
    qv = variant["qv"]
    paged = variant["paged_kv"] and (prefill_lacks or not gathered_faster)
    if (not rank_fits or not (few_queries or paged or fp8 or prefill_lacks)
            or (variant["head_dim"] != variant["head_dim_v"]) != qv
            or head_dim != variant["head_dim"] or head_dim_v != variant["head_dim_v"]
            or any(variant[name] for name in DECODE_FEATURES_OFF)
            or (packed_keys and not (fp8 or prefill_lacks)) or seqused_q):
        return None
    decode = {"dtype": variant["dtype"], "head_dim": variant["head_dim"], "head_dim_v": variant["head_dim_v"], "qv": qv,
              "paged": variant["paged_kv"],
              "causal": variant["causal"], "leftpad": variant["leftpad_k"] or packed_keys,
              "batch_idx": variant["kv_batch_idx"] or packed_keys,
              "sink": variant["learnable_sink"], "local": variant["local"], "softcap": variant["softcap"],
              "cp": variant["context_parallel"], "varlen_q": varlen_q}
    return None if DECODE.support.violations(decode) else decode


def _gathered_prefill_is_faster(args: dict[str, Any]) -> bool:
    """Whether a paged call (one the prefill kernel serves) is prefill-dominated enough for the
    prefill kernel on a gathered dense copy of its pages (2.5x the one-warpgroup decode kernel's
    throughput at 4k-token prefill on the H100): its queries number at least a quarter of the rows
    the copy holds (sequences x page-table width x page size), so the copy costs little next to the
    attention and its memory stays proportional to the queries. Static sizes only (no host sync)."""
    q, table = args["q"], args["page_table"]
    batch, total_q = (q.shape[0], q.shape[0] * q.shape[1]) if args["cu_seqlens_q"] is None else (
        args["cu_seqlens_q"].shape[0] - 1, q.shape[0])
    gathered_rows = batch * table.shape[1] * args["k"].shape[1]
    return 4 * total_q >= gathered_rows


def _packed_keys_as_cache(k, v, cu_seqlens_k, seqused_k, leftpad_k):
    """Packed keys (total_k, heads_k, d) with cu_seqlens_k as the decode kernel's dense cache: one
    cache row (every cache_batch_idx 0) in which sequence b keeps rows [start, end): its leftpad
    and seqused_k bounds (FA3's) shifted by cu_seqlens_k[b]. Views and small vectors only."""
    first = cu_seqlens_k[:-1]
    end = first + (seqused_k if seqused_k is not None else cu_seqlens_k[1:] - first)
    start = first + leftpad_k if leftpad_k is not None else first
    return k.unsqueeze(0), v.unsqueeze(0), torch.zeros_like(first), start, end


def select_backend(variant: dict, device: torch.device, backend: str = "auto") -> str:
    """"tilelang" or "reference" for a forward call; raises UnsupportedError when neither may run.

    backend="reference" forces the reference; "tilelang" (or the original MATE's "mutlass" /
    "mubin") demands the kernel; "auto" follows MATE_BACKEND and the support matrix.
    """
    return dispatch.select(FWD, variant, device, "tilelang" if backend in KERNEL_BACKENDS else backend)


def _kernel_window(causal: bool, window: tuple[int, int], max_seqlen_q: int, max_seqlen_k: int) -> tuple[int, int]:
    """The (left, right) window the kernel applies, normalized as upstream does (causal is a
    right window of 0; windows covering every key are unbounded)."""
    left, right = window
    left = -1 if left >= max_seqlen_k - 1 else left
    right = 0 if causal else (-1 if right >= max_seqlen_q - 1 else right)
    return left, right


def _cu_seqlens_of_fixed(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    if seqlen == 1:  # decode: cached, no launch
        return constants.iota(batch + 1, device)
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def _launch_kernel(variant: dict, args: dict[str, Any]) -> None:
    """Run the TileLang prefill kernel. It takes varlen (total, heads, dim) tensors with per-sequence
    start rows (cu_seqlens) and, when needed, used lengths (seqused): a fixed-length batch runs as
    sequences of equal length, a dense KV cache (batch_cache, seqlen_cache, ...) as rows of its
    flattened view starting at cache_batch_idx[b] * seqlen_cache + cache_leftpad[b] with
    seqused_k[b] - cache_leftpad[b] keys, and a paged cache is first gathered through its page table
    into a dense one (a copy of batch * pages_per_seq pages; the kernel's TMA loads need dense rows).
    All index arithmetic runs on the device (no host sync)."""
    from mate.ops.fmha import forward_kernel

    q, k, v, out, lse = args["q"], args["k"], args["v"], args["out"], args["softmax_lse"]
    device = q.device
    cu_q, cu_k = args["cu_seqlens_q"], args["cu_seqlens_k"]
    max_q, max_k = args["max_seqlen_q"], args["max_seqlen_k"]
    used_q, used_k = args["seqused_q"], args["seqused_k"]
    leftpad, rows, table = args["leftpad_k"], args["kv_batch_idx"], args["page_table"]
    if cu_q is None:
        batch, max_q = q.shape[0], q.shape[1]
        cu_q, q = _cu_seqlens_of_fixed(batch, max_q, device), q.flatten(0, 1)
    batch = cu_q.shape[0] - 1
    if table is not None:
        # Gather each sequence's pages into a dense (batch, pages_per_seq * page_size) cache. Entries
        # past a sequence's pages may hold anything: they are clamped to a valid page (never read).
        if rows is not None:
            table = table.index_select(0, rows)
        pages = table.clamp(0, k.shape[0] - 1)
        k = k[pages].flatten(1, 2)
        v = v[pages].flatten(1, 2)
        rows = None
    seqused = used_q is not None or used_k is not None or leftpad is not None or rows is not None
    if cu_k is None:
        max_k = k.shape[1]
        if seqused:
            first = rows if rows is not None else constants.iota(batch, device)
            cu_k = torch.cat([first * max_k, first.new_zeros(1)])  # start rows; the last entry is not read
            if used_k is None:
                used_k = torch.full((batch,), max_k, dtype=torch.int32, device=device)
        elif args["cu_seqlens_q"] is None and (k.shape[0], max_k) == (batch, max_q):
            cu_k = cu_q  # self-attention prefill: the same sequence boundaries (one launch fewer)
        else:
            cu_k = _cu_seqlens_of_fixed(k.shape[0], max_k, device)
        k, v = k.flatten(0, 1), v.flatten(0, 1)
    if seqused:
        if used_q is None:
            used_q = cu_q[1:] - cu_q[:-1]
        if used_k is None:
            used_k = cu_k[1:] - cu_k[:-1]
        if leftpad is not None:
            cu_k = cu_k + torch.cat([leftpad, leftpad.new_zeros(1)])
            used_k = used_k - leftpad
    # Head dims between the compiled ones (e.g. 80 runs the 96 kernel) are zero-padded: zeros add
    # nothing to q.k, and padded value columns are dropped from the output.
    pad_qk, pad_v = variant["head_dim"] - q.shape[-1], variant["head_dim_v"] - v.shape[-1]
    if pad_qk:
        q, k = (torch.nn.functional.pad(t, (0, pad_qk)) for t in (q, k))
    if pad_v:
        v = torch.nn.functional.pad(v, (0, pad_v))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    heads, total_q = q.shape[1], q.shape[0]
    out_in_place = out.is_contiguous() and not pad_v
    flat_out = out.view(total_q, heads, -1) if out_in_place else torch.empty(total_q, heads, v.shape[-1],
                                                                             dtype=out.dtype, device=device)
    # The kernel writes LSE as (heads, total_q): the varlen layout, and fixed-length's (batch, heads, seqlen)
    # when the batch is 1 (a copy otherwise).
    lse_in_place = lse.is_contiguous() and (lse.dim() == 2 or lse.shape[0] == 1)
    flat_lse = lse.view(heads, total_q) if lse_in_place else torch.empty(heads, total_q, dtype=torch.float32,
                                                                          device=device)
    window = _kernel_window(variant["causal"] or args["causal"], (args["window_size_left"], args["window_size_right"]),
                            max_q, max_k)
    sink = args["learnable_sink"]
    target = platform.device_info(device).tilelang_target
    kernel_variant = prefill_kernel_variant(variant, seqused)
    kernel = jit.get_kernel(FWD.name, kernel_variant, target, FWD.build)
    fp8 = {}
    if variant["dtype"] == torch.float8_e4m3fn:
        # Values transposed per key block for the FP8 P V gemm (sizes bounded on the host: packed keys
        # fill at most total_k / block_n blocks plus one per sequence, caches batch * their blocks).
        block_n = forward_kernel.default_config(variant["head_dim"], variant["head_dim_v"], kernel_variant["causal"],
                                                variant["local"], variant["softcap"], "float8_e4m3fn").block_n
        blocks = -(-k.shape[0] // block_n) + batch if args["cu_seqlens_k"] is not None \
            else batch * max(1, -(-max_k // block_n))
        transpose = jit.get_kernel(FP8_V_TRANSPOSE, {"head_dim_v": v.shape[-1], "block_n": block_n}, target,
                                   _build_fp8_v_transpose)
        v, v_block = forward_kernel.transpose_values(
            transpose, v, cu_k[:-1], used_k.to(torch.int32) if seqused else cu_k[1:] - cu_k[:-1], max_k, block_n,
            blocks)
        ones = torch.ones(batch, v.shape[0], dtype=torch.float32, device=device)
        fp8 = {"v_block": v_block, "descales": tuple(ones if t is None else t.contiguous() for t in (
            args["q_descale"], args["k_descale"], args["v_descale"]))}
    forward_kernel.launch(kernel, q, k, v, cu_q, cu_k, max_q, flat_out, flat_lse, args["softmax_scale"],
                          window, args["softcap"], seqused_q=used_q.to(torch.int32) if seqused else None,
                          seqused_k=used_k.to(torch.int32) if seqused else None,
                          sink=None if sink is None else sink.float(), **fp8)
    if not out_in_place:
        out.copy_(flat_out[..., :out.shape[-1]].reshape(out.shape))
    if not lse_in_place:
        lse.copy_(flat_lse.view(heads, lse.shape[0], -1).transpose(0, 1) if lse.dim() == 3 else flat_lse)


def _append_kv(args: dict[str, Any], q_per_token: bool) -> dict[str, Any]:
    """Run the append kernel: write the new keys/values (rotated when rotary_cos is given) into the
    cache in place and rotate q into a temporary. Returns the arguments of the attention that
    follows: the rotated q, seqused_k = cache_seqlens + each sequence's new rows, no new keys."""
    from mate.ops.fmha import append_kernel

    q, k, v, k_new, v_new = args["q"], args["k"], args["v"], args["k_new"], args["v_new"]
    device = q.device
    cu_q, cu_new = args["cu_seqlens_q"], args["cu_seqlens_k_new"]
    q_flat = q
    if cu_q is None:
        cu_q, q_flat = _cu_seqlens_of_fixed(q.shape[0], q.shape[1], device), q.flatten(0, 1)
    fixed_new = cu_new is None
    if fixed_new:
        new_rows = k_new.shape[1]
        cu_new = _cu_seqlens_of_fixed(k_new.shape[0], new_rows, device)
        k_new, v_new = k_new.flatten(0, 1), v_new.flatten(0, 1)
    cos, sin = args["rotary_cos"], args["rotary_sin"]
    q_flat = q_flat.contiguous()
    q_rot = torch.empty_like(q_flat) if cos is not None else None
    # The kernel addresses the caches as contiguous 4-D tensors; a strided cache is updated through a copy.
    k_cache, v_cache = k.contiguous(), v.contiguous()
    cache_seqlens = args["seqused_k"]
    start = args["seqlens_rotary"] if args["seqlens_rotary"] is not None else cache_seqlens
    variant = {"dtype": q.dtype, "head_dim": q.shape[-1], "head_dim_v": v.shape[-1]}
    kernel = jit.get_kernel(APPEND.name, variant, platform.device_info(device).tilelang_target, APPEND.build)
    append_kernel.launch(kernel, q_flat, cu_q, q_rot, k_new.contiguous(), v_new.contiguous(), cu_new, k_cache,
                         v_cache, args["page_table"], args["kv_batch_idx"], cache_seqlens, start, cos, sin,
                         q_per_token=q_per_token, interleaved=args["rotary_interleaved"])
    if k_cache is not k:
        k.copy_(k_cache)
    if v_cache is not v:
        v.copy_(v_cache)
    return {**args, "q": q if q_rot is None else q_rot.view(q.shape), "k_new": None, "v_new": None,
            "cu_seqlens_k_new": None, "rotary_cos": None, "rotary_sin": None, "seqlens_rotary": None,
            "seqused_k": cache_seqlens + new_rows if fixed_new else (cache_seqlens + cu_new.diff()).to(torch.int32)}


# ---- the custom ops ------------------------------------------------------------------------

def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, softmax_lse: torch.Tensor,
                k_new: torch.Tensor | None, v_new: torch.Tensor | None, qv: torch.Tensor | None,
                cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                cu_seqlens_k_new: torch.Tensor | None, seqused_q: torch.Tensor | None,
                seqused_k: torch.Tensor | None, page_table: torch.Tensor | None,
                kv_batch_idx: torch.Tensor | None, leftpad_k: torch.Tensor | None,
                rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
                seqlens_rotary: torch.Tensor | None, q_descale: torch.Tensor | None,
                k_descale: torch.Tensor | None, v_descale: torch.Tensor | None,
                learnable_sink: torch.Tensor | None, cp_tot_seqused_k: torch.Tensor | None,
                scheduler_metadata: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
                attention_chunk: int, softcap: float, rotary_interleaved: bool, num_splits: int,
                pack_gqa: bool | None, sm_margin: int, cp_world_size: int, cp_rank: int, backend: str) -> None:
    args = dict(locals())
    _forward(args, args.pop("backend"))


# The reference.attention_forward arguments that _forward_op has under the same name.
_REFERENCE_ARGS = ("k_new", "v_new", "qv", "cu_seqlens_q", "cu_seqlens_k", "cu_seqlens_k_new", "seqused_q", "seqused_k",
                   "max_seqlen_q", "max_seqlen_k", "page_table", "kv_batch_idx", "leftpad_k", "rotary_cos",
                   "rotary_sin", "seqlens_rotary", "rotary_interleaved", "q_descale", "k_descale", "v_descale",
                   "softmax_scale", "causal", "attention_chunk", "softcap", "learnable_sink", "cp_world_size",
                   "cp_rank", "cp_tot_seqused_k")


def _forward(args: dict[str, Any], backend: str) -> None:
    """The forward ops' body; `args` holds _forward_op's arguments but backend. Eager calls enter
    here with their validated arguments, without binding the op's 41 parameters (~5 us)."""
    q, v, page_table, causal = args["q"], args["v"], args["page_table"], args["causal"]
    window = (args["window_size_left"], args["window_size_right"])
    attention_chunk, cp_world_size = args["attention_chunk"], args["cp_world_size"]
    is_causal, is_local = _mask_flags(causal, window, attention_chunk, args["max_seqlen_q"], args["max_seqlen_k"],
                                      page_table is not None, q.shape[-1])
    seqused_q, seqused_k, leftpad_k = args["seqused_q"], args["seqused_k"], args["leftpad_k"]
    variant = fwd_variant(
        dtype=q.dtype, head_dim=q.shape[-1], head_dim_v=v.shape[-1], causal=is_causal, local=is_local,
        softcap=args["softcap"] > 0, learnable_sink=args["learnable_sink"] is not None,
        varlen_q=args["cu_seqlens_q"] is not None or seqused_q is not None,
        varlen_k=args["cu_seqlens_k"] is not None or seqused_k is not None or leftpad_k is not None,
        seqused=seqused_q is not None or seqused_k is not None,
        paged_kv=page_table is not None, append_kv=args["k_new"] is not None, rotary=args["rotary_cos"] is not None,
        qv=args["qv"] is not None, attention_chunk=attention_chunk > 0, leftpad_k=leftpad_k is not None,
        kv_batch_idx=args["kv_batch_idx"] is not None, context_parallel=cp_world_size > 1)
    choice = "tilelang" if backend in KERNEL_BACKENDS else backend
    if args["k_new"] is None:
        decode = _decode_variant(variant, args)
        decodes = decode is not None and dispatch.select(DECODE, decode, q.device, choice) == "tilelang"
    else:
        # New keys/values go in with the append kernel when it takes their dtype and head dims and the
        # decode kernel serves the attention over the updated cache (the append changes nothing that
        # decides that); otherwise as the forward op chooses (which raises UnsupportedError on a GPU
        # when the prefill kernel cannot serve the call either).
        attend = {**variant, "append_kv": False, "rotary": False}
        decode = _decode_variant(attend, args)
        append = {"dtype": q.dtype, "head_dim": q.shape[-1], "head_dim_v": v.shape[-1]}
        if decode is not None and not APPEND.support.violations(append):
            appends = decodes = dispatch.select(DECODE, decode, q.device, choice) == "tilelang"
        else:
            appends = select_backend(variant, q.device, backend) == "tilelang"
            decodes = appends and decode is not None and dispatch.select(DECODE, decode, q.device, choice) == "tilelang"
        if appends:
            # Append (rotating the new keys, and q into a temporary), then attend over the updated
            # cache like a call without new keys.
            args = _append_kv(args, q_per_token=is_causal or is_local)
            variant = attend
    if decodes:
        from mate.ops.fmha import decode_kernel

        k, v, kv_batch_idx, seqused_k = args["k"], args["v"], args["kv_batch_idx"], args["seqused_k"]
        if args["cu_seqlens_k"] is not None:
            k, v, kv_batch_idx, leftpad_k, seqused_k = _packed_keys_as_cache(k, v, args["cu_seqlens_k"], seqused_k,
                                                                              leftpad_k)
        decode_kernel.launch(
            args["q"], k, v, page_table, seqused_k, args["softmax_scale"], decode["causal"], args["out"],
            args["softmax_lse"], num_splits=args["num_splits"], cache_batch_idx=kv_batch_idx, cache_leftpad=leftpad_k,
            learnable_sink=args["learnable_sink"],
            window=(window[0], 0 if causal else window[1]) if is_local else (-1, -1),
            attention_chunk=attention_chunk, softcap=args["softcap"], cp_world_size=cp_world_size,
            cp_rank=args["cp_rank"], cp_tot_seqused_k=args["cp_tot_seqused_k"], cu_seqlens_q=args["cu_seqlens_q"],
            max_seqlen_q=args["max_seqlen_q"], q_descale=args["q_descale"], k_descale=args["k_descale"],
            v_descale=args["v_descale"], qv=args["qv"],
            # An "auto" dispatch of the decode kernel read MATE_BACKEND and chose the kernel, as the
            # combine's would (it takes every output the decode kernel writes): no second reading.
            combine_backend="tilelang" if choice == "auto" else "auto")
        return
    if select_backend(variant, q.device, backend) == "tilelang":
        _launch_kernel(variant, args)
        return
    result, lse = reference.attention_forward(args["q"], args["k"], args["v"], window_size=window,
                                              **{name: args[name] for name in _REFERENCE_ARGS})
    args["out"].copy_(result)
    args["softmax_lse"].copy_(lse)


def _forward_fake(*args, **kwargs) -> None:
    return None


# One implementation, two schemas: appending new keys/values also writes the cache (k, v).
_fwd_op = torch.library.custom_op("mate::fmha_fwd", _forward_op, mutates_args=("out", "softmax_lse"))
_fwd_op.register_fake(_forward_fake)
_fwd_kvcache_op = torch.library.custom_op("mate::fmha_fwd_kvcache", _forward_op,
                                          mutates_args=("k", "v", "out", "softmax_lse"))
_fwd_kvcache_op.register_fake(_forward_fake)


def _mask_flags(causal: bool, window: tuple[int, int], attention_chunk: int, seqlen_q: int, seqlen_k: int,
                paged: bool, head_dim: int) -> tuple[bool, bool]:
    """(is_causal, is_local) as upstream's host code picks the kernel, including its special case
    that runs a one-query call without the causal mask (which changes nothing for one query),
    except for paged head dims in (64, 128]."""
    left = -1 if window[0] >= seqlen_k - 1 else window[0]
    right = -1 if window[1] >= seqlen_q - 1 else window[1]
    if seqlen_q == 1 and left < 0 and right < 0 and attention_chunk == 0 and not (paged and 64 < head_dim <= 128):
        causal = False
    return reference.mask_kind(causal, (left, right), attention_chunk, seqlen_q, seqlen_k)


# ---- validation ----------------------------------------------------------------------------

def _maybe_contiguous(value: torch.Tensor | None) -> torch.Tensor | None:
    """Upstream's maybe_contiguous: a copy only when the last dimension is strided."""
    return value.contiguous() if value is not None and value.stride(-1) != 1 else value


def _int32_vector(name: str, value, device: torch.device, length: int, meaning: str) -> torch.Tensor:
    checks.tensor(name, value, dtypes=(torch.int32,), ndim=1, device=device)
    checks.shape(name, value, (length,), meaning)
    return value.contiguous()


def _integer(name: str, value, minimum: int = 0) -> int:
    """An int argument (a Python int, a symbolic int under torch.compile, anything with
    __index__, or an integer 0-d tensor as upstream's tests pass for window_size)."""
    if type(value) is not int:  # a plain int, the common case, needs no conversion
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, bool):
            raise checks.ArgumentTypeError(f"{name}: expected an int, got bool")
        if not isinstance(value, (int, torch.SymInt)):
            try:
                value = operator.index(value)
            except TypeError:
                raise checks.ArgumentTypeError(f"{name}: expected an int, got {type(value).__name__}") from None
    if value < minimum:
        raise checks.ArgumentError(f"{name}: must be at least {minimum}, got {value}")
    return value


def _window(window_size) -> tuple[int, int]:
    if window_size is None:
        return -1, -1
    if not isinstance(window_size, (tuple, list, torch.Tensor)) or len(window_size) != 2:
        raise checks.ArgumentTypeError(f"window_size: expected a (left, right) pair, got {window_size!r}")
    left, right = window_size
    return (-1 if left is None else _integer("window_size", left, minimum=-(2**31)),
            -1 if right is None else _integer("window_size", right, minimum=-(2**31)))


def _number(name: str, value, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise checks.ArgumentTypeError(f"{name}: expected a float, got {type(value).__name__}")
    return float(value)


def _attention_call(
    *, q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q, seqused_k,
    max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k, rotary_cos, rotary_sin, seqlens_rotary,
    q_descale, k_descale, v_descale, softmax_scale, causal, window_size, learnable_sink, attention_chunk, softcap,
    rotary_interleaved, scheduler_metadata, num_splits, pack_gqa, sm_margin, cp_world_size, cp_rank,
    cp_tot_seqused_k, names: dict[str, str], kv_in_place: bool,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Validate a forward call as upstream's mha_fwd does; return (op arguments, out, softmax_lse).

    `names` maps upstream's argument names to the public function's (flash_attn_with_kvcache
    calls the cache k_cache and the new keys k)."""
    n = lambda key: names.get(key, key)  # noqa: E731

    # q, k, v: dtypes, devices, ranks.
    varlen_q, varlen_k, paged = cu_seqlens_q is not None, cu_seqlens_k is not None, page_table is not None
    checks.tensor(n("q"), q, dtypes=FWD_DTYPES, ndim=3 if varlen_q else 4)
    q_type, device = q.dtype, q.device
    for key, value in (("k", k), ("v", v)):
        checks.tensor(n(key), value, ndim=3 if varlen_k else 4)
        if value.dtype != q_type:
            raise checks.ArgumentTypeError(f"{n(key)}: dtype {_dtype(value.dtype)} does not match q's "
                                           f"{_dtype(q_type)} (query, key and value must have the same dtype)")
        checks.tensor(n(key), value, device=device, last_dim_contiguous=kv_in_place)
    q, qv = _maybe_contiguous(q), qv
    if not kv_in_place:
        k, v = _maybe_contiguous(k), _maybe_contiguous(v)

    # Sizes.
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_heads_k, head_dim_v = k.shape[-2], v.shape[-1]
    if varlen_q:
        checks.tensor(n("cu_seqlens_q"), cu_seqlens_q, dtypes=(torch.int32,), ndim=1, device=device)
        cu_seqlens_q = cu_seqlens_q.contiguous()
        if max_seqlen_q is None:
            raise checks.ArgumentError(f"max_seqlen_q: must be given when {n('cu_seqlens_q')} is given")
        batch_size, seqlen_q, total_q = cu_seqlens_q.shape[0] - 1, _integer("max_seqlen_q", max_seqlen_q), q.shape[0]
        if batch_size < 0:
            raise checks.ArgumentError(f"{n('cu_seqlens_q')}: expected batch_size + 1 >= 1 entries, got 0")
    else:
        batch_size, seqlen_q = q.shape[0], q.shape[1]
        total_q = batch_size * seqlen_q
    if paged:
        checks.tensor(n("page_table"), page_table, dtypes=(torch.int32,), ndim=2, device=device)
        page_table = _maybe_contiguous(page_table)
        num_pages, page_size = k.shape[0], k.shape[1]
        seqlen_k = page_table.shape[1] * page_size
        batch_size_k = page_table.shape[0]
    elif varlen_k:
        checks.tensor(n("cu_seqlens_k"), cu_seqlens_k, dtypes=(torch.int32,), ndim=1, device=device)
        cu_seqlens_k = cu_seqlens_k.contiguous()
        if max_seqlen_k is None:
            raise checks.ArgumentError(f"max_seqlen_k: must be given when {n('cu_seqlens_k')} is given")
        seqlen_k = _integer("max_seqlen_k", max_seqlen_k)
        batch_size_k = cu_seqlens_k.shape[0] - 1
    else:
        seqlen_k, batch_size_k = k.shape[1], k.shape[0]
    if varlen_k and paged:
        raise checks.ArgumentError(f"{n('cu_seqlens_k')}: a paged KV cache (page_table) cannot be packed with "
                                   "cu_seqlens_k")
    if varlen_k and kv_batch_idx is not None:
        raise checks.ArgumentError(f"{n('kv_batch_idx')}: not supported with {n('cu_seqlens_k')}")
    if kv_batch_idx is None and batch_size_k != batch_size:
        source = n("page_table") if paged else (n("cu_seqlens_k") if varlen_k else n("k"))
        raise checks.ArgumentError(f"{source}: batch size {batch_size_k} does not match q's batch size "
                                   f"{batch_size} (pass {n('kv_batch_idx')} to index a larger cache)")

    # Head dimensions.
    checks.at_most(n("q"), head_dim, MAX_HEAD_DIM, "the head dimension (dim -1)")
    if num_heads_k == 0 or num_heads % num_heads_k != 0:
        raise checks.ArgumentError(f"{n('k')}: nheads_k={num_heads_k} must divide q's nheads={num_heads}")
    if head_dim_v != head_dim:
        if not ((128 < head_dim <= 192 and 96 < head_dim_v <= 128) or (head_dim <= 64 and head_dim_v <= 512)):
            raise checks.ArgumentError(
                f"{n('v')}: head dimension {head_dim_v} differs from q's {head_dim}; a different V head dimension "
                "is supported only for Q/K head dimension in (128, 192] with V in (96, 128], or Q/K <= 64 with "
                "V <= 512")
        if head_dim_v > 256 and q_type == torch.float8_e4m3fn:
            raise checks.ArgumentTypeError(f"{n('v')}: a V head dimension above 256 ({head_dim_v}) needs float16 "
                                           "or bfloat16 inputs, got float8_e4m3fn")
    alignment = 16 if q_type == torch.float8_e4m3fn else 8
    for key, size in (("q", head_dim), ("v", head_dim_v)):
        if size % alignment != 0:
            raise checks.ArgumentError(f"{n(key)}: head dimension {size} must be a multiple of {alignment} for "
                                       f"{_dtype(q_type)} inputs")

    # Shapes.
    if varlen_q:
        checks.shape(n("q"), q, (total_q, num_heads, head_dim), "total_q, nheads, headdim")
    if paged:
        checks.shape(n("k"), k, (num_pages, page_size, num_heads_k, head_dim),
                     "num_pages, page_size, nheads_k, headdim")
        checks.shape(n("v"), v, (num_pages, page_size, num_heads_k, head_dim_v),
                     "num_pages, page_size, nheads_k, headdim_v")
    elif varlen_k:
        total_k = k.shape[0]
        checks.shape(n("k"), k, (total_k, num_heads_k, head_dim), "total_k, nheads_k, headdim")
        checks.shape(n("v"), v, (total_k, num_heads_k, head_dim_v), "total_k, nheads_k, headdim_v")
        checks.shape(n("cu_seqlens_k"), cu_seqlens_k, (batch_size + 1,), "batch_size + 1")
    else:
        checks.shape(n("k"), k, (batch_size_k, seqlen_k, num_heads_k, head_dim),
                     "batch_size_k, seqlen_k, nheads_k, headdim")
        checks.shape(n("v"), v, (batch_size_k, seqlen_k, num_heads_k, head_dim_v),
                     "batch_size_k, seqlen_k, nheads_k, headdim_v")
    if seqused_q is not None:
        seqused_q = _int32_vector(n("seqused_q"), seqused_q, device, batch_size, "batch_size")
    if seqused_k is not None:
        seqused_k = _int32_vector(n("seqused_k"), seqused_k, device, batch_size, "batch_size")
    if leftpad_k is not None:
        leftpad_k = _int32_vector(n("leftpad_k"), leftpad_k, device, batch_size, "batch_size")
    if kv_batch_idx is not None:
        kv_batch_idx = _int32_vector(n("kv_batch_idx"), kv_batch_idx, device, batch_size, "batch_size")

    # Output.
    out_type = torch.bfloat16 if q_type == torch.float8_e4m3fn else q_type
    out_shape = (total_q, num_heads, head_dim_v) if varlen_q else (batch_size, seqlen_q, num_heads, head_dim_v)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != out_type:
            checks.tensor("out", out, dtypes=(out_type,))
        checks.tensor("out", out, ndim=len(out_shape), device=device, last_dim_contiguous=True)
        checks.shape("out", out, out_shape, "total_q, nheads, headdim_v" if varlen_q else
                     "batch_size, seqlen_q, nheads, headdim_v")
    else:  # sizes as separate arguments: torch.empty parses a tuple ~0.8 us slower
        out = torch.empty(*out_shape, dtype=out_type, device=device)
    lse_shape = (num_heads, total_q) if varlen_q else (batch_size, num_heads, seqlen_q)
    softmax_lse = torch.empty(*lse_shape, dtype=torch.float32, device=device)

    # New keys/values appended to the cache.
    if k_new is None and v_new is not None:
        raise checks.ArgumentError(f"{n('k_new')}: must be given together with {n('v_new')}")
    if k_new is None and cu_seqlens_k_new is not None:
        raise checks.ArgumentError(f"{n('cu_seqlens_k_new')}: given without new keys ({n('k_new')})")
    if k_new is not None:
        if v_new is None:
            raise checks.ArgumentError(f"{n('v_new')}: must be given together with {n('k_new')}")
        if seqused_k is None:
            raise checks.ArgumentError(f"{n('seqused_k')}: must be given when appending new keys ({n('k_new')})")
        if seqlen_q > seqlen_k:
            raise checks.ArgumentError(f"{n('k_new')}: appending needs seqlen_q ({seqlen_q}) <= the cache's seqlen "
                                       f"({seqlen_k})")
        varlen_k_new = cu_seqlens_k_new is not None
        for key, value, dim in (("k_new", k_new, head_dim), ("v_new", v_new, head_dim_v)):
            checks.tensor(n(key), value, ndim=3 if varlen_k_new else 4)
            if value.dtype != q_type:
                raise checks.ArgumentTypeError(f"{n(key)}: dtype {_dtype(value.dtype)} does not match q's "
                                               f"{_dtype(q_type)}")
            checks.tensor(n(key), value, device=device)
            if varlen_k_new:
                checks.shape(n(key), value, (value.shape[0], num_heads_k, dim), f"total_k_new, nheads_k, {dim}")
            else:
                checks.shape(n(key), value, (batch_size, value.shape[1], num_heads_k, dim),
                             f"batch_size, seqlen_new, nheads_k, {dim}")
        checks.shape(n("v_new"), v_new, tuple(k_new.shape[:-1]) + (head_dim_v,), "k_new's leading dims, headdim_v")
        k_new, v_new = _maybe_contiguous(k_new), _maybe_contiguous(v_new)
        if varlen_k_new:
            cu_seqlens_k_new = _int32_vector(n("cu_seqlens_k_new"), cu_seqlens_k_new, device, batch_size + 1,
                                             "batch_size + 1")

    # Scheduling.
    num_splits = _integer("num_splits", num_splits, minimum=-(2**31))
    checks.at_most("num_splits", num_splits, MAX_SPLITS, "the number of splits")
    if scheduler_metadata is not None:
        checks.tensor("scheduler_metadata", scheduler_metadata, dtypes=(torch.int32,), ndim=1, device=device)
        checks.shape("scheduler_metadata", scheduler_metadata, (scheduler_metadata_length(batch_size),),
                     f"3 * batch_size + 2, from get_scheduler_metadata with batch_size={batch_size}")
        if not scheduler_metadata.is_contiguous():
            raise checks.ArgumentError("scheduler_metadata: must be contiguous")
    if pack_gqa is not None and not isinstance(pack_gqa, bool):
        raise checks.ArgumentTypeError(f"pack_gqa: expected None or a bool, got {type(pack_gqa).__name__}")
    sm_margin = _integer("sm_margin", sm_margin)

    # qv.
    if qv is not None:
        checks.tensor("qv", qv, ndim=3 if varlen_q else 4)
        if head_dim > 64:
            raise checks.ArgumentError(f"qv: only supported for head dimension <= 64, but q's is {head_dim}")
        if head_dim_v < 256:
            raise checks.ArgumentError(f"qv: only supported for V head dimension >= 256, but v's is {head_dim_v}")
        if qv.dtype != q_type:
            raise checks.ArgumentTypeError(f"qv: dtype {_dtype(qv.dtype)} does not match q's {_dtype(q_type)}")
        checks.tensor("qv", qv, device=device)
        checks.shape("qv", qv, out_shape, "like the output: q's leading dims, nheads, headdim_v")
        qv = _maybe_contiguous(qv)

    # Rotary embedding.
    if rotary_cos is None and rotary_sin is not None:
        raise checks.ArgumentError("rotary_sin: given without rotary_cos")
    if rotary_cos is not None:
        if k_new is None:
            raise checks.ArgumentError(f"rotary_cos: rotary embedding needs new keys/values to append "
                                       f"({n('k_new')}, {n('v_new')})")
        if rotary_sin is None:
            raise checks.ArgumentError("rotary_sin: must be given together with rotary_cos")
        for key, value in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            checks.tensor(key, value, ndim=2, device=device)
            if value.dtype != q_type:
                raise checks.ArgumentTypeError(f"{key}: dtype {_dtype(value.dtype)} does not match q's "
                                               f"{_dtype(q_type)}")
        rotary_cos, rotary_sin = _maybe_contiguous(rotary_cos), _maybe_contiguous(rotary_sin)
        for key, value in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not value.is_contiguous():
                raise checks.ArgumentError(f"{key}: must be contiguous, got strides {value.stride()}")
        seqlen_ro, rotary_dim = rotary_cos.shape[0], 2 * rotary_cos.shape[1]
        checks.at_most("rotary_cos", rotary_dim, head_dim, "rotary_dim (2 * dim 1)")
        if rotary_dim % 16 != 0:
            raise checks.ArgumentError(f"rotary_cos: rotary_dim (2 * dim 1) is {rotary_dim}; it must be divisible "
                                       "by 16")
        if paged and seqlen_ro < seqlen_k:
            raise checks.ArgumentError(f"rotary_cos: {seqlen_ro} positions (dim 0), but a paged cache needs at least "
                                       f"its seqlen ({seqlen_k})")
        checks.shape("rotary_sin", rotary_sin, tuple(rotary_cos.shape), "like rotary_cos")
        if seqlens_rotary is not None:
            seqlens_rotary = _int32_vector(n("seqlens_rotary"), seqlens_rotary, device, batch_size, "batch_size")
    elif seqlens_rotary is not None:
        raise checks.ArgumentError(f"{n('seqlens_rotary')}: given without rotary_cos/rotary_sin")

    # FP8 descales (upstream reads them only for float8 inputs).
    if q_type == torch.float8_e4m3fn:
        for key, value in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
            if value is not None:
                checks.tensor(key, value, dtypes=(torch.float32,), ndim=2, device=device)
                checks.shape(key, value, (batch_size, num_heads_k), "batch_size, nheads_k")
    else:
        q_descale = k_descale = v_descale = None

    # Scores and masks.
    softcap = _number("softcap", softcap, 0.0)
    if softcap < 0:
        raise checks.ArgumentError(f"softcap: must be >= 0 (0 disables it), got {softcap}")
    softmax_scale = _number("softmax_scale", softmax_scale,
                            (head_dim + (head_dim_v if qv is not None else 0)) ** -0.5)
    window = _window(window_size)
    attention_chunk = _integer("attention_chunk", 0 if attention_chunk is None else attention_chunk)
    if not isinstance(causal, bool):
        raise checks.ArgumentTypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if not isinstance(rotary_interleaved, bool):
        raise checks.ArgumentTypeError(f"rotary_interleaved: expected a bool, got {type(rotary_interleaved).__name__}")
    if learnable_sink is not None:
        checks.tensor("learnable_sink", learnable_sink, dtypes=SINK_DTYPES, ndim=1, device=device)
        checks.shape("learnable_sink", learnable_sink, (num_heads,), "nheads")
        learnable_sink = learnable_sink.contiguous()

    # Context parallelism (the original MATE's extension; vLLM's FlashAttention fork semantics).
    cp_world_size = _integer("cp_world_size", cp_world_size, minimum=-(2**31))
    cp_rank = _integer("cp_rank", cp_rank, minimum=-(2**31))
    if cp_world_size <= 0:
        raise checks.ArgumentError(f"cp_world_size: must be positive (1 disables context parallelism), got "
                                   f"{cp_world_size}")
    if cp_world_size == 1:
        if cp_rank != 0:
            raise checks.ArgumentError(f"cp_rank: must be 0 when context parallelism is disabled, got {cp_rank}")
        cp_tot_seqused_k = None  # ignored, as documented
    else:
        if not 0 <= cp_rank < cp_world_size:
            raise checks.ArgumentError(f"cp_rank: must lie in [0, {cp_world_size}), got {cp_rank}")
        if cp_tot_seqused_k is None:
            raise checks.ArgumentError("cp_tot_seqused_k: must be given when context parallelism is enabled "
                                       "(cp_world_size > 1)")
        cp_tot_seqused_k = _int32_vector("cp_tot_seqused_k", cp_tot_seqused_k, device, batch_size,
                                         "batch_size: each sequence's key count over all ranks")
        _, is_local = _mask_flags(causal, window, attention_chunk, seqlen_q, seqlen_k, paged, head_dim)
        if is_local:
            raise checks.ArgumentError("window_size: local (sliding window or chunked) attention is not supported "
                                       "with context parallelism (cp_world_size > 1)")

    # A literal: dict() of 40 keywords costs ~2 us more.
    args = {
        "q": q, "k": k, "v": v, "out": out, "softmax_lse": softmax_lse, "k_new": k_new, "v_new": v_new, "qv": qv,
        "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "cu_seqlens_k_new": cu_seqlens_k_new,
        "seqused_q": seqused_q, "seqused_k": seqused_k, "page_table": page_table, "kv_batch_idx": kv_batch_idx,
        "leftpad_k": leftpad_k, "rotary_cos": rotary_cos, "rotary_sin": rotary_sin, "seqlens_rotary": seqlens_rotary,
        "q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale, "learnable_sink": learnable_sink,
        "cp_tot_seqused_k": cp_tot_seqused_k, "scheduler_metadata": scheduler_metadata, "max_seqlen_q": seqlen_q,
        "max_seqlen_k": seqlen_k, "softmax_scale": softmax_scale, "causal": causal, "window_size_left": window[0],
        "window_size_right": window[1], "attention_chunk": attention_chunk, "softcap": softcap,
        "rotary_interleaved": rotary_interleaved, "num_splits": num_splits, "pack_gqa": pack_gqa,
        "sm_margin": sm_margin, "cp_world_size": cp_world_size, "cp_rank": cp_rank,
    }
    return args, out, softmax_lse


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _run(args: dict[str, Any], backend: str) -> None:
    q, out = args["q"], args["out"]
    if q.numel() == 0 or out.numel() == 0:
        return  # upstream launches nothing either (and appends nothing)
    if torch.compiler.is_compiling():  # the graph holds the op (see mate.api.call_op)
        op = torch.ops.mate.fmha_fwd_kvcache if args["k_new"] is not None else torch.ops.mate.fmha_fwd
        op(**args, backend=backend)
    else:
        _forward(args, backend)


# ---- public functions ------------------------------------------------------------------------

@mate_api(name="fmha.flash_attn_varlen_func", tolerance=_fwd_tolerance)
def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    qv: torch.Tensor | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    window_size: tuple | list | None = (-1, -1),
    learnable_sink: torch.Tensor | None = None,
    attention_chunk: int | None = 0,
    softcap: float = 0.0,
    scheduler_metadata: torch.Tensor | None = None,
    num_splits: int = 0,
    pack_gqa=None,
    deterministic: bool = False,
    sm_margin=0,
    return_softmax_lse: bool = False,
    backend: str = "auto",
    cp_world_size: int = 1,
    cp_rank: int = 0,
    cp_tot_seqused_k: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
):
    """FlashAttention-3 compatible forward over fixed-length or packed (varlen) sequences.

    q: (batch_size, seqlen, nheads, headdim), or (total_q, nheads, headdim) with cu_seqlens_q
    (batch_size + 1, int32) and max_seqlen_q. k, v: (batch_size, seqlen_k, nheads_k, headdim /
    headdim_v), or (total_k, nheads_k, ...) with cu_seqlens_k and max_seqlen_k, or a paged
    cache (num_pages, page_size, nheads_k, ...) with page_table (batch_size, pages_per_seq,
    int32). seqused_q / seqused_k (batch_size, int32) limit the queries / keys used. dtypes
    float16, bfloat16 or float8_e4m3fn (output bfloat16; q/k/v_descale (batch_size, nheads_k)
    float32 dequantize). nheads_k divides nheads (GQA/MQA); headdim <= 256, a multiple of 8
    (16 for FP8). Masks (causal, window_size, attention_chunk) align bottom-right; softcap,
    learnable_sink (nheads,), qv and context parallelism (cp_world_size, cp_rank,
    cp_tot_seqused_k (batch_size,) global key counts) as in :mod:`mate.ops.fmha.reference`.
    num_splits, scheduler_metadata, pack_gqa, deterministic and sm_margin tune a kernel and
    never change the result. backend: "auto", "tilelang" (the original MATE's "mutlass" /
    "mubin" mean the same) or "reference".

    Returns out (shaped like q with headdim_v; written into ``out`` when given), and with
    return_softmax_lse also softmax_lse, float32, natural log: (batch_size, nheads, seqlen)
    fixed-length, (nheads, total_q) varlen.
    """
    if backend not in BACKENDS:
        raise checks.ArgumentError(f"backend: {backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    args, out, softmax_lse = _attention_call(
        q=q, k=k, v=v, k_new=None, v_new=None, qv=qv, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        cu_seqlens_k_new=None, seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, page_table=page_table, kv_batch_idx=None, leftpad_k=None, rotary_cos=None,
        rotary_sin=None, seqlens_rotary=None, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, learnable_sink=learnable_sink,
        attention_chunk=attention_chunk, softcap=softcap, rotary_interleaved=True,
        scheduler_metadata=scheduler_metadata, num_splits=num_splits, pack_gqa=pack_gqa, sm_margin=sm_margin,
        cp_world_size=cp_world_size, cp_rank=cp_rank, cp_tot_seqused_k=cp_tot_seqused_k, names={},
        kv_in_place=False)
    _run(args, backend)
    return (out, softmax_lse) if return_softmax_lse else out


_KVCACHE_NAMES = {"k": "k_cache", "v": "v_cache", "k_new": "k", "v_new": "v", "seqused_k": "cache_seqlens",
                  "kv_batch_idx": "cache_batch_idx", "leftpad_k": "cache_leftpad", "seqlens_rotary": "rotary_seqlens"}


@mate_api(name="fmha.flash_attn_with_kvcache", tolerance=_fwd_tolerance)
def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    qv: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k_new: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    rotary_seqlens: torch.Tensor | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple | list | None = (-1, -1),
    learnable_sink: torch.Tensor | None = None,
    attention_chunk: int | None = 0,
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    scheduler_metadata: torch.Tensor | None = None,
    num_splits: int = 0,
    pack_gqa=None,
    sm_margin=0,
    return_softmax_lse: bool = False,
    cp_world_size: int = 1,
    cp_rank: int = 0,
    cp_tot_seqused_k: torch.Tensor | None = None,
):
    """FlashAttention-3 compatible forward with a KV cache (decode / chunked prefill).

    q: (batch_size, seqlen, nheads, headdim), or (total_q, nheads, headdim) with cu_seqlens_q
    and max_seqlen_q. k_cache, v_cache: (batch_size_cache, seqlen_cache, nheads_k, headdim /
    headdim_v), or paged (num_pages, page_size, nheads_k, ...) with page_table (batch_size,
    pages_per_seq) int32, any page size; last dimension contiguous. cache_seqlens (int or
    (batch_size,) int32): keys in the cache; cache_batch_idx maps batch element b to cache
    row (or page-table row) cache_batch_idx[b]; cache_leftpad[b]: first valid cache row.

    k, v (batch_size, seqlen_new, nheads_k, ...), or (total_k_new, ...) with cu_seqlens_k_new:
    new keys/values, written into k_cache/v_cache *in place* at rows cache_seqlens[b], ... and
    attended to with the cache. rotary_cos/rotary_sin (seqlen_ro, rotary_dim / 2), q's dtype:
    the new keys are rotated at positions r, r + 1, ... and the queries too when causal or
    local (else all at r), r = rotary_seqlens[b] or cache_seqlens[b]; rotary_interleaved picks
    GPT-J (True) or GPT-NeoX pairs. Other arguments as flash_attn_varlen_func;
    scheduler_metadata comes from get_scheduler_metadata.

    Returns out (batch_size, seqlen, nheads, headdim_v) or (total_q, nheads, headdim_v), and
    with return_softmax_lse also softmax_lse (batch_size, nheads, seqlen) or (nheads, total_q).
    """
    checks.tensor("q", q)
    if cu_seqlens_q is not None:
        checks.tensor("cu_seqlens_q", cu_seqlens_q, ndim=1)
    batch_size = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
    checks.tensor("k_cache", k_cache)
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = torch.full((batch_size,), _integer("cache_seqlens", cache_seqlens), dtype=torch.int32,
                                   device=k_cache.device)
    args, out, softmax_lse = _attention_call(
        q=q, k=k_cache, v=v_cache, k_new=k, v_new=v, qv=qv, out=None, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=None,
        cu_seqlens_k_new=cu_seqlens_k_new, seqused_q=None, seqused_k=cache_seqlens, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=None, page_table=page_table, kv_batch_idx=cache_batch_idx, leftpad_k=cache_leftpad,
        rotary_cos=rotary_cos, rotary_sin=rotary_sin, seqlens_rotary=rotary_seqlens, q_descale=q_descale,
        k_descale=k_descale, v_descale=v_descale, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, learnable_sink=learnable_sink, attention_chunk=attention_chunk, softcap=softcap,
        rotary_interleaved=rotary_interleaved, scheduler_metadata=scheduler_metadata, num_splits=num_splits,
        pack_gqa=pack_gqa, sm_margin=sm_margin, cp_world_size=cp_world_size, cp_rank=cp_rank,
        cp_tot_seqused_k=cp_tot_seqused_k, names=_KVCACHE_NAMES, kv_in_place=True)
    _run(args, "auto")
    return (out, softmax_lse) if return_softmax_lse else out


@torch.compiler.assume_constant_result
def _multiprocessors(device: torch.device) -> int:
    return platform.device_info(device).multiprocessors


@mate_api(name="fmha.get_scheduler_metadata")
def get_scheduler_metadata(
    batch_size,
    max_seqlen_q,
    max_seqlen_k,
    num_heads_q,
    num_heads_kv,
    headdim,
    seqused_q: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    qkv_dtype=torch.bfloat16,
    headdim_v=None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    cu_seqlens_k_new: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    page_size=None,
    max_seqlen_k_new=0,
    causal=False,
    window_size=(-1, -1),
    attention_chunk=0,
    has_softcap=False,
    num_splits=0,
    pack_gqa=None,
    has_qv=False,
    mp_margin=0,
) -> torch.Tensor:
    """Scheduling metadata for flash_attn_with_kvcache / flash_attn_varlen_func's
    ``scheduler_metadata``: an int32 tensor of length 3 * batch_size + 2 on the tensors'
    device (the default device when no tensor is given), laid out as
    ``SCHEDULER_METADATA_VERSION`` describes: version, batch_size, then per batch element
    seqlen_q, seqlen_k (cached minus leftpad plus new) and the suggested KV split count.
    Computed with device ops only (no host sync; CUDA-graph capturable). Pass the same
    scheduling arguments as the attention call it serves.
    """
    batch_size = _integer("batch_size", batch_size)
    max_seqlen_q = _integer("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _integer("max_seqlen_k", max_seqlen_k)
    max_seqlen_k_new = _integer("max_seqlen_k_new", max_seqlen_k_new)
    num_heads_q = _integer("num_heads_q", num_heads_q, minimum=1)
    num_heads_kv = _integer("num_heads_kv", num_heads_kv, minimum=1)
    if num_heads_q % num_heads_kv != 0:
        raise checks.ArgumentError(f"num_heads_kv: {num_heads_kv} must divide num_heads_q={num_heads_q}")
    headdim = _integer("headdim", headdim, minimum=1)
    checks.at_most("headdim", headdim, MAX_HEAD_DIM, "the Q/K head dimension")
    headdim_v = headdim if headdim_v is None else _integer("headdim_v", headdim_v, minimum=1)
    checks.at_most("headdim_v", headdim_v, MAX_HEAD_DIM_V, "the V head dimension")
    checks.dtype_choice("qkv_dtype", qkv_dtype, FWD_DTYPES)
    if page_size is not None:
        _integer("page_size", page_size, minimum=1)
    _window(window_size)
    _integer("attention_chunk", 0 if attention_chunk is None else attention_chunk)
    num_splits = _integer("num_splits", num_splits, minimum=-(2**31))
    checks.at_most("num_splits", num_splits, MAX_SPLITS, "the number of splits")
    mp_margin = _integer("mp_margin", mp_margin)
    tensors = {"seqused_q": seqused_q, "seqused_k": seqused_k, "cu_seqlens_q": cu_seqlens_q,
               "cu_seqlens_k": cu_seqlens_k, "cu_seqlens_k_new": cu_seqlens_k_new, "cache_leftpad": cache_leftpad}
    given = [value for value in tensors.values() if isinstance(value, torch.Tensor)]
    device = given[0].device if given else platform.default_device()
    for name, value in tensors.items():
        if value is not None:
            cumulative = name.startswith("cu_")
            _int32_vector(name, value, device, batch_size + 1 if cumulative else batch_size,
                          "batch_size + 1" if cumulative else "batch_size")

    def full(value: int) -> torch.Tensor:
        return torch.full((batch_size,), value, dtype=torch.int32, device=device)

    def lengths(cumulative: torch.Tensor) -> torch.Tensor:
        return (cumulative[1:] - cumulative[:-1]).to(torch.int32)

    seqlen_q = seqused_q if seqused_q is not None else (
        lengths(cu_seqlens_q) if cu_seqlens_q is not None else full(max_seqlen_q))
    seqlen_k = seqused_k if seqused_k is not None else (
        lengths(cu_seqlens_k) if cu_seqlens_k is not None else full(max_seqlen_k))
    if cache_leftpad is not None:
        seqlen_k = seqlen_k - cache_leftpad
    seqlen_k = seqlen_k + (lengths(cu_seqlens_k_new) if cu_seqlens_k_new is not None else full(max_seqlen_k_new))
    if num_splits > 0:
        splits = full(num_splits)
    else:
        # Split the keys only when the (batch, kv head, 128-query tile) work items leave
        # multiprocessors idle; never more splits than 128-key blocks.
        group = num_heads_q // num_heads_kv
        tiles = max(1, batch_size * num_heads_kv * -(-max(1, max_seqlen_q * group) // 128))
        processors = max(0, _multiprocessors(device) - mp_margin)
        wanted = max(1, min(MAX_SPLITS, -(-processors // tiles))) if processors > tiles else 1
        blocks = torch.div(seqlen_k + (_SPLIT_BLOCK_N - 1), _SPLIT_BLOCK_N, rounding_mode="floor")
        splits = blocks.clamp(min=1, max=wanted).to(torch.int32)
    header = [torch.full((1,), value, dtype=torch.int32, device=device)
              for value in (SCHEDULER_METADATA_VERSION, batch_size)]
    return torch.cat([*header, seqlen_q.to(torch.int32), seqlen_k.to(torch.int32), splits])
