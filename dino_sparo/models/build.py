"""One builder for backbones, and loading of weights (ours, timm's or DINO's) into them, strictly."""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed

from dino_sparo.errors import UsageError
from dino_sparo.models.vit import VisionTransformer, vit
from dino_sparo.sparo import readout_options

logger = logging.getLogger(__name__)


def build_backbone(model_cfg: Any) -> VisionTransformer:
    """Backbone from a ``ModelConfig`` (or anything with the same attributes)."""
    sparo = model_cfg.sparo
    attend_registers = bool(sparo.get("attend_registers") if isinstance(sparo, dict)
                            else getattr(sparo, "attend_registers", False))
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
        sparo=readout_options(sparo),
        attn_backend=model_cfg.attn_backend,
        num_registers=getattr(model_cfg, "num_registers", 0),
        sparo_attend_registers=attend_registers,
        layer_scale_init=getattr(model_cfg, "layer_scale_init", None),
    )


# timm / DINO names that have no place in a backbone that ends in a read-out
_IGNORED_PREFIXES = ("head.", "fc_norm.", "head_drop.", "mask_token")
# DINO v1 names its drop path "drop_path"; timm's block has no parameters there, so only renames
# (DINOv2 calls its registers "register_tokens", timm "reg_token", as we do)
_KEY_MAP = {"module.": "", "backbone.": "", "encoder.": "", "register_tokens": "reg_token"}


def _our_names(state_dict: dict) -> dict:
    """Source keys renamed as ours (``module.``, ``backbone.``, ``encoder.`` prefixes removed)."""
    mapped = {}
    for key, value in state_dict.items():
        for old, new in _KEY_MAP.items():
            if key.startswith(old):
                key = new + key[len(old):]
        mapped[key] = value
    return mapped


def position_grid(entries: int) -> tuple[int, bool]:
    """The patch grid's side of a position embedding with ``entries`` rows, and whether one row is the
    class token's (ours, DINO's, timm's default) or not (timm's register layout, ``no_embed_class``):
    a square number of rows has none, since 1 + g² is never square."""
    side = math.isqrt(entries)
    return (side, False) if side * side == entries else (math.isqrt(entries - 1), True)


def _registers_and_class_position(model: VisionTransformer, mapped: dict) -> None:
    """timm's register layouts (``vit_*_reg4_*``: ``reg_token``, and position embeddings without a
    class-token entry, ``no_embed_class``) in ours: the class token's position embedding is zero,
    which adds to the class token what timm adds (nothing). Registers must match ``model.num_registers``."""
    registers = mapped.get("reg_token")
    if registers is not None and (model.reg_token is None or registers.shape != model.reg_token.shape):
        raise KeyError(f"pretrained weights hold {registers.shape[1]} register tokens, the backbone "
                       f"{model.num_registers} (set model.num_registers: {registers.shape[1]})")
    if registers is None and model.reg_token is not None:
        raise KeyError(f"pretrained weights hold no register tokens ('reg_token'), the backbone "
                       f"{model.num_registers} (set model.num_registers: 0)")
    pos = mapped.get("pos_embed")
    if pos is not None and not position_grid(pos.shape[1])[1]:  # P entries, none for the class token
        mapped["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)


def _adapt_input_channels(model: VisionTransformer, mapped: dict) -> None:
    """RGB weights in a one-channel backbone (``model.in_chans: 1``): the patch embedding's three
    input filters summed, so a grey image gives what the RGB network gives that image with r = g = b
    (timm's ``adapt_input_conv`` does the same)."""
    weight = mapped.get("patch_embed.proj.weight")
    want = model.patch_embed.proj.weight.shape[1]
    if weight is None or weight.shape[1] == want:
        return
    if want != 1:
        raise UsageError(f"pretrained weights take {weight.shape[1]} input channels, the backbone {want} "
                         f"(set model.in_chans: {weight.shape[1]})")
    mapped["patch_embed.proj.weight"] = weight.sum(dim=1, keepdim=True)
    logger.info("pretrained weights: %d input channels summed into the one of model.in_chans: 1", weight.shape[1])


def load_pretrained_backbone(model: VisionTransformer, state_dict: dict, source: str = "auto") -> list[str]:
    """Load timm or DINO ViT weights into ``model`` strictly, except for what ours lacks on purpose.

    The blocks removed by ``reduce_depth`` and the source's classifier head are dropped (and
    listed in the log); the read-out keeps its initialisation. Position embeddings are resampled to
    our grid: with DINO's bicubic interpolation when ``source == "dino"`` (its users' numbers
    depend on it), timm's otherwise. Any other missing or unexpected key is an error naming it.
    Returns the dropped source keys.
    """
    mapped = _our_names(state_dict)
    kept_blocks = len(model.blocks)
    dropped = [k for k in mapped if k.startswith(_IGNORED_PREFIXES)
               or (k.startswith("blocks.") and int(k.split(".")[1]) >= kept_blocks)]
    for key in dropped:
        mapped.pop(key)
    _registers_and_class_position(model, mapped)
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
    _adapt_input_channels(model, mapped)
    readout_keys = {k for k in model.state_dict() if k.startswith("sparo.")}
    own = set(model.state_dict()) - readout_keys
    missing = sorted(own - set(mapped))
    unexpected = sorted(set(mapped) - set(model.state_dict()))
    if any(".ls1." in k for k in unexpected):
        raise UsageError("pretrained weights have LayerScale (blocks.N.ls1.gamma, as DINOv2's): set "
                         "model.layer_scale_init (DINOv2: 1.0e-5; the weights' own values replace it)")
    if any(".ls1." in k for k in missing):
        raise UsageError("pretrained weights have no LayerScale (blocks.N.ls1.gamma): set model.layer_scale_init: null")
    if missing or unexpected:
        raise UsageError(f"pretrained weights do not match the backbone: missing {missing[:8]}"
                       f"{'…' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                       f"{'…' if len(unexpected) > 8 else ''}")
    result = model.load_state_dict(mapped, strict=False)
    assert set(result.missing_keys) <= readout_keys  # checked above; kept as an invariant
    if dropped:
        logger.debug("pretrained weights: dropped %d keys not used by this backbone (%s…)", len(dropped), dropped[0])
    return dropped


# Where the image backbone sits inside each state dict a training checkpoint holds. DINO stores
# the whole multi-crop wrapper ("backbone.*", "head.*") as "teacher" and "student"; a CLIP
# checkpoint's "model" holds the CLIP model, whose image tower is "visual.*". Another method adds
# its own entry here.
CHECKPOINT_BACKBONE_PREFIXES: dict[str, str] = {
    "teacher": "backbone.",
    "student": "backbone.",
    "model": "visual.",
}


def load_backbone_from_checkpoint(
    path: str | Path, key: str = "teacher", device: str | torch.device = "cpu"
) -> tuple[VisionTransformer, Any]:
    """The backbone stored under ``key`` of a training checkpoint, frozen in eval mode, and its config.

    The model is rebuilt from the checkpoint's own ``config`` and loaded strictly (every backbone
    key present, nothing extra), so a mismatch fails here instead of evaluating a half-random
    network (dino#65). ``key="auto"`` takes the first of ``CHECKPOINT_BACKBONE_PREFIXES`` the
    checkpoint holds (the teacher of a DINO run, the model of a CLIP run).
    Returns ``(backbone, TrainConfig)``.
    """
    from dino_sparo.checkpoint import load_run, strip_prefix  # noqa: PLC0415 (keeps import cheap)

    run = load_run(path, map_location="cpu")
    state = run.state
    if key == "auto":
        key = next((k for k in CHECKPOINT_BACKBONE_PREFIXES if k in state), "teacher")
    if key not in CHECKPOINT_BACKBONE_PREFIXES:
        raise UsageError(f"checkpoint key must be 'auto' or one of {sorted(CHECKPOINT_BACKBONE_PREFIXES)}, got {key!r}")
    if key not in state:
        stored = sorted(k for k in state if k in CHECKPOINT_BACKBONE_PREFIXES)
        raise UsageError(f"checkpoint {path} has no {key!r} weights (it holds {stored})")
    cfg = run.cfg
    backbone = build_backbone(cfg.model)
    weights = strip_prefix(state[key], CHECKPOINT_BACKBONE_PREFIXES[key])
    missing = sorted(set(backbone.state_dict()) - set(weights))
    unexpected = sorted(set(weights) - set(backbone.state_dict()))
    if missing or unexpected:
        raise UsageError(f"checkpoint {path} ['{key}'] does not match the backbone its config builds: "
                       f"missing {missing[:8]}{'…' if len(missing) > 8 else ''}, "
                       f"unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}")
    backbone.load_state_dict(weights, strict=True)
    backbone.requires_grad_(False)
    return backbone.to(device).eval(), cfg


@dataclass
class PretrainedLoad:
    """What :func:`load_pretrained_file` did: the file's kind, and the backbone's keys by fate."""

    kind: str  # e.g. "dino_sparo checkpoint (its teacher)"
    loaded: list[str]  # backbone keys set from the file
    initialised: list[str]  # backbone keys the file has none for (the read-out): kept as initialised
    dropped: list[str]  # file keys this backbone has no place for (a classifier, removed blocks)


def read_pretrained(path: str | Path) -> tuple[dict, str, str]:
    """The ViT weights in ``path``: ``(state dict, kind, source)``, ``source`` being how position
    embeddings are resampled (see :func:`load_pretrained_backbone`). Understands a dino_sparo
    checkpoint (its teacher, or a CLIP run's image tower), a DINO training checkpoint (its teacher),
    DINO's released backbones (``dino_deitsmall16_pretrain.pth``: a flat state dict), timm state dicts
    (``.pth`` / ``.bin``, or ``.safetensors``) and checkpoints wrapping one in ``state_dict`` or ``model``."""
    from dino_sparo.checkpoint import is_training_state, load_checkpoint, strip_prefix  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415 (a dependency of timm)
        return load_file(str(path)), "timm weights (safetensors)", "timm"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # our checkpoints hold NumPy RNG states: unpickled as when resuming
        state = load_checkpoint(path)
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a dict of weights")
    if is_training_state(state) and any(k in state for k in CHECKPOINT_BACKBONE_PREFIXES):
        key = next(k for k in CHECKPOINT_BACKBONE_PREFIXES if k in state)
        return strip_prefix(state[key], CHECKPOINT_BACKBONE_PREFIXES[key]), f"dino_sparo checkpoint (its {key})", "ours"
    if isinstance(state.get("teacher"), dict):
        return state["teacher"], "DINO training checkpoint (its teacher)", "dino"
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            return state[wrapper], f"ViT weights (under '{wrapper}')", "timm"
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} is neither a state dict nor a checkpoint holding one (keys: {sorted(state)[:8]})")
    has_classifier = any(k.startswith("head.") for k in state)
    return state, "timm ViT weights" if has_classifier else "ViT backbone weights (DINO's release layout)", (
        "timm" if has_classifier else "dino")


def load_pretrained_file(model: VisionTransformer, path: str | Path) -> PretrainedLoad:
    """Load the backbone weights of ``path`` (:func:`read_pretrained`) into ``model`` strictly: every
    key of the backbone must come from the file except its read-out, which a file without one leaves
    as initialised; position embeddings are resampled to the model's grid."""
    weights, kind, source = read_pretrained(path)
    own = model.state_dict()
    differ = [f"{key} {list(value.shape)} in the file, {list(own[key].shape)} here"
              for key, value in _our_names(weights).items()
              if key in own and key != "pos_embed" and value.shape != own[key].shape]  # pos_embed is resampled
    if differ:
        raise UsageError(f"{len(differ)} tensor(s) have other shapes than this backbone's (another model.arch, "
                         f"embed_dim, patch_size or read-out?): {'; '.join(differ[:4])}{'…' if len(differ) > 4 else ''}")
    dropped = load_pretrained_backbone(model, weights, source="dino" if source == "dino" else "auto")
    given = set(_our_names(weights)) - set(dropped)
    names = list(model.state_dict())
    return PretrainedLoad(kind, [k for k in names if k in given], [k for k in names if k not in given], dropped)
