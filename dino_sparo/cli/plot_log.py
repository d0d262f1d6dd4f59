"""``python tools/plot_log.py``: training curves of one or several ``log.jsonl`` files as one PNG
(the drawing: :mod:`dino_sparo.plots`)."""

from __future__ import annotations

import argparse
from typing import Optional

from dino_sparo.cli.common import run_program
from dino_sparo.plots import plot_training_logs


def main(argv: Optional[list[str]] = None) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="python tools/plot_log.py",
        description="Training curves (loss, lr, teacher entropy, k-NN accuracy when logged) of one or several runs.")
    parser.add_argument("logs", nargs="+", help="log.jsonl files or run folders")
    parser.add_argument("--labels", nargs="+", help="one legend label per log (default: the run folder names)")
    parser.add_argument("--metrics", nargs="+", help="keys to draw (default: loss, lr, teacher entropy, knn*)")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--output", default="training_curves.png", help="PNG to write")
    args = parser.parse_args(argv)

    def run() -> list[str]:
        drawn = plot_training_logs(args.logs, args.output, labels=args.labels, metrics=args.metrics, title=args.title)
        print(f"{args.output}: {', '.join(drawn)}")
        return drawn

    return run_program("python tools/plot_log.py", run)
