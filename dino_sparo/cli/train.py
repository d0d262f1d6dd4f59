"""``dino-sparo-train --config FILE [key.sub=value ...]`` (also ``python -m dino_sparo.cli.train``, as
torchrun starts it): the command line of :func:`dino_sparo.train.train`, its messages and exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from dino_sparo import distributed
from dino_sparo.config import ConfigError, TrainConfig, format_config_reference, load_config, to_dict, validate_config
from dino_sparo.data.datasets import CorruptImageError
from dino_sparo.train import NonFiniteLossError, stopped_exit_code, train

logger = logging.getLogger("dino_sparo")

# Exit codes of dino-sparo-train (listed in the README's Training section)
EXIT_FAILED = 1  # the run failed: a non-finite loss, a corrupt image, or an error shown with its traceback
EXIT_USER_ERROR = 2  # a configuration the program cannot use (one line naming the key); nothing was trained
# stopped by a signal before the end, after saving a checkpoint: 128 + the signal's number, as a shell
# reports a process killed by it (see dino_sparo.train.stopped_exit_code)


def corrupt_image_message(exc: CorruptImageError) -> str:
    """The one line that names the file: a loader worker's error arrives with the worker's traceback."""
    last = str(exc).strip().splitlines()[-1]
    name, _, message = last.partition(": ")
    return message if name.endswith(CorruptImageError.__name__) and message else last


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-train",
        description="Train a ViT with a SPARO (or class-token) read-out by DINO self-distillation or CLIP. "
                    "Re-running the same command resumes from OUTPUT_DIR/checkpoint.pth.",
        epilog="Examples:\n  dino-sparo-train --config configs/dino/demo_fashion_mnist.yaml\n"
               "  dino-sparo-train --config configs/dino/vit_small16_vanilla_sparo.yaml data.path=/data/imagenet "
               "optim.epochs=300\n  torchrun --nproc_per_node 8 -m dino_sparo.cli.train --config FILE\n"
               "Every config key (listed by --help-config) can be overridden as key.sub=value.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (keys not given keep their defaults: see --help-config)")
    parser.add_argument("--mode", choices=["dino", "clip"], help="training method; overrides 'mode' in the config")
    parser.add_argument("--output-dir", help="where config.yaml, checkpoint.pth and log.jsonl go "
                                             "(overrides 'output_dir')")
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


def is_user_error(exc: BaseException) -> bool:
    """A configuration the program cannot use: a ``ConfigError``, or a ``ValueError`` that names
    its config key as the project's errors do (``config key 'x.y' ...``). Anything else is a bug
    and keeps its traceback."""
    return isinstance(exc, ConfigError) or (isinstance(exc, ValueError) and str(exc).startswith("config key '"))


def train_entry(argv: list[str]) -> dict:
    """``dino-sparo-train ARGV`` as a submitted job runs it (:mod:`dino_sparo.submit`), returning the
    last metrics (with ``stopped_by`` when a signal stopped it), so the job knows whether to requeue."""
    args = build_parser().parse_args(argv)
    return train(config_from_args(args))


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print(format_config_reference())
        return
    try:
        cfg = config_from_args(args, validate=False)  # values are validated by train(), into train.log
        if args.print_config:
            validate_config(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    if args.print_config:
        import yaml
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return
    try:
        metrics = train(cfg)
    except NonFiniteLossError as exc:
        logger.error("%s", exc)
        raise SystemExit(EXIT_FAILED) from None
    except CorruptImageError as exc:
        logger.error("%s; data.corrupt_images=skip skips such files (with a warning naming each)",
                     corrupt_image_message(exc))
        raise SystemExit(EXIT_FAILED) from None
    except ValueError as exc:
        if not is_user_error(exc):
            raise
        logger.error("error: %s", exc)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        distributed.cleanup()
    if metrics.get("stopped_by"):  # stopped before the end: a script can tell it from a finished run
        raise SystemExit(stopped_exit_code(metrics["stopped_by"]))


if __name__ == "__main__":
    main()
