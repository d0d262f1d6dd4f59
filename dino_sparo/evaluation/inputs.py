"""What an evaluation reads, shared by every protocol (k-NN, linear probe) and program: the network
(a checkpoint's backbone, a weights file such as a released timm or DINO backbone, the same
architecture at initialisation, or no network: raw pixels) and the labelled train / test splits it
is evaluated on, both described by one :class:`EvalRequest`.

The feature cache of a request sits next to the checkpoint by default (``cache_dir="auto"``); the
extraction and the cache itself are :mod:`dino_sparo.evaluation.feature_store`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from dino_sparo.checkpoint import load_run
from dino_sparo.config import ARCHS, DataConfig, TrainConfig, load_config
from dino_sparo.data.datasets import build_dataset
from dino_sparo.data.images import ALPHA_BACKGROUND
from dino_sparo.data.transforms import eval_image_size, eval_transform_for, normalization_for
from dino_sparo.errors import UsageError
from dino_sparo.models.build import (
    CHECKPOINT_BACKBONE_PREFIXES,
    build_backbone,
    load_backbone_from_checkpoint,
    load_pretrained_file,
    position_grid,
    read_pretrained,
)
from dino_sparo.runtime import resolve_device

logger = logging.getLogger(__name__)

BASELINES = ("pixels", "init")
CHECKPOINT_KEYS = ("auto", *CHECKPOINT_BACKBONE_PREFIXES)
DEFAULT_CACHE_FOLDER = "eval_features"  # beside the checkpoint


# --------------------------------------------------------------------------- the request


@dataclass
class EvalRequest:
    """Which network and which data an evaluation reads; the command-line options of every
    evaluation program map one to one onto these fields (``--checkpoint-key`` is ``checkpoint_key``)."""

    checkpoint: Optional[str | os.PathLike] = None
    checkpoint_key: str = "auto"  # teacher of a DINO run, the image tower of a CLIP run
    weights: Optional[str | os.PathLike] = None  # a weights file instead: timm, DINO's release, DeiT, ours
    arch: Optional[str] = None  # with weights and no config: the ViT size (default: read from the file)
    patch_size: Optional[int] = None  # with weights and no config (default: read from the file)
    baseline: Optional[str] = None  # "init" | "pixels": evaluate a reference instead of the trained weights
    config: Optional[str | os.PathLike] = None  # the architecture when there is no checkpoint (baseline init)
    dataset: Optional[str] = None  # default: the checkpoint's
    data_path: Optional[str] = None  # default: the checkpoint's data.path
    train_path: Optional[str] = None  # an image folder's train split, named explicitly (with test_path)
    test_path: Optional[str] = None
    train_limit: Optional[int] = None  # class-balanced subsets
    test_limit: Optional[int] = None
    image_size: Optional[int] = None  # default: the size the checkpoint was trained at
    resize_ratio: Optional[float] = None  # default: 256/224 (DINO), 1 for Fashion-MNIST and CLIP
    corrupt_images: str = "error"
    cache_dir: Optional[str | os.PathLike] = "auto"  # "auto": beside the checkpoint; None: no cache
    device: Optional[str | torch.device] = "auto"

    def cache_path(self) -> Optional[Path]:
        """Where features are cached (None: extracted into a scratch folder, kept nowhere)."""
        if self.cache_dir is None:
            return None
        if self.cache_dir != "auto":
            return Path(self.cache_dir)
        if self.checkpoint is not None:
            return Path(self.checkpoint).resolve().parent / DEFAULT_CACHE_FOLDER
        return None

    @classmethod
    def split_options(cls, options: dict[str, Any]) -> tuple["EvalRequest", dict[str, Any]]:
        """A request from the keys of ``options`` that are its fields, and the rest (a protocol's options)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return (cls(**{k: v for k, v in options.items() if k in names}),
                {k: v for k, v in options.items() if k not in names})


# --------------------------------------------------------------------------- the network


@dataclass
class EvalSource:
    """The network an evaluation reads (None for raw pixels) and the run config it belongs to."""

    name: str  # the checkpoint key ("teacher", "student", "model"), "weights", "init" or "pixels"
    backbone: Optional[nn.Module]
    cfg: Optional[TrainConfig]
    checkpoint: Optional[Path] = None
    weights: Optional[str] = None  # the weights file loaded (--weights, or model.pretrained of an init)


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
    weights: Optional[str | os.PathLike] = None,
    arch: Optional[str] = None,
    patch_size: Optional[int] = None,
) -> EvalSource:
    """The backbone stored under ``key`` of ``checkpoint``; or the backbone in a ``weights`` file
    (:func:`load_weights_source`); or, with ``baseline``, the same architecture at initialisation
    (``"init"``: with ``model.pretrained`` loaded when the config names one, as a run would start)
    or no network at all (``"pixels"``). ``config`` (a YAML file) stands in for the checkpoint's
    config when there is no checkpoint."""
    if baseline is not None and baseline not in BASELINES:
        raise UsageError(f"--baseline must be one of {BASELINES}, got {baseline!r}")
    if weights is not None:
        if checkpoint is not None or baseline is not None:
            raise UsageError("give --weights, --checkpoint or --baseline, one of them")
        return load_weights_source(weights, config, arch, patch_size, device)
    if arch is not None or patch_size is not None:
        raise UsageError("--arch and --patch-size describe a --weights file; a checkpoint or --config has its own")
    path = Path(checkpoint) if checkpoint is not None else None
    if baseline is None:
        if path is None:
            raise UsageError("--checkpoint is required (or choose --baseline pixels|init)")
        backbone, cfg = load_backbone_from_checkpoint(path, key, device=device)
        if key == "auto":
            key = "teacher" if cfg.mode == "dino" else "model"
        logger.info("evaluating %s['%s']: %s read-out, embedding %d", path, key, backbone.readout_type,
                    backbone.out_dim)
        return EvalSource(key, backbone, cfg, path)
    cfg = None
    if path is not None:
        cfg = load_run(path).cfg
    elif config is not None:
        cfg = load_config(config)
    if baseline == "pixels":
        return EvalSource("pixels", None, cfg, path)
    if cfg is None:
        raise UsageError("--baseline init needs the architecture: give --checkpoint or --config")
    backbone = init_backbone(cfg)
    if cfg.model.pretrained:  # where the run starts: the pretrained weights, the read-out initialised
        _load_weights(backbone, cfg.model.pretrained, "config key 'model.pretrained'")
        logger.info("evaluating %s at initialisation (seed %d) with model.pretrained %s", cfg.model.arch, cfg.seed,
                    cfg.model.pretrained)
    else:
        logger.info("evaluating %s at initialisation (seed %d)", cfg.model.arch, cfg.seed)
    return EvalSource("init", backbone.to(device), cfg, path, weights=cfg.model.pretrained)


def _load_weights(backbone: nn.Module, path: str | os.PathLike, what: str) -> None:
    """``load_pretrained_file`` with its refusals as one line naming the option."""
    try:
        report = load_pretrained_file(backbone, path)
    except (KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise UsageError(f"{what} ({path}): {' '.join(str(message).split())}") from None
    logger.info("%s: %s, %d tensors loaded%s", path, report.kind, len(report.loaded),
                f"; {len(report.initialised)} of the read-out initialised (random)" if report.initialised else "")


def architecture_of(weights: dict, arch: Optional[str] = None, patch_size: Optional[int] = None) -> list[str]:
    """Config overrides of a class-token ViT with every block of a weights file: its width, depth,
    patch size, registers and LayerScale read from the tensors (``arch`` and ``patch_size``, when
    given, must agree)."""
    keys = {key.split("backbone.")[-1].split("module.")[-1]: value for key, value in weights.items()}
    if "cls_token" not in keys or "patch_embed.proj.weight" not in keys:
        raise UsageError("--weights: the file holds no ViT backbone (no cls_token or patch_embed.proj.weight)")
    width, depth = keys["cls_token"].shape[-1], 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    patch = keys["patch_embed.proj.weight"].shape[-1]
    sizes = [name for name, (w, _, _) in ARCHS.items() if w == width]
    if arch is None and not sizes:
        raise UsageError(f"--weights: a ViT of width {width} is none of {sorted(ARCHS)}; give --config")
    if arch is not None and (arch not in ARCHS or ARCHS[arch][0] != width):
        raise UsageError(f"--arch {arch}: the file's ViT has width {width}" + (f" ({', '.join(sizes)})" if sizes else ""))
    arch = arch or sizes[0]
    if patch_size is not None and patch_size != patch:
        raise UsageError(f"--patch-size {patch_size}: the file's patch embedding is {patch}×{patch}")
    grid = position_grid(keys["pos_embed"].shape[1])[0] if "pos_embed" in keys else 224 // patch
    registers = keys.get("reg_token", keys.get("register_tokens"))
    layer_scale = any(k.endswith("ls1.gamma") for k in keys)  # DINOv2's; the file's values replace the init
    return [f"model.arch={arch}", f"model.embed_dim={width}", f"model.depth={depth}", f"model.patch_size={patch}",
            f"model.img_size={grid * patch}",  # position embeddings stored as trained, resampled per input size
            "model.readout=cls", "model.reduce_depth=0", "model.drop_path_rate=0.0",
            f"model.num_registers={0 if registers is None else registers.shape[1]}",
            f"model.layer_scale_init={1e-5 if layer_scale else 'null'}"]


def load_weights_source(weights: str | os.PathLike, config: Optional[str | os.PathLike] = None,
                        arch: Optional[str] = None, patch_size: Optional[int] = None,
                        device: str | torch.device = "cpu") -> EvalSource:
    """The backbone of a weights file: a released timm or DINO ViT (or one wrapped as DeiT's are, or
    written by ``dino-sparo-export``), evaluated as a class-token ViT with all its blocks, its size
    read from the file (or ``arch`` / ``patch_size``); with ``config``, the config's architecture
    (e.g. a SPARO read-out, initialised when the file has none). A dino_sparo training checkpoint is
    evaluated as ``--checkpoint`` would (its config describes it)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--weights not found: {path}")
    state, kind, _ = read_pretrained(path)
    if kind.startswith("dino_sparo checkpoint"):
        return load_source(path, device=device)
    if config is not None:
        cfg = load_config(config, [f"model.arch={arch}"] if arch else [])
    else:
        cfg = load_config(None, architecture_of(state, arch, patch_size), validate=False)
    backbone = build_backbone(cfg.model)
    _load_weights(backbone, path, "--weights")
    backbone.requires_grad_(False)
    logger.info("evaluating %s: %s %s/%d, %s read-out, embedding %d", path, kind, cfg.model.arch,
                cfg.model.patch_size, backbone.readout_type, backbone.out_dim)
    return EvalSource("weights", backbone.to(device).eval(), cfg if config is not None else None, None,
                      weights=str(path))

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
        data_cfg = DataConfig(dataset=dataset, path=paths[split], limit=limit, corrupt_images=corrupt_images,
                              alpha_background=cfg.data.alpha_background if cfg is not None else ALPHA_BACKGROUND)
        splits[split] = build_dataset(data_cfg, split, transform)
    train, test = splits["train"], splits["val"]
    if train.num_classes != test.num_classes:
        raise UsageError(f"the train split has {train.num_classes} classes but the evaluation split has "
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
        raise UsageError("give both --train-path and --test-path (the class folders of the two splits), or neither")
    if train_path is not None:
        if dataset != "imagefolder":
            raise UsageError(f"--train-path and --test-path name image folders; the dataset is {dataset!r} "
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
            raise UsageError(f"image folder {root} has no {missing} sub-folder: evaluation needs "
                             f"{root}/train/<class>/... and {root}/val/<class>/..., or the two class folders "
                             "given as --train-path and --test-path")
    return {"train": data_path, "val": data_path}


@dataclass
class EvalInputs:
    """An opened request: where it runs, the network and the data."""

    request: EvalRequest
    device: torch.device
    source: EvalSource
    data: EvalData


def open_request(request: EvalRequest) -> EvalInputs:
    """The device, the network (moved there) and the datasets that ``request`` names."""
    device = (request.device if isinstance(request.device, torch.device)
              else resolve_device(request.device or "auto", key="--device"))
    source = load_source(request.checkpoint, request.checkpoint_key, request.baseline, request.config, device,
                         request.weights, request.arch, request.patch_size)
    return EvalInputs(request, device, source, data_for(request, source))


def data_for(request: EvalRequest, source: EvalSource, transform: Any = None) -> EvalData:
    """The datasets ``request`` names, defaulting to the checkpoint's own dataset and crop size."""
    cfg = source.cfg
    explicit = request.train_path is not None or request.test_path is not None
    dataset = request.dataset or ("imagefolder" if explicit else None) or (cfg.data.dataset if cfg is not None else None)
    if dataset is None:
        raise UsageError("--dataset is required when there is no checkpoint or config to take it from")
    data_path = request.data_path
    if data_path is None and cfg is not None and cfg.data.dataset == dataset:
        data_path = cfg.data.path
    if request.image_size is not None:
        size = request.image_size
    elif cfg is not None:
        size = eval_image_size(cfg)
    else:
        size = 28 if dataset == "fashion_mnist" else 224
    if explicit:
        data_path = None
    return load_eval_data(dataset, data_path, size, request.train_limit, request.test_limit, request.resize_ratio,
                          request.corrupt_images, transform, cfg, request.train_path, request.test_path)


def labelled_result(result: dict[str, Any], inputs: EvalInputs) -> dict[str, Any]:
    """An evaluation's result headed by what was evaluated: network, checkpoint, key and data."""
    request, source = inputs.request, inputs.source
    return {"source": source.name,
            "checkpoint": str(request.checkpoint) if request.checkpoint is not None else None,
            "checkpoint_key": source.name if request.baseline is None and source.weights is None else None,
            "weights": source.weights,
            "data": inputs.data.info, **result}


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
        raise UsageError(f"--slots-file {path} must hold a list of slot ids (or {{\"selected\": [...]}})")
    try:
        return [int(v) for v in data]
    except (TypeError, ValueError):
        raise UsageError(f"--slots-file {path} must hold integer slot ids, got {data[:8]}") from None
