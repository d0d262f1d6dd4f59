"""k-NN evaluation and feature stores, against brute-force references written here."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from dino_sparo.evaluation import feature_store as features_mod
from dino_sparo.evaluation import knn_search as knn_mod
from dino_sparo.evaluation.feature_store import (
    FeatureStore,
    cached_features,
    extract_features,
    feature_cache_path,
    file_fingerprint,
)
from dino_sparo.evaluation.knn_search import available_backends, knn_classify, knn_accuracy, knn_search

CPU_BACKENDS = [b for b in ("torch", "faiss-cpu") if b in available_backends()]


# --------------------------------------------------------------------------- data + references


def clustered(n_train=400, n_test=60, dim=16, num_classes=5, spread=0.6, seed=0, shuffle_labels=False):
    """Gaussian clusters, one per class; ``shuffle_labels`` makes the labels unrelated to the features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    y_train = rng.integers(0, num_classes, n_train)
    y_test = rng.integers(0, num_classes, n_test)
    x_train = centres[y_train] + spread * rng.normal(size=(n_train, dim))
    x_test = centres[y_test] + spread * rng.normal(size=(n_test, dim))
    if shuffle_labels:
        y_train, y_test = rng.permutation(y_train), rng.permutation(y_test)
    return x_train.astype(np.float32), y_train, x_test.astype(np.float32), y_test


def reference_knn(x_train, y_train, x_test, num_classes, k, temperature):
    """Per test row: cosine to every train row, sort, weighted vote — plain float64 loops."""
    x_train = np.asarray(x_train, dtype=np.float64)
    x_train = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    scores, neighbours = [], []
    for q in np.asarray(x_test, dtype=np.float64):
        q = q / np.linalg.norm(q)
        sims = [float(np.dot(q, t)) for t in x_train]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        row = np.zeros(num_classes)
        for j in order:
            row[y_train[j]] += np.exp(sims[j] / temperature)
        scores.append(row)
        neighbours.append(order)
    return np.array(scores), np.array(neighbours)


# --------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_knn_classify_matches_bruteforce_reference(backend):
    x_train, y_train, x_test, _ = clustered(spread=1.5)
    scores = knn_classify(torch.from_numpy(x_train), y_train, torch.from_numpy(x_test), 5, k=20, backend=backend)
    ref, _ = reference_knn(x_train, y_train, x_test, 5, 20, 0.07)
    assert scores.shape == (60, 5)
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-3)
    assert (scores.argmax(1).numpy() == ref.argmax(1)).all()


def test_all_backends_find_the_same_neighbours():
    x_train, _, x_test, _ = clustered(n_train=300, n_test=40, spread=2.0)
    _, ref_idx = reference_knn(x_train, np.zeros(300, int), x_test, 1, 10, 0.07)
    for backend in CPU_BACKENDS:
        sims, idx = knn_search(x_train, x_test, 10, backend=backend)
        assert (idx.numpy() == ref_idx).all(), backend
        assert (sims[:, :-1] >= sims[:, 1:]).all(), "neighbours must be sorted by similarity"


def test_tiny_chunks_equal_unchunked():
    x_train, y_train, x_test, _ = clustered(n_train=257, n_test=33, spread=1.5)
    big_sims, big_idx = knn_search(x_train, x_test, 12, backend="torch", chunk_size=10_000, query_chunk_size=10_000)
    for backend in CPU_BACKENDS:
        sims, idx = knn_search(x_train, x_test, 12, backend=backend, chunk_size=7, query_chunk_size=3)
        assert (idx == big_idx).all(), backend
        torch.testing.assert_close(sims, big_sims)
    # a chunk smaller than k still merges into the exact top-k
    scores = knn_classify(x_train, y_train, x_test, 5, k=12, backend="torch", chunk_size=5, query_chunk_size=4)
    ref, _ = reference_knn(x_train, y_train, x_test, 5, 12, 0.07)
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-3)


def test_similarities_are_cosines_whatever_the_row_norms_and_inputs_stay_untouched():
    x_train, _, x_test, _ = clustered(n_train=300, n_test=40, spread=1.5)
    scales = np.logspace(-3, 3, len(x_test), dtype=np.float32)[:, None]  # queries of very different norms
    test = torch.from_numpy(x_test * scales)
    train = torch.from_numpy(x_train.copy())
    before = (train.clone(), test.clone())
    a = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    b = x_test / np.linalg.norm(x_test, axis=1, keepdims=True)
    cosines = b.astype(np.float64) @ a.astype(np.float64).T  # 40 × 300
    for backend in CPU_BACKENDS:
        sims, idx = knn_search(train, test, 10, backend=backend, chunk_size=64, query_chunk_size=16)
        assert (idx.numpy() == np.argsort(-cosines, axis=1, kind="stable")[:, :10]).all(), backend
        np.testing.assert_allclose(sims.numpy(), np.take_along_axis(cosines, idx.numpy(), 1), atol=2e-6)
        assert torch.equal(train, before[0]) and torch.equal(test, before[1]), f"{backend} changed its inputs"


def test_memmap_fp16_input(tmp_path):
    x_train, y_train, x_test, _ = clustered(spread=1.5)
    mm = np.lib.format.open_memmap(tmp_path / "train.npy", mode="w+", dtype=np.float16, shape=x_train.shape)
    mm[:] = x_train
    mm.flush()
    train = np.load(tmp_path / "train.npy", mmap_mode="r")
    test16 = x_test.astype(np.float16)
    ref, _ = reference_knn(train.astype(np.float32), y_train, test16.astype(np.float32), 5, 20, 0.07)
    for backend in CPU_BACKENDS:
        scores = knn_classify(train, y_train, test16, 5, k=20, backend=backend, chunk_size=64)
        np.testing.assert_allclose(scores.numpy(), ref, rtol=2e-3)


def test_knn_accuracy_separable_is_near_perfect():
    x_train, y_train, x_test, y_test = clustered(n_train=500, n_test=100, num_classes=10, spread=0.05)
    res = knn_accuracy(x_train, y_train, x_test, y_test, 10, ks=(10, 20, 100, 200))
    assert sorted(res) == [10, 20, 100, 200]
    for k, acc in res.items():
        assert acc["top1"] >= 0.98, (k, acc)
        assert acc["top5"] == 1.0


def test_knn_accuracy_random_labels_is_chance():
    x_train, y_train, x_test, y_test = clustered(
        n_train=2000, n_test=500, num_classes=10, spread=1.0, shuffle_labels=True
    )
    res = knn_accuracy(x_train, y_train, x_test, y_test, 10, ks=(20,))
    assert 0.03 < res[20]["top1"] < 0.2
    assert 0.35 < res[20]["top5"] < 0.65


def test_knn_accuracy_searches_once_and_matches_classify(monkeypatch):
    x_train, y_train, x_test, y_test = clustered(spread=1.5)
    calls = []
    real = knn_mod.knn_search

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(knn_mod, "knn_search", counting)
    res = knn_accuracy(x_train, y_train, x_test, y_test, 5, ks=(20, 5, 50), backend="torch")
    assert calls == [50]
    for k in (5, 20, 50):
        scores = knn_classify(x_train, y_train, x_test, 5, k=k, backend="torch")
        assert res[k]["top1"] == pytest.approx((scores.argmax(1).numpy() == y_test).mean())


def test_auto_backend_is_logged(caplog):
    x_train, _, x_test, _ = clustered()
    from dino_sparo.evaluation.knn_search import _log_backend

    _log_backend.cache_clear()  # logged once per process
    with caplog.at_level(logging.INFO, logger="dino_sparo.evaluation.knn_search"):
        knn_search(x_train, x_test, 5, backend="auto")
        knn_search(x_train, x_test, 5, backend="auto")
    assert caplog.text.count(f"k-NN backend: {available_backends()[0]} (auto: the first available of") == 1
    assert "requested" not in caplog.text


def test_bad_inputs_are_named():
    x_train, y_train, x_test, _ = clustered(n_train=10)
    with pytest.raises(ValueError, match="k must be"):
        knn_search(x_train, x_test, 11)
    with pytest.raises(ValueError, match="dim"):
        knn_search(x_train, x_test[:, :8], 3)
    with pytest.raises(ValueError, match="train_labels"):
        knn_classify(x_train, y_train, x_test, num_classes=2)
    with pytest.raises(ValueError, match="backend"):
        knn_search(x_train, x_test, 3, backend="annoy")


@pytest.mark.gpu
def test_gpu_backends_match_reference():
    x_train, y_train, x_test, _ = clustered(spread=1.5)
    ref, ref_idx = reference_knn(x_train, y_train, x_test, 5, 20, 0.07)
    cuda = torch.from_numpy(x_train).cuda(), torch.from_numpy(x_test).cuda()
    scores = knn_classify(cuda[0], y_train, cuda[1], 5, k=20, backend="torch", device="cuda")
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-3)
    if "faiss-gpu" in available_backends():
        _, idx = knn_search(x_train, x_test, 20, backend="faiss-gpu", chunk_size=50)
        assert (idx.numpy() == ref_idx).all()


# --------------------------------------------------------------------------- feature stores


def _toy_data(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 4, 4, generator=g), torch.arange(n) % 7)


def _toy_model():
    weight = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))
    return lambda images: images.flatten(1) @ weight  # B × 6


def test_extract_features_writes_normalised_rows_in_order(tmp_path):
    data = _toy_data()
    store = extract_features(_toy_model(), DataLoader(data, batch_size=5), tmp_path / "store", progress=False)
    expected = torch.nn.functional.normalize(_toy_model()(data.tensors[0]), dim=-1).numpy()
    assert isinstance(store.features, np.memmap) and store.features.dtype == np.float16
    np.testing.assert_allclose(store.features.astype(np.float32), expected, atol=2e-3)
    assert (store.labels == data.tensors[1].numpy()).all()
    assert store.meta["num_samples"] == 37 and store.dim == 6
    reopened = FeatureStore.open(tmp_path / "store")
    assert (np.asarray(reopened.features) == np.asarray(store.features)).all()
    with pytest.raises(FileExistsError):
        extract_features(_toy_model(), DataLoader(data, batch_size=5), tmp_path / "store", progress=False)


def test_shuffled_loader_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shuffle=False"):
        extract_features(_toy_model(), DataLoader(_toy_data(), shuffle=True), tmp_path / "s", progress=False)


def test_cache_hit_does_not_call_the_model(tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    ckpt.write_bytes(b"weights-v1" * 1000)
    calls = []
    model = _toy_model()

    def counting(images):
        calls.append(len(images))
        return model(images)

    loader = DataLoader(_toy_data(), batch_size=8)
    parts = {"dataset": "toy", "split": "train", "transform": "identity"}
    first = cached_features(tmp_path / "cache", parts, counting, loader, checkpoint=ckpt, progress=False)
    assert sum(calls) == 37
    second = cached_features(tmp_path / "cache", parts, counting, loader, checkpoint=ckpt, progress=False)
    assert sum(calls) == 37, "a cache hit must not run the model"
    assert second.path == first.path
    assert (np.asarray(second.features) == np.asarray(first.features)).all()
    # other data description, other dtype or other checkpoint content: miss
    cached_features(tmp_path / "cache", {**parts, "split": "test"}, counting, loader, checkpoint=ckpt, progress=False)
    cached_features(tmp_path / "cache", parts, counting, loader, dtype=np.float32, checkpoint=ckpt, progress=False)
    ckpt.write_bytes(b"weights-v2" * 1000)
    third = cached_features(tmp_path / "cache", parts, counting, loader, checkpoint=ckpt, progress=False)
    assert sum(calls) == 4 * 37 and third.path != first.path
    assert third.meta["key_parts"]["checkpoint"] == file_fingerprint(ckpt)


def test_failed_extraction_leaves_no_store(tmp_path):
    model = _toy_model()
    seen = []

    def failing(images):
        seen.append(1)
        if len(seen) == 3:
            raise RuntimeError("simulated crash")
        return model(images)

    loader = DataLoader(_toy_data(), batch_size=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cached_features(tmp_path / "cache", {"dataset": "toy"}, failing, loader, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    assert not FeatureStore.exists(feature_cache_path(tmp_path / "cache", {"dataset": "toy"}))
    store = cached_features(tmp_path / "cache", {"dataset": "toy"}, model, loader, progress=False)
    assert len(store) == 37


def test_file_fingerprint_modes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 10_000)
    full = file_fingerprint(path)
    assert full.startswith("sha256:") and full == file_fingerprint(path)
    fast = file_fingerprint(path, "fast", chunk_bytes=1024)
    path.write_bytes(bytes(range(256)) * 9_999 + bytes(256))
    assert file_fingerprint(path) != full and file_fingerprint(path, "fast", chunk_bytes=1024) != fast
    with pytest.raises(FileNotFoundError):
        file_fingerprint(tmp_path / "missing.pth")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, out: str, fail_rank: int = -1) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = _toy_model()

    def model_fn(images):
        if rank == fail_rank:
            raise RuntimeError(f"simulated failure on rank {rank}")
        return model(images)

    try:
        extract_features(model_fn, DataLoader(_toy_data(), batch_size=4), out, dtype=np.float32, progress=False)
    finally:
        dist.destroy_process_group()


def test_distributed_extraction_matches_single_process(tmp_path):
    single = extract_features(
        _toy_model(), DataLoader(_toy_data(), batch_size=4), tmp_path / "single", dtype=np.float32, progress=False
    )
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path / "dist")), nprocs=2, join=True)
    merged = FeatureStore.open(tmp_path / "dist")
    np.testing.assert_array_equal(np.asarray(merged.features), np.asarray(single.features))
    np.testing.assert_array_equal(merged.labels, single.labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "single"], "no temporary shard left behind"
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["features.npy", "labels.npy", "meta.json"]


def test_distributed_failure_on_one_rank_leaves_nothing(tmp_path):
    with pytest.raises(Exception, match="simulated failure on rank 1|failed on other ranks"):
        mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path / "dist"), 1), nprocs=2, join=True)
    assert list(tmp_path.iterdir()) == []


def test_shard_bounds_cover_dataset_contiguously():
    for num, world in [(37, 2), (3, 4), (100, 7)]:
        bounds = features_mod._shard_bounds(num, world)
        assert bounds[0] == 0 and bounds[-1] == num and all(a <= b for a, b in zip(bounds, bounds[1:]))
        assert max(np.diff(bounds)) - min(np.diff(bounds)) <= 1
