"""Shared test set-up: one intra-op thread, GPU tests skipped without CUDA, the tiny training config,
and the helpers many tests share (:func:`tiny_config`, :func:`read_log`)."""

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny test models: more threads only add overhead, and tests run beside each other

# The tiny DINO + SPARO model of the tests, as overrides of the defaults (``key.sub=value``): written
# once so that every test trains the same network, each adding only what it changes.
TINY_MODEL = [
    "precision=fp32",  # the numbers compared in the tests are fp32 ones, also on CPUs with native bf16
    "device=cpu",
    "model.arch=vit_pico", "model.depth=2", "model.patch_size=4", "model.img_size=28", "model.drop_path_rate=0.0",
    "model.sparo.num_slots=4", "model.sparo.slot_dim=8",
    "crops.global_crops_size=28", "crops.local_crops_number=2", "crops.local_crops_size=12",
    "dino.out_dim=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
]

# ... and a short run of it on a few Fashion-MNIST images (4 steps per epoch), logging every step.
TINY_TRAINING = [
    *TINY_MODEL,
    "data.dataset=fashion_mnist", "data.limit=64", "data.batch_size_per_gpu=16", "data.num_workers=0",
    "optim.epochs=2", "optim.warmup_epochs=0", "log_every=1",
]

# The tiny CLIP + SPARO run: 28-px images through 7-px patches, a two-block text tower.
TINY_CLIP_TRAINING = [
    "precision=fp32",  # the numbers compared in the tests are fp32 ones, also on CPUs with native bf16
    "device=cpu", "mode=clip",
    "model.arch=vit_pico", "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
    "model.patch_size=7", "model.img_size=28", "model.drop_path_rate=0.0",
    "model.sparo.num_slots=4", "model.sparo.slot_dim=8",
    "clip.text_width=32", "clip.text_depth=2", "clip.text_heads=2", "clip.context_length=20", "clip.embed_dim=32",
    "clip.image_mean=[0.286,0.286,0.286]", "clip.image_std=[0.353,0.353,0.353]",
    "data.dataset=fashion_mnist", "data.limit=256", "data.batch_size_per_gpu=32", "data.num_workers=0",
    "optim.epochs=3", "optim.warmup_epochs=0", "optim.lr=0.008", "optim.clip_grad=0.0",
    "optim.weight_decay=0.0", "optim.weight_decay_end=0.0", "log_every=1",
]


def tiny_config(*overrides, base=TINY_TRAINING):
    """The tiny training config (``base``, TINY_TRAINING by default) with ``overrides`` (``key.sub=value``)."""
    from dino_sparo.config import load_config  # noqa: PLC0415

    return load_config(None, [*base, *overrides])


def read_log(output_dir) -> list:
    """The rows of a run's ``log.jsonl`` (none when it has not been written yet)."""
    path = Path(output_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def program_exit(capsys, main, argv) -> tuple:
    """Run a program's ``main(argv)`` that must stop: its exit status and the last line of its stderr."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return stop.value.code, lines[-1] if lines else ""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: longer end-to-end test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny DINO+SPARO checkpoint made once per session by the real training code."""
    from tiny_checkpoint import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory):
    """A tiny CLIP+SPARO checkpoint (28-px images) made once per session by the real training code."""
    from tiny_checkpoint import tiny_clip_checkpoint

    return tiny_clip_checkpoint(tmp_path_factory.getbasetemp())
