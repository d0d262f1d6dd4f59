"""What the command-line programs share: the one way a program ends (:func:`run_program`: its exit
status and its last line), the help layout, the options that name a network and its data (mapped
one to one onto :class:`~dino_sparo.evaluation.inputs.EvalRequest`), list parsing and process set-up."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Any, Callable, Optional

from dino_sparo import distributed
from dino_sparo.config import ARCHS
from dino_sparo.data.datasets import CorruptImageError
from dino_sparo.errors import Failure, UsageError, UserError
from dino_sparo.files import write_json
from dino_sparo.evaluation.inputs import (
    BASELINES,
    CHECKPOINT_KEYS,
    DEFAULT_CACHE_FOLDER,
    EvalInputs,
    EvalRequest,
    open_request,
    read_slots_file,
)
from dino_sparo.runtime import resolve_device, setup_logging

logger = logging.getLogger("dino_sparo")

# The exit statuses of every program (listed in the README's "Exit statuses")
EXIT_OK = 0
EXIT_FAILED = 1  # the run failed: a one-line reason (Failure), or a bug shown with its traceback
EXIT_USER_ERROR = 2  # the user asked for something the program cannot do (as argparse): nothing was done
# stopped by a signal, after saving what it could: 128 + the signal's number, as a shell reports it
USER_ERRORS = (UserError, FileNotFoundError)  # a path the user named that does not exist is their mistake
ONE_LINE_FAILURES = (Failure, CorruptImageError)


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
                          "architecture at initialisation (seeded by the config; with its model.pretrained "
                          "loaded when it names one, as a run starts), 'pixels' the raw images")
    net.add_argument("--weights", metavar="FILE",
                     help="evaluate the backbone in this weights file instead of a checkpoint: a timm ViT state "
                          "dict (.pth, .bin or .safetensors), DINO's released backbones "
                          "(dino_deitsmall16_pretrain.pth), a DeiT-style file wrapping one in 'model' or "
                          "'state_dict', a file written by dino-sparo-export, or a dino_sparo checkpoint. Read as a "
                          "class-token ViT with all its blocks, its width, depth and patch size taken from the file "
                          "(or --config's architecture); give --dataset")
    net.add_argument("--arch", choices=sorted(ARCHS),
                     help="with --weights: the ViT size, which sets the number of heads (default: the size of the "
                          "file's width)")
    net.add_argument("--patch-size", type=int, help="with --weights: checked against the file's patch embedding")
    net.add_argument("--config", help="YAML config giving the architecture when there is no --checkpoint: for "
                                      "--baseline init (with model.pretrained loaded when it names one, as the run "
                                      "would start) and for --weights (e.g. a SPARO read-out)")
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
    add_output_json(ext)
    ext.add_argument("--quiet", action="store_true", help="no progress bars")


def request_from_args(args: argparse.Namespace) -> EvalRequest:
    """The :class:`EvalRequest` that :func:`add_source_arguments`' options describe."""
    return EvalRequest(
        checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, baseline=args.baseline, config=args.config,
        weights=args.weights, arch=args.arch, patch_size=args.patch_size,
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


def add_output_json(parser: Any, help: str = "write the results here as JSON (atomically)") -> None:
    """``--output-json PATH``: the one name of every program's JSON output."""
    parser.add_argument("--output-json", metavar="PATH", help=help)


def save_output_json(result: Any, output_json: Optional[str]) -> None:
    """``--output-json``'s file, written atomically, and a log line naming it (main process only)."""
    if output_json and distributed.is_main_process():
        logger.info("results written to %s", write_json(output_json, result))


def print_and_save(result: dict[str, Any], table: str, output_json: Optional[str]) -> None:
    """The table on stdout and the JSON file, once (on the main process)."""
    if distributed.is_main_process():
        print(table, flush=True)
    save_output_json(result, output_json)


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line: a loader worker's error arrives with the worker's
    traceback (its last line is the error), KeyError quotes its text."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line for line in str(text).strip().splitlines() if line.strip()] or [type(exc).__name__]
    in_worker = any("Traceback" in line for line in lines[:-1])
    last = lines[-1] if in_worker else " ".join(line.strip() for line in lines)
    name, _, message = last.partition(": ")
    return message if name.split(".")[-1] == type(exc).__name__ and message else last


def _report(line: str, exc_info: bool = False) -> None:
    """On stderr, and into the program's log file when it has one (train.log), traceback included."""
    if exc_info:
        traceback.print_exc()
    print(line, file=sys.stderr, flush=True)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)
             and getattr(h, "_dino_sparo", False)]
    if files:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, line, None,
                                   sys.exc_info() if exc_info else None)
        for handler in files:
            handler.handle(record)


def exit_status(exc: BaseException) -> int:
    """The exit status an error ends a program with, by its type (see the ``EXIT_*`` constants)."""
    if isinstance(exc, USER_ERRORS):
        return EXIT_USER_ERROR
    if isinstance(exc, KeyboardInterrupt):
        return 128 + 2  # SIGINT
    return EXIT_FAILED


def run_program(prog: str, run: Callable[[], Any]) -> Any:
    """The one way every program ends: ``run()``'s result, or its error as an exit status.

    A :class:`~dino_sparo.errors.UserError` (or a missing file) is one line ``prog: error: ...`` and
    status 2; a :class:`~dino_sparo.errors.Failure` (or a corrupt image) one line and status 1; any
    other error its traceback and status 1; a result with ``stopped_by`` (a run stopped by a signal,
    after saving) status 128 + the signal's number. The line goes to the program's log file too
    (train.log). The process group is always torn down."""
    from dino_sparo.train import stopped_exit_code  # noqa: PLC0415 (the evaluation programs need no loop)

    try:
        result = run()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _report(f"{prog}: interrupted")
        raise SystemExit(exit_status(KeyboardInterrupt())) from None
    except (*USER_ERRORS, *ONE_LINE_FAILURES) as exc:
        _report(f"{prog}: error: {_one_line(exc)}")
        raise SystemExit(exit_status(exc)) from None
    except Exception as exc:
        _report(f"{prog}: failed with {type(exc).__name__}: {_one_line(exc)}", exc_info=True)
        raise SystemExit(EXIT_FAILED) from None
    finally:
        distributed.cleanup()
    if isinstance(result, dict) and result.get("stopped_by"):  # a script can tell it from a finished run
        raise SystemExit(stopped_exit_code(result["stopped_by"]))
    return result


def _parse_list(text: Optional[str], name: str, kind: Callable[[str], Any], what: str) -> Optional[list]:
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UsageError(f"{name} must be comma-separated {what}, got {text!r}") from None
    if not values:
        raise UsageError(f"{name} must name at least one value, got {text!r}")
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
            raise UsageError("give --slots or --slots-file, not both")
        slots = read_slots_file(args.slots_file)
    return slots
