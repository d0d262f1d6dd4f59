"""``dino-sparo-sugarcrepe``: the SugarCrepe compositionality benchmark of a CLIP-mode checkpoint, with
per-slot accuracy and slot selection for SPARO models; prints a table and, when asked, writes a JSON
result (the work is in :mod:`dino_sparo.evaluation.sugarcrepe`)."""

from __future__ import annotations

import argparse
import logging
from typing import Any, Optional

from dino_sparo.cli.common import HelpFormatter, add_output_json, run_program, save_output_json
from dino_sparo.errors import UsageError
from dino_sparo.evaluation.sugarcrepe import CATEGORIES, SELECTION_SCOPES, format_table, sugarcrepe_from_checkpoint
from dino_sparo.runtime import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-sugarcrepe",
        description="SugarCrepe (Hsieh et al. 2023) of a CLIP-mode checkpoint: for each image, is its caption "
                    "closer than a hard negative made by adding, replacing or swapping an object, attribute or "
                    "relation? Scored by the rule of the benchmark's official main_eval.py: the checkpoint's "
                    "evaluation transform, fp32, L2-normalised embeddings, cos(image, caption) > cos(image, "
                    "negative) strictly (a tie is wrong). SPARO models can also be measured slot by slot.",
        epilog="Example: dino-sparo-sugarcrepe --checkpoint output/clip/checkpoint.pth --data sugar-crepe/data "
               "--images coco/val2017 --select-slots --output-json output/clip/sugarcrepe.json",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth written by dino-sparo-train --mode clip")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="folder of the benchmark's JSON files (<category>.json, e.g. the data/ folder of the "
                             "sugar-crepe repository); categories without a file are skipped and named in the log")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="folder the JSON files' image names are relative to (COCO val2017 for the real set)")
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help="comma-separated categories to evaluate; name fewer for a quicker look at some "
                             "(default: all seven)")
    parser.add_argument("--per-slot", action="store_true",
                        help="also score each slot on its own, to see which slots carry compositional "
                             "information (SPARO models)")
    parser.add_argument("--select-slots", action="store_true",
                        help="also choose slots greedily on a seeded part of each category's items and report, on "
                             "the other items only, accuracy with the chosen slots and with all (SPARO models)")
    parser.add_argument("--selection-fraction", type=float, default=0.5,
                        help="share of each category's items that choose the slots; the rest measure them (more "
                             "choosing items: a steadier choice, a noisier measurement)")
    parser.add_argument("--selection-scope", choices=SELECTION_SCOPES, default="category",
                        help="'category': one slot subset per category, chosen on its own items; 'all': one subset "
                             "for every category, chosen on all their selection items pooled")
    parser.add_argument("--max-slots", type=int,
                        help="stop the greedy selection at this many slots, for a small subset (default: no limit, "
                             "it stops when no slot raises accuracy)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split into selection and evaluation items; change it to see how much "
                             "the selection depends on the split")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images (and captions) per forward pass; lower it when the GPU runs out of memory")
    parser.add_argument("--num-workers", type=int, default=2, help="image-loading processes (0: load in this process)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the model runs (auto: the GPU when there is one)")
    add_output_json(parser, help="also write the result as JSON here, creating its folders (default: none, only the "
                             "table on stdout)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` does with parsed options: evaluate, print the table, write the JSON; returns the result."""
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if not categories:
        raise UsageError(f"--categories must name at least one of {', '.join(CATEGORIES)}, got {args.categories!r}")
    result = sugarcrepe_from_checkpoint(
        args.checkpoint, args.data, args.images, categories=categories, per_slot=args.per_slot,
        select_slots=args.select_slots, selection_fraction=args.selection_fraction,
        selection_scope=args.selection_scope, seed=args.seed, max_slots=args.max_slots, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device)
    print(format_table(result), flush=True)
    save_output_json(result, args.output_json)
    return result


def main(argv: Optional[list[str]] = None) -> None:
    """The console script (exit statuses: :func:`~dino_sparo.cli.common.run_program`)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    run_program("dino-sparo-sugarcrepe", lambda: run(args))


if __name__ == "__main__":
    main()
