"""The k-NN search engine on frozen features: exact top-k with bounded memory, DINO's weighted vote.

Shared by the k-NN protocol (``evaluation.knn``), slot analysis and the linear probe's feature
reading. The vote is DINO's: the k most similar train features by inner product of L2-normalised
features (cosine similarity), each weighted by exp(sim / T), summed per class.

The search streams both sets in blocks and keeps a running top-k, so neither the train
features nor the full test × train similarity matrix is ever held at once: train features
can live in a memory-mapped ``.npy`` file larger than memory (dino#161 ran out of memory
holding them all on one GPU). Each train block is normalised once; test rows are ranked
unnormalised (a row's norm scales its similarities, not their order) and their k similarities
divided by the norm at the end. Every backend runs the same exact search:

- ``"torch"``: blocked matmul on ``device`` (CUDA when available) into one preallocated tile,
  its top-k merged into a running top-k;
- ``"faiss-cpu"``: the same tiles offered to faiss' per-row heaps, which carry each row's k-th
  best across all tiles (most similarities cost one comparison);
- ``"faiss-gpu"``: ``faiss.knn_gpu`` per block, merged as torch's;
- ``"auto"``: faiss-gpu, then faiss-cpu, then torch, whichever is available first.

Peak memory of one search (fp32, D = feature dim, k = neighbours)::

    chunk_size × D × 4                                 one train block, read + normalised
  + query_chunk_size × D × 4                           one test block
  + query_chunk_size × chunk_size × 4                  the similarity tile (allocated once)
  + num_test × (k × 12 + 4) (+ query_chunk_size × 2k × 12)   running top-k, test norms

With the defaults (16,384 train × 1,024 test rows per block) that is about 90 MB at D = 384 and
350 MB at D = 4096, plus the result, whatever the number of train features. Wider train blocks
mean fewer passes over test and fewer merges (at D = 384, 8,192-row blocks were 10–20 % slower); raise
the chunk sizes on a GPU for speed.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from dino_sparo.errors import UsageError
from dino_sparo.runtime import resolve_device

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss-gpu", "faiss-cpu", "torch")

# Anything with ``.shape`` (2-D) and row slicing: torch tensors, numpy arrays and memmaps,
# or lazy views such as ``slots.SelectedSlots``.
FeatureArray = Any

_FAISS_GPU_RESOURCES: Any = None


# --------------------------------------------------------------------------- backends


def _import_faiss() -> Any | None:
    # faiss' loader logs each build it tries (AVX-512, AVX2, generic) at INFO, failures included
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None
    return faiss


def faiss_gpu_available() -> bool:
    """True when both torch and faiss see a GPU (faiss-gpu build installed)."""
    faiss = _import_faiss()
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return False
    return torch.cuda.is_available() and faiss.get_num_gpus() > 0


def faiss_cpu_available() -> bool:
    return _import_faiss() is not None


def available_backends() -> list[str]:
    """Concrete backends usable on this machine, in ``"auto"`` preference order."""
    found = []
    if faiss_gpu_available():
        found.append("faiss-gpu")
    if faiss_cpu_available():
        found.append("faiss-cpu")
    found.append("torch")
    return found


@functools.lru_cache(maxsize=None)
def _log_backend(chosen: str, requested: str, available: tuple[str, ...]) -> None:
    """Once per process: the backend ``auto`` chose, and among what."""
    logger.info("k-NN backend: %s (%s: the first available of %s)", chosen, requested, ", ".join(available))


def resolve_knn_backend(backend: str = "auto") -> str:
    """Turn ``"auto"`` into the first available backend; refuse unknown or missing ones."""
    if backend not in BACKENDS:
        raise UsageError(f"k-NN backend must be one of {BACKENDS}, got {backend!r}")
    available = available_backends()
    if backend == "auto":
        _log_backend(available[0], backend, tuple(available))
        return available[0]
    if backend not in available:
        raise UsageError(
            f"k-NN backend {backend!r} is not available here (available: {available}); "
            "install faiss-cpu / faiss-gpu or use backend='torch'"
        )
    return backend


def _faiss_gpu_resources() -> Any:
    global _FAISS_GPU_RESOURCES
    if _FAISS_GPU_RESOURCES is None:
        _FAISS_GPU_RESOURCES = _import_faiss().StandardGpuResources()
    return _FAISS_GPU_RESOURCES


# --------------------------------------------------------------------------- inputs


def feature_shape(x: FeatureArray, name: str) -> tuple[int, int]:
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (num_samples × dim), got shape {shape}")
    return int(shape[0]), int(shape[1])


def read_rows(x: FeatureArray, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a tensor / array / memmap as a float32 tensor (same device)."""
    block = x[start:stop]
    if not isinstance(block, torch.Tensor):
        block = torch.from_numpy(np.array(block))  # a copy: memmaps are read-only
    return block.detach().float()


def _rows(x: FeatureArray, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` on ``device`` as a float32 tensor of our own (never the caller's tensor)."""
    block = x[start:stop]
    if isinstance(block, torch.Tensor):
        return block.detach().to(device=device, dtype=torch.float32, copy=True)
    return torch.from_numpy(np.array(block, dtype=np.float32)).to(device)  # a copy: memmaps are read-only


def _split(block: torch.Tensor, groups: int) -> torch.Tensor:
    """n × (G·d) → G × n × d (a view)."""
    n, dim = block.shape
    return block.view(n, groups, dim // groups).transpose(0, 1) if groups > 1 else block.view(1, n, dim)


def _normalised_rows(x: FeatureArray, start: int, stop: int, groups: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` on ``device``, each of their ``groups`` equal parts L2-normalised (as
    ``F.normalize``) → G × n × d; one copy of the block, normalised in place."""
    parts = _split(_rows(x, start, stop, device), groups)  # G × n × d
    return parts.div_(torch.linalg.vector_norm(parts, dim=-1, keepdim=True).clamp_min_(1e-12))


def _inverse_norms(x: FeatureArray, groups: int, block_rows: int, device: torch.device) -> torch.Tensor:
    """1 / ‖row part‖ (``F.normalize``'s clamp at 1e-12) of every row of ``x`` → G × n, in one pass."""
    n, _ = feature_shape(x, "test_features")
    out = torch.empty(groups, n, device=device)
    for r0 in range(0, n, block_rows):
        r1 = min(r0 + block_rows, n)
        out[:, r0:r1] = torch.linalg.vector_norm(_split(_rows(x, r0, r1, device), groups), dim=-1)
    return out.clamp_min_(1e-12).reciprocal_()


def as_label_tensor(labels: Any, num: int, name: str = "labels") -> torch.Tensor:
    """Labels as a CPU int64 tensor, checked for length."""
    if isinstance(labels, torch.Tensor):
        out = labels.detach().to("cpu", torch.int64)
    else:
        out = torch.from_numpy(np.asarray(labels).astype(np.int64, copy=False))
    out = out.reshape(-1)
    if out.numel() != num:
        raise ValueError(f"{name} has {out.numel()} entries but the features have {num} rows")
    return out


def _check_labels(labels: torch.Tensor, num_classes: int, name: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}), "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )


# --------------------------------------------------------------------------- search


class _RunningTopK:
    """The k best (similarity, train index) of every test row so far, as torch tensors on ``device``;
    each tile's own top-k is merged in (exact: a row's k best are among its tiles' k best)."""

    def __init__(self, groups: int, n_test: int, k: int, device: torch.device) -> None:
        self.k = k
        self.vals = torch.full((groups, n_test, k), -math.inf, device=device)  # G × n_test × k
        self.idx = torch.full((groups, n_test, k), -1, dtype=torch.int64, device=device)

    def add_similarities(self, sims: torch.Tensor, q0: int, t0: int) -> None:
        """``sims``: G × tq × tc similarities of test rows q0… to train rows t0…"""
        vals, idx = sims.topk(min(self.k, sims.shape[-1]), dim=-1)
        self.add_candidates(vals, idx, q0, t0)

    def add_candidates(self, vals: torch.Tensor, idx: torch.Tensor, q0: int, t0: int) -> None:
        q1 = q0 + vals.shape[1]
        vals = torch.cat([self.vals[:, q0:q1], vals.to(self.vals.device)], dim=-1)
        idx = torch.cat([self.idx[:, q0:q1], idx.to(self.idx.device) + t0], dim=-1)
        top, pos = vals.topk(self.k, dim=-1)
        self.vals[:, q0:q1] = top
        self.idx[:, q0:q1] = idx.gather(-1, pos)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vals.cpu(), self.idx.cpu()


class _FaissHeaps:
    """The same running top-k in faiss' per-row min-heaps (``faiss-cpu``): every similarity of a
    tile is offered to its row's heap, which keeps its k-th best as the bar across all tiles, so
    most values are rejected by one comparison instead of being ranked tile by tile."""

    def __init__(self, n_test: int, k: int) -> None:
        faiss = _import_faiss()
        self._ptr = faiss.swig_ptr
        self.vals = np.empty((n_test, k), dtype=np.float32)
        self.idx = np.empty((n_test, k), dtype=np.int64)
        self.heaps = faiss.float_minheap_array_t()  # a min-heap keeps the largest values
        self.heaps.k, self.heaps.nh = k, n_test
        self.heaps.val, self.heaps.ids = self._ptr(self.vals), self._ptr(self.idx)
        self.heaps.heapify()

    def add_similarities(self, sims: torch.Tensor, q0: int, t0: int) -> None:
        block = sims[0].numpy()  # tq × tc, C-contiguous float32 (a view of the tile buffer)
        self.heaps.addn(block.shape[1], self._ptr(block), t0, q0, block.shape[0])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.heaps.reorder()  # each row sorted, best first
        return torch.from_numpy(self.vals)[None], torch.from_numpy(self.idx)[None]


def _faiss_gpu_block_search(q: torch.Tensor, t: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    faiss = _import_faiss()
    xq = np.ascontiguousarray(q[0].cpu().numpy())  # tq × D
    xb = np.ascontiguousarray(t[0].cpu().numpy())  # tc × D
    sims, idx = faiss.knn_gpu(_faiss_gpu_resources(), xq, xb, kk, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(sims)[None], torch.from_numpy(idx)[None]


def _stream_topk(
    train: FeatureArray,
    test: FeatureArray,
    k: int,
    groups: int,
    backend: str,
    device: torch.device,
    chunk_size: int,
    query_chunk_size: int,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over train for every test row (per group), streaming both in blocks.

    Train is the outer loop, so a memmap is read from disk once, sequentially, and each train block
    is normalised once. Test rows are not normalised at all: dividing a row's similarities by its
    norm does not change their order, so the search ranks ``q · t̂`` and the k similarities kept are
    scaled by 1 / ‖q‖ at the end (norms from one pass over test). The similarity tiles of the torch
    and faiss-cpu backends are written into one buffer allocated up front (a fresh tile per product
    would cost page faults and zeroing).
    """
    n_train, _ = feature_shape(train, "train_features")
    n_test, _ = feature_shape(test, "test_features")
    inverse_norms = _inverse_norms(test, groups, query_chunk_size, device)  # G × n_test
    running: Any = _FaissHeaps(n_test, k) if backend == "faiss-cpu" else _RunningTopK(groups, n_test, k, device)
    tile = None
    if backend != "faiss-gpu":
        tile = torch.empty(groups * min(query_chunk_size, n_test) * min(chunk_size, n_train), device=device)
    starts = range(0, n_train, chunk_size)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        starts = tqdm(starts, desc="k-NN search", unit="chunk", leave=False)
    for t0 in starts:
        t1 = min(t0 + chunk_size, n_train)
        tb = _normalised_rows(train, t0, t1, groups, device)  # G × tc × d
        for q0 in range(0, n_test, query_chunk_size):
            q1 = min(q0 + query_chunk_size, n_test)
            qb = _split(_rows(test, q0, q1, device), groups)  # G × tq × d, not normalised
            if tile is None:  # faiss-gpu: its own search per tile, merged here
                vals, idx = _faiss_gpu_block_search(qb, tb, min(k, t1 - t0))
                running.add_candidates(vals, idx, q0, t0)
                continue
            sims = tile[: groups * (q1 - q0) * (t1 - t0)].view(groups, q1 - q0, t1 - t0)  # G × tq × tc
            if groups == 1:
                torch.mm(qb[0], tb[0].T, out=sims[0])
            else:
                torch.bmm(qb, tb.transpose(1, 2), out=sims)
            running.add_similarities(sims, q0, t0)
        del tb  # before the next block is read: the bound counts one train block, not two
    vals, idx = running.result()  # G × n_test × k, sorted: a positive factor per row keeps the order
    return vals * inverse_norms.cpu().unsqueeze(-1), idx


def _validate_search(train: FeatureArray, test: FeatureArray, k: int, groups: int = 1) -> None:
    n_train, d_train = feature_shape(train, "train_features")
    _, d_test = feature_shape(test, "test_features")
    if d_train != d_test:
        raise ValueError(f"train_features have dim {d_train} but test_features have dim {d_test}")
    if d_train % groups:
        raise ValueError(f"feature dim {d_train} is not divisible into {groups} slots")
    if not 1 <= k <= n_train:
        raise UsageError(f"k must be in [1, num_train={n_train}], got k={k}")


def knn_search(
    train_features: FeatureArray,
    test_features: FeatureArray,
    k: int,
    backend: str = "auto",
    chunk_size: int = 16384,
    query_chunk_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar train rows (cosine) of every test row, sorted by decreasing similarity.

    Returns ``(similarities, indices)``, both ``num_test × k`` CPU tensors (float32, int64).
    ``device`` is used by the torch backend only (default: CUDA when available).
    See the module docstring for the backends and the memory bound.
    """
    _validate_search(train_features, test_features, k)
    if chunk_size < 1 or query_chunk_size < 1:
        raise ValueError(f"chunk sizes must be >= 1, got chunk_size={chunk_size}, query_chunk_size={query_chunk_size}")
    name = resolve_knn_backend(backend)
    dev = resolve_device(device) if name == "torch" else torch.device("cpu")
    vals, idx = _stream_topk(
        train_features, test_features, k, 1, name, dev, chunk_size, query_chunk_size, progress
    )
    return vals[0], idx[0]


def grouped_knn_search(
    train_features: FeatureArray,
    test_features: FeatureArray,
    k: int,
    groups: int,
    chunk_size: int = 8192,
    query_chunk_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``knn_search`` run independently on ``groups`` equal column blocks (e.g. SPARO slots) in one pass.

    Each block is L2-normalised on its own (per-slot cosine). Returns ``G × num_test × k``
    similarities and indices. Torch only; peak memory is the module's bound with the
    similarity block multiplied by G and the result by G.
    """
    _validate_search(train_features, test_features, k, groups)
    dev = resolve_device(device)
    return _stream_topk(
        train_features, test_features, k, groups, "torch", dev, chunk_size, query_chunk_size, progress
    )


# --------------------------------------------------------------------------- vote


def knn_vote(
    similarities: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int, temperature: float = 0.07
) -> torch.Tensor:
    """DINO's weighted vote: class scores = Σ over neighbours of exp(sim / T) · onehot(label).

    ``similarities`` and ``neighbor_labels`` are ``... × k``; returns ``... × num_classes``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = (similarities.float() / temperature).exp()  # ... × k
    scores = torch.zeros(*similarities.shape[:-1], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(-1, neighbor_labels.long(), weights)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the ``t`` highest scores, for each t (capped at C)."""
    labels = labels.reshape(-1, 1).to(scores.device)
    out = {}
    for t in topk:
        pred = scores.topk(min(t, scores.shape[-1]), dim=-1).indices  # N × t
        out[f"top{t}"] = (pred == labels).any(dim=-1).double().mean().item() if labels.numel() else float("nan")
    return out


# --------------------------------------------------------------------------- public entry points


def knn_classify(
    train_features: FeatureArray,
    train_labels: Any,
    test_features: FeatureArray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    backend: str = "auto",
    chunk_size: int = 16384,
    query_chunk_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Class scores (``num_test × num_classes``, CPU float32) of DINO's weighted k-NN vote.

    Features may be torch tensors, numpy arrays or memmaps (fp32 or fp16); they are
    L2-normalised block by block, so unnormalised inputs are fine.
    """
    n_train, _ = feature_shape(train_features, "train_features")
    labels = as_label_tensor(train_labels, n_train, "train_labels")
    _check_labels(labels, num_classes, "train_labels")
    sims, idx = knn_search(
        train_features, test_features, k, backend, chunk_size, query_chunk_size, device, progress
    )
    return knn_vote(sims, labels[idx], num_classes, temperature)


def knn_accuracy(
    train_features: FeatureArray,
    train_labels: Any,
    test_features: FeatureArray,
    test_labels: Any,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    backend: str = "auto",
    chunk_size: int = 16384,
    query_chunk_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) of the k-NN vote for every k in ``ks``.

    One search with max(ks); the sorted neighbours are reused for the smaller k.
    Returns ``{k: {"top1": ..., "top5": ...}}``.
    """
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise ValueError("ks must name at least one k")
    n_train, _ = feature_shape(train_features, "train_features")
    n_test, _ = feature_shape(test_features, "test_features")
    y_train = as_label_tensor(train_labels, n_train, "train_labels")
    y_test = as_label_tensor(test_labels, n_test, "test_labels")
    _check_labels(y_train, num_classes, "train_labels")
    _check_labels(y_test, num_classes, "test_labels")
    sims, idx = knn_search(
        train_features, test_features, ks[-1], backend, chunk_size, query_chunk_size, device, progress
    )
    neighbor_labels = y_train[idx]  # num_test × max_k
    results = {}
    for k in ks:
        scores = knn_vote(sims[:, :k], neighbor_labels[:, :k], num_classes, temperature)
        results[k] = topk_accuracy(scores, y_test, (1, 5))
    return results
