"""``python tools/clip_study.py``: the CLIP cls-vs-SPARO study on the scene world (the study:
:mod:`dino_sparo.clip_study`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from dino_sparo.cli.common import HelpFormatter, run_program
from dino_sparo.runtime import setup_logging


def build_parser() -> argparse.ArgumentParser:
    from dino_sparo.clip_study import ARMS  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python tools/clip_study.py", formatter_class=HelpFormatter,
        description="CLIP with class-token / end-of-text read-outs vs SPARO on both towers, on the scene world: "
                    "several seeds, the same config and steps; zero-shot, retrieval and SugarCrepe-style accuracy "
                    "of each trained run and of the same seed at initialisation, mean ± std over seeds, and a "
                    "bag-of-words text-only baseline. Re-running skips finished runs and resumes a stopped one.",
        epilog="Example: python tools/clip_study.py --seeds 0 1 2 --results-dir results/clip_study/demo_world")
    parser.add_argument("--config", default="configs/clip/scenes_sparo.yaml",
                        help="base config both arms start from (kept beside the results; a study refuses another)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="changes to the base config for every run (the world: data.scenes.*, the schedule: optim.*)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per arm (3 or more for a std)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="which read-outs to run")
    parser.add_argument("--count", type=int, default=1000,
                        help="scenes per measure and items per hard-negative kind, per split")
    parser.add_argument("--results-dir", default="results/clip_study", help="per-run JSONs and the summary go here")
    parser.add_argument("--output-dir", default="output/clip_study", help="checkpoints and training logs go here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where runs train and are measured")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the summary from the run JSONs")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_program("python tools/clip_study.py", lambda: run(args))


def run(args: Any) -> dict[str, Any]:
    """What ``main`` does with parsed options; a stopped run's payload has ``stopped_by`` (no summary)."""
    from dino_sparo.clip_study import format_summary, run_study, write_summary  # noqa: PLC0415

    if args.summary_only:
        payload = write_summary(Path(args.results_dir), args.config)
    else:
        from dino_sparo.runtime import set_threads  # noqa: PLC0415

        if args.threads:
            set_threads(args.threads)
        payload = run_study(args.config, args.seeds, args.results_dir, args.output_dir, args.arms, args.overrides,
                            args.count, args.device)
        if "stopped_by" in payload:  # no JSON for the stopped run; the exit status says which signal
            return payload
    print(format_summary(payload["arms"], payload.get("text_only")))
    return payload


if __name__ == "__main__":
    main()
