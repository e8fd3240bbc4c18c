"""Split-KV decode (flash_attn_with_kvcache, no append): achieved KV-read bandwidth vs the
measured copy bandwidth (goal >= 85%) for batch 128, 32 q heads / 8 kv heads, d 128, 8192 cached
tokens, paged KV with page size 64 and 1, plus a dense cache, a small-batch (split) shape, an FP8
(e4m3) cache, whose bytes are half, and qv (SGLang's FA3 backend for DeepSeek's MLA: 16 query heads,
one kv head of d 64 (rope keys) with dv 512 (the latent cache), qv the absorbed query).

Second table: prefill-size queries on a paged cache (vLLM's prefill with a block table): TFLOP/s
of this kernel on a page-64 cache, of flash_attn_with_kvcache on it (which routes such
prefill-dominated calls to the prefill kernel over a gathered copy of the pages), of
flash_attn_varlen_func on the same tokens stored contiguously (the prefill kernel), and of cuDNN
SDPA, all in the same run (eager: millisecond kernels hide the host time).

Usage: python benchmarks/bench_fmha_decode.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mate import mha_interface
from mate.ops.fmha import decode_kernel
from mate.testing import bench

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
# (batch, heads_q, heads_k, head_dim, cached tokens, page_size or None for dense, seqlen_q, dtype[, head_dim_v
# with qv])
SHAPES = [
    (128, 32, 8, 128, 8192, 64, 1, BF16),
    (128, 32, 8, 128, 8192, 1, 1, BF16),
    (128, 32, 8, 128, 8192, None, 1, BF16),
    (128, 32, 8, 128, 8192, 64, 4, BF16),
    (4, 32, 8, 128, 32768, 64, 1, BF16),
    (128, 32, 8, 128, 8192, 64, 1, FP8),
    (128, 32, 8, 256, 8192, 64, 1, FP8),
    (128, 16, 1, 64, 8192, 64, 1, BF16, 512),
    (128, 16, 1, 64, 8192, 1, 1, BF16, 512),
]


def _randn(*shape, dtype):
    return torch.randn(*shape, device="cuda").to(dtype)


def _inputs(batch, heads_q, heads_k, d, seqlen, page_size, seqlen_q, dtype, dv=None):
    q = _randn(batch, seqlen_q, heads_q, d, dtype=dtype)
    qv = None if dv is None else _randn(batch, seqlen_q, heads_q, dv, dtype=dtype)
    dv = dv or d
    rows = (batch, seqlen) if page_size is None else (batch * seqlen // page_size, page_size)
    k = _randn(*rows, heads_k, d, dtype=dtype)
    v = _randn(*rows, heads_k, dv, dtype=dtype)
    page_table = None if page_size is None else torch.randperm(rows[0], device="cuda", dtype=torch.int32).view(
        batch, -1)
    cache_seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
    out = torch.empty(batch, seqlen_q, heads_q, dv, dtype=BF16 if dtype == FP8 else dtype, device="cuda")
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device="cuda")
    return q, k, v, page_table, cache_seqlens, out, lse, qv


# (batch, heads_q, heads_k, head_dim, seqlen (queries = cached keys), page_size, causal)
PAGED_PREFILL_SHAPES = [(8, 32, 8, 128, 4096, 64, False), (8, 32, 8, 128, 4096, 64, True)]


def paged_prefill_row(batch, heads_q, heads_k, d, seqlen, page_size, causal) -> dict:
    flops = 4 * batch * heads_q * seqlen * seqlen * d / (2 if causal else 1)
    q = _randn(batch, seqlen, heads_q, d, dtype=BF16)
    k = _randn(batch, seqlen, heads_k, d, dtype=BF16)
    v = _randn(batch, seqlen, heads_k, d, dtype=BF16)
    pages = seqlen // page_size
    page_table = torch.randperm(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
    k_cache = torch.empty(batch * pages, page_size, heads_k, d, dtype=BF16, device="cuda")
    v_cache = torch.empty_like(k_cache)
    k_cache[page_table.flatten().long()] = k.view(batch * pages, page_size, heads_k, d)
    v_cache[page_table.flatten().long()] = v.view(batch * pages, page_size, heads_k, d)
    cache_seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device="cuda")
    flat = [t.view(batch * seqlen, *t.shape[2:]) for t in (q, k, v)]
    group = heads_q // heads_k
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2), \
        v.repeat_interleave(group, 2).transpose(1, 2)

    out = torch.empty_like(q)
    lse = torch.empty(batch, heads_q, seqlen, dtype=torch.float32, device="cuda")

    def decode_kernel_paged():
        decode_kernel.launch(q, k_cache, v_cache, page_table, cache_seqlens, d ** -0.5, causal, out, lse)
        return out

    def paged():
        return mha_interface.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                                     page_table=page_table, causal=causal)

    def contiguous():
        return mha_interface.flash_attn_varlen_func(*flat, cu, cu, seqlen, seqlen, causal=causal)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    want = contiguous().view(q.shape).float()
    err = max((fn().float() - want).abs().max().item() for fn in (paged, decode_kernel_paged))
    times = {name: bench.time_ms(fn, [()], warmup=3, iters=20) for name, fn in
             (("decode kernel, paged", decode_kernel_paged), ("API, paged", paged), ("contiguous", contiguous),
              ("cudnn", cudnn))}
    row = {"shape (b,hq,hk,d,seqlen,page)": str((batch, heads_q, heads_k, d, seqlen, page_size)),
           "causal": causal, **{f"{name} TFLOP/s": flops / (ms * 1e-3) / 1e12 for name, ms in times.items()},
           "API paged / contiguous": times["contiguous"] / times["API, paged"],
           "API paged / cuDNN": times["cudnn"] / times["API, paged"], "max |paged - contiguous|": err}
    print(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    copy_gbs = bench.copy_bandwidth_gbs()
    print(f"{bench.gpu_name()}: measured copy bandwidth {copy_gbs:.0f} GB/s")
    rows = []
    for shape in SHAPES:
        batch, heads_q, heads_k, d, seqlen, page_size, seqlen_q, dtype, *dv = shape
        kv_bytes = batch * seqlen * heads_k * (d + (dv[0] if dv else d)) * dtype.itemsize
        copies = bench.copies_to_exceed_l2(kv_bytes)
        arg_sets = [_inputs(*shape) for _ in range(copies)]
        scale = d ** -0.5

        def call(q, k, v, page_table, cache_seqlens, out, lse, qv, scale=scale):
            decode_kernel.launch(q, k, v, page_table, cache_seqlens, scale, True, out, lse, qv=qv)

        ms = bench.time_ms_graph(call, arg_sets)
        gbs = kv_bytes / (ms * 1e-3) / 1e9
        rows.append({"shape (b,hq,hk,d,seqlen,page,sq)": str(shape[:7]),
                     "dtype": str(dtype)[6:] + (f", qv dv {dv[0]}" if dv else ""),
                     "KV MB": kv_bytes / 1e6,
                     "us (graph)": ms * 1e3, "GB/s": gbs, "% of copy BW": 100 * gbs / copy_gbs})
        print(rows[-1])
        del arg_sets
        torch.cuda.empty_cache()
    bench.write_results("fmha_decode", rows, list(rows[0]), f"KV bytes read / time; copy bandwidth "
                        f"{copy_gbs:.0f} GB/s (read + write).", args.out)
    rows = [paged_prefill_row(*shape) for shape in PAGED_PREFILL_SHAPES]
    bench.write_results("fmha_paged_prefill", rows, list(rows[0]), "Prefill-size queries on a paged KV cache "
                        "(the decode kernel; the API's route) vs the same tokens contiguous (prefill kernel) and "
                        "cuDNN SDPA; eager medians; FLOPs 4*b*hq*s*s*d, halved for causal.", args.out)


if __name__ == "__main__":
    main()
