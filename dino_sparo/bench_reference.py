"""The reference DINO step the benchmark measures ours against.

Written the way facebookresearch/dino (v1) writes its training step, so the comparison shows what
the project's choices buy on the same data, precision and threads: a ViT with explicit softmax
attention and all ``depth`` blocks read out by the class token, DINO's own drop path and bicubic
position-embedding interpolation (with its +0.1 offset), a multi-crop wrapper doing one backbone
forward per resolution and growing its output by ``torch.cat``, the v1 loss (a log-softmax per crop
pair), a finiteness check with ``loss.item()``, per-parameter gradient clipping that reads every norm
back to the host, ``torch.optim.AdamW`` with its default implementation, and a teacher EMA as a Python
loop over parameters. The projection head is the project's :class:`DINOHead`, which computes what
DINO's does. Used only for timing: it shares no code with the model it is compared with.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dino_sparo.models.heads import DINOHead


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Explicit ``softmax(q kᵀ · scale) v``: the attention matrix is materialised and kept for backward."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # B × H × N × d
        attn = (q @ k.transpose(-2, -1)) * self.scale  # B × H × N × N
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x)), attn


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(self.norm1(x))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO v1's ViT: every block kept, the final-normed class token is the embedding."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rates[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        class_pos_embed, patch_pos_embed = self.pos_embed[:, 0], self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size + 0.1, h // self.patch_size + 0.1  # DINO's offset against rounding
        side = int(math.sqrt(n))
        patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                                        scale_factor=(w0 / side, h0 / side), mode="bicubic")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        return self.pos_drop(x + self.interpolate_pos_encoding(x, w, h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


class MultiCropWrapper(nn.Module):
    """DINO v1's wrapper: one backbone forward per run of equal resolutions, outputs grown by cat."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            out = self.backbone(torch.cat(x[start_idx:end_idx]))
            output = torch.cat((output, out))
            start_idx = end_idx
        return self.head(output)


class DINOLoss(nn.Module):
    """DINO v1's loss: a log-softmax of the student per (teacher, student) crop pair."""

    def __init__(self, out_dim: int, ncrops: int, teacher_temp: float, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def clip_gradients(model: nn.Module, clip: float) -> list[float]:
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


def get_params_groups(model: nn.Module) -> list[dict]:
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class ReferenceStep:
    """A DINO v1 training step on fixed crops: ``step(it)`` runs forward, backward, clipping,
    AdamW and the EMA, as ``train_one_epoch`` does for one iteration."""

    def __init__(self, *, arch: tuple[int, int, int], patch_size: int, img_size: int, out_dim: int,
                 n_local_crops: int, device: torch.device, autocast_dtype: Optional[torch.dtype],
                 drop_path_rate: float = 0.1, clip_grad: float = 3.0, freeze_last_layer: int = 0,
                 lr: float = 5e-4, weight_decay: float = 0.04, momentum_teacher: float = 0.996,
                 teacher_temp: float = 0.04, total_steps: int = 1000) -> None:
        width, depth, heads = arch

        def network(rate: float) -> MultiCropWrapper:
            backbone = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth,
                                         num_heads=heads, drop_path_rate=rate)
            return MultiCropWrapper(backbone, DINOHead(width, out_dim))

        self.device, self.autocast_dtype = device, autocast_dtype
        self.student, self.teacher = network(drop_path_rate).to(device), network(0.0).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.dino_loss = DINOLoss(out_dim, n_local_crops + 2, teacher_temp).to(device)
        self.optimizer = torch.optim.AdamW(get_params_groups(self.student))  # the default implementation
        self.fp16_scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        self.lr, self.weight_decay = lr, weight_decay
        self.momentum_schedule = 1 + (momentum_teacher - 1) * (1 + np.cos(np.pi * np.arange(total_steps) / total_steps)) / 2
        self.student.train()

    def step(self, images: Sequence[torch.Tensor], it: int, epoch: int = 0) -> float:
        for i, param_group in enumerate(self.optimizer.param_groups):
            param_group["lr"] = self.lr
            if i == 0:
                param_group["weight_decay"] = self.weight_decay
        images = [im.to(self.device, non_blocking=True) for im in images]
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else nullcontext())
        with autocast:
            teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            loss = self.dino_loss(student_output, teacher_output)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"reference step: loss is {loss.item()}")
        self.optimizer.zero_grad()
        if self.fp16_scaler is None:
            loss.backward()
            if self.clip_grad:
                clip_gradients(self.student, self.clip_grad)
            cancel_gradients_last_layer(epoch, self.student, self.freeze_last_layer)
            self.optimizer.step()
        else:
            self.fp16_scaler.scale(loss).backward()
            if self.clip_grad:
                self.fp16_scaler.unscale_(self.optimizer)
                clip_gradients(self.student, self.clip_grad)
            cancel_gradients_last_layer(epoch, self.student, self.freeze_last_layer)
            self.fp16_scaler.step(self.optimizer)
            self.fp16_scaler.update()
        with torch.no_grad():
            m = self.momentum_schedule[it % len(self.momentum_schedule)]
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()
