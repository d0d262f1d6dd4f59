"""``python tools/study.py``: the cls-vs-SPARO study's command line (the study: :mod:`dino_sparo.study`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from dino_sparo.cli.common import run_program
from dino_sparo.runtime import setup_logging
from dino_sparo.study import ARMS, BUDGETS, format_comparison, format_summary, run_study, write_summary


def build_parser() -> argparse.ArgumentParser:
    default_config = "configs/dino/demo_fashion_mnist.yaml"  # relative to the repository root
    parser = argparse.ArgumentParser(
        prog="python tools/study.py",
        description="DINO with a class-token vs a SPARO read-out, several seeds, same schedule and budget; "
                    "k-NN, linear probe and selected-slot k-NN, mean ± std. Re-running skips finished runs.")
    parser.add_argument("--config", default=default_config, help="base config both arms start from")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per arm (at least 3 for a std)")
    parser.add_argument("--budget", default="cpu", choices=sorted(BUDGETS),
                        help="smoke: a 2-step pipeline check; cpu: ~40 min for 6 runs on 2 shared cores; cpu3x: 3× its steps; "
                             "demo: the demo's full schedule and evaluation; "
                             "recipe: the config's own schedule, full 60k/10k evaluation")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="which read-outs to run")
    parser.add_argument("--results-dir", default="results/study", help="per-run JSONs and the summary go here")
    parser.add_argument("--output-dir", default="output/study", help="checkpoints and training logs go here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--baselines", action="store_true",
                        help="also evaluate raw pixels and each arm's network at initialisation (same protocol)")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the summary from the run JSONs")
    parser.add_argument("--compare-with", default=None, metavar="RESULTS_DIR",
                        help="another study's --results-dir (same budget): the summary adds the difference of "
                             "each arm's means and its standard error (default: none)")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_program("python tools/study.py", lambda: run(args))


def run(args: Any) -> dict[str, Any]:
    """What ``main`` does with parsed options; a stopped run's payload has ``stopped_by`` (no summary)."""
    if args.summary_only:
        payload = write_summary(Path(args.results_dir) / args.budget, args.budget, args.config, args.compare_with)
    else:
        from dino_sparo.runtime import set_threads  # noqa: PLC0415

        set_threads(args.threads)
        payload = run_study(args.config, args.seeds, args.budget, args.results_dir, args.output_dir, args.arms,
                            args.device, baselines=args.baselines, compare_with=args.compare_with)
        if "stopped_by" in payload:  # no JSON for the stopped run; the exit status says which signal
            return payload
    print(format_summary(payload["arms"]))
    if "compared_with" in payload:
        print("\n" + format_comparison(payload["compared_with"]["differences"], payload["compared_with"]["results"]))
    for name, entry in payload["baselines"].items():
        print(f"{name}: k-NN top-1 {100 * entry['knn_top1']:.2f}, linear top-1 {100 * entry['linear_top1']:.2f}")
    return payload
