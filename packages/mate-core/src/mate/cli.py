"""The `mate` command: check | show-config | env | replay | list-dumps | aot."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from mate import __version__, dispatch, env, jit, platform


def table(rows: list[list], headers: list[str]) -> str:
    """Rows as an aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "not found"
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"{nvcc} (unusable: {err})"
    release = [line for line in text.splitlines() if "release" in line]
    return f"{release[0].split('release')[-1].split(',')[0].strip() if release else '?'} ({nvcc})"


def _environment_lines(device: torch.device) -> list[str]:
    info = platform.device_info(device)
    where = f"{device} ({info.name}"
    where += f", {info.arch}, {info.multiprocessors} multiprocessors)" if info.is_gpu else ")"
    return [
        f"mate {__version__}  torch {torch.__version__}  tilelang {platform.tilelang_version() or 'not installed'}"
        f"  python {sys.version.split()[0]}",
        f"device: {where}",
        f"nvcc: {nvcc_version()}",
    ]


def _max_error(got, want) -> float:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    worst = 0.0
    for g, w in zip(got, want, strict=False):
        diff = (g.detach().cpu().double() - w.detach().cpu().double()).abs()
        same_inf = torch.isinf(g.detach().cpu()) & (g.detach().cpu().double() == w.detach().cpu().double())
        worst = max(worst, diff.masked_fill(same_inf, 0).nan_to_num(nan=float("inf")).max().item())
    return worst


def _within(op: dispatch.Op, got, want) -> bool:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got, want, strict=False):
        atol, rtol = op.tolerance(g.dtype)
        if not torch.allclose(g.detach().cpu().double(), w.detach().cpu().double(), atol=atol, rtol=rtol):
            return False
    return True


def cmd_check(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else platform.default_device()
    print("\n".join(_environment_lines(device)))
    rows, failures = [], 0
    for op in dispatch.ops():
        run, expected = op.check_case(device)
        try:
            variant_backend = "reference" if not platform.device_info(device).is_gpu else "tilelang"
            start = time.perf_counter()
            got = run()
            _sync(device)
            first = time.perf_counter() - start
            start = time.perf_counter()
            got = run()
            _sync(device)
            second = time.perf_counter() - start
            err = _max_error(got, expected())
            ok = _within(op, got, expected())
            status = "pass" if ok else "FAIL"
            backend = "reference" if env.get("MATE_BACKEND") == "reference" else variant_backend
            rows.append([op.name, backend, status, f"{first * 1e3:.1f} ms", f"{second * 1e3:.2f} ms", f"{err:.2e}"])
        except Exception as error:  # a check table reports every op, whatever breaks
            ok = False
            rows.append([op.name, "-", "FAIL", "-", "-", f"{type(error).__name__}: {error}"[:160]])
        failures += not ok
    print(table(rows, ["op", "backend", "status", "first call", "second call", "max error"]))
    print(f"{len(rows) - failures} passed, {failures} failed")
    return 1 if failures else 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cmd_show_config(args: argparse.Namespace) -> int:
    device = platform.default_device()
    print("\n".join(_environment_lines(device)))
    info = platform.device_info(device)
    print(f"tilelang target: {info.tilelang_target or 'none (CPU: reference backend)'}")
    print(f"backend: {env.get('MATE_BACKEND')}  JIT: {'on' if env.get('MATE_JIT') else 'off'}  "
          f"cache: {jit.cache_dir()} ({len(jit.built_variants())} variants built)")
    for op in dispatch.ops():
        print(f"\n{op.name} (family {op.family}) — TileLang kernel support:")
        print(table([list(row) for row in op.support.rows()], ["feature", "supported values"]))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    rows = []
    for row in env.table():
        try:
            env.get(row["name"])
            status = "ok"
        except env.MateEnvError as err:
            status = f"INVALID: {err}"
        rows.append([row["name"], row["current"] or "(unset)", row["default"], status])
    print(table(rows, ["variable", "current", "default", "status"]))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from mate import replay

    try:
        folders = replay.dump_folders(Path(args.dir))
    except replay.DumpError as err:
        print(f"error: {err}")
        return 2
    if not folders:
        print(f"no dumps under {args.dir}")
        return 2
    results = [replay.replay(folder, args.device) for folder in folders]
    print(table([[r.folder.name, r.api, r.status, r.detail] for r in results], ["dump", "api", "result", "detail"]))
    bad = sum(not r.ok for r in results)
    print(f"{len(results) - bad} passed, {bad} failed")
    return 1 if bad else 0


def cmd_list_dumps(args: argparse.Namespace) -> int:
    from mate import replay

    try:
        folders = replay.dump_folders(Path(args.dir))
    except replay.DumpError as err:
        print(f"error: {err}")
        return 2
    rows = []
    for folder in folders:
        try:
            manifest = replay.read_manifest(folder)
        except replay.DumpError as err:
            rows.append([folder.name, "?", "?", "?", f"unreadable: {err}"])
            continue
        status = f"raised {manifest['error']['type']}" if manifest.get("error") else "ok"
        rows.append([folder.name, manifest.get("api", "?"), manifest.get("time", "?"),
                     manifest.get("device_name", "?"), status])
    print(table(rows, ["dump", "api", "time", "device", "status"]))
    return 0


def cmd_aot(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    info = platform.device_info(platform.default_device())
    target = platform.tilelang_target(args.arch) if args.arch else info.tilelang_target
    if target is None:
        target = platform.tilelang_target("sm_90a")
    chosen = [op for op in dispatch.ops() if args.op in (None, op.name, op.family)]
    if not chosen:
        print(f"error: --op {args.op!r} names no op or family; known: {', '.join(o.name for o in dispatch.ops())}")
        return 2
    work = [(op, variant) for op in chosen for variant in op.aot_variants()]
    if args.list:
        print("\n".join(jit.variant_id(op.name, v, target) for op, v in work))
        return 0
    failures = 0
    for op, variant in tqdm(work, desc=f"mate aot ({target['arch']})", unit="kernel"):
        try:
            jit.get_kernel(op.name, variant, target, op.build)
        except Exception as error:
            failures += 1
            tqdm.write(f"FAILED {jit.variant_id(op.name, variant, target)}: {type(error).__name__}: {error}")
    print(f"built {len(work) - failures} of {len(work)} kernels into {jit.cache_dir()} "
          f"(compiled {jit.stats['compiled']}, already built {jit.stats['loaded']})")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mate", description="MATE tensor engine tools")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate the install: run every op's smallest case against its reference")
    check.add_argument("--device", help="device to check (default: the GPU if present, else cpu)")
    check.set_defaults(func=cmd_check)
    sub.add_parser("show-config", help="versions, device, JIT cache and every op's support matrix").set_defaults(
        func=cmd_show_config)
    sub.add_parser("env", help="the MATE_* environment variables and their current values").set_defaults(func=cmd_env)
    replay = sub.add_parser("replay", help="re-run level-10 dumps and compare outputs")
    replay.add_argument("--dir", required=True, help="a dump folder or a folder of dumps")
    replay.add_argument("--device", help="device to replay on (default: where it ran, if present)")
    replay.set_defaults(func=cmd_replay)
    list_dumps = sub.add_parser("list-dumps", help="list level-10 dumps")
    list_dumps.add_argument("dir")
    list_dumps.set_defaults(func=cmd_list_dumps)
    aot = sub.add_parser("aot", help="precompile the kernel variants the families list")
    aot.add_argument("--op", help="only this op or family")
    aot.add_argument("--arch", help="architecture to build for, e.g. sm_90a (default: this GPU's, else sm_90a)")
    aot.add_argument("--list", action="store_true", help="list the variants instead of building them")
    aot.set_defaults(func=cmd_aot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except env.MateEnvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
