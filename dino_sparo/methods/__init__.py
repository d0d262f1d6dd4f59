"""Training methods: what a step computes. The loop in :mod:`dino_sparo.train` drives any of them."""

from __future__ import annotations

from typing import Any

from dino_sparo.methods.base import Method
from dino_sparo.methods.clip import ClipMethod
from dino_sparo.methods.dino import DinoMethod

METHODS: dict[str, type[Method]] = {"dino": DinoMethod, "clip": ClipMethod}  # config key 'mode' -> its method


def build_method(cfg: Any, device: Any) -> Method:
    """The method object for ``cfg.mode``."""
    return METHODS[cfg.mode](cfg, device)
