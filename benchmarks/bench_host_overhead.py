"""Host time of eager calls (what a serving stack pays per layer when attention runs outside
a CUDA graph, as in vLLM's piecewise graphs): wall-clock microseconds per call for small
problems whose kernels take a few microseconds, so the host side is what is measured.

Each case: `calls` back-to-back eager calls, then one synchronize; µs per call is the median
(and the fastest) of 15 such rounds. The GPU time of the same call replayed from a CUDA graph is reported
beside it, and PyTorch's SDPA (eager, same shapes) is the peer.

Usage: python benchmarks/bench_host_overhead.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mate.mha_interface import flash_attn_varlen_func, flash_attn_with_kvcache
from mate.testing import bench


def _host_us(fn, calls: int = 100, rounds: int = 15) -> tuple[float, float]:
    """(median, min) µs per call over the rounds: the GPU machine's host CPU is shared, so the
    fastest round shows the code's own cost and the median what a busy host gives."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per_call), min(per_call)


def _cases():
    dev, dt = "cuda", torch.bfloat16
    batch, hq, hk, d, cached, page = 4, 32, 8, 128, 512, 64
    q1 = torch.randn(batch, 1, hq, d, device=dev, dtype=dt)
    k_cache = torch.randn(batch * cached // page, page, hk, d, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    table = torch.arange(batch * cached // page, device=dev, dtype=torch.int32).view(batch, -1)
    seqlens = torch.full((batch,), cached, device=dev, dtype=torch.int32)
    k_new = torch.randn(batch, 1, hk, d, device=dev, dtype=dt)
    v_new = torch.randn_like(k_new)
    before = seqlens - 1
    cu_decode = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    tokens = 256
    qv = torch.randn(tokens, hq, d, device=dev, dtype=dt)
    kv = torch.randn(tokens, hk, d, device=dev, dtype=dt)
    cu = torch.tensor([0, 128, 256], device=dev, dtype=torch.int32)
    sd_q = torch.randn(batch, hq, 1, d, device=dev, dtype=dt)
    sd_k = torch.randn(batch, hq, cached, d, device=dev, dtype=dt)
    yield ("decode: flash_attn_with_kvcache, paged", lambda: flash_attn_with_kvcache(
        q1, k_cache, v_cache, cache_seqlens=seqlens, page_table=table, causal=True),
        lambda: F.scaled_dot_product_attention(sd_q, sd_k, sd_k))
    yield ("decode + append: flash_attn_with_kvcache, paged, new k/v", lambda: flash_attn_with_kvcache(
        q1, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=before, page_table=table, causal=True), None)
    yield ("vLLM decode: flash_attn_varlen_func, block table", lambda: flash_attn_varlen_func(
        q1.view(batch, hq, d), k_cache, v_cache, cu_seqlens_q=cu_decode,
        max_seqlen_q=1, seqused_k=seqlens, max_seqlen_k=cached, causal=True, page_table=table), None)
    yield ("prefill: flash_attn_varlen_func, 2 x 128 tokens", lambda: flash_attn_varlen_func(
        qv, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=128, max_seqlen_k=128, causal=True), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = []
    for name, fn, peer in _cases():
        median, fastest = _host_us(fn)
        row = {"call": name, "host_us": median, "host_us_min": fastest, "gpu_us": bench.time_ms_graph(fn, [()]) * 1e3,
               "sdpa_host_us": _host_us(peer)[0] if peer else None}
        rows.append(row)
        print(row, flush=True)
    notes = ("Eager calls, µs per call: median and fastest of 15 rounds of 100 calls (one synchronize a round); "
             "gpu_us: the same call replayed from a CUDA graph. Peer: torch SDPA eager (median) on the decode shape "
             "(4 x 32 heads, 512 keys).")
    bench.write_results("host_overhead", rows, ["call", "host_us", "host_us_min", "gpu_us", "sdpa_host_us"], notes,
                        args.out)


if __name__ == "__main__":
    main()
