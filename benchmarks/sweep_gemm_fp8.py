"""Tile sweep of the FP8 GEMM at small M (dense, DeepSeek-V3 shapes): every tile bucket of
fp8_kernel.TILES that fits M (split-K ones included) is compiled (in parallel processes), checked
against the reference (calc_diff after CUDA-graph replays, output poisoned first) and timed with
CUDA-graph replays, inputs rotated past L2, beside torch._scaled_mm row-wise; prints which tile
fp8_launch.tile_for picks and the fastest.

Usage: python benchmarks/sweep_gemm_fp8.py [--ms 64 128] [--workers 14] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing

import torch
from bench_gemm_fp8 import DEEPSEEK_NK, check, fp8_operands, scaled_mm_rowwise

from mate import jit, platform
from mate.ops.gemm import api, fp8_kernel, fp8_launch, reference, support
from mate.testing import bench


def candidates(m: int, n: int, k: int, sms: int) -> list[str]:
    """Tiles of at most M rows (rounded up to 64); split-K ones only where the tiles alone do not
    fill the SMs and where K divides into the nominal split count."""
    rows = -(-m // 64) * 64
    out = []
    for tile, cfg in fp8_kernel.TILES.items():
        bm, bn, splits = cfg["block_m"], cfg["block_n"], cfg.get("splits", 1)
        tiles = -(-m // bm) * -(-n // bn)
        if bm > rows or fp8_kernel.k_splits(k, splits) != splits or (splits > 1 and tiles >= sms):
            continue
        out.append(tile)
    return out


def _compile(job):
    n, k, tile = job
    target = platform.device_info(torch.device("cuda")).tilelang_target
    jit.get_kernel(support.FP8_GEMM.name, fp8_launch.kernel_variant(n, k, "dense", tile), target,
                   support.FP8_GEMM.build)
    return job


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_gbs = bench.copy_bandwidth_gbs()
    print(f"{bench.gpu_name()}: {sms} SMs, copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    jobs = sorted({(n, k, t) for n, k in DEEPSEEK_NK for m in args.ms for t in candidates(m, n, k, sms)})
    with cf.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in pool.map(_compile, jobs):
            pass
    print(f"compiled {len(jobs)} kernels", flush=True)
    heuristic = fp8_launch.tile_for
    results = []
    for n, k in DEEPSEEK_NK:
        for m in args.ms:
            copies = bench.copies_to_exceed_l2(m * k + n * k + m * n * 2)
            sets = []
            for _ in range(copies):
                a, b = fp8_operands(m, n, k)
                sets.append((a, b, torch.empty(m, n, dtype=torch.bfloat16, device="cuda")))
            a, b, _ = sets[0]
            expected = reference.gemm_nt(a[0], b[0], sfa=a[1], sfb=b[1], out_dtype=torch.float32)
            peer_us = scaled_mm_rowwise(m, n, k, copies) * 1e3
            row = {"m": m, "n": n, "k": k, "_scaled_mm us": peer_us, "picked": heuristic(m, n, k, "dense", sms),
                   "tiles": {}}
            for tile in candidates(m, n, k, sms):
                fp8_launch.tile_for = lambda *_, t=tile, **__: t
                try:
                    for s in sets:
                        s[2].fill_(float("nan"))
                    us = bench.time_ms_graph(lambda a, b, d: api.fp8_gemm_nt(a, b, d), sets) * 1e3
                    torch.cuda.synchronize()
                    check(sets[0][2], expected, f"{tile} {m}x{n}x{k}")
                    wbw = (n * k + n * k // 16384 * 4) / (us * 1e-6) / 1e9
                    row["tiles"][tile] = {"us": us, "bw%": 100 * wbw / copy_gbs, "vs_scaled_mm": peer_us / us}
                except Exception as exc:  # noqa: BLE001 - a sweep reports and goes on
                    row["tiles"][tile] = {"error": repr(exc)[:300]}
                finally:
                    fp8_launch.tile_for = heuristic
            timed = {t: r for t, r in row["tiles"].items() if "us" in r}
            best = min(timed, key=lambda t: timed[t]["us"])
            picked = timed.get(row["picked"], {"us": float("nan"), "bw%": float("nan")})
            print(f"M={m} N={n} K={k}: _scaled_mm {peer_us:.1f} us | picked {row['picked']} {picked['us']:.1f} us "
                  f"({picked['bw%']:.0f}%) | best {best} {timed[best]['us']:.1f} us ({timed[best]['bw%']:.0f}%, "
                  f"{timed[best]['vs_scaled_mm']:.2f}x) | " + " ".join(
                      f"{t}={r['us']:.1f}" if "us" in r else f"{t}=ERR" for t, r in row["tiles"].items()), flush=True)
            for t, r in row["tiles"].items():
                if "error" in r:
                    print(f"  {t}: {r['error']}", flush=True)
            results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": bench.gpu_name(), "copy_gbs": copy_gbs, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
