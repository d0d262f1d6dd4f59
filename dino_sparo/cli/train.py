"""``dino-sparo-train --config FILE [key.sub=value ...]`` (also ``python -m dino_sparo.cli.train``, as
torchrun starts it): the command line of :func:`dino_sparo.train.train`; its exit statuses are every
program's (:func:`dino_sparo.cli.common.run_program`)."""

from __future__ import annotations

import argparse
import logging
from typing import Any, Optional

from dino_sparo.cli.common import run_program
from dino_sparo.config import TrainConfig, format_config_reference, load_config, to_dict, validate_config
from dino_sparo.data.datasets import CorruptImageError
from dino_sparo.errors import Failure
from dino_sparo.train import StartFrom, train

logger = logging.getLogger("dino_sparo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-train",
        description="Train a ViT with a SPARO (or class-token) read-out by DINO self-distillation or CLIP. "
                    "Re-running the same command resumes from OUTPUT_DIR/checkpoint.pth.",
        epilog="Examples:\n  dino-sparo-train --config configs/dino/demo_fashion_mnist.yaml\n"
               "  dino-sparo-train --config configs/dino/vit_small16_vanilla_sparo.yaml data.path=/data/imagenet "
               "optim.epochs=300\n  torchrun --nproc_per_node 8 -m dino_sparo.cli.train --config FILE\n"
               "  dino-sparo-train --config FILE --output-dir output/ft --finetune output/run/checkpoint.pth "
               "optim.lr=0.0001\n"
               "Every config key (listed by --help-config) can be overridden as key.sub=value. Relative paths "
               "(output_dir, data.path, clip.train_data, model.pretrained) are taken from the folder the command "
               "runs in and saved absolute in config.yaml and the checkpoint; a config's _base_ is relative to "
               "the file that names it.\n"
               "Exit status: 0 finished; 1 the run failed (one line, or a traceback for a bug); 2 a configuration "
               "or option the program cannot use (one line naming it, also in train.log); 128 + N stopped by "
               "signal N after saving a checkpoint (130 SIGINT, 143 SIGTERM, 140 SIGUSR2).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (keys not given keep their defaults: see --help-config)")
    parser.add_argument("--mode", choices=["dino", "clip"], help="training method; overrides 'mode' in the config")
    parser.add_argument("--output-dir", help="where config.yaml, checkpoint.pth and log.jsonl go "
                                             "(overrides 'output_dir')")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="CHECKPOINT",
                       help="continue this checkpoint exactly (weights, optimiser, schedules, step, RNG) into "
                            "--output-dir, when that folder has no checkpoint of its own yet (default: resume "
                            "from OUTPUT_DIR/checkpoint.pth when there is one)")
    start.add_argument("--fresh", action="store_true",
                       help="start at step 0 even if OUTPUT_DIR holds a checkpoint (it is replaced at the first "
                            "save and log.jsonl restarts)")
    start.add_argument("--finetune", metavar="CHECKPOINT",
                       help="start from this run's trained weights (same architecture) with a new optimiser and "
                            "schedules from step 0; model.pretrained is not loaded")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its type, default and meaning, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. optim.lr=0.001 model.readout=cls")
    return parser


def config_from_args(args: argparse.Namespace, validate: bool = True) -> TrainConfig:
    overrides = list(args.overrides)
    if args.mode:
        overrides.append(f"mode={args.mode}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides, validate=validate)


def start_from_args(args: argparse.Namespace) -> StartFrom:
    return StartFrom(resume=args.resume, fresh=args.fresh, finetune=args.finetune)


def train_entry(argv: list[str]) -> dict:
    """``dino-sparo-train ARGV`` as a submitted job runs it (:mod:`dino_sparo.submit`), returning the
    last metrics (with ``stopped_by`` when a signal stopped it), so the job knows whether to requeue."""
    args = build_parser().parse_args(argv)
    return train(config_from_args(args), start_from_args(args))


def run(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """What ``main`` does with parsed options: print the config, or train; returns the last metrics."""
    cfg = config_from_args(args, validate=False)  # values are validated by train(), into train.log
    if args.print_config:
        import yaml  # noqa: PLC0415

        print(yaml.safe_dump(to_dict(validate_config(cfg)), sort_keys=False))
        return None
    try:
        return train(cfg, start_from_args(args))
    except CorruptImageError as exc:
        last = str(exc).strip().splitlines()[-1]  # a loader worker's error comes with its traceback
        name, _, message = last.partition(": ")
        message = message if name.endswith(CorruptImageError.__name__) and message else last
        raise Failure(f"{message}; data.corrupt_images=skip skips such files (with a warning naming each)") from None


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print(format_config_reference())
        return
    run_program("dino-sparo-train", lambda: run(args))


if __name__ == "__main__":
    main()
