"""What an evaluation reads from a frozen network: the embedding, DINO's last-blocks class tokens,
or the raw pixels, and a fingerprint of the weights that keys the feature cache.

Kinds (``FeatureSpec.kind``):

- ``"embedding"``: ``backbone(x)``, the SPARO embedding (``L·V``) or the final class token (``D``);
  what k-NN uses, and the linear probe for SPARO models.
- ``"last_blocks"``: DINO's linear-probe protocol for class-token models: the class tokens of the
  last ``n_last_blocks`` blocks, each through the final norm, concatenated, optionally followed by
  the average of the last block's patch tokens (``n·D`` or ``(n + 1)·D`` wide). DINO used n = 4
  for ViT-S and n = 1 with the average pool for ViT-B.
- ``"pixels"``: the evaluation-transformed image, flattened (one channel for grayscale data): the
  floor any learned feature must beat.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from dino_sparo.errors import UsageError

FEATURE_KINDS = ("auto", "embedding", "last_blocks", "pixels")

ModelFn = Callable[[torch.Tensor], torch.Tensor]  # images B × C × H × W -> features B × F


@dataclass(frozen=True)
class FeatureSpec:
    kind: str = "embedding"
    n_last_blocks: int = 1  # last_blocks only
    avgpool: bool = False  # last_blocks only: append the mean of the last block's patch tokens
    grayscale: bool = False  # pixels only: keep one of the three identical channels

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS[1:]:
            raise UsageError(f"feature kind must be one of {FEATURE_KINDS[1:]}, got {self.kind!r}")
        if self.kind == "last_blocks" and self.n_last_blocks < 1:
            raise UsageError(f"n_last_blocks must be >= 1, got {self.n_last_blocks}")

    def describe(self) -> str:
        if self.kind == "last_blocks":
            pooled = " + avg-pooled patches" if self.avgpool else ""
            return f"class tokens of the last {self.n_last_blocks} block(s){pooled}"
        return {"embedding": "embedding", "pixels": "raw pixels"}[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dino_linear_spec(backbone: nn.Module) -> FeatureSpec:
    """DINO's linear-probe features for a backbone: the embedding for SPARO models; for class-token
    models the last 4 class tokens (ViT-S and smaller) or the last one + average-pooled patch
    tokens (ViT-B and wider), as in DINO's ``eval_linear.py``."""
    if getattr(backbone, "sparo", None) is not None:
        return FeatureSpec("embedding")
    wide = backbone.embed_dim >= 768
    n = 1 if wide else min(4, len(backbone.blocks))
    return FeatureSpec("last_blocks", n_last_blocks=n, avgpool=wide)


def resolve_spec(kind: str, backbone: Optional[nn.Module], grayscale: bool = False,
                 n_last_blocks: Optional[int] = None, avgpool: Optional[bool] = None) -> FeatureSpec:
    """Turn a command-line choice into a spec. ``auto`` is ``dino_linear_spec`` (the linear probe's
    choice; k-NN asks for ``embedding``); ``last_blocks`` by name takes 4 blocks unless told."""
    if kind not in FEATURE_KINDS:
        raise UsageError(f"--features must be one of {FEATURE_KINDS}, got {kind!r}")
    if backbone is None or kind == "pixels":
        return FeatureSpec("pixels", grayscale=grayscale)
    if kind == "embedding":
        return FeatureSpec("embedding")
    if kind == "auto":
        spec = dino_linear_spec(backbone)
        if spec.kind == "embedding":
            return spec
    else:  # last_blocks asked for by name: DINO's ViT-S setting unless told otherwise
        spec = FeatureSpec("last_blocks", n_last_blocks=min(4, len(backbone.blocks)))
    n = spec.n_last_blocks if n_last_blocks is None else n_last_blocks
    if not 1 <= n <= len(backbone.blocks):
        raise UsageError(f"--n-last-blocks must lie in [1, {len(backbone.blocks)}] for this backbone, got {n}")
    return FeatureSpec("last_blocks", n_last_blocks=n, avgpool=spec.avgpool if avgpool is None else avgpool)


def last_blocks_features(backbone: nn.Module, images: torch.Tensor, n_last_blocks: int,
                         avgpool: bool = False) -> torch.Tensor:
    """DINO's ``get_intermediate_layers``: the final norm applied after each of the last n blocks;
    their class tokens concatenated (``B × n·D``), then optionally the patch mean (``+ D``)."""
    x = backbone.prepare_tokens(images)  # B × (1 + R + P) × D
    first = len(backbone.blocks) - n_last_blocks
    outputs = []
    for i, block in enumerate(backbone.blocks):
        x = block(x)
        if i >= first:
            outputs.append(backbone.norm(x))
    feats = torch.cat([out[:, 0] for out in outputs], dim=-1)  # B × n·D
    if avgpool:
        patches = outputs[-1][:, getattr(backbone, "num_prefix_tokens", 1):]  # no class token, no registers
        feats = torch.cat([feats, patches.mean(dim=1)], dim=-1)  # B × (n + 1)·D
    return feats


def feature_fn(backbone: Optional[nn.Module], spec: FeatureSpec) -> ModelFn:
    """The function from an image batch to features that ``spec`` describes."""
    if spec.kind == "pixels":
        def pixels(images: torch.Tensor) -> torch.Tensor:
            if spec.grayscale:
                images = images[:, :1]
            return images.flatten(1).float()  # B × C·H·W
        return pixels
    if backbone is None:
        raise UsageError(f"feature kind {spec.kind!r} needs a backbone")
    if spec.kind == "embedding":
        return lambda images: backbone(images)
    return lambda images: last_blocks_features(backbone, images, spec.n_last_blocks, spec.avgpool)


def feature_dim(backbone: Optional[nn.Module], spec: FeatureSpec, image_shape: tuple[int, int, int]) -> int:
    """Width of the features ``spec`` gives for images of ``image_shape`` (C, H, W)."""
    if spec.kind == "pixels":
        c, h, w = image_shape
        return (1 if spec.grayscale else c) * h * w
    if spec.kind == "embedding":
        return int(backbone.out_dim)
    return int(backbone.embed_dim) * (spec.n_last_blocks + int(spec.avgpool))


def slot_layout(backbone: Optional[nn.Module], spec: FeatureSpec) -> Optional[tuple[int, int, str]]:
    """``(L, V, norm)`` when the features are a SPARO embedding, else None."""
    sparo = getattr(backbone, "sparo", None)
    if sparo is None or spec.kind != "embedding":
        return None
    return int(sparo.num_slots), int(sparo.slot_dim), str(sparo.norm)


def module_fingerprint(module: nn.Module) -> str:
    """sha256 of every tensor of the state dict (name, dtype, shape, bytes) and of the module's
    printed structure (which carries what shapes do not: heads, read-out, SPARO norm).

    Keys the feature cache by the weights themselves, so the same teacher saved in two
    checkpoint files shares features, and a changed checkpoint never reuses stale ones.
    """
    digest = hashlib.sha256(repr(module).encode())
    for attr in ("num_heads", "patch_size", "readout_type", "reduce_depth"):
        digest.update(f"{attr}={getattr(module, attr, None)}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{digest.hexdigest()}"
