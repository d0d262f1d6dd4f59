"""Shared test set-up: one intra-op thread, GPU tests skipped without CUDA."""


import pytest
import torch

torch.set_num_threads(1)  # tiny test models: more threads only add overhead, and tests run beside each other


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
