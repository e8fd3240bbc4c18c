"""Cached read-only device tensors (index vectors, placeholders), so that eager calls launch no
kernel to make them: each small torch op costs a serving stack ~5 us of host time per layer."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from mate import platform

_cache: dict[tuple, torch.Tensor] = {}
# The rows handed out, by (kind, length, device): slicing is a torch op of its own. They keep the
# tensor they view alive when it grows, so a graph that captured them still reads valid memory.
_rows: dict[tuple, torch.Tensor] = {}


def _cached(kind: Hashable, length: int, device: torch.device,
            make: Callable[[int, torch.device], torch.Tensor]) -> torch.Tensor:
    """The first `length` rows of a cached tensor (grown by doubling). Inside a graph capture a
    missing one is made for the call and not kept: the capture's memory pool owns it, and it
    holds data only once the graph replays."""
    key = (kind, length, device)
    rows = _rows.get(key)
    if rows is None:
        grown = _cache.get((kind, device))
        if grown is None or grown.shape[0] < length:
            grown = make(max(length, 2 * (0 if grown is None else grown.shape[0]), 256), device)
            if platform.is_capturing(device):
                return grown[:length]
            _cache[(kind, device)] = grown
        rows = _rows[key] = grown[:length]
    return rows


def iota(length: int, device: torch.device) -> torch.Tensor:
    """int32 0, 1, ..., length - 1."""
    return _cached("iota", length, device, lambda n, dev: torch.arange(n, dtype=torch.int32, device=dev))


def zeros(length: int, device: torch.device) -> torch.Tensor:
    """int32 zeros."""
    return _cached("zeros", length, device, lambda n, dev: torch.zeros(n, dtype=torch.int32, device=dev))


def unread(dtype: torch.dtype, dims: int, device: torch.device) -> torch.Tensor:
    """A `dims`-D tensor of one `dtype` zero, to pass where a kernel variant reads nothing."""
    return _cached(("unread", dtype, dims), 1, device,
                   lambda n, dev: torch.zeros((n,) + (1,) * (dims - 1), dtype=dtype, device=dev))
