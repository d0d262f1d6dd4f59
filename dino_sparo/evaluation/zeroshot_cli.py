"""``dino-sparo-zeroshot``: zero-shot classification, image↔text retrieval and slot analyses of a
CLIP-mode checkpoint; prints a table and writes a JSON result (the work is in
:mod:`dino_sparo.evaluation.zeroshot`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from dino_sparo.evaluation.sources import HelpFormatter
from dino_sparo.evaluation.zeroshot import evaluate, format_table, load_classnames, load_templates

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
    parser.add_argument("--templates", default="config",
                        help="prompt templates: 'config' (those the training captions used), 'simple', 'openai' "
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
    parser.add_argument("--output", help="JSON result file (default: zeroshot.json beside the checkpoint)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` does with parsed options: evaluate, print the table, write the JSON; returns the result."""
    from dino_sparo.data.captions import CaptionTable, clip_eval_transform  # noqa: PLC0415
    from dino_sparo.data.datasets import build_dataset  # noqa: PLC0415
    from dino_sparo.models.clip import load_clip_model  # noqa: PLC0415

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    try:
        model, cfg, tokenizer = load_clip_model(args.checkpoint, device)
    except RuntimeError as exc:  # a state dict that does not fit the config
        raise ValueError(str(exc)) from None
    transform = clip_eval_transform(cfg.model.img_size, cfg.clip.image_mean, cfg.clip.image_std)
    dataset_name = args.dataset or ("fashion_mnist" if cfg.clip.dataset == "fashion_mnist" else "none")
    kwargs: dict[str, Any] = {}
    if dataset_name != "none":
        path = args.data_path or (cfg.clip.train_data or cfg.data.path if dataset_name == "fashion_mnist" else None)
        data_cfg = argparse.Namespace(dataset=dataset_name, path=path, limit=args.limit, corrupt_images="error")
        test_set = build_dataset(data_cfg, "val" if args.split == "val" else "test", transform)
        kwargs.update(test_set=test_set, classnames=load_classnames(args.classnames, test_set.classes),
                      templates=load_templates(args.templates, cfg.clip.templates))
        if args.slot_selection:
            if model.slot_layout() is None:
                raise ValueError("--slot-selection needs a model with SPARO read-outs on both towers")
            sel_cfg = argparse.Namespace(dataset=dataset_name, path=path, limit=args.selection_size,
                                         corrupt_images="error")
            kwargs["selection_set"] = build_dataset(sel_cfg, "train", transform)
    if args.retrieval:
        kwargs["retrieval_set"] = CaptionTable(args.retrieval, transform, tokenizer, cfg.clip.image_column,
                                               cfg.clip.caption_column)
    if not kwargs:
        raise ValueError("nothing to evaluate: give --dataset and/or --retrieval")
    result = evaluate(model, tokenizer, max_slots=args.max_slots, batch_size=args.batch_size,
                      num_workers=args.num_workers, device=device, progress=True, **kwargs)
    result["checkpoint"] = str(args.checkpoint)
    print(format_table(result))
    output = Path(args.output) if args.output else Path(args.checkpoint).with_name("zeroshot.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", output)
    return result


def main(argv: Optional[list[str]] = None) -> None:
    """The console script: exit status 0 on success; a user's mistake is one line on stderr, status 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        run(args)
    except (ValueError, FileNotFoundError, KeyError, IndexError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError quotes its text
        raise SystemExit(f"dino-sparo-zeroshot: error: {message}") from None


if __name__ == "__main__":
    main()
