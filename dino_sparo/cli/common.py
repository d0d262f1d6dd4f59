"""What the command-line programs share: the help layout, the options that name a network and its
data (mapped one to one onto :class:`~dino_sparo.evaluation.inputs.EvalRequest`), list parsing,
process set-up and the one-line error exit."""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Optional

from dino_sparo import distributed
from dino_sparo.evaluation.inputs import (
    BASELINES,
    CHECKPOINT_KEYS,
    DEFAULT_CACHE_FOLDER,
    EvalInputs,
    EvalRequest,
    open_request,
    read_slots_file,
    write_json,
)
from dino_sparo.runtime import resolve_device, setup_logging

logger = logging.getLogger("dino_sparo")

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of the evaluation programs: the epilog's examples as written, and every option's
    help ending with its default (unless the help already states it, or there is none to state)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text.lower()):  # 0 is a default to show
            return text
        return f"{text} (default: %(default)s)"


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every evaluation program takes: the network, the data, extraction and output."""
    net = parser.add_argument_group("network")
    net.add_argument("--checkpoint", help="checkpoint.pth written by dino-sparo-train")
    net.add_argument("--checkpoint-key", default="auto", choices=CHECKPOINT_KEYS,
                     help="which network of the checkpoint; auto: the teacher of a DINO run (what DINO "
                          "reports), the image tower of a CLIP run's model")
    net.add_argument("--baseline", choices=BASELINES,
                     help="evaluate a reference instead of the trained weights: 'init' is the same "
                          "architecture at initialisation (seeded by the config), 'pixels' the raw images")
    net.add_argument("--config", help="YAML config giving the architecture when there is no --checkpoint "
                                      "(for --baseline init)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=["fashion_mnist", "imagefolder"],
                      help="evaluation dataset (default: the one the checkpoint was trained on)")
    data.add_argument("--data-path", help="image folder with train/ and val/ (or test/) sub-folders, or the folder "
                                          "of the four Fashion-MNIST files (default: the checkpoint's data.path)")
    data.add_argument("--train-path", help="instead of --data-path: the class folder of the train split (the "
                                           "memory of k-NN, the fit of the probe); needs --test-path")
    data.add_argument("--test-path", help="instead of --data-path: the class folder of the test split")
    data.add_argument("--train-limit", type=int, help="use a class-balanced subset of this many train images")
    data.add_argument("--test-limit", type=int, help="use a class-balanced subset of this many test images")
    data.add_argument("--image-size", type=int,
                      help="evaluation crop size (default: the size the checkpoint was trained at: model.img_size for "
                           "CLIP, crops.global_crops_size for DINO; without a checkpoint 28 for Fashion-MNIST, "
                           "else 224)")
    data.add_argument("--resize-ratio", type=float,
                      help="resize the short side to size × ratio before the centre crop "
                           "(default 256/224 as DINO; 1 for Fashion-MNIST and for CLIP checkpoints, as CLIP)")
    data.add_argument("--corrupt-images", choices=["error", "skip"], default="error",
                      help="what an unreadable image in an image folder does")
    ext = parser.add_argument_group("feature extraction")
    ext.add_argument("--batch-size", type=int, default=256, help="images per forward pass (per process)")
    ext.add_argument("--num-workers", type=int, default=4, help="data-loading processes per process")
    ext.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where the network runs (auto: the GPU of this process when there is one)")
    ext.add_argument("--fp16-features", action="store_true",
                     help="store features in float16: half the disk and memory, same neighbours up to rounding")
    ext.add_argument("--cache-dir", help=f"feature cache (default: {DEFAULT_CACHE_FOLDER}/ beside the checkpoint; "
                                         "without a checkpoint, no cache)")
    ext.add_argument("--no-cache", action="store_true", help="extract into a temporary folder, keep nothing")
    ext.add_argument("--output-json", help="write the results here as JSON")
    ext.add_argument("--quiet", action="store_true", help="no progress bars")


def request_from_args(args: argparse.Namespace) -> EvalRequest:
    """The :class:`EvalRequest` that :func:`add_source_arguments`' options describe."""
    return EvalRequest(
        checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, baseline=args.baseline, config=args.config,
        dataset=args.dataset, data_path=args.data_path, train_path=args.train_path, test_path=args.test_path,
        train_limit=args.train_limit, test_limit=args.test_limit, image_size=args.image_size,
        resize_ratio=args.resize_ratio, corrupt_images=args.corrupt_images,
        cache_dir=None if args.no_cache else (args.cache_dir or "auto"), device=args.device,
    )


def start_evaluation(args: argparse.Namespace) -> EvalInputs:
    """Device, process group (when launched with several processes), logging, then the network and
    data the options name."""
    device = resolve_device(args.device, key="--device")
    info = distributed.init_distributed(device.type)
    setup_logging(info.is_main)
    request = request_from_args(args)
    request.device = device
    return open_request(request)


def print_and_save(result: dict[str, Any], table: str, output_json: Optional[str]) -> None:
    """The table on stdout and the JSON file, once (on the main process)."""
    if distributed.is_main_process():
        print(table, flush=True)
        if output_json:
            logger.info("results written to %s", write_json(output_json, result))


def run_program(prog: str, run: Callable[[], Any], errors: tuple = USER_ERRORS) -> Any:
    """``run()``; a user's mistake becomes one line ``prog: error: ...`` and exit status 1. The
    process group is always torn down."""
    try:
        return run()
    except errors as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError quotes its text
        raise SystemExit(f"{prog}: error: {message}") from None
    finally:
        distributed.cleanup()


def _parse_list(text: Optional[str], name: str, kind: Callable[[str], Any], what: str) -> Optional[list]:
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated {what}, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must name at least one value, got {text!r}")
    return values


def parse_int_list(text: Optional[str], name: str) -> Optional[list[int]]:
    """``"10,20,100"`` -> [10, 20, 100]; errors name the option."""
    return _parse_list(text, name, int, "integers")


def parse_float_list(text: Optional[str], name: str) -> Optional[list[float]]:
    """``"0.001,0.01"`` -> [0.001, 0.01]; errors name the option."""
    return _parse_list(text, name, float, "numbers")


def slots_from_args(args: argparse.Namespace) -> Optional[list[int]]:
    """The slot subset that ``--slots`` or ``--slots-file`` names (None: every slot)."""
    slots = parse_int_list(args.slots, "--slots")
    if args.slots_file:
        if slots is not None:
            raise ValueError("give --slots or --slots-file, not both")
        slots = read_slots_file(args.slots_file)
    return slots
