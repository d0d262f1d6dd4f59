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
