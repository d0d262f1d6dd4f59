"""Slots against objects: the ARI against a pair-counting reference, patch coverage, attention shares."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest
import torch

from dino_sparo.evaluation.slot_objects import adjusted_rand_index, patch_coverage, slot_object_alignment


def pair_counting_ari(a, b) -> float:
    """ARI from its definition over all pairs of items (O(n²)): agreements beyond chance."""
    n = len(a)
    both = sum(1 for i, j in itertools.combinations(range(n), 2) if a[i] == a[j] and b[i] == b[j])
    same_a = sum(1 for i, j in itertools.combinations(range(n), 2) if a[i] == a[j])
    same_b = sum(1 for i, j in itertools.combinations(range(n), 2) if b[i] == b[j])
    expected = same_a * same_b / comb(n, 2)
    return (both - expected) / ((same_a + same_b) / 2 - expected)


def test_ari_equals_the_pair_counting_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 40))
        a, b = rng.integers(0, 4, n), rng.integers(0, 5, n)
        assert adjusted_rand_index(a, b) == pytest.approx(pair_counting_ari(a, b), abs=1e-12)


def test_ari_is_one_for_the_same_partition_under_any_names():
    a = np.array([0, 0, 1, 1, 2, 2, 2])
    assert adjusted_rand_index(a, np.array([5, 5, 3, 3, 9, 9, 9])) == pytest.approx(1.0)
    assert adjusted_rand_index(np.zeros(6), np.zeros(6)) == 1.0
    assert adjusted_rand_index(a, np.array([0, 1, 2, 0, 1, 2, 0])) < 0.2


def test_patch_coverage_shares_sum_to_one():
    masks = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    masks[0, 0, :4, :4] = True  # object 0 fills the top-left patch (patch size 4)
    masks[0, 1, 4:6, 4:8] = True  # object 1 half of the bottom-right one
    cover = patch_coverage(masks, 4)  # 1 × 3 × 4
    assert torch.allclose(cover.sum(dim=1), torch.ones(1, 4))
    assert cover[0, 1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert cover[0, 2].tolist() == [0.0, 0.0, 0.0, 0.5]
    assert cover[0, 0].tolist() == [0.0, 1.0, 1.0, 0.5]


def test_a_slot_attending_only_to_one_object_scores_one_on_it():
    masks = torch.zeros(1, 3, 8, 8, dtype=torch.bool)  # the third row is padding
    masks[0, 0, :4, :4] = True
    masks[0, 1, 4:, 4:] = True
    cover = patch_coverage(masks, 4)
    attn = torch.zeros(1, 3, 5)  # 3 slots over the class token and 4 patches
    attn[0, 0, 1] = 1.0  # slot 0: object 0's patch
    attn[0, 1, 4] = 1.0  # slot 1: object 1's patch
    attn[0, 2, 1:] = 0.25  # slot 2: even over the patches
    result = slot_object_alignment(attn, cover, torch.tensor([2]))
    assert result["best_object_share"][:2] == [1.0, 1.0]
    assert result["best_object_share"][2] == pytest.approx(0.25) == result["uniform_best_object_share"]
    assert result["background_share"] == pytest.approx([0.0, 0.0, 0.5])
    # patches by most-attending slot: {0: slot 0 (tie with 2: first), 1: 2, 2: 2, 3: slot 1} vs {obj0, bg, bg, obj1}
    assert result["ari"] == pytest.approx(1.0)
