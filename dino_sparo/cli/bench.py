"""``dino-sparo-bench``: the command line of :mod:`dino_sparo.bench` (ours against the reference DINO step);
``dino-sparo-bench loader ...`` is :mod:`dino_sparo.cli.bench_loader` (the data pipeline)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from dino_sparo.bench import ARCH_CHOICES, format_report, run_benchmark
from dino_sparo.cli.common import add_output_json, run_program
from dino_sparo.runtime import NATIVE_BF16_CPU_FLAGS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-bench",
        description="Time full DINO training steps (forward, backward, optimiser, EMA) of ours against a "
                    "reference step written as DINO v1's code, on identical data and threads, at the same "
                    "precision unless --reference-precision says otherwise.",
        epilog="Example (the CPU figure of BENCHMARKS.md):\n  dino-sparo-bench --arch vit_small --patch-size 16 "
               "--batch 16 --global-crops 2 --local-crops 6 --steps 5 --warmup 2 --output-json bench.json\n\n"
               "The data pipeline (DINO's multi-crop augmentation, per CPU core): dino-sparo-bench loader --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default="vit_small", choices=ARCH_CHOICES, help="ViT size")
    parser.add_argument("--patch-size", type=int, default=16, help="patch size in pixels")
    parser.add_argument("--readout", default="sparo", choices=["sparo", "cls"],
                        help="our read-out (the reference always reads the class token after all blocks)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (each with all its crops)")
    parser.add_argument("--global-crops", type=int, default=2, help="global crops per image (DINO: 2)")
    parser.add_argument("--local-crops", type=int, default=6, help="local crops per image (DINO: 8 or 10)")
    parser.add_argument("--global-size", type=int, default=224, help="global crop side in pixels")
    parser.add_argument("--local-size", type=int, default=96, help="local crop side in pixels")
    parser.add_argument("--out-dim", type=int, default=65536, help="DINO head prototypes (DINO: 65536)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (more with --compile)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast dtype of both steps; auto = bf16 on a GPU and on a CPU with native bf16 "
                             f"({' or '.join(NATIVE_BF16_CPU_FLAGS)}), fp32 on other CPUs (as training's "
                             "precision: auto)")
    parser.add_argument("--reference-precision", default="same", choices=["same", "fp32", "bf16", "fp16"],
                        help="the reference step's autocast dtype (same: --precision's). DINO v1's autocast "
                             "is CUDA-only, so on CPU its code runs fp32 whatever ours uses")
    parser.add_argument("--attn-backend", default="auto", choices=["auto", "xformers", "sdpa", "math"],
                        help="our attention kernel (the reference always uses explicit softmax attention)")
    parser.add_argument("--pack-crops", action="store_true",
                        help="ours: all crop sizes in one forward (needs xformers on a GPU)")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the student")
    parser.add_argument("--grad-checkpointing", action="store_true", help="ours: recompute blocks in backward")
    parser.add_argument("--fused", default="auto", choices=["auto", "on", "off"],
                        help="ours: fused AdamW (auto = where it is faster: GPU and CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each step (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the crops")
    parser.add_argument("--matmul-size", type=int, default=0,
                        help="side of the square matmul timed for the peak (0: 8192 on GPU, 2048 on CPU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training-config key of our step (repeatable), e.g. --set model.depth=5; default: none")
    parser.add_argument("--reference-set", action="append", default=[], metavar="KEY=VALUE",
                        help="make the second step ours too, with these keys changed on top of --set (repeatable), "
                             "e.g. --set ibot.loss_weight=1 --reference-set ibot.loss_weight=0 times iBOT's cost; "
                             "default: none (the second step is DINO v1's)")
    add_output_json(parser, help="also write the figures here as JSON (atomically)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` does with parsed options: measure, print the report; returns the figures."""
    figures = run_benchmark(args, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_report(figures))
    return figures


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loader"]:
        from dino_sparo.cli.bench_loader import main as loader_main  # noqa: PLC0415

        return loader_main(argv[1:])
    args = build_parser().parse_args(argv)
    run_program("dino-sparo-bench", lambda: run(args))


if __name__ == "__main__":
    main()
