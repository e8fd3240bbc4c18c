import pytest
import torch

from mate import dispatch, platform
from mate.ops.fmha.support import COMBINE

GPU = platform.DeviceInfo("cuda", "fake GPU", "sm_90a", 132, 232448)
SUPPORTED = {"head_dim": 128, "out_dtype": torch.bfloat16}
UNSUPPORTED = {"head_dim": 130, "out_dtype": torch.bfloat16}


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(platform, "device_info", lambda device=None: GPU)
    monkeypatch.setattr(platform, "tilelang_version", lambda: "0.1.15")


def test_cpu_runs_the_reference():
    assert dispatch.select(COMBINE, SUPPORTED, torch.device("cpu")) == "reference"


def test_forcing_tilelang_on_cpu_is_an_error(monkeypatch):
    monkeypatch.setenv("MATE_BACKEND", "tilelang")
    with pytest.raises(dispatch.UnsupportedError, match="needs a GPU"):
        dispatch.select(COMBINE, SUPPORTED, torch.device("cpu"))


def test_gpu_supported_variant_runs_the_kernel(fake_gpu):
    assert dispatch.select(COMBINE, SUPPORTED, torch.device("cuda")) == "tilelang"


def test_gpu_unsupported_variant_names_the_feature(fake_gpu):
    with pytest.raises(dispatch.UnsupportedError, match=r"head_dim=130 \(supported: 4\.\.512 step 4\)") as err:
        dispatch.select(COMBINE, UNSUPPORTED, torch.device("cuda"))
    assert isinstance(err.value, NotImplementedError)
    assert "MATE_ALLOW_REFERENCE_FALLBACK=1" in str(err.value)


def test_fallback_runs_the_reference_with_one_warning(fake_gpu, monkeypatch):
    monkeypatch.setenv("MATE_ALLOW_REFERENCE_FALLBACK", "1")
    variant = {"head_dim": 134, "out_dtype": torch.float16}
    with pytest.warns(UserWarning, match="running the PyTorch reference"):
        assert dispatch.select(COMBINE, variant, torch.device("cuda")) == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select(COMBINE, variant, torch.device("cuda")) == "reference"


def test_forced_reference_wins_on_gpu(fake_gpu, monkeypatch):
    monkeypatch.setenv("MATE_BACKEND", "reference")
    assert dispatch.select(COMBINE, UNSUPPORTED, torch.device("cuda")) == "reference"


def test_missing_tilelang_is_reported(monkeypatch):
    monkeypatch.setattr(platform, "device_info", lambda device=None: GPU)
    monkeypatch.setattr(platform, "tilelang_version", lambda: None)
    with pytest.raises(dispatch.UnsupportedError, match="TileLang is not installed"):
        dispatch.select(COMBINE, SUPPORTED, torch.device("cuda"))


def test_every_op_declares_its_support_and_aot_variants():
    ops = dispatch.ops()
    assert COMBINE in ops
    for op in ops:
        assert op.support.features
        for variant in op.aot_variants():
            assert not op.support.violations(variant), (op.name, variant)


def test_feature_combinations_are_checked():
    support = dispatch.Support({"head_dim": (64, 128, 192), "head_dim_v": (64, 128, 192)},
                               combinations={("head_dim", "head_dim_v"): ((64, 64), (128, 128), (192, 128))})
    assert support.violations({"head_dim": 192, "head_dim_v": 128}) == []
    assert support.violations({"head_dim": 64, "head_dim_v": 128}) == [
        "(head_dim, head_dim_v)=(64, 128) (supported: (64, 64), (128, 128), (192, 128))"]
    assert len(support.variants()) == 3
