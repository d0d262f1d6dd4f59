"""``dino-sparo-linear``: linear-probe accuracy of a checkpoint's frozen features (or a baseline's),
on cached features or, with ``--augment``, DINO's augmented views (the protocol: ``evaluation.linear``)."""

from __future__ import annotations

import argparse
from typing import Any, Optional

from dino_sparo.cli.common import (
    HelpFormatter,
    add_source_arguments,
    parse_float_list,
    print_and_save,
    run_program,
    slots_from_args,
    start_evaluation,
)
from dino_sparo.errors import UsageError
from dino_sparo.evaluation.api import evaluate_inputs
from dino_sparo.evaluation.feature_kinds import resolve_spec
from dino_sparo.evaluation.linear import DEFAULT_LRS, SWEEP_LRS, format_linear_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-linear",
        description="Linear-probe accuracy of a checkpoint's frozen features: a grid of linear classifiers "
                    "trained at once, chosen on held-out train images, reported on test. Prints a table, "
                    "writes JSON.",
        epilog="Examples:\n"
               "  dino-sparo-linear --checkpoint output/demo_fashion_mnist/checkpoint.pth\n"
               "  dino-sparo-linear --checkpoint CKPT --lrs sweep --epochs 50 --output-json linear.json\n"
               "  dino-sparo-linear --checkpoint CKPT --slots-file knn.json   # slots chosen by dino-sparo-knn\n"
               "  dino-sparo-linear --baseline pixels --dataset fashion_mnist --lrs 0.001,0.01,0.1\n"
               "  dino-sparo-linear --weights vit_small_patch16_224.safetensors --dataset imagefolder "
               "--data-path DATA\n"
               "  torchrun --nproc_per_node 8 -m dino_sparo.cli.linear --checkpoint CKPT "
               "--dataset imagefolder --data-path /data/imagenet --augment",
        formatter_class=HelpFormatter,
    )
    add_source_arguments(parser)
    lin = parser.add_argument_group("linear probe")
    lin.add_argument("--features", default="auto", choices=["auto", "embedding", "last_blocks", "pixels"],
                     help="auto: the SPARO embedding for SPARO models, DINO's protocol for class-token models "
                          "(class tokens of the last 4 blocks for ViT-S and smaller, last block + average-pooled "
                          "patch tokens for ViT-B and wider)")
    lin.add_argument("--n-last-blocks", type=int, help="with last_blocks features: how many class tokens")
    lin.add_argument("--avgpool", action=argparse.BooleanOptionalAction, default=None,
                     help="with last_blocks features: append the mean of the last block's patch tokens")
    lin.add_argument("--lrs", default=",".join(str(v) for v in DEFAULT_LRS),
                     help="base learning rates, comma-separated, one head each (scaled by batch/256); "
                          "'sweep' is DINOv2's grid of 13 from 1e-5 to 0.1")
    lin.add_argument("--weight-decays", default="0", help="weight decays, comma-separated (DINO: 0)")
    lin.add_argument("--epochs", type=int, default=100, help="passes over the train split (DINO: 100)")
    lin.add_argument("--probe-batch-size", type=int, default=1024,
                     help="global batch of the probe (DINO: 1024); the lr is scaled by it / 256")
    lin.add_argument("--val-fraction", type=float,
                     help="train images held out to choose lr / wd / epoch (default 0.1 with several heads; "
                          "0 with one: train on all, report the last epoch)")
    lin.add_argument("--augment", action="store_true",
                     help="train on RandomResizedCrop + flip views through the frozen network each step "
                          "(DINO's full protocol; slow) instead of cached features")
    lin.add_argument("--crop-scale", default="0.08,1.0", help="RandomResizedCrop scale range with --augment")
    lin.add_argument("--slots", help="SPARO models: probe only these slots, e.g. 0,5,17 (renormalised)")
    lin.add_argument("--slots-file", help="slot ids from a file: a list, or the JSON dino-sparo-knn writes")
    lin.add_argument("--seed", type=int, default=0, help="held-out split, head init and batch order")
    lin.add_argument("--save-head", help="save the chosen classifier here (.pth)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` does with parsed options; returns the result (on every rank)."""
    lrs = list(SWEEP_LRS) if args.lrs.strip() == "sweep" else parse_float_list(args.lrs, "--lrs")
    wds = parse_float_list(args.weight_decays, "--weight-decays")
    crop_scale = parse_float_list(args.crop_scale, "--crop-scale")
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise UsageError(f"--crop-scale must be two numbers 0 < low <= high <= 1, got {args.crop_scale!r}")
    slots = slots_from_args(args)
    if args.epochs < 1 or args.probe_batch_size < 1:
        raise UsageError(f"--epochs and --probe-batch-size must be >= 1, got {args.epochs}, {args.probe_batch_size}")
    inputs = start_evaluation(args)
    spec = resolve_spec(args.features, inputs.source.backbone, grayscale=inputs.data.grayscale,
                        n_last_blocks=args.n_last_blocks, avgpool=args.avgpool)
    result = evaluate_inputs(
        "linear", inputs, features=spec, lrs=lrs, weight_decays=wds, epochs=args.epochs,
        batch_size=args.probe_batch_size, val_fraction=args.val_fraction, slots=slots, augment=args.augment,
        crop_scale=tuple(crop_scale), seed=args.seed, extract_batch_size=args.batch_size,
        num_workers=args.num_workers, fp16_features=args.fp16_features, save_head=args.save_head,
        progress=not args.quiet,
    )
    print_and_save(result, format_linear_table(result), args.output_json)
    return result


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    run_program("dino-sparo-linear", lambda: run(args))


if __name__ == "__main__":
    main()
