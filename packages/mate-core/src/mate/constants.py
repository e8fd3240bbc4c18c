"""Cached read-only device tensors (index vectors, placeholders), so that eager calls launch no
kernel to make them: each small torch op costs a serving stack ~5 us of host time per layer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mate import platform

_cache: dict[tuple, torch.Tensor] = {}


def _cached(kind: str, length: int, device: torch.device,
            make: Callable[[int, torch.device], torch.Tensor]) -> torch.Tensor:
    """The first `length` rows of a cached tensor (grown by doubling). Inside a graph capture a
    missing one is made for the call and not kept: the capture's memory pool owns it, and it
    holds data only once the graph replays."""
    key = (kind, device)
    cached = _cache.get(key)
    if cached is not None and cached.shape[0] >= length:
        return cached[:length]
    made = make(max(length, 2 * (0 if cached is None else cached.shape[0]), 256), device)
    if not platform.is_capturing(device):
        _cache[key] = made
    return made[:length]


def iota(length: int, device: torch.device) -> torch.Tensor:
    """int32 0, 1, ..., length - 1."""
    return _cached("iota", length, device, lambda n, dev: torch.arange(n, dtype=torch.int32, device=dev))


def zeros(length: int, device: torch.device) -> torch.Tensor:
    """int32 zeros."""
    return _cached("zeros", length, device, lambda n, dev: torch.zeros(n, dtype=torch.int32, device=dev))


def unread_float(device: torch.device) -> torch.Tensor:
    """A float32 (1, 1) tensor to pass where a kernel variant reads nothing."""
    return _cached("unread_float", 1, device, lambda n, dev: torch.zeros(n, 1, dtype=torch.float32, device=dev))
