"""``dino-sparo-visualize``: pictures of SPARO slot attention (over the patch grid; over a caption's
tokens for CLIP) of a checkpoint (the drawing: :mod:`dino_sparo.visualize`)."""

from __future__ import annotations

import argparse
from typing import Any, Optional

from dino_sparo.cli.common import HelpFormatter, run_program
from dino_sparo.visualize import visualize_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-visualize",
        description="PNG grid of SPARO slot attention over the patch grid of some images (class-token weight "
                    "printed above each map); for CLIP checkpoints also the per-token attention of a caption.",
        formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth of a DINO or CLIP run with a SPARO read-out")
    parser.add_argument("--images", nargs="+",
                        help="image file paths and/or indices into the run's images: an image-folder run's val/ "
                             "(or test/, or the folder), a caption table's rows, shards' samples, Fashion-MNIST's "
                             "test set, the scene world's test scenes (default: 8 of the run's images, one per "
                             "class where there are labels; scenes 0-7)")
    parser.add_argument("--slots", type=int, nargs="+", help="slots to show (default: the most attended ones)")
    parser.add_argument("--num-slots", type=int, default=8, help="how many most-attended slots to show without --slots")
    parser.add_argument("--caption", help="CLIP only: also plot each slot's attention over this caption's tokens")
    parser.add_argument("--key", default="teacher", choices=["teacher", "student"], help="DINO: which network")
    parser.add_argument("--data-path", help="folder of the Fashion-MNIST IDX files (default: the config's)")
    parser.add_argument("--output", default="slot_attention.png", help="PNG to write")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` does with parsed options: write the pictures, print their paths; returns the result."""
    result = visualize_checkpoint(args.checkpoint, args.images, args.output, slots=args.slots,
                                  num_slots=args.num_slots, caption=args.caption, key=args.key,
                                  fashion_mnist_root=args.data_path)
    for name in ("image_png", "text_png"):
        if name in result:
            print(f"{name}: {result[name]}")
    print(f"slots: {result['slots']}")
    return result


def main(argv: Optional[list[str]] = None) -> None:
    """The console script (exit statuses: :func:`~dino_sparo.cli.common.run_program`)."""
    args = build_parser().parse_args(argv)
    run_program("dino-sparo-visualize", lambda: run(args))


if __name__ == "__main__":
    main()
