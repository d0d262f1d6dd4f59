"""``dino-sparo-zeroshot``: zero-shot classification, image↔text retrieval and slot analyses of a
CLIP-mode checkpoint; prints a table and writes a JSON result (the work is in
:mod:`dino_sparo.evaluation.zeroshot`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional

from dino_sparo.cli.common import HelpFormatter, add_output_json, run_program, save_output_json
from dino_sparo.evaluation.options import Extraction
from dino_sparo.evaluation.zeroshot import format_table, zeroshot_from_checkpoint
from dino_sparo.runtime import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-zeroshot",
        description="Zero-shot classification, image↔text retrieval and slot analyses of a CLIP-mode checkpoint.",
        epilog="Example: dino-sparo-zeroshot --checkpoint output/clip_demo/checkpoint.pth --slot-selection",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth written by dino-sparo-train --mode clip")
    parser.add_argument("--dataset", choices=["fashion_mnist", "imagefolder", "none"], default=None,
                        help="zero-shot classification data (default: fashion_mnist when the model was trained "
                             "on it, else none)")
    parser.add_argument("--data-path", help="Fashion-MNIST folder, or the image folder (with train/ and val/ "
                                            "sub-folders, or the class folders themselves)")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="the split that is measured")
    parser.add_argument("--classnames", help="'imagenet' (open_clip's names for an ImageNet wnid folder) or a file "
                                             "with one name per line; default: the dataset's class names")
    parser.add_argument("--templates", default="auto",
                        help="prompt templates: 'auto' (openai for an image folder, config for Fashion-MNIST), "
                             "'config' (those Fashion-MNIST's synthetic training captions used), 'simple', 'openai' "
                             "(CLIP's 80 ImageNet prompts), or a file with one template per line")
    parser.add_argument("--limit", type=int, help="evaluate only this many test images (class-balanced)")
    parser.add_argument("--retrieval", metavar="TABLE", help="CSV/TSV caption table for recall@1/5/10")
    parser.add_argument("--slot-selection", action="store_true",
                        help="choose slots greedily for zero-shot on held-out train-split images, then measure "
                             "the subset on the test split (SPARO models)")
    parser.add_argument("--selection-size", type=int, default=5000,
                        help="train-split images (class-balanced) the slot selection scores on")
    parser.add_argument("--max-slots", type=int, help="stop the selection at this many slots")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images (and prompts) per forward pass; lower it when the GPU runs out of memory")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="data-loading processes (0: load in this process)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the model runs (auto: the GPU when there is one)")
    add_output_json(parser, help="write the result here as JSON (default: zeroshot.json beside the checkpoint)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` does with parsed options: evaluate, print the table, write the JSON; returns the result."""
    result = zeroshot_from_checkpoint(
        args.checkpoint, dataset=args.dataset, data_path=args.data_path, split="val" if args.split == "val" else "test",
        limit=args.limit, classnames=args.classnames, templates=args.templates, slot_selection=args.slot_selection,
        selection_size=args.selection_size, retrieval=args.retrieval, max_slots=args.max_slots,
        extraction=Extraction(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device))
    print(format_table(result))
    save_output_json(result, args.output_json or str(Path(args.checkpoint).with_name("zeroshot.json")))
    return result


def main(argv: Optional[list[str]] = None) -> None:
    """The console script (exit statuses: :func:`~dino_sparo.cli.common.run_program`)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    run_program("dino-sparo-zeroshot", lambda: run(args))


if __name__ == "__main__":
    main()
