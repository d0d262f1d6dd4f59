"""Slots measured against objects: how much of each slot's attention falls on one object, and how
well the partition of patches by their most-attending slot matches the objects' masks.

For scenes whose object masks are known (the scene world). Attention ``B × L × N`` is SPARO's, over
the class token and the ``P`` patches; a patch belongs to an object in proportion to the share of
its pixels the object's mask covers, the rest to the background.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def patch_coverage(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``B × (1 + K) × P``: the share of each patch's pixels that the background (row 0) and each of
    the ``K`` objects cover, from ``B × K × H × W`` boolean masks (padded with empty masks)."""
    b, k, h, w = masks.shape
    pooled = torch.nn.functional.avg_pool2d(masks.float().view(b * k, 1, h, w), patch_size)  # BK × 1 × h' × w'
    objects = pooled.view(b, k, -1)  # B × K × P
    background = (1 - objects.sum(dim=1, keepdim=True)).clamp(min=0)
    return torch.cat([background, objects], dim=1)


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings of the same items (1 = the same
    partition, about 0 = chance); 1 when both put everything in one cluster (as sklearn)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape} vs {b.shape}")
    n = a.size
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) // 2).sum())

    index, rows, cols = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    total = n * (n - 1) / 2
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:  # both labelings trivial (one cluster, or all singletons alike)
        return 1.0
    return (index - expected) / (maximum - expected)


def slot_object_alignment(attn: torch.Tensor, coverage: torch.Tensor, num_objects: torch.Tensor) -> dict[str, Any]:
    """Per slot and overall: the share of a slot's patch attention on its best-matching object and on
    the background (means over images), the class token's share, and the ARI of the argmax-slot
    partition of patches against the objects and background (foreground ARI: object patches only,
    over images with two objects or more in view).

    ``attn``: ``B × L × (1 + P)``; ``coverage``: ``B × (1 + K) × P`` (:func:`patch_coverage`);
    ``num_objects``: ``B`` (the valid object rows of each image). ``uniform_*`` give what attention
    spread evenly over the patches would score, the level a slot must beat.
    """
    attn = attn.float()
    patch_attn = attn[..., 1:]  # B × L × P
    patch_mass = patch_attn.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    mass = torch.einsum("blp,bkp->blk", patch_attn, coverage.float()) / patch_mass  # B × L × (1 + K)
    k_max = coverage.shape[1] - 1
    valid = torch.arange(k_max)[None, :] < num_objects[:, None]  # B × K
    objects = mass[..., 1:].masked_fill(~valid[:, None, :], -1.0)
    best = objects.max(dim=-1).values  # B × L
    uniform = coverage.float().mean(dim=-1)  # B × (1 + K): shares under even attention
    uniform_best = uniform[:, 1:].masked_fill(~valid, -1.0).max(dim=-1).values  # B
    ari, fg_ari = [], []
    slot_of_patch = patch_attn.argmax(dim=1)  # B × P
    segment_of_patch = coverage.argmax(dim=1)  # B × P (0 = background)
    for i in range(attn.shape[0]):
        truth, found = segment_of_patch[i].numpy(), slot_of_patch[i].numpy()
        ari.append(adjusted_rand_index(truth, found))
        fg = truth > 0
        if len(np.unique(truth[fg])) >= 2:  # with one object in view the index is 0 or 1, whatever the slots
            fg_ari.append(adjusted_rand_index(truth[fg], found[fg]))
    best_share, background = best.mean(dim=0), mass[..., 0].mean(dim=0)  # L, L
    return {
        "best_object_share": best_share.tolist(),
        "background_share": background.tolist(),
        "class_token_share": attn[..., 0].mean(dim=0).tolist(),
        "mean_best_object_share": float(best_share.mean()),
        "max_best_object_share": float(best_share.max()),
        "mean_background_share": float(background.mean()),
        "uniform_best_object_share": float(uniform_best.mean()),
        "uniform_background_share": float(uniform[:, 0].mean()),
        "ari": float(np.mean(ari)),
        "foreground_ari": float(np.mean(fg_ari)) if fg_ari else float("nan"),
        "num_images": int(attn.shape[0]),
    }
