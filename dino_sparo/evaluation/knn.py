"""The k-NN protocol: DINO's weighted k-NN accuracy of a network's frozen features, with SPARO
slot subsets, per-slot accuracy and greedy slot selection, and its text table.

:func:`evaluate_knn` takes a backbone and two datasets (in-process, e.g. during training);
``evaluation.api.evaluate_checkpoint("knn", ...)`` opens a checkpoint first. Both return a
JSON-ready dict with accuracies as fractions in [0, 1]: ``result["knn"]["20"]["top1"]``. The
search itself is :mod:`dino_sparo.evaluation.knn_search`'s.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dino_sparo import distributed
from dino_sparo.data.datasets import balanced_subset_indices, num_classes_of
from dino_sparo.errors import UsageError
from dino_sparo.evaluation.feature_store import FeatureStore
from dino_sparo.evaluation.knn_search import knn_accuracy, resolve_knn_backend
from dino_sparo.evaluation.options import Extraction, FeatureOpening, SlotAnalysis
from dino_sparo.evaluation.slots import (
    SelectedSlots,
    greedy_slot_selection,
    per_slot_knn,
    plot_per_slot_accuracy,
)

logger = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def _knn_table_dict(results: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {str(k): v for k, v in sorted(results.items())}


def _balanced_rows(labels: np.ndarray, limit: Optional[int]) -> Optional[np.ndarray]:
    if limit is None or limit >= labels.size:
        return None
    return balanced_subset_indices(labels, limit)


def evaluate_knn(
    backbone: Optional[nn.Module],
    train_dataset: Dataset,
    test_dataset: Dataset,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    backend: str = "auto",
    extraction: Optional[Extraction] = None,
    slots: Optional[SlotAnalysis] = None,
    num_classes: Optional[int] = None,
) -> dict[str, Any]:
    """k-NN accuracy of ``backbone``'s features (``None``: raw pixels) of ``train_dataset`` (the
    memory) and ``test_dataset`` (the queries); datasets must carry the evaluation transform.

    DINO's protocol: cosine similarity, the k nearest train features vote with exp(sim / T).
    ``extraction`` says what to read and how (default: the embedding, no cache); ``slots`` the SPARO
    analyses: a slot subset, slots chosen by greedy selection on a held-out part of the train split
    (the test split is never shown to the selector), and slot by slot with a bar chart. The backbone
    is moved to the extraction's device and keeps its train/eval mode. Under ``torch.distributed``
    every rank calls this; extraction is sharded, the search runs on rank 0, and every rank returns
    rank 0's result.
    """
    ks = sorted({int(k) for k in ks})
    slots = slots or SlotAnalysis()
    opening = FeatureOpening(backbone, train_dataset, test_dataset, extraction or Extraction(), "embedding", slots)
    if num_classes is None:
        num_classes = num_classes_of(train_dataset)
    with opening.extract() as stores:
        result = None
        if distributed.get_rank() == 0:
            start = time.perf_counter()
            result = _knn_on_features(stores["train"], stores["test"], num_classes, ks, temperature, backend,
                                      opening.layout, slots, opening.device, opening.extraction.progress)
            result.update(opening.describe(stores))
            result["seconds"] = {"features": round(opening.seconds, 3), "knn": round(time.perf_counter() - start, 3)}
        result = distributed.broadcast_object(result)
    return result


def _knn_on_features(train: FeatureStore, test: FeatureStore, num_classes: int, ks: list[int], temperature: float,
                     backend: str, layout: Optional[tuple[int, int, str]], slots: SlotAnalysis, device: torch.device,
                     progress: bool) -> dict[str, Any]:
    """Everything after extraction; rank 0 only."""
    if ks[-1] > len(train):
        raise UsageError(f"k={ks[-1]} exceeds the {len(train)} train images: lower --ks or raise --train-limit")
    name = resolve_knn_backend(backend)
    knn_device = device if name == "torch" else None

    def evaluate(train_x: Any, test_x: Any) -> dict[str, dict[str, float]]:
        return _knn_table_dict(knn_accuracy(train_x, train.labels, test_x, test.labels, num_classes, ks,
                                            temperature, backend=name, device=knn_device, progress=progress))

    result: dict[str, Any] = {
        "num_train": len(train), "num_test": len(test), "num_classes": num_classes,
        "ks": ks, "temperature": temperature, "backend": name,
        "knn": evaluate(train.features, test.features),
    }
    if layout is None:
        return result
    num_slots, slot_dim, norm = layout
    result["slot_layout"] = {"num_slots": num_slots, "slot_dim": slot_dim, "norm": norm}

    def subset(chosen: list[int]) -> dict[str, dict[str, float]]:
        return evaluate(SelectedSlots(train.features, num_slots, slot_dim, chosen, norm),
                        SelectedSlots(test.features, num_slots, slot_dim, chosen, norm))

    if slots.slots is not None:
        chosen = [int(s) for s in slots.slots]
        result["slots"] = {"slots": chosen, "knn": subset(chosen)}
    selected: list[int] = []
    if slots.select_slots:
        # only train rows reach the selector; a class-balanced subsample bounds its memory
        rows = _balanced_rows(train.labels, slots.select_samples)
        feats = train.features if rows is None else np.asarray(train.features[rows], dtype=np.float32)
        labels = train.labels if rows is None else train.labels[rows]
        selection = greedy_slot_selection(
            feats, labels, num_slots, slot_dim, val_fraction=slots.select_val_fraction,
            max_slots=slots.select_max_slots, k=slots.slot_k, temperature=temperature, num_classes=num_classes,
            device=device,
        )
        selected = selection.selected
        result["slot_selection"] = {**selection.to_dict(), "k": slots.slot_k, "num_train_used": int(labels.size),
                                    "knn": subset(selected)}
    if slots.per_slot:
        result["per_slot"] = _per_slot(train, test, num_classes, layout, slots, selected, temperature,
                                       result["knn"], device, progress)
    return result


def _per_slot(train: FeatureStore, test: FeatureStore, num_classes: int, layout: tuple[int, int, str],
              slots: SlotAnalysis, selected: list[int], temperature: float, all_slots: dict[str, Any],
              device: torch.device, progress: bool) -> dict[str, Any]:
    """k-NN accuracy of each slot alone, and its bar chart when ``slots.plot_path`` names one."""
    num_slots, slot_dim, _ = layout
    accuracy = per_slot_knn(train.features, train.labels, test.features, test.labels, num_slots, slot_dim,
                            k=min(slots.slot_k, len(train)), temperature=temperature, num_classes=num_classes,
                            device=device, progress=progress)
    entry: dict[str, Any] = {"k": slots.slot_k, "top1": [float(a) for a in accuracy]}
    if slots.plot_path is not None:
        reference = all_slots.get(str(slots.slot_k), {}).get("top1")
        entry["plot"] = str(plot_per_slot_accuracy(
            accuracy, slots.plot_path,
            title=f"k-NN top-1 of each slot alone (k={slots.slot_k}, {len(test)} test images)",
            highlight=selected or (slots.slots or ()), reference=reference,
            highlight_label="slots chosen by --select-slots" if selected else "slots of --slots",
            reference_label=f"all {num_slots} slots together"))
    return entry


# --------------------------------------------------------------------------- the table


def format_knn_table(result: dict[str, Any]) -> str:
    """The accuracies of a result as an aligned text table (percent)."""
    columns = [("all slots" if "slot_layout" in result else "all features", result["knn"])]
    if "slots" in result:
        columns.append((f"slots {_short(result['slots']['slots'])}", result["slots"]["knn"]))
    if "slot_selection" in result:
        columns.append((f"selected {_short(result['slot_selection']['selected'])}", result["slot_selection"]["knn"]))
    width = max(15, *(len(c[0]) for c in columns))
    head = f"{'':>5}  " + "  ".join(f"{c[0]:>{width}}" for c in columns)
    units = f"{'k':>5}  " + "  ".join(f"{'top-1 / top-5 %':>{width}}" for _ in columns)
    lines = [f"k-NN on {result['features']} ({result['source'] if 'source' in result else 'model'}), "
             f"{result['num_train']} train / {result['num_test']} test, T={result['temperature']}, "
             f"backend {result['backend']}",
             "accuracy in % (top-1 / top-5) for k neighbours; one column per set of features searched", head, units]
    for k in result["ks"]:
        cells = [f"{100 * c[1][str(k)]['top1']:6.2f} / {100 * c[1][str(k)]['top5']:6.2f}" for c in columns]
        lines.append(f"{k:>5}  " + "  ".join(f"{cell:>{width}}" for cell in cells))
    if "per_slot" in result:
        acc = result["per_slot"]["top1"]
        lines.append(f"per-slot top-1 (k={result['per_slot']['k']}):")
        lines.append("  slot  " + " ".join(f"{i:>5}" for i in range(len(acc))))
        lines.append("  top-1 " + " ".join(f"{100 * a:5.1f}" for a in acc) + "  (%, the slot alone)")
        if "plot" in result["per_slot"]:
            lines.append(f"  bar chart: {result['per_slot']['plot']}")
    if "slot_selection" in result:
        sel = result["slot_selection"]
        lines.append(f"greedy selection on held-out train ({sel['num_heldout']} rows, k={sel['k']}): "
                     f"{len(sel['selected'])} slots {sel['selected']}, held-out top-1 "
                     f"{100 * sel['curve'][-1]:.2f} vs {100 * sel['all_slots_accuracy']:.2f} with all slots")
    return "\n".join(lines)


def _short(slots: Sequence[int], most: int = 8) -> str:
    text = ",".join(str(s) for s in slots[:most])
    return f"[{text}{',…' if len(slots) > most else ''}]"
