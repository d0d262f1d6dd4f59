"""iBOT's block-wise masks of the student's global crops (BEiT's generator, as DINOv2 uses it).

A mask is grown from rectangles: each rectangle has a random area (at least ``min_patches``, at most
what is left to mask, capped at ``max_patches``) and a random aspect ratio (log-uniform in
``[min_aspect, 1 / min_aspect]``), is placed at random, and adds the patches it covers that were not
masked yet; rectangles are added until the requested number of patches is reached or no rectangle
fits. The generator draws from Python's ``random`` module, which ``data.samplers.SeededSamples``
seeds per (seed, epoch, image), so a crop's mask is a function of that image alone.

One deliberate difference from DINOv2: DINOv2 masks a fixed share of each batch
(``int(B · mask_probability)`` crops, with mask ratios stratified over the batch). Here every global
crop is masked with probability ``mask_probability``, at a ratio drawn uniformly in ``mask_ratio``: the
same distribution per crop, decided per image, so a run's masks do not depend on how its batch is
split over processes (two processes give what one gives).
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import default_collate

__all__ = ["BlockMaskGenerator", "MaskedCrops", "masked_multicrop_collate"]


class BlockMaskGenerator:
    """Block-wise masks of a ``height × width`` patch grid (``__call__(n)`` -> ``height × width`` bool)."""

    def __init__(self, height: int, width: int, min_patches: int = 4, max_patches: int | None = None,
                 min_aspect: float = 0.3, attempts: int = 10) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"BlockMaskGenerator needs a grid of at least 1 × 1, got {height} × {width}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"BlockMaskGenerator min_aspect must be in (0, 1], got {min_aspect}")
        self.height, self.width = height, width
        self.min_patches = min_patches
        self.max_patches = max_patches if max_patches is not None else height * width // 2  # DINOv2: half
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))
        self.attempts = attempts

    def _add_rectangle(self, mask: torch.Tensor, budget: int) -> int:
        """Mask one random rectangle adding at most ``budget`` new patches; returns how many it added."""
        for _ in range(self.attempts):
            area = random.uniform(self.min_patches, budget)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top, left = random.randint(0, self.height - h), random.randint(0, self.width - w)
            window = mask[top:top + h, left:left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window.fill_(True)
                return new
        return 0

    def __call__(self, n_patches: int) -> torch.Tensor:
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < n_patches:
            added = self._add_rectangle(mask, min(n_patches - count, self.max_patches))
            if added == 0:
                break
            count += added
        return mask


class MaskedCrops:
    """A multi-crop transform whose output also carries iBOT's masks of the global crops:
    ``image -> (crops, masks)``, ``masks`` ``G × P`` bool (P patches of a global crop)."""

    def __init__(self, transform: Callable[[Any], list[torch.Tensor]], n_global: int, grid: int,
                 mask_probability: float, mask_ratio: Sequence[float]) -> None:
        self.transform, self.n_global, self.grid = transform, n_global, grid
        self.mask_probability, self.mask_ratio = mask_probability, tuple(mask_ratio)
        self.generator = BlockMaskGenerator(grid, grid)
        self.draft_size = getattr(transform, "draft_size", None)  # the JPEG draft decode the crops allow

    def draw(self) -> torch.Tensor:
        """One global crop's mask, flattened to ``P``: none with probability 1 - mask_probability."""
        n = self.grid * self.grid
        if random.random() >= self.mask_probability:
            return torch.zeros(n, dtype=torch.bool)
        return self.generator(int(n * random.uniform(*self.mask_ratio))).flatten()

    def __call__(self, image: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        crops = self.transform(image)
        return crops, torch.stack([self.draw() for _ in range(self.n_global)])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mask_probability={self.mask_probability}, mask_ratio={self.mask_ratio}, "
                f"grid={self.grid}×{self.grid},\n  {self.transform!r})")


def masked_multicrop_collate(batch: Sequence[tuple[tuple[list[torch.Tensor], torch.Tensor], Any]]
                             ) -> tuple[list[torch.Tensor], Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`[((crops, masks), label), ...]` -> `(crops per index, labels, (masks, index, weight))`.

    ``masks`` is ``(G·B) × P`` in the crops' crop-major order; ``index`` the flat positions of the masked
    patches in ``masks.flatten()`` and ``weight`` each masked patch's ``1 / (masked patches of its
    crop)``, so the loss averages per image (DINOv2's ``masks_weight``). Computed here, in the loader's
    workers, so that the training step needs no host synchronisation to find them.
    """
    if len(batch) == 0:
        raise ValueError("masked_multicrop_collate got an empty batch")
    n_crops = len(batch[0][0][0])
    crops = [torch.stack([item[0][0][i] for item in batch]) for i in range(n_crops)]
    masks = torch.cat([torch.stack([item[0][1][g] for item in batch]) for g in range(batch[0][0][1].shape[0])])
    labels = default_collate([label for _, label in batch])
    index = masks.flatten().nonzero().flatten()
    counts = masks.sum(dim=1, keepdim=True).clamp_min(1).float()
    weight = (1.0 / counts).expand_as(masks).flatten()[index]
    return crops, labels, (masks, index, weight)
