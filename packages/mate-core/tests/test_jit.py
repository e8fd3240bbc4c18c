import pytest
import torch

from mate import jit, platform
from mate.ops.fmha.support import COMBINE

SM90 = platform.tilelang_target("sm_90a")
VARIANT = {"head_dim": 64, "out_dtype": torch.bfloat16}


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MATE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_kernels", {})
    return tmp_path


def test_variant_id_holds_only_static_features():
    assert jit.variant_id("fmha.flash_attn_combine", VARIANT, SM90) == \
        "fmha.flash_attn_combine[head_dim=64,out_dtype=bfloat16]@cuda:sm_90a"


def test_jit_off_refuses_a_missing_variant_and_names_the_command(fresh_cache, monkeypatch):
    monkeypatch.setenv("MATE_JIT", "0")
    with pytest.raises(jit.JitDisabledError, match=r"MATE_JIT=0 .* `mate aot --op fmha.flash_attn_combine`"):
        jit.get_kernel(COMBINE.name, VARIANT, SM90, COMBINE.build)


@pytest.mark.compile
def test_disk_cache_is_reused_and_jit_off_accepts_built_variants(fresh_cache, monkeypatch):
    before = dict(jit.stats)
    kernel = jit.get_kernel(COMBINE.name, VARIANT, SM90, COMBINE.build)
    assert jit.stats["compiled"] == before["compiled"] + 1
    assert [r["variant"] for r in jit.built_variants()] == [jit.variant_id(COMBINE.name, VARIANT, SM90)]
    monkeypatch.setattr(jit, "_kernels", {})  # as a new process would start
    monkeypatch.setenv("MATE_JIT", "0")
    loaded = jit.get_kernel(COMBINE.name, VARIANT, SM90, COMBINE.build)
    assert jit.stats["loaded"] == before["loaded"] + 1
    # Both enter TVM-FFI directly, not through TileLang's per-call Python wrapper.
    for k in (kernel, loaded):
        assert k.torch_function is not k.adapter.func and type(k.torch_function).__name__ == "Function"


REBUILD = """
import warnings, torch
from mate import jit, platform
from mate.ops.fmha.support import COMBINE
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kernel = jit.get_kernel(COMBINE.name, {"head_dim": 68, "out_dtype": torch.bfloat16},
                            platform.tilelang_target("sm_90a"), COMBINE.build)
print("WARNINGS:", " | ".join(str(w.message) for w in caught))
print("REBUILT:", "__global__" in kernel.get_kernel_source())
"""


@pytest.mark.compile
def test_corrupt_cache_entries_are_rebuilt_with_a_warning(fresh_cache):
    import os
    import subprocess
    import sys
    from pathlib import Path

    # A variant no other test builds: TileLang's own in-process cache would hand back a kernel
    # (and its cache path) from another test's cache folder.
    kernel = jit.get_kernel(COMBINE.name, {"head_dim": 68, "out_dtype": torch.bfloat16}, SM90, COMBINE.build)
    library = next(Path(kernel._tilelang_cache_path).glob("*.so"))
    library.write_bytes(library.read_bytes()[:100])  # a truncated binary
    next((fresh_cache / "index").glob("*.json")).write_text("{broken")  # and a broken index entry
    result = subprocess.run([sys.executable, "-c", REBUILD], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, MATE_CACHE_DIR=str(fresh_cache)))
    assert result.returncode == 0, result.stderr
    assert "REBUILT: True" in result.stdout
    assert "is unreadable; rebuilding" in result.stdout and "integrity" in result.stdout, result.stdout
