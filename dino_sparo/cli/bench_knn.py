"""``python tools/bench_knn.py``: the k-NN search benchmark's command line (the benchmark itself:
:mod:`dino_sparo.evaluation.bench_knn`)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional

from dino_sparo.cli.common import add_output_json, parse_int_list, run_program, save_output_json
from dino_sparo.evaluation.bench_knn import DEFAULT_BACKENDS, DEFAULT_DIMS, format_table, run_bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_knn", description="Time the k-NN search (search + DINO vote) of each backend on "
        "memory-mapped features of a ViT-S width (384) and a SPARO embedding's (4096).")
    parser.add_argument("--dims", default=",".join(map(str, DEFAULT_DIMS)), help="feature widths, comma-separated")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help="k-NN backends to compare: the streamed faiss-cpu, faiss-gpu, torch, and the one-shot "
                             "references faiss-flat, torch-oneshot (no memory bound); the first is the one the "
                             "others' neighbours are compared with")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every backend, taking turns; the table gives the fastest and the median")
    parser.add_argument("--num-train", type=int, default=60000, help="train features (the k-NN memory)")
    parser.add_argument("--num-test", type=int, default=10000, help="test features (the queries)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("-k", type=int, default=20, help="neighbours per query")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16"], default="auto",
                        help="storage of the memmapped features; auto: fp16 from D = 1024 on (what "
                             "--fp16-features gives a SPARO model), fp32 below")
    parser.add_argument("--noise", type=float, default=2.0,
                        help="noise norm relative to the class centres' (higher: harder, lower accuracy)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of torch and faiss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", help="folder for the feature files (default: the system's temporary folder)")
    add_output_json(parser, help="also write the rows as JSON to this file, atomically ('-': standard output, "
                                 "instead of the table)")
    return parser


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """What ``main`` does with parsed options: measure, print the table, write the JSON."""
    dims = parse_int_list(args.dims, "--dims")
    backends = [b for b in args.backends.split(",") if b]
    rows = run_bench(dims, backends, args.num_train, args.num_test, args.num_classes, args.k, args.temperature,
                     args.dtype, args.noise, args.threads, args.seed, args.tmp, args.repeats)
    if args.output_json == "-":
        print(json.dumps(rows, indent=2))
    else:
        print(f"k-NN search + vote: {args.num_train} train × {args.num_test} test features, k={args.k}, "
              f"{args.threads} thread(s), {args.repeats} run(s) each; ÷ one-shot: the median over the fastest "
              "one-shot reference's median; memory is the growth from the moment the features are opened")
        print(format_table(rows))
        save_output_json(rows, args.output_json)
    return rows


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    return run_program("bench_knn", lambda: run(args))


if __name__ == "__main__":
    main()
