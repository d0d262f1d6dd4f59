"""k-NN accuracy during training (``eval.knn_every: N``): a cheap, label-based signal of what the
self-supervised features learn, every N epochs, without stopping the run.

The evaluation sets are built once, at start-up, from class-balanced subsets of the method's
labelled data (``eval.knn_train_limit`` / ``eval.knn_test_limit``) with the evaluation transform.
Each evaluation is :func:`dino_sparo.evaluation.knn.evaluate_knn` on the image backbone a method
hands over (DINO: the teacher's): every rank extracts its shard, rank 0 searches, all ranks get the
result. The global RNGs are restored afterwards, so a run with k-NN trains exactly as one without.
It is one of the epoch-end hooks the training loop runs: ``due(epochs_done)``, then ``evaluate()``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from dino_sparo.config import DataConfig, EvalConfig
from dino_sparo.data.datasets import ImageFolder, build_dataset
from dino_sparo.errors import ConfigError
from dino_sparo.evaluation.knn import evaluate_knn
from dino_sparo.evaluation.options import Extraction
from dino_sparo.runtime import preserved_rng


class PeriodicKnn:
    """Weighted k-NN top-1 / top-5 of ``backbone`` every ``cfg.knn_every`` epochs, on the labelled
    images ``data_cfg`` names (a ``data`` config section: dataset, path) seen through ``transform``."""

    def __init__(self, cfg: EvalConfig, backbone: nn.Module, data_cfg: Any, transform: Callable, batch_size: int,
                 num_workers: int, device: torch.device) -> None:
        self.cfg, self.backbone = cfg, backbone
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        with preserved_rng(device):
            self.train_set = build_dataset(self._limited(data_cfg, cfg.knn_train_limit), "train", transform)
            self.test_set = build_dataset(self._limited(data_cfg, cfg.knn_test_limit), cfg.knn_split, transform)
        if isinstance(self.train_set, ImageFolder) and self.train_set.root == self.test_set.root:
            raise ConfigError(f"config key 'eval.knn_every': the image folder {data_cfg.path} has no val/ (or test/) "
                             "sub-folder, so k-NN would query the very images of its memory; add "
                             f"{data_cfg.path}/val/<class>/... beside train/, or set eval.knn_every=0")
        if cfg.knn_k > len(self.train_set):
            raise ConfigError(f"config key 'eval.knn_k' ({cfg.knn_k}) exceeds the {len(self.train_set)} train "
                             "images of the k-NN memory: lower it or raise 'eval.knn_train_limit'")

    @staticmethod
    def _limited(data_cfg: Any, limit: int | None) -> DataConfig:
        return DataConfig(dataset=data_cfg.dataset, path=data_cfg.path, limit=limit,
                          corrupt_images=getattr(data_cfg, "corrupt_images", "error"))

    def due(self, epochs_done: int) -> bool:
        """Whether the evaluation runs once ``epochs_done`` epochs are complete."""
        return self.cfg.knn_every > 0 and epochs_done > 0 and epochs_done % self.cfg.knn_every == 0

    def evaluate(self) -> dict[str, float]:
        """``{"knn_top1", "knn_top5"}`` as fractions in [0, 1]; call on every rank. The backbone
        keeps its train/eval mode (``evaluate_knn`` restores it)."""
        with preserved_rng(self.device):
            extraction = Extraction("embedding", self.batch_size, self.num_workers, self.device, progress=False)
            result = evaluate_knn(self.backbone, self.train_set, self.test_set, ks=(self.cfg.knn_k,),
                                  temperature=self.cfg.knn_temperature, extraction=extraction)
        entry = result["knn"][str(self.cfg.knn_k)]
        return {"knn_top1": float(entry["top1"]), "knn_top5": float(entry["top5"])}
