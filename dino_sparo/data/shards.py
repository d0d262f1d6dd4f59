"""WebDataset tar shards (as img2dataset and webdataset's writers make them) as map-style datasets:
indexed once (member offsets read from the tar headers, kept in a cache file), then read by offset.

Being indexable is what gives shards the guarantees of every other dataset here: the training
loop's resumable, distributed sampler and its per-sample augmentation seeds apply unchanged, so a
resumed run sees exactly the samples an uninterrupted one would. CLIP mode reads image–caption
pairs (:class:`dino_sparo.data.captions.TarShardCaptions`); DINO mode reads images, with an
optional label member (:class:`TarShardImages`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dino_sparo.data.images import ALPHA_BACKGROUND, CorruptImageError, UnreadableImages, open_image
from dino_sparo.data.samplers import warn_limit_above_size

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_KEYS = "jpg;jpeg;png;webp"


def expand_shards(spec: str, key: str = "clip.train_data") -> list[Path]:
    """Shard paths from a brace pattern (``data/{00000..00099}.tar``), several joined by ``::``,
    or a folder (every ``.tar`` in it). Every shard must exist; errors name the config ``key``."""
    from braceexpand import braceexpand  # noqa: PLC0415 (a webdataset dependency)

    paths: list[Path] = []
    for part in spec.split("::"):
        part = os.path.expanduser(part.strip())
        if os.path.isdir(part):
            found = sorted(Path(part).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards in folder {part} (config key '{key}')")
            paths.extend(found)
        else:
            paths.extend(Path(p) for p in braceexpand(part))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards not found, e.g. {missing[0]} "
                                f"(config key '{key}' = {spec!r})")
    return paths


def _index_shard(path: Path, image_keys: Sequence[str], second_key: Optional[str], second_required: bool
                 ) -> np.ndarray:
    """One shard's samples as rows ``(image offset, image size, second offset, second size, image
    key index)``; the second member (a caption, a label) is ``-1, 0`` where absent.

    Members are grouped into samples by WebDataset's rule (key = path up to the first dot of the
    file name); samples without an image, or without a required second member, are left out, as
    WebDataset's ``to_tuple`` does.
    """
    from webdataset.tariterators import base_plus_ext  # noqa: PLC0415

    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None or os.path.basename(key).startswith("__"):
                    continue
                samples.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    except tarfile.TarError as exc:
        raise ValueError(f"shard {path} is not a readable uncompressed tar file ({exc})") from exc
    rows = []
    for members in samples.values():  # dicts keep the order of the tar
        image = next((i for i, ext in enumerate(image_keys) if ext in members), None)
        second = members.get(second_key) if second_key else None
        if image is not None and (second is not None or not second_required):
            rows.append((*members[image_keys[image]], *(second or (-1, 0)), image))
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def _shard_signature(shards: Sequence[Path], image_keys: Sequence[str], second_key: Optional[str]) -> str:
    """What an index depends on: the shard paths, sizes and modification times, and the keys."""
    h = hashlib.sha256(f"{list(image_keys)}|{second_key}".encode())
    for path in shards:
        st = path.stat()
        h.update(f"|{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class TarShards(Dataset):
    """Samples of WebDataset tar shards: an image member and an optional second one (``second_key``),
    indexable.

    The shards are indexed when the dataset is built (tar headers only, several shards at once)
    or the index is loaded from ``index_cache`` when that file matches the shards (paths, sizes,
    modification times); items are then read by offset. Each process keeps at most
    ``max_open_files`` shards open. An unreadable image follows ``corrupt_images``
    (:class:`~dino_sparo.data.images.UnreadableImages`); ``limit`` keeps the first samples.
    """

    def __init__(self, spec: str, image_keys: str | Sequence[str] = DEFAULT_IMAGE_KEYS,
                 second_key: Optional[str] = None, second_required: bool = False,
                 index_cache: Optional[str | os.PathLike] = None, num_threads: int = 16, max_open_files: int = 64,
                 corrupt_images: str = "error", background: Sequence[int] = ALPHA_BACKGROUND,
                 limit: Optional[int] = None, config_key: str = "clip.train_data") -> None:
        self.spec = spec
        self.shards = expand_shards(spec, config_key)
        self.image_keys = image_keys.split(";") if isinstance(image_keys, str) else list(image_keys)
        self.second_key, self.max_open_files = second_key, max_open_files
        self.unreadable = UnreadableImages(corrupt_images, f"the shards {spec!r}")
        self.background = tuple(background)
        start = time.perf_counter()
        signature = _shard_signature(self.shards, self.image_keys, second_key)
        cache = Path(index_cache) if index_cache is not None else None
        index = None
        if cache is not None and cache.is_file():
            with np.load(cache) as stored:
                if str(stored["signature"]) == signature:
                    index = stored["samples"], stored["shard_of"]
                else:
                    logger.info("shard index %s was made for other shards: indexing again", cache)
        if index is None:
            def one(path: Path) -> np.ndarray:
                return _index_shard(path, self.image_keys, second_key, second_required)

            with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(self.shards)))) as pool:
                per_shard = list(pool.map(one, self.shards))
            counts = [len(rows) for rows in per_shard]
            index = np.concatenate(per_shard), np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
                np.savez(tmp, samples=index[0], shard_of=index[1], signature=np.array(signature))
                os.replace(tmp, cache)
        self.samples, self.shard_of = index  # N × 5 (see _index_shard), N
        if len(self.samples) == 0:
            wanted = f" and a {second_key} member" if second_required else ""
            raise ValueError(f"no sample with an image ({'/'.join(self.image_keys)}){wanted} in "
                             f"{len(self.shards)} shards of {spec!r} (config key '{config_key}')")
        if limit is not None:
            warn_limit_above_size(limit, len(self.samples), f"the shards {spec!r}")
            self.samples, self.shard_of = self.samples[:limit], self.shard_of[:limit]
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()
        logger.info("WebDataset shards %s: %d samples in %d shards (index ready in %.1f s)", spec,
                    len(self.samples), len(self.shards), time.perf_counter() - start)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a DataLoader worker: never share the parent's handles
            self._files, self._pid = OrderedDict(), os.getpid()
        handle = self._files.pop(shard, None)
        if handle is None:
            if len(self._files) >= self.max_open_files:
                self._files.popitem(last=False)[1].close()  # the least recently used
            handle = open(self.shards[shard], "rb")
        self._files[shard] = handle
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise CorruptImageError(f"shard {self.shards[shard]} is truncated (wanted {size} bytes at offset {offset})")
        return data

    def second(self, index: int) -> Optional[bytes]:
        """The bytes of sample ``index``'s second member (caption, label), None where it has none."""
        _, _, offset, size, _ = self.samples[index]
        return None if offset < 0 else self._read(int(self.shard_of[index]), int(offset), int(size))

    def image(self, index: int, mode: str = "RGB") -> Image.Image:
        """Sample ``index``'s image, opened as every image is (:func:`~dino_sparo.data.images.open_image`)."""
        offset, size, _, _, key = self.samples[index]
        shard = int(self.shard_of[index])
        return open_image(self._read(shard, int(offset), int(size)), mode, self.background,
                          where=f"shard {self.shards[shard]}, sample {index}: ",
                          name=f"(its {self.image_keys[int(key)]} member at byte {int(offset)})")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()  # open files do not pickle (spawned workers)
        return state


class TarShardImages(TarShards):
    """DINO's training images from WebDataset shards: ``(image, label)`` with the label read from
    the sample's ``label_key`` member (an integer in text, as ImageNet shards store ``.cls``), -1
    where a sample has none. DINO does not use the label."""

    def __init__(self, spec: str, transform: Optional[Callable] = None,
                 image_keys: str | Sequence[str] = DEFAULT_IMAGE_KEYS, label_key: Optional[str] = "cls",
                 **options: Any) -> None:
        super().__init__(spec, image_keys, second_key=label_key or None, config_key="data.path", **options)
        self.transform = transform

    def label(self, index: int) -> int:
        raw = self.second(index)
        try:
            return -1 if raw is None else int(raw.decode("utf-8").strip())
        except ValueError:
            raise ValueError(f"shard {self.shards[int(self.shard_of[index])]}, sample {index}: the "
                             f"{self.second_key} member is not an integer ({raw[:20]!r}); config key "
                             "'data.shard_label_key' names it (null: no labels)") from None

    def _load_one(self, index: int) -> tuple[Image.Image, int]:
        return self.image(index), self.label(index)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.unreadable.load(self._load_one, int(index), len(self))
        return (self.transform(image) if self.transform is not None else image), label

    def __repr__(self) -> str:
        return f"TarShardImages({self.spec!r}, shards={len(self.shards)}, samples={len(self)})"
