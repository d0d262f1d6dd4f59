"""The linear-probe protocol. Probes on frozen features: a grid of linear classifiers (learning rates × weight decays)
trained at once on the same batches, chosen on a held-out part of the TRAIN split, reported on test.

Each classifier is DINO's ``LinearClassifier``: one linear layer, weight ~ N(0, 0.01), bias 0, no
BatchNorm, trained with SGD (momentum 0.9) and a cosine learning rate decaying to 0 over the run,
the base rate scaled by ``batch_size / 256``. Training several heads in one pass over the features
is DINOv2's trick: the features (the expensive part) are read once per step for all of them.

Feature scale: features are multiplied by one scalar, chosen on the train features so that their
mean squared value per dimension is 1 (``feature_scale``). A SPARO embedding has unit norm (each of
its 4096 dims ~0.016) while DINO's class tokens are LayerNorm outputs (~1 per dim); without the
scalar, the same learning rate would mean very different steps for the two. One scalar changes
nothing a linear classifier can express; it is stored with the saved head.

Selection never reads test labels: the best (head, epoch) is the one with the highest top-1 on
the held-out train rows (``val``); test accuracy is only recorded. With ``val_fraction = 0`` (one
head) the last epoch is reported, trained on every train row. DINO v1 reported the best test
accuracy over epochs, which selects on test; it is given apart (``test_best_over_epochs``) for
comparison only.

:func:`evaluate_linear` probes a network's features of two datasets (extracted once and cached, or
freshly augmented views each step with ``augment``); ``evaluation.api.evaluate_checkpoint("linear",
...)`` opens a checkpoint first. Both return a JSON-ready dict (``result["test_top1"]``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from dino_sparo import distributed
from dino_sparo.checkpoint import save_checkpoint
from dino_sparo.data.datasets import num_classes_of
from dino_sparo.errors import UsageError
from dino_sparo.evaluation.feature_kinds import FeatureSpec, feature_fn
from dino_sparo.evaluation.knn_search import FeatureArray, as_label_tensor, feature_shape, read_rows
from dino_sparo.evaluation.options import Extraction, FeatureOpening
from dino_sparo.evaluation.slots import select_slot_features, stratified_split

logger = logging.getLogger(__name__)

DEFAULT_LRS = (0.001,)
# DINOv2's grid (its lrs are also scaled by batch / 256), for --lrs sweep
SWEEP_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)

BlockFn = Callable[[torch.Tensor], torch.Tensor]  # B × F -> B × D (e.g. a slot subset)


@dataclass
class ProbeOptions:
    """How the heads are trained and chosen: one head per (lr, weight decay), SGD with ``momentum``
    for ``epochs`` over batches of ``batch_size`` (the global batch; lrs scaled by it / 256), the head
    and epoch chosen on ``val_fraction`` of train held out by ``seed`` (default 0.1 with several
    heads, 0 with one: the last epoch, trained on all)."""

    lrs: Sequence[float] = DEFAULT_LRS
    weight_decays: Sequence[float] = (0.0,)
    epochs: int = 100
    batch_size: int = 1024
    val_fraction: Optional[float] = None
    seed: int = 0
    momentum: float = 0.9

    def held_out(self) -> float:
        """``val_fraction``, or its default for the number of heads."""
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.1 if len(self.lrs) * len(self.weight_decays) > 1 else 0.0


# --------------------------------------------------------------------------- heads and optimiser


class LinearHeads(nn.Module):
    """H independent linear classifiers ``D → C`` stored as one ``H × D × C`` weight."""

    def __init__(self, num_heads: int, dim: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # DINO's LinearClassifier: weight ~ N(0, 0.01), bias 0; every head starts alike
        weight = torch.randn(dim, num_classes, generator=g) * 0.01
        self.weight = nn.Parameter(weight.expand(num_heads, -1, -1).clone())  # H × D × C
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))  # H × C

    @property
    def num_heads(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` B × D -> logits H × B × C."""
        return torch.einsum("bd,hdc->hbc", x, self.weight) + self.bias[:, None]

    def head(self, index: int) -> nn.Linear:
        """Head ``index`` as a plain ``nn.Linear`` (D → C)."""
        dim, num_classes = self.weight.shape[1:]
        layer = nn.Linear(dim, num_classes)
        with torch.no_grad():
            layer.weight.copy_(self.weight[index].T)
            layer.bias.copy_(self.bias[index])
        return layer


class HeadsSGD:
    """SGD with momentum, one learning rate and weight decay per head (torch.optim.SGD's update:
    ``buf = m·buf + (g + wd·w)``, ``w -= lr·buf``)."""

    def __init__(self, heads: LinearHeads, lrs: torch.Tensor, weight_decays: torch.Tensor,
                 momentum: float = 0.9) -> None:
        self.heads, self.momentum = heads, momentum
        self.lrs, self.wds = lrs.float(), weight_decays.float()  # H, H
        self.buffers: Optional[list[torch.Tensor]] = None

    @torch.no_grad()
    def step(self, lr_factor: float) -> None:
        params = [self.heads.weight, self.heads.bias]
        shapes = [(-1, 1, 1), (-1, 1)]
        updates = [p.grad + self.wds.to(p.device).view(s) * p for p, s in zip(params, shapes)]
        if self.buffers is None:
            self.buffers = [u.clone() for u in updates]
        else:
            for buf, u in zip(self.buffers, updates):
                buf.mul_(self.momentum).add_(u)
        for p, buf, s in zip(params, self.buffers, shapes):
            p.sub_((self.lrs.to(p.device) * lr_factor).view(s) * buf)
            p.grad = None


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` steps (per iteration)."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


# --------------------------------------------------------------------------- features


def feature_scale(features: FeatureArray, block_fn: Optional[BlockFn] = None, max_rows: int = 10000,
                  seed: int = 0) -> float:
    """The scalar that makes the mean squared feature value 1 (on up to ``max_rows`` train rows)."""
    n, _ = feature_shape(features, "features")
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:max_rows])
    block = _rows(features, rows, block_fn, torch.device("cpu"))
    mean_square = float(block.pow(2).mean())
    if not math.isfinite(mean_square) or mean_square <= 0:
        raise ValueError(f"features have mean square {mean_square}; cannot train a probe on them")
    return 1.0 / math.sqrt(mean_square)


def _rows(features: FeatureArray, rows: np.ndarray, block_fn: Optional[BlockFn], device: torch.device) -> torch.Tensor:
    """Rows ``rows`` (sorted) as float32 on ``device``, through ``block_fn``."""
    if isinstance(features, torch.Tensor):
        block = features[torch.from_numpy(rows).to(features.device)]
    else:
        block = torch.from_numpy(np.asarray(features[rows], dtype=np.float32))
    block = block.float().to(device)
    return block_fn(block) if block_fn is not None else block


def _iter_blocks(features: FeatureArray, rows: Optional[np.ndarray], block_fn: Optional[BlockFn], device: torch.device,
                 size: int = 4096) -> Iterable[tuple[int, torch.Tensor]]:
    n = feature_shape(features, "features")[0] if rows is None else rows.size
    for a in range(0, n, size):
        b = min(a + size, n)
        block = read_rows(features, a, b).to(device) if rows is None else _rows(features, rows[a:b], None, device)
        yield a, (block_fn(block) if block_fn is not None else block)


@torch.no_grad()
def evaluate_heads(heads: LinearHeads, features: FeatureArray, labels: torch.Tensor, scale: float,
                   rows: Optional[np.ndarray] = None, block_fn: Optional[BlockFn] = None,
                   device: Optional[torch.device] = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 and top-5 accuracy (fractions) of every head on ``features[rows]``: two H arrays."""
    device = device or heads.weight.device
    y = labels.to(device)
    correct1 = torch.zeros(heads.num_heads, dtype=torch.int64, device=device)
    correct5 = torch.zeros_like(correct1)
    for a, block in _iter_blocks(features, rows, block_fn, device):
        logits = heads(block * scale)  # H × b × C
        target = y[a:a + block.shape[0]]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # H × b × 5
        hit = top == target[None, :, None]
        correct1 += hit[..., 0].sum(-1)
        correct5 += hit.any(-1).sum(-1)
    n = max(int(y.numel()), 1)
    return (correct1.cpu().numpy() / n), (correct5.cpu().numpy() / n)


# --------------------------------------------------------------------------- training


@dataclass
class ProbeResult:
    """Outcome of a probe; accuracies are fractions in [0, 1]."""

    lrs: list[float]  # base rates, one per head (before the batch / 256 scaling)
    weight_decays: list[float]
    selected: int  # head index chosen on held-out train (or the only head)
    selected_epoch: int  # 1-based
    val_top1: Optional[float]  # held-out train accuracy of the selection (None without held-out)
    test_top1: float
    test_top5: float
    test_best_over_epochs: dict[str, float]  # the selected head's max test top-1 over epochs (DINO v1)
    heads: list[dict[str, Any]]  # every head at its own best epoch (by held-out top-1; last without)
    history: list[dict[str, Any]]  # per epoch: the best head by held-out and its accuracies
    feature_scale: float
    num_fit: int
    num_val: int
    num_test: int
    classifier: nn.Linear = field(repr=False)  # the selected head (D → C); apply to feature_scale · features

    def to_dict(self) -> dict[str, Any]:
        return {
            "selected": {"lr": self.lrs[self.selected], "weight_decay": self.weight_decays[self.selected],
                         "head": self.selected, "epoch": self.selected_epoch, "val_top1": self.val_top1},
            "test_top1": self.test_top1,
            "test_top5": self.test_top5,
            "test_best_over_epochs": self.test_best_over_epochs,
            "heads": self.heads,
            "history": self.history,
            "feature_scale": self.feature_scale,
            "num_fit": self.num_fit,
            "num_val": self.num_val,
            "num_test": self.num_test,
        }


def _grid(lrs: Sequence[float], weight_decays: Sequence[float]) -> tuple[list[float], list[float]]:
    lrs, weight_decays = [float(v) for v in lrs], [float(v) for v in weight_decays]
    if not lrs or not weight_decays or min(lrs) <= 0 or min(weight_decays) < 0:
        raise UsageError(f"learning rates must be > 0 and weight decays >= 0, got lrs={lrs}, wds={weight_decays}")
    pairs = [(lr, wd) for wd in weight_decays for lr in lrs]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def train_probe(
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    steps_per_epoch: int,
    dim: int,
    num_classes: int,
    test: tuple[FeatureArray, torch.Tensor],
    val: Optional[tuple[FeatureArray, torch.Tensor, np.ndarray]] = None,
    probe: Optional[ProbeOptions] = None,
    scale: float = 1.0,
    block_fn: Optional[BlockFn] = None,
    device: Optional[torch.device] = None,
    progress: bool = True,
    num_fit: int = 0,
    across_ranks: bool = False,
) -> ProbeResult:
    """Train every (lr, wd) head of ``probe`` on the batches ``train_batches(epoch)`` yields
    (features B × D already through ``block_fn`` and ``scale``, labels B), then choose and report.

    ``test`` is ``(features, labels)``; ``val`` is ``(train features, train labels, held-out rows)``
    or None. With ``across_ranks`` (under ``torch.distributed``) every rank calls this with its own
    share of the batches; gradients are averaged across ranks, so the heads stay identical, and only
    rank 0's result is meaningful. Without it, the call is local to the calling process.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    probe = probe or ProbeOptions()
    epochs, seed = probe.epochs, probe.seed
    device = device or torch.device("cpu")
    head_lrs, head_wds = _grid(probe.lrs, probe.weight_decays)
    if val is None and len(head_lrs) > 1:
        raise UsageError("several heads need a held-out part of train to choose between them (val_fraction > 0)")
    heads = LinearHeads(len(head_lrs), dim, num_classes, seed).to(device)
    lr_scale = probe.batch_size / 256.0
    optimizer = HeadsSGD(heads, torch.tensor(head_lrs) * lr_scale, torch.tensor(head_wds), probe.momentum)
    total = epochs * steps_per_epoch
    test_x, test_y = test
    best_val = np.full(len(head_lrs), -1.0)
    best_epoch = np.zeros(len(head_lrs), dtype=np.int64)
    best_test = np.zeros((len(head_lrs), 2))
    snapshots: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(head_lrs)
    test_curve = []
    history = []
    step = 0
    is_main = distributed.is_main_process() or not across_ranks
    bar = tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not (progress and is_main))
    for epoch in bar:
        step = _train_epoch(heads, optimizer, train_batches(epoch), step, total, across_ranks, device)
        if not is_main:
            continue
        heads.eval()
        test1, test5 = evaluate_heads(heads, test_x, test_y, scale, block_fn=block_fn, device=device)
        if val is not None:
            val1, _ = evaluate_heads(heads, val[0], val[1][torch.from_numpy(val[2])], scale, rows=val[2],
                                     block_fn=block_fn, device=device)
        else:
            val1 = np.zeros(len(head_lrs))  # no held-out: every epoch counts as better, the last one wins
        improved = val1 > best_val if val is not None else np.ones(len(head_lrs), dtype=bool)
        for h in np.flatnonzero(improved):
            best_val[h], best_epoch[h], best_test[h] = val1[h], epoch + 1, (test1[h], test5[h])
            snapshots[h] = (heads.weight[h].detach().clone(), heads.bias[h].detach().clone())
        test_curve.append((test1, test5))
        current = int(np.argmax(best_val))
        entry = {"epoch": epoch + 1, "head": int(np.argmax(val1)), "lr": head_lrs[int(np.argmax(val1))],
                 "val_top1": float(val1.max()) if val is not None else None,
                 "test_top1": float(test1[int(np.argmax(val1))]), "test_top5": float(test5[int(np.argmax(val1))])}
        history.append(entry)
        postfix = {"test": f"{100 * best_test[current, 0]:.2f}"}
        if val is not None:
            postfix = {"val": f"{100 * best_val[current]:.2f}", **postfix, "lr": f"{head_lrs[current]:.0e}"}
        bar.set_postfix(postfix)
        logger.debug("epoch %d: %s", epoch + 1, entry)
    bar.close()
    if not is_main:
        empty = heads.head(0)
        return ProbeResult(head_lrs, head_wds, 0, epochs, None, math.nan, math.nan, {}, [], [], scale, num_fit,
                           0, 0, empty)

    return _chosen_probe(heads, snapshots, head_lrs, head_wds, best_val, best_epoch, best_test, test_curve, history,
                         val, scale, num_fit, feature_shape(test_x, "test_features")[0])


def _train_epoch(heads: LinearHeads, optimizer: HeadsSGD, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 step: int, total: int, across_ranks: bool, device: torch.device) -> int:
    """One pass of every head over ``batches``; returns the step count after it."""
    heads.train()
    for x, y in batches:
        logits = heads(x.to(device, non_blocking=True))  # H × B × C
        y = y.to(device, non_blocking=True)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(heads.num_heads), reduction="none")
        loss.view(heads.num_heads, -1).mean(1).sum().backward()  # each head: its own mean loss
        if across_ranks and distributed.is_dist():
            for p in (heads.weight, heads.bias):
                distributed.all_reduce_mean(p.grad)
        optimizer.step(cosine_factor(step, total))
        step += 1
    return step


def _chosen_probe(heads: LinearHeads, snapshots: list, head_lrs: list[float], head_wds: list[float],
                  best_val: np.ndarray, best_epoch: np.ndarray, best_test: np.ndarray, test_curve: list,
                  history: list, val: Optional[tuple], scale: float, num_fit: int, num_test: int) -> ProbeResult:
    """The head (and epoch) with the best held-out accuracy, as a classifier, and the report."""
    chosen = int(np.argmax(best_val))  # ties: the first (smallest lr of the first wd) wins
    weight, bias = snapshots[chosen]
    classifier = heads.head(0)
    with torch.no_grad():
        classifier.weight.copy_(weight.T)
        classifier.bias.copy_(bias)
    curve = np.array([c[0][chosen] for c in test_curve])
    top = int(np.argmax(curve))
    per_head = [{"lr": head_lrs[h], "weight_decay": head_wds[h], "epoch": int(best_epoch[h]),
                 "val_top1": float(best_val[h]) if val is not None else None,
                 "test_top1": float(best_test[h, 0]), "test_top5": float(best_test[h, 1])}
                for h in range(len(head_lrs))]
    num_val = int(val[2].size) if val is not None else 0
    result = ProbeResult(
        lrs=head_lrs, weight_decays=head_wds, selected=chosen, selected_epoch=int(best_epoch[chosen]),
        val_top1=float(best_val[chosen]) if val is not None else None,
        test_top1=float(best_test[chosen, 0]), test_top5=float(best_test[chosen, 1]),
        test_best_over_epochs={"top1": float(curve[top]), "top5": float(test_curve[top][1][chosen]), "epoch": top + 1},
        heads=per_head, history=history, feature_scale=scale, num_fit=num_fit, num_val=num_val,
        num_test=num_test, classifier=classifier.cpu(),
    )
    logger.info("linear probe: lr %.3g wd %.3g (epoch %d) chosen on %d held-out train rows: test top-1 %.4f top-5 %.4f",
                head_lrs[chosen], head_wds[chosen], result.selected_epoch, num_val, result.test_top1, result.test_top5)
    return result


def slot_block_fn(slots: Optional[Sequence[int]], layout: Optional[tuple[int, int, str]]) -> Optional[BlockFn]:
    """Feature transform for a SPARO slot subset (renormalised as ``select_slot_features``)."""
    if slots is None:
        return None
    if layout is None:
        raise UsageError("--slots needs a SPARO model's embedding features")
    num_slots, slot_dim, norm = layout
    chosen = [int(s) for s in slots]
    select_slot_features(torch.zeros(1, num_slots * slot_dim), num_slots, slot_dim, chosen, norm)  # validate ids
    return lambda block: select_slot_features(block, num_slots, slot_dim, chosen, norm)


def linear_probe(
    train_features: FeatureArray,
    train_labels: Any,
    test_features: FeatureArray,
    test_labels: Any,
    num_classes: int,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = (0.0,),
    epochs: int = 100,
    batch_size: int = 1024,
    val_fraction: Optional[float] = None,
    block_fn: Optional[BlockFn] = None,
    seed: int = 0,
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> ProbeResult:
    """Linear probe on precomputed features (tensors, arrays or memmaps).

    ``val_fraction`` of the train rows (stratified, by ``seed``) are held out to choose the head
    and epoch; default 0.1 with several heads, 0 (train on everything, last epoch) with one.
    Train features are read batch by batch from wherever they are (a memmap stays on disk).
    """
    n_train, _ = feature_shape(train_features, "train_features")
    n_test, _ = feature_shape(test_features, "test_features")
    y_train = as_label_tensor(train_labels, n_train, "train_labels")
    y_test = as_label_tensor(test_labels, n_test, "test_labels")
    for name, y in (("train_labels", y_train), ("test_labels", y_test)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    probe = ProbeOptions(lrs, weight_decays, epochs, batch_size, val_fraction, seed)
    if probe.held_out() > 0:
        fit_rows, val_rows = stratified_split(y_train.numpy(), probe.held_out(), seed)
        val = (train_features, y_train, val_rows)
    else:
        fit_rows, val = np.arange(n_train), None
    device = device or torch.device("cpu")
    scale = feature_scale(train_features, block_fn, seed=seed)
    dim = int(_rows(train_features, fit_rows[:1], block_fn, torch.device("cpu")).shape[1])
    steps = max(1, math.ceil(fit_rows.size / batch_size))
    rng = np.random.default_rng(seed)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        order = rng.permutation(fit_rows)
        for a in range(0, order.size, batch_size):
            rows = np.sort(order[a:a + batch_size])  # sorted: sequential reads from a memmap
            yield _rows(train_features, rows, block_fn, device) * scale, y_train[torch.from_numpy(rows)]

    return train_probe(batches, steps, dim, num_classes, (test_features, y_test), val, probe, scale=scale,
                       block_fn=block_fn, device=device, progress=progress, num_fit=int(fit_rows.size))


# --------------------------------------------------------------------------- a network's linear probe


def _augmented_batches(
    backbone: nn.Module, spec: FeatureSpec, dataset: Dataset, fit_rows: np.ndarray, batch_size: int,
    num_workers: int, block_fn: Any, scale: float, device: torch.device, seed: int, progress: bool,
) -> tuple[Any, int]:
    """A function epoch -> batches of (scaled features, labels) from freshly augmented images."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    subset = Subset(dataset, fit_rows.tolist())
    world = distributed.get_world_size()
    per_rank = max(1, batch_size // world)
    if distributed.is_dist():
        sampler: Any = DistributedSampler(subset, shuffle=True, seed=seed)
    else:
        sampler = RandomSampler(subset, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(subset, batch_size=per_rank, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    fn = feature_fn(backbone, spec)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        for images, labels in tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                                   disable=not (progress and distributed.is_main_process())):
            with torch.no_grad():
                feats = fn(images.to(device, non_blocking=True)).float()
                if block_fn is not None:
                    feats = block_fn(feats)
            yield feats * scale, torch.as_tensor(labels)

    return batches, len(loader)


def _augmented_probe(backbone: nn.Module, opening: FeatureOpening, augment_dataset: Dataset, train: Any, test: Any,
                     num_classes: int, probe: ProbeOptions, block_fn: Optional[BlockFn]) -> ProbeResult:
    """The probe on freshly augmented views (every rank trains on its share); held-out and test
    accuracy on the cached eval-transform features ``train`` and ``test``."""
    y_train = as_label_tensor(train.labels, len(train), "train_labels")
    if probe.held_out() > 0:
        fit_rows, val_rows = stratified_split(train.labels, probe.held_out(), probe.seed)
        val = (train.features, y_train, val_rows)
    else:
        fit_rows, val = np.arange(len(train)), None
    scale = feature_scale(train.features, block_fn, seed=probe.seed)
    dim = int(block_fn(torch.zeros(1, train.dim)).shape[1]) if block_fn is not None else train.dim
    e = opening.extraction
    batches, steps = _augmented_batches(backbone, opening.spec, augment_dataset, fit_rows, probe.batch_size,
                                        e.num_workers, block_fn, scale, opening.device, probe.seed, e.progress)
    test_set = (test.features, as_label_tensor(test.labels, len(test)))
    return train_probe(batches, steps, dim, num_classes, test_set, val, probe, scale=scale, block_fn=block_fn,
                       device=opening.device, progress=e.progress, num_fit=int(fit_rows.size), across_ranks=True)


def evaluate_linear(
    backbone: Optional[nn.Module],
    train_dataset: Dataset,
    test_dataset: Dataset,
    *,
    probe: Optional[ProbeOptions] = None,
    extraction: Optional[Extraction] = None,
    slots: Optional[Sequence[int]] = None,
    augment_dataset: Optional[Dataset] = None,
    num_classes: Optional[int] = None,
    save_head: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Linear-probe accuracy of ``backbone``'s frozen features (``None``: raw pixels).

    ``extraction.features="auto"``: the SPARO embedding for SPARO models, DINO's last-blocks class
    tokens for class-token models (``feature_kinds.dino_linear_spec``). ``probe`` says how the heads
    are trained and chosen; ``slots`` probes a SPARO slot subset. With ``augment_dataset`` (the train
    split with a training transform, row for row the same images as ``train_dataset``) the heads
    train on fresh augmented views each step instead of cached features. ``save_head`` writes the
    chosen classifier with what is needed to apply it. The backbone is moved to the extraction's
    device and keeps its train/eval mode. Under ``torch.distributed`` every rank calls this and
    returns rank 0's result.
    """
    probe = probe or ProbeOptions()
    opening = FeatureOpening(backbone, train_dataset, test_dataset, extraction or Extraction(), "auto")
    block_fn = slot_block_fn(slots, opening.layout)
    augment = augment_dataset is not None
    if augment and backbone is None:
        raise UsageError("--augment needs a network")
    if augment and len(augment_dataset) != len(train_dataset):
        raise ValueError(f"the augmented train split has {len(augment_dataset)} images, the train split "
                         f"{len(train_dataset)}: they must be the same images")
    if num_classes is None:
        num_classes = num_classes_of(train_dataset)
    with opening.extract() as stores:
        train, test, start = stores["train"], stores["test"], time.perf_counter()
        result = None
        if augment:
            fitted = _augmented_probe(backbone, opening, augment_dataset, train, test, num_classes, probe, block_fn)
        elif distributed.is_main_process():
            fitted = linear_probe(train.features, train.labels, test.features, test.labels, num_classes,
                                  lrs=probe.lrs, weight_decays=probe.weight_decays, epochs=probe.epochs,
                                  batch_size=probe.batch_size, val_fraction=probe.val_fraction, block_fn=block_fn,
                                  seed=probe.seed, device=opening.device, progress=opening.extraction.progress)
        if distributed.is_main_process():
            result = {
                **opening.describe(stores), "slots": [int(s) for s in slots] if slots is not None else None,
                "mode": "augment" if augment else "cached features", "epochs": probe.epochs,
                "batch_size": probe.batch_size, "lrs": [float(v) for v in probe.lrs],
                "weight_decays": [float(v) for v in probe.weight_decays],
                "lr_scaling": f"lr × {probe.batch_size}/256", "val_fraction": probe.held_out(),
                "num_classes": num_classes, **fitted.to_dict(),
                "seconds": {"features": round(opening.seconds, 3), "probe": round(time.perf_counter() - start, 3)},
            }
            if save_head is not None:
                result["head_path"] = str(_save_head(save_head, fitted, opening.spec, slots, num_classes))
        result = distributed.broadcast_object(result)
    return result


def _save_head(path: str | Path, probe: Any, spec: FeatureSpec, slots: Optional[Sequence[int]],
               num_classes: int) -> Path:
    path = Path(path)
    save_checkpoint({
        "state_dict": probe.classifier.state_dict(),  # nn.Linear(D, C), applied to feature_scale · features
        "feature_scale": probe.feature_scale,
        "feature_spec": spec.to_dict(),
        "slots": [int(s) for s in slots] if slots is not None else None,
        "num_classes": num_classes,
        "lr": probe.lrs[probe.selected],
        "weight_decay": probe.weight_decays[probe.selected],
        "epoch": probe.selected_epoch,
    }, path)
    return path


def format_linear_table(result: dict[str, Any]) -> str:
    """Per-head accuracies and the chosen head, as aligned text (percent)."""
    slots = f", slots {result['slots']}" if result.get("slots") else ""
    lines = [f"linear probe on {result['features']}{slots} ({result.get('source', 'model')}), "
             f"{result['num_fit']} fit / {result['num_val']} held-out train / {result['num_test']} test, "
             f"{result['epochs']} epochs, {result['mode']}"]
    lines.append(f"{'lr':>10} {'wd':>8} {'epoch':>6} {'held-out':>9} {'top-1':>7} {'top-5':>7}")
    chosen = result["selected"]["head"]
    for i, head in enumerate(result["heads"]):
        val = f"{100 * head['val_top1']:9.2f}" if head["val_top1"] is not None else f"{'-':>9}"
        mark = "  <- chosen on held-out train" if i == chosen and len(result["heads"]) > 1 else ""
        lines.append(f"{head['lr']:>10.3g} {head['weight_decay']:>8.3g} {head['epoch']:>6} {val} "
                     f"{100 * head['test_top1']:7.2f} {100 * head['test_top5']:7.2f}{mark}")
    best = result["test_best_over_epochs"]
    lines.append(f"test top-1 {100 * result['test_top1']:.2f}, top-5 {100 * result['test_top5']:.2f} "
                 f"(max over epochs of test top-1, DINO v1's optimistic report: {100 * best['top1']:.2f} "
                 f"at epoch {best['epoch']})")
    return "\n".join(lines)
