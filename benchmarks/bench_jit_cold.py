"""Cold start: the first flash_attn_combine call in a fresh process whose kernel is already in the
disk cache (goal <= 0.5 s), next to the import times and the cost of a real compile.

Usage: python benchmarks/bench_jit_cold.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mate.testing import bench

CHILD = r"""
import json, time
t0 = time.perf_counter()
import torch, mate
from mate import jit
from mate.mha_interface import flash_attn_combine
from mate.testing.fmha import combine_inputs
t1 = time.perf_counter()
jit.tilelang()
t2 = time.perf_counter()
o, l = combine_inputs(4, 2, 64, 8, 128, device="cuda")
torch.cuda.synchronize()
t3 = time.perf_counter()
flash_attn_combine(o, l, out_dtype=torch.bfloat16)
torch.cuda.synchronize()
t4 = time.perf_counter()
flash_attn_combine(o, l, out_dtype=torch.bfloat16)
torch.cuda.synchronize()
t5 = time.perf_counter()
print(json.dumps({"import mate+torch s": t1 - t0, "import tilelang s": t2 - t1, "first call s": t4 - t3,
                  "second call s": t5 - t4, "compiled": jit.stats["compiled"], "loaded": jit.stats["loaded"]}))
"""


def run_child(cache: str) -> dict:
    env = dict(os.environ, MATE_CACHE_DIR=cache)
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        rows = [{"process": "first (empty cache: compiles)", **run_child(cache)}]
        rows += [{"process": f"fresh process {i} (disk cache)", **run_child(cache)} for i in (2, 3)]
    for row in rows:
        print(row)
    notes = "Wall-clock seconds in each fresh process; 'first call' includes loading the kernel (or compiling it)."
    bench.write_results("jit_cold_start", rows, list(rows[0]), notes, args.out)


if __name__ == "__main__":
    main()
