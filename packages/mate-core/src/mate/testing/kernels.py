"""CPU checks of kernel launchers: run a family's host code on a fake GPU with every compiled
kernel replaced by a recorder, then compare what the host passed with the TileLang signature.
This catches launcher/kernel mismatches (an argument added, a dtype changed, a view with the wrong
rank or stride) in CI, where no GPU runs the kernels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mate import jit, platform

FAKE_GPU = platform.DeviceInfo("cuda", "fake GPU", "sm_90a", 132, 232448)


@dataclass
class KernelCall:
    op: str
    variant: dict
    build: Any
    args: tuple = field(default_factory=tuple)


def record_kernel_calls(monkeypatch) -> list[KernelCall]:
    """Make every device look like an sm_90a GPU and every kernel a recorder; returns the calls."""
    calls: list[KernelCall] = []
    monkeypatch.setattr(platform, "device_info", lambda device=None: FAKE_GPU)
    monkeypatch.setattr(platform, "tilelang_version", lambda: "0.1.15")

    def get_kernel(op, variant, target, build):
        def kernel(*args):
            calls.append(KernelCall(op, dict(variant), build, args))
        return kernel

    monkeypatch.setattr(jit, "get_kernel", get_kernel)
    return calls


def assert_call_matches_signature(call: KernelCall) -> None:
    """The recorded arguments fit the prim_func `build(**variant)`: every tensor has its buffer's
    dtype, rank, static sizes and strides; a symbolic size means the same number wherever it
    appears, and stride expressions (products of sizes) evaluate to the tensor's strides; scalars
    have the parameter's kind (int or float)."""
    prim_func = call.build(**call.variant)
    assert len(call.args) == len(prim_func.params), (call.op, len(call.args), len(prim_func.params))
    bound: dict[str, int] = {}
    buffers = []
    for param, arg in zip(prim_func.params, call.args, strict=True):
        buffer = prim_func.buffer_map.get(param)
        if buffer is None:
            assert isinstance(arg, float if "float" in param.dtype else int), (call.op, param, arg)
            continue
        assert isinstance(arg, torch.Tensor), (call.op, param, type(arg))
        assert str(arg.dtype).removeprefix("torch.") == buffer.dtype, (call.op, param, arg.dtype, buffer.dtype)
        assert arg.dim() == len(buffer.shape), (call.op, param, tuple(arg.shape), buffer.shape)
        for dim, size in zip(buffer.shape, arg.shape, strict=True):
            if hasattr(dim, "value"):
                assert dim.value == size, (call.op, param, buffer.shape, tuple(arg.shape))
            else:
                assert bound.setdefault(dim.name, size) == size, (call.op, param, dim.name, bound[dim.name], size)
        buffers.append((param, buffer, arg))
    # Strides once every size is known (a stride may be a symbolic stride of its own).
    for param, buffer, arg in buffers:
        for declared, stride, size in zip(buffer.strides, arg.stride(), arg.shape, strict=True):
            if size > 1:  # a stride of a size-1 dimension is never used
                assert _value(declared, bound, stride) == stride, (call.op, param, buffer.strides, arg.stride())


def _value(expr, bound: dict[str, int], actual: int) -> int:
    """An integer stride expression (constants, variables, + and *) under the bound variables; an
    unbound variable binds to the actual stride."""
    kind = type(expr).__name__
    if hasattr(expr, "value"):
        return int(expr.value)
    if kind == "Var":
        return bound.setdefault(expr.name, actual)
    a, b = _value(expr.a, bound, actual), _value(expr.b, bound, actual)
    return {"Mul": a * b, "Add": a + b, "Sub": a - b}[kind]
