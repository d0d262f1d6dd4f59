"""``dino-sparo-scenes``: the procedural scene world from the command line. ``export`` writes it as
real data comes (PNGs, a caption table, SugarCrepe's seven JSON files), ``show`` draws scenes with
their captions and hard negatives, ``evaluate`` measures a CLIP checkpoint on the world, ``bench``
times its generation. The work is in :mod:`dino_sparo.data.scenes`, :mod:`dino_sparo.data.scenes_export`
and :mod:`dino_sparo.evaluation.scene_eval`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional

from dino_sparo.cli.common import HelpFormatter, add_output_json, run_program, save_output_json
from dino_sparo.errors import UsageError
from dino_sparo.runtime import setup_logging

logger = logging.getLogger(__name__)

WORLD_HELP = ("the world's settings: the data.scenes section of this training config (default: the built-in "
              "defaults; see dino-sparo-train --help-config)")


def _world_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=WORLD_HELP)
    parser.add_argument("overrides", nargs="*", metavar="data.scenes.KEY=VALUE",
                        help="changes to the world, e.g. data.scenes.objects=[2,2] data.scenes.heldout_pairs=6")
    parser.add_argument("--split", default="test", choices=["train", "test", "heldout"],
                        help="which scenes: train and test share a distribution; heldout scenes each name a "
                             "withheld colour-shape pair (needs data.scenes.heldout_pairs > 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-scenes", formatter_class=HelpFormatter,
        description="The procedural scene world: 1-4 objects (shape, colour, size, position) per scene, captions "
                    "with one spatial relation, SugarCrepe-style hard negatives of all seven kinds.",
        epilog="Examples:\n"
               "  dino-sparo-scenes show --out scenes.png\n"
               "  dino-sparo-scenes export --out /data/scenes_test --count 2000 --config configs/clip/scenes_sparo.yaml\n"
               "  dino-sparo-sugarcrepe --checkpoint CKPT --data /data/scenes_test/sugarcrepe "
               "--images /data/scenes_test/images\n"
               "  dino-sparo-scenes evaluate --checkpoint output/clip_scenes_sparo/checkpoint.pth --select-slots")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser("export", formatter_class=HelpFormatter, help="write PNGs, captions.csv and "
                                 "the seven SugarCrepe JSON files", description="Write scenes 0..COUNT-1 of a split: "
                                 "images/*.png, captions.csv (path, caption), scenes.jsonl (scene graphs), "
                                 "sugarcrepe/<kind>.json (items from those scenes).")
    export.add_argument("--out", required=True, help="folder to write into (created)")
    export.add_argument("--count", type=int, default=1000, help="scenes to write")
    export.add_argument("--grid", action="store_true", help="also draw grid.png (as 'show' does)")
    _world_options(export)
    show = commands.add_parser("show", formatter_class=HelpFormatter, help="draw scenes with captions and negatives",
                               description="One PNG of scenes, each with its caption and a hard negative.")
    show.add_argument("--out", default="scenes.png", help="the PNG to write")
    show.add_argument("--count", type=int, default=12, help="scenes to draw")
    _world_options(show)
    evaluate = commands.add_parser("evaluate", formatter_class=HelpFormatter, help="measure a CLIP checkpoint on "
                                   "the world", description="Zero-shot (shape, colour, colour+shape), retrieval, "
                                   "SugarCrepe-style accuracy on the test and heldout splits, a bag-of-words "
                                   "text-only baseline, and slots against objects, on the checkpoint's own world.")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint.pth of a CLIP run on clip.dataset: scenes")
    evaluate.add_argument("--count", type=int, default=1000,
                          help="scenes per measure (and items per hard-negative kind); more = tighter numbers")
    evaluate.add_argument("--per-slot", action="store_true", help="SugarCrepe accuracy of each slot alone (SPARO)")
    evaluate.add_argument("--select-slots", action="store_true",
                          help="choose slots greedily on a held-out part of the items, score them on the rest (SPARO)")
    evaluate.add_argument("--selection-fraction", type=float, default=0.5,
                          help="share of each kind's items the slot selection may see")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds the selection split")
    evaluate.add_argument("--no-text-baseline", action="store_true", help="skip the bag-of-words text-only row")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    add_output_json(evaluate, help="write the result here as JSON (default: scenes_eval.json beside the checkpoint)")
    bench = commands.add_parser("bench", formatter_class=HelpFormatter, help="scenes per second on one core",
                                description="Scenes per second on one core: the graph, with its picture, with a "
                                            "PIL image and a caption, and a whole CLIP training sample (the "
                                            "config's image transform and tokeniser).")
    bench.add_argument("--count", type=int, default=5000, help="scenes timed per row")
    _world_options(bench)
    return parser


def world_from_args(args: argparse.Namespace) -> Any:
    from dino_sparo.config import load_config  # noqa: PLC0415
    from dino_sparo.data.scenes import world_of  # noqa: PLC0415

    bad = [o for o in args.overrides if not o.startswith("data.scenes.")]
    if bad:
        raise UsageError(f"only data.scenes.KEY=VALUE changes the world, got {bad[0]!r}")
    return world_of(load_config(args.config, list(args.overrides)).data.scenes)


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from dino_sparo.evaluation.scene_eval import (evaluate_scenes, format_scene_table,  # noqa: PLC0415
                                                  load_scene_run, text_only_baseline)
    from dino_sparo.runtime import resolve_device  # noqa: PLC0415

    if args.count < 2:
        raise UsageError(f"--count must be at least 2, got {args.count}")
    device = resolve_device(args.device, key="--device")
    run = load_scene_run(args.checkpoint, device)
    world = run["world"]
    result = evaluate_scenes(run["model"], run["tokenizer"], world, run["transform"], count=args.count, per_slot=args.per_slot,
                             select_slots=args.select_slots, selection_fraction=args.selection_fraction,
                             seed=args.seed, device=device, progress=True)
    baseline = None if args.no_text_baseline else text_only_baseline(world, args.count)
    result["text_only"] = baseline
    result["checkpoint"] = str(args.checkpoint)
    print(format_scene_table({"trained": result}, baseline))
    save_output_json(result, args.output_json or str(Path(args.checkpoint).with_name("scenes_eval.json")))
    return result


def run(args: argparse.Namespace) -> Any:
    """What ``main`` does with parsed options."""
    from dino_sparo.data.scenes_export import export_scenes, generation_speed, scene_grid  # noqa: PLC0415

    if args.command == "evaluate":
        return run_evaluate(args)
    world = world_from_args(args)
    if args.count < 1:
        raise UsageError(f"--count must be at least 1, got {args.count}")
    if args.split == "heldout" and not world.heldout:
        raise UsageError("--split heldout needs withheld pairs: add data.scenes.heldout_pairs=N (N >= 1)")
    if args.command == "export":
        summary = export_scenes(world, args.out, args.count, args.split)
        if args.grid:
            summary["grid"] = str(scene_grid(world, Path(args.out) / "grid.png", split=args.split))
        print(json.dumps(summary, indent=2))
        return summary
    if args.command == "show":
        path = scene_grid(world, args.out, args.count, args.split)
        print(f"wrote {path}")
        return path
    from dino_sparo.config import load_config  # noqa: PLC0415
    from dino_sparo.data.transforms import clip_train_transform  # noqa: PLC0415
    from dino_sparo.models.text import Tokenizer  # noqa: PLC0415

    cfg = load_config(args.config, list(args.overrides))
    clip = cfg.clip
    transform = clip_train_transform(cfg.data.scenes.size, clip.crop_scale, clip.image_mean, clip.image_std,
                                     clip.crop_ratio)
    speeds = generation_speed(world, args.count, args.split, transform, Tokenizer(clip.context_length))
    print(f"{world!r}, {args.count} scenes of split {args.split}, one core")
    for name, per_second in speeds.items():
        print(f"  {name:<50}{per_second:>8,.0f} /s")
    return speeds


def main(argv: Optional[list[str]] = None) -> None:
    """The console script (exit statuses: :func:`~dino_sparo.cli.common.run_program`)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    run_program("dino-sparo-scenes", lambda: run(args))


if __name__ == "__main__":
    main()
