"""Input validation shared by every family.

Errors name the argument, what it got and what is accepted. They derive from RuntimeError as
well, because the upstream libraries raise RuntimeError (TORCH_CHECK) for the same inputs and
callers may catch that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class ArgumentError(ValueError, RuntimeError):
    """An argument has the wrong shape, device, layout or value."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument has the wrong type or dtype."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(name: str, value, *, dtypes: Iterable[torch.dtype] | None = None, ndim: int | Sequence[int] | None = None,
           device: torch.device | None = None, last_dim_contiguous: bool = False) -> torch.Tensor:
    """Check that `value` is a tensor with the given properties; return it."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            accepted = " or ".join(map(_dtype_name, dtypes))
            raise ArgumentTypeError(f"{name}: dtype {_dtype_name(value.dtype)} is not accepted; expected {accepted}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            raise ArgumentError(f"{name}: expected a {' or '.join(map(str, allowed))}-D tensor, "
                                f"got shape {tuple(value.shape)} ({value.dim()}-D)")
    if device is not None and value.device != device:
        raise ArgumentError(f"{name}: on {value.device}, but the other inputs are on {device}")
    if last_dim_contiguous and value.dim() and value.stride(-1) != 1 and value.shape[-1] > 1:
        raise ArgumentError(f"{name}: the last dimension must be contiguous (stride 1), got strides {value.stride()}")
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    """Check `value.shape == expected`; `meaning` spells the expected shape in words."""
    if tuple(value.shape) != tuple(expected):
        raise ArgumentError(f"{name}: expected shape {tuple(expected)} ({meaning}), got {tuple(value.shape)}")


def dtype_choice(name: str, value, accepted: Iterable[torch.dtype]) -> torch.dtype:
    accepted = tuple(accepted)
    if value not in accepted:
        shown = _dtype_name(value) if isinstance(value, torch.dtype) else repr(value)
        raise ArgumentTypeError(f"{name}: {shown} is not accepted; expected {' or '.join(map(_dtype_name, accepted))}")
    return value


def at_most(name: str, value: int, limit: int, what: str) -> None:
    if value > limit:
        raise ArgumentError(f"{name}: {what} is {value}; at most {limit} is supported")
