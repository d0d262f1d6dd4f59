"""Slot-level evaluation of SPARO embeddings: per-slot k-NN, slot subsets and greedy selection.

A SPARO embedding of L slots × V dims is laid out slot-major (``embedding.view(B, L, V)``).
Under ``cont:const`` every slot has norm sqrt(1/L), so the cosine similarity of two
embeddings restricted to a slot subset S (renormalised) is the mean of the per-slot cosines:

    sim_S(x, y) = (1 / |S|) · Σ_{l ∈ S} cos(x_l, y_l)

Greedy selection uses this to score "S plus one slot" from a running sum of per-slot
similarity matrices instead of recomputing full-width similarities.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dino_sparo.errors import UsageError
from dino_sparo.evaluation.knn_search import (
    FeatureArray,
    feature_shape,
    as_label_tensor,
    grouped_knn_search,
    knn_vote,
    read_rows,
)
from dino_sparo.runtime import resolve_device
from dino_sparo.sparo import keep_slots, parse_norm

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- slot subsets


def _check_layout(dim: int, num_slots: int, slot_dim: int) -> None:
    if num_slots < 1 or slot_dim < 1 or dim != num_slots * slot_dim:
        raise ValueError(
            f"features of dim {dim} do not hold num_slots={num_slots} × slot_dim={slot_dim} "
            f"(= {num_slots * slot_dim})"
        )


def _check_slots(slots: Sequence[int], num_slots: int) -> list[int]:
    slots = [int(s) for s in slots]
    if not slots:
        raise UsageError("choose at least one slot")
    if len(set(slots)) != len(slots) or min(slots) < 0 or max(slots) >= num_slots:
        raise UsageError(f"slots must be distinct ids in [0, {num_slots - 1}], got {slots}")
    return slots


def select_slot_features(
    features: Any, num_slots: int, slot_dim: int, slots: Sequence[int], norm: str = "cont:const"
) -> Any:
    """Embedding ``B × (|S|·V)`` from the slots ``S``, renormalised to unit norm.

    Under ``cont:const`` each kept slot is first made exactly unit (undoing fp16 rounding),
    so the result is each slot · sqrt(1/|S|), i.e. the stored embedding · sqrt(L/|S|); other
    norms L2-normalise the concatenation (``dino_sparo.keep_slots``). Tensors come back as
    float32 tensors on the same device, anything else (numpy, memmap) as float32 numpy.
    """
    _, weighting = parse_norm(norm)
    is_tensor = isinstance(features, torch.Tensor)
    x = features.detach().float() if is_tensor else torch.from_numpy(np.asarray(features, dtype=np.float32))
    if x.dim() != 2:
        raise ValueError(f"features must be 2-D (B × L·V), got shape {tuple(x.shape)}")
    _check_layout(x.shape[1], num_slots, slot_dim)
    slots = _check_slots(slots, num_slots)
    x = x.reshape(x.shape[0], num_slots, slot_dim)  # B × L × V
    if weighting == "const":
        x = F.normalize(x, dim=-1)
    out = keep_slots(x, slots)  # B × |S|·V
    return out if is_tensor else out.numpy()


class SelectedSlots:
    """Lazy ``select_slot_features`` view of a (memory-mapped) feature array, for ``knn_*``.

    Row slices are read and renormalised on demand, so k-NN over a slot subset of a memmap
    never materialises the whole subset.
    """

    def __init__(
        self, features: FeatureArray, num_slots: int, slot_dim: int, slots: Sequence[int], norm: str = "cont:const"
    ) -> None:
        n, dim = feature_shape(features, "features")
        _check_layout(dim, num_slots, slot_dim)
        parse_norm(norm)
        self.features, self.num_slots, self.slot_dim, self.norm = features, num_slots, slot_dim, norm
        self.slots = _check_slots(slots, num_slots)
        self.shape = (n, len(self.slots) * slot_dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        block = read_rows(self.features, rows.start or 0, rows.stop if rows.stop is not None else self.shape[0])
        return select_slot_features(block, self.num_slots, self.slot_dim, self.slots, self.norm)


# --------------------------------------------------------------------------- per-slot k-NN


def per_slot_knn(
    train_features: FeatureArray,
    train_labels: Any,
    test_features: FeatureArray,
    test_labels: Any,
    num_slots: int,
    slot_dim: int,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 4096,
    query_chunk_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> np.ndarray:
    """k-NN top-1 accuracy (fraction) of each slot used alone, as an ``L`` array.

    Each slot is compared by its own cosine. All slots are searched in one streaming pass
    over the train features (see ``knn.grouped_knn_search``); peak memory is about
    ``L × query_chunk_size × chunk_size × 4`` bytes (64 MB with the defaults and L = 64)
    plus the neighbours, ``L × num_test × k × 12`` bytes.
    """
    n_train, dim = feature_shape(train_features, "train_features")
    n_test, _ = feature_shape(test_features, "test_features")
    _check_layout(dim, num_slots, slot_dim)
    y_train = as_label_tensor(train_labels, n_train, "train_labels")
    y_test = as_label_tensor(test_labels, n_test, "test_labels")
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    sims, idx = grouped_knn_search(
        train_features, test_features, k, num_slots, chunk_size, query_chunk_size, device, progress
    )  # L × num_test × k
    correct = np.zeros(num_slots, dtype=np.int64)
    for slot in range(num_slots):  # vote in test chunks: L × num_test × C scores would not fit for big C
        for q0 in range(0, n_test, 8192):
            q1 = min(q0 + 8192, n_test)
            scores = knn_vote(sims[slot, q0:q1], y_train[idx[slot, q0:q1]], num_classes, temperature)
            correct[slot] += int((scores.argmax(-1) == y_test[q0:q1]).sum())
    return correct / n_test


# --------------------------------------------------------------------------- greedy selection


def stratified_split(labels: Any, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of row indices into (fit, held-out), both sorted.

    Each class with at least two samples gives round(val_fraction · n_c) of them (at least
    one, at most n_c − 1) to the held-out part; singleton classes stay in the fit part.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    heldout = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if members.size < 2:
            continue
        n_val = min(max(1, round(val_fraction * members.size)), members.size - 1)
        heldout.append(rng.permutation(members)[:n_val])
    heldout_idx = np.sort(np.concatenate(heldout)) if heldout else np.empty(0, dtype=np.int64)
    if heldout_idx.size == 0:
        raise ValueError("stratified_split: no class has two samples, nothing can be held out")
    fit_idx = np.setdiff1d(np.arange(labels.size), heldout_idx)
    return fit_idx, heldout_idx


@dataclass
class SlotSelection:
    """Outcome of greedy slot selection; every accuracy is held-out top-1 on the train split."""

    selected: list[int]  # slots in the order they were added
    curve: list[float]  # curve[i]: accuracy with selected[: i + 1]
    all_slots_accuracy: float  # accuracy with every slot, for reference
    per_slot_accuracy: list[float]  # accuracy of each slot alone (the first greedy step)
    fit_indices: np.ndarray = field(repr=False)  # train rows used as the k-NN memory
    heldout_indices: np.ndarray = field(repr=False)  # train rows used for scoring
    method: str = "precomputed"  # "precomputed" or "streaming" (see greedy_slot_selection)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the index arrays)."""
        return {
            "selected": self.selected,
            "curve": self.curve,
            "all_slots_accuracy": self.all_slots_accuracy,
            "per_slot_accuracy": self.per_slot_accuracy,
            "num_fit": int(self.fit_indices.size),
            "num_heldout": int(self.heldout_indices.size),
            "method": self.method,
        }


class _HeldoutScorer:
    """Held-out k-NN top-1 of slot subsets, from per-slot cosines (cont:const geometry).

    ``precomputed``: all L per-slot held-out × fit cosine matrices are kept (when they fit
    ``memory_budget``); a candidate costs one add and a top-k. ``streaming``: per held-out
    chunk, the subset's summed cosines are rebuilt with one V-wide matmul per slot, and each
    candidate adds its own; memory is ``query_chunk_size × num_fit`` floats (a few of them).
    """

    def __init__(
        self,
        fit: torch.Tensor,  # L × n_fit × V, unit per slot
        y_fit: torch.Tensor,
        val: torch.Tensor,  # L × n_val × V, unit per slot
        y_val: torch.Tensor,
        num_classes: int,
        k: int,
        temperature: float,
        memory_budget: int,
        query_chunk_size: int,
    ) -> None:
        self.fit, self.y_fit, self.val, self.y_val = fit, y_fit, val, y_val
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.query_chunk_size = query_chunk_size
        num_slots, n_val, n_fit = fit.shape[0], val.shape[1], fit.shape[1]
        self.method = "precomputed" if num_slots * n_val * n_fit * 4 <= memory_budget else "streaming"
        self.per_slot = torch.bmm(val, fit.transpose(1, 2)) if self.method == "precomputed" else None  # L × n_val × n_fit

    def _correct(self, sims: torch.Tensor, y: torch.Tensor) -> int:
        vals, idx = sims.topk(self.k, dim=-1)  # q × k
        scores = knn_vote(vals, self.y_fit[idx], self.num_classes, self.temperature)
        return int((scores.argmax(-1) == y).sum())

    def accuracies(self, base: list[int], candidates: list[int]) -> list[float]:
        """Accuracy of ``base + [c]`` for every candidate c (of ``base`` alone when none)."""
        options: list[int | None] = list(candidates) or [None]
        size = len(base) + (1 if candidates else 0)
        correct = np.zeros(len(options), dtype=np.int64)
        n_val = self.val.shape[1]
        for q0 in range(0, n_val, self.query_chunk_size):
            q1 = min(q0 + self.query_chunk_size, n_val)
            y = self.y_val[q0:q1]
            summed = torch.zeros(q1 - q0, self.fit.shape[1], device=self.fit.device)  # q × n_fit
            for slot in base:
                summed += self._slot_sims(slot, q0, q1)
            for i, slot in enumerate(options):
                sims = summed if slot is None else summed + self._slot_sims(slot, q0, q1)
                correct[i] += self._correct(sims / size, y)
        return (correct / n_val).tolist()

    def _slot_sims(self, slot: int, q0: int, q1: int) -> torch.Tensor:
        if self.per_slot is not None:
            return self.per_slot[slot, q0:q1]
        return self.val[slot, q0:q1] @ self.fit[slot].T  # q × n_fit


def _load_slot_major(
    features: FeatureArray, rows: np.ndarray, num_slots: int, slot_dim: int, device: torch.device
) -> torch.Tensor:
    """Rows ``rows`` (sorted) of ``features`` as an ``L × n × V`` float32 tensor, each slot unit-norm."""
    out = torch.empty(num_slots, rows.size, slot_dim, device=device)  # L × n × V
    step = 8192
    for a in range(0, rows.size, step):
        pick = rows[a : a + step]
        if isinstance(features, torch.Tensor):
            block = features[torch.from_numpy(pick).to(features.device)].detach()
        else:
            block = torch.from_numpy(np.asarray(features[pick], dtype=np.float32))
        block = F.normalize(block.float().to(device).reshape(-1, num_slots, slot_dim), dim=-1)  # b × L × V
        out[:, a : a + step] = block.transpose(0, 1)
    return out


def greedy_slot_selection(
    train_features: FeatureArray,
    train_labels: Any,
    num_slots: int,
    slot_dim: int,
    val_fraction: float = 0.1,
    max_slots: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    seed: int = 0,
    num_classes: int | None = None,
    memory_budget: int = 1 << 30,
    query_chunk_size: int = 512,
    device: str | torch.device | None = None,
) -> SlotSelection:
    """Choose slots by greedy forward selection on a held-out part of the TRAIN set.

    Only train data enter (no test argument exists): the train rows are split, stratified and
    deterministically by ``seed``, into a fit part (the k-NN memory) and a held-out part (the
    queries). Starting from no slot, each step adds the slot that most raises held-out k-NN
    top-1 (ties: the lowest slot id); the search stops when no slot raises it, or at
    ``max_slots``. Similarities are those of ``select_slot_features`` under cont:const (mean
    per-slot cosine) whatever norm produced the features.

    Cost per step: one top-k over fit for each held-out row and remaining slot. The L per-slot
    held-out × fit cosine matrices are precomputed when ``L · n_val · n_fit · 4`` bytes fit
    ``memory_budget``; otherwise they are recomputed chunk-wise each step (V-wide matmuls).
    The fit and held-out features are held in memory as fp32: subsample very large train sets.
    """
    n_train, dim = feature_shape(train_features, "train_features")
    _check_layout(dim, num_slots, slot_dim)
    labels = as_label_tensor(train_labels, n_train, "train_labels")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if max_slots is not None and not 1 <= max_slots <= num_slots:
        raise UsageError(f"max_slots must be in [1, num_slots={num_slots}], got {max_slots}")
    fit_idx, heldout_idx = stratified_split(labels.numpy(), val_fraction, seed)
    if not 1 <= k <= fit_idx.size:
        raise ValueError(f"k must be in [1, num_fit={fit_idx.size}], got k={k}")
    dev = resolve_device(device)
    scorer = _HeldoutScorer(
        _load_slot_major(train_features, fit_idx, num_slots, slot_dim, dev),
        labels[fit_idx].to(dev),
        _load_slot_major(train_features, heldout_idx, num_slots, slot_dim, dev),
        labels[heldout_idx].to(dev),
        num_classes,
        k,
        temperature,
        memory_budget,
        query_chunk_size,
    )
    logger.info(
        "greedy slot selection: %d fit / %d held-out train rows, %s similarities",
        fit_idx.size, heldout_idx.size, scorer.method,
    )
    all_slots = scorer.accuracies(list(range(num_slots)), [])[0]
    selected, curve, per_slot = greedy_forward_selection(scorer.accuracies, num_slots, max_slots)
    logger.info(
        "greedy selection kept %d of %d slots %s: held-out top-1 %.4f (all slots %.4f)",
        len(selected), num_slots, selected, curve[-1] if curve else float("nan"), all_slots,
    )
    return SlotSelection(selected, curve, all_slots, per_slot, fit_idx, heldout_idx, scorer.method)


def greedy_forward_selection(
    accuracies: Callable[[list[int], list[int]], Sequence[float]], num_slots: int, max_slots: int | None = None,
) -> tuple[list[int], list[float], list[float]]:
    """Greedy forward selection of slots, shared by the k-NN and the zero-shot selections.

    ``accuracies(selected, remaining)`` gives the accuracy of ``selected + [s]`` for each ``s`` in
    ``remaining``. Starting from no slot, each step adds the slot with the highest accuracy (ties: the
    lowest slot id) while it rises, up to ``max_slots``. Returns the selected slots in order, the
    accuracy after each addition, and every slot's accuracy on its own (the first step's).
    """
    limit = num_slots if max_slots is None else max_slots
    selected: list[int] = []
    curve: list[float] = []
    per_slot: list[float] = []
    best = -math.inf
    while len(selected) < limit:
        remaining = [s for s in range(num_slots) if s not in selected]
        accs = [float(a) for a in accuracies(selected, remaining)]
        if not per_slot:
            per_slot = accs
        i = int(np.argmax(accs))  # the first maximum: ties go to the lowest slot id
        if accs[i] <= best:
            break
        selected.append(remaining[i])
        best = accs[i]
        curve.append(best)
        logger.info("greedy step %d: + slot %d -> top-1 %.4f", len(selected), remaining[i], best)
    return selected, curve, per_slot


# --------------------------------------------------------------------------- plots


def plot_per_slot_accuracy(
    accuracy: Sequence[float],
    path: str | os.PathLike,
    title: str = "k-NN top-1 per slot",
    highlight: Sequence[int] = (),
    reference: float | None = None,
    highlight_label: str = "highlighted slots",
    reference_label: str = "reference",
) -> Path:
    """Bar chart PNG of per-slot accuracy; ``highlight`` slots drawn in another colour,
    ``reference`` (e.g. all-slots accuracy) as a horizontal line; a legend names both."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    per_slot_figure(accuracy, title, highlight, reference, highlight_label, reference_label).savefig(path, dpi=120)
    return path


def per_slot_figure(
    accuracy: Sequence[float],
    title: str = "k-NN top-1 per slot",
    highlight: Sequence[int] = (),
    reference: float | None = None,
    highlight_label: str = "highlighted slots",
    reference_label: str = "reference",
) -> Any:
    """The matplotlib figure of :func:`plot_per_slot_accuracy` (one bar per slot, legend for each
    colour in use and for the reference line)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (no global backend)
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    acc = np.asarray(accuracy, dtype=float).reshape(-1)
    marked = set(int(s) for s in highlight)
    fig = Figure(figsize=(max(6.0, 0.15 * acc.size + 2), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = ["tab:orange" if i in marked else "tab:blue" for i in range(acc.size)]
    ax.bar(np.arange(acc.size), acc, color=colours, width=0.8)
    handles = [Patch(color="tab:blue", label="slot alone" if not marked else "other slots, alone")]
    if marked:
        handles.append(Patch(color="tab:orange", label=f"{highlight_label}, alone"))
    if reference is not None:
        handles.append(ax.axhline(reference, color="black", linestyle="--", linewidth=1,
                                  label=f"{reference_label}: {reference:.3f}"))
    ax.legend(handles=handles, loc="upper right", fontsize="small")
    ax.set_xlabel("slot")
    ax.set_ylabel("top-1 accuracy")
    ax.set_xlim(-0.6, acc.size - 0.4)
    top = max(float(acc.max(initial=0.0)), reference or 0.0)
    ax.set_ylim(0.0, 1.35 * top if top > 0 else 1.0)
    ax.set_title(title)
    fig.tight_layout()
    return fig
