"""The one-command demo: DINO + SPARO on Fashion-MNIST on a laptop CPU, then k-NN accuracy.

``make demo`` (or ``python -m dino_sparo.demo``) trains the small ViT of
``configs/dino/demo_fashion_mnist.yaml`` on the 60k training images, then prints weighted k-NN
top-1 (k = 20, T = 0.07, teacher features) on the 10k test images beside the same network at
initialisation and beside raw pixels, and saves a picture of what a few slots attend to.
Re-running resumes the training where it stopped (or skips it when finished).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dino_sparo.config import load_config
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT, FashionMNIST
from dino_sparo.data.transforms import eval_transform, normalization_for
from dino_sparo.evaluation.frozen_features import FeatureSpec, feature_fn
from dino_sparo.evaluation.knn import knn_evaluate
from dino_sparo.models.build import build_backbone, load_backbone_from_checkpoint
from dino_sparo.train import seed_everything, stopped_exit_code, train
from dino_sparo.visualize import plot_slot_attention

logger = logging.getLogger("dino_sparo.demo")

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dino" / "demo_fashion_mnist.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dino_sparo.demo",
        description="Train DINO+SPARO on Fashion-MNIST on the CPU, then compare k-NN accuracy with the "
                    "untrained network and with raw pixels.")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="training config (default: the demo's)")
    parser.add_argument("--output-dir", help="where the run goes (default: the config's output_dir)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, all cores)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def _check_data(path: Optional[str]) -> None:
    root = Path(path or DEFAULT_FASHION_MNIST_ROOT)
    if not (root / "train-images-idx3-ubyte.gz").exists() and not (root / "train-images-idx3-ubyte").exists():
        raise SystemExit(
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


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_config(args.config, overrides)
    _check_data(cfg.data.path)
    output_dir = Path(cfg.output_dir)

    start = time.perf_counter()
    stopped_by = train(cfg).get("stopped_by")
    if stopped_by:  # a stop request (Ctrl-C, SIGTERM) ends the demo, not only its training
        raise SystemExit(stopped_exit_code(stopped_by))
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
        knn = knn_evaluate(train_features[name], train_labels, test_features[name], test_labels,
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

    print("\nWeighted k-NN on Fashion-MNIST test (k=20, T=0.07, 60k train images as memory)")
    print(f"{'features':<34}{'top-1':>8}")
    for name, top1 in results.items():
        print(f"{name:<34}{100 * top1:>7.2f}%")
    print(f"\ntraining {train_s / 60:.1f} min, total {total_s / 60:.1f} min; picture: {picture}")
    summary = {"knn_top1": results, "train_seconds": train_s, "total_seconds": total_s,
               "picture": str(picture), "config": str(args.config)}
    (output_dir / "demo_results.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
