"""Re-run level-10 dumps (see mate.api) and compare with what was recorded."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class DumpError(Exception):
    """A dump folder is missing a file or holds one that cannot be read."""


@dataclass
class ReplayResult:
    folder: Path
    api: str
    status: str  # "bitwise", "match", "mismatch", "error" (the replay broke), "raised" (as recorded)
    detail: str

    @property
    def ok(self) -> bool:
        return self.status in ("bitwise", "match", "raised")


def dump_folders(root: Path) -> list[Path]:
    """Every dump folder under `root` (a folder holding manifest.json, or folders of them)."""
    root = Path(root)
    if not root.exists():
        raise DumpError(f"dump directory {root} does not exist")
    if (root / "manifest.json").exists():
        return [root]
    return sorted(p.parent for p in root.glob("*/manifest.json"))


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise DumpError(f"{folder}: cannot read manifest.json: {err}") from None


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise DumpError(f"{path}: cannot load ({type(err).__name__}: {err})") from None


def _resolve(function: str):
    module_name, _, qualname = function.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _flatten(value: Any) -> list:
    """Leaves of nested lists/tuples/dicts (dicts in key order)."""
    if isinstance(value, dict):
        return [leaf for key in sorted(value) for leaf in _flatten(value[key])]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def replay(folder: Path, device: str | None = None) -> ReplayResult:
    """Re-execute one dumped call on `device` (default: where it ran, when present) and compare."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
        api = manifest.get("api", "?")
        inputs = _load(folder / "inputs.pt")
        recorded_error = manifest.get("error")
        outputs = None if recorded_error else _load(folder / "outputs.pt")
        expected = None if recorded_error else [outputs["result"], outputs["args_after"], outputs["kwargs_after"]]
        function = _resolve(manifest["function"])
    except (DumpError, KeyError, TypeError, ImportError, AttributeError) as err:
        return ReplayResult(folder, locals().get("api", "?"), "error", f"unreadable dump: {err}")

    target = torch.device(device or _recorded_device(manifest))
    args = _to_device(inputs["args"], target)
    kwargs = _to_device(inputs["kwargs"], target)
    try:
        result = function(*args, **kwargs)
    except Exception as err:
        if recorded_error and recorded_error["type"] == type(err).__name__:
            return ReplayResult(folder, api, "raised", f"raised {type(err).__name__} as recorded")
        return ReplayResult(folder, api, "error", f"replay raised {type(err).__name__}: {err}")
    if recorded_error:
        return ReplayResult(folder, api, "mismatch", f"recorded {recorded_error['type']}, replay returned")
    actual = [result, args, kwargs]
    return _compare(folder, api, function, _flatten(expected), _flatten(actual))


def _recorded_device(manifest: dict) -> str:
    gpus = [d for d in manifest.get("devices", []) if not d.startswith("cpu")]
    if gpus and gpus[0].startswith("cuda") and torch.cuda.is_available():
        return gpus[0]
    return "cpu"


def _compare(folder: Path, api: str, function, expected: list, actual: list) -> ReplayResult:
    from mate.api import default_tolerance

    tolerance = getattr(function, "__mate_tolerance__", default_tolerance)
    if len(expected) != len(actual):
        return ReplayResult(folder, api, "mismatch", f"{len(actual)} outputs, recorded {len(expected)}")
    worst, bitwise = 0.0, True
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if not isinstance(want, torch.Tensor):
            if want != got:
                return ReplayResult(folder, api, "mismatch", f"output {index}: {got!r} != recorded {want!r}")
            continue
        got = got.detach().cpu()
        if got.shape != want.shape or got.dtype != want.dtype:
            return ReplayResult(folder, api, "mismatch", f"output {index}: {tuple(got.shape)} {got.dtype}, "
                                f"recorded {tuple(want.shape)} {want.dtype}")
        if torch.equal(got, want) or (want.is_floating_point() and torch.equal(got.isnan(), want.isnan())
                                      and torch.equal(got.nan_to_num(), want.nan_to_num())):
            continue
        bitwise = False
        atol, rtol = tolerance(want.dtype)
        if not torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True):
            err = (got.double() - want.double()).abs().nan_to_num().max().item()
            return ReplayResult(folder, api, "mismatch",
                                f"output {index}: max abs error {err:.3g} > atol {atol}, rtol {rtol}")
        worst = max(worst, (got.double() - want.double()).abs().nan_to_num().max().item())
    if bitwise:
        return ReplayResult(folder, api, "bitwise", "outputs identical")
    return ReplayResult(folder, api, "match", f"within tolerance (max abs error {worst:.3g})")
