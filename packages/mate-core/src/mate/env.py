"""The one table of MATE_* environment variables.

Every variable MATE reads is declared here with its type, default and meaning; code reads
them only through :func:`get`, which validates the value at first use and names the
variable, the value it got and what it accepts when the value is bad.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class MateEnvError(ValueError):
    """A MATE_* environment variable holds a value MATE does not accept."""


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected one of 0, 1, true, false, yes, no, on, off")


def _parse_loglevel(raw: str) -> int:
    try:
        level = int(raw)
    except ValueError:
        raise ValueError("expected an integer level: 0, 1, 3, 5 or 10") from None
    if level not in (0, 1, 3, 5, 10):
        raise ValueError("expected an integer level: 0, 1, 3, 5 or 10")
    return level


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _parse_path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("expected a non-empty path")
    return Path(raw).expanduser()


def _parse_logdest(raw: str) -> str:
    if not raw.strip():
        raise ValueError("expected stdout, stderr or a file path")
    return raw.strip()


@dataclass(frozen=True)
class Var:
    name: str
    parse: Callable[[str], Any]
    default: str
    meaning: str


VARIABLES: tuple[Var, ...] = (
    Var("MATE_BACKEND", _parse_choice("auto", "tilelang", "reference"), "auto",
        "Backend for every op: auto (TileLang kernels on a GPU, reference on CPU), "
        "tilelang, or reference (PyTorch reference path)."),
    Var("MATE_ALLOW_REFERENCE_FALLBACK", _parse_bool, "0",
        "On a GPU, run the reference (with one warning) for variants no kernel supports "
        "instead of raising UnsupportedError."),
    Var("MATE_JIT", _parse_bool, "1",
        "Compile missing kernel variants on first use; 0 refuses and names the `mate aot` "
        "command that builds them."),
    Var("MATE_CACHE_DIR", _parse_path, "~/.cache/mate",
        "Disk cache of compiled kernels (TileLang's kernel cache lives in <dir>/tilelang)."),
    Var("MATE_LOGLEVEL", _parse_loglevel, "0",
        "API logging: 0 off, 1 function names, 3 + argument metadata, 5 + tensor "
        "statistics, 10 + a dump of every call's inputs and outputs."),
    Var("MATE_LOGDEST", _parse_logdest, "stderr", "Where API logs go: stdout, stderr or a file path."),
    Var("MATE_DUMP_DIR", _parse_path, "./mate_dumps", "Directory of level-10 call dumps (one folder per call)."),
)

_BY_NAME = {var.name: var for var in VARIABLES}
_parsed: dict[str, tuple[str | None, Any]] = {}


def get(name: str) -> Any:
    """The parsed value of a MATE_* variable (its default when unset)."""
    var = _BY_NAME[name]
    raw = os.environ.get(name)
    cached = _parsed.get(name)
    if cached is not None and cached[0] == raw:
        return cached[1]
    text = var.default if raw is None else raw
    try:
        value = var.parse(text)
    except ValueError as err:
        raise MateEnvError(f"{name}={text!r} is not accepted: {err} ({var.meaning})") from None
    _parsed[name] = (raw, value)
    return value


def table() -> list[dict[str, str]]:
    """Rows for `mate env` and the README: name, default, current raw value, meaning."""
    return [
        {"name": v.name, "default": v.default, "current": os.environ.get(v.name, ""), "meaning": v.meaning}
        for v in VARIABLES
    ]
