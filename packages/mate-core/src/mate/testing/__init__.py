"""Helpers shared by every family's tests and benchmarks: seeds, poisoning, tolerances."""

from __future__ import annotations

import hashlib
import shutil

import torch


def seed_for(name: str) -> int:
    """A fresh, reproducible seed per test case (derived from its name)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def generator(name: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed_for(name))


def poison(tensor: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (floats) or -1 (integers) so unwritten elements show."""
    return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


def gpu_available() -> bool:
    return torch.cuda.is_available()


def nvcc_available() -> bool:
    return shutil.which("nvcc") is not None


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected|, treating equal infinities as exact and NaN as infinite error."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    same = actual == expected  # covers matching infinities
    return (actual - expected).abs().masked_fill(same, 0.0).nan_to_num(nan=float("inf")).max().item() \
        if actual.numel() else 0.0


def assert_within_low_precision_error(actual: torch.Tensor, exact: torch.Tensor, low_precision: torch.Tensor,
                                      multiple: float = 2.0, atol: float = 1e-5, what: str = "output") -> None:
    """Upstream FlashAttention's rule: the kernel's error against the exact result is at most
    `multiple` times the error of the same result rounded through the low-precision path,
    plus a small absolute slack."""
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    error = max_abs_error(actual, exact)
    allowed = multiple * max_abs_error(low_precision, exact) + atol
    assert error <= allowed, f"{what}: max abs error {error:.3e} > allowed {allowed:.3e}"


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Wrap owner.name so that each call (which still runs) appends 1 to the returned list: tests
    that a public call took a given kernel's launcher."""
    calls: list[int] = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls
