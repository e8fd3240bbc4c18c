"""Backend selection from declared support matrices.

Each op declares, as data, which static variants its TileLang kernel accepts (feature name
-> allowed values). The same data drives dispatch, the tests' parametrization,
`mate show-config` and the README's support tables.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mate import env, platform


class UnsupportedError(NotImplementedError):
    """No kernel supports this variant on this device (and the reference fallback is off)."""


@dataclass(frozen=True)
class Support:
    """What a kernel accepts: each feature of a variant key and its allowed values."""

    features: Mapping[str, tuple]
    # Features supported only in certain combinations, e.g.
    # {("head_dim", "head_dim_v"): ((128, 128), (192, 128))}.
    combinations: Mapping[tuple[str, ...], tuple] = field(default_factory=dict)
    # Answers by variant: a call asks several times, and the same few variants recur call after call.
    _answers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def violations(self, variant: Mapping[str, Any]) -> list[str]:
        key = (tuple(variant), tuple(variant.values()))  # hashed faster than tuple(variant.items())
        answer = self._answers.get(key)
        if answer is None:
            answer = self._answers[key] = tuple(self._violations(variant))
        return list(answer)

    def _violations(self, variant: Mapping[str, Any]) -> list[str]:
        problems = [
            f"{name}={_show(variant[name])} (supported: {show_values(allowed)})"
            for name, allowed in self.features.items()
            if variant[name] not in allowed
        ]
        for names, allowed in self.combinations.items():
            values = tuple(variant[name] for name in names)
            if values not in allowed:
                problems.append(f"({', '.join(names)})={values} (supported: {show_values(allowed)})")
        return problems

    def variants(self) -> list[dict[str, Any]]:
        """Every supported variant."""
        names = list(self.features)
        every = (dict(zip(names, values, strict=True)) for values in itertools.product(*self.features.values()))
        return [variant for variant in every if not self.violations(variant)]

    def rows(self) -> list[tuple[str, str]]:
        """(feature, supported values) for tables: single features, then combinations."""
        return [(name, show_values(values)) for name, values in self.features.items()] + [
            (f"({', '.join(names)})", show_values(values)) for names, values in self.combinations.items()]


def _show(value: Any) -> str:
    return str(value).replace("torch.", "")


def show_values(allowed) -> str:
    """Allowed values as text (a range as first..last step k)."""
    if isinstance(allowed, range):
        return f"{allowed.start}..{allowed[-1]} step {allowed.step}"
    return ", ".join(map(_show, allowed))


@dataclass
class Op:
    """A public operator as dispatch, `mate check`, `mate aot` and `mate replay` see it."""

    name: str  # e.g. "fmha.flash_attn_combine"
    family: str
    support: Support
    # The TileLang kernel of a variant: build(**variant) -> PrimFunc (imports TileLang lazily).
    build: Callable[..., Any]
    # A small case for `mate check`: device -> (run, expected); both return the outputs,
    # `expected` from the reference in float64 on the CPU.
    check_case: Callable[[torch.device], tuple[Callable[[], Any], Callable[[], Any]]]
    # The variants `mate aot` prebuilds.
    aot_variants: Callable[[], list[dict[str, Any]]] = list
    # (atol, rtol) by output dtype, for `mate check` and `mate replay`.
    tolerance: Callable[[torch.dtype], tuple[float, float]] = lambda dtype: (1e-5, 1e-5)


_OPS: dict[str, Op] = {}
_warned: set[tuple[str, tuple]] = set()


def register(op: Op) -> Op:
    _OPS[op.name] = op
    return op


def ops() -> list[Op]:
    """Every registered op (importing the families registers them)."""
    from mate import ops as _families  # noqa: F401  (registration happens on import)

    return list(_OPS.values())


def select(op: Op, variant: Mapping[str, Any], device: torch.device, backend: str = "auto") -> str:
    """"tilelang" or "reference" for this call; raises UnsupportedError when neither may run.

    `backend` is a per-call choice ("auto", "tilelang", "reference"); "auto" follows MATE_BACKEND.
    """
    choice = env.get("MATE_BACKEND") if backend == "auto" else backend
    if choice == "reference":
        return "reference"
    info = platform.device_info(device)
    if not info.is_gpu:
        if choice == "tilelang":
            raise UnsupportedError(f"{op.name}: the tilelang backend needs a GPU, but the inputs are on {device}")
        return "reference"
    problems = op.support.violations(variant)
    if platform.tilelang_version() is None:
        problems.append("TileLang is not installed (pip install tilelang==0.1.15)")
    if not problems:
        return "tilelang"
    if choice == "auto" and env.get("MATE_ALLOW_REFERENCE_FALLBACK"):
        key = (op.name, tuple(sorted(variant.items())))
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{op.name}: running the PyTorch reference because the kernel does not support "
                          f"{'; '.join(problems)}", stacklevel=3)
        return "reference"
    raise UnsupportedError(
        f"{op.name} on {info.name}: the TileLang kernel does not support {'; '.join(problems)}. "
        "Set MATE_ALLOW_REFERENCE_FALLBACK=1 to run the PyTorch reference instead."
    )
