"""Datasets: the IDX reader against a writer made here, Fashion-MNIST's known sizes, and the
image-folder corrupt-image policy (in the process and inside DataLoader workers)."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dino_sparo.data.datasets import (
    DEFAULT_FASHION_MNIST_ROOT,
    CorruptImageError,
    FashionMNIST,
    ImageFolder,
    balanced_subset_indices,
    build_dataset,
    read_idx,
    verify_image_folder,
)

FASHION_ROOT = Path(DEFAULT_FASHION_MNIST_ROOT)
FASHION_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
needs_fashion_mnist = pytest.mark.skipif(
    not all((FASHION_ROOT / (n + ".gz")).is_file() for n in FASHION_NAMES),
    reason="Fashion-MNIST not installed (tools/get_fashion_mnist.sh)",
)


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None, cut: int = 0) -> Path:
    """Independent IDX writer: 0x0000, type 0x08 (uint8), ndim, big-endian dims, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    payload = header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if cut:
        payload = payload[:-cut]
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_fashion_folder(root: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        data[prefix] = (images, labels)
    return data


def to_array(image: Image.Image) -> np.ndarray:
    """Picklable transform for DataLoader workers."""
    return np.asarray(image, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    array = np.random.default_rng(1).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    path = write_idx(tmp_path / f"x-idx3-ubyte{suffix}", array)
    out = read_idx(path, expected_ndim=3)
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, array)
    assert not out.flags.writeable


def test_idx_wrong_magic_names_path(tmp_path):
    path = write_idx(tmp_path / "bad.gz", np.zeros((2, 3, 3)), magic=b"\x12\x34\x08\x03")
    with pytest.raises(ValueError, match="magic") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_idx_wrong_ndim_names_path(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros(4))
    with pytest.raises(ValueError, match="dimensions") as e:
        read_idx(path, expected_ndim=3)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_truncated_data_names_path(tmp_path, suffix):
    path = write_idx(tmp_path / f"short{suffix}", np.zeros((4, 28, 28)), cut=100)
    with pytest.raises(ValueError, match="truncated") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_idx_truncated_gzip_stream_names_path(tmp_path):
    full = write_idx(tmp_path / "full.gz", np.random.default_rng(2).integers(0, 256, (50, 28, 28)))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(full.read_bytes()[:-200])
    with pytest.raises(ValueError) as e:
        read_idx(cut)
    assert str(cut) in str(e.value)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_small_folder(tmp_path, gz):
    data = make_fashion_folder(tmp_path / "fm", gz=gz)
    ds = FashionMNIST(tmp_path / "fm", split="test", transform=to_array, target_transform=lambda t: t + 100)
    images, labels = data["t10k"]
    assert len(ds) == len(labels) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.targets, labels)
    for i in (0, 3, len(ds) - 1):
        x, y = ds[i]
        np.testing.assert_array_equal(x, images[i].astype(np.float32))
        assert y == int(labels[i]) + 100


def test_fashion_mnist_returns_pil_and_int(tmp_path):
    make_fashion_folder(tmp_path / "fm")
    image, label = FashionMNIST(tmp_path / "fm")[0]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (28, 28)
    assert type(label) is int


def test_fashion_mnist_count_mismatch_names_both_files(tmp_path):
    make_fashion_folder(tmp_path / "fm")
    labels = tmp_path / "fm" / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(29))
    with pytest.raises(ValueError, match="mismatch") as e:
        FashionMNIST(tmp_path / "fm", split="train")
    assert str(labels) in str(e.value) and "train-images-idx3-ubyte.gz" in str(e.value)


def test_fashion_mnist_missing_file_names_path_and_fix(tmp_path):
    make_fashion_folder(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        FashionMNIST(tmp_path / "fm", split="test")
    msg = str(e.value)
    assert str(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.path" in msg


def test_fashion_mnist_bad_split():
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(split="validation")


@needs_fashion_mnist
def test_real_fashion_mnist_sizes_labels_balance():
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.data.shape == (60000, 28, 28) and train.data.dtype == np.uint8
    assert train.targets.min() == 0 and train.targets.max() == 9
    np.testing.assert_array_equal(np.bincount(train.targets, minlength=10), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test.targets, minlength=10), np.full(10, 1000))
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"


@needs_fashion_mnist
def test_real_fashion_mnist_matches_plain_reader():
    with gzip.open(FASHION_ROOT / "t10k-images-idx3-ubyte.gz", "rb") as f:
        reference = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_ROOT / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        reference_labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    ds = FashionMNIST(split="test")
    for i in (0, 1234, 9999):
        image, label = ds[i]
        np.testing.assert_array_equal(np.asarray(image), reference[i])
        assert label == reference_labels[i]


@needs_fashion_mnist
def test_real_fashion_mnist_loads_once_per_process():
    first = FashionMNIST(split="train")
    second = FashionMNIST(split="train")
    assert np.shares_memory(first.data, second.data)


def test_balanced_subset_is_deterministic_and_balanced():
    targets = np.repeat(np.arange(4), [10, 10, 10, 2])  # class 3 has only two samples
    idx = balanced_subset_indices(targets, 14)
    assert len(idx) == 14 and len(set(idx.tolist())) == 14 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(targets[idx], minlength=4), [4, 4, 4, 2])
    np.testing.assert_array_equal(idx, balanced_subset_indices(targets, 14))
    assert len(balanced_subset_indices(targets, 100)) == len(targets)


def test_fashion_mnist_limit_and_indices(tmp_path):
    data = make_fashion_folder(tmp_path / "fm", n_train=50)
    limited = FashionMNIST(tmp_path / "fm", limit=20)
    np.testing.assert_array_equal(np.bincount(limited.targets, minlength=10), np.full(10, 2))
    picked = FashionMNIST(tmp_path / "fm", indices=[5, 2, 7], transform=to_array)
    np.testing.assert_array_equal(picked.targets, data["train"][1][[5, 2, 7]])
    np.testing.assert_array_equal(picked[1][0], data["train"][0][2].astype(np.float32))


# --------------------------------------------------------------------------------------------
# Image folders


def make_image_folder(root: Path, corrupt: bool = True) -> dict[str, Path]:
    """Two classes of real PNG/JPEG files, plus (optionally) a garbage file and a truncated PNG."""
    rng = np.random.default_rng(3)
    paths = {}
    for cls in ("dog", "cat"):
        (root / cls).mkdir(parents=True)
        for i, ext in enumerate(("png", "jpg", "PNG")):
            path = root / cls / f"{i}.{ext}"
            fmt = "JPEG" if ext == "jpg" else "PNG"
            Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(path, format=fmt)
            paths[f"{cls}/{i}"] = path
    (root / "cat" / "notes.txt").write_text("not an image")
    if corrupt:
        paths["garbage"] = root / "cat" / "1b_garbage.jpg"
        paths["garbage"].write_bytes(b"\xff\xd8\xff this is not a JPEG")
        full = root / "dog" / "tmp.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
        paths["truncated"] = root / "dog" / "9_truncated.png"
        paths["truncated"].write_bytes(full.read_bytes()[:2000])
        full.unlink()
    return paths


def test_image_folder_order_classes_and_labels(tmp_path):
    paths = make_image_folder(tmp_path / "root", corrupt=False)
    ds = ImageFolder(tmp_path / "root", transform=to_array)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    expected = [str(paths[f"{c}/{i}"]) for c in ("cat", "dog") for i in (0, 1, 2)]
    assert [p for p, _ in ds.samples] == sorted(expected[:3]) + sorted(expected[3:])
    np.testing.assert_array_equal(ds.targets, [0, 0, 0, 1, 1, 1])
    image, label = ds[4]
    assert image.shape == (12, 16, 3) and label == 1


def test_image_folder_error_mode_names_path(tmp_path):
    paths = make_image_folder(tmp_path / "root")
    ds = ImageFolder(tmp_path / "root", corrupt_images="error")
    for key in ("garbage", "truncated"):
        index = [p for p, _ in ds.samples].index(str(paths[key]))
        with pytest.raises(CorruptImageError) as e:
            ds[index]
        assert str(paths[key]) in str(e.value)


def test_image_folder_skip_mode_returns_valid_and_warns_once(tmp_path, caplog):
    paths = make_image_folder(tmp_path / "root")
    ds = ImageFolder(tmp_path / "root", transform=to_array, corrupt_images="skip")
    files = [p for p, _ in ds.samples]
    garbage = files.index(str(paths["garbage"]))
    truncated = files.index(str(paths["truncated"]))
    with caplog.at_level(logging.WARNING, logger="dino_sparo.data.datasets"):
        for _ in range(2):
            image, label = ds[garbage]
            assert image.shape == (12, 16, 3) and label == int(ds.targets[garbage + 1])
        image, label = ds[truncated]  # last file: wraps around to the first
        assert image.shape == (12, 16, 3) and label == int(ds.targets[0])
    warned = [r.getMessage() for r in caplog.records]
    assert sum(str(paths["garbage"]) in m for m in warned) == 1
    assert sum(str(paths["truncated"]) in m for m in warned) == 1


def first_loader_error(loader: DataLoader) -> str | None:
    """Message of the first CorruptImageError; the iterator is released here, so its workers stop
    now rather than whenever the garbage collector reaches the traceback that holds it."""
    iterator = iter(loader)
    try:
        for _ in iterator:
            pass
    except CorruptImageError as e:
        return str(e)
    finally:
        del iterator
    return None


def test_image_folder_dataloader_workers_error_names_path(tmp_path):
    paths = make_image_folder(tmp_path / "root")
    ds = ImageFolder(tmp_path / "root", transform=to_array, corrupt_images="error")
    message = first_loader_error(DataLoader(ds, batch_size=2, num_workers=2))
    assert message is not None and "worker process" in message
    assert str(paths["garbage"]) in message or str(paths["truncated"]) in message


def test_image_folder_dataloader_workers_skip(tmp_path):
    make_image_folder(tmp_path / "root")
    ds = ImageFolder(tmp_path / "root", transform=to_array, corrupt_images="skip")
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert sum(len(y) for _, y in batches) == len(ds) == 8
    assert all(x.shape[1:] == (12, 16, 3) and torch.isfinite(x).all() for x, _ in batches)


def test_image_folder_empty_root_and_no_classes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders") as e:
        ImageFolder(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "a.png")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolder(flat)
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images") as e:
        ImageFolder(tmp_path / "noimg")
    assert str(tmp_path / "noimg") in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        ImageFolder(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)


def test_image_folder_bad_policy():
    with pytest.raises(ValueError, match="corrupt_images"):
        ImageFolder(".", corrupt_images="ignore")


def test_verify_image_folder_reports_corrupt_paths(tmp_path):
    paths = make_image_folder(tmp_path / "root")
    bad = verify_image_folder(tmp_path / "root", num_threads=2, progress=False)
    assert bad == sorted([str(paths["garbage"]), str(paths["truncated"])])


# --------------------------------------------------------------------------------------------
# build_dataset


def data_cfg(dataset: str, path, corrupt_images: str = "error", limit: int | None = None) -> SimpleNamespace:
    """Stand-in for the config's data section: build_dataset only uses attribute access."""
    return SimpleNamespace(
        dataset=dataset, path=None if path is None else str(path), corrupt_images=corrupt_images, limit=limit
    )


def test_build_dataset_fashion_mnist_from_namespace(tmp_path):
    make_fashion_folder(tmp_path / "fm", n_train=40, n_test=20)
    cfg = data_cfg("fashion_mnist", tmp_path / "fm", limit=10)
    train = build_dataset(cfg, "train", to_array)
    val = build_dataset(cfg, "val", None)
    assert isinstance(train, FashionMNIST) and train.split == "train" and len(train) == 10
    assert val.split == "test" and val.num_classes == 10
    np.testing.assert_array_equal(np.bincount(train.targets, minlength=10), np.ones(10))


def test_build_dataset_imagefolder_split_subfolders_and_fallback(tmp_path):
    make_image_folder(tmp_path / "data" / "train", corrupt=False)
    (tmp_path / "data" / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "val" / "cat" / "v.png")
    cfg = data_cfg("imagefolder", tmp_path / "data", corrupt_images="skip")
    train, val = build_dataset(cfg, "train", None), build_dataset(cfg, "val", None)
    assert train.root == tmp_path / "data" / "train" and len(train) == 6 and train.num_classes == 2
    assert val.root == tmp_path / "data" / "val" and len(val) == 1 and train.corrupt_images == "skip"
    flat = data_cfg("imagefolder", tmp_path / "data" / "train", limit=4)
    ds = build_dataset(flat, "val", None)
    assert ds.root == tmp_path / "data" / "train" and len(ds) == 4
    np.testing.assert_array_equal(np.bincount(ds.targets), [2, 2])


def test_build_dataset_bad_config_names_key():
    with pytest.raises(ValueError, match="data.dataset"):
        build_dataset(data_cfg("cifar", None), "train", None)
    with pytest.raises(ValueError, match="data.path"):
        build_dataset(data_cfg("imagefolder", None), "train", None)
    with pytest.raises(ValueError, match="data.limit"):
        build_dataset(data_cfg("fashion_mnist", None, limit=-1), "train", None)
