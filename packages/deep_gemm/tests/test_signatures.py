"""Public names and signatures against upstream DeepGEMM.

UPSTREAM_SIGNATURES is data: each function's parameters (name=default) as upstream declares them,
taken from deepseek-ai/DeepGEMM at commit 54e22612409371d6364144b69086735beb54e98b
(deep_gemm.__version__ 2.6.1): the pybind11 `py::arg` lists in csrc/apis/{gemm,layout,attention}.hpp
and the Python definitions in deep_gemm/utils/math.py. Functions that upstream binds without
argument names take positional arguments only; they are recorded by their count.
Annotations are not compared (pybind11 functions have none).
"""

import inspect

import pytest

import deep_gemm

UPSTREAM_COMMIT = "54e22612409371d6364144b69086735beb54e98b"

_FP8_NORMAL = ("(a, b, d, c=None, recipe=None, recipe_a=None, recipe_b=None, compiled_dims='{}', "
               "disable_ue8m0_cast=False)")
_FP8_M_CONTIGUOUS = ("(a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None, compiled_dims='nk', "
                     "disable_ue8m0_cast=False, use_psum_layout=False, ensure_zero_padding=True{})")
_FP8_MASKED = ("(a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None, compiled_dims='nk', "
               "disable_ue8m0_cast=False)")
_K_GROUPED_FP8 = ("(a, b, d, ks_cpu, grouped_layout, c=None, recipe=(1, 1, 128), compiled_dims='mn', "
                  "use_psum_layout=False)")

UPSTREAM_SIGNATURES = {
    # FP8 / FP8-FP4 GEMMs (the fp8_* names are aliases of the fp8_fp4_* functions upstream)
    **{f"{prefix}_gemm_{layout}": _FP8_NORMAL.format("nk" if layout[0] == "n" else "mn")
       for prefix in ("fp8", "fp8_fp4") for layout in ("nt", "nn", "tn", "tt")},
    "m_grouped_fp8_fp4_gemm_nt_contiguous": _FP8_M_CONTIGUOUS.format(", expected_m_for_psum_layout=None"),
    "m_grouped_fp8_gemm_nt_contiguous": _FP8_M_CONTIGUOUS.format(", expected_m_for_psum_layout=None"),
    "m_grouped_fp8_fp4_gemm_nn_contiguous": _FP8_M_CONTIGUOUS.format(""),
    "m_grouped_fp8_gemm_nn_contiguous": _FP8_M_CONTIGUOUS.format(""),
    "m_grouped_fp8_fp4_gemm_nt_masked": _FP8_MASKED,
    "m_grouped_fp8_gemm_nt_masked": _FP8_MASKED,
    "fp8_m_grouped_gemm_nt_masked": _FP8_MASKED,
    "k_grouped_fp8_gemm_tn_contiguous": _K_GROUPED_FP8,
    "k_grouped_fp8_gemm_nt_contiguous": _K_GROUPED_FP8,
    # BF16 GEMMs
    "bf16_gemm_nt": "(a, b, d, c=None, compiled_dims='nk')",
    "bf16_gemm_nn": "(a, b, d, c=None, compiled_dims='nk')",
    "bf16_gemm_tn": "(a, b, d, c=None, compiled_dims='mn')",
    "bf16_gemm_tt": "(a, b, d, c=None, compiled_dims='mn')",
    "m_grouped_bf16_gemm_nt_contiguous":
        "(a, b, d, grouped_layout, compiled_dims='nk', use_psum_layout=False, ensure_zero_padding=True, "
        "expected_m_for_psum_layout=None)",
    "m_grouped_bf16_gemm_nn_contiguous":
        "(a, b, d, grouped_layout, compiled_dims='nk', use_psum_layout=False, ensure_zero_padding=True)",
    "m_grouped_bf16_gemm_nt_masked": "(a, b, d, masked_m, expected_m, compiled_dims='nk')",
    "bf16_m_grouped_gemm_nt_masked": "(a, b, d, masked_m, expected_m, compiled_dims='nk')",
    "k_grouped_bf16_gemm_tn_contiguous":
        "(a, b, d, ks_cpu, grouped_layout, c=None, compiled_dims='mn', use_psum_layout=False)",
    # cuBLASLt GEMMs
    **{f"cublaslt_gemm_{layout}": "(a, b, d, c=None)" for layout in ("nt", "nn", "tn", "tt")},
    # Layout
    "transform_sf_into_required_layout":
        "(sf, mn, k, recipe, num_groups=None, is_sfa=None, disable_ue8m0_cast=False, psum_layout=None)",
    "get_theoretical_mk_alignment_for_contiguous_layout": "(expected_m=None)",
    # Lightning indexer (MATE: NotImplementedError for now)
    "fp8_mqa_logits": "(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True, max_seqlen_k=0)",
    "fp8_fp4_mqa_logits":
        "(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True, max_seqlen_k=0, "
        "logits_dtype=torch.float32)",
    "get_paged_mqa_logits_metadata": "(context_lens, block_kv, num_sms, indices=None)",
    "fp8_paged_mqa_logits":
        "(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits=False, "
        "indices=None)",
    "fp8_fp4_paged_mqa_logits":
        "(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits=False, "
        "logits_dtype=torch.float32, indices=None)",
    # deep_gemm.utils.math (Python upstream)
    "ceil_div": "(x, y)",
    "align": "(x, y)",
    "ceil_to_ue8m0": "(x)",
    "per_token_cast_to_fp8": "(x, use_ue8m0, gran_k=128, use_packed_ue8m0=False)",
    "per_channel_cast_to_fp8": "(x, use_ue8m0, gran_k=128)",
    "per_block_cast_to_fp8": "(x, use_ue8m0, gran_k=128)",
}

# Bound without argument names upstream: callable with this many positional arguments.
UPSTREAM_POSITIONAL = {
    "set_num_sms": 1, "get_num_sms": 0, "set_tc_util": 1, "get_tc_util": 0, "set_pdl": 1, "get_pdl": 0,
    "set_ignore_compile_dims": 1, "set_block_size_multiple_of": 1,
    "get_tma_aligned_size": 2, "get_mn_major_tma_aligned_tensor": 1,
    "set_mk_alignment_for_contiguous_layout": 1, "get_mk_alignment_for_contiguous_layout": 0,
    "get_m_alignment_for_contiguous_layout": 0, "get_k_alignment_for_contiguous_layout": 0,
}

# Upstream binds several names to one function object.
UPSTREAM_ALIASES = [("fp8_gemm_nt", "fp8_fp4_gemm_nt"),
                    ("m_grouped_fp8_gemm_nt_masked", "fp8_m_grouped_gemm_nt_masked"),
                    ("m_grouped_bf16_gemm_nt_masked", "bf16_m_grouped_gemm_nt_masked"),
                    ("get_mk_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout")]


def _render(fn) -> str:
    """`(name, name=default, ...)` without annotations, defaults as repr (torch dtypes as torch.x)."""
    parts = []
    for param in inspect.signature(fn).parameters.values():
        if param.default is inspect.Parameter.empty:
            parts.append(param.name)
        else:
            parts.append(f"{param.name}={param.default!r}")
    return f"({', '.join(parts)})"


@pytest.mark.parametrize("name", sorted(UPSTREAM_SIGNATURES))
def test_signature(name):
    assert hasattr(deep_gemm, name), f"deep_gemm.{name} is missing"
    assert _render(getattr(deep_gemm, name)) == UPSTREAM_SIGNATURES[name]


@pytest.mark.parametrize("name", sorted(UPSTREAM_POSITIONAL))
def test_positional_functions(name):
    params = list(inspect.signature(getattr(deep_gemm, name)).parameters.values())
    required = [p for p in params if p.default is inspect.Parameter.empty]
    assert len(required) == UPSTREAM_POSITIONAL[name]
    assert all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


@pytest.mark.parametrize("first,second", UPSTREAM_ALIASES)
def test_aliases(first, second):
    assert getattr(deep_gemm, first) is getattr(deep_gemm, second)


def test_modules_and_version():
    assert deep_gemm.__version__ == "2.6.1"
    assert deep_gemm.utils.per_token_cast_to_fp8 is deep_gemm.per_token_cast_to_fp8
    assert deep_gemm.utils.layout.get_tma_aligned_size is deep_gemm.get_tma_aligned_size
    assert callable(deep_gemm.testing.calc_diff)
