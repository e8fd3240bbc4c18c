"""KV-cache append with rotary (flash_attn_with_kvcache with k/v new tokens): the cost of the
append kernel on top of the attention over the updated cache, CUDA-graph timed.

For each shape: a decode step with new keys (append + rotary, then attention) vs the same
attention over an already-filled cache (no append); the difference is the append's cost.

Usage: python benchmarks/bench_fmha_append.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mate.mha_interface import flash_attn_with_kvcache
from mate.testing import bench

# (batch, heads_q, heads_k, head_dim, cached tokens, page_size or None for dense, new tokens = seqlen_q)
SHAPES = [
    (128, 32, 8, 128, 8192, 64, 1),
    (128, 32, 8, 128, 8192, None, 1),
    (8, 32, 8, 128, 8192, 64, 128),
]


def _inputs(batch, heads_q, heads_k, d, seqlen, page_size, seqlen_q, dtype=torch.bfloat16):
    if page_size is None:
        k_cache = torch.randn(batch, seqlen, heads_k, d, device="cuda", dtype=dtype)
        page_table = None
    else:
        pages = seqlen // page_size
        k_cache = torch.randn(batch * pages, page_size, heads_k, d, device="cuda", dtype=dtype)
        page_table = torch.randperm(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
    angles = torch.rand(seqlen, d // 2, device="cuda") * 6.283
    return {"q": torch.randn(batch, seqlen_q, heads_q, d, device="cuda", dtype=dtype), "k_cache": k_cache,
            "v_cache": torch.randn_like(k_cache), "page_table": page_table,
            "k": torch.randn(batch, seqlen_q, heads_k, d, device="cuda", dtype=dtype),
            "v": torch.randn(batch, seqlen_q, heads_k, d, device="cuda", dtype=dtype),
            "rotary_cos": angles.cos().to(dtype), "rotary_sin": angles.sin().to(dtype)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = []
    for batch, heads_q, heads_k, d, seqlen, page_size, seqlen_q in SHAPES:
        inputs = _inputs(batch, heads_q, heads_k, d, seqlen, page_size, seqlen_q)
        before = torch.full((batch,), seqlen - seqlen_q, dtype=torch.int32, device="cuda")
        full = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
        plain = {key: value for key, value in inputs.items() if key not in ("k", "v", "rotary_cos", "rotary_sin")}

        def with_append(inputs=inputs, before=before):
            return flash_attn_with_kvcache(**inputs, cache_seqlens=before, causal=True)

        def attention_only(plain=plain, full=full):
            return flash_attn_with_kvcache(**plain, cache_seqlens=full, causal=True)

        append_ms = bench.time_ms_graph(with_append, [()])
        attend_ms = bench.time_ms_graph(attention_only, [()])
        row = {"batch": batch, "heads": f"{heads_q}/{heads_k}", "d": d, "cached": seqlen,
               "page": page_size or "dense", "new": seqlen_q, "append+attend_us": round(append_ms * 1e3, 1),
               "attend_us": round(attend_ms * 1e3, 1), "append_us": round((append_ms - attend_ms) * 1e3, 1)}
        rows.append(row)
        print(row, flush=True)
    bench.write_results("fmha_append", rows, list(rows[0]),
                        "flash_attn_with_kvcache with new keys + rotary vs attention alone (CUDA-graph timed).",
                        args.out)


if __name__ == "__main__":
    main()
