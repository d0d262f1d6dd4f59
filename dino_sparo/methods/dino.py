"""DINO self-distillation with a SPARO (or class-token) read-out on student and teacher."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from dino_sparo.data.datasets import build_dataset
from dino_sparo.data.batched_augment import augment_crops
from dino_sparo.data.masking import MaskedCrops, masked_multicrop_collate
from dino_sparo.data.transforms import (DeviceMultiCropTransform, MultiCropTransform, device_multicrop_collate,
                                        dino_normalization, eval_transform_for, multicrop_collate)
from dino_sparo.losses import DINOLoss, IBOTPatchLoss, collapse_warnings, koleo_loss
from dino_sparo.methods.base import Method, shard_index_cache
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

    With iBOT, ``ibot_head`` is the patch head (None: the image head serves the patches too) and
    ``mask_token`` the learned embedding that replaces masked patches (DINOv2 keeps it beside the
    backbone too; here it lives on the wrapper, so a backbone's keys are the same with or without iBOT).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pack_crops: bool = False,
                 ibot_head: Optional[nn.Module] = None, mask_token: bool = False) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.ibot_head = ibot_head
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim)) if mask_token else None
        self.pack_crops = pack_crops
        self._told_no_packing = False

    def _can_pack(self, device: torch.device) -> bool:
        backend = resolve_attention_backend(self.backbone.attn_backend, device)
        if backend != "xformers" and not self._told_no_packing:
            logger.warning("model.pack_crops needs the xformers attention backend (have %r on %s): "
                           "running one forward per crop size instead", backend, device.type)
            self._told_no_packing = True
        return backend == "xformers"

    def forward(self, crops: Sequence[torch.Tensor], return_embeddings: bool = False,
                masks: Optional[torch.Tensor] = None, patch_index: Optional[torch.Tensor] = None):
        """Head outputs of all crops; with ``return_embeddings`` also the backbone's embeddings
        (the read-out, before the head), in the same crop-major order.

        iBOT: ``masks`` (``(G·B) × P`` bool) replace the masked patches of the first crop size (the
        global crops) by the mask token; with ``patch_index`` (flat positions in ``(G·B) × P``) the
        patch head's outputs of those patches come third: ``(outputs, embeddings, patch_outputs)``.
        """
        batches, start = [], 0
        while start < len(crops):  # consecutive crops of one size form one batch
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            batches.append(crops[start] if end - start == 1 else torch.cat(list(crops[start:end])))
            start = end
        if masks is not None and self.mask_token is None:
            raise ValueError("MultiCropWrapper was built without a mask token (iBOT off) but got masks")
        want_patches = patch_index is not None
        patches = None
        if self.pack_crops and len(batches) > 1 and self._can_pack(batches[0].device):
            result = self.backbone.forward_packed(batches, masks, self.mask_token, return_patches=want_patches)
            embeddings, patches = result if want_patches else (result, None)
        elif want_patches or masks is not None:
            first, patches = self.backbone.forward_features(batches[0], masks, self.mask_token)
            embeddings = [first] + [self.backbone(x) for x in batches[1:]]
        else:
            embeddings = [self.backbone(x) for x in batches]
        embedding = torch.cat(embeddings)
        output = self.head(embedding)
        if want_patches:
            patch_head = self.head if self.ibot_head is None else self.ibot_head
            chosen = patches.reshape(-1, patches.shape[-1]).index_select(0, patch_index)  # M × D
            return output, embedding, patch_head(chosen)
        return (output, embedding) if return_embeddings else output


def ibot_out_dim(cfg: Any) -> int:
    """Prototypes of iBOT's patch head: its own (``ibot.out_dim``) with a separate head, else DINO's."""
    return cfg.ibot.out_dim or cfg.dino.out_dim if cfg.ibot.separate_head else cfg.dino.out_dim


def build_student_teacher(cfg: Any) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher as two separate networks (a teacher sharing the student's modules
    collapses); the teacher starts from the student's weights, without drop path. With iBOT on
    (``ibot.loss_weight`` > 0) both carry the mask token and, with ``ibot.separate_head``, a patch head
    (the teacher's copies follow the student's by EMA; the teacher never uses its mask token)."""
    ibot = cfg.ibot.loss_weight > 0

    def head(in_dim: int, out_dim: int, norm_last_layer: bool) -> DINOHead:
        return DINOHead(in_dim, out_dim, use_bn=cfg.dino.use_bn_in_head, norm_last_layer=norm_last_layer,
                        hidden_dim=cfg.dino.head_hidden_dim, bottleneck_dim=cfg.dino.head_bottleneck_dim)

    def network(drop_path: float, norm_last_layer: bool) -> MultiCropWrapper:
        model_cfg = cfg.model
        backbone = build_backbone(type(model_cfg)(**{**model_cfg.__dict__, "drop_path_rate": drop_path}))
        ibot_head = None
        if ibot and cfg.ibot.separate_head:
            ibot_head = head(backbone.embed_dim, ibot_out_dim(cfg), norm_last_layer)
        return MultiCropWrapper(backbone, head(backbone.out_dim, cfg.dino.out_dim, norm_last_layer),
                                pack_crops=cfg.model.pack_crops, ibot_head=ibot_head, mask_token=ibot)

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
        self.ibot_weight = cfg.ibot.loss_weight
        self.ibot_loss_fn = None
        if self.ibot_weight:
            self.ibot_loss_fn = IBOTPatchLoss(ibot_out_dim(cfg), student_temp=cfg.dino.student_temp,
                                              center_momentum=cfg.dino.center_momentum,
                                              centering=cfg.dino.centering).to(device)
        self.augment_on_device = cfg.data.augment_on == "device"  # validate_config: not with iBOT
        self.collate_fn = (device_multicrop_collate if self.augment_on_device
                           else masked_multicrop_collate if self.ibot_weight else multicrop_collate)
        self.transform = self._transform()

    def _transform(self) -> Any:
        """DINO's multi-crop views: all in the loader, or (``data.augment_on: device``) crops and
        flips there and the photometric half batched at the start of the step (:meth:`views`); with
        iBOT, the global crops' masks come with the crops, drawn per image."""
        crops = self.cfg.crops
        mean, std, grayscale = dino_normalization(self.cfg)
        common = dict(global_crops_size=crops.global_crops_size, local_crops_size=crops.local_crops_size,
                      global_crops_scale=crops.global_crops_scale, local_crops_scale=crops.local_crops_scale,
                      local_crops_number=crops.local_crops_number, mean=mean, std=std, grayscale_input=grayscale)
        if self.augment_on_device:  # DINO's colour recipe and three channels (validate_config holds it)
            return DeviceMultiCropTransform(**common)
        transform = MultiCropTransform(**common, channels=self.cfg.model.in_chans,
                                       color_jitter_strength=crops.color_jitter_strength,
                                       grayscale_prob=crops.grayscale_prob)
        if self.ibot_weight:
            ibot = self.cfg.ibot
            return MaskedCrops(transform, crops.global_crops_number, crops.global_crops_size // self.cfg.model.patch_size,
                               ibot.mask_probability, ibot.mask_ratio)
        return transform

    def views(self, batch: Any) -> list[torch.Tensor]:
        """The batch's normalised crops on the training device."""
        if not self.augment_on_device:
            return [c.to(self.device, non_blocking=True) for c in batch[0]]
        t = self.transform
        return augment_crops(batch[0], batch[2], t.mean, t.std, t.kernel_size, self.device)

    def train_dataset(self) -> Dataset:
        return build_dataset(self.cfg.data, "train", self.transform, index_cache=shard_index_cache(self.cfg))

    def modules(self) -> dict[str, nn.Module]:
        modules = {"student": self.student, "teacher": self.teacher, "loss": self.loss_fn}
        if self.ibot_loss_fn is not None:
            modules["ibot_loss"] = self.ibot_loss_fn
        return modules

    def eval_backbone(self) -> nn.Module:
        return self.teacher.backbone  # DINO evaluates the teacher

    def eval_data(self) -> tuple[Any, Callable]:
        return self.cfg.data, eval_transform_for(self.cfg.data.dataset, self.cfg.crops.global_crops_size, cfg=self.cfg)

    def modules_to_optimise(self) -> nn.Module:
        return self.student

    def batch_size(self, batch: Any) -> int:
        return batch[0][0].shape[0]

    def loss(self, batch: Any, step: int, epoch: int, teacher_temp: Optional[float] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if teacher_temp is None:
            raise ValueError("DinoMethod.loss needs the step's teacher_temp (Schedules.at gives it)")
        crops = self.views(batch)
        n_global = self.cfg.crops.global_crops_number
        if self.ibot_weight:
            return self._loss_with_ibot(crops, batch[2], teacher_temp)
        with torch.no_grad():
            teacher_out = self.teacher(crops[:n_global])  # only the global crops reach the teacher
        student_out, embeddings = self.train_module(crops, return_embeddings=True)
        return self._image_loss(student_out, teacher_out, embeddings, crops, teacher_temp)

    def _loss_with_ibot(self, crops: list[torch.Tensor], masking: tuple, teacher_temp: float
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DINO's loss plus ``ibot.loss_weight`` × iBOT's: the student sees its global crops masked,
        the teacher the same crops unmasked, and the patch heads meet on the masked patches."""
        masks, index, weight = (t.to(self.device, non_blocking=True) for t in masking)
        n_global = self.cfg.crops.global_crops_number
        with torch.no_grad():  # the teacher never sees a mask
            teacher_out, _, teacher_patches = self.teacher(crops[:n_global], patch_index=index)
        student_out, embeddings, student_patches = self.train_module(crops, masks=masks, patch_index=index)
        loss, stats = self._image_loss(student_out, teacher_out, embeddings, crops, teacher_temp)
        ibot_loss, ibot_stats = self.ibot_loss_fn(student_patches, teacher_patches, weight, masks.shape[0],
                                                  teacher_temp, return_stats=True)
        stats.update(ibot_stats, ibot_loss=ibot_loss.detach(),
                     ibot_masked_share=masks.float().mean())
        return loss + self.ibot_weight * ibot_loss, stats

    def _image_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, embeddings: torch.Tensor,
                    crops: list[torch.Tensor], teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DINO's image-level loss and, with ``dino.koleo_weight``, KoLeo."""
        n_global = self.cfg.crops.global_crops_number
        koleo_weight = self.cfg.dino.koleo_weight
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
            heads = [self.student.head] + ([self.student.ibot_head] if self.student.ibot_head is not None else [])
            for head in heads:
                for p in head.last_layer_parameters():
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
        warnings = collapse_warnings(metrics, self.cfg.dino.out_dim)
        if self.ibot_weight:
            warnings += collapse_warnings(metrics, ibot_out_dim(self.cfg), prefix="ibot_")
        return warnings

    def describe(self) -> list[str]:
        backbone = self.student.backbone
        lines = [f"student backbone: {count_parameters(backbone):,} parameters "
                 f"({len(backbone.blocks)} blocks + {backbone.readout_type} read-out, embedding {backbone.out_dim})",
                 f"DINO head: {count_parameters(self.student.head):,} parameters, {self.cfg.dino.out_dim} prototypes"]
        if backbone.num_registers:
            lines.append(f"{backbone.num_registers} register tokens (SPARO's slots "
                         f"{'attend to them' if backbone.sparo_attend_registers else 'do not see them'})")
        if self.ibot_weight:
            ibot = self.cfg.ibot
            head = (f"its own head ({count_parameters(self.student.ibot_head):,} parameters, "
                    f"{ibot_out_dim(self.cfg)} prototypes)" if self.student.ibot_head is not None else "the DINO head")
            lines.append(f"iBOT: weight {ibot.loss_weight}, {ibot.mask_probability:.0%} of global crops masked "
                         f"({ibot.mask_ratio[0]:.0%}-{ibot.mask_ratio[1]:.0%} of their patches), {head}")
        if backbone.readout_type == "sparo":
            baseline_cfg = type(self.cfg.model)(**{**self.cfg.model.__dict__, "readout": "cls", "reduce_depth": 0})
            baseline = build_backbone(baseline_cfg)
            lines.append(f"class-token baseline backbone: {count_parameters(baseline):,} parameters "
                         f"(SPARO model is {count_parameters(backbone) / count_parameters(baseline):.3f}× its size)")
        lines.append(f"loss at uniform output: ln({self.cfg.dino.out_dim}) = {math.log(self.cfg.dino.out_dim):.3f}")
        return lines
