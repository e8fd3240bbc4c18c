"""Honest GPU timing for benchmarks: device events, warm-up, a settled power state, median of
many runs, inputs rotated so that the working set exceeds L2, and the measured copy bandwidth as
the memory roofline."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# Seconds of back-to-back calls before timing. The H100 (700 W limit) lowers its clocks within ~0.25 s of
# sustained FP8 GEMM load (1980 -> 1365-1620 MHz, throttle reason: power cap), and kernels that draw more
# power lose more (our FP8 GEMM at 7168 x 16384: -15%, torch._scaled_mm: -7%). Timed without settling, a
# call measured first runs on the clocks of an idle GPU and the next one on those its predecessor left.
SETTLE_S = 0.5


def time_ms(fn: Callable[..., object], arg_sets: Sequence[tuple], warmup: int = 10, iters: int = 100,
            settle_s: float = SETTLE_S) -> float:
    """Median milliseconds of fn(*args), cycling through `arg_sets` (use several sets whose
    total size exceeds L2 so each run reads from DRAM), in fn's own steady state: after `warmup`
    calls, `settle_s` seconds of calls (see SETTLE_S)."""
    for i in range(warmup):
        fn(*arg_sets[i % len(arg_sets)])
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < settle_s:
        for i in range(max(len(arg_sets), 20)):  # queued back to back, then a sync to read the clock
            fn(*arg_sets[i % len(arg_sets)])
        torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        args = arg_sets[i % len(arg_sets)]
        starts[i].record()
        fn(*args)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def time_ms_graph(fn: Callable[..., object], arg_sets: Sequence[tuple], iters: int = 50) -> float:
    """Median milliseconds per fn(*args) with the host out of the way: one CUDA graph holds a
    call for each arg set (rotating past L2), replayed `iters` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in arg_sets:  # warm-up (and JIT) outside the capture
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in arg_sets:
            fn(*args)
    per_replay = time_ms(graph.replay, [()], warmup=3, iters=iters)
    return per_replay / len(arg_sets)


def copies_to_exceed_l2(nbytes: int, device: torch.device | None = None) -> int:
    """How many copies of an input of `nbytes` rotate through more than twice the L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, -(-2 * l2 // max(nbytes, 1)))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [()], warmup=5, iters=50)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gpu_name() -> str:
    return torch.cuda.get_device_name()


def write_results(name: str, rows: list[dict], columns: list[str], notes: str, folder: Path) -> None:
    """Save rows as JSON and as a markdown table under folder/<gpu>/."""
    gpu = gpu_name()
    target = folder / gpu.replace(" ", "_")
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{name}.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "notes": notes,
                                                     "rows": rows}, indent=2))
    lines = [f"# {name} on {gpu}", "", notes, "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    (target / f"{name}.md").write_text("\n".join(lines) + "\n")


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
