"""Training curves from ``log.jsonl`` files: one panel per metric, one line per run, one PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

# metrics drawn when present, in this order (DINO's, then CLIP's); then every evaluation metric
DEFAULT_METRICS: tuple[str, ...] = ("loss", "lr", "teacher_entropy", "teacher_mean_entropy", "kl_teacher_student",
                                    "logit_scale", "positive_cosine")
EVAL_PREFIXES: tuple[str, ...] = ("knn", "zeroshot")  # k-NN and zero-shot accuracy during training


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The JSON rows of one ``log.jsonl`` (a folder means its ``log.jsonl``); blank lines skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not a JSON object: {exc}") from exc
    return rows


def metrics_in(logs: Sequence[list[dict[str, Any]]], metrics: Optional[Sequence[str]] = None) -> list[str]:
    """The metrics to draw: those asked for (or the defaults, then every ``knn*`` and ``zeroshot*``
    key) that some row holds."""
    present = {k for rows in logs for row in rows for k, v in row.items() if isinstance(v, (int, float))}
    wanted = list(metrics) if metrics else list(DEFAULT_METRICS) + sorted(k for k in present
                                                                           if k.startswith(EVAL_PREFIXES))
    return [m for m in wanted if m in present]


def plot_training_logs(paths: Sequence[str | Path], output: str | Path, labels: Optional[Sequence[str]] = None,
                       metrics: Optional[Sequence[str]] = None, title: str = "") -> list[str]:
    """One PNG with a panel per metric (x: step) and a line per log; returns the metrics drawn."""
    from dino_sparo.visualize import _pyplot, _save  # noqa: PLC0415

    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} logs")
    logs = [read_log(p) for p in paths]
    names = list(labels) if labels is not None else [Path(p).name if Path(p).is_dir() else Path(p).parent.name
                                                      for p in paths]
    drawn = metrics_in(logs, metrics)
    if not drawn:
        raise ValueError(f"none of the metrics {list(metrics or DEFAULT_METRICS)} is in the logs {list(map(str, paths))}")
    plt = _pyplot()
    cols = min(3, len(drawn))
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.5 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, drawn):
        for name, log in zip(names, logs):
            points = [(r["step"], r[metric]) for r in log if isinstance(r.get(metric), (int, float)) and "step" in r]
            if points:
                ax.plot(*zip(*points), label=name, linewidth=1.0)
        ax.set_title(metric, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, output, dpi=90)
    return drawn
