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
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dino_sparo import distributed
from dino_sparo.data.datasets import balanced_subset_indices, is_grayscale, num_classes_of
from dino_sparo.errors import UsageError
from dino_sparo.evaluation.feature_kinds import FeatureSpec, resolve_spec, slot_layout
from dino_sparo.evaluation.feature_store import FeatureStore, FeatureWorkspace, extract_splits, frozen
from dino_sparo.evaluation.knn_search import knn_accuracy, resolve_knn_backend
from dino_sparo.evaluation.slots import (
    SelectedSlots,
    greedy_slot_selection,
    per_slot_knn,
    plot_per_slot_accuracy,
)
from dino_sparo.runtime import resolve_device

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
    features: str | FeatureSpec = "embedding",
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    backend: str = "auto",
    slots: Optional[Sequence[int]] = None,
    select_slots: bool = False,
    select_max_slots: Optional[int] = None,
    select_val_fraction: float = 0.1,
    select_samples: Optional[int] = 20000,
    per_slot: bool = False,
    slot_k: int = 20,
    plot_path: Optional[str | Path] = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: Optional[str | torch.device] = None,
    fp16_features: bool = False,
    cache_dir: Optional[str | Path] = None,
    num_classes: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """k-NN accuracy of ``backbone``'s features (``None``: raw pixels) of ``train_dataset`` (the
    memory) and ``test_dataset`` (the queries); datasets must carry the evaluation transform.

    DINO's protocol: cosine similarity, the k nearest train features vote with exp(sim / T).
    SPARO models can also be evaluated on a slot subset (``slots``), with slots chosen by greedy
    selection on a held-out part of the train split (``select_slots``; the test split is never
    shown to the selector), and slot by slot (``per_slot``, with a bar chart at ``plot_path``).
    ``slot_k`` is the k of per-slot accuracy and of the selection. Features are cached in
    ``cache_dir`` when given. The backbone is moved to ``device`` (default: CUDA when available)
    and keeps its train/eval mode. Under ``torch.distributed`` every rank calls this; extraction
    is sharded, the search runs on rank 0, and every rank returns rank 0's result.
    """
    ks = sorted({int(k) for k in ks})
    dev = resolve_device(device, key="device")
    spec = features if isinstance(features, FeatureSpec) else resolve_spec(
        "embedding" if features == "auto" else features, backbone, grayscale=is_grayscale(train_dataset))
    layout = slot_layout(backbone, spec)
    if (slots is not None or select_slots or per_slot) and layout is None:
        raise UsageError("--slots, --select-slots and --per-slot need a SPARO model's embedding features")
    if slots is not None:  # refuse bad ids before the (long) extraction
        SelectedSlots(np.zeros((1, layout[0] * layout[1]), np.float32), layout[0], layout[1], slots, layout[2])
    if num_classes is None:
        num_classes = num_classes_of(train_dataset)

    t0 = time.perf_counter()
    with FeatureWorkspace(cache_dir) as workspace, frozen(backbone, dev):
        stores, hits = extract_splits(workspace, backbone, spec, {"train": train_dataset, "test": test_dataset},
                                      fp16_features, batch_size, num_workers, dev, progress)
        t_features = time.perf_counter() - t0
        result = None
        if distributed.get_rank() == 0:
            result = _knn_on_features(
                stores["train"], stores["test"], num_classes, ks, temperature, backend, layout, slots,
                select_slots, select_max_slots, select_val_fraction, select_samples, per_slot, slot_k,
                plot_path, dev, progress,
            )
            result.update(
                features=spec.describe(), feature_spec=spec.to_dict(), feature_dim=stores["train"].dim,
                feature_dtype=str(stores["train"].features.dtype), cache_hit=hits,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
            )
            t_knn = time.perf_counter() - t0 - t_features
            result["seconds"] = {"features": round(t_features, 3), "knn": round(t_knn, 3)}
        result = distributed.broadcast_object(result)
    return result


def _knn_on_features(
    train: FeatureStore,
    test: FeatureStore,
    num_classes: int,
    ks: list[int],
    temperature: float,
    backend: str,
    layout: Optional[tuple[int, int, str]],
    slots: Optional[Sequence[int]],
    select_slots: bool,
    select_max_slots: Optional[int],
    select_val_fraction: float,
    select_samples: Optional[int],
    per_slot: bool,
    slot_k: int,
    plot_path: Optional[str | Path],
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
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
    if slots is not None:
        chosen = [int(s) for s in slots]
        result["slots"] = {
            "slots": chosen,
            "knn": evaluate(SelectedSlots(train.features, num_slots, slot_dim, chosen, norm),
                            SelectedSlots(test.features, num_slots, slot_dim, chosen, norm)),
        }
    selected: list[int] = []
    if select_slots:
        # only train rows reach the selector; a class-balanced subsample bounds its memory
        rows = _balanced_rows(train.labels, select_samples)
        feats = train.features if rows is None else np.asarray(train.features[rows], dtype=np.float32)
        labels = train.labels if rows is None else train.labels[rows]
        selection = greedy_slot_selection(
            feats, labels, num_slots, slot_dim, val_fraction=select_val_fraction, max_slots=select_max_slots,
            k=slot_k, temperature=temperature, num_classes=num_classes, device=device,
        )
        selected = selection.selected
        result["slot_selection"] = {
            **selection.to_dict(), "k": slot_k, "num_train_used": int(labels.size),
            "knn": evaluate(SelectedSlots(train.features, num_slots, slot_dim, selected, norm),
                            SelectedSlots(test.features, num_slots, slot_dim, selected, norm)),
        }
    if per_slot:
        accuracy = per_slot_knn(train.features, train.labels, test.features, test.labels, num_slots, slot_dim,
                                k=min(slot_k, len(train)), temperature=temperature, num_classes=num_classes,
                                device=device, progress=progress)
        entry: dict[str, Any] = {"k": slot_k, "top1": [float(a) for a in accuracy]}
        if plot_path is not None:
            reference = result["knn"].get(str(slot_k), {}).get("top1")
            entry["plot"] = str(plot_per_slot_accuracy(
                accuracy, plot_path, title=f"k-NN top-1 of each slot alone (k={slot_k}, {len(test)} test images)",
                highlight=selected or (slots or ()), reference=reference,
                highlight_label="slots chosen by --select-slots" if selected else "slots of --slots",
                reference_label=f"all {num_slots} slots together"))
        result["per_slot"] = entry
    return result


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
