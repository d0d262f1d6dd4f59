"""``make demo`` / ``python -m dino_sparo.cli.demo``: DINO + SPARO on Fashion-MNIST on the CPU, then
k-NN beside the untrained network and raw pixels; ``make demo-clip`` (``--config
configs/clip/scenes_sparo.yaml``): CLIP + SPARO on the scene world, then zero-shot, retrieval and the
SugarCrepe-style table (the work: :mod:`dino_sparo.demo`)."""

from __future__ import annotations

import argparse
from typing import Optional

from dino_sparo.cli.common import run_program
from dino_sparo.demo import DEMO_CONFIG, format_demo, run_demo
from dino_sparo.runtime import set_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dino_sparo.cli.demo",
        description="Train DINO+SPARO on Fashion-MNIST on the CPU, then compare k-NN accuracy with the "
                    "untrained network and with raw pixels. With a CLIP config on the scene world "
                    "(configs/clip/scenes_sparo.yaml, as make demo-clip runs), train CLIP+SPARO and print zero-shot, "
                    "retrieval and SugarCrepe-style accuracy beside the untrained model and a text-only baseline.")
    parser.add_argument("--config", default=str(DEMO_CONFIG),
                        help="training config: a DINO one on Fashion-MNIST, or a CLIP one on the scene world")
    parser.add_argument("--output-dir", help="where the run goes (default: the config's output_dir)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, as OMP_NUM_THREADS (default: all cores, see the start-up log)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def run(args: argparse.Namespace) -> dict:
    """What ``main`` does with parsed options: train, evaluate, print the table (not when stopped)."""
    if args.threads:
        set_threads(args.threads)
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    summary = run_demo(args.config, overrides)
    if "stopped_by" not in summary:
        print(format_demo(summary))
    return summary


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    return run_program("dino-sparo-demo", lambda: run(args))


if __name__ == "__main__":
    main()
