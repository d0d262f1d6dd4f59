"""One builder for backbones, and loading of weights (ours, timm's or DINO's) into them, strictly."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed

from dino_sparo.models.vit import VisionTransformer, vit

logger = logging.getLogger(__name__)


def build_backbone(model_cfg: Any) -> VisionTransformer:
    """Backbone from a ``ModelConfig`` (or anything with the same attributes)."""
    sparo = model_cfg.sparo
    sparo_options = dataclasses.asdict(sparo) if dataclasses.is_dataclass(sparo) else dict(sparo)
    sparo_options = {k: v for k, v in sparo_options.items() if v is not None}
    return vit(
        model_cfg.arch,
        embed_dim=model_cfg.embed_dim,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size,
        in_chans=model_cfg.in_chans,
        drop_path_rate=model_cfg.drop_path_rate,
        readout=model_cfg.readout,
        reduce_depth=model_cfg.reduce_depth,
        sparo=sparo_options,
        attn_backend=model_cfg.attn_backend,
    )


# timm / DINO names that have no place in a backbone that ends in a read-out
_IGNORED_PREFIXES = ("head.", "fc_norm.", "head_drop.", "mask_token")
# DINO v1 names its drop path "drop_path"; timm's block has no parameters there, so only renames
_KEY_MAP = {"module.": "", "backbone.": "", "encoder.": ""}


def load_pretrained_backbone(model: VisionTransformer, state_dict: dict, source: str = "auto") -> list[str]:
    """Load timm or DINO ViT weights into ``model`` strictly, except for what ours lacks on purpose.

    The blocks removed by ``reduce_depth`` and the source's classifier head are dropped (and
    listed in the log); the read-out keeps its initialisation. Position embeddings are resampled to
    our grid: with DINO's bicubic interpolation when ``source == "dino"`` (its users' numbers
    depend on it), timm's otherwise. Any other missing or unexpected key is an error naming it.
    Returns the dropped source keys.
    """
    mapped = {}
    for key, value in state_dict.items():
        for old, new in _KEY_MAP.items():
            if key.startswith(old):
                key = new + key[len(old):]
        mapped[key] = value
    kept_blocks = len(model.blocks)
    dropped = [k for k in mapped if k.startswith(_IGNORED_PREFIXES)
               or (k.startswith("blocks.") and int(k.split(".")[1]) >= kept_blocks)]
    for key in dropped:
        mapped.pop(key)
    pos = mapped.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        grid = int((model.pos_embed.shape[1] - 1) ** 0.5)
        if source == "dino":
            cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
            old = int(patch_pos.shape[1] ** 0.5)
            patch_pos = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
            patch_pos = torch.nn.functional.interpolate(
                patch_pos, scale_factor=((grid + 0.1) / old, (grid + 0.1) / old), mode="bicubic")
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
            mapped["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)
        else:
            mapped["pos_embed"] = resample_abs_pos_embed(pos, new_size=[grid, grid], num_prefix_tokens=1)
    readout_keys = {k for k in model.state_dict() if k.startswith("sparo.")}
    own = set(model.state_dict()) - readout_keys
    missing = sorted(own - set(mapped))
    unexpected = sorted(set(mapped) - set(model.state_dict()))
    if missing or unexpected:
        raise KeyError(f"pretrained weights do not match the backbone: missing {missing[:8]}"
                       f"{'…' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                       f"{'…' if len(unexpected) > 8 else ''}")
    result = model.load_state_dict(mapped, strict=False)
    assert set(result.missing_keys) <= readout_keys  # checked above; kept as an invariant
    if dropped:
        logger.info("pretrained weights: dropped %d keys not used by this backbone (%s…)", len(dropped), dropped[0])
    return dropped
