"""A run's backbone as a plain weights file (``dino-sparo-export``): the ViT in timm's names, which
``timm.models.vision_transformer.VisionTransformer(**timm_kwargs, num_classes=0)`` loads strictly and
``model.pretrained`` / ``--weights`` load too. The SPARO read-out has no place in timm's ViT, so it is
left out unless asked for (``with_readout``: then only dino_sparo loads the file). A JSON file beside
the weights says how to build the timm model and where the weights came from.

Written as safetensors when the ``safetensors`` package is there (it comes with timm), else as a
``.pth`` state dict; both atomically."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from dino_sparo.checkpoint import load_run, strip_prefix
from dino_sparo.config import to_dict
from dino_sparo.errors import UsageError
from dino_sparo.files import atomic_write, write_json
from dino_sparo.models.build import CHECKPOINT_BACKBONE_PREFIXES, build_backbone

logger = logging.getLogger(__name__)

FORMATS = ("auto", "safetensors", "pth")


def safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def resolve_format(fmt: str, output: Optional[str | Path]) -> str:
    """``auto``: the output's suffix when it names one, else safetensors when installed, else pth."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto" and output is not None and Path(output).suffix in (".safetensors", ".pth", ".pt", ".bin"):
        fmt = "safetensors" if Path(output).suffix == ".safetensors" else "pth"
    if fmt == "auto":
        fmt = "safetensors" if safetensors_available() else "pth"
    if fmt == "safetensors" and not safetensors_available():
        raise UsageError("safetensors is not installed (pip install safetensors): use --format pth")
    return fmt


def backbone_weights(checkpoint: str | Path, key: str = "auto", with_readout: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone of ``checkpoint[key]`` (auto: a DINO run's teacher, a CLIP run's image tower) in
    timm's names, and what describes it (timm's constructor arguments, the run, its step)."""
    run = load_run(checkpoint)
    if key == "auto":
        key = next((k for k in CHECKPOINT_BACKBONE_PREFIXES if k in run.state), "teacher")
    if key not in CHECKPOINT_BACKBONE_PREFIXES or key not in run.state:
        stored = sorted(k for k in run.state if k in CHECKPOINT_BACKBONE_PREFIXES)
        raise UsageError(f"--key {key!r}: checkpoint {checkpoint} holds {stored}")
    weights = strip_prefix(run.state[key], CHECKPOINT_BACKBONE_PREFIXES[key])
    backbone = build_backbone(run.cfg.model)
    backbone.load_state_dict(weights, strict=True)  # the architecture its config describes, exactly
    weights = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()
               if with_readout or not k.startswith("sparo.")}
    model = run.cfg.model
    timm_kwargs = {"img_size": model.img_size, "patch_size": model.patch_size, "in_chans": model.in_chans,
                   "embed_dim": backbone.embed_dim, "depth": len(backbone.blocks),
                   "num_heads": backbone.num_heads, "num_classes": 0, "global_pool": "token"}
    if backbone.num_registers:  # timm's register layout (vit_*_reg4_*): no position embedding before the patches
        timm_kwargs.update(reg_tokens=backbone.num_registers, no_embed_class=True)
        weights["cls_token"] = weights["cls_token"] + weights["pos_embed"][:, :1]  # what ours adds to it
        weights["pos_embed"] = weights["pos_embed"][:, 1:].contiguous()
    if model.layer_scale_init:
        timm_kwargs["init_values"] = model.layer_scale_init  # creates ls1/ls2; the file's gammas replace it
    info = {
        "checkpoint": str(Path(checkpoint).absolute()), "key": key, "step": run.state.get("step"),
        "readout": model.readout, "readout_included": bool(with_readout and model.readout == "sparo"),
        "timm_kwargs": timm_kwargs, "model_config": to_dict(model),
    }
    return weights, info


def export_backbone(checkpoint: str | Path, output: Optional[str | Path] = None, key: str = "auto",
                    fmt: str = "auto", with_readout: bool = False) -> dict[str, Any]:
    """Write the backbone file (default: ``<key>_backbone.<format>`` beside the checkpoint) and its
    JSON description (same name, ``.json``); returns the description with the paths."""
    fmt = resolve_format(fmt, output)
    weights, info = backbone_weights(checkpoint, key, with_readout)
    suffix = ".safetensors" if fmt == "safetensors" else ".pth"
    path = Path(output) if output is not None else Path(checkpoint).parent / f"{info['key']}_backbone{suffix}"
    if fmt == "safetensors":
        from safetensors.torch import save  # noqa: PLC0415

        blob = save(weights, metadata={"format": "pt"})
    else:
        buffer = io.BytesIO()
        torch.save(weights, buffer)
        blob = buffer.getvalue()
    atomic_write(path, lambda handle: handle.write(blob))
    info.update(weights=str(path.absolute()), format=fmt, tensors=len(weights),
                parameters=int(sum(t.numel() for t in weights.values())))
    info["description"] = str(write_json(path.with_suffix(".json"), info))
    logger.info("wrote %s (%s, %d tensors, %s values) and %s", path, fmt, len(weights),
                f"{info['parameters']:,}", info["description"])
    return info
