"""DeepGEMM's Python API served by MATE (see README.md for what is provided)."""

import torch

from mate import deep_gemm as _mate

# GEMMs, layout transforms and runtime settings
from mate.deep_gemm import (  # noqa: F401
    bf16_gemm_nn,
    bf16_gemm_nt,
    bf16_gemm_tn,
    bf16_gemm_tt,
    bf16_m_grouped_gemm_nt_masked,
    cublaslt_gemm_nn,
    cublaslt_gemm_nt,
    cublaslt_gemm_tn,
    cublaslt_gemm_tt,
    fp8_fp4_gemm_nn,
    fp8_fp4_gemm_nt,
    fp8_fp4_gemm_tn,
    fp8_fp4_gemm_tt,
    fp8_gemm_nn,
    fp8_gemm_nt,
    fp8_gemm_tn,
    fp8_gemm_tt,
    fp8_m_grouped_gemm_nt_masked,
    get_num_sms,
    get_pdl,
    get_tc_util,
    k_grouped_bf16_gemm_tn_contiguous,
    k_grouped_fp8_gemm_nt_contiguous,
    k_grouped_fp8_gemm_tn_contiguous,
    m_grouped_bf16_gemm_nn_contiguous,
    m_grouped_bf16_gemm_nt_contiguous,
    m_grouped_bf16_gemm_nt_masked,
    m_grouped_fp8_fp4_gemm_nn_contiguous,
    m_grouped_fp8_fp4_gemm_nt_contiguous,
    m_grouped_fp8_fp4_gemm_nt_masked,
    m_grouped_fp8_gemm_nn_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    set_block_size_multiple_of,
    set_ignore_compile_dims,
    set_num_sms,
    set_pdl,
    set_tc_util,
    transform_sf_into_required_layout,
)

from . import testing, utils  # noqa: E402,F401
from .utils import *  # noqa: E402,F401,F403

__version__ = "2.6.1"


# ---- lightning indexer: upstream's signatures; MATE provides these in a later release ----------

def fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True, max_seqlen_k=0):
    raise NotImplementedError(_mate.INDEXER_MESSAGE.format("deep_gemm.fp8_mqa_logits"))


def fp8_fp4_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True, max_seqlen_k=0,
                       logits_dtype=torch.float32):
    raise NotImplementedError(_mate.INDEXER_MESSAGE.format("deep_gemm.fp8_fp4_mqa_logits"))


def get_paged_mqa_logits_metadata(context_lens, block_kv, num_sms, indices=None):
    raise NotImplementedError(_mate.INDEXER_MESSAGE.format("deep_gemm.get_paged_mqa_logits_metadata"))


def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                         clean_logits=False, indices=None):
    raise NotImplementedError(_mate.INDEXER_MESSAGE.format("deep_gemm.fp8_paged_mqa_logits"))


def fp8_fp4_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                             clean_logits=False, logits_dtype=torch.float32, indices=None):
    raise NotImplementedError(_mate.INDEXER_MESSAGE.format("deep_gemm.fp8_fp4_paged_mqa_logits"))
