"""`@mate_api`: the decorator every public function wears.

MATE_LOGLEVEL selects what each call logs: 0 nothing (one check of the level), 1 the function
name, 3 plus argument metadata, 5 plus tensor statistics, 10 plus a dump of the call (inputs
before, outputs after) into MATE_DUMP_DIR that `mate replay` re-executes. A call that raises
is logged with its error, and dumped at level 10 too.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mate import env

DEFAULT_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}

_dump_counter = itertools.count()
_log_lock = threading.Lock()


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return DEFAULT_TOLERANCE.get(dtype, (0.0, 0.0))


def mate_api(fn: Callable | None = None, *, name: str | None = None,
             tolerance: Callable[[torch.dtype], tuple[float, float]] = default_tolerance):
    """Wrap a public function with MATE's logging and dumping (see the module docstring)."""

    def decorate(fn: Callable) -> Callable:
        api_name = name or f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            level = env.get("MATE_LOGLEVEL")
            if level == 0:
                return fn(*args, **kwargs)
            return _logged_call(fn, api_name, level, args, kwargs)

        wrapper.__mate_api__ = api_name
        wrapper.__mate_tolerance__ = tolerance
        return wrapper

    return decorate(fn) if fn is not None else decorate


def _logged_call(fn: Callable, api_name: str, level: int, args: tuple, kwargs: dict):
    lines = [f"[mate] {api_name}"]
    if level >= 3:
        bound = _named_arguments(fn, args, kwargs)
        lines += [f"  {key}: {describe(value, stats=level >= 5)}" for key, value in bound.items()]
    dump_dir = _start_dump(fn, api_name, args, kwargs) if level >= 10 else None
    start = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except Exception as error:
        lines.append(f"  raised {type(error).__name__}: {error}")
        _emit(lines)
        if dump_dir is not None:
            _finish_dump(dump_dir, None, args, kwargs, time.perf_counter() - start, error)
        raise
    elapsed = time.perf_counter() - start
    if level >= 3:
        lines.append(f"  -> {describe(result, stats=level >= 5)}  ({elapsed * 1e3:.3f} ms host)")
    if dump_dir is not None:
        _finish_dump(dump_dir, result, args, kwargs, elapsed, None)
        lines.append(f"  dumped to {dump_dir}")
    _emit(lines)
    return result


def _named_arguments(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    import inspect

    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    return dict(bound.arguments)


def describe(value: Any, stats: bool = False) -> str:
    """One-line metadata of an argument or result (tensor statistics when `stats`)."""
    if isinstance(value, torch.Tensor):
        text = (f"Tensor(shape={tuple(value.shape)}, dtype={str(value.dtype).replace('torch.', '')}, "
                f"device={value.device}, stride={value.stride()})")
        if stats and value.numel() and (value.is_floating_point() or value.is_complex()):
            finite = value.detach().float()
            text += (f" min={finite.nan_to_num().min().item():.6g} max={finite.nan_to_num().max().item():.6g} "
                     f"mean={finite.nan_to_num().mean().item():.6g} nan={int(finite.isnan().sum())} "
                     f"inf={int(finite.isinf().sum())}")
        return text
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v, stats) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return repr(value)


def _emit(lines: list[str]) -> None:
    dest = env.get("MATE_LOGDEST")
    text = "\n".join(lines) + "\n"
    with _log_lock:
        if dest in ("stdout", "stderr"):
            stream = sys.stdout if dest == "stdout" else sys.stderr
            stream.write(text)
            stream.flush()
        else:
            with open(dest, "a", encoding="utf-8") as log_file:
                log_file.write(text)


def call_op(op: Callable, impl: Callable, *args, **kwargs):
    """Run a torch.library custom op: through the op while torch.compile traces (so the graph
    holds it, without a break), else `impl` directly: the dispatcher's autograd/inplace layers
    cost ~50-100 us per eager call, more than a decode kernel takes."""
    if torch.compiler.is_compiling():
        return op(*args, **kwargs)
    return impl(*args, **kwargs)


# ---- level-10 dumps ----------------------------------------------------------------------

def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _metadata(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype), "device": str(value.device),
                "stride": list(value.stride())}
    if isinstance(value, (tuple, list)):
        return [_metadata(v) for v in value]
    if isinstance(value, dict):
        return {k: _metadata(v) for k, v in value.items()}
    return repr(value)


def _start_dump(fn: Callable, api_name: str, args: tuple, kwargs: dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(env.get("MATE_DUMP_DIR")) / f"{stamp}-{os.getpid()}-{next(_dump_counter):06d}-{api_name}"
    folder.mkdir(parents=True, exist_ok=True)
    devices = sorted({str(a.device) for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)})
    torch.save({"args": _to_cpu(list(args)), "kwargs": _to_cpu(kwargs)}, folder / "inputs.pt")
    manifest = {
        "api": api_name,
        "function": f"{fn.__module__}:{fn.__qualname__}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "devices": devices,
        "device_name": _device_name(devices),
        "versions": _versions(),
        "inputs": {"args": _metadata(list(args)), "kwargs": _metadata(kwargs)},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def _finish_dump(folder: Path, result: Any, args: tuple, kwargs: dict, elapsed: float,
                 error: BaseException | None) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["elapsed_ms"] = elapsed * 1e3
    if error is not None:
        manifest["error"] = {"type": type(error).__name__, "message": str(error)}
    else:
        # The arguments after the call too: in-place APIs (out=, caches, GEMMs writing `d`)
        # deliver their results there.
        torch.save({"result": _to_cpu(result), "args_after": _to_cpu(list(args)), "kwargs_after": _to_cpu(kwargs)},
                   folder / "outputs.pt")
        manifest["outputs"] = _metadata(result)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _device_name(devices: list[str]) -> str:
    gpus = [d for d in devices if not d.startswith("cpu")]
    if gpus and gpus[0].startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(gpus[0]))
    return gpus[0] if gpus else "cpu"


def _versions() -> dict[str, str | None]:
    from mate import __version__, platform

    return {"mate": __version__, "torch": torch.__version__, "tilelang": platform.tilelang_version(),
            "python": sys.version.split()[0]}
