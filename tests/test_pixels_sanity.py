"""Raw Fashion-MNIST pixels through the evaluation code: the accuracies expected of pixels (which a
label or split mix-up would break), and the k-NN vote against a brute-force computation."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT, FashionMNIST
from dino_sparo.evaluation.knn_search import knn_classify
from dino_sparo.evaluation.linear import linear_probe

pytestmark = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                reason="Fashion-MNIST not installed (make data)")


@pytest.fixture(scope="module")
def pixels():
    """Train and test pixels as N × 784 floats in [0, 1] with their labels, straight from the uint8 arrays."""
    out = {}
    for split in ("train", "test"):
        data = FashionMNIST(DEFAULT_FASHION_MNIST_ROOT, split)
        x = torch.from_numpy(np.asarray(data.data, dtype=np.float32).reshape(len(data), -1) / 255.0)
        out[split] = (x, torch.from_numpy(np.array(data.targets, dtype=np.int64)))
    return out


def test_knn_on_pixels_reaches_the_pixel_baseline(pixels):
    x_train, y_train = pixels["train"]
    x_test, y_test = pixels["test"][0][::5], pixels["test"][1][::5]  # 2,000 queries, the 60,000 train as memory
    scores = knn_classify(x_train, y_train, x_test, 10, k=20, temperature=0.07, backend="torch", device="cpu")
    accuracy = (scores.argmax(1) == y_test).double().mean().item()
    assert 0.83 <= accuracy <= 0.88, accuracy  # about 0.85 for cosine k-NN on pixels


def test_linear_probe_on_pixels_reaches_the_pixel_baseline(pixels):
    x_train, y_train = pixels["train"]
    x_test, y_test = pixels["test"]
    result = linear_probe(x_train[::3], y_train[::3], x_test, y_test, 10, lrs=(0.1,), epochs=10,
                          batch_size=256, progress=False)  # 20,000 train images, the whole test set
    assert 0.80 <= result.test_top1 <= 0.87, result.test_top1  # about 0.84 for a linear model on pixels


def brute_force_predictions(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int,
                            temperature: float) -> np.ndarray:
    """DINO's weighted vote written out in float64: cosine, k largest, exp(sim / T) summed per class."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T  # Q × N
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # Q × k
    votes = np.zeros((len(test), 10))
    for q in range(len(test)):
        for j in nearest[q]:
            votes[q, labels[j]] += np.exp(sims[q, j] / temperature)
    return votes.argmax(1)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.02), (20, 0.07), (50, 0.5)])
def test_knn_classify_matches_brute_force_on_pixels(pixels, k, temperature):
    x_train, y_train = pixels["train"][0][:4000], pixels["train"][1][:4000]
    x_test = pixels["test"][0][:300]
    ours = knn_classify(x_train, y_train, x_test, 10, k=k, temperature=temperature, backend="torch",
                        device="cpu", chunk_size=1000, query_chunk_size=128).argmax(1).numpy()
    reference = brute_force_predictions(x_train.double().numpy(), y_train.numpy(), x_test.double().numpy(), k,
                                        temperature)
    np.testing.assert_array_equal(ours, reference)
