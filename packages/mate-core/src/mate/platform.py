"""What device MATE runs on. The one place that inspects devices.

Everything device-dependent (dispatch, kernel targets, launch heuristics) asks this module:
the device kind (cuda, musa or cpu), the architecture, the multiprocessor count, the
shared-memory limit and the TileLang target to compile for.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

# Architectures whose arch-specific ("a") features (wgmma, TMA multicast, ...) our kernels use.
_ARCH_SPECIFIC = {(9, 0), (10, 0), (10, 3)}


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda", "musa" or "cpu"
    name: str
    arch: str | None  # e.g. "sm_90a"; None on CPU
    multiprocessors: int
    shared_memory_per_block: int  # bytes a block may opt into; 0 on CPU

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"

    @property
    def tilelang_target(self) -> dict | None:
        return tilelang_target(self.arch) if self.is_gpu else None


def cuda_arch(major: int, minor: int) -> str:
    return f"sm_{major}{minor}{'a' if (major, minor) in _ARCH_SPECIFIC else ''}"


def tilelang_target(arch: str, kind: str = "cuda") -> dict:
    """TileLang target for an architecture such as "sm_90a" (also used to compile without a GPU)."""
    return {"kind": kind, "arch": arch}


def _musa_module():
    if importlib.util.find_spec("torch_musa") is None:
        return None
    import torch_musa  # noqa: F401  (registers torch.musa)

    return getattr(torch, "musa", None)


@functools.cache
def _gpu_info(kind: str, index: int) -> DeviceInfo:
    module = torch.cuda if kind == "cuda" else _musa_module()
    props = module.get_device_properties(index)
    arch = cuda_arch(props.major, props.minor) if kind == "cuda" else f"mp_{props.major}{props.minor}"
    smem = getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 0)
    return DeviceInfo(kind, props.name, arch, props.multi_processor_count, int(smem))


_CPU = DeviceInfo("cpu", "cpu", None, 0, 0)
# By torch.device naming its index (every tensor's device): a call asks several times, and one
# dict lookup is cheaper than normalizing the device. Devices without an index follow the current
# device, so they are looked up each time.
_by_device: dict[torch.device, DeviceInfo] = {}


def device_info(device: torch.device | str | None = None) -> DeviceInfo:
    """Facts about `device` (default: the default device, see :func:`default_device`)."""
    info = _by_device.get(device)
    if info is None:
        info = _device_info(device)
        if isinstance(device, torch.device) and (device.index is not None or device.type == "cpu"):
            _by_device[device] = info
    return info


def _device_info(device: torch.device | str | None) -> DeviceInfo:
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cpu":
        return _CPU
    if device.type in ("cuda", "musa"):
        index = device.index if device.index is not None else _current_index(device.type)
        return _gpu_info(device.type, index)
    raise ValueError(f"device: got {device}; MATE runs on cuda, musa or cpu devices")


def is_capturing(device: torch.device) -> bool:
    """Whether the current stream of `device` is capturing a graph (CUDA or MUSA)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    musa = _musa_module() if device.type == "musa" else None
    return musa is not None and bool(getattr(musa, "is_current_stream_capturing", lambda: False)())


def _current_index(kind: str) -> int:
    return torch.cuda.current_device() if kind == "cuda" else _musa_module().current_device()


@functools.cache
def default_device() -> torch.device:
    """The GPU when one is present (CUDA, else MUSA), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    musa = _musa_module()
    if musa is not None and musa.is_available():
        return torch.device("musa")
    return torch.device("cpu")


@functools.cache
def tilelang_version() -> str | None:
    """TileLang's version when it is installed (without importing it: that takes seconds).
    Cached: a metadata lookup scans sys.path (~0.7 ms), far too slow for every dispatch."""
    if importlib.util.find_spec("tilelang") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tilelang")
    except PackageNotFoundError:
        return "unknown"
