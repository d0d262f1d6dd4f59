"""The pre-norm transformer block both towers are built of (timm's parameter names), with what
packed multi-crop sequences need: per-image stochastic depth and the test for a packed bias."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from dino_sparo.layers.attention import Attention

__all__ = ["Block", "drop_path_per_image", "is_packed"]


def is_packed(attn_bias: Any) -> bool:
    """True for an xformers block-diagonal bias: the batch dim then holds one sequence of many images."""
    return attn_bias is not None and not isinstance(attn_bias, torch.Tensor) and hasattr(attn_bias, "q_seqinfo")


def drop_path_per_image(y: torch.Tensor, drop_path: nn.Module, seqstarts: Sequence[int]) -> torch.Tensor:
    """Stochastic depth on a packed ``1 × T × D`` sequence: one keep/drop draw per image (as timm's
    ``DropPath`` does per batch row), not one for the whole pack. ``seqstarts`` are the images' token
    offsets; images of one size sit next to each other, so each run of equal lengths is one expand."""
    if not isinstance(drop_path, DropPath) or not drop_path.training or drop_path.drop_prob == 0.0:
        return drop_path(y)
    keep_prob = 1.0 - drop_path.drop_prob
    lengths = [end - start for start, end in zip(seqstarts[:-1], seqstarts[1:])]
    keep = y.new_empty(len(lengths)).bernoulli_(keep_prob)  # one draw per image
    if drop_path.scale_by_keep:
        keep.div_(keep_prob)
    scales, first = [], 0
    while first < len(lengths):  # runs of images with the same number of tokens
        last = first
        while last + 1 < len(lengths) and lengths[last + 1] == lengths[first]:
            last += 1
        count = last - first + 1
        scales.append(keep[first:last + 1, None].expand(count, lengths[first]).reshape(-1))  # count·N
        first = last + 1
    return y * torch.cat(scales)[None, :, None]  # 1 × T × D


class Block(nn.Module):
    """Pre-norm transformer block (timm names), forwarding an optional attention bias or mask.

    ``layer_scale_init`` adds LayerScale (CaiT; DINOv2 uses 1e-5): a learned per-channel scale on
    each branch, started small, so a deep network starts close to the identity (``ls1.gamma``,
    ``ls2.gamma``, the names of timm and DINOv2, whose weights need it)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, attn_backend: str = "auto",
                 layer_scale_init: Optional[float] = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, backend=attn_backend)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_bias: Any = None,
                key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        y, _ = self.attn(self.norm1(x), attn_bias=attn_bias, key_padding_mask=key_padding_mask,
                         is_causal=is_causal)
        if is_packed(attn_bias):  # many images in one sequence: drop paths per image
            starts = attn_bias.q_seqinfo.seqstart_py
            x = x + drop_path_per_image(self.ls1(y), self.drop_path1, starts)
            return x + drop_path_per_image(self.ls2(self.mlp(self.norm2(x))), self.drop_path2, starts)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
