"""A controlled comparison: DINO with a class-token read-out vs a SPARO read-out, several seeds.

Both arms start from the same config (the Fashion-MNIST demo by default) and differ only in
``model.readout`` (the SPARO arm drops its last block, ``reduce_depth: 1``, so the read-out takes
that block's place and parameter counts stay comparable). Every run writes one JSON; the summary
(mean ± sample std over seeds) is rebuilt from those files, so an interrupted study resumes by
skipping the runs that already have their JSON.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence
from dino_sparo.errors import UsageError

logger = logging.getLogger("dino_sparo.study")

ARMS: dict[str, list[str]] = {
    "cls": ["model.readout=cls", "model.reduce_depth=0"],
    "sparo": ["model.readout=sparo", "model.reduce_depth=1"],
}

# the metrics aggregated over seeds (dotted paths into a run's JSON)
METRICS: tuple[str, ...] = ("knn_top1", "linear_top1", "selected_knn_top1", "num_selected_slots",
                            "backbone_params", "train_seconds", "init_knn_top1", "init_linear_top1",
                            "knn_gain", "linear_gain")


@dataclass(frozen=True)
class Budget:
    """What one run may spend: training overrides applied to the base config, and evaluation sizes."""

    train_overrides: list[str] = field(default_factory=list)
    knn_train_limit: Optional[int] = None  # k-NN memory / probe train images (class-balanced); None = all 60k
    test_limit: Optional[int] = None  # test images; None = all 10k
    linear_epochs: int = 100
    linear_lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)  # base lrs (× batch/256), chosen on 10% held-out train rows
    linear_batch_size: int = 256
    eval_batch_size: int = 500


BUDGETS: dict[str, Budget] = {
    # a few steps, to check the whole pipeline
    "smoke": Budget(["optim.epochs=1", "optim.warmup_epochs=0", "optim.freeze_last_layer=0", "data.limit=256",
                     "data.batch_size_per_gpu=64", "max_steps=2", "log_every=1", "data.num_workers=0"],
                    knn_train_limit=400, test_limit=200, linear_epochs=2),
    # fits six runs in about 40 minutes on two shared CPU cores: 3 full epochs of 960 images
    "cpu": Budget(["optim.epochs=3", "optim.warmup_epochs=1", "optim.freeze_last_layer=1", "data.limit=960",
                   "data.batch_size_per_gpu=64", "log_every=5", "data.num_workers=1"],
                  knn_train_limit=6000, test_limit=2000, linear_epochs=30),
    # the same schedule on 3× the images (3× the steps): does the gap move with training? (~25 min per pair)
    "cpu3x": Budget(["optim.epochs=3", "optim.warmup_epochs=1", "optim.freeze_last_layer=1", "data.limit=2880",
                     "data.batch_size_per_gpu=64", "log_every=5", "data.num_workers=1"],
                    knn_train_limit=6000, test_limit=2000, linear_epochs=30),
    # the demo config's own schedule and full evaluation (60k train / 10k test images)
    "demo": Budget([], knn_train_limit=None, test_limit=None, linear_epochs=100),
    # the same for any base config: its own schedule (e.g. configs/dino/fashion_mnist_sparo.yaml), full evaluation
    "recipe": Budget([], knn_train_limit=None, test_limit=None, linear_epochs=100),
}


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_seed{seed}"


def run_overrides(arm: str, seed: int, budget: Budget, output_dir: Path) -> list[str]:
    """The config overrides of one run, in the order they are applied (later wins)."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {sorted(ARMS)}, got {arm!r}")
    return [*budget.train_overrides, *ARMS[arm], f"seed={seed}", f"output_dir={output_dir}"]


def run_one(config: str | Path, arm: str, seed: int, budget: Budget, output_dir: Path,
            device: str = "cpu") -> dict[str, Any]:
    """Train one arm/seed (resuming if interrupted), then evaluate its teacher: k-NN (k = 20),
    k-NN on greedily selected slots (SPARO only; chosen on held-out train rows), linear probe. A stop
    request during training (Ctrl-C, SIGTERM) returns only ``stopped_by``: a half-trained teacher is
    not evaluated."""
    from dino_sparo.config import load_config  # noqa: PLC0415  (heavy imports only when running)
    from dino_sparo.evaluation.api import knn_from_checkpoint, linear_from_checkpoint  # noqa: PLC0415
    from dino_sparo.models.vit import count_parameters  # noqa: PLC0415
    from dino_sparo.models.build import build_backbone  # noqa: PLC0415
    from dino_sparo.train import train  # noqa: PLC0415

    overrides = run_overrides(arm, seed, budget, output_dir)
    cfg = load_config(config, overrides + [f"device={device}"])
    params = count_parameters(build_backbone(cfg.model))
    logger.info("%s seed %d: backbone %d parameters; training into %s", arm, seed, params, output_dir)
    t0 = time.perf_counter()
    stopped_by = train(cfg).get("stopped_by")
    if stopped_by:
        return {"stopped_by": stopped_by}
    train_s = time.perf_counter() - t0
    checkpoint = output_dir / "checkpoint.pth"
    common = dict(train_limit=budget.knn_train_limit, test_limit=budget.test_limit, device=device,
                  num_workers=0, progress=False)
    t1 = time.perf_counter()
    knn = knn_from_checkpoint(checkpoint, ks=(20,), temperature=0.07, batch_size=budget.eval_batch_size,
                              select_slots=arm == "sparo", **common)
    linear = linear_from_checkpoint(checkpoint, epochs=budget.linear_epochs, lrs=budget.linear_lrs,
                                    batch_size=budget.linear_batch_size, val_fraction=0.1,
                                    extract_batch_size=budget.eval_batch_size, seed=seed, **common)
    eval_s = time.perf_counter() - t1
    selection = knn.get("slot_selection")
    init = run_baseline("init", arm, seed, budget, output_dir, device)  # this seed's network before training
    return {
        "arm": arm, "seed": seed, "config": str(config), "overrides": overrides,
        "backbone_params": params, "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "knn_top1": knn["knn"]["20"]["top1"],
        "knn_features": knn["features"], "knn_num_train": knn["num_train"], "knn_num_test": knn["num_test"],
        "selected_knn_top1": selection["knn"]["20"]["top1"] if selection else None,
        "selected_slots": selection["selected"] if selection else None,
        "num_selected_slots": len(selection["selected"]) if selection else None,
        "linear_top1": linear["test_top1"], "linear_features": linear["features"],
        "linear_epochs": budget.linear_epochs, "linear_selected": linear["selected"],
        "init_knn_top1": init["knn_top1"], "init_linear_top1": init["linear_top1"],
        "knn_gain": knn["knn"]["20"]["top1"] - init["knn_top1"],  # what training adds
        "linear_gain": linear["test_top1"] - init["linear_top1"],
        "checkpoint": str(checkpoint),
    }


def run_baseline(kind: str, arm: str, seed: int, budget: Budget, output_dir: Path,
                 device: str = "cpu") -> dict[str, Any]:
    """The same evaluation of a reference without DINO training: ``init`` (the arm's network at
    initialisation, from its run's config) or ``pixels`` (raw pixels; no network, no linear grid change)."""
    from dino_sparo.evaluation.api import knn_from_checkpoint, linear_from_checkpoint  # noqa: PLC0415

    checkpoint = output_dir / "checkpoint.pth"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"baseline {kind!r} of arm {arm!r} needs the run's checkpoint for its config: {checkpoint}")
    common = dict(baseline=kind, train_limit=budget.knn_train_limit, test_limit=budget.test_limit, device=device,
                  num_workers=0, progress=False)
    knn = knn_from_checkpoint(checkpoint, ks=(20,), temperature=0.07, batch_size=budget.eval_batch_size,
                              cache_dir=None, **common)
    linear = linear_from_checkpoint(checkpoint, epochs=budget.linear_epochs, lrs=budget.linear_lrs,
                                    batch_size=budget.linear_batch_size, val_fraction=0.1, cache_dir=None,
                                    extract_batch_size=budget.eval_batch_size, seed=seed, **common)
    return {"baseline": kind, "arm": arm if kind == "init" else None, "seed": seed,
            "knn_top1": knn["knn"]["20"]["top1"], "knn_features": knn["features"],
            "linear_top1": linear["test_top1"], "linear_features": linear["features"],
            "linear_selected": linear["selected"]}


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def aggregate(runs: Iterable[dict[str, Any]], metrics: Sequence[str] = METRICS) -> dict[str, dict[str, Any]]:
    """Per arm, per metric: mean ± std over the runs (runs missing a metric, or with None, are left out)."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    summary: dict[str, dict[str, Any]] = {}
    for arm, arm_runs in sorted(by_arm.items()):
        summary[arm] = {"seeds": sorted(r["seed"] for r in arm_runs)}
        for metric in metrics:
            values = [float(r[metric]) for r in arm_runs if r.get(metric) is not None]
            if values:
                summary[arm][metric] = mean_std(values)
    return summary


def load_runs(folder: str | Path) -> list[dict[str, Any]]:
    """Every per-run JSON in ``folder/runs``."""
    return [json.loads(p.read_text()) for p in sorted((Path(folder) / "runs").glob("*.json"))]


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: per arm, mean ± std in percent over the seeds."""
    def cell(entry: Optional[dict[str, Any]], percent: bool = True, digits: int = 2) -> str:
        if not entry:
            return "—"
        scale = 100.0 if percent else 1.0
        return f"{scale * entry['mean']:.{digits}f} ± {scale * entry['std']:.{digits}f}"

    lines = ["| read-out | seeds | backbone params | k-NN top-1 (k=20) | linear top-1 | k-NN, selected slots | slots kept |",
             "|---|---|---|---|---|---|---|"]
    for arm, entry in summary.items():
        params = entry.get("backbone_params")
        lines.append(
            f"| {arm} | {len(entry['seeds'])} | {int(params['mean']):,} | {cell(entry.get('knn_top1'))} | "
            f"{cell(entry.get('linear_top1'))} | {cell(entry.get('selected_knn_top1'))} | "
            f"{cell(entry.get('num_selected_slots'), percent=False, digits=1)} |"
            if params else f"| {arm} | {len(entry['seeds'])} | — | — | — | — | — |")
    if any(entry.get("knn_gain") for entry in summary.values()):
        lines += ["", "What training adds (trained − the same seed's network at initialisation, points):", "",
                  "| read-out | k-NN at init | k-NN gain | linear at init | linear gain |", "|---|---|---|---|---|"]
        for arm, entry in summary.items():
            lines.append(f"| {arm} | {cell(entry.get('init_knn_top1'))} | {cell(entry.get('knn_gain'))} | "
                         f"{cell(entry.get('init_linear_top1'))} | {cell(entry.get('linear_gain'))} |")
    return "\n".join(lines)


def format_runs(runs: Sequence[dict[str, Any]]) -> str:
    """A Markdown table with one row per run (arm, then seed): trained, at initialisation, the gain."""
    def pct(value: Optional[float]) -> str:
        return "—" if value is None else f"{100 * value:.2f}"

    def gain(value: Optional[float]) -> str:
        return "—" if value is None else f"{100 * value:+.2f}"

    lines = ["| run | k-NN (k=20) | at init | gain | linear | at init | gain | selected-slot k-NN (slots kept) |",
             "|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r["arm"], r["seed"])):
        selected = run.get("selected_knn_top1")
        lines.append(f"| {run['arm']}, seed {run['seed']} | {pct(run.get('knn_top1'))} | {pct(run.get('init_knn_top1'))} | "
                     f"{gain(run.get('knn_gain'))} | {pct(run.get('linear_top1'))} | "
                     f"{pct(run.get('init_linear_top1'))} | {gain(run.get('linear_gain'))} | "
                     + (f"{pct(selected)} ({run.get('num_selected_slots')}) |" if selected is not None else "— |"))
    return "\n".join(lines)


COMPARED: tuple[str, ...] = ("knn_top1", "knn_gain", "linear_top1", "linear_gain")


def compare(summary: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm both studies ran, per metric of ``COMPARED``: the difference of the means (this study
    minus ``other``) and its standard error, sqrt(s1²/n1 + s2²/n2) (each study's seeds independent)."""
    result: dict[str, dict[str, Any]] = {}
    for arm in sorted(set(summary) & set(other)):
        result[arm] = {}
        for metric in COMPARED:
            a, b = summary[arm].get(metric), other[arm].get(metric)
            if a and b:
                error = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
                result[arm][metric] = {"difference": a["mean"] - b["mean"], "standard_error": error,
                                       "n": (a["n"], b["n"])}
    return result


def format_comparison(differences: dict[str, dict[str, Any]], other_name: str) -> str:
    """The differences of :func:`compare` as a Markdown table, in points."""
    lines = [f"This study minus {other_name} (difference of the means ± its standard error, points):", "",
             "| read-out | seeds | k-NN | k-NN gain | linear | linear gain |", "|---|---|---|---|---|---|"]
    for arm, metrics in differences.items():
        cells = [f"{100 * m['difference']:+.2f} ± {100 * m['standard_error']:.2f}" if (m := metrics.get(k)) else "—"
                 for k in COMPARED]
        seeds = next(iter(metrics.values()))["n"] if metrics else ("—", "—")
        lines.append(f"| {arm} | {seeds[0]} vs {seeds[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_pending(results: Path, seeds: Sequence[int], arms: Sequence[str], run: Callable[[str, int], dict[str, Any]],
                done: Callable[[dict[str, Any]], None]) -> Optional[dict[str, Any]]:
    """Every arm × seed without its JSON in ``results/runs`` (seed-major, so partial results stay
    balanced): ``run(arm, seed)``, its JSON written atomically, then ``done(run)``. A run stopped by a
    signal ends the loop there and is returned (no JSON); None when every run is done."""
    for seed in seeds:
        for arm in arms:
            path = results / "runs" / f"{run_name(arm, seed)}.json"
            if path.exists():
                logger.info("%s: done, skipping", path)
                continue
            entry = run(arm, seed)
            if "stopped_by" in entry:
                logger.info("%s seed %d stopped; re-run the same command to resume it", arm, seed)
                return entry
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entry, indent=2))
            tmp.replace(path)
            done(entry)
    return None


def run_study(config: str | Path, seeds: Sequence[int], budget_name: str, results_dir: str | Path,
              output_dir: str | Path, arms: Sequence[str] = tuple(ARMS), device: str = "cpu",
              baselines: bool = False, compare_with: Optional[str | Path] = None) -> dict[str, Any]:
    """Every arm × seed not yet done (seed-major, so partial results stay balanced), then the summary;
    with ``baselines`` also raw pixels and each arm at initialisation (first seed), same protocol.
    A run stopped by a signal ends the study there, with only ``stopped_by`` returned."""
    if budget_name not in BUDGETS:
        raise UsageError(f"--budget must be one of {sorted(BUDGETS)}, got {budget_name!r}")
    budget = BUDGETS[budget_name]
    results = Path(results_dir) / budget_name
    if compare_with is not None:
        comparison_folder(compare_with, budget_name)  # checked before hours of training, not after
    (results / "runs").mkdir(parents=True, exist_ok=True)
    check_base_config(config, results)

    def done(run: dict[str, Any]) -> None:
        logger.info("%s seed %d: k-NN %.4f, linear %.4f, selected-slot k-NN %s", run["arm"], run["seed"],
                    run["knn_top1"], run["linear_top1"], run["selected_knn_top1"])
        write_summary(results, budget_name, config)

    stopped = run_pending(results, seeds, arms, lambda arm, seed: run_one(
        config, arm, seed, budget, Path(output_dir) / budget_name / run_name(arm, seed), device), done)
    if stopped is not None:
        return stopped
    if baselines:
        (results / "baselines").mkdir(exist_ok=True)
        todo = [("pixels", arms[0])] + [("init", arm) for arm in arms]
        for kind, arm in todo:
            name = "pixels" if kind == "pixels" else f"init_{arm}"
            path = results / "baselines" / f"{name}.json"
            if path.exists():
                continue
            entry = run_baseline(kind, arm, seeds[0], budget, Path(output_dir) / budget_name / run_name(arm, seeds[0]),
                                 device)
            path.write_text(json.dumps(entry, indent=2))
            logger.info("baseline %s: k-NN %.4f, linear %.4f", name, entry["knn_top1"], entry["linear_top1"])
    return write_summary(results, budget_name, config, compare_with)


def check_base_config(config: str | Path, results: Path) -> Path:
    """Keep a copy of the base config beside the results (``base_config.yaml``) and refuse to add
    runs from a different base: every arm and seed of one study must start from the same file, even
    when the file it was read from is edited later (re-run with ``--config`` on the copy)."""
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"base config not found: {config}")
    snapshot = results / "base_config.yaml"
    text = config.read_text()
    if not snapshot.exists():
        snapshot.write_text(text)
    elif config.resolve() != snapshot.resolve() and snapshot.read_text() != text:
        raise ValueError(f"{config} differs from the base config of the runs already in {results} "
                         f"(kept in {snapshot}): pass --config {snapshot} to continue this study, or a new "
                         "--results-dir for a study on the changed config")
    return snapshot


def comparison_folder(compare_with: str | Path, budget_name: str) -> Path:
    """The folder of another study's runs at this budget (``--compare-with``), or a one-line error."""
    other = Path(compare_with) / budget_name
    if not (other / "runs").is_dir():
        raise UsageError(f"--compare-with {compare_with}: no study of budget {budget_name!r} there ({other}/runs)")
    return other


def write_summary(results: Path, budget_name: str, config: str | Path,
                  compare_with: Optional[str | Path] = None) -> dict[str, Any]:
    """``summary.json`` and ``summary.md`` (the mean ± std table, one row per run, and with
    ``compare_with``, another study's results folder of the same budget, the differences) from the
    per-run JSONs."""
    runs = load_runs(results)
    summary = aggregate(runs)
    budget = BUDGETS.get(budget_name)
    baselines = {p.stem: json.loads(p.read_text()) for p in sorted((results / "baselines").glob("*.json"))}
    payload = {"budget": budget_name, "config": str(config),
               "budget_detail": asdict(budget) if budget else None, "arms": summary, "baselines": baselines}
    text = [format_summary(summary), "", "One row per run (points):", "", format_runs(runs)]
    if compare_with is not None:
        other = comparison_folder(compare_with, budget_name)
        payload["compared_with"] = {"results": str(compare_with),
                                    "differences": compare(summary, aggregate(load_runs(other)))}
        text += ["", format_comparison(payload["compared_with"]["differences"], str(compare_with))]
    (results / "summary.json").write_text(json.dumps(payload, indent=2))
    (results / "summary.md").write_text("\n".join(text) + "\n")
    return payload
