"""The CLIP model of CLIP mode: our ViT as the image tower, the causal text tower, one logit scale.

With SPARO read-outs both towers already produce unit-norm ``L·V`` embeddings in the same slot
layout (``model.sparo`` configures both), so no projection follows them. The plain-CLIP baselines
read the image class token / the text end-of-text token and project each linearly (no bias, as
CLIP) to a joint ``embed_dim``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dino_sparo.errors import ConfigError, UsageError
from dino_sparo.models.build import build_backbone
from dino_sparo.models.text import EOT_TOKEN_ID, VOCAB_SIZE, TextTransformer
from dino_sparo.models.vit import VisionTransformer, count_parameters
from dino_sparo.sparo import readout_options


class CLIPModel(nn.Module):
    """Image and text towers mapped into one embedding space, plus CLIP's learnable logit scale.

    Args:
        visual: the image tower (``readout="sparo"`` or ``"cls"``).
        text: the text tower (``readout="sparo"`` or ``"eot"``).
        embed_dim: joint width of the plain-CLIP projections; unused when both towers use SPARO.
        init_temperature: the logit scale starts at ln(1 / init_temperature) (CLIP: 0.07).
        max_logit_scale: the scale is clamped at ln(max_logit_scale) (CLIP: 100) after each step.
        share_queries: the text SPARO uses the very same query parameter as the image SPARO.
    """

    def __init__(
        self,
        visual: VisionTransformer,
        text: TextTransformer,
        embed_dim: int = 512,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        share_queries: bool = False,
    ) -> None:
        super().__init__()
        if init_temperature <= 0 or max_logit_scale <= 1.0 / init_temperature:
            raise ConfigError(f"config keys 'clip.init_temperature' ({init_temperature}) and 'clip.max_logit_scale' "
                             f"({max_logit_scale}) must satisfy 0 < 1 / init_temperature < max_logit_scale")
        self.visual, self.text = visual, text
        self.image_projection = None if visual.sparo is not None else nn.Linear(visual.out_dim, embed_dim, bias=False)
        self.text_projection = None if text.sparo is not None else nn.Linear(text.out_dim, embed_dim, bias=False)
        for projection, width in ((self.image_projection, visual.out_dim), (self.text_projection, text.out_dim)):
            if projection is not None:
                nn.init.normal_(projection.weight, std=width ** -0.5)  # CLIP's initialisation
        self.image_dim = embed_dim if self.image_projection is not None else visual.out_dim
        self.text_dim = embed_dim if self.text_projection is not None else text.out_dim
        if self.image_dim != self.text_dim:
            raise ValueError(f"image embeddings ({self.image_dim} dims) and text embeddings ({self.text_dim} dims) "
                             "must have the same width: use SPARO on both towers (same model.sparo) or on neither, "
                             "or set clip.embed_dim to the SPARO width num_slots·slot_dim")
        self.embed_dim = self.image_dim
        self.max_log_scale = math.log(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.shares_queries = share_queries
        if share_queries:
            if visual.sparo is None or text.sparo is None:
                raise ConfigError("config key 'clip.share_queries' needs SPARO read-outs on both towers")
            if visual.sparo.queries.shape != text.sparo.queries.shape:
                raise ConfigError(f"config key 'clip.share_queries': image queries {tuple(visual.sparo.queries.shape)} "
                                 f"and text queries {tuple(text.sparo.queries.shape)} differ in shape; "
                                 "set model.sparo.attn_dim so both towers use the same key width")
            text.sparo.queries = visual.sparo.queries  # one Parameter, two users

    @property
    def is_sparo(self) -> bool:
        return self.visual.sparo is not None and self.text.sparo is not None

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.visual(images)  # B × E (SPARO L·V, or the class token's D)
        if self.image_projection is not None:
            features = self.image_projection(features)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text(tokens)  # B × E
        if self.text_projection is not None:
            features = self.text_projection(features)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit-norm image and text embeddings (``B × E`` each) and the logit scale exp(s)."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(s) within [1, max_logit_scale] (open_clip clamps after every optimiser step)."""
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def slot_layout(self) -> Optional[tuple[int, int]]:
        """``(L, V)`` when both towers use SPARO, else None."""
        if not self.is_sparo:
            return None
        return self.visual.sparo.num_slots, self.visual.sparo.slot_dim


def text_readout(cfg: Any) -> str:
    """``clip.text_readout``, or the image read-out's counterpart (sparo -> sparo, cls -> eot)."""
    return cfg.clip.text_readout or ("sparo" if cfg.model.readout == "sparo" else "eot")


def build_text_tower(cfg: Any, vocab_size: int = VOCAB_SIZE, eot_token_id: int = EOT_TOKEN_ID) -> TextTransformer:
    """Text tower from ``cfg.clip``; its SPARO takes ``cfg.model.sparo`` (the image tower's slots)."""
    options = readout_options(cfg.model.sparo)
    clip = cfg.clip
    return TextTransformer(
        vocab_size=vocab_size, context_length=clip.context_length, width=clip.text_width, depth=clip.text_depth,
        num_heads=clip.text_heads, mlp_ratio=clip.text_mlp_ratio, readout=text_readout(cfg),
        reduce_depth=clip.text_reduce_depth, sparo=options, eot_token_id=eot_token_id,
        attn_backend=cfg.model.attn_backend,
    )


def build_clip_model(cfg: Any) -> CLIPModel:
    """The CLIP model of a ``TrainConfig`` (image tower: ``cfg.model``; the rest: ``cfg.clip``)."""
    return CLIPModel(
        build_backbone(cfg.model), build_text_tower(cfg), embed_dim=cfg.clip.embed_dim,
        init_temperature=cfg.clip.init_temperature, max_logit_scale=cfg.clip.max_logit_scale,
        share_queries=cfg.clip.share_queries,
    )


def baseline_config(cfg: Any) -> Any:
    """The plain-CLIP counterpart of a SPARO config: class token / end-of-text token + projection,
    all blocks kept (for parameter-count comparisons)."""
    model = dataclasses.replace(cfg.model, readout="cls", reduce_depth=0)
    clip = dataclasses.replace(cfg.clip, text_readout="eot", text_reduce_depth=0, share_queries=False)
    return dataclasses.replace(cfg, model=model, clip=clip)


def describe_parameters(model: CLIPModel) -> list[str]:
    """Log lines with the parameter count of each part."""
    projections = sum(count_parameters(p) for p in (model.image_projection, model.text_projection) if p is not None)
    return [
        f"image tower: {count_parameters(model.visual):,} parameters ({len(model.visual.blocks)} blocks + "
        f"{model.visual.readout_type} read-out, {model.visual.out_dim} dims)",
        f"text tower: {count_parameters(model.text):,} parameters ({len(model.text.blocks)} blocks + "
        f"{model.text.readout_type} read-out, {model.text.out_dim} dims)"
        + (" (queries shared with the image tower)" if model.shares_queries else ""),
        f"projections: {projections:,} parameters; joint embedding {model.embed_dim} dims",
        f"CLIP model: {count_parameters(model):,} parameters in total",
    ]


def load_clip_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[CLIPModel, Any, Any]:
    """``(model in eval mode, its TrainConfig, its tokeniser)`` from a CLIP-mode ``checkpoint.pth``,
    loaded strictly."""
    from dino_sparo.checkpoint import load_run  # noqa: PLC0415
    from dino_sparo.models.text import Tokenizer  # noqa: PLC0415

    run = load_run(path)
    state, cfg = run.state, run.cfg
    if "model" not in state:
        raise UsageError(f"checkpoint {path} holds no CLIP model (its keys: {sorted(state)}); "
                       "was it written by dino-sparo-train --mode clip?")
    if cfg.mode != "clip":
        raise UsageError(f"checkpoint {path} was trained with mode {cfg.mode!r}, not 'clip'")
    model = build_clip_model(cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, Tokenizer(cfg.clip.context_length)
