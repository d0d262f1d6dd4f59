"""A tiny DINO + SPARO checkpoint made by the real training program, shared by the evaluation tests."""

from __future__ import annotations

from pathlib import Path

from dino_sparo.config import from_dict, parse_overrides

from conftest import TINY_CLIP_TRAINING, TINY_TRAINING

NUM_SLOTS, SLOT_DIM = 4, 4

TINY_CONFIG = parse_overrides([
    *TINY_TRAINING,
    "precision=auto",  # the default: the evaluation tests compare no fp32 numbers
    "max_steps=2", f"model.sparo.num_slots={NUM_SLOTS}", f"model.sparo.slot_dim={SLOT_DIM}",
    "data.limit=256", "data.batch_size_per_gpu=32", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "optim.epochs=1", "optim.lr=0.01",
])


def tiny_checkpoint(base: Path) -> Path:
    """Train (once per test session: ``base`` is the session's temporary root) and return the path."""
    from dino_sparo.train import train  # noqa: PLC0415

    output = base / "tiny_dino"
    path = output / "checkpoint.pth"
    if not path.is_file():
        train(from_dict({**TINY_CONFIG, "output_dir": str(output)}))
    return path


CLIP_IMAGE_SIZE = 28  # not DINO's crops.global_crops_size (224 by default): evaluations must use this one

TINY_CLIP_CONFIG = parse_overrides([
    *TINY_CLIP_TRAINING, "max_steps=2", f"model.img_size={CLIP_IMAGE_SIZE}", f"model.sparo.num_slots={NUM_SLOTS}",
    "clip.image_mean=[0.3,0.3,0.3]", "clip.image_std=[0.35,0.35,0.35]", 'clip.templates=["a photo of a {}."]',
    "data.limit=128", "optim.epochs=1",
])


def tiny_clip_checkpoint(base: Path) -> Path:
    """A tiny CLIP + SPARO checkpoint at 28 px, trained once per test session by the real program."""
    from dino_sparo.train import train  # noqa: PLC0415

    output = base / "tiny_clip"
    path = output / "checkpoint.pth"
    if not path.is_file():
        train(from_dict({**TINY_CLIP_CONFIG, "output_dir": str(output)}))
    return path
