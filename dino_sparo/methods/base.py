"""The interface between the training loop and a method (DINO, CLIP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from dino_sparo import distributed
from dino_sparo.errors import ConfigError
from dino_sparo.evaluation.periodic import PeriodicKnn


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm gains and learned queries/tokens are not decayed (DINO, DINOv2, open_clip, SPARO)."""
    return param.ndim <= 1 or name.endswith((".bias", "cls_token", "reg_token", "mask_token", "pos_embed", "queries",
                                             "logit_scale"))


def param_groups(module: nn.Module, **extra: Any) -> list[dict]:
    """Two optimiser groups: decayed weights and the rest; ``apply_wd`` tells the loop which."""
    decay, plain = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (plain if no_weight_decay(name, param) else decay).append(param)
    return [dict(params=decay, apply_wd=True, **extra), dict(params=plain, apply_wd=False, weight_decay=0.0, **extra)]


def shard_index_cache(cfg: Any) -> Optional[Path]:
    """Where WebDataset shards keep their index for resumed runs: ``output_dir/shard_index.npz``,
    written by the main process (the others index alone the first time rather than wait on a
    collective that could time out)."""
    cache = Path(cfg.output_dir) / "shard_index.npz"
    return cache if distributed.is_main_process() or cache.is_file() else None


class Method:
    """What one training step computes. The loop owns the optimiser, schedules, precision,
    distribution, checkpoints and logs; a method owns its models, data transform and loss.

    ``train_module`` is the module the loop wraps in DistributedDataParallel and optimises; the
    method's ``loss`` must call it (not the unwrapped module) so gradients are synchronised.
    """

    train_module: nn.Module
    collate_fn: Optional[Callable] = None

    def __init__(self, cfg: Any, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """Everything with state to checkpoint, by name (unwrapped modules)."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        return param_groups(self.modules_to_optimise())

    def modules_to_optimise(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, batch: Any, step: int, epoch: int, teacher_temp: Optional[float] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss and metrics. Scheduled values come from the loop
        (:meth:`dino_sparo.schedules.Schedules.at`); a method never indexes a schedule itself."""
        raise NotImplementedError

    def before_optimizer_step(self, step: int, epoch: int) -> None:
        """After backward (gradients unscaled and clipped), before the optimiser step."""

    def after_optimizer_step(self, step: int, momentum: Optional[float] = None) -> None:
        """E.g. the teacher's EMA update, at the scheduled ``momentum``."""

    def batch_size(self, batch: Any) -> int:
        raise NotImplementedError

    def eval_backbone(self) -> Optional[nn.Module]:
        """The image network that k-NN during training evaluates (``eval.knn_every``); None: none."""
        return None

    def eval_data(self) -> tuple[Any, Callable]:
        """The labelled images of k-NN during training (a ``data`` config section: dataset, path)
        and the evaluation transform the backbone expects."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation data for 'eval.knn_every'")

    def epoch_end_hooks(self) -> list:
        """The evaluations the loop runs when an epoch ends, in order (each an
        :class:`~dino_sparo.evaluation.periodic.EpochEndHook`); built once, before training starts.
        Here: k-NN of :meth:`eval_backbone` when ``eval.knn_every`` > 0."""
        return [self.knn_hook()] if self.cfg.eval.knn_every else []

    def knn_hook(self) -> PeriodicKnn:
        """k-NN during training of :meth:`eval_backbone` on :meth:`eval_data`."""
        backbone = self.eval_backbone()
        if backbone is None:
            raise ConfigError(f"config key 'eval.knn_every': the {type(self).__name__} method has no image "
                             "backbone to evaluate")
        data_cfg, transform = self.eval_data()
        return PeriodicKnn(self.cfg.eval, backbone, data_cfg, transform, self.cfg.data.batch_size_per_gpu,
                           self.cfg.data.num_workers, self.device)

    def warnings(self, metrics: dict[str, float]) -> list[str]:
        """Human-readable warnings from logged metrics (e.g. DINO collapse)."""
        return []

    def describe(self) -> list[str]:
        """Lines for the start-up log (parameter counts and the like)."""
        return []
