"""Where evaluation features come from, shared by ``dino-sparo-knn`` and ``dino-sparo-linear``:
a checkpoint's backbone (or the same architecture at initialisation, or no network: raw pixels),
the evaluation datasets of a run, and a workspace that extracts each split once and caches it.

The feature cache is keyed by a fingerprint of the weights (not of the checkpoint file), the
feature kind, the dataset (its description, size, labels) and the transform; the default cache
folder sits next to the checkpoint. Under ``torch.distributed`` every rank runs the same code:
extraction is sharded by ``features.extract_features``, the rest is decided on rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dino_sparo import distributed
from dino_sparo.config import DataConfig, TrainConfig, load_config
from dino_sparo.data.datasets import FashionMNIST, build_dataset
from dino_sparo.data.transforms import eval_transform, normalization_for
from dino_sparo.evaluation.features import FeatureStore, cached_features, extract_features, feature_cache_path
from dino_sparo.evaluation.frozen_features import FeatureSpec, feature_fn, module_fingerprint
from dino_sparo.models.build import CHECKPOINT_BACKBONE_PREFIXES, build_backbone, load_backbone_from_checkpoint

logger = logging.getLogger(__name__)

BASELINES = ("pixels", "init")
CHECKPOINT_KEYS = ("auto", *CHECKPOINT_BACKBONE_PREFIXES)
DEFAULT_CACHE_FOLDER = "eval_features"  # beside the checkpoint


# --------------------------------------------------------------------------- the network


@dataclass
class EvalSource:
    """The network an evaluation reads (None for raw pixels) and the run config it belongs to."""

    name: str  # the checkpoint key ("teacher", "student", "model"), "init" or "pixels"
    backbone: Optional[nn.Module]
    cfg: Optional[TrainConfig]
    checkpoint: Optional[Path] = None


def init_backbone(cfg: TrainConfig, seed: Optional[int] = None) -> nn.Module:
    """The run's architecture at initialisation, seeded (``cfg.seed`` by default) so the baseline
    number is reproducible; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        backbone = build_backbone(cfg.model)
    backbone.requires_grad_(False)
    return backbone.eval()


def load_source(
    checkpoint: Optional[str | os.PathLike] = None,
    key: str = "auto",
    baseline: Optional[str] = None,
    config: Optional[str | os.PathLike] = None,
    device: str | torch.device = "cpu",
) -> EvalSource:
    """The backbone stored under ``key`` of ``checkpoint``; or, with ``baseline``, the same
    architecture at initialisation (``"init"``) or no network at all (``"pixels"``). ``config``
    (a YAML file) stands in for the checkpoint's config when there is no checkpoint."""
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"--baseline must be one of {BASELINES}, got {baseline!r}")
    path = Path(checkpoint) if checkpoint is not None else None
    if baseline is None:
        if path is None:
            raise ValueError("--checkpoint is required (or choose --baseline pixels|init)")
        backbone, cfg = load_backbone_from_checkpoint(path, key, device=device)
        if key == "auto":
            key = "teacher" if cfg.mode == "dino" else "model"
        logger.info("evaluating %s['%s']: %s read-out, embedding %d", path, key, backbone.readout_type,
                    backbone.out_dim)
        return EvalSource(key, backbone, cfg, path)
    cfg = None
    if path is not None:
        from dino_sparo.checkpoint import load_checkpoint  # noqa: PLC0415
        from dino_sparo.config import from_dict  # noqa: PLC0415

        state = load_checkpoint(path)
        if "config" not in state:
            raise KeyError(f"checkpoint {path} has no 'config' entry; it was not written by dino-sparo-train")
        cfg = from_dict(state["config"])
    elif config is not None:
        cfg = load_config(config)
    if baseline == "pixels":
        return EvalSource("pixels", None, cfg, path)
    if cfg is None:
        raise ValueError("--baseline init needs the architecture: give --checkpoint or --config")
    logger.info("evaluating %s at initialisation (seed %d)", cfg.model.arch, cfg.seed)
    return EvalSource("init", init_backbone(cfg).to(device), cfg, path)


# --------------------------------------------------------------------------- the data


@dataclass
class EvalData:
    """Train and test splits with the evaluation transform, and what they were built from."""

    train: Dataset
    test: Dataset
    dataset: str
    path: Optional[str]
    num_classes: int
    grayscale: bool
    transform: Any
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    info: dict = field(default_factory=dict)


def eval_transform_for(
    dataset: str,
    image_size: int,
    resize_ratio: Optional[float] = None,
    cfg: Optional[TrainConfig] = None,
) -> Any:
    """DINO's evaluation view (resize the short side by 256/224, centre-crop) for image folders;
    the whole image (ratio 1) for Fashion-MNIST, whose 28-px images the model saw whole. With the
    ``cfg`` of a CLIP run: CLIP's view (ratio 1) and the run's ``clip.image_mean`` / ``image_std``."""
    mean, std, grayscale = eval_normalization(cfg, dataset)
    if resize_ratio is None:
        resize_ratio = 1.0 if dataset == "fashion_mnist" or is_clip(cfg) else 256 / 224
    return eval_transform(image_size, mean, std, resize_ratio=resize_ratio, grayscale_input=grayscale)


def is_clip(cfg: Optional[TrainConfig]) -> bool:
    return cfg is not None and cfg.mode == "clip"


def eval_image_size(cfg: TrainConfig) -> int:
    """The side a run's network was trained at, which its evaluations use: ``model.img_size`` for
    CLIP (its only image size), the global crops' ``crops.global_crops_size`` for DINO."""
    return int(cfg.model.img_size if is_clip(cfg) else cfg.crops.global_crops_size)


def eval_normalization(cfg: Optional[TrainConfig], dataset: str) -> tuple[Any, Any, bool]:
    """Mean, std and grayscale-ness of the evaluation images: a CLIP run's own ``clip.image_mean`` /
    ``clip.image_std`` (whatever the dataset), else the dataset's (as DINO trains)."""
    mean, std, grayscale = normalization_for(dataset)
    if is_clip(cfg):
        return tuple(cfg.clip.image_mean), tuple(cfg.clip.image_std), grayscale
    return mean, std, grayscale


def load_eval_data(
    dataset: str,
    data_path: Optional[str] = None,
    image_size: int = 224,
    train_limit: Optional[int] = None,
    test_limit: Optional[int] = None,
    resize_ratio: Optional[float] = None,
    corrupt_images: str = "error",
    transform: Any = None,
    cfg: Optional[TrainConfig] = None,
    train_path: Optional[str] = None,
    test_path: Optional[str] = None,
) -> EvalData:
    """Train split and the ``val`` split (Fashion-MNIST's test set; an image folder's ``val/``, or
    ``test/``), class-balanced subsets when limits are given. ``cfg`` (the run's config) chooses
    the normalisation (see :func:`eval_transform_for`). ``train_path`` and ``test_path`` name the
    two class folders of an image-folder evaluation explicitly, in place of ``data_path``."""
    transform = transform if transform is not None else eval_transform_for(dataset, image_size, resize_ratio, cfg)
    paths = split_paths(dataset, data_path, train_path, test_path)
    splits = {}
    for split, limit in (("train", train_limit), ("val", test_limit)):
        data_cfg = DataConfig(dataset=dataset, path=paths[split], limit=limit, corrupt_images=corrupt_images)
        splits[split] = build_dataset(data_cfg, split, transform)
    train, test = splits["train"], splits["val"]
    if train.num_classes != test.num_classes:
        raise ValueError(f"the train split has {train.num_classes} classes but the evaluation split has "
                         f"{test.num_classes} ({data_path}); their class folders must match")
    _, _, grayscale = normalization_for(dataset)
    info = {"dataset": dataset, "path": data_path, "train_limit": train_limit, "test_limit": test_limit,
            "image_size": image_size, "num_train": len(train), "num_test": len(test)}
    if train_path is not None:
        info.update(train_path=train_path, test_path=test_path)
    return EvalData(train, test, dataset, data_path, train.num_classes, grayscale, transform,
                    train_limit, test_limit, info)


IMAGEFOLDER_TEST_SPLITS = ("val", "test")  # the evaluation split's sub-folder, first found


def split_paths(dataset: str, data_path: Optional[str], train_path: Optional[str] = None,
                test_path: Optional[str] = None) -> dict[str, Optional[str]]:
    """The folders of the train (memory) and val (query) splits. An image folder must hold ``train/``
    and ``val/`` (or ``test/``) sub-folders, unless both splits are named explicitly: evaluating on
    the images the memory holds would report a meaningless (near-perfect) accuracy."""
    if (train_path is None) != (test_path is None):
        raise ValueError("give both --train-path and --test-path (the class folders of the two splits), or neither")
    if train_path is not None:
        if dataset != "imagefolder":
            raise ValueError(f"--train-path and --test-path name image folders; the dataset is {dataset!r} "
                             "(add --dataset imagefolder)")
        if Path(train_path).expanduser().resolve() == Path(test_path).expanduser().resolve():
            logger.warning("--train-path and --test-path are the same folder %s: the test images are also in "
                           "the memory, so the accuracy is not a held-out one", train_path)
        return {"train": train_path, "val": test_path}
    if dataset == "imagefolder" and data_path not in (None, ""):
        root = Path(os.path.expanduser(str(data_path)))
        has_test = any((root / name).is_dir() for name in IMAGEFOLDER_TEST_SPLITS)
        if root.is_dir() and not ((root / "train").is_dir() and has_test):
            missing = " and ".join(n for n, ok in (("train/", (root / "train").is_dir()), ("val/ (or test/)", has_test))
                                   if not ok)
            raise ValueError(f"image folder {root} has no {missing} sub-folder: evaluation needs "
                             f"{root}/train/<class>/... and {root}/val/<class>/..., or the two class folders "
                             "given as --train-path and --test-path")
    return {"train": data_path, "val": data_path}


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


# --------------------------------------------------------------------------- feature workspace


def _broadcast(value: Any) -> Any:
    if not distributed.is_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
        name = _broadcast(tempfile.mkdtemp(prefix="dino_sparo_features_", dir=base) if distributed.get_rank() == 0
                          else None)
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
        return store, bool(_broadcast(hit))


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


# --------------------------------------------------------------------------- command line


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of the evaluation programs: the epilog's examples as written, and every option's
    help ending with its default (unless the help already states it, or there is none to state)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every evaluation program takes: the network, the data, extraction and output."""
    net = parser.add_argument_group("network")
    net.add_argument("--checkpoint", help="checkpoint.pth written by dino-sparo-train")
    net.add_argument("--checkpoint-key", default="auto", choices=CHECKPOINT_KEYS,
                     help="which network of the checkpoint; auto: the teacher of a DINO run (what DINO "
                          "reports), the image tower of a CLIP run's model")
    net.add_argument("--baseline", choices=BASELINES,
                     help="evaluate a reference instead of the trained weights: 'init' is the same "
                          "architecture at initialisation (seeded by the config), 'pixels' the raw images")
    net.add_argument("--config", help="YAML config giving the architecture when there is no --checkpoint "
                                      "(for --baseline init)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=["fashion_mnist", "imagefolder"],
                      help="evaluation dataset (default: the one the checkpoint was trained on)")
    data.add_argument("--data-path", help="image folder with train/ and val/ (or test/) sub-folders, or the folder "
                                          "of the four Fashion-MNIST files (default: the checkpoint's data.path)")
    data.add_argument("--train-path", help="instead of --data-path: the class folder of the train split (the "
                                           "memory of k-NN, the fit of the probe); needs --test-path")
    data.add_argument("--test-path", help="instead of --data-path: the class folder of the test split")
    data.add_argument("--train-limit", type=int, help="use a class-balanced subset of this many train images")
    data.add_argument("--test-limit", type=int, help="use a class-balanced subset of this many test images")
    data.add_argument("--image-size", type=int,
                      help="evaluation crop size (default: the size the checkpoint was trained at: model.img_size for "
                           "CLIP, crops.global_crops_size for DINO; without a checkpoint 28 for Fashion-MNIST, "
                           "else 224)")
    data.add_argument("--resize-ratio", type=float,
                      help="resize the short side to size × ratio before the centre crop "
                           "(default 256/224 as DINO; 1 for Fashion-MNIST and for CLIP checkpoints, as CLIP)")
    data.add_argument("--corrupt-images", choices=["error", "skip"], default="error",
                      help="what an unreadable image in an image folder does")
    ext = parser.add_argument_group("feature extraction")
    ext.add_argument("--batch-size", type=int, default=256, help="images per forward pass (per process)")
    ext.add_argument("--num-workers", type=int, default=4, help="data-loading processes per process")
    ext.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where the network runs (auto: the GPU of this process when there is one)")
    ext.add_argument("--fp16-features", action="store_true",
                     help="store features in float16: half the disk and memory, same neighbours up to rounding")
    ext.add_argument("--cache-dir", help=f"feature cache (default: {DEFAULT_CACHE_FOLDER}/ beside the checkpoint; "
                                         "without a checkpoint, no cache)")
    ext.add_argument("--no-cache", action="store_true", help="extract into a temporary folder, keep nothing")
    ext.add_argument("--output-json", help="write the results here as JSON")
    ext.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_device(name: str) -> torch.device:
    """``auto``: this process' GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        return torch.device("cuda", distributed.env_info().local_rank)
    return torch.device(name)


def setup_process(device_name: str) -> torch.device:
    """Device, process group (when launched with several processes) and logging of an evaluation."""
    device = resolve_device(device_name)
    info = distributed.init_distributed(device.type)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if info.is_main else logging.WARNING)
    return device


def cache_dir_from_args(args: argparse.Namespace) -> Optional[Path]:
    if args.no_cache:
        return None
    if args.cache_dir:
        return Path(args.cache_dir)
    if args.checkpoint:
        return Path(args.checkpoint).resolve().parent / DEFAULT_CACHE_FOLDER
    return None


def data_from_args(args: argparse.Namespace, source: EvalSource, transform: Any = None) -> EvalData:
    """The datasets the options name, defaulting to the checkpoint's own dataset and crop size."""
    cfg = source.cfg
    train_path, test_path = getattr(args, "train_path", None), getattr(args, "test_path", None)
    dataset = args.dataset or ("imagefolder" if train_path or test_path else None) or (
        cfg.data.dataset if cfg is not None else None)
    if dataset is None:
        raise ValueError("--dataset is required when there is no checkpoint or config to take it from")
    data_path = args.data_path
    if data_path is None and cfg is not None and cfg.data.dataset == dataset:
        data_path = cfg.data.path
    if args.image_size is not None:
        size = args.image_size
    elif cfg is not None:
        size = eval_image_size(cfg)
    else:
        size = 28 if dataset == "fashion_mnist" else 224
    if train_path is not None or test_path is not None:
        data_path = None
    return load_eval_data(dataset, data_path, size, args.train_limit, args.test_limit, args.resize_ratio,
                          args.corrupt_images, transform, cfg, train_path, test_path)


def open_for_evaluation(
    checkpoint: Optional[str | os.PathLike], checkpoint_key: str, baseline: Optional[str],
    config: Optional[str | os.PathLike], *, dataset: Optional[str], data_path: Optional[str],
    train_limit: Optional[int], test_limit: Optional[int], image_size: Optional[int],
    resize_ratio: Optional[float], cache_dir: Optional[str | os.PathLike], device: Optional[str | torch.device],
    train_path: Optional[str] = None, test_path: Optional[str] = None,
) -> tuple[argparse.Namespace, torch.device, EvalSource, EvalData]:
    """What the Python entry points (``knn_from_checkpoint``, ``linear_from_checkpoint``) share: the
    options as the command line would hold them, the device, the network and its datasets.
    ``cache_dir="auto"`` caches beside the checkpoint, None caches nothing."""
    args = argparse.Namespace(
        checkpoint=str(checkpoint) if checkpoint is not None else None, baseline=baseline, dataset=dataset,
        data_path=data_path, train_path=train_path, test_path=test_path, train_limit=train_limit,
        test_limit=test_limit, image_size=image_size,
        resize_ratio=resize_ratio, corrupt_images="error", no_cache=cache_dir is None,
        cache_dir=None if cache_dir in (None, "auto") else str(cache_dir),
    )
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = load_source(checkpoint, checkpoint_key, baseline, config, dev)
    return args, dev, source, data_from_args(args, source)


def parse_int_list(text: Optional[str], name: str) -> Optional[list[int]]:
    """``"10,20,100"`` -> [10, 20, 100]; errors name the option."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must name at least one value, got {text!r}")
    return values


def parse_float_list(text: Optional[str], name: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must name at least one value, got {text!r}")
    return values


def slots_from_args(args: argparse.Namespace) -> Optional[list[int]]:
    """The slot subset that ``--slots`` or ``--slots-file`` names (None: every slot)."""
    slots = parse_int_list(args.slots, "--slots")
    if args.slots_file:
        if slots is not None:
            raise ValueError("give --slots or --slots-file, not both")
        slots = read_slots_file(args.slots_file)
    return slots


def labelled_result(result: dict[str, Any], args: argparse.Namespace, source: EvalSource,
                    data: EvalData) -> dict[str, Any]:
    """An evaluation's result headed by what was evaluated: network, checkpoint, key and data."""
    return {"source": source.name, "checkpoint": args.checkpoint,
            "checkpoint_key": source.name if args.baseline is None else None,
            "data": data.info, **result}


def read_slots_file(path: str | os.PathLike) -> list[int]:
    """Slot ids from a file: a JSON list, a JSON object with ``"selected"`` (what ``--select-slots``
    writes) or ``"slots"``, or integers separated by commas, spaces or new lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--slots-file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [v for v in text.replace(",", " ").split()]
    if isinstance(data, dict):  # a k-NN result: its selection first, else its --slots
        if isinstance(data.get("slot_selection"), dict):
            data = data["slot_selection"]
        data = data.get("selected", data.get("slots"))
        if isinstance(data, dict):
            data = data.get("slots")
    if not isinstance(data, list):
        raise ValueError(f"--slots-file {path} must hold a list of slot ids (or {{\"selected\": [...]}})")
    try:
        return [int(v) for v in data]
    except (TypeError, ValueError):
        raise ValueError(f"--slots-file {path} must hold integer slot ids, got {data[:8]}") from None


def write_json(path: str | os.PathLike, result: dict) -> Path:
    """Write ``result`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
