"""FlashAttention forward (prefill): MATE's TileLang kernel vs torch SDPA on cuDNN, same run.

bf16, batch 8, 32 heads, seqlen 4096, head dims 64 / 128 / 256, causal and not (goal: >= 1.1x
cuDNN at d=128), plus a varlen batch of the same token count with mixed lengths (goal: within
~10% of the fixed-length TFLOP/s). FP8 e4m3 rows (goal: >= 1.5x our bf16) time the public call
(flash_attn_varlen_func with descales: the V transpose pre-pass plus the kernel), with the pre-pass
alone and, at d=128, the previous FP8 route (the split-KV decode kernel) beside them.
FLOPs: 4 * b * h * s * s * d (2 * ... * (d + dv) in general),
halved for causal; varlen counts the exact visible pairs. A correctness spot-check against
float32 math runs first.

The kernels are first built in parallel processes (compile times are reported; a warm
MATE_CACHE_DIR turns them into loads).

Usage: python benchmarks/bench_fmha_prefill.py [--out benchmarks/results] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mate import jit, platform
from mate.mha_interface import flash_attn_varlen_func
from mate.ops.fmha import decode_kernel, forward_kernel
from mate.ops.fmha.attention import FP8_V_TRANSPOSE
from mate.testing import bench

OP = "fmha.flash_attn_fwd"
BATCH, HEADS, SEQLEN = 8, 32, 4096
FP8 = "float8_e4m3fn"


def variant(head_dim: int, causal: bool, head_dim_v: int | None = None, dtype: str = "bfloat16",
            has_window: bool = False, has_softcap: bool = False) -> dict:
    return {"dtype": dtype, "head_dim": head_dim, "head_dim_v": head_dim_v or head_dim, "causal": causal,
            "has_window": has_window, "has_softcap": has_softcap}


def get_kernel(*args, **kwargs):
    target = platform.device_info("cuda").tilelang_target
    start = time.perf_counter()
    kernel = jit.get_kernel(OP, variant(*args, **kwargs), target, forward_kernel.build)
    return kernel, time.perf_counter() - start


def _compile_one(var: dict, target: dict) -> float:
    start = time.perf_counter()
    jit.get_kernel(OP, var, target, forward_kernel.build)
    return time.perf_counter() - start


def precompile(variants: list[dict]) -> dict[str, float]:
    """Build the variants in parallel processes into the disk cache (each compile is single-threaded);
    returns the seconds each took (a compile, or a load when the disk cache already had it)."""
    target = platform.device_info("cuda").tilelang_target
    jobs = max(1, min(len(variants), (os.cpu_count() or 2) - 1))
    seconds = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for var, sec in zip(variants, pool.map(_compile_one, variants, [target] * len(variants)), strict=True):
            print(f"compile {var}: {sec:.1f} s", flush=True)
            seconds[str(var)] = sec
    return seconds


def reference(q, k, v, cu_q, cu_k, scale, causal, window=(-1, -1), softcap=0.0):
    """float32 math, sequence by sequence (bottom-right aligned masks, GQA by repeat)."""
    outs, lses = [], []
    group = q.shape[1] // k.shape[1]
    for b in range(len(cu_q) - 1):
        qs = q[cu_q[b]:cu_q[b + 1]].float().transpose(0, 1)
        ks = k[cu_k[b]:cu_k[b + 1]].float().repeat_interleave(group, 1).transpose(0, 1)
        vs = v[cu_k[b]:cu_k[b + 1]].float().repeat_interleave(group, 1).transpose(0, 1)
        sq, sk = qs.shape[1], ks.shape[1]
        s = qs @ ks.transpose(1, 2) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(sq, device=q.device)[:, None] + sk - sq
        j = torch.arange(sk, device=q.device)[None, :]
        ok = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        if causal:
            ok &= j <= i
        if window[0] >= 0:
            ok &= j >= i - window[0]
        if window[1] >= 0:
            ok &= j <= i + window[1]
        s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append((torch.exp(s - lse[..., None]).nan_to_num(0.0) @ vs).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, 1)


CHECK_CASES = [(64, 64, False, {}), (128, 128, True, {}), (256, 256, False, {}),
               (128, 128, False, {"window": (64, 16)}), (128, 128, True, {"softcap": 20.0})]


def spot_check() -> list[dict]:
    """Varlen GQA case with seqlen_q != seqlen_k and a sequence whose early rows see no key."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    lens_q, lens_k = [1, 77, 300, 128, 513, 7], [5, 77, 200, 256, 513, 1]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    rows = []
    cases = CHECK_CASES
    for d, dv, causal, extra in cases:
        q = torch.randn(sum(lens_q), 8, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(sum(lens_k), 2, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(sum(lens_k), 2, dv, device="cuda", dtype=torch.bfloat16, generator=gen)
        out = torch.full((sum(lens_q), 8, dv), float("nan"), device="cuda", dtype=torch.bfloat16)
        lse = torch.full((8, sum(lens_q)), float("nan"), device="cuda")
        window, softcap = extra.get("window", (-1, -1)), extra.get("softcap", 0.0)
        kernel, _ = get_kernel(d, causal, dv, has_window="window" in extra, has_softcap="softcap" in extra)
        scale = d ** -0.5
        forward_kernel.launch(kernel, q, k, v, cu_q, cu_k, max(lens_q), out, lse, scale, window, softcap)
        want_out, want_lse = reference(q, k, v, cu_q.tolist(), cu_k.tolist(), scale, causal, window, softcap)
        finite = want_lse.isfinite()
        row = {"d": f"{d}x{dv}", "causal": causal, **extra,
               "max |out err|": (out.float() - want_out).abs().max().item(),
               "max |lse err|": (lse - want_lse)[finite].abs().max().item(),
               "-inf rows match": bool(torch.equal(lse.isneginf(), want_lse.isneginf()))}
        print("check", row, flush=True)
        rows.append(row)
    return rows


def timing_inputs(b, s, h, d, dv, copies=1):
    total = b * s
    sets = []
    for _ in range(copies):
        q = torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(total, h, dv, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(total, h, dv, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(h, total, device="cuda")
        sets.append((q, k, v, out, lse))
    return sets


def fp8_rows(b: int, s: int, h: int, d: int, bf16_rows: list[dict], compile_s: dict) -> list[dict]:
    """FP8 e4m3 at the bf16 shape: the public call (V transpose + kernel), the transpose alone and,
    at d=128, the previous FP8 route (decode kernel); ratios to our bf16 and cuDNN bf16 rows."""
    fp8 = torch.float8_e4m3fn
    copies = bench.copies_to_exceed_l2(b * s * h * 4 * d)
    sets = [tuple(torch.randn(b, s, h, d, device="cuda").to(fp8) for _ in range(3))
            + (torch.rand(b, h, device="cuda") + 0.5,) for _ in range(copies)]
    out = torch.empty(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    block_n = forward_kernel.default_config(d, d, dtype=FP8).block_n
    target = platform.device_info("cuda").tilelang_target
    transpose = jit.get_kernel(FP8_V_TRANSPOSE, {"head_dim_v": d, "block_n": block_n}, target,
                               forward_kernel.build_v_transpose)
    starts = torch.arange(b, dtype=torch.int32, device="cuda") * s
    counts = torch.full((b,), s, dtype=torch.int32, device="cuda")

    def transpose_fn(q, k, v, descale):
        forward_kernel.transpose_values(transpose, v.view(b * s, h, d), starts, counts, s, block_n,
                                        b * -(-s // block_n))

    transpose_ms = bench.time_ms_graph(transpose_fn, sets)  # graph replay: the pre-pass's device time alone
    rows = []
    for causal, bf16 in zip((False, True), bf16_rows, strict=True):
        def api(q, k, v, descale, causal=causal):
            flash_attn_varlen_func(q, k, v, causal=causal, q_descale=descale, k_descale=descale,
                                   v_descale=descale, out=out)

        ms = bench.time_ms(api, sets, iters=50)
        previous = float("nan")
        if d == 128:  # the decode kernel, as FP8 prefill ran before (a dense cache of s keys)
            lse = torch.empty(b, h, s, device="cuda")

            def decode_route(q, k, v, descale, causal=causal, lse=lse):
                decode_kernel.launch(q, k, v, None, counts, d ** -0.5, causal, out, lse, q_descale=descale,
                                     k_descale=descale, v_descale=descale)

            previous = bench.time_ms(decode_route, sets[:2], warmup=2, iters=10)
        flops = 4 * b * h * s * s * d / (2 if causal else 1)
        row = {"case": f"b{b} h{h} s{s} d{d} fp8", "causal": causal, "mate ms": ms, "mate TFLOP/s": flops / ms / 1e9,
               "cuDNN ms": bf16["cuDNN ms"], "cuDNN TFLOP/s": bf16["cuDNN TFLOP/s"],
               "speedup vs cuDNN": bf16["cuDNN ms"] / ms, "varlen / fixed TFLOP/s": float("nan"),
               "compile s": compile_s[str(variant(d, causal, dtype=FP8))], "fp8 / our bf16": bf16["mate ms"] / ms,
               "V transpose ms": transpose_ms, "previous FP8 route ms": previous}
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="d=128 only")
    args = parser.parse_args()
    print(f"{bench.gpu_name()}, torch {torch.__version__}", flush=True)
    dims = [128] if args.quick else [64, 128, 256]
    wanted = [variant(d, c, dv, has_window="window" in e, has_softcap="softcap" in e) for d, dv, c, e in CHECK_CASES]
    wanted += [variant(d, c, dtype=dtype) for dtype in ("bfloat16", FP8) for d in dims for c in (False, True)]
    compile_s = precompile([w for i, w in enumerate(wanted) if w not in wanted[:i]])
    checks = spot_check()
    bad = [c for c in checks if not (c["max |out err|"] < 5e-2 and c["max |lse err|"] < 1e-3 and c["-inf rows match"])]
    if bad:
        raise SystemExit(f"spot-check failed: {bad}")

    rows = []
    b, h, s = BATCH, HEADS, SEQLEN
    for d in dims:
        nbytes = 2 * b * s * h * (3 * d + d)
        copies = bench.copies_to_exceed_l2(nbytes)
        sets = timing_inputs(b, s, h, d, d, copies=copies)
        cu = torch.arange(b + 1, dtype=torch.int32, device="cuda") * s
        for causal in (False, True):
            kernel, _ = get_kernel(d, causal)
            def ours_fn(q, k, v, o, lse, kernel=kernel, cu=cu, d=d):
                forward_kernel.launch(kernel, q, k, v, cu, cu, s, o, lse, d ** -0.5)

            def sdpa(q, k, v, o, lse, d=d, causal=causal):
                return F.scaled_dot_product_attention(q.view(b, s, h, d).transpose(1, 2),
                                                      k.view(b, s, h, d).transpose(1, 2),
                                                      v.view(b, s, h, d).transpose(1, 2), is_causal=causal)

            ours = bench.time_ms(ours_fn, sets, iters=50)

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                peer = bench.time_ms(sdpa, sets, iters=50)
            flops = 4 * b * h * s * s * d / (2 if causal else 1)
            row = {"case": f"b{b} h{h} s{s} d{d}", "causal": causal, "mate ms": ours,
                   "mate TFLOP/s": flops / ours / 1e9, "cuDNN ms": peer, "cuDNN TFLOP/s": flops / peer / 1e9,
                   "speedup vs cuDNN": peer / ours,
                   "varlen / fixed TFLOP/s": float("nan"), "compile s": compile_s[str(variant(d, causal))]}
            print(row, flush=True)
            rows.append(row)
        del sets
        rows += fp8_rows(b, s, h, d, rows[-2:], compile_s)

    # Varlen: the d=128 token count split into mixed lengths (same kernel as fixed length).
    d = 128
    gen = torch.Generator().manual_seed(1)
    lens = []
    while sum(lens) < b * s:
        lens.append(min(int(torch.randint(512, 8192, (1,), generator=gen)), b * s - sum(lens)))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    sets = timing_inputs(b, s, h, d, d, copies=bench.copies_to_exceed_l2(2 * b * s * h * 4 * d))
    for causal in (False, True):
        kernel, _ = get_kernel(d, causal)
        def varlen_fn(q, k, v, o, lse, kernel=kernel):
            forward_kernel.launch(kernel, q, k, v, cu, cu, max(lens), o, lse, d ** -0.5)

        ms = bench.time_ms(varlen_fn, sets, iters=50)
        pairs = sum(n * (n + 1) / 2 if causal else n * n for n in lens)
        flops = 4 * h * pairs * d
        fixed = next(r for r in rows if r["case"].endswith(f"d{d}") and r["causal"] == causal)
        row = {"case": f"varlen {len(lens)} seqs ({min(lens)}..{max(lens)}) h{h} d{d}", "causal": causal,
               "mate ms": ms, "mate TFLOP/s": flops / ms / 1e9, "cuDNN ms": float("nan"),
               "cuDNN TFLOP/s": float("nan"), "speedup vs cuDNN": float("nan"), "compile s": float("nan"),
               "varlen / fixed TFLOP/s": flops / ms / 1e9 / fixed["mate TFLOP/s"]}
        print(row, flush=True)
        rows.append(row)

    worst = max(max(c["max |out err|"] for c in checks), 0.0)
    notes = (f"bf16, torch SDPA with the cuDNN backend timed in the same run; median of 50 runs after warm-up "
             f"and 0.5 s of back-to-back calls (each call in its own steady power state, bench.SETTLE_S), "
             f"inputs rotated over >2x L2. Spot-check vs float32 math: max |out err| {worst:.3g}. "
             f"FLOPs 4*b*h*s*s*d (causal halved; varlen counts visible pairs). fp8 rows: e4m3 q/k/v with "
             f"descales through flash_attn_varlen_func (V transpose pre-pass + kernel, bf16 out); their cuDNN "
             f"columns are the bf16 cuDNN times; 'previous FP8 route': the decode kernel FP8 prefill ran on "
             f"before (10 runs).")
    columns = ["case", "causal", "mate ms", "mate TFLOP/s", "cuDNN ms", "cuDNN TFLOP/s", "speedup vs cuDNN",
               "varlen / fixed TFLOP/s", "compile s", "fp8 / our bf16", "V transpose ms", "previous FP8 route ms"]
    for row in rows:
        for column in columns:
            row.setdefault(column, float("nan"))
    bench.write_results("fmha_prefill", rows, columns, notes, args.out)


if __name__ == "__main__":
    main()
