"""A tiny DINO + SPARO checkpoint made by the real training program, shared by the evaluation tests."""

from __future__ import annotations

from pathlib import Path

from dino_sparo.config import from_dict

NUM_SLOTS, SLOT_DIM = 4, 4

TINY_CONFIG = {
    "max_steps": 2,
    "log_every": 1,
    "device": "cpu",
    "model": {"arch": "vit_pico", "depth": 2, "patch_size": 4, "img_size": 28, "drop_path_rate": 0.0,
              "sparo": {"num_slots": NUM_SLOTS, "slot_dim": SLOT_DIM}},
    "data": {"dataset": "fashion_mnist", "limit": 256, "batch_size_per_gpu": 32, "num_workers": 0},
    "crops": {"global_crops_size": 28, "local_crops_number": 2, "local_crops_size": 12},
    "dino": {"out_dim": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "optim": {"epochs": 1, "warmup_epochs": 0, "lr": 0.01},
}


def tiny_checkpoint(base: Path) -> Path:
    """Train (once per test session: ``base`` is the session's temporary root) and return the path."""
    from dino_sparo.train import train  # noqa: PLC0415

    output = base / "tiny_dino"
    path = output / "checkpoint.pth"
    if not path.is_file():
        train(from_dict({**TINY_CONFIG, "output_dir": str(output)}))
    return path


CLIP_IMAGE_SIZE = 28  # not DINO's crops.global_crops_size (224 by default): evaluations must use this one

TINY_CLIP_CONFIG = {
    "mode": "clip",
    "precision": "fp32",
    "max_steps": 2,
    "log_every": 1,
    "device": "cpu",
    "model": {"arch": "vit_pico", "depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 7,
              "img_size": CLIP_IMAGE_SIZE, "drop_path_rate": 0.0, "sparo": {"num_slots": NUM_SLOTS, "slot_dim": 8}},
    "clip": {"text_width": 32, "text_depth": 2, "text_heads": 2, "context_length": 20, "embed_dim": 32,
             "image_mean": [0.3, 0.3, 0.3], "image_std": [0.35, 0.35, 0.35], "templates": ["a photo of a {}."]},
    "data": {"dataset": "fashion_mnist", "limit": 128, "batch_size_per_gpu": 32, "num_workers": 0},
    "optim": {"epochs": 1, "warmup_epochs": 0, "lr": 0.008, "clip_grad": 0.0, "weight_decay": 0.0,
              "weight_decay_end": 0.0},
}


def tiny_clip_checkpoint(base: Path) -> Path:
    """A tiny CLIP + SPARO checkpoint at 28 px, trained once per test session by the real program."""
    from dino_sparo.train import train  # noqa: PLC0415

    output = base / "tiny_clip"
    path = output / "checkpoint.pth"
    if not path.is_file():
        train(from_dict({**TINY_CLIP_CONFIG, "output_dir": str(output)}))
    return path
