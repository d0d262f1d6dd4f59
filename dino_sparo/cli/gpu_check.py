"""``dino-sparo-gpu-check`` (``tools/gpu_check.sh``): the command line of :mod:`dino_sparo.gpu_check`.
Standard library only, as the check itself: it runs before the project is installed."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

from dino_sparo.gpu_check import (DEFAULT_BUDGET_S, DEFAULT_WHEELS, GROUPS, OUTPUT_FILES, ROOT, Context, Step,
                                  build_plan, fetch_wheels, find_wheels, probe_environment, run_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.sh",
        description="One short run that proves the GPU paths on a GPU machine without a package registry: "
                    "installs the project (pip install --no-deps -e .) and the wheels in --wheels, then runs "
                    "pytest -m gpu, dino-sparo-bench (ViT-S/16 2x224 + 10x96, batch 64, bf16: packed, per size "
                    "with xformers, SDPA, math; the reference in bf16 and fp16; ViT-B/16 if time is left), a "
                    "DINO training killed and resumed with k-NN at the end, and CLIP steps with zero-shot. Each "
                    "step is time-boxed within --budget; the figures go to --output.",
        epilog="Examples:\n"
               "  tools/gpu_check.sh --fetch-wheels            # on a machine that reaches the package index\n"
               "  tools/gpu_check.sh --dry-run                 # what would run (any machine)\n"
               "  tools/gpu_check.sh --wheels .gpu_wheels --output gpu_check_out   # on the GPU machine\n"
               "  tools/gpu_check.sh --smoke --steps dino clip --skip-install      # the check itself, toy size",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", help=f"folder of wheels to install with pip --no-index --no-deps (default: "
                                          f"{DEFAULT_WHEELS} in the repository; where it is missing, only the "
                                          "project is installed)")
    parser.add_argument("--output", help="folder for the figures and logs, a few files (default: $OUT when set, "
                                         "else output/gpu_check in the repository)")
    parser.add_argument("--work-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "dino_sparo_gpu_check"),
                        help="scratch folder: generated data, checkpoints, step logs (default: "
                             "$TMPDIR/dino_sparo_gpu_check, TMPDIR defaulting to /tmp)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds the whole run may take; each step gets its share (default: {DEFAULT_BUDGET_S})")
    parser.add_argument("--steps", nargs="+", choices=GROUPS, default=list(GROUPS),
                        help="the groups to run, in the fixed order install, pytest, bench, dino, clip (default: "
                             "all); the environment probe always runs")
    parser.add_argument("--skip-install", action="store_true", help="leave out the install group (already "
                        "installed; same as --steps without install)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on whatever device is there, a CPU too: checks the check itself "
                             "(steps needing xformers or CUDA are skipped where they are missing)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    parser.add_argument("--fetch-wheels", action="store_true",
                        help="download the wheels for Python 3.12 on x86-64 Linux into --wheels and exit "
                             "(needs the package index)")
    parser.add_argument("--probe-json", metavar="PATH",
                        help="write the environment probe (torch, CUDA, xformers, k-NN backends, open_clip) as "
                             "JSON to PATH and exit; the check runs this as its environment step")
    return parser


def print_plan(plan: list[Step], args: argparse.Namespace) -> None:
    wheels = find_wheels(args.wheels)
    print(f"GPU check plan (budget {args.budget:.0f} s; output {args.output}; scratch {args.work_dir})")
    print(f"wheels in {args.wheels}: " + (", ".join(w.name for w in wheels) if wheels else
                                           "none (tools/gpu_check.sh --fetch-wheels brings them)"))
    for step in plan:
        flags = ", ".join(filter(None, [
            "optional" if step.optional else "", f"needs {step.needs}" if step.needs else "",
            f"{signal.Signals(step.signal_at[1]).name} at logged step {step.signal_at[0]}" if step.signal_at else ""]))
        print(f"\n[{step.name}] {step.title} (at most {step.cap_s:.0f} s{'; ' + flags if flags else ''})")
        if step.note:
            print(f"  note: {step.note}")
        print("  " + (shlex.join(step.argv) if step.argv else "(in-process)" if step.action else "(nothing to run)"))
        if step.xformers_argv:
            print(f"  where xformers runs, also: {shlex.join(step.xformers_argv)}")
    print(f"\nwould write: {', '.join(str(Path(args.output) / f) for f in OUTPUT_FILES)}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.probe_json:
        Path(args.probe_json).parent.mkdir(parents=True, exist_ok=True)
        info = probe_environment()
        Path(args.probe_json).write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))
        return 0
    if args.fetch_wheels:
        return fetch_wheels(Path(args.wheels or ROOT / DEFAULT_WHEELS))
    if args.skip_install:
        args.steps = [g for g in args.steps if g != "install"]
    args.steps = [g for g in GROUPS if g in args.steps]
    if args.budget <= 0:
        print(f"error: --budget must be positive, got {args.budget}", file=sys.stderr)
        return 2
    if args.wheels is not None and not Path(args.wheels).is_dir() and not args.dry_run:
        print(f"error: --wheels {args.wheels}: no such folder", file=sys.stderr)
        return 2
    args.wheels = str(Path(args.wheels).resolve() if args.wheels else ROOT / DEFAULT_WHEELS)
    args.output = str(Path(args.output or os.environ.get("OUT") or ROOT / "output" / "gpu_check").resolve())
    args.work_dir = str(Path(args.work_dir).resolve())
    plan = build_plan(args)
    if args.dry_run:
        print_plan(plan, args)
        return 0
    output, work = Path(args.output).resolve(), Path(args.work_dir).resolve()
    try:
        output.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    for run in ("dino", "clip"):  # a fresh training each time: the kill and resume start from nothing
        shutil.rmtree(work / run, ignore_errors=True)
    return run_plan(plan, Context(args=args, work=work, output=output))


if __name__ == "__main__":
    sys.exit(main())
