"""Datasets: the bundled Fashion-MNIST (IDX files) and ImageNet-style image folders.

Both expose `classes`, `num_classes` and a `targets` array, return `(image, label)` with a PIL
image passed through `transform`, and fail with errors that name the file at fault.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset
from dino_sparo.errors import ConfigError

from dino_sparo.data.images import (ALPHA_BACKGROUND, CorruptImageError,  # noqa: F401 (CorruptImageError: re-exported)
                                    UnreadableImages, open_image)
from dino_sparo.data.samplers import warn_limit_above_size

logger = logging.getLogger(__name__)

# Where Debian's `dataset-fashion-mnist` package installs the four IDX files.
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Same set as torchvision, compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------------------------
# IDX files


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip or raw, chosen by the `.gz` suffix) into a read-only array.

    The header is validated so that a wrong, truncated or padded file fails here, naming the path,
    instead of yielding garbage images later.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read IDX file {path}: {e} (truncated or corrupt download?)") from e

    if len(data) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(data)} bytes, no header")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"IDX file {path} has a bad magic number 0x{data[:4].hex()} "
            "(expected 0x0000TTDD: TT a type code such as 08 for uint8, DD the number of dimensions)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(
            f"IDX file {path} has {ndim} dimensions, expected {expected_ndim} "
            f"(magic 0x{data[:4].hex()}; images are idx3, labels idx1)"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"IDX file {path} is truncated inside its header ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        kind = "truncated" if got < expected else "longer than its header says"
        raise ValueError(
            f"IDX file {path} is {kind}: header shape {tuple(shape)} needs {expected} data bytes, "
            f"found {got}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    array = array.astype(dtype.newbyteorder("="), copy=False)
    array.setflags(write=False)
    return array


_IDX_CACHE: dict[tuple[str, int, int], np.ndarray] = {}
_IDX_CACHE_LOCK = threading.Lock()


def _read_idx_cached(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse each file once per process; the key includes size and mtime so a replaced file is re-read."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _IDX_CACHE_LOCK:
        array = _IDX_CACHE.get(key)
        if array is None:
            array = read_idx(path, expected_ndim)
            _IDX_CACHE[key] = array
    return array


def _find_idx_file(root: Path, stem: str) -> Path:
    """`stem.gz` or `stem` in `root` (or torchvision's `root/FashionMNIST/raw`)."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: {root / (stem + '.gz')} (or uncompressed {root / stem}). "
        f"Install it with `apt-get install dataset-fashion-mnist` (files land in "
        f"{DEFAULT_FASHION_MNIST_ROOT}; see tools/get_fashion_mnist.sh), or set `data.path` to a "
        "folder holding the four IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)."
    )


# --------------------------------------------------------------------------------------------
# Subsets


def balanced_subset_indices(targets: np.ndarray, limit: int, num_classes: int | None = None) -> np.ndarray:
    """Deterministic, class-balanced choice of `limit` indices, in dataset order.

    Takes the first `limit // C` samples of every class (the first `limit % C` classes get one more);
    a class with too few samples gives what it has and the rest is filled from the other classes.
    """
    targets = np.asarray(targets)
    if limit < 0:
        raise ValueError(f"limit must be a non-negative number of samples, got {limit}")
    if limit >= len(targets):
        return np.arange(len(targets))
    if num_classes is None:
        num_classes = int(targets.max()) + 1 if len(targets) else 0
    per_class = [np.flatnonzero(targets == c) for c in range(num_classes)]
    quota = np.zeros(num_classes, dtype=np.int64)
    remaining = limit
    # Hand out one sample per class per round until the budget is spent (classes may run dry).
    while remaining > 0:
        open_classes = [c for c in range(num_classes) if quota[c] < len(per_class[c])]
        share = max(remaining // len(open_classes), 1)
        for c in open_classes:
            take = min(share, len(per_class[c]) - quota[c], remaining)
            quota[c] += take
            remaining -= take
            if remaining == 0:
                break
    chosen = [per_class[c][: quota[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _resolve_indices(
    targets: np.ndarray, num_classes: int, limit: int | None, indices: Sequence[int] | None, where: str
) -> np.ndarray | None:
    """Combine explicit `indices` and a balanced `limit` into one index array (None: everything)."""
    selected = None
    if indices is not None:
        selected = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = selected[(selected < 0) | (selected >= len(targets))]
        if len(bad):
            raise IndexError(f"indices out of range for {where} ({len(targets)} samples): {bad[:5].tolist()}")
    if limit is not None:
        base = np.arange(len(targets)) if selected is None else selected
        keep = balanced_subset_indices(targets[base], int(limit), num_classes)
        selected = base[keep]
    return selected


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


class FashionMNIST(Dataset):
    """Fashion-MNIST read straight from its four IDX files (no download, no torchvision cache).

    Items are `(PIL 'L' image 28×28 after transform, int label)`, as in torchvision.
    `limit` keeps a deterministic class-balanced subset; `indices` an explicit one.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = DEFAULT_FASHION_MNIST_ROOT,
        split: str = "train",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        limit: int | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        if split not in FASHION_MNIST_FILES:
            raise ValueError(
                f"Fashion-MNIST split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}"
            )
        self.root = Path(os.path.expanduser(root if root is not None else DEFAULT_FASHION_MNIST_ROOT))
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        self.classes = list(FASHION_MNIST_CLASSES)

        images_stem, labels_stem = FASHION_MNIST_FILES[split]
        images_path = _find_idx_file(self.root, images_stem)
        labels_path = _find_idx_file(self.root, labels_stem)
        images = _read_idx_cached(images_path, expected_ndim=3)  # N × 28 × 28, uint8
        labels = _read_idx_cached(labels_path, expected_ndim=1)  # N
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise ValueError(
                f"Fashion-MNIST files must hold uint8 data: {images_path} has {images.dtype}, "
                f"{labels_path} has {labels.dtype}"
            )
        if len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST image/label count mismatch: {images_path} has {len(images)} images, "
                f"{labels_path} has {len(labels)} labels"
            )
        if len(labels) and int(labels.max()) >= len(self.classes):
            raise ValueError(
                f"Fashion-MNIST labels in {labels_path} must be in [0, {len(self.classes)}), "
                f"found {int(labels.max())}"
            )
        self.images_path, self.labels_path = images_path, labels_path

        selected = _resolve_indices(labels, len(self.classes), limit, indices, str(labels_path))
        if selected is not None:
            images, labels = images[selected], labels[selected]
            images.setflags(write=False)
        self.data = images  # N × 28 × 28, uint8, read-only
        self.targets = labels.astype(np.int64)  # N
        self.targets.setflags(write=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image: Any = Image.fromarray(np.ascontiguousarray(self.data[index]))  # mode 'L'
        target: Any = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        return f"FashionMNIST(root='{self.root}', split='{self.split}', samples={len(self)})"


# --------------------------------------------------------------------------------------------
# Image folders


def _has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(extensions)


def _scan_images(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """All image files below `folder` (recursively, links followed), in sorted order."""
    files: list[str] = []
    dirs: list[str] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    dirs.append(entry.path)
                elif _has_extension(entry.name, extensions) and entry.is_file():
                    files.append(entry.path)
    except OSError as e:
        raise OSError(f"cannot list image folder {folder}: {e}") from e
    files.sort()
    for sub in sorted(dirs):
        files.extend(_scan_images(sub, extensions))
    return files


class ImageFolder(Dataset):
    """Images laid out as `root/<class>/<...>/<image>` (ImageNet style), classes sorted by name.

    `corrupt_images="error"` raises CorruptImageError naming the file; `"skip"` logs a warning with
    the path (once per process) and returns the next readable sample instead (see
    :class:`~dino_sparo.data.images.UnreadableImages`). Images are opened by
    :func:`~dino_sparo.data.images.open_image` in `image_mode` ('RGB', or 'L' for one channel),
    transparency composited on `background`. Paths are kept in one byte buffer, not a list of Python
    strings, so DataLoader workers do not copy it page by page.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        corrupt_images: str = "error",
        extensions: Iterable[str] = IMG_EXTENSIONS,
        image_mode: str = "RGB",
        limit: int | None = None,
        indices: Sequence[int] | None = None,
        background: Sequence[int] = ALPHA_BACKGROUND,
    ) -> None:
        self.root = Path(os.path.expanduser(root))
        self.unreadable = UnreadableImages(corrupt_images, str(self.root))
        self.background = tuple(background)
        self.transform = transform
        self.target_transform = target_transform
        self.corrupt_images = corrupt_images
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.image_mode = image_mode

        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        with os.scandir(self.root) as it:
            self.classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(
                f"no class folders in {self.root}: expected {self.root}/<class name>/<image>"
            )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

        paths: list[str] = []
        targets: list[int] = []
        empty: list[str] = []
        for idx, name in enumerate(self.classes):
            found = _scan_images(os.path.join(self.root, name), self.extensions)
            if not found:
                empty.append(name)
            paths.extend(found)
            targets.extend([idx] * len(found))
        if not paths:
            raise FileNotFoundError(
                f"no images with extensions {list(self.extensions)} under {self.root} "
                f"(class folders: {self.classes[:5]}{'...' if len(self.classes) > 5 else ''})"
            )
        if empty:
            # Kept in `classes` so that class indices agree between a train and a val folder.
            logger.warning(
                "image folder %s: %d class folder(s) without images: %s", self.root, len(empty), empty[:10]
            )

        target_array = np.asarray(targets, dtype=np.int64)
        selected = _resolve_indices(target_array, len(self.classes), limit, indices, str(self.root))
        if selected is not None:
            paths = [paths[i] for i in selected]
            target_array = target_array[selected]
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._path_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._path_offsets[1:])
        self._path_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.targets = target_array  # N
        self.targets.setflags(write=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """torchvision-style `(path, class index)` list; built on demand."""
        return [(self.path(i), int(t)) for i, t in enumerate(self.targets)]

    def path(self, index: int) -> str:
        start, end = self._path_offsets[index], self._path_offsets[index + 1]
        return self._path_bytes[start:end].tobytes().decode("utf-8", "surrogateescape")

    def __len__(self) -> int:
        return len(self.targets)

    def _load_one(self, index: int) -> tuple[Image.Image, int]:
        draft = getattr(self.transform, "draft_size", None)  # a smaller JPEG decode where the crops allow it
        return open_image(self.path(index), self.image_mode, self.background, draft=draft), index

    def _load(self, index: int) -> tuple[Image.Image, int]:
        return self.unreadable.load(self._load_one, index, len(self))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        index = int(index) % len(self)
        image, i = self._load(index)
        target: Any = int(self.targets[i])
        out: Any = image
        if self.transform is not None:
            out = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return out, target

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root='{self.root}', classes={len(self.classes)}, samples={len(self)}, "
            f"corrupt_images='{self.corrupt_images}')"
        )


def verify_image_folder(
    root: str | os.PathLike,
    extensions: Iterable[str] = IMG_EXTENSIONS,
    num_threads: int = 8,
    progress: bool = True,
) -> list[str]:
    """Decode every image under `root` and return the paths that fail, sorted.

    Worth running once before a long job; decoding releases the GIL, so threads give a real speed-up.
    """
    from tqdm import tqdm

    dataset = ImageFolder(root, extensions=extensions)
    paths = [dataset.path(i) for i in range(len(dataset))]

    def check(path: str) -> str | None:
        try:
            open_image(path, "RGB")
        except CorruptImageError as e:
            logger.warning("%s", e)
            return path
        return None

    bad: list[str] = []
    chunk = 4096  # bounds the number of pending futures on ImageNet-sized folders
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool, tqdm(
        total=len(paths), desc=f"verify {root}", unit="img", disable=not progress
    ) as bar:
        for start in range(0, len(paths), chunk):
            results = list(pool.map(check, paths[start : start + chunk]))
            bad.extend(p for p in results if p is not None)
            bar.update(len(results))
    return sorted(bad)


# --------------------------------------------------------------------------------------------
# From a config section


_IMAGEFOLDER_SUBDIRS = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val")}


def _imagefolder_split_root(path: Path, split: str) -> Path:
    """`path/train` or `path/val` when present, else `path` itself (one folder for everything)."""
    if not path.is_dir():  # said before any word about its sub-folders
        raise FileNotFoundError(f"image folder not found: {path}")
    for name in _IMAGEFOLDER_SUBDIRS[split]:
        if (path / name).is_dir():
            return path / name
    logger.info("no %s subfolder in %s: using the folder itself for split '%s'", split, path, split)
    return path


def build_dataset(data_cfg: Any, split: str, transform: Callable | None = None,
                  index_cache: str | os.PathLike | None = None) -> Dataset:
    """Build the dataset that `data_cfg` names (`dataset`, `path`, `corrupt_images`, `limit`,
    `alpha_background`) for `split`.

    `split` is "train", "val" or "test"; Fashion-MNIST maps "val" to its test set. The result carries
    `num_classes`. WebDataset shards (DINO training) have a train split only; `index_cache` is where
    their index is kept.
    """
    if split not in _IMAGEFOLDER_SUBDIRS:
        raise ValueError(f"split must be one of {sorted(_IMAGEFOLDER_SUBDIRS)}, got {split!r}")
    name = str(data_cfg.dataset).lower().replace("-", "_")
    path = getattr(data_cfg, "path", None)
    limit = getattr(data_cfg, "limit", None)
    corrupt_images = getattr(data_cfg, "corrupt_images", "error")
    background = tuple(getattr(data_cfg, "alpha_background", ALPHA_BACKGROUND))
    is_count = isinstance(limit, (int, np.integer)) and not isinstance(limit, bool)
    if limit is not None and (not is_count or limit < 0):
        raise ConfigError(f"config key 'data.limit' must be a non-negative integer or null, got {limit!r}")

    if name == "fashion_mnist":
        root = path if path not in (None, "") else DEFAULT_FASHION_MNIST_ROOT
        dataset: FashionMNIST | ImageFolder = FashionMNIST(
            root, split="train" if split == "train" else "test", transform=transform, limit=limit
        )
    elif name == "scenes":
        from dino_sparo.data.scenes import SceneImages, world_of  # noqa: PLC0415

        settings = getattr(data_cfg, "scenes", None)
        dataset = SceneImages(world_of(settings), "train" if split == "train" else "test", transform,
                              label=getattr(settings, "label", "shape"), limit=limit)
    elif name == "imagefolder":
        if path in (None, ""):
            raise ConfigError("config key 'data.path' must name the image folder for data.dataset=imagefolder")
        root = _imagefolder_split_root(Path(os.path.expanduser(str(path))), split)
        dataset = ImageFolder(root, transform=transform, corrupt_images=corrupt_images, limit=limit,
                              background=background)
    elif name == "webdataset":
        dataset = _shard_images(data_cfg, split, transform, index_cache)
    else:
        raise ValueError(
            "config key 'data.dataset' must be 'fashion_mnist', 'imagefolder', 'scenes' or 'webdataset', "
            f"got {data_cfg.dataset!r}"
        )
    logger.info("%s split '%s': %d samples, %d classes", dataset, split, len(dataset),
                getattr(dataset, "num_classes", 0))
    warn_limit_above_size(limit, len(dataset), f"split '{split}' of {dataset!r}")
    return dataset


def _shard_images(data_cfg: Any, split: str, transform: Callable | None,
                  index_cache: str | os.PathLike | None) -> Dataset:
    from dino_sparo.data.shards import TarShardImages  # noqa: PLC0415

    if split != "train":
        raise ValueError(f"config key 'data.dataset': WebDataset shards have no labelled '{split}' split to "
                         "evaluate on; evaluate on an image folder (dino-sparo-knn --data-path)")
    if getattr(data_cfg, "path", None) in (None, ""):
        raise ValueError("config key 'data.path' must name the shards for data.dataset=webdataset "
                         "('x/{00000..00099}.tar' or a folder of .tar files)")
    return TarShardImages(str(data_cfg.path), transform, image_keys=data_cfg.shard_image_keys,
                          label_key=data_cfg.shard_label_key, index_cache=index_cache,
                          corrupt_images=data_cfg.corrupt_images, background=tuple(data_cfg.alpha_background))


# --------------------------------------------------------------------------- what evaluations ask of a dataset


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """Labels of every sample, without loading images (``targets`` through any ``Subset``)."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[np.asarray(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"{type(dataset).__name__} has no 'targets'; evaluation needs the labels up front")
    return np.asarray(targets, dtype=np.int64)


def is_grayscale(dataset: Dataset) -> bool:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, FashionMNIST)


def num_classes_of(dataset: Dataset) -> int:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if hasattr(dataset, "num_classes"):
        return int(dataset.num_classes)
    return int(dataset_targets(dataset).max()) + 1
