"""``dino-sparo-knn``: DINO's weighted k-NN accuracy of a checkpoint (or a baseline), with SPARO
slot subsets, per-slot accuracy and greedy slot selection (the protocol: ``evaluation.knn``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from dino_sparo.cli.common import (
    HelpFormatter,
    add_source_arguments,
    parse_int_list,
    print_and_save,
    run_program,
    slots_from_args,
    start_evaluation,
)
from dino_sparo.evaluation.api import evaluate_inputs
from dino_sparo.evaluation.feature_kinds import resolve_spec
from dino_sparo.evaluation.knn import DEFAULT_TEMPERATURE, format_knn_table
from dino_sparo.evaluation.knn_search import BACKENDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-knn",
        description="Weighted k-NN accuracy (DINO's protocol) of a checkpoint's frozen features, "
                    "with SPARO slot subsets and slot selection. Prints a table, writes JSON.",
        epilog="Examples:\n"
               "  dino-sparo-knn --checkpoint output/demo_fashion_mnist/checkpoint.pth\n"
               "  dino-sparo-knn --checkpoint CKPT --baseline init --ks 20\n"
               "  dino-sparo-knn --baseline pixels --dataset fashion_mnist\n"
               "  dino-sparo-knn --weights dino_deitsmall16_pretrain.pth --dataset imagefolder --data-path DATA\n"
               "  dino-sparo-knn --checkpoint CKPT --dataset imagefolder --data-path /data/imagenet --fp16-features\n"
               "  dino-sparo-knn --checkpoint CKPT --select-slots --per-slot --output-json knn.json\n"
               "  dino-sparo-knn --checkpoint CKPT --slots-file knn.json   # the slots selected above\n"
               "  torchrun --nproc_per_node 8 -m dino_sparo.cli.knn --checkpoint CKPT ...",
        formatter_class=HelpFormatter,
    )
    add_source_arguments(parser)
    knn = parser.add_argument_group("k-NN")
    knn.add_argument("--ks", default="10,20,100,200", help="numbers of neighbours (DINO reports 20; lightly 200)")
    knn.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="vote weights exp(sim / T)")
    knn.add_argument("--backend", default="auto", choices=BACKENDS,
                     help="exact search: faiss on GPU, faiss on CPU, or blocked torch matmul (all give the same "
                          "neighbours); auto takes the first available")
    knn.add_argument("--features", default="embedding", choices=["embedding", "last_blocks", "pixels"],
                     help="what to read: the model's embedding (SPARO or class token; DINO's k-NN), the class "
                          "tokens of the last blocks, or raw pixels")
    knn.add_argument("--n-last-blocks", type=int, help="with --features last_blocks (default 4)")
    slots = parser.add_argument_group("SPARO slots")
    slots.add_argument("--slots", help="evaluate also with only these slots, e.g. 0,5,17 (renormalised)")
    slots.add_argument("--slots-file", help="slot ids from a file: a list, or the JSON this program writes")
    slots.add_argument("--select-slots", action="store_true",
                       help="greedy forward selection of slots by k-NN accuracy on a held-out part of TRAIN, "
                            "then evaluated on test")
    slots.add_argument("--select-max-slots", type=int, help="stop the selection at this many slots")
    slots.add_argument("--select-val-fraction", type=float, default=0.1, help="held-out fraction of train")
    slots.add_argument("--select-samples", type=int, default=20000,
                       help="class-balanced train rows the selector uses (it holds them in memory)")
    slots.add_argument("--per-slot", action="store_true", help="k-NN accuracy of each slot alone: table and PNG")
    slots.add_argument("--slot-k", type=int, default=20, help="k for --per-slot and --select-slots")
    slots.add_argument("--plot", help="per-slot bar chart PNG (default: beside --output-json, else beside the "
                                      "checkpoint)")
    return parser


def _plot_path(args: argparse.Namespace, source_name: str) -> Optional[Path]:
    if not args.per_slot:
        return None
    if args.plot:
        return Path(args.plot)
    if args.output_json:
        out = Path(args.output_json)
        return out.with_name(out.stem + "_per_slot.png")
    if args.checkpoint:
        return Path(args.checkpoint).resolve().parent / f"knn_per_slot_{source_name}.png"
    return Path("knn_per_slot.png")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` does with parsed options; returns the result (on every rank)."""
    ks = parse_int_list(args.ks, "--ks")
    slots = slots_from_args(args)
    inputs = start_evaluation(args)
    spec = resolve_spec(args.features, inputs.source.backbone, grayscale=inputs.data.grayscale,
                        n_last_blocks=args.n_last_blocks, avgpool=False)
    result = evaluate_inputs(
        "knn", inputs, features=spec, ks=ks, temperature=args.temperature, backend=args.backend, slots=slots,
        select_slots=args.select_slots, select_max_slots=args.select_max_slots,
        select_val_fraction=args.select_val_fraction, select_samples=args.select_samples, per_slot=args.per_slot,
        slot_k=args.slot_k, plot_path=_plot_path(args, inputs.source.name), batch_size=args.batch_size,
        num_workers=args.num_workers, fp16_features=args.fp16_features, progress=not args.quiet,
    )
    print_and_save(result, format_knn_table(result), args.output_json)
    return result


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    run_program("dino-sparo-knn", lambda: run(args))


if __name__ == "__main__":
    main()
