"""MATE: a portable tensor engine for generative-AI inference.

TileLang kernels for NVIDIA (and MUSA) GPUs behind the Python APIs of the CUDA ecosystem's
kernel libraries, with a PyTorch reference path for every op that runs anywhere.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from mate.dispatch import UnsupportedError  # noqa: E402

# Public modules, imported on first use so that `import mate` stays cheap.
_LAZY_MODULES = ("mha_interface", "gemm", "deep_gemm", "dispatch", "platform", "env", "jit", "api", "replay", "checks",
                 "testing")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"mate.{name}")
    raise AttributeError(f"module 'mate' has no attribute {name!r}")


__all__ = ["UnsupportedError", "__version__", *_LAZY_MODULES]
