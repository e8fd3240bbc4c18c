"""BF16 GEMM (DeepGEMM's bf16_gemm_nt / nn, mate.gemm.bmm_fp16): MATE's TileLang kernel vs torch
in the same run.

* dense, M = 4096 on DeepSeek-V3's projection shapes: bf16_gemm_nt (B K-major) and bf16_gemm_nn
  (B N-major) vs torch.mm(a, b.t()) / torch.mm(a, b) — goal >= 0.95x;
* bmm_fp16 (bf16 and fp16) vs torch.bmm at attention-like and square batched shapes — goal >= 0.95x;
* grouped (`--cases grouped`): m_grouped_bf16_gemm_nt_contiguous vs a loop of torch.mm over the
  groups' rows, m_grouped_bf16_gemm_nt_masked (every group full) vs torch.bmm, and
  k_grouped_bf16_gemm_tn_contiguous (float32 D += C) vs a loop of torch.mm with bf16 outputs (the
  same multiplies, less output traffic: torch.addmm takes no bf16 operands with a float32 C);
* the bf16 peak: torch.mm at 8192^3, the roofline the ratios are also given against.

Kernel times come from CUDA-graph replays with inputs rotated past L2; a relative-error check
against torch runs before each timing.

Usage: python benchmarks/bench_gemm_bf16.py [--out benchmarks/results] [--cases dense,bmm,grouped]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mate.gemm
from mate.ops.gemm import api
from mate.testing import bench

DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
BMM = [(128, 512, 128, 512), (64, 1024, 1024, 1024), (8, 4096, 4096, 4096), (32, 2048, 512, 2048)]  # batch, m, k, n
GROUPED_NK = [(6144, 7168), (7168, 3072), (4096, 4096), (4096, 2048)]  # DeepGEMM's M-grouped test shapes
MASKED = [(6, 1024), (32, 256)]  # groups, max_m (all rows valid)
K_GROUPED = [(4, 4096, 7168, 8192), (8, 7168, 2048, 4096)]  # groups, m, n, K per group


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def check(out, ref, what):
    err = rel_err(out, ref)
    if not err < 1e-2:
        raise AssertionError(f"{what}: relative error {err} >= 1e-2")
    return err


def peak_tflops(size=8192):
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    ms = bench.time_ms_graph(lambda: torch.mm(a, b), [()])
    return 2 * size**3 / (ms * 1e-3) / 1e12


def row(case, shape, flops, ms_mate, ms_peer, peak, err):
    tf, peer_tf = flops / (ms_mate * 1e-3) / 1e12, flops / (ms_peer * 1e-3) / 1e12
    return {"case": case, "shape": shape, "mate us": ms_mate * 1e3, "mate TFLOP/s": tf, "torch us": ms_peer * 1e3,
            "torch TFLOP/s": peer_tf, "speedup vs torch": ms_peer / ms_mate, "% of bf16 peak": 100 * tf / peak,
            "rel err": err}


def dense_rows(peak, rows, m=4096):
    for n, k in DENSE_NK:
        copies = bench.copies_to_exceed_l2(2 * (m * k + n * k + m * n))
        sets = [(torch.randn(m, k, dtype=torch.bfloat16, device="cuda"),
                 torch.randn(n, k, dtype=torch.bfloat16, device="cuda"),
                 torch.empty(m, n, dtype=torch.bfloat16, device="cuda")) for _ in range(copies)]
        for layout in ("nt", "nn"):
            args = [(a, b if layout == "nt" else b.T.contiguous(), d) for a, b, d in sets]
            fn = getattr(api, f"bf16_gemm_{layout}")
            a, b, d = args[0]
            fn(a, b, d)
            ref = torch.mm(a, b.t() if layout == "nt" else b)
            err = check(d, ref, f"{layout} {m}x{n}x{k}")
            ms_mate = bench.time_ms_graph(fn, args)
            peer = [(a, b.t() if layout == "nt" else b, d) for a, b, d in args]
            ms_peer = bench.time_ms_graph(lambda a, b, d: torch.mm(a, b, out=d), peer)
            rows.append(row(f"bf16_gemm_{layout}", f"{m}x{n}x{k}", 2 * m * n * k, ms_mate, ms_peer, peak, err))
            print(rows[-1], flush=True)


def bmm_rows(peak, rows):
    for dtype in (torch.bfloat16, torch.float16):
        for batch, m, k, n in BMM:
            copies = bench.copies_to_exceed_l2(2 * batch * (m * k + k * n + m * n))
            args = [(torch.randn(batch, m, k, dtype=dtype, device="cuda"),
                     torch.randn(batch, k, n, dtype=dtype, device="cuda"),
                     torch.empty(batch, m, n, dtype=dtype, device="cuda")) for _ in range(copies)]
            a, b, out = args[0]
            mate.gemm.bmm_fp16(a, b, dtype, out=out)
            err = check(out, torch.bmm(a, b), f"bmm {batch}x{m}x{k}x{n}")
            ms_mate = bench.time_ms_graph(lambda a, b, o: mate.gemm.bmm_fp16(a, b, o.dtype, out=o), args)
            ms_peer = bench.time_ms_graph(lambda a, b, o: torch.bmm(a, b, out=o), args)
            rows.append(row(f"bmm_fp16 {str(dtype).replace('torch.', '')}", f"{batch}x{m}x{k}x{n}",
                            2 * batch * m * n * k, ms_mate, ms_peer, peak, err))
            print(rows[-1], flush=True)


def _rotated(make, nbytes):
    return [make() for _ in range(bench.copies_to_exceed_l2(nbytes))]


def m_grouped_rows(peak, rows, groups=8, m_per_group=4096):
    """Contiguous layout, every group m_per_group rows (no padding); the peer multiplies each
    group's rows with torch.mm."""
    m = groups * m_per_group
    m_indices = torch.arange(groups, dtype=torch.int32, device="cuda").repeat_interleave(m_per_group)
    for n, k in GROUPED_NK:
        args = _rotated(lambda n=n, k=k: (torch.randn(m, k, dtype=torch.bfloat16, device="cuda"),
                                          torch.randn(groups, n, k, dtype=torch.bfloat16, device="cuda"),
                                          torch.empty(m, n, dtype=torch.bfloat16, device="cuda")),
                        2 * (m * k + groups * n * k + m * n))
        a, b, d = args[0]
        api.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)
        err = check(d[-m_per_group:], a[-m_per_group:] @ b[-1].t(), f"contiguous {groups}x{m_per_group}x{n}x{k}")
        ms_mate = bench.time_ms_graph(lambda a, b, d: api.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices), args)

        def peer(a, b, d):
            for g in range(groups):
                rows = slice(g * m_per_group, (g + 1) * m_per_group)
                torch.mm(a[rows], b[g].t(), out=d[rows])

        ms_peer = bench.time_ms_graph(peer, args)
        rows.append(row("m_grouped contiguous (peer: torch.mm loop)", f"{groups}x{m_per_group}x{n}x{k}",
                        2 * m * n * k, ms_mate, ms_peer, peak, err))
        print(rows[-1], flush=True)
    for groups_masked, max_m in MASKED:
        for n, k in GROUPED_NK[::3]:
            masked_m = torch.full((groups_masked,), max_m, dtype=torch.int32, device="cuda")
            args = _rotated(lambda g=groups_masked, mm=max_m, n=n, k=k: (
                torch.randn(g, mm, k, dtype=torch.bfloat16, device="cuda"),
                torch.randn(g, n, k, dtype=torch.bfloat16, device="cuda"),
                torch.empty(g, mm, n, dtype=torch.bfloat16, device="cuda")),
                2 * groups_masked * (max_m * k + n * k + max_m * n))
            a, b, d = args[0]
            api.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, max_m)
            err = check(d, torch.bmm(a, b.transpose(1, 2)), f"masked {groups_masked}x{max_m}x{n}x{k}")
            ms_mate = bench.time_ms_graph(
                lambda a, b, d, mm=masked_m, e=max_m: api.m_grouped_bf16_gemm_nt_masked(a, b, d, mm, e), args)
            ms_peer = bench.time_ms_graph(lambda a, b, d: torch.bmm(a, b.transpose(1, 2), out=d), args)
            rows.append(row("m_grouped masked (peer: torch.bmm)", f"{groups_masked}x{max_m}x{n}x{k}",
                            2 * groups_masked * max_m * n * k, ms_mate, ms_peer, peak, err))
            print(rows[-1], flush=True)


def k_grouped_rows(peak, rows):
    """k_grouped_bf16_gemm_tn_contiguous, d = c (in place) as DeepGEMM's test; the peer computes each
    group's A_g^T B_g with torch.mm into a bf16 output (no float32 C to read and write)."""
    for groups, m, n, k in K_GROUPED:
        ks = [k] * groups
        layout = torch.tensor(ks, dtype=torch.int32, device="cuda")
        args = _rotated(lambda g=groups, m=m, n=n, k=k: (torch.randn(g * k, m, dtype=torch.bfloat16, device="cuda"),
                                                         torch.randn(g * k, n, dtype=torch.bfloat16, device="cuda"),
                                                         torch.randn(g, m, n, device="cuda")),
                        2 * groups * k * (m + n) + 8 * groups * m * n)
        a, b, d = args[0]
        expected = d[-1] + a[-k:].float().t() @ b[-k:].float()
        api.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, layout, d)
        err = check(d[-1], expected, f"k_grouped {groups}x{m}x{n}x{k}")
        ms_mate = bench.time_ms_graph(
            lambda a, b, d, ks=ks, layout=layout: api.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, layout, d), args)

        outs = torch.empty(groups, m, n, dtype=torch.bfloat16, device="cuda")

        def peer(a, b, d, k=k, groups=groups, outs=outs):
            for g in range(groups):
                torch.mm(a[g * k:(g + 1) * k].t(), b[g * k:(g + 1) * k], out=outs[g])

        ms_peer = bench.time_ms_graph(peer, args)
        rows.append(row("k_grouped tn (peer: torch.mm loop, bf16 out)", f"{groups}x{m}x{n}x{k}", 2 * groups * m * n * k,
                        ms_mate, ms_peer, peak, err))
        print(rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--cases", default="dense,bmm,grouped")
    args = parser.parse_args()
    cases = args.cases.split(",")
    peak = peak_tflops()
    print(f"{bench.gpu_name()}: bf16 torch.mm 8192^3 peak {peak:.0f} TFLOP/s", flush=True)
    rows = []
    if "dense" in cases:
        dense_rows(peak, rows)
    if "bmm" in cases:
        bmm_rows(peak, rows)
    if "grouped" in cases:
        m_grouped_rows(peak, rows)
        k_grouped_rows(peak, rows)
    notes = (f"CUDA-graph replay medians (kernel time), inputs rotated past L2, each call timed in its own "
             f"steady power state (after 0.5 s of back-to-back calls, bench.SETTLE_S). bf16 peak {peak:.0f} TFLOP/s "
             "(torch.mm 8192^3, same run). Peers: torch.mm (cuBLAS) for bf16_gemm_nt / nn with the same operand "
             "layouts, torch.bmm for bmm_fp16 and the masked grouped GEMM, loops of torch.mm over the groups (one "
             "graph) for the contiguous and K-grouped GEMMs (K-grouped: bf16 outputs, no C). shape: M x N x K "
             "(dense), batch x m x k x n (bmm), groups x rows per group x N x K (M-grouped), groups x M x N x K per "
             "group (K-grouped).")
    bench.write_results("gemm_bf16", rows, list(rows[0]), notes, args.out)


if __name__ == "__main__":
    main()
