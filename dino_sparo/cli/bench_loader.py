"""``dino-sparo-bench loader`` / ``python tools/bench_loader.py``: the command line of
:mod:`dino_sparo.bench_loader` (DINO's multi-crop data pipeline, ours against the reference)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from dino_sparo.cli.common import run_program
from dino_sparo.errors import UsageError
from dino_sparo.files import write_json
from dino_sparo.bench_loader import (RECIPES, SIZES, format_feed_check, format_loader_report, gpu_feed_check,
                                     run_loader_benchmark)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-bench loader",
        description="Images/s per CPU core of DINO's multi-crop data pipeline: the reference (DINO v1's "
                    "DataAugmentationDINO, torchvision v1 transforms on PIL), ours with data.augment_on: loader "
                    "(the default), and data.augment_on: device in its two halves (the loader workers' decode, "
                    "crop, resize, flip; the batched photometric ops, here on CPU tensors). Sources: JPEGs made "
                    "from photographs shipped in installed packages (scikit-image, matplotlib, Pillow), at "
                    "ImageNet size (500×375) and large (2000×1500); the demo's recipe on Fashion-MNIST. One thread "
                    "per process; rows alternate and repeat, medians are reported: compare ratios within one run. "
                    "The last line is the device mode's loader half over the reference, release recipe, "
                    "ImageNet size. With --feed-check: the GPU check's step instead (model-bound, loader-bound "
                    "and end-to-end images/s of a DINO training step, both modes).",
        epilog="Examples (BENCHMARKS.md):\n  dino-sparo-bench loader --workers 2 --output-json loader.json\n"
               "  dino-sparo-bench loader --feed-check --device cuda",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipes", default="release,demo",
                        help=f"comma-separated, of {', '.join(RECIPES)} (release: DINO ViT-S/16's 2×224 at 0.25–1 "
                             "+ 10×96 at 0.05–0.25; demo: configs/dino/demo_fashion_mnist.yaml's) (default: both)")
    parser.add_argument("--sizes", default="imagenet,large",
                        help=f"comma-separated JPEG sizes for the photo recipes, of {', '.join(SIZES)} (default: both)")
    parser.add_argument("--images", type=int, default=24,
                        help="images per row and round (the demo's recipe: 4× as many) (default: 24)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating rounds; the median is reported (default: 3)")
    parser.add_argument("--workers", type=int, default=0,
                        help="also time a DataLoader of this many worker processes, wall clock (default: 0, not)")
    parser.add_argument("--photos", nargs="+", type=Path,
                        help="photographs to make the JPEGs from (default: those the installed packages ship)")
    parser.add_argument("--workdir", type=Path, help="where the JPEGs are written (default: a temporary folder)")
    parser.add_argument("--output-json", metavar="PATH", help="also write the figures as JSON")
    feed = parser.add_argument_group("the GPU check's step (--feed-check)")
    feed.add_argument("--feed-check", action="store_true",
                      help="measure whether the loader feeds the training step, both data.augment_on modes")
    feed.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    feed.add_argument("--arch", default="vit_small", help="the ViT of the step (default: vit_small)")
    feed.add_argument("--batch", type=int, default=64, help="images per step (default: 64)")
    feed.add_argument("--steps", type=int, default=10, help="timed steps of each measurement (default: 10)")
    feed.add_argument("--out-dim", type=int, default=65536, help="DINO head prototypes (default: 65536)")
    feed.add_argument("--feed-workers", type=int, default=None,
                      help="loader workers of the check (default: all cores but one)")
    return parser


def _names(value: str, choices: dict, flag: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise UsageError(f"{flag} {value!r}: expected names from {', '.join(choices)}")
    return names


def run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` does with parsed options: measure, print the table; returns the figures."""
    for flag, value in (("--images", args.images), ("--repeats", args.repeats), ("--batch", args.batch),
                        ("--steps", args.steps)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    for photo in args.photos or []:
        if not photo.is_file():
            raise UsageError(f"--photos: no such file {photo}")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.feed_check:
        recipe = _names(args.recipes, RECIPES, "--recipes")[0]
        figures = gpu_feed_check(args.device, recipe, args.batch, args.steps, workers=args.feed_workers,
                                 arch=args.arch, out_dim=args.out_dim, photos=args.photos, workdir=args.workdir,
                                 log=log)
        report = format_feed_check(figures)
    else:
        figures = run_loader_benchmark(_names(args.recipes, RECIPES, "--recipes"), _names(args.sizes, SIZES, "--sizes"),
                                       args.images, args.repeats, args.workers, args.photos, args.workdir, log=log)
        report = format_loader_report(figures)
    if args.output_json:
        write_json(args.output_json, figures)
    print(report)
    return figures


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    run_program("dino-sparo-bench loader", lambda: run(args))


if __name__ == "__main__":
    main()
