"""Compile-or-load TileLang kernels.

A kernel is identified by (op name, static variant key, target). Each is built once per
process (in-memory cache) and once per machine: TileLang's own disk cache, placed under
MATE_CACHE_DIR/tilelang, stores the binaries (atomic writes, integrity-checked loads); MATE
adds an index of the variants it built, a file lock so that concurrent processes build a
variant once, and the MATE_JIT=0 policy. Per-call sizes (batch, sequence lengths, token
counts) are dynamic kernel parameters, never part of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mate import env

_kernels: dict[str, Any] = {}
# (op, variant items, target items) -> variant id: formatting the id costs ~5 us, a call's budget.
_ids: dict[tuple, str] = {}
_lock = threading.Lock()
# Counters for tests and `mate show-config`: compiled = built with the compiler, loaded =
# taken from the disk cache; both count only in-memory misses.
stats = {"compiled": 0, "loaded": 0}

EXECUTION_BACKEND = "tvm_ffi"


class JitDisabledError(RuntimeError):
    """MATE_JIT=0 and the requested kernel variant has not been built on this machine."""


def cache_dir() -> Path:
    return Path(env.get("MATE_CACHE_DIR"))


def tilelang():
    """Import TileLang with its kernel cache placed under MATE_CACHE_DIR."""
    os.environ["TILELANG_CACHE_DIR"] = str(cache_dir() / "tilelang")
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    import tilelang as tl

    _watch_tilelang_cache_warnings()
    return tl


def variant_id(op: str, variant: Mapping[str, Any], target: Mapping[str, Any]) -> str:
    """Stable text naming one kernel variant (the key of both caches and the index)."""
    static = ",".join(f"{k}={_text(v)}" for k, v in sorted(variant.items()))
    arch = target.get("arch", "")
    return f"{op}[{static}]@{target['kind']}:{arch}"


def _text(value: Any) -> str:
    return str(value).replace("torch.", "")


def _index_file(vid: str) -> Path:
    digest = hashlib.sha256(vid.encode()).hexdigest()[:24]
    return cache_dir() / "index" / f"{digest}.json"


def get_kernel(op: str, variant: Mapping[str, Any], target: Mapping[str, Any],
               build: Callable[..., Any]) -> Any:
    """The compiled kernel of `build(**variant)` (a TileLang PrimFunc) for `target`."""
    key = (op, tuple(variant.items()), tuple(target.items()))
    vid = _ids.get(key)
    if vid is None:
        vid = _ids[key] = variant_id(op, variant, target)
    kernel = _kernels.get(vid)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _kernels.get(vid)
        if kernel is None:
            kernel = _load_or_compile(op, vid, variant, target, build)
            _kernels[vid] = kernel
    return kernel


def _load_or_compile(op: str, vid: str, variant: Mapping[str, Any], target: Mapping[str, Any],
                     build: Callable[..., Any]) -> Any:
    from filelock import FileLock

    index = _index_file(vid)
    index.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(index) + ".lock"):
        recorded = _read_index(index)
        on_disk = recorded is not None and Path(recorded.get("tilelang_entry", "")).is_dir()
        if not on_disk and not env.get("MATE_JIT"):
            raise JitDisabledError(
                f"kernel {vid} is not built on this machine and MATE_JIT=0 forbids compiling it; "
                f"build it first with `mate aot --op {op}` (or unset MATE_JIT)")
        tl = tilelang()
        start = time.perf_counter()
        kernel = tl.compile(build(**variant), target=dict(target), execution_backend=EXECUTION_BACKEND)
        seconds = time.perf_counter() - start
        _call_directly(kernel)
        entry = getattr(kernel, "_tilelang_cache_path", "")
        stats["loaded" if on_disk else "compiled"] += 1
        if not on_disk or recorded.get("tilelang_entry") != entry:
            _write_index(index, {"op": op, "variant": vid, "tilelang_entry": entry,
                                 "compile_seconds": round(seconds, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return kernel


def _call_directly(kernel: Any) -> None:
    """Let calls skip TileLang's per-call Python wrapper (a loop over every parameter, ~10-20 us
    per launch on the GPU machine) and enter the TVM-FFI function directly. MATE always passes
    every parameter, outputs included (no result_idx), and the wrapper then only forwards them;
    where that does not hold (another adapter, outputs allocated by TileLang) the wrapper stays."""
    adapter = getattr(kernel, "adapter", None)
    if getattr(adapter, "result_idx", None) != [] or not hasattr(adapter, "_get_executable"):
        return
    try:
        executable = adapter._get_executable()
        # A fresh compile holds a tvm Executable (linked on first use); a disk-cache load, the module.
        module = executable.jit() if hasattr(executable, "jit") else executable
        kernel.torch_function = module.main
    except Exception:  # noqa: BLE001 (an internal layout this TileLang does not have: keep its wrapper)
        return


def _read_index(index: Path) -> dict | None:
    try:
        return json.loads(index.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        warnings.warn(f"mate.jit: index entry {index} is unreadable; rebuilding that kernel", stacklevel=4)
        return None


def _write_index(index: Path, record: dict) -> None:
    partial = index.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=2))
    os.replace(partial, index)


def built_variants() -> list[dict]:
    """The index: every variant built into this machine's cache."""
    folder = cache_dir() / "index"
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = _read_index(path)
        if record is not None:
            records.append(record)
    return records


class _CacheWarningsToPython(logging.Handler):
    """TileLang reports a corrupt cache entry (which it then rebuilds) on its logger; surface it."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING and ("integrity" in message or "Failed to load" in message):
            warnings.warn(f"mate.jit: {message}", stacklevel=2)


_watching = False


def _watch_tilelang_cache_warnings() -> None:
    global _watching
    if not _watching:
        logging.getLogger("tilelang.cache.kernel_cache").addHandler(_CacheWarningsToPython())
        _watching = True
