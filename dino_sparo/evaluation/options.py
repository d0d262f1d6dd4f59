"""What every frozen-feature protocol (k-NN, linear probe, the SugarCrepe slot analyses) is told
besides its own numbers, as small objects: :class:`Extraction` (what to read from the network and
how), :class:`SlotAnalysis` (which SPARO slots, and whether to select or score them one by one);
and the one opening they share, :class:`FeatureOpening` (device, feature kind and slot layout, then
the train and test features, extracted once and cached)."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dino_sparo.data.datasets import is_grayscale
from dino_sparo.errors import UsageError
from dino_sparo.evaluation.feature_kinds import FeatureSpec, resolve_spec, slot_layout
from dino_sparo.evaluation.feature_store import FeatureStore, FeatureWorkspace, extract_splits, frozen
from dino_sparo.evaluation.slots import SelectedSlots
from dino_sparo.runtime import resolve_device


@dataclass
class Extraction:
    """What to read from the network (``features``: a kind or a :class:`FeatureSpec`; "auto" is the
    protocol's default) and how: batches, loader workers, device, float16 storage, the cache folder
    (None: a scratch folder, kept nowhere) and progress bars."""

    features: str | FeatureSpec = "auto"
    batch_size: int = 256
    num_workers: int = 0
    device: Optional[str | torch.device] = None
    fp16_features: bool = False
    cache_dir: Optional[str | Path] = None
    progress: bool = True


@dataclass
class SlotAnalysis:
    """SPARO slot analyses on top of a protocol's all-slot number: a fixed subset (``slots``), greedy
    selection on a held-out part of the train split (``select_slots``: at most ``select_max_slots``,
    holding out ``select_val_fraction`` of ``select_samples`` class-balanced rows), and each slot
    alone (``per_slot``, drawn at ``plot_path``); ``slot_k`` is the k of the last two."""

    slots: Optional[Sequence[int]] = None
    select_slots: bool = False
    select_max_slots: Optional[int] = None
    select_val_fraction: float = 0.1
    select_samples: Optional[int] = 20000
    per_slot: bool = False
    slot_k: int = 20
    plot_path: Optional[str | Path] = None

    @property
    def wanted(self) -> bool:
        return self.slots is not None or self.select_slots or self.per_slot


def split_options(cls: type, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """An instance of the dataclass ``cls`` from the keys of ``options`` that are its fields, and the rest."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names}), {k: v for k, v in options.items() if k not in names}


class FeatureOpening:
    """The opening of a frozen-feature protocol: the device, the feature kind (``auto`` meaning
    ``auto_kind``) and its SPARO slot layout, checked before the (long) extraction; then
    :meth:`extract` gives the train and test feature stores, from the cache when they are there."""

    def __init__(self, backbone: Optional[nn.Module], train: Dataset, test: Dataset, extraction: Extraction,
                 auto_kind: str = "auto", slots: Optional[SlotAnalysis] = None) -> None:
        self.backbone, self.datasets, self.extraction = backbone, {"train": train, "test": test}, extraction
        self.device = resolve_device(extraction.device, key="device")
        kind = extraction.features
        self.spec = kind if isinstance(kind, FeatureSpec) else resolve_spec(
            auto_kind if kind == "auto" else kind, backbone, grayscale=is_grayscale(train))
        self.layout = slot_layout(backbone, self.spec)
        if slots is not None and slots.wanted and self.layout is None:
            raise UsageError("--slots, --select-slots and --per-slot need a SPARO model's embedding features")
        if slots is not None and slots.slots is not None:  # refuse bad ids before the extraction
            num_slots, slot_dim, norm = self.layout
            SelectedSlots(np.zeros((1, num_slots * slot_dim), np.float32), num_slots, slot_dim, slots.slots, norm)
        self.seconds = 0.0
        self.hits: dict[str, bool] = {}

    @contextmanager
    def extract(self) -> Iterator[dict[str, FeatureStore]]:
        """The feature stores of both splits, open while the block runs (the network stays frozen)."""
        e, start = self.extraction, time.perf_counter()
        with FeatureWorkspace(e.cache_dir) as workspace, frozen(self.backbone, self.device):
            stores, self.hits = extract_splits(workspace, self.backbone, self.spec, self.datasets, e.fp16_features,
                                               e.batch_size, e.num_workers, self.device, e.progress)
            self.seconds = time.perf_counter() - start
            yield stores

    def describe(self, stores: dict[str, FeatureStore]) -> dict[str, Any]:
        """What both protocols report about their features."""
        cache = self.extraction.cache_dir
        return {"features": self.spec.describe(), "feature_spec": self.spec.to_dict(), "feature_dim": stores["train"].dim,
                "feature_dtype": str(stores["train"].features.dtype), "cache_hit": self.hits,
                "cache_dir": str(cache) if cache is not None else None}
