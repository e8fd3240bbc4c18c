"""Skip GPU and compile tests cleanly where the machine cannot run them."""

import os
import tempfile

import pytest

from mate import platform
from mate.testing import gpu_available, nvcc_available

# Tests use their own kernel cache unless one is given, so they never touch the user's.
os.environ.setdefault("MATE_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mate-test-cache"))


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a GPU")
    no_compiler = pytest.mark.skip(reason="needs nvcc and TileLang")
    can_compile = nvcc_available() and platform.tilelang_version() is not None
    for item in items:
        if "gpu" in item.keywords and not gpu_available():
            item.add_marker(no_gpu)
        if "compile" in item.keywords and not can_compile:
            item.add_marker(no_compiler)
