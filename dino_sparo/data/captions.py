"""Image–caption data for CLIP mode: CSV/TSV tables, WebDataset tar shards, and Fashion-MNIST with
synthetic captions made from its class names.

Every dataset here is map-style (a length and random access), so the training loop's resumable,
distributed sampler and its per-sample seeding apply unchanged; items are ``(image, tokens)``
(or ``(image, caption)`` without a tokeniser). WebDataset shards are indexed once (member offsets
read from the tar headers) and then read by offset, which is what makes them indexable
(:mod:`dino_sparo.data.shards`). Unreadable images follow ``data.corrupt_images``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dino_sparo.data.datasets import FashionMNIST
from dino_sparo.data.images import ALPHA_BACKGROUND, CorruptImageError, UnreadableImages, open_image
from dino_sparo.data.samplers import warn_limit_above_size
from dino_sparo.data.shards import DEFAULT_IMAGE_KEYS, TarShards, expand_shards  # noqa: F401 (expand_shards: re-exported)
from dino_sparo.errors import ConfigError

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

    Rows with an empty path or caption are refused when the table is read, and so are rows whose
    image file is missing, unless ``corrupt_images`` is ``skip``: then they are left out, counted
    in one warning. An image that cannot be decoded follows ``corrupt_images`` when it is loaded
    (:class:`~dino_sparo.data.images.UnreadableImages`). Every error names the table, the line and
    the file. ``limit`` keeps the first rows. Several rows may list one image (COCO, Flickr: five
    captions each): :meth:`image_ids` groups them.
    """

    def __init__(self, table: str | os.PathLike, transform: Optional[Callable] = None,
                 tokenizer: Optional[Tokenize] = None, image_column: str = "path",
                 caption_column: str = "caption", corrupt_images: str = "error",
                 background: Sequence[int] = ALPHA_BACKGROUND, limit: Optional[int] = None) -> None:
        self.table = Path(os.path.expanduser(str(table)))
        if not self.table.is_file():
            raise FileNotFoundError(f"caption table not found: {self.table}")
        self.transform, self.tokenizer = transform, tokenizer
        self.unreadable = UnreadableImages(corrupt_images, f"caption table {self.table}")
        self.background = tuple(background)
        paths, captions, lines = self._read_rows(image_column, caption_column)
        if limit is not None:
            warn_limit_above_size(limit, len(paths), f"caption table {self.table}")
            paths, captions, lines = paths[:limit], captions[:limit], lines[:limit]
        self.paths, self.captions, self.lines = self._drop_missing(paths, captions, lines)
        logger.info("caption table %s: %d image–caption pairs", self.table, len(self.paths))

    def _read_rows(self, image_column: str, caption_column: str) -> tuple[list[str], list[str], list[int]]:
        delimiter = "," if self.table.suffix.lower() == ".csv" else "\t"
        root = self.table.parent
        paths: list[str] = []
        captions: list[str] = []
        lines: list[int] = []
        with self.table.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = reader.fieldnames or []
            for column, key in ((image_column, "clip.image_column"), (caption_column, "clip.caption_column")):
                if column not in columns:
                    raise ConfigError(f"caption table {self.table} has no column {column!r} (config key '{key}'); "
                                     f"its header has {columns}")
            for row in reader:
                line = reader.line_num
                path, caption = (row.get(image_column) or "").strip(), (row.get(caption_column) or "").strip()
                if not path or not caption:
                    missing = image_column if not path else caption_column
                    raise ConfigError(f"caption table {self.table}, line {line}: empty {missing!r}")
                paths.append(path if os.path.isabs(path) else str(root / path))
                captions.append(caption)
                lines.append(line)
        if not paths:
            raise ConfigError(f"caption table {self.table} lists no images")
        return paths, captions, lines

    def _drop_missing(self, paths: list[str], captions: list[str], lines: list[int]
                      ) -> tuple[list[str], list[str], list[int]]:
        """Rows whose image file exists."""
        exists = existing_files(paths)
        missing = [i for i, path in enumerate(paths) if path not in exists]
        if not missing:
            return paths, captions, lines
        first = missing[0]
        more = f" ({len(missing) - 1} more rows list missing images)" if len(missing) > 1 else ""
        if self.unreadable.policy == "error":
            raise CorruptImageError(f"caption table {self.table}, line {lines[first]}: image not found: "
                                    f"{paths[first]}{more}")
        logger.warning("caption table %s: %d of %d rows list a missing image and are left out "
                       "(data.corrupt_images: skip), e.g. line %d: %s", self.table, len(missing), len(paths),
                       lines[first], paths[first])
        keep = sorted(set(range(len(paths))) - set(missing))
        if not keep:
            raise CorruptImageError(f"caption table {self.table}: every one of its {len(paths)} images is missing, "
                                    f"e.g. line {lines[first]}: {paths[first]}")
        return [paths[i] for i in keep], [captions[i] for i in keep], [lines[i] for i in keep]

    def __len__(self) -> int:
        return len(self.paths)

    def image_ids(self) -> np.ndarray:
        """``N`` ids, one per distinct image file, in order of first appearance: rows with one id
        are captions of one image."""
        return np.asarray(_first_appearance_ids(self.paths), dtype=np.int64)

    def load_image(self, index: int) -> Image.Image:
        return open_image(self.paths[index], "RGB", self.background,
                          where=f"caption table {self.table}, line {self.lines[index]}: ")

    def _load_one(self, index: int) -> tuple[Image.Image, str]:
        return self.load_image(index), self.captions[index]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self._item(*self.unreadable.load(self._load_one, int(index), len(self)))


def existing_files(paths: Sequence[str]) -> set[str]:
    """Which of ``paths`` are files, from one listing of each folder they name (folders listed a few
    at a time) rather than one ``stat`` per row, which is a round trip each on a network file system."""
    by_folder: dict[str, set[str]] = {}
    for path in paths:
        folder, name = os.path.split(path)
        by_folder.setdefault(folder, set()).add(name)

    def files_in(folder: str) -> set[str]:
        try:
            with os.scandir(folder or ".") as entries:
                return {entry.name for entry in entries if entry.is_file()}
        except OSError:  # a missing folder: none of its files exist
            return set()

    folders = list(by_folder)
    with ThreadPoolExecutor(max_workers=8) as pool:
        listed = dict(zip(folders, pool.map(files_in, folders)))
    return {os.path.join(folder, name) for folder, names in by_folder.items() for name in names & listed[folder]}


def _first_appearance_ids(keys: Sequence[str]) -> list[int]:
    seen: dict[str, int] = {}
    return [seen.setdefault(key, len(seen)) for key in keys]


# --------------------------------------------------------------------------------------------
# WebDataset tar shards


class TarShardCaptions(TarShards, _Captioned):
    """Image–caption pairs from WebDataset tar shards (e.g. as written by img2dataset), indexable
    (see :class:`~dino_sparo.data.shards.TarShards`); samples without a caption are left out."""

    def __init__(self, spec: str, transform: Optional[Callable] = None, tokenizer: Optional[Tokenize] = None,
                 image_keys: str | Sequence[str] = DEFAULT_IMAGE_KEYS, caption_key: str = "txt",
                 **options: Any) -> None:
        super().__init__(spec, image_keys, second_key=caption_key, second_required=True, **options)
        self.transform, self.tokenizer = transform, tokenizer

    def caption(self, index: int) -> str:
        return (self.second(index) or b"").decode("utf-8").strip()

    def _load_one(self, index: int) -> tuple[Image.Image, str]:
        return self.image(index), self.caption(index)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self._item(*self.unreadable.load(self._load_one, int(index), len(self)))


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
            raise ConfigError(f"config key 'clip.templates' must list templates with a '{{}}' for the class "
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
    """The training set that ``cfg.clip`` names (``dataset``, ``train_data``), with ``data.limit``,
    ``data.corrupt_images`` and ``data.alpha_background``; ``index_cache``: where WebDataset shards
    keep their index."""
    clip, data = cfg.clip, cfg.data
    if clip.dataset == "scenes":
        from dino_sparo.data.scenes import SceneCaptions, world_of  # noqa: PLC0415

        return SceneCaptions(world_of(data.scenes), "train", transform, tokenizer)
    if clip.dataset == "fashion_mnist":
        root = clip_labelled_data(cfg).path
        return FashionMNISTCaptions(root, "train", transform, tokenizer, clip.templates, limit=data.limit)
    if not clip.train_data:
        raise ConfigError(f"config key 'clip.train_data' must name the caption table or the shards for "
                         f"clip.dataset={clip.dataset}")
    images = dict(corrupt_images=data.corrupt_images, background=tuple(data.alpha_background), limit=data.limit)
    if clip.dataset == "table":
        return CaptionTable(clip.train_data, transform, tokenizer, clip.image_column, clip.caption_column, **images)
    if clip.dataset == "webdataset":
        return TarShardCaptions(clip.train_data, transform, tokenizer, clip.shard_image_keys, clip.shard_caption_key,
                                index_cache=index_cache, **images)
    raise ConfigError(f"config key 'clip.dataset' must be fashion_mnist, table, webdataset or scenes, "
                     f"got {clip.dataset!r}")
