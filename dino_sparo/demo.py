"""The one-command demos, on a laptop CPU.

``make demo`` (or ``python -m dino_sparo.cli.demo``) trains the small DINO + SPARO ViT of
``configs/dino/demo_fashion_mnist.yaml`` on the 60k training images, then prints weighted k-NN
top-1 (k = 20, T = 0.07, teacher features) on the 10k test images beside the same network at
initialisation and beside raw pixels, and saves a picture of what a few slots attend to.

``make demo-clip`` (the same program with ``--config configs/clip/scenes_sparo.yaml``, or any
CLIP config on the scene world) trains CLIP with SPARO on both towers on the scene world, then
prints zero-shot, retrieval and the SugarCrepe-style table of the trained model beside the same
model at initialisation and a text-only baseline, and saves the slot picture.
Re-running resumes the training where it stopped (or skips it when finished).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dino_sparo.config import ConfigError, load_config
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT, FashionMNIST
from dino_sparo.data.transforms import eval_transform, normalization_for
from dino_sparo.evaluation.feature_kinds import FeatureSpec, feature_fn
from dino_sparo.evaluation.knn_search import knn_accuracy
from dino_sparo.models.build import build_backbone, load_backbone_from_checkpoint
from dino_sparo.runtime import cpu_has_native_bf16, resolve_device, resolve_precision, seed_everything
from dino_sparo.train import train
from dino_sparo.visualize import plot_slot_attention

logger = logging.getLogger("dino_sparo.demo")

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dino" / "demo_fashion_mnist.yaml"
CLIP_DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip" / "scenes_sparo.yaml"


def _check_data(path: Optional[str]) -> None:
    root = Path(path or DEFAULT_FASHION_MNIST_ROOT)
    if not (root / "train-images-idx3-ubyte.gz").exists() and not (root / "train-images-idx3-ubyte").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}.\n"
            "  Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist   (or: make data)\n"
            "  elsewhere: download the four IDX files of the Fashion-MNIST project into a folder and "
            "pass data.path=/that/folder")


@torch.inference_mode()
def features_in_one_pass(networks: dict[str, Optional[torch.nn.Module]], dataset: Dataset,
                         batch_size: int = 500) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each network's embedding (``None``: the raw pixels) of every image, with the labels; every
    image is read and transformed once for all of them."""
    fns = {name: feature_fn(net, FeatureSpec("embedding") if net is not None else FeatureSpec("pixels", grayscale=True))
           for name, net in networks.items()}
    for net in networks.values():
        if net is not None:
            net.eval()
    features: dict[str, list[torch.Tensor]] = {name: [] for name in networks}
    labels = []
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        for name, fn in fns.items():
            features[name].append(fn(images).float())
        labels.append(torch.as_tensor(targets))
    return {name: torch.cat(rows) for name, rows in features.items()}, torch.cat(labels)


def run_demo(config: str | Path = DEMO_CONFIG, overrides: Sequence[str] = ()) -> dict:
    """Train (or resume) the run of ``config``, then k-NN of its teacher, its initialisation and raw
    pixels, and the slot picture; the summary is also written to ``demo_results.json``. A stop
    request during training ends the demo there: the summary then holds only ``stopped_by``."""
    cfg = load_config(config, list(overrides))
    if cfg.mode == "clip":
        return run_clip_demo(cfg, config)
    _check_data(cfg.data.path)
    output_dir = Path(cfg.output_dir)

    start = time.perf_counter()
    stopped_by = train(cfg).get("stopped_by")
    if stopped_by:  # a stop request (Ctrl-C, SIGTERM) ends the demo, not only its training
        return {"stopped_by": stopped_by}
    train_s = time.perf_counter() - start

    mean, std, grayscale = normalization_for(cfg.data.dataset)
    transform = eval_transform(cfg.crops.global_crops_size, mean, std, resize_ratio=1.0, grayscale_input=grayscale)
    root = cfg.data.path or DEFAULT_FASHION_MNIST_ROOT
    train_set, test_set = FashionMNIST(root, "train", transform), FashionMNIST(root, "test", transform)
    trained, _ = load_backbone_from_checkpoint(output_dir / "checkpoint.pth", key="teacher")
    seed_everything(cfg.seed)  # train() seeds the same way before building the student first
    initial = build_backbone(cfg.model).eval()

    networks = {"DINO+SPARO (trained teacher)": trained, "same network at initialisation": initial,
                "raw pixels": None}
    logger.info("k-NN: features of the %d train and %d test images (one pass for all three)",
                len(train_set), len(test_set))
    train_features, train_labels = features_in_one_pass(networks, train_set)
    test_features, test_labels = features_in_one_pass(networks, test_set)
    results = {}
    for name in networks:
        knn = knn_accuracy(train_features[name], train_labels, test_features[name], test_labels,
                           num_classes=10, ks=(20,), temperature=0.07, device="cpu")
        results[name] = knn[20]["top1"]
    picture = output_dir / "slot_attention.png"
    if trained.sparo is not None:
        raw = FashionMNIST(root, "test")
        index = np.arange(8) * 1250  # a spread of classes
        images = torch.stack([transform(raw[i][0]) for i in index])
        display = np.stack([np.asarray(raw[i][0], dtype=np.float32) / 255 for i in index])
        slots = plot_slot_attention(trained, images, display, picture, num_slots=8,
                                    title="Fashion-MNIST test images: the 8 most-attended SPARO slots")
        logger.info("slot attention of slots %s: %s", slots, picture)
    total_s = time.perf_counter() - start
    summary = {"knn_top1": results, "train_seconds": train_s, "total_seconds": total_s,
               "picture": str(picture), "config": str(config)}
    (output_dir / "demo_results.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_clip_demo(cfg: Any, config: str | Path, count: int = 1000) -> dict:
    """Train (or resume) a CLIP run on the scene world, then measure it and the same model at
    initialisation on ``count`` scenes per measure, with the text-only baseline, and draw the slots."""
    from dino_sparo.evaluation.scene_eval import evaluate_scenes, load_scene_run, text_only_baseline  # noqa: PLC0415

    if cfg.clip.dataset != "scenes":
        raise ConfigError(f"the CLIP demo runs on the scene world (clip.dataset: scenes); {config} sets "
                         f"clip.dataset={cfg.clip.dataset!r}")
    output_dir = Path(cfg.output_dir)
    start = time.perf_counter()
    stopped_by = train(cfg).get("stopped_by")
    if stopped_by:
        return {"stopped_by": stopped_by}
    train_s = time.perf_counter() - start
    run = load_scene_run(output_dir / "checkpoint.pth", with_initial=True)
    trained, initial, tokenizer, world, transform = (run[k] for k in ("model", "initial", "tokenizer", "world",
                                                                      "transform"))
    sparo = trained.slot_layout() is not None
    results = {name: evaluate_scenes(model, tokenizer, world, transform, count=count, select_slots=sparo and
                                     name == "trained", progress=False)
               for name, model in (("trained", trained), ("at init", initial))}
    baseline = text_only_baseline(world, count)
    picture = output_dir / "slot_attention.png"
    if sparo:
        scenes = [world.scene("test", i) for i in range(8)]
        pictures = [world.render(scene)[0] for scene in scenes]
        images = torch.stack([transform(Image.fromarray(picture)) for picture in pictures])
        display = np.stack(pictures).astype(np.float32) / 255
        slots = plot_slot_attention(trained.visual, images, display, picture, num_slots=8,
                                    title="test scenes: the 8 most-attended SPARO slots of the image tower")
        logger.info("slot attention of slots %s: %s", slots, picture)
    summary = {"results": results, "text_only": baseline, "train_seconds": train_s,
               "total_seconds": time.perf_counter() - start, "picture": str(picture) if sparo else None,
               "config": str(config), "training_precision": str(resolve_precision(cfg.precision, resolve_device(
                   cfg.device)) or "float32").replace("torch.", ""), "cpu_native_bf16": cpu_has_native_bf16()}
    (output_dir / "demo_results.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_demo(summary: dict) -> str:
    """The demo's table: k-NN top-1 of each kind of features (CLIP: the scene tables), the time
    taken and the picture."""
    if "results" in summary:
        from dino_sparo.evaluation.scene_eval import format_scene_table  # noqa: PLC0415

        return ("\n" + format_scene_table(summary["results"], summary["text_only"])
                + f"\n\ntraining {summary['train_seconds'] / 60:.1f} min, total {summary['total_seconds'] / 60:.1f} "
                  f"min; picture: {summary['picture']}")
    lines = ["", "Weighted k-NN on Fashion-MNIST test (k=20, T=0.07, 60k train images as memory)",
             f"{'features':<34}{'top-1':>8}"]
    lines += [f"{name:<34}{100 * top1:>7.2f}%" for name, top1 in summary["knn_top1"].items()]
    lines.append(f"\ntraining {summary['train_seconds'] / 60:.1f} min, total {summary['total_seconds'] / 60:.1f} min; "
                 f"picture: {summary['picture']}")
    return "\n".join(lines)
