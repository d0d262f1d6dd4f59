"""Feature extraction to memory-mapped ``.npy`` files, with an on-disk cache keyed by content.

A feature store is a directory holding ``features.npy`` (N × D, float16 or float32,
L2-normalised rows, memory-mapped on read), ``labels.npy`` (N int64) and ``meta.json``.
Rows are in dataset order. A store is written under a temporary name and renamed into
place only when complete, so a crash or an error never leaves a half-written store
(at worst a ``.<name>.tmp-*`` directory that nothing reads).

Distributed: when ``torch.distributed`` is initialised, rank r extracts the r-th contiguous
slice of the dataset into its own shard file in the temporary directory (which must be on
a file system all ranks share); rank 0 then concatenates the shards by streaming them
chunk by chunk into the final memmap, so no process ever holds all features in memory.

A :class:`FeatureWorkspace` is what an evaluation extracts into: the cache folder (stores reused
by later runs, keyed by the weights' fingerprint, the feature kind, the dataset and its transform)
or a scratch folder removed on exit; :func:`extract_splits` fills it with a network's features of
named splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from dino_sparo import distributed
from dino_sparo.data.datasets import dataset_targets
from dino_sparo.data.loaders import LoaderWorkers
from dino_sparo.evaluation.feature_kinds import FeatureSpec, feature_fn, module_fingerprint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
_COPY_BYTES = 64 << 20  # rows copied per step when merging shards

ModelFn = Callable[[torch.Tensor], torch.Tensor]  # images B × ... -> features B × D


# --------------------------------------------------------------------------- store


@dataclass
class FeatureStore:
    """A finished feature store on disk: ``features`` is a read-only memmap (N × D)."""

    path: Path
    features: np.ndarray  # N × D memmap
    labels: np.ndarray  # N int64
    meta: dict[str, Any]

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        path = Path(path)
        return all((path / name).is_file() for name in (FEATURES_FILE, LABELS_FILE, META_FILE))

    @classmethod
    def open(cls, path: str | os.PathLike) -> "FeatureStore":
        path = Path(path)
        if not cls.exists(path):
            raise FileNotFoundError(f"no feature store at {path} (needs {FEATURES_FILE}, {LABELS_FILE}, {META_FILE})")
        meta = json.loads((path / META_FILE).read_text())
        features = np.load(path / FEATURES_FILE, mmap_mode="r")
        labels = np.load(path / LABELS_FILE)
        if features.shape[0] != labels.shape[0] or features.shape[0] != meta.get("num_samples"):
            raise ValueError(
                f"feature store {path} is inconsistent: features {features.shape}, labels {labels.shape}, "
                f"meta num_samples={meta.get('num_samples')}"
            )
        return cls(path, features, labels, meta)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


# --------------------------------------------------------------------------- helpers


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"the loader must yield (images, labels, ...) tuples, got {type(batch).__name__}")


def _check_sequential(loader: Any) -> None:
    if not hasattr(loader, "dataset"):
        raise TypeError(f"extract_features needs a DataLoader with a .dataset, got {type(loader).__name__}")
    if not isinstance(getattr(loader, "sampler", None), SequentialSampler) or getattr(loader, "drop_last", False):
        raise ValueError(
            "features are written in dataset order: pass a DataLoader with shuffle=False, "
            "no custom sampler and drop_last=False (sharding across ranks is done here)"
        )


def _shard_bounds(num: int, world: int) -> list[int]:
    """Contiguous, balanced slices: rank r gets [bounds[r], bounds[r + 1])."""
    return [num * r // world for r in range(world + 1)]


def _shard_loader(loader: DataLoader, start: int, stop: int) -> DataLoader:
    """The same loader settings over dataset rows ``start:stop``."""
    kwargs: dict[str, Any] = dict(
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
    )
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, persistent_workers=False)
    return DataLoader(Subset(loader.dataset, range(start, stop)), shuffle=False, **kwargs)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())


def _write_shard(
    model_fn: ModelFn,
    loader: Iterable,
    features_path: Path,
    labels_path: Path,
    num_samples: int,
    dtype: np.dtype,
    normalize: bool,
    device: torch.device | None,
    progress: bool,
) -> int:
    """Run the model over ``loader``; stream rows into a fresh memmap. Returns the feature dim."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    out: np.ndarray | None = None
    labels = np.empty(num_samples, dtype=np.int64)
    pos = 0
    with torch.inference_mode(), LoaderWorkers() as workers:  # workers shut down on an error too
        batches = tqdm(workers.iterate(loader), total=len(loader), desc="features", unit="batch", disable=not progress)
        for step, batch in enumerate(batches):
            images, targets = _split_batch(batch)
            if device is not None:
                images = images.to(device, non_blocking=True)
            feats = model_fn(images)
            if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
                raise ValueError(f"model_fn must return a B × D tensor, got {getattr(feats, 'shape', type(feats))}")
            feats = feats.detach().float()  # B × D
            targets = torch.as_tensor(targets).reshape(-1)
            n = feats.shape[0]
            if targets.numel() != n:
                raise ValueError(f"batch {step}: model_fn returned {n} rows for {targets.numel()} labels")
            if pos + n > num_samples:
                raise ValueError(f"the loader yielded more than len(dataset)={num_samples} samples")
            if not torch.isfinite(feats).all():
                raise ValueError(f"batch {step}: model_fn returned non-finite features")
            if normalize:
                feats = F.normalize(feats, dim=-1)
            if out is None:
                out = np.lib.format.open_memmap(features_path, mode="w+", dtype=dtype, shape=(num_samples, feats.shape[1]))
            elif feats.shape[1] != out.shape[1]:
                raise ValueError(f"batch {step}: feature dim {feats.shape[1]} differs from {out.shape[1]}")
            out[pos : pos + n] = feats.cpu().numpy().astype(dtype, copy=False)
            labels[pos : pos + n] = targets.cpu().numpy()
            pos += n
    if pos != num_samples:
        raise ValueError(f"the loader yielded {pos} samples, expected len(dataset)={num_samples}")
    if out is None:  # empty shard: dim unknown here, the merge takes it from the others
        out = np.lib.format.open_memmap(features_path, mode="w+", dtype=dtype, shape=(0, 0))
    dim = int(out.shape[1])
    out.flush()
    del out
    _fsync(features_path)
    _save_npy(labels_path, labels)
    return dim


def _merge_shards(tmp: Path, world: int, dtype: np.dtype) -> tuple[int, int]:
    """Concatenate the rank shards into ``features.npy`` / ``labels.npy`` by streaming."""
    shards = [np.load(tmp / f"shard{r:05d}.{FEATURES_FILE}", mmap_mode="r") for r in range(world)]
    num = sum(s.shape[0] for s in shards)
    dims = {s.shape[1] for s in shards if s.shape[0]}
    if len(dims) != 1:
        raise ValueError(f"rank shards disagree on the feature dim (or are all empty): {sorted(dims)}")
    dim = dims.pop()
    out = np.lib.format.open_memmap(tmp / FEATURES_FILE, mode="w+", dtype=dtype, shape=(num, dim))
    rows = max(1, _COPY_BYTES // (dim * out.itemsize))
    pos = 0
    for shard in shards:
        for a in range(0, shard.shape[0], rows):
            b = min(a + rows, shard.shape[0])
            out[pos + a : pos + b] = shard[a:b]
        pos += shard.shape[0]
    out.flush()
    del out, shards
    _fsync(tmp / FEATURES_FILE)
    labels = np.concatenate([np.load(tmp / f"shard{r:05d}.{LABELS_FILE}") for r in range(world)])
    _save_npy(tmp / LABELS_FILE, labels)
    for r in range(world):
        (tmp / f"shard{r:05d}.{FEATURES_FILE}").unlink()
        (tmp / f"shard{r:05d}.{LABELS_FILE}").unlink()
    return num, dim


def _publish(tmp: Path, path: Path, overwrite: bool, token: str) -> None:
    """Atomically move a finished temporary store to ``path``."""
    if path.exists() and overwrite:
        old = path.with_name(f".{path.name}.old-{token}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, path)
    except OSError:
        if not FeatureStore.exists(path):
            raise
        # another process published the same store first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _write_meta(tmp: Path, num: int, dim: int, dtype: np.dtype, normalize: bool, meta: Mapping[str, Any] | None) -> None:
    info = {
        "format_version": FORMAT_VERSION,
        "num_samples": num,
        "dim": dim,
        "dtype": np.dtype(dtype).name,
        "normalized": normalize,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **dict(meta or {}),
    }
    with open(tmp / META_FILE, "w") as fh:
        json.dump(info, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------- extraction


def extract_features(
    model_fn: ModelFn,
    loader: DataLoader,
    path: str | os.PathLike,
    dtype: Any = np.float16,
    normalize: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> FeatureStore:
    """Write ``model_fn(images)`` for every sample of ``loader`` to a feature store at ``path``.

    ``loader`` must iterate its dataset in order (``shuffle=False``) and yield
    ``(images, labels, ...)``; under ``torch.distributed`` every rank passes the same full
    loader and extracts its own contiguous slice. ``model_fn`` gets the images (moved to
    ``device`` when given) under ``torch.inference_mode`` and returns ``B × D``; rows are
    L2-normalised in fp32 before the cast to ``dtype``. ``meta`` is stored in ``meta.json``.
    Every rank returns the opened store. Peak memory: one batch of features plus the labels.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32):
        raise ValueError(f"dtype must be float16 or float32, got {dtype}")
    if FeatureStore.exists(path) and not overwrite:
        raise FileExistsError(f"a feature store already exists at {path} (pass overwrite=True to replace it)")
    _check_sequential(loader)
    num = len(loader.dataset)
    dev = torch.device(device) if device is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)

    if not distributed.is_dist():
        token = uuid.uuid4().hex
        tmp = path.with_name(f".{path.name}.tmp-{token}")
        tmp.mkdir()
        try:
            dim = _write_shard(model_fn, loader, tmp / FEATURES_FILE, tmp / LABELS_FILE, num, dtype, normalize, dev, progress)
            _write_meta(tmp, num, dim, dtype, normalize, meta)
            _publish(tmp, path, overwrite, token)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("wrote %d features of dim %d (%s) to %s", num, dim, dtype.name, path)
        return FeatureStore.open(path)

    rank, world = dist.get_rank(), dist.get_world_size()
    token = distributed.broadcast_object(uuid.uuid4().hex if rank == 0 else None)
    tmp = path.with_name(f".{path.name}.tmp-{token}")
    tmp.mkdir(exist_ok=True)
    bounds = _shard_bounds(num, world)
    error: BaseException | None = None
    try:
        _write_shard(
            model_fn,
            _shard_loader(loader, bounds[rank], bounds[rank + 1]),
            tmp / f"shard{rank:05d}.{FEATURES_FILE}",
            tmp / f"shard{rank:05d}.{LABELS_FILE}",
            bounds[rank + 1] - bounds[rank],
            dtype,
            normalize,
            dev,
            progress and rank == 0,
        )
    except Exception as exc:  # noqa: BLE001 (re-raised below once every rank knows)
        error = exc
    statuses: list[Any] = [None] * world
    dist.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}")
    failed = {r: s for r, s in enumerate(statuses) if s is not None}
    merge_error = None
    if rank == 0:
        try:
            if not failed:
                n, dim = _merge_shards(tmp, world, dtype)
                _write_meta(tmp, n, dim, dtype, normalize, meta)
                _publish(tmp, path, overwrite, token)
                logger.info("wrote %d features of dim %d (%s) from %d ranks to %s", n, dim, dtype.name, world, path)
        except Exception as exc:  # noqa: BLE001
            merge_error = f"{type(exc).__name__}: {exc}"
            error = error or exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    merge_error = distributed.broadcast_object(merge_error)
    if error is not None:
        raise error
    if failed or merge_error:
        raise RuntimeError(f"feature extraction failed on other ranks: {failed or {0: merge_error}}")
    return FeatureStore.open(path)


# --------------------------------------------------------------------------- cache


def file_fingerprint(path: str | os.PathLike, mode: str = "sha256", chunk_bytes: int = 1 << 20) -> str:
    """A string that changes when the file's content changes, for cache keys.

    ``"sha256"`` (default) hashes the whole file in chunks: exact, ~1 s per GB.
    ``"fast"`` hashes size, modification time and the first and last ``chunk_bytes``:
    instant, but a same-size rewrite that keeps mtime and both ends would not be noticed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file")
    digest = hashlib.sha256()
    if mode == "sha256":
        with open(path, "rb") as fh:
            while block := fh.read(chunk_bytes):
                digest.update(block)
    elif mode == "fast":
        stat = path.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(chunk_bytes))
            fh.seek(max(0, stat.st_size - chunk_bytes))
            digest.update(fh.read(chunk_bytes))
    else:
        raise ValueError(f"fingerprint mode must be 'sha256' or 'fast', got {mode!r}")
    return f"{mode}:{digest.hexdigest()}"


def feature_cache_key(key_parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``key_parts`` (plus the store format version)."""
    for name, value in key_parts.items():
        try:
            json.dumps(value, sort_keys=True)
        except TypeError as exc:
            raise TypeError(f"feature cache key part {name!r} is not JSON-serialisable: {value!r}") from exc
    blob = json.dumps({"format_version": FORMAT_VERSION, **key_parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def feature_cache_path(
    cache_dir: str | os.PathLike, key_parts: Mapping[str, Any], dtype: Any = np.float16, normalize: bool = True
) -> Path:
    """Where ``cached_features`` keeps the store for these key parts (check it to skip loading a model)."""
    parts = {**key_parts, "dtype": np.dtype(dtype).name, "normalized": normalize}
    return Path(cache_dir) / feature_cache_key(parts)[:32]


def cached_features(
    cache_dir: str | os.PathLike,
    key_parts: Mapping[str, Any],
    model_fn: ModelFn,
    loader: DataLoader,
    dtype: Any = np.float16,
    normalize: bool = True,
    checkpoint: str | os.PathLike | None = None,
    fingerprint: str = "sha256",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> FeatureStore:
    """Open the cached store for ``key_parts``, or extract it (atomically) on a miss.

    ``key_parts`` describes everything the features depend on besides the weights: dataset,
    split, transform, read-out... (JSON-serialisable). When ``checkpoint`` is given, its
    ``file_fingerprint`` (``fingerprint`` mode) is added as ``key_parts["checkpoint"]``.
    """
    parts = dict(key_parts)
    if checkpoint is not None:
        parts["checkpoint"] = file_fingerprint(checkpoint, fingerprint)
    path = feature_cache_path(cache_dir, parts, dtype, normalize)
    hit = FeatureStore.exists(path)
    if distributed.is_dist():  # one decision for all ranks
        hit = distributed.broadcast_object(hit)
    if hit:
        logger.info("feature cache hit: %s", path)
        return FeatureStore.open(path)
    logger.info("feature cache miss: extracting to %s", path)
    return extract_features(
        model_fn, loader, path, dtype=dtype, normalize=normalize, device=device, progress=progress,
        meta={"key_parts": parts},
    )


# --------------------------------------------------------------------------- evaluation workspace


def dataset_key(dataset: Dataset) -> Optional[dict[str, Any]]:
    """What the cache needs to know about a dataset (description, size, labels, transform); None
    when the dataset has no stable description (features are then not cached)."""
    if isinstance(dataset, Subset):
        inner = dataset_key(dataset.dataset)
        if inner is None:
            return None
        indices = np.asarray(dataset.indices, dtype=np.int64)
        return {"subset_of": inner, "indices": hashlib.sha256(indices.tobytes()).hexdigest()[:32]}
    text = repr(dataset)
    if " object at 0x" in text:
        return None
    targets = dataset_targets(dataset)
    return {
        "dataset": text,
        "num_samples": len(dataset),
        "targets": hashlib.sha256(targets.tobytes()).hexdigest()[:32],
        "transform": repr(getattr(dataset, "transform", None)),
    }


class FeatureWorkspace:
    """Where the splits' features go: ``cache_dir`` (kept, reused by later runs) or, without one, a
    scratch folder removed on exit. Datasets without a stable description also go to scratch.

    Use as a context manager; every rank must enter it (the scratch path is decided on rank 0).
    """

    def __init__(self, cache_dir: Optional[str | os.PathLike] = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._scratch: Optional[Path] = None

    def __enter__(self) -> "FeatureWorkspace":
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            base = str(self.cache_dir)
        else:
            base = None
        name = distributed.broadcast_object(
            tempfile.mkdtemp(prefix="dino_sparo_features_", dir=base) if distributed.get_rank() == 0 else None)
        self._scratch = Path(name)
        self._scratch.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        distributed.barrier()
        if distributed.get_rank() == 0 and self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def features(
        self,
        model_fn: Any,
        dataset: Dataset,
        weights: str,
        spec: FeatureSpec,
        name: str,
        fp16: bool = False,
        batch_size: int = 256,
        num_workers: int = 0,
        device: Optional[torch.device] = None,
        progress: bool = True,
    ) -> tuple[FeatureStore, bool]:
        """The feature store of ``dataset`` (extracted or found in the cache) and whether it was found."""
        if self._scratch is None:
            raise RuntimeError("FeatureWorkspace must be entered (with ...) before use")
        dtype = np.float16 if fp16 else np.float32
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device is not None and device.type == "cuda")
        data = dataset_key(dataset)
        if self.cache_dir is None or data is None:
            if self.cache_dir is not None:
                logger.warning("dataset %s has no stable description: its features are not cached",
                               type(dataset).__name__)
            store = extract_features(model_fn, loader, self._scratch / name, dtype=dtype, normalize=False,
                                     device=device, progress=progress)
            return store, False
        parts = {"weights": weights, "features": spec.to_dict(), "data": data}
        hit = FeatureStore.exists(feature_cache_path(self.cache_dir, parts, dtype, normalize=False))
        store = cached_features(self.cache_dir, parts, model_fn, loader, dtype=dtype, normalize=False,
                                device=device, progress=progress)
        return store, bool(distributed.broadcast_object(hit))


@contextlib.contextmanager
def frozen(backbone: Optional[nn.Module], device: torch.device) -> Iterator[None]:
    """The backbone on ``device`` in eval mode for the evaluation; its train/eval mode is restored
    afterwards (it stays on ``device``), so a model evaluated during training carries on as it was."""
    if backbone is None:
        yield
        return
    modes = {m: m.training for m in backbone.modules()}
    backbone.to(device).eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def weights_key(backbone: Optional[nn.Module]) -> str:
    return "pixels" if backbone is None else module_fingerprint(backbone)


def extract_splits(
    workspace: FeatureWorkspace,
    backbone: Optional[nn.Module],
    spec: FeatureSpec,
    splits: dict[str, Dataset],
    fp16: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> tuple[dict[str, FeatureStore], dict[str, bool]]:
    """Feature stores of named splits (``{"train": ds, "test": ds}``) and which came from the cache."""
    fn = feature_fn(backbone, spec)
    weights = weights_key(backbone)
    stores, hits = {}, {}
    for name, dataset in splits.items():
        stores[name], hits[name] = workspace.features(fn, dataset, weights, spec, name, fp16, batch_size,
                                                      num_workers, device, progress)
    return stores, hits
