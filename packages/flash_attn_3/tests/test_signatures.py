"""Signature conformance and import names against upstream FlashAttention-3.

UPSTREAM_SIGNATURES is data: `str(inspect.signature(...))` of each public function (and of the
autograd Functions' forward, and the low-level forward/backward that upstream's
`flash_attn_3.flash_attn_interface` re-exports), taken from Dao-AILab/flash-attention
hopper/flash_attn_interface.py at commit 0251105a2fb19d2957484b7f023cd8c115286ced (2026-08-15,
the newest stored snapshot; these signatures are unchanged since c082294e0f6c01d46318694a6f3e0274225a9683).
"""

import importlib
import inspect
import types
from typing import List, Optional, Tuple, Union

import pytest
import torch

UPSTREAM_COMMIT = "0251105a2fb19d2957484b7f023cd8c115286ced"

UPSTREAM_SIGNATURES = {
    "flash_attn_qkvpacked_func":
        "(qkv, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None, "
        "window_size=(-1, -1), attention_chunk=0, softcap=0.0, deterministic=False, num_heads_q=None, "
        "sm_margin=0, return_attn_probs=False)",
    "flash_attn_func":
        "(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None, "
        "window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, "
        "sm_margin=0, return_attn_probs=False)",
    "flash_attn_varlen_func":
        "(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None, "
        "softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None, "
        "window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, "
        "sm_margin=0, return_attn_probs=False)",
    "flash_attn_combine":
        "(out_partial, lse_partial, out=None, out_dtype=None)",
    "flash_attn_with_kvcache":
        "(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None, "
        "cache_seqlens: Union[int, torch.Tensor, NoneType] = None, cache_batch_idx: Optional[torch.Tensor] = None, "
        "cache_leftpad: Optional[torch.Tensor] = None, page_table: Optional[torch.Tensor] = None, "
        "cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k_new: Optional[torch.Tensor] = None, "
        "max_seqlen_q: Optional[int] = None, rotary_seqlens: Optional[torch.Tensor] = None, "
        "q_descale: Optional[torch.Tensor] = None, k_descale: Optional[torch.Tensor] = None, "
        "v_descale: Optional[torch.Tensor] = None, softmax_scale=None, causal=False, window_size=(-1, -1), "
        "attention_chunk=0, softcap=0.0, rotary_interleaved=True, scheduler_metadata=None, num_splits=0, "
        "pack_gqa=None, sm_margin=0, return_softmax_lse=False)",
    "get_scheduler_metadata":
        "(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim, "
        "cache_seqlens: torch.Tensor, qkv_dtype=torch.bfloat16, headdim_v=None, "
        "cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k_new: Optional[torch.Tensor] = None, "
        "cache_leftpad: Optional[torch.Tensor] = None, page_size: Optional[int] = None, max_seqlen_k_new=0, "
        "causal=False, window_size=(-1, -1), attention_chunk=0, has_softcap=False, num_splits=0, pack_gqa=None, "
        "sm_margin=0)",
    "maybe_contiguous": "(x)",
    "round_multiple": "(x, m)",
    "round_up_headdim": "(head_size: int) -> int",
    "FlashAttnQKVPackedFunc.forward":
        "(ctx, qkv, softmax_scale, causal, q_descale=None, k_descale=None, v_descale=None, window_size=(-1, -1), "
        "attention_chunk=0, softcap=0.0, deterministic=False, num_heads_q=None, sm_margin=0, return_softmax=False)",
    "FlashAttnFunc.forward":
        "(ctx, q, k, v, softmax_scale, causal, qv=None, q_descale=None, k_descale=None, v_descale=None, "
        "window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, "
        "sm_margin=0, return_softmax=False)",
    "FlashAttnVarlenFunc.forward":
        "(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, "
        "softmax_scale, causal, qv=None, q_descale=None, k_descale=None, v_descale=None, window_size=(-1, -1), "
        "attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0, "
        "return_softmax=False)",
    "_flash_attn_forward":
        "(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_new: Optional[torch.Tensor] = None, "
        "v_new: Optional[torch.Tensor] = None, qv: Optional[torch.Tensor] = None, "
        "out_: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None, "
        "cu_seqlens_k: Optional[torch.Tensor] = None, cu_seqlens_k_new: Optional[torch.Tensor] = None, "
        "seqused_q: Optional[torch.Tensor] = None, seqused_k: Optional[torch.Tensor] = None, "
        "max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, "
        "page_table: Optional[torch.Tensor] = None, kv_batch_idx: Optional[torch.Tensor] = None, "
        "leftpad_k: Optional[torch.Tensor] = None, rotary_cos: Optional[torch.Tensor] = None, "
        "rotary_sin: Optional[torch.Tensor] = None, seqlens_rotary: Optional[torch.Tensor] = None, "
        "q_descale: Optional[torch.Tensor] = None, k_descale: Optional[torch.Tensor] = None, "
        "v_descale: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None, causal: bool = False, "
        "window_size_left: int = -1, window_size_right: int = -1, attention_chunk: int = 0, "
        "softcap: float = 0.0, rotary_interleaved: bool = True, scheduler_metadata: Optional[torch.Tensor] = None, "
        "num_splits: int = 1, pack_gqa: Optional[bool] = None, sm_margin: int = 0) "
        "-> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]",
    "_flash_attn_backward":
        "(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, "
        "softmax_lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor] = None, "
        "cu_seqlens_k: Optional[torch.Tensor] = None, sequed_q: Optional[torch.Tensor] = None, "
        "sequed_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None, "
        "max_seqlen_k: Optional[int] = None, dq: Optional[torch.Tensor] = None, dk: Optional[torch.Tensor] = None, "
        "dv: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None, is_causal: bool = False, "
        "window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0, "
        "deterministic: bool = False, sm_margin: int = 0) -> torch.Tensor",
}

# What serving stacks import, and what each installed module exposes upstream.
SERVING_IMPORTS = ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
                   "get_scheduler_metadata", "flash_attn_combine")
PUBLIC_FUNCTIONS = ("flash_attn_qkvpacked_func", "flash_attn_func", "flash_attn_varlen_func",
                    "flash_attn_combine", "flash_attn_with_kvcache", "get_scheduler_metadata")
AUTOGRAD_FUNCTIONS = ("FlashAttnQKVPackedFunc", "FlashAttnFunc", "FlashAttnVarlenFunc")


def recorded_signature(text: str) -> inspect.Signature:
    """The recorded text as an inspect.Signature, its annotations evaluated in this Python."""
    namespace = {"torch": torch, "Optional": Optional, "Union": Union, "Tuple": Tuple, "List": List,
                 "NoneType": types.NoneType}
    exec(f"def recorded{text}:\n    pass\n", namespace)  # noqa: S102 - our own recorded data
    return inspect.signature(namespace["recorded"])


def resolve(module, dotted: str):
    target = module
    for part in dotted.split("."):
        target = getattr(target, part)
    return target


def describe_difference(ours: inspect.Signature, upstream: inspect.Signature) -> str:
    ours_params, upstream_params = list(ours.parameters.values()), list(upstream.parameters.values())
    for position, (a, b) in enumerate(zip(ours_params, upstream_params, strict=False)):
        if a != b:
            return f"parameter {position}: ours {a} ({a.kind.name}), upstream {b} ({b.kind.name})"
    if len(ours_params) != len(upstream_params):
        return f"{len(ours_params)} parameters, upstream {len(upstream_params)}"
    return f"return annotation: ours {ours.return_annotation}, upstream {upstream.return_annotation}"


@pytest.mark.parametrize("name", sorted(UPSTREAM_SIGNATURES))
def test_signature_matches_upstream(name):
    import flash_attn_interface

    ours = inspect.signature(resolve(flash_attn_interface, name))
    upstream = recorded_signature(UPSTREAM_SIGNATURES[name])
    assert ours == upstream, \
        f"{name}: {describe_difference(ours, upstream)}\n  ours:     {ours}\n  upstream: {upstream}"


def test_recorded_signatures_parse_back_to_themselves():
    """Guards the recorded data itself: each text is what inspect prints for it."""
    for name, text in UPSTREAM_SIGNATURES.items():
        assert str(recorded_signature(text)) == text, name


def test_keyword_only_and_positional_markers_absent_as_upstream():
    import flash_attn_interface

    for name in PUBLIC_FUNCTIONS:
        kinds = {p.kind for p in inspect.signature(getattr(flash_attn_interface, name)).parameters.values()}
        assert kinds == {inspect.Parameter.POSITIONAL_OR_KEYWORD}, name


def test_serving_imports():
    from flash_attn_interface import (  # noqa: F401
        flash_attn_combine,
        flash_attn_func,
        flash_attn_varlen_func,
        flash_attn_with_kvcache,
        get_scheduler_metadata,
    )


@pytest.mark.parametrize("module_name", ["flash_attn_interface", "flash_attn_3.flash_attn_interface"])
def test_interface_modules_expose_every_upstream_name(module_name):
    module = importlib.import_module(module_name)
    for name in UPSTREAM_SIGNATURES:
        resolve(module, name)
    for name in (*PUBLIC_FUNCTIONS, *AUTOGRAD_FUNCTIONS, "maybe_contiguous", "round_multiple", "round_up_headdim"):
        assert name in module.__all__, name


def test_package_and_shim_are_the_same_objects():
    import flash_attn_3
    import flash_attn_interface
    from flash_attn_3 import flash_attn_interface as packaged

    for name in (*PUBLIC_FUNCTIONS, *AUTOGRAD_FUNCTIONS):
        assert getattr(flash_attn_3, name) is getattr(flash_attn_interface, name), name
        assert getattr(packaged, name) is getattr(flash_attn_interface, name), name
    assert packaged._flash_attn_forward is flash_attn_interface._flash_attn_forward
    assert packaged._flash_attn_backward is flash_attn_interface._flash_attn_backward
    star = {}
    exec("from flash_attn_3.flash_attn_interface import *", star)  # noqa: S102
    assert set(PUBLIC_FUNCTIONS) <= set(star)


def test_version_and_build_config():
    import flash_attn_3
    import flash_attn_config
    from flash_attn_3 import flash_attn_config as packaged_config
    from flash_attn_interface import round_up_headdim

    assert flash_attn_3.__version__ == "3.0.0"
    assert packaged_config.CONFIG is flash_attn_config.CONFIG
    assert flash_attn_config.CONFIG["build_flags"]["FLASHATTENTION_DISABLE_BACKWARD"] is True
    assert [round_up_headdim(d) for d in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)] == \
        [64, 64, 96, 96, 128, 128, 192, 192, 256, 256, 256]


def test_autograd_functions_are_torch_autograd_functions():
    import flash_attn_interface

    for name in AUTOGRAD_FUNCTIONS:
        assert issubclass(getattr(flash_attn_interface, name), torch.autograd.Function), name


def test_helpers():
    from flash_attn_interface import maybe_contiguous, round_multiple

    assert maybe_contiguous(None) is None
    x = torch.randn(4, 6)
    assert maybe_contiguous(x) is x
    assert maybe_contiguous(x[:, ::2]).is_contiguous() and torch.equal(maybe_contiguous(x[:, ::2]), x[:, ::2])
    transposed = x.t()
    assert maybe_contiguous(transposed).stride(-1) == 1
    assert [round_multiple(v, 8) for v in (0, 1, 7, 8, 9, 16)] == [0, 8, 8, 8, 16, 16]
