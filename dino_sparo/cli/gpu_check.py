"""``dino-sparo-gpu-check`` (``tools/gpu_check.sh``): the command line of :mod:`dino_sparo.gpu_check`.
Standard library only, as the check itself: it runs before the project is installed."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

from dino_sparo.gpu_check import (CALLS, DEFAULT_BUDGET_S, DEFAULT_WHEELS, GROUPS, OUTPUT_FILES, ROOT, Context,
                                  Step, build_plan, fetch_wheels, find_wheels, make_shapes_folder,
                                  plan_sizes, probe_environment, run_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.sh",
        description="Short runs that prove the GPU paths on a GPU machine without a package registry: "
                    "installs the project (pip install --no-deps -e .) and the wheels in --wheels; then, in call 1, "
                    "pytest -m gpu and dino-sparo-bench (ViT-S/16 2x224 + 10x96, batch 64, bf16: SPARO and class "
                    "token with packed crops, then SDPA, per-size xformers, math and an fp16 reference as time "
                    "allows); in call 2, a DINO training killed, resumed and stopped, k-NN, and CLIP steps with "
                    "zero-shot. Each step is time-boxed within --budget; the figures go to --output.",
        epilog="Examples:\n"
               "  tools/gpu_check.sh --fetch-wheels            # on a machine that reaches the package index\n"
               "  tools/gpu_check.sh --dry-run --call 1        # what would run (any machine)\n"
               "  tools/gpu_check.sh --call 1                  # on the GPU machine: install, GPU tests, benchmark\n"
               "  tools/gpu_check.sh --call 2                  # then: DINO kill/resume + k-NN, CLIP + zero-shot\n"
               "  tools/gpu_check.sh --smoke --call 2          # the check itself at toy size, on any machine",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", help=f"folder of wheels to install with pip --no-index --no-deps (default: "
                                          f"{DEFAULT_WHEELS} in the repository; where it is missing, only the "
                                          "project is installed)")
    parser.add_argument("--output", help="folder for the figures and logs, a few files (default: $OUT when set, "
                                         "else output/gpu_check in the repository)")
    parser.add_argument("--work-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "dino_sparo_gpu_check"),
                        help="scratch folder: generated data, checkpoints, step logs (default: "
                             "$TMPDIR/dino_sparo_gpu_check, TMPDIR defaulting to /tmp)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds the whole run may take; each step gets its share (default: {DEFAULT_BUDGET_S} "
                             f"per call that the chosen groups span: {DEFAULT_BUDGET_S} for --call N, "
                             f"{2 * DEFAULT_BUDGET_S} for all groups)")
    parser.add_argument("--call", type=int, choices=sorted(CALLS),
                        help="one of the two calls that fit the GPU machine's lending, at most 5 minutes each: "
                             + "; ".join(f"{n} = {' '.join(groups)}" for n, groups in CALLS.items())
                             + " (default: --steps)")
    parser.add_argument("--steps", nargs="+", choices=GROUPS, default=None,
                        help="the groups to run, in the fixed order install, pytest, bench, dino, clip (default: "
                             "all, or --call's); the environment probe always runs")
    parser.add_argument("--skip-install", action="store_true", help="leave out the install group (already "
                        "installed; same as --steps without install)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on whatever device is there, a CPU too: checks the check itself "
                             "(steps needing xformers or CUDA are skipped where they are missing)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    parser.add_argument("--fetch-wheels", action="store_true",
                        help="download the wheels for Python 3.12 on x86-64 Linux into --wheels and exit "
                             "(needs the package index)")
    parser.add_argument("--make-shapes", metavar="DIR",
                        help="write the generated image folder and caption tables (the sizes of the check, or of "
                             "--smoke) into DIR and exit; the check runs this as its shapes-data step")
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
        print("  " + (shlex.join(step.argv) if step.argv else "(nothing to run)"))
        if step.xformers_argv:
            print(f"  where xformers runs, also: {shlex.join(step.xformers_argv)}")
    print(f"\nwould write: {', '.join(str(Path(args.output) / f) for f in OUTPUT_FILES)}")


def choose_steps(args: argparse.Namespace) -> None:
    """``--call``, ``--steps`` and ``--skip-install`` into the groups to run, in order, and the budget."""
    chosen = args.steps or (CALLS[args.call] if args.call else GROUPS)
    if args.skip_install:
        chosen = [g for g in chosen if g != "install"]
    args.steps = [g for g in GROUPS if g in chosen]
    if args.budget is None:
        calls = {n for n, groups in CALLS.items() for g in args.steps if g in groups and g != "install"}
        args.budget = DEFAULT_BUDGET_S * max(1, len(calls))


def missing_packages(args: argparse.Namespace) -> list[str]:
    """What the GPU steps need and neither the machine nor the wheels brought along provide (none for
    --smoke, where the steps needing them are skipped, and without the install group)."""
    if args.smoke or "install" not in args.steps or find_wheels(args.wheels):
        return []
    wanted = {"xformers": {"pytest", "bench", "dino"}, "open_clip": {"clip"}}
    return [name for name, groups in wanted.items()
            if groups & set(args.steps) and importlib.util.find_spec(name) is None]


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
    if args.make_shapes:
        make_shapes_folder(args.make_shapes, **plan_sizes(args.smoke)["data"])
        return 0
    choose_steps(args)
    if args.budget <= 0:
        print(f"error: --budget must be positive, got {args.budget}", file=sys.stderr)
        return 2
    if args.wheels is not None and not Path(args.wheels).is_dir() and not args.dry_run:
        print(f"error: --wheels {args.wheels}: no such folder", file=sys.stderr)
        return 2
    args.wheels = str(Path(args.wheels).resolve() if args.wheels else ROOT / DEFAULT_WHEELS)
    missing = missing_packages(args)
    if missing and not args.dry_run:
        print(f"error: no wheels in {args.wheels} and {' and '.join(missing)} not installed: bring the wheels "
              "(tools/gpu_check.sh --fetch-wheels, then carry the folder) or use --smoke", file=sys.stderr)
        return 2
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
