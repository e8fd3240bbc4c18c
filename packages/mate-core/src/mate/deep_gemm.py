"""`mate.deep_gemm`: DeepGEMM's API as MATE serves it (the `deep_gemm` wrapper package calls this).

GEMMs and layout utilities run (reference on the CPU; on a GPU see :mod:`mate.ops.gemm.api`);
the lightning-indexer functions (MQA logits) are not implemented yet and raise
NotImplementedError.
"""

from __future__ import annotations

import torch

from mate import platform
from mate.ops.gemm import *  # noqa: F401,F403
from mate.ops.gemm.layouts import (  # noqa: F401
    align,
    ceil_div,
    ceil_to_ue8m0,
    get_k_alignment_for_contiguous_layout,
    get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_tensor,
    get_theoretical_mk_alignment_for_contiguous_layout,
    get_tma_aligned_size,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_token_cast_to_fp8,
    set_mk_alignment_for_contiguous_layout,
    transform_sf_into_required_layout,
)

INDEXER_MESSAGE = "{}: the lightning-indexer kernels (MQA logits) are provided by a later MATE release"

# ---- runtime configuration (DeepGEMM's _C.set_* / get_*) ---------------------------------------

_config = {"num_sms": None, "tc_util": 100, "pdl": False, "ignore_compile_dims": False,
           "block_size_multiple_of": (1, 1)}


def set_num_sms(new_num_sms: int) -> None:
    """Limit the multiprocessors the kernels use (at most the device's count)."""
    available = _device_multiprocessors()
    if int(new_num_sms) < 1 or (available and int(new_num_sms) > available):
        raise ValueError(f"new_num_sms: {new_num_sms} is not in [1, {available or 'any'}] "
                         "(the device's multiprocessor count)")
    _config["num_sms"] = int(new_num_sms)


def get_num_sms() -> int:
    """The multiprocessor count the kernels use: set_num_sms's value, else the device's count."""
    return _config["num_sms"] if _config["num_sms"] is not None else _device_multiprocessors()


def _device_multiprocessors() -> int:
    return platform.device_info().multiprocessors


def set_tc_util(new_tc_util: int) -> None:
    _config["tc_util"] = int(new_tc_util)


def get_tc_util() -> int:
    return _config["tc_util"]


def set_pdl(new_enable_pdl: bool) -> None:
    _config["pdl"] = bool(new_enable_pdl)


def get_pdl() -> bool:
    return _config["pdl"]


def set_ignore_compile_dims(new_value: bool) -> None:
    _config["ignore_compile_dims"] = bool(new_value)


def set_block_size_multiple_of(new_value) -> None:
    _config["block_size_multiple_of"] = (new_value, new_value) if isinstance(new_value, int) else tuple(new_value)


# ---- lightning indexer (not implemented yet) ----------------------------------------------------

def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int, num_mps: int = 0) -> torch.Tensor:
    raise NotImplementedError(INDEXER_MESSAGE.format("get_paged_mqa_logits_metadata"))


def fp8_paged_mqa_logits(q: torch.Tensor, fused_kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor, schedule_meta: torch.Tensor,
                         max_context_len: int, clean_logits: bool) -> torch.Tensor:
    raise NotImplementedError(INDEXER_MESSAGE.format("fp8_paged_mqa_logits"))


def fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True, max_seqlen_k=0):
    raise NotImplementedError(INDEXER_MESSAGE.format("fp8_mqa_logits"))
