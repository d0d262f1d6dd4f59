"""Vision Transformer backbone built from timm's layers around the project's one attention module.

Parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so timm and DINO weights
load strictly. Our own :class:`~dino_sparo.layers.block.Block` (not timm's) passes xformers biases for packed multi-crop
sequences (:meth:`VisionTransformer.forward_packed`). The read-out sits on top: SPARO
(``readout="sparo"``) or the class token (``readout="cls"``, the plain DINO baseline).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional, Sequence

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from torch import nn

from dino_sparo.config import ARCHS  # width, depth, heads of the standard sizes; patch and image size are free
from dino_sparo.layers.block import Block
from dino_sparo.sparo import SPARO, create_readout

READOUTS = ("sparo", "cls")


class VisionTransformer(nn.Module):
    """ViT returning an embedding per image: SPARO's ``L·V`` or the class token's ``D``.

    ``depth`` is the architecture's depth; ``reduce_depth`` blocks are removed from its end so the
    read-out takes the place of their parameters (SPARO's setting, default 1 for SPARO, 0 for cls).
    Crops of any size go through the same network: position embeddings are resampled to the grid.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        readout: str = "sparo",
        reduce_depth: Optional[int] = None,
        sparo: Optional[dict] = None,
        attn_backend: str = "auto",
        num_registers: int = 0,
        sparo_attend_registers: bool = False,
        layer_scale_init: Optional[float] = None,
    ) -> None:
        super().__init__()
        if num_registers < 0:
            raise ValueError(f"model.num_registers must be >= 0, got {num_registers}")
        if readout not in READOUTS:
            raise ValueError(f"model.readout must be one of {READOUTS}, got {readout!r}")
        if reduce_depth is None:
            reduce_depth = 1 if readout == "sparo" else 0
        if not 0 <= reduce_depth < depth:
            raise ValueError(f"model.reduce_depth must lie in [0, {depth - 1}], got {reduce_depth}")
        self.readout_type = readout
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.arch_depth = depth
        self.reduce_depth = reduce_depth
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # registers (Darcet et al. 2024; DINOv2-reg): tokens after the class token, without position
        # embedding, that the blocks may use as scratch space and every output drops
        self.num_registers, self.sparo_attend_registers = num_registers, sparo_attend_registers
        self.num_prefix_tokens = 1 + num_registers
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        kept = depth - reduce_depth
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # the schedule of the full depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], attn_backend, layer_scale_init)
            for i in range(kept)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.sparo: Optional[SPARO] = create_readout(readout, embed_dim, num_heads, sparo)
        self.out_dim = embed_dim if self.sparo is None else self.sparo.embed_dim
        self.attn_backend = attn_backend
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)  # as DINOv2's register tokens
        for name, module in self.named_modules():
            if name.startswith("sparo"):
                continue  # SPARO initialises itself as its reference does
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_attn_backend(self, backend: str) -> None:
        self.attn_backend = backend
        for block in self.blocks:
            block.attn.backend = backend

    def prepare_tokens(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None,
                       mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class token, registers, patch tokens (``B × (1 + R + P) × D``), position embeddings
        resampled to this grid (none on the registers). With ``masks`` (``B × P`` bool), the
        embeddings of the masked patches are replaced by ``mask_token`` (``D``) before their
        position embedding is added (iBOT, as DINOv2)."""
        b, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}×{w} is not a multiple of the patch size {self.patch_size}")
        tokens = self.patch_embed(x)  # B × P × D
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), mask_token.to(tokens.dtype).view(1, 1, -1), tokens)
        grid = (h // self.patch_size, w // self.patch_size)
        pos = self.pos_embed
        if pos.shape[1] - 1 != grid[0] * grid[1]:
            pos = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=1)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + pos.to(tokens.dtype)
        if self.reg_token is None:
            return tokens
        registers = self.reg_token.expand(b, -1, -1).to(tokens.dtype)
        return torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)

    def run_blocks(self, x: torch.Tensor, attn_bias: Any = None) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, attn_bias, use_reentrant=False)
            else:
                x = block(x, attn_bias=attn_bias)
        return x

    def forward_tokens(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None,
                       mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-normed tokens ``B × (1 + R + P) × D``: class token, R registers, patches."""
        return self.norm(self.run_blocks(self.prepare_tokens(x, masks, mask_token)))

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patches' part (``B × P × D``) of :meth:`forward_tokens`: no class token, no registers.
        With SPARO these are the tokens of the last block before the read-out (what iBOT trains)."""
        return tokens[:, self.num_prefix_tokens:]

    def readout_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens SPARO's slots attend over: all, or without the registers
        (``model.sparo.attend_registers: false``)."""
        if self.num_registers and not self.sparo_attend_registers:
            return torch.cat([tokens[:, :1], tokens[:, self.num_prefix_tokens:]], dim=1)
        return tokens

    def split_attention(self, attn: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """SPARO's ``B × L × N`` weights as (class token ``B × L``, registers ``B × L × R`` or None
        when the slots do not see them, patches ``B × L × P``)."""
        if self.num_registers and self.sparo_attend_registers:
            return attn[..., 0], attn[..., 1:self.num_prefix_tokens], attn[..., self.num_prefix_tokens:]
        return attn[..., 0], None, attn[..., 1:]

    def class_and_patch_attention(self, attn: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """SPARO's weights on the class token and the patches (``B × L × (1 + P)``, what pictures and
        slot measures read), and each slot's total weight on the registers (``B × L``; None when the
        slots do not see them)."""
        cls, registers, patches = self.split_attention(attn)
        return torch.cat([cls.unsqueeze(-1), patches], dim=-1), None if registers is None else registers.sum(-1)

    def readout(self, tokens: torch.Tensor, return_attn: bool = False):
        """Embedding from normed tokens; with ``return_attn`` also SPARO's ``B × L × N`` weights
        over :meth:`readout_tokens` (split them with :meth:`split_attention`)."""
        if self.sparo is None:
            return tokens[:, 0], None
        out = self.sparo(self.readout_tokens(tokens), return_attn=return_attn)
        return out.embedding, out.attn

    def forward_features(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None,
                         mask_token: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding (``B × E``) and the normed patch tokens (``B × P × D``) of one forward."""
        tokens = self.forward_tokens(x, masks, mask_token)
        return self.readout(tokens)[0], self.patch_tokens(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding, _ = self.readout(self.forward_tokens(x))
        return embedding

    def forward_packed(self, batches: Sequence[torch.Tensor], masks: Optional[torch.Tensor] = None,
                       mask_token: Optional[torch.Tensor] = None, return_patches: bool = False):
        """Embeddings of image batches of different sizes from one pass through the blocks.

        The tokens of all images are packed into one sequence with an xformers block-diagonal bias,
        so each image attends only to its own tokens (DINOv2's multi-crop packing); the final-normed
        sequence is split back per batch and each batch is read out on its own tokens. Needs the
        xformers attention backend. Returns one ``B_i × E`` embedding per input batch; with
        ``return_patches`` also the first batch's patch tokens. ``masks`` apply to the first batch.
        """
        from xformers.ops.fmha import BlockDiagonalMask

        tokens = [self.prepare_tokens(x, masks if i == 0 else None, mask_token) for i, x in enumerate(batches)]
        device = tokens[0].device
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():  # the bias' offsets go there
            bias, packed = BlockDiagonalMask.from_tensor_list(tokens)  # packed: 1 × Σ B_i·N_i × D
        packed = self.norm(self.run_blocks(packed, attn_bias=bias))
        parts = bias.split(packed)  # part: B_i × N_i × D
        embeddings = [self.readout(part)[0] for part in parts]
        return (embeddings, self.patch_tokens(parts[0])) if return_patches else embeddings


def vit(arch: str = "vit_small", *, embed_dim: Optional[int] = None, depth: Optional[int] = None,
        num_heads: Optional[int] = None, **kwargs: Any) -> VisionTransformer:
    """Build a ViT by size name (see ``ARCHS``); ``embed_dim/depth/num_heads`` override the size."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {sorted(ARCHS)}, got {arch!r}")
    width, layers, heads = ARCHS[arch]
    return VisionTransformer(embed_dim=embed_dim or width, depth=depth or layers,
                             num_heads=num_heads or heads, **kwargs)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
