"""flash_attn_combine: achieved bandwidth vs the measured copy bandwidth (goal >= 80%), with the
eager PyTorch reference timed in the same run as the peer (FlashAttention-3 itself is not
installed on our GPU machine).

Usage: python benchmarks/bench_combine.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mate.mha_interface import flash_attn_combine
from mate.ops.fmha import reference
from mate.testing import bench
from mate.testing.fmha import combine_inputs

# (num_splits, batch, seqlen, heads, head_dim): decode-like split-KV and prefill-like shapes.
SHAPES = [
    (4, 128, 1, 32, 128),
    (16, 128, 1, 32, 128),
    (8, 64, 1, 128, 512),
    (4, 8, 1024, 32, 128),
    (16, 4, 512, 32, 128),
    (3, 8, 2048, 16, 64),
    (2, 4, 1024, 32, 256),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    copy_gbs = bench.copy_bandwidth_gbs()
    print(f"{bench.gpu_name()}: measured copy bandwidth {copy_gbs:.0f} GB/s")
    rows = []
    for shape in SHAPES:
        splits, batch, seqlen, heads, dim = shape
        for out_dtype in (torch.bfloat16, torch.float32):
            one = combine_inputs(*shape, device="cuda", empty_splits=False)
            in_bytes = one[0].numel() * 4 + one[1].numel() * 4
            out_bytes = batch * seqlen * heads * (dim * out_dtype.itemsize + 4)
            copies = bench.copies_to_exceed_l2(in_bytes + out_bytes)
            arg_sets = [combine_inputs(*shape, device="cuda", seed=i, empty_splits=False) for i in range(copies)]
            outs = [torch.empty(batch, seqlen, heads, dim, dtype=out_dtype, device="cuda") for _ in range(copies)]
            arg_sets = [(o, lse, out) for (o, lse), out in zip(arg_sets, outs, strict=True)]
            call = lambda o, lse, out, out_dtype=out_dtype: flash_attn_combine(o, lse, out=out, out_dtype=out_dtype)  # noqa: E731
            eager_ms = bench.time_ms(call, arg_sets)
            ms = bench.time_ms_graph(call, arg_sets)
            peer_ms = bench.time_ms(lambda o, lse, out: out.copy_(reference.flash_attn_combine(o, lse)[0]), arg_sets,
                                    warmup=3, iters=20)
            gbs = (in_bytes + out_bytes) / (ms * 1e-3) / 1e9
            rows.append({"shape (splits,b,s,h,d)": str(shape), "out": str(out_dtype).replace("torch.", ""),
                         "MB moved": (in_bytes + out_bytes) / 1e6, "mate us (graph)": ms * 1e3,
                         "mate us (eager)": eager_ms * 1e3, "GB/s": gbs,
                         "% of copy BW": 100 * gbs / copy_gbs, "torch ref us": peer_ms * 1e3,
                         "speedup vs torch (eager)": peer_ms / eager_ms})
            print(rows[-1])
    notes = (f"Device-event medians after warm-up, inputs rotated over >2x L2. 'graph': calls replayed from a CUDA "
             f"graph (kernel time; GB/s and % use it); 'eager': plain Python calls (host overhead included). "
             f"Copy bandwidth measured in the same run: {copy_gbs:.0f} GB/s. Peer: the eager PyTorch reference "
             f"(FlashAttention-3 itself is not installed on the GPU machine).")
    bench.write_results("combine", rows, list(rows[0]), notes, args.out)


if __name__ == "__main__":
    main()
