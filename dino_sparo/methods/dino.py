"""DINO self-distillation with a SPARO (or class-token) read-out on student and teacher."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from dino_sparo.data.datasets import build_dataset
from dino_sparo.data.transforms import MultiCropTransform, eval_transform_for, multicrop_collate, normalization_for
from dino_sparo.losses import DINOLoss, collapse_warnings, koleo_loss
from dino_sparo.methods.base import Method
from dino_sparo.layers.attention import resolve_attention_backend
from dino_sparo.models.build import build_backbone
from dino_sparo.models.heads import DINOHead
from dino_sparo.models.vit import count_parameters

logger = logging.getLogger(__name__)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops: one backbone forward per crop size (never per crop),
    then one head forward over all embeddings. Outputs are crop-major (all images of crop 0 first).

    With ``pack_crops`` and the xformers attention backend, all crop sizes go through the blocks in
    one pass (packed into one sequence with a block-diagonal bias); other backends cannot mask a
    packed sequence cheaply, so they keep one forward per crop size (logged once).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pack_crops: bool = False) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.pack_crops = pack_crops
        self._told_no_packing = False

    def _can_pack(self, device: torch.device) -> bool:
        backend = resolve_attention_backend(self.backbone.attn_backend, device)
        if backend != "xformers" and not self._told_no_packing:
            logger.warning("model.pack_crops needs the xformers attention backend (have %r on %s): "
                           "running one forward per crop size instead", backend, device.type)
            self._told_no_packing = True
        return backend == "xformers"

    def forward(self, crops: Sequence[torch.Tensor], return_embeddings: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs of all crops; with ``return_embeddings`` also the backbone's embeddings
        (the read-out, before the head), in the same crop-major order."""
        batches, start = [], 0
        while start < len(crops):  # consecutive crops of one size form one batch
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            batches.append(crops[start] if end - start == 1 else torch.cat(list(crops[start:end])))
            start = end
        if self.pack_crops and len(batches) > 1 and self._can_pack(batches[0].device):
            embeddings = self.backbone.forward_packed(batches)
        else:
            embeddings = [self.backbone(x) for x in batches]
        embedding = torch.cat(embeddings)
        output = self.head(embedding)
        return (output, embedding) if return_embeddings else output


def build_student_teacher(cfg: Any) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher as two separate networks (a teacher sharing the student's modules
    collapses); the teacher starts from the student's weights, without drop path."""
    def network(drop_path: float, norm_last_layer: bool) -> MultiCropWrapper:
        model_cfg = cfg.model
        backbone = build_backbone(type(model_cfg)(**{**model_cfg.__dict__, "drop_path_rate": drop_path}))
        head = DINOHead(backbone.out_dim, cfg.dino.out_dim, use_bn=cfg.dino.use_bn_in_head,
                        norm_last_layer=norm_last_layer, hidden_dim=cfg.dino.head_hidden_dim,
                        bottleneck_dim=cfg.dino.head_bottleneck_dim)
        return MultiCropWrapper(backbone, head, pack_crops=cfg.model.pack_crops)

    student = network(cfg.model.drop_path_rate, cfg.dino.norm_last_layer)
    teacher = network(0.0, cfg.dino.norm_last_layer)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


class DinoMethod(Method):
    def __init__(self, cfg: Any, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.student, self.teacher = (m.to(device) for m in build_student_teacher(cfg))
        self.train_module: nn.Module = self.student
        crops = cfg.crops
        self.loss_fn = DINOLoss(
            cfg.dino.out_dim, n_global_crops=crops.global_crops_number, n_local_crops=crops.local_crops_number,
            student_temp=cfg.dino.student_temp, center_momentum=cfg.dino.center_momentum,
            centering=cfg.dino.centering,
        ).to(device)
        if cfg.dino.koleo_weight < 0:
            raise ValueError(f"config key 'dino.koleo_weight' must be >= 0, got {cfg.dino.koleo_weight}")
        self.collate_fn = multicrop_collate

    def train_dataset(self) -> Dataset:
        crops = self.cfg.crops
        mean, std, grayscale = normalization_for(self.cfg.data.dataset)
        if crops.global_crops_number != 2:
            raise ValueError(f"config key 'crops.global_crops_number' must be 2 for DINO, got {crops.global_crops_number}")
        transform = MultiCropTransform(
            global_crops_size=crops.global_crops_size, local_crops_size=crops.local_crops_size,
            global_crops_scale=crops.global_crops_scale, local_crops_scale=crops.local_crops_scale,
            local_crops_number=crops.local_crops_number, mean=mean, std=std, grayscale_input=grayscale,
        )
        return build_dataset(self.cfg.data, "train", transform)

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, "loss": self.loss_fn}

    def eval_backbone(self) -> nn.Module:
        return self.teacher.backbone  # DINO evaluates the teacher

    def eval_data(self) -> tuple[Any, Callable]:
        return self.cfg.data, eval_transform_for(self.cfg.data.dataset, self.cfg.crops.global_crops_size)

    def modules_to_optimise(self) -> nn.Module:
        return self.student

    def batch_size(self, batch: Any) -> int:
        return batch[0][0].shape[0]

    def loss(self, batch: Any, step: int, epoch: int, teacher_temp: Optional[float] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if teacher_temp is None:
            raise ValueError("DinoMethod.loss needs the step's teacher_temp (Schedules.at gives it)")
        crops = [c.to(self.device, non_blocking=True) for c in batch[0]]
        n_global = self.cfg.crops.global_crops_number
        with torch.no_grad():
            teacher_out = self.teacher(crops[:n_global])  # only the global crops reach the teacher
        koleo_weight = self.cfg.dino.koleo_weight
        student_out, embeddings = self.train_module(crops, return_embeddings=True)
        loss, stats = self.loss_fn(student_out, teacher_out, teacher_temp, return_stats=True)
        stats = dict(stats, teacher_temp=torch.tensor(teacher_temp))
        if koleo_weight:  # as DINOv2: on each global crop's embeddings apart, summed
            global_embeddings = embeddings[: n_global * crops[0].shape[0]].chunk(n_global)
            koleo = sum(koleo_loss(e) for e in global_embeddings)
            stats["koleo"] = koleo.detach()
            loss = loss + koleo_weight * koleo
        return loss, stats

    def before_optimizer_step(self, step: int, epoch: int) -> None:
        if epoch < self.cfg.optim.freeze_last_layer:  # as DINO v1: no update of the prototypes yet
            for p in self.student.head.last_layer_parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int, momentum: Optional[float] = None) -> None:
        if momentum is None:
            raise ValueError("DinoMethod.after_optimizer_step needs the step's teacher momentum (Schedules.at gives it)")
        m = float(momentum)
        student = [p.detach() for p in self.student.parameters()]
        teacher = [p for p in self.teacher.parameters()]
        # teacher <- m·teacher + (1 - m)·student, as one pass over each tensor
        torch._foreach_lerp_(teacher, student, 1.0 - m)

    def warnings(self, metrics: dict[str, float]) -> list[str]:
        return collapse_warnings(metrics, self.cfg.dino.out_dim)

    def describe(self) -> list[str]:
        backbone = self.student.backbone
        lines = [f"student backbone: {count_parameters(backbone):,} parameters "
                 f"({len(backbone.blocks)} blocks + {backbone.readout_type} read-out, embedding {backbone.out_dim})",
                 f"DINO head: {count_parameters(self.student.head):,} parameters, {self.cfg.dino.out_dim} prototypes"]
        if backbone.readout_type == "sparo":
            baseline_cfg = type(self.cfg.model)(**{**self.cfg.model.__dict__, "readout": "cls", "reduce_depth": 0})
            baseline = build_backbone(baseline_cfg)
            lines.append(f"class-token baseline backbone: {count_parameters(baseline):,} parameters "
                         f"(SPARO model is {count_parameters(backbone) / count_parameters(baseline):.3f}× its size)")
        lines.append(f"loss at uniform output: ln({self.cfg.dino.out_dim}) = {math.log(self.cfg.dino.out_dim):.3f}")
        return lines
