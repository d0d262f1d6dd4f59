"""A controlled comparison on the scene world: CLIP with class-token / end-of-text read-outs vs SPARO
on both towers, several seeds, each run also measured at initialisation.

Both arms start from one base config (``configs/clip/scenes_sparo.yaml`` by default) and differ
only in ``model.readout`` (the text read-out follows it; SPARO replaces the last block of each
tower, the plain-CLIP arm projects its token to ``clip.embed_dim``). Every run writes one JSON of
flat metrics (trained, at initialisation, and their difference); the summary (mean ± sample std
over seeds) is rebuilt from those files, so an interrupted study resumes by skipping finished runs.
The bag-of-words text-only baseline depends on the world only and is measured once per study.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from dino_sparo.data.scenes import KINDS, ZEROSHOT_TASKS
from dino_sparo.study import aggregate, check_base_config, load_runs, run_name, run_pending

logger = logging.getLogger("dino_sparo.clip_study")

ARMS: dict[str, list[str]] = {"cls": ["model.readout=cls"], "sparo": ["model.readout=sparo"]}
SPLITS = ("test", "heldout")


def flat_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of :func:`~dino_sparo.evaluation.scene_eval.evaluate_scenes` as flat keys
    (``zeroshot_shape``, ``test_replace_obj``, ``heldout_micro``, ``i2t_r1``, ``slot_ari``, …)."""
    out = {f"{prefix}zeroshot_{task}": result["zeroshot"][task]["top1"] for task in ZEROSHOT_TASKS}
    r = result["retrieval"]
    for short, key in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
        out[f"{prefix}{short}_r1"], out[f"{prefix}{short}_r5"] = r[f"{key}_R@1"], r[f"{key}_R@5"]
    for split, sc in result["sugarcrepe"].items():
        for kind, cat in sc["per_category"].items():
            out[f"{prefix}{split}_{kind}"] = cat["accuracy"]
        out[f"{prefix}{split}_micro"] = sc["micro_average"]
        if "slot_selection" in sc:
            out[f"{prefix}{split}_micro_selected"] = sc["slot_selection"]["micro_selected"]
            out[f"{prefix}{split}_micro_all_on_same_items"] = sc["slot_selection"]["micro_all"]
    if "slot_objects" in result:
        o = result["slot_objects"]
        out.update({f"{prefix}slot_best_object_share": o["mean_best_object_share"],
                    f"{prefix}slot_background_share": o["mean_background_share"],
                    f"{prefix}slot_ari": o["ari"], f"{prefix}slot_foreground_ari": o["foreground_ari"]})
    return out


def run_one(config: str | Path, arm: str, seed: int, output_dir: Path, overrides: Sequence[str] = (),
            count: int = 1000, device: str = "cpu") -> dict[str, Any]:
    """Train one arm and seed (resuming if interrupted), then measure it and the same seed's model at
    initialisation on the scene world. A stop request during training returns only ``stopped_by``."""
    from dino_sparo.config import load_config  # noqa: PLC0415  (heavy imports only when running)
    from dino_sparo.evaluation.scene_eval import evaluate_scenes, load_scene_run  # noqa: PLC0415
    from dino_sparo.models.vit import count_parameters  # noqa: PLC0415
    from dino_sparo.train import train  # noqa: PLC0415

    if arm not in ARMS:
        raise ValueError(f"arm must be one of {sorted(ARMS)}, got {arm!r}")
    run_overrides = [*overrides, *ARMS[arm], f"seed={seed}", f"output_dir={output_dir}", f"device={device}"]
    cfg = load_config(config, run_overrides)
    start = time.perf_counter()
    stopped_by = train(cfg).get("stopped_by")
    if stopped_by:
        return {"stopped_by": stopped_by}
    train_s = time.perf_counter() - start
    run = load_scene_run(output_dir / "checkpoint.pth", device, with_initial=True)
    trained, initial, tokenizer, world, transform = (run[k] for k in ("model", "initial", "tokenizer", "world",
                                                                      "transform"))
    sparo = trained.slot_layout() is not None
    t1 = time.perf_counter()
    results = {name: evaluate_scenes(model, tokenizer, world, transform, count=count, splits=SPLITS,
                                     select_slots=sparo and name == "trained", seed=seed, device=device)
               for name, model in (("trained", trained), ("init", initial))}
    trained_metrics, init_metrics = flat_metrics(results["trained"]), flat_metrics(results["init"])
    gains = {f"gain_{k}": v - init_metrics[k] for k, v in trained_metrics.items() if k in init_metrics}
    return {"arm": arm, "seed": seed, "config": str(config), "overrides": run_overrides,
            "params": count_parameters(trained), "train_seconds": round(train_s, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1), "world": results["trained"]["world"],
            **trained_metrics, **{f"init_{k}": v for k, v in init_metrics.items()}, **gains,
            "details": results}


def metric_names(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Every numeric key of the runs (the flat metrics), in first-seen order."""
    names: dict[str, None] = {}
    for run in runs:
        for key, value in run.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
                names.setdefault(key, None)
    return list(names)


def format_summary(summary: dict[str, dict[str, Any]], text_only: Optional[dict[str, dict[str, float]]] = None
                   ) -> str:
    """Markdown: per arm, mean ± std over the seeds in percent, trained and at initialisation."""
    arms = list(summary)

    def cell(arm: str, key: str) -> str:
        entry = summary[arm].get(key)
        return "—" if not entry else f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"

    header = "| measure | " + " | ".join(f"{a} (n={len(summary[a]['seeds'])}) | {a} at init" for a in arms)
    if text_only:
        header += " | text-only"
    lines = [header + " |", "|---" * (1 + 2 * len(arms) + (1 if text_only else 0)) + "|"]
    rows = [(f"zero-shot {t}", f"zeroshot_{t}") for t in ZEROSHOT_TASKS]
    rows += [("image→text R@1", "i2t_r1"), ("image→text R@5", "i2t_r5"), ("text→image R@1", "t2i_r1"),
             ("text→image R@5", "t2i_r5")]
    rows += [(f"{split} {kind}", f"{split}_{kind}") for split in SPLITS for kind in (*KINDS, "micro")]
    rows += [(f"{split} micro, selected slots (other half)", f"{split}_micro_selected") for split in SPLITS]
    rows += [(f"{split} micro, all slots (same half)", f"{split}_micro_all_on_same_items") for split in SPLITS]
    rows += [("slot share on best object", "slot_best_object_share"), ("slot ARI", "slot_ari"),
             ("slot foreground ARI", "slot_foreground_ari")]
    for label, key in rows:
        if not any(summary[a].get(key) or summary[a].get(f"init_{key}") for a in arms):
            continue
        line = f"| {label} | " + " | ".join(f"{cell(a, key)} | {cell(a, 'init_' + key)}" for a in arms)
        if text_only:
            split, _, kind = key.partition("_")
            value = text_only.get(split, {}).get(kind)
            line += f" | {100 * value:.1f}" if value is not None else " | "
        lines.append(line + " |")
    return "\n".join(lines)


def write_summary(results: Path, config: str | Path) -> dict[str, Any]:
    """``summary.json`` and ``summary.md`` from the per-run JSONs (and the text-only baseline)."""
    runs = load_runs(results)
    summary = aggregate(runs, metric_names(runs))
    text_path = results / "text_only.json"
    text_only = json.loads(text_path.read_text()) if text_path.exists() else None
    payload = {"config": str(config), "arms": summary, "text_only": text_only}
    (results / "summary.json").write_text(json.dumps(payload, indent=2))
    (results / "summary.md").write_text(format_summary(summary, text_only) + "\n")
    return payload


def run_study(config: str | Path, seeds: Sequence[int], results_dir: str | Path, output_dir: str | Path,
              arms: Sequence[str] = tuple(ARMS), overrides: Sequence[str] = (), count: int = 1000,
              device: str = "cpu") -> dict[str, Any]:
    """Every arm × seed not yet done (seed-major), the text-only baseline once, then the summary. A
    run stopped by a signal ends the study there, with only ``stopped_by`` returned."""
    from dino_sparo.config import load_config  # noqa: PLC0415
    from dino_sparo.data.scenes import world_of  # noqa: PLC0415
    from dino_sparo.evaluation.scene_eval import text_only_baseline  # noqa: PLC0415

    results = Path(results_dir)
    (results / "runs").mkdir(parents=True, exist_ok=True)
    check_base_config(config, results)
    text_path = results / "text_only.json"
    if not text_path.exists():
        world = world_of(load_config(config, list(overrides)).data.scenes)
        text_path.write_text(json.dumps(text_only_baseline(world, count, SPLITS), indent=2))

    def done(run: dict[str, Any]) -> None:
        logger.info("%s seed %d: test micro %.4f (init %.4f), replace_obj %.4f, swap_att %.4f", run["arm"],
                    run["seed"], run["test_micro"], run["init_test_micro"], run["test_replace_obj"], run["test_swap_att"])
        write_summary(results, config)

    stopped = run_pending(results, seeds, arms, lambda arm, seed: run_one(
        config, arm, seed, Path(output_dir) / run_name(arm, seed), overrides, count, device), done)
    return stopped if stopped is not None else write_summary(results, config)
