"""DINOv2's options: Sinkhorn-Knopp centring and the KoLeo regulariser, against independent formulas."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_sparo.config import load_config
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from dino_sparo.losses import DINOLoss, koleo_loss, sinkhorn_knopp

from conftest import TINY_TRAINING


def _reference_sinkhorn(logits: np.ndarray, temperature: float, iterations: int) -> np.ndarray:
    """N × K float64: alternately give every prototype (column) 1/K and every sample (row) 1/N of
    the mass, starting from exp(logits / T) normalised to 1; rows of the result sum to 1."""
    n, k = logits.shape
    p = np.exp(logits.astype(np.float64) / temperature)
    p /= p.sum()
    for _ in range(iterations):
        p = p / (k * p.sum(axis=0, keepdims=True))
        p = p / (n * p.sum(axis=1, keepdims=True))
    return p * n


@pytest.mark.parametrize("n, k, temperature", [(8, 5, 0.1), (32, 64, 0.04), (6, 200, 0.07)])
def test_sinkhorn_matches_a_float64_reference(n, k, temperature):
    torch.manual_seed(n + k)
    logits = torch.randn(n, k)
    got = sinkhorn_knopp(logits, temperature, n_iterations=3)
    assert got.dtype == torch.float32
    expected = _reference_sinkhorn(logits.numpy(), temperature, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.sum(dim=1).numpy(), 1.0, rtol=1e-5)


def test_sinkhorn_converges_to_equal_prototype_use_and_survives_large_logits():
    torch.manual_seed(0)
    logits = torch.randn(40, 10) * 3
    many = sinkhorn_knopp(logits, 0.5, n_iterations=200)
    np.testing.assert_allclose(many.sum(dim=0).numpy(), 40 / 10, rtol=1e-4)  # each prototype 1/K of the mass
    np.testing.assert_allclose(many.sum(dim=1).numpy(), 1.0, rtol=1e-5)
    # cosine logits scaled by 1e3 overflow a plain exp(x / T); the result is the same assignment
    cosines = torch.nn.functional.normalize(torch.randn(40, 10), dim=0)
    big = sinkhorn_knopp(cosines * 1000, 0.04 * 1000)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, sinkhorn_knopp(cosines, 0.04), rtol=1e-4, atol=1e-6)
    # weights that underflow stay 0 instead of turning every target NaN
    assert torch.isfinite(sinkhorn_knopp(logits * 1000, 0.04)).all()


def _sinkhorn_worker(rank, world, init_file, logits, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = logits.chunk(world)[rank]
        torch.save(sinkhorn_knopp(rows, 0.07), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_across_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(3)
    logits = torch.randn(12, 16)
    mp.spawn(_sinkhorn_worker, args=(2, str(tmp_path / "pg"), logits, str(tmp_path / "q")), nprocs=2)
    gathered = torch.cat([torch.load(tmp_path / f"q.{rank}") for rank in range(2)])
    torch.testing.assert_close(gathered, sinkhorn_knopp(logits, 0.07), rtol=1e-5, atol=1e-7)


def test_dino_loss_with_sinkhorn_uses_the_assignments_and_leaves_the_centre():
    torch.manual_seed(1)
    b, k, n_local = 4, 7, 2
    loss_fn = DINOLoss(k, n_local_crops=n_local, centering="sinkhorn_knopp")
    student, teacher = torch.randn((2 + n_local) * b, k), torch.randn(2 * b, k)
    loss = loss_fn(student, teacher, 0.04)
    q = torch.from_numpy(_reference_sinkhorn(teacher.numpy(), 0.04, 3)).float().view(2, b, k)
    log_p = torch.log_softmax(student / 0.1, dim=-1).view(2 + n_local, b, k)
    pairs = [-(q[g] * log_p[c]).sum(-1).mean() for g in range(2) for c in range(2 + n_local) if c != g]
    torch.testing.assert_close(loss, torch.stack(pairs).mean(), rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(loss_fn.center) == 0  # no EMA centre with Sinkhorn-Knopp
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(k, n_local_crops=2, centering="sinkhorn")


def _reference_koleo(x: np.ndarray, eps: float = 1e-8) -> float:
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    total = 0.0
    for i in range(len(x)):
        nearest = min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
        total += -math.log(nearest + eps)
    return total / len(x)


@pytest.mark.parametrize("b, d", [(2, 3), (16, 8), (33, 64)])
def test_koleo_matches_a_brute_force_reference(b, d):
    torch.manual_seed(b * d)
    x = torch.randn(b, d) * 5
    np.testing.assert_allclose(float(koleo_loss(x)), _reference_koleo(x.numpy()), rtol=1e-4)


def test_koleo_gradient_pushes_nearest_neighbours_apart():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(32, 4), dim=1).requires_grad_()
    before = float(koleo_loss(x.detach()))
    optimiser = torch.optim.SGD([x], lr=0.01)
    for _ in range(20):
        optimiser.zero_grad()
        koleo_loss(x).backward()
        optimiser.step()
    assert float(koleo_loss(x.detach())) < before  # smaller loss = larger nearest-neighbour distances
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(), reason="Fashion-MNIST not installed (make data)")
def test_training_with_sinkhorn_and_koleo_logs_koleo_and_resumes_exactly(tmp_path):
    from dino_sparo.checkpoint import load_checkpoint
    from dino_sparo.train import train

    tiny = [*TINY_TRAINING, "model.embed_dim=48", "dino.centering=sinkhorn_knopp", "dino.koleo_weight=0.1"]
    train(load_config(None, tiny + [f"output_dir={tmp_path / 'whole'}"]))
    train(load_config(None, tiny + [f"output_dir={tmp_path / 'halves'}", "max_steps=4"]))
    train(load_config(None, tiny + [f"output_dir={tmp_path / 'halves'}"]))
    rows = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    koleo = [row["koleo"] for row in rows if "koleo" in row]
    assert len(koleo) == 8 and all(math.isfinite(v) for v in koleo)
    whole, halves = (load_checkpoint(tmp_path / name / "checkpoint.pth") for name in ("whole", "halves"))
    for key, value in whole["student"].items():
        torch.testing.assert_close(halves["student"][key], value, rtol=0, atol=0)
