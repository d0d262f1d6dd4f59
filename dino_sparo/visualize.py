"""Pictures of what the slots attend to: each slot's attention over the patch grid, on the image."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dino_sparo.models.vit import VisionTransformer


@torch.no_grad()
def slot_attention(backbone: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """SPARO attention ``B × L × N`` (N = 1 class token + patches) for normalised ``images``."""
    if backbone.sparo is None:
        raise ValueError("slot attention needs a SPARO model (model.readout: sparo)")
    tokens = backbone.forward_tokens(images)
    _, attn = backbone.readout(tokens, return_attn=True)
    return attn.float()


def most_attended_slots(attn: torch.Tensor, count: int) -> list[int]:
    """Slots ranked by how often they put the most mass on some patch (ties by total mass)."""
    patch_attn = attn[..., 1:]  # B × L × P
    winners = patch_attn.argmax(dim=1)  # B × P: the slot attending most to each patch
    votes = torch.bincount(winners.flatten(), minlength=attn.shape[1]).float()
    score = votes + 1e-6 * patch_attn.sum(dim=(0, 2))
    return score.argsort(descending=True)[:count].tolist()


def plot_slot_attention(
    backbone: VisionTransformer,
    images: torch.Tensor,
    display: np.ndarray,
    path: str | Path,
    slots: Optional[Sequence[int]] = None,
    num_slots: int = 8,
    title: str = "",
) -> list[int]:
    """A grid PNG: one row per image (the image, then each chosen slot's attention over the
    patches, overlaid); the weight a slot puts on the class token is printed above its map.

    ``images`` are the network's inputs (normalised, ``B × 3 × H × W``); ``display`` the same
    images for showing (``B × H × W`` or ``B × H × W × 3``, values in [0, 1]). Slots are chosen by
    :func:`most_attended_slots` unless given. Returns the slots shown.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    attn = slot_attention(backbone, images)
    if slots is None:
        slots = most_attended_slots(attn, min(num_slots, attn.shape[1]))
    slots = list(slots)
    b = images.shape[0]
    grid_h, grid_w = images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
    fig, axes = plt.subplots(b, len(slots) + 1, figsize=(1.3 * (len(slots) + 1), 1.4 * b), squeeze=False)
    cmap = "gray" if display.ndim == 3 else None
    for row in range(b):
        axes[row, 0].imshow(display[row], cmap=cmap)
        axes[row, 0].set_title("image", fontsize=7)
        for col, slot in enumerate(slots, start=1):
            weights = attn[row, slot]
            patch_map = weights[1:].reshape(1, 1, grid_h, grid_w)
            up = torch.nn.functional.interpolate(patch_map, size=display.shape[1:3], mode="nearest")[0, 0]
            axes[row, col].imshow(display[row], cmap=cmap)
            axes[row, col].imshow(up.numpy(), cmap="inferno", alpha=0.6)
            axes[row, col].set_title(f"slot {slot} · cls {weights[0]:.2f}", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return slots
