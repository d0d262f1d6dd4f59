"""Evaluations during training, run when an epoch ends, behind one protocol (``due(epochs_done)``,
then ``evaluate()``): the loop runs whatever a method lists
(:meth:`dino_sparo.methods.base.Method.epoch_end_hooks`) without knowing what each measures, and
writes the metrics of a due one into log.jsonl.

- :class:`PeriodicKnn` (``eval.knn_every: N``): a cheap, label-based signal of what the
  self-supervised features learn. Its evaluation sets are built once, at start-up, from
  class-balanced subsets of the method's labelled data (``eval.knn_train_limit`` /
  ``eval.knn_test_limit``) with the evaluation transform. Each evaluation is
  :func:`dino_sparo.evaluation.knn.evaluate_knn` on the image backbone a method hands over (DINO: the
  teacher's): every rank extracts its shard, rank 0 searches, all ranks get the result.
- :class:`PeriodicZeroShot` (CLIP's ``clip.zeroshot_every_epochs``): zero-shot top-1 / top-5 of the
  CLIP model on a labelled test set built once, under the run's precision rule, on the main process.

Both restore the global RNGs afterwards, so a run with them trains exactly as one without.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from dino_sparo import distributed
from dino_sparo.config import DataConfig, EvalConfig
from dino_sparo.data.datasets import ImageFolder, build_dataset
from dino_sparo.errors import ConfigError
from dino_sparo.evaluation.knn import evaluate_knn
from dino_sparo.evaluation.options import Extraction
from dino_sparo.runtime import preserved_rng

logger = logging.getLogger("dino_sparo")

__all__ = ["EpochEndHook", "PeriodicKnn", "PeriodicZeroShot"]


class EpochEndHook(Protocol):
    """Asked after every epoch, on every rank; the metrics of a due one go into log.jsonl."""

    def due(self, epochs_done: int) -> bool: ...

    def evaluate(self) -> dict[str, float]: ...


class PeriodicKnn:
    """Weighted k-NN top-1 / top-5 of ``backbone`` every ``cfg.knn_every`` epochs, on the labelled
    images ``data_cfg`` names (a ``data`` config section: dataset, path) seen through ``transform``."""

    def __init__(self, cfg: EvalConfig, backbone: nn.Module, data_cfg: Any, transform: Callable, batch_size: int,
                 num_workers: int, device: torch.device) -> None:
        self.cfg, self.backbone, self.epochs_done = cfg, backbone, 0
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
        self.epochs_done = epochs_done
        return self.cfg.knn_every > 0 and epochs_done > 0 and epochs_done % self.cfg.knn_every == 0

    def evaluate(self) -> dict[str, float]:
        """``{"knn_top1", "knn_top5"}`` as fractions in [0, 1]; call on every rank. The backbone
        keeps its train/eval mode (``evaluate_knn`` restores it)."""
        with preserved_rng(self.device):
            extraction = Extraction("embedding", self.batch_size, self.num_workers, self.device, progress=False)
            result = evaluate_knn(self.backbone, self.train_set, self.test_set, ks=(self.cfg.knn_k,),
                                  temperature=self.cfg.knn_temperature, extraction=extraction)
        entry = result["knn"][str(self.cfg.knn_k)]
        metrics = {"knn_top1": float(entry["top1"]), "knn_top5": float(entry["top5"])}
        if distributed.is_main_process():
            logger.info("after %d epoch(s): k-NN (k=%d) top-1 %.2f%%, top-5 %.2f%%", self.epochs_done,
                        self.cfg.knn_k, 100 * metrics["knn_top1"], 100 * metrics["knn_top5"])
        return metrics


class PeriodicZeroShot:
    """Zero-shot top-1 / top-5 of a CLIP ``model`` every ``every`` epochs (0: never) on ``test_set``
    (built once, by the caller, with its class names and prompt templates), named ``name`` in the log.
    Runs on the main process under ``autocast_dtype`` (the run's precision rule; None: fp32); the
    other ranks wait and return ``{}``."""

    def __init__(self, every: int, model: nn.Module, tokenizer: Callable, name: str, test_set: Dataset,
                 classnames: Sequence[str], templates: Sequence[str], batch_size: int, num_workers: int,
                 device: torch.device, autocast_dtype: Optional[torch.dtype]) -> None:
        if every < 0:
            raise ConfigError(f"config key 'clip.zeroshot_every_epochs' must be >= 0 (0 = never), got {every}")
        self.every, self.model, self.tokenizer, self.name = every, model, tokenizer, name
        self.test_set, self.classnames, self.templates = test_set, list(classnames), list(templates)
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self.autocast_dtype, self.epochs_done = autocast_dtype, 0

    def due(self, epochs_done: int) -> bool:
        self.epochs_done = epochs_done
        return self.every > 0 and epochs_done > 0 and epochs_done % self.every == 0

    def evaluate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if distributed.is_main_process():
            from dino_sparo.evaluation.zeroshot import evaluate  # noqa: PLC0415 (CLIP only)

            was_training = self.model.training
            autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                      enabled=self.autocast_dtype is not None)
            with preserved_rng(self.device), autocast:
                result = evaluate(self.model, self.tokenizer, test_set=self.test_set, classnames=self.classnames,
                                  templates=self.templates, batch_size=self.batch_size,
                                  num_workers=self.num_workers, device=self.device)
            self.model.train(was_training)
            zs = result["zeroshot"]
            logger.info("after %d epoch(s): zero-shot top-1 %.2f%%, top-5 %.2f%% on %s (%d images)", self.epochs_done,
                        100 * zs["top1"], 100 * zs["top5"], self.name, zs["num_images"])
            metrics = {"zeroshot_top1": zs["top1"], "zeroshot_top5": zs["top5"]}
        distributed.barrier()
        return metrics
