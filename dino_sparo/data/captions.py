"""Image–caption data for CLIP mode: CSV/TSV tables, WebDataset tar shards, and Fashion-MNIST with
synthetic captions made from its class names.

Every dataset here is map-style (a length and random access), so the training loop's resumable,
distributed sampler and its per-sample seeding apply unchanged; items are ``(image, tokens)``
(or ``(image, caption)`` without a tokeniser). WebDataset shards are indexed once (member offsets
read from the tar headers) and then read by offset, which is what makes them indexable.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import random
import tarfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dino_sparo.data.datasets import FashionMNIST
from dino_sparo.data.transforms import to_rgb

logger = logging.getLogger(__name__)

Tokenize = Callable[[Sequence[str]], Any]  # captions -> B × context_length token ids


class _Captioned(Dataset):
    """Shared tail of every dataset here: transform the image, tokenise the caption."""

    transform: Optional[Callable]
    tokenizer: Optional[Tokenize]

    def _item(self, image: Image.Image, caption: str) -> tuple[Any, Any]:
        if self.transform is not None:
            image = self.transform(image)
        if self.tokenizer is not None:
            return image, self.tokenizer([caption])[0]  # context_length
        return image, caption


# --------------------------------------------------------------------------------------------
# CSV / TSV tables


class CaptionTable(_Captioned):
    """Images and captions listed in a CSV (``.csv``) or TSV (``.tsv``, ``.tab``, ``.txt``) file
    with a header row; image paths are relative to the table's folder (absolute paths kept).

    Rows with an empty path or caption are refused when the table is read; a missing or unreadable
    image is refused when it is loaded; both errors name the table and its line number.
    """

    def __init__(self, table: str | os.PathLike, transform: Optional[Callable] = None,
                 tokenizer: Optional[Tokenize] = None, image_column: str = "path",
                 caption_column: str = "caption") -> None:
        self.table = Path(os.path.expanduser(str(table)))
        if not self.table.is_file():
            raise FileNotFoundError(f"caption table not found: {self.table}")
        delimiter = "," if self.table.suffix.lower() == ".csv" else "\t"
        self.transform, self.tokenizer = transform, tokenizer
        root = self.table.parent
        paths: list[str] = []
        captions: list[str] = []
        lines: list[int] = []
        with self.table.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = reader.fieldnames or []
            for column, key in ((image_column, "clip.image_column"), (caption_column, "clip.caption_column")):
                if column not in columns:
                    raise ValueError(f"caption table {self.table} has no column {column!r} (config key '{key}'); "
                                     f"its header has {columns}")
            for row in reader:
                line = reader.line_num
                path, caption = (row.get(image_column) or "").strip(), (row.get(caption_column) or "").strip()
                if not path or not caption:
                    missing = image_column if not path else caption_column
                    raise ValueError(f"caption table {self.table}, line {line}: empty {missing!r}")
                paths.append(path if os.path.isabs(path) else str(root / path))
                captions.append(caption)
                lines.append(line)
        if not paths:
            raise ValueError(f"caption table {self.table} lists no images")
        self.paths, self.captions, self.lines = paths, captions, lines
        logger.info("caption table %s: %d image–caption pairs", self.table, len(paths))

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return to_rgb(image)
        except FileNotFoundError:
            raise FileNotFoundError(f"caption table {self.table}, line {self.lines[index]}: image not found: "
                                    f"{path}") from None
        except OSError as exc:
            raise OSError(f"caption table {self.table}, line {self.lines[index]}: cannot read image {path} "
                          f"({exc})") from exc

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self._item(self.load_image(index), self.captions[index])


# --------------------------------------------------------------------------------------------
# WebDataset tar shards


def expand_shards(spec: str) -> list[Path]:
    """Shard paths from a brace pattern (``data/{00000..00099}.tar``), several joined by ``::``,
    or a folder (every ``.tar`` in it). Every shard must exist."""
    from braceexpand import braceexpand  # noqa: PLC0415 (a webdataset dependency)

    paths: list[Path] = []
    for part in spec.split("::"):
        part = os.path.expanduser(part.strip())
        if os.path.isdir(part):
            found = sorted(Path(part).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards in folder {part}")
            paths.extend(found)
        else:
            paths.extend(Path(p) for p in braceexpand(part))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards not found, e.g. {missing[0]} "
                                f"(config key 'clip.train_data' = {spec!r})")
    return paths


def _index_shard(path: Path, image_keys: Sequence[str], caption_key: str) -> np.ndarray:
    """One shard's samples as rows ``(image offset, image size, caption offset, caption size,
    image key index)``.

    Members are grouped into samples by WebDataset's rule (key = path up to the first dot of the
    file name); samples without an image or a caption are skipped, as WebDataset's ``to_tuple`` does.
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
        if image is not None and caption_key in members:
            rows.append((*members[image_keys[image]], *members[caption_key], image))
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def _shard_signature(shards: Sequence[Path], image_keys: Sequence[str], caption_key: str) -> str:
    """What an index depends on: the shard paths, sizes and modification times, and the keys."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256(f"{list(image_keys)}|{caption_key}".encode())
    for path in shards:
        st = path.stat()
        h.update(f"|{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class TarShardCaptions(_Captioned):
    """Image–caption pairs from WebDataset tar shards (e.g. as written by img2dataset), indexable.

    The shards are indexed when the dataset is built (tar headers only, several shards at once)
    or the index is loaded from ``index_cache`` when that file matches the shards (paths, sizes,
    modification times); items are then read by offset. Each process keeps at most
    ``max_open_files`` shards open.
    """

    def __init__(self, spec: str, transform: Optional[Callable] = None, tokenizer: Optional[Tokenize] = None,
                 image_keys: str | Sequence[str] = "jpg;jpeg;png;webp", caption_key: str = "txt",
                 index_cache: Optional[str | os.PathLike] = None, num_threads: int = 16,
                 max_open_files: int = 64) -> None:
        self.transform, self.tokenizer = transform, tokenizer
        self.shards = expand_shards(spec)
        self.image_keys = image_keys.split(";") if isinstance(image_keys, str) else list(image_keys)
        self.max_open_files = max_open_files
        start = time.perf_counter()
        signature = _shard_signature(self.shards, self.image_keys, caption_key)
        cache = Path(index_cache) if index_cache is not None else None
        index = None
        if cache is not None and cache.is_file():
            with np.load(cache) as stored:
                if str(stored["signature"]) == signature:
                    index = stored["samples"], stored["shard_of"]
                else:
                    logger.info("shard index %s was made for other shards: indexing again", cache)
        if index is None:
            with ThreadPoolExecutor(max_workers=max(1, min(num_threads, len(self.shards)))) as pool:
                per_shard = list(pool.map(lambda p: _index_shard(p, self.image_keys, caption_key), self.shards))
            counts = [len(rows) for rows in per_shard]
            index = np.concatenate(per_shard), np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
                np.savez(tmp, samples=index[0], shard_of=index[1], signature=np.array(signature))
                os.replace(tmp, cache)
        self.samples, self.shard_of = index  # N × 5 (see _index_shard), N
        if len(self.samples) == 0:
            raise ValueError(f"no sample with an image ({'/'.join(self.image_keys)}) and a caption "
                             f"({caption_key}) in {len(self.shards)} shards of {spec!r}")
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
            raise OSError(f"shard {self.shards[shard]} is truncated (wanted {size} bytes at offset {offset})")
        return data

    def caption(self, index: int) -> str:
        _, _, offset, size, _ = self.samples[index]
        return self._read(int(self.shard_of[index]), int(offset), int(size)).decode("utf-8").strip()

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        offset, size, _, _, key = self.samples[index]
        shard = int(self.shard_of[index])
        data = self._read(shard, int(offset), int(size))
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = to_rgb(image)
        except OSError as exc:
            raise OSError(f"shard {self.shards[shard]}: sample {index} has an unreadable "
                          f"{self.image_keys[int(key)]} image ({exc})") from exc
        return self._item(image, self.caption(index))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()  # open files do not pickle (spawned workers)
        return state


# --------------------------------------------------------------------------------------------
# Fashion-MNIST with synthetic captions


def class_prompt_name(name: str) -> str:
    """The class name as it goes into a caption ("T-shirt/top" -> "t-shirt/top")."""
    return name.lower()


class FashionMNISTCaptions(_Captioned):
    """Fashion-MNIST images with SYNTHETIC captions: a template (drawn at random per sample, from
    Python's ``random``, which the training loop seeds per sample) filled with the class name.
    The captions carry nothing but the label; the set exists so CLIP mode runs on a laptop CPU."""

    def __init__(self, root: Optional[str], split: str = "train", transform: Optional[Callable] = None,
                 tokenizer: Optional[Tokenize] = None, templates: Sequence[str] = ("a photo of a {}.",),
                 limit: Optional[int] = None) -> None:
        templates = list(templates)
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"config key 'clip.templates' must list templates with a '{{}}' for the class "
                             f"name, got {templates}")
        self.images = FashionMNIST(root, split=split, limit=limit)
        self.transform, self.tokenizer, self.templates = transform, tokenizer, templates
        self.classes = self.images.classes
        self.targets = self.images.targets

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, index: int, template: Optional[int] = None) -> str:
        if template is None:
            template = random.randrange(len(self.templates))
        return self.templates[template].format(class_prompt_name(self.classes[int(self.targets[index])]))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, _ = self.images[index]
        return self._item(image, self.caption(index))


def clip_labelled_data(cfg: Any) -> Any:
    """Where a CLIP run's labelled images live, as a ``data`` config section (dataset, path): what
    k-NN and zero-shot during training and zero-shot from a checkpoint read. Fashion-MNIST captions:
    the labelled images behind them (``clip.train_data`` or ``data.path``); the scene world: its
    scenes, labelled by ``data.scenes.label``; caption tables and shards have no labels, so
    ``data.path`` names a labelled image folder."""
    from dino_sparo.config import DataConfig  # noqa: PLC0415 (a config section, built only here)

    clip = cfg.clip
    if clip.dataset == "fashion_mnist":
        return DataConfig(dataset="fashion_mnist", path=clip.train_data or cfg.data.path)
    if clip.dataset == "scenes":
        return dataclasses.replace(cfg.data, dataset="scenes")
    return cfg.data


def build_caption_dataset(cfg: Any, transform: Optional[Callable], tokenizer: Optional[Tokenize],
                          index_cache: Optional[str | os.PathLike] = None) -> Dataset:
    """The training set that ``cfg.clip`` names (``dataset``, ``train_data``; ``data.limit`` for Fashion-MNIST);
    ``index_cache``: where WebDataset shards keep their index."""
    clip = cfg.clip
    if clip.dataset == "scenes":
        from dino_sparo.data.scenes import SceneCaptions, world_of  # noqa: PLC0415

        return SceneCaptions(world_of(cfg.data.scenes), "train", transform, tokenizer)
    if clip.dataset == "fashion_mnist":
        root = clip_labelled_data(cfg).path
        return FashionMNISTCaptions(root, "train", transform, tokenizer, clip.templates, limit=cfg.data.limit)
    if not clip.train_data:
        raise ValueError(f"config key 'clip.train_data' must name the caption table or the shards for "
                         f"clip.dataset={clip.dataset}")
    if clip.dataset == "table":
        return CaptionTable(clip.train_data, transform, tokenizer, clip.image_column, clip.caption_column)
    if clip.dataset == "webdataset":
        return TarShardCaptions(clip.train_data, transform, tokenizer, clip.shard_image_keys, clip.shard_caption_key,
                                index_cache=index_cache)
    raise ValueError(f"config key 'clip.dataset' must be fashion_mnist, table, webdataset or scenes, "
                     f"got {clip.dataset!r}")
