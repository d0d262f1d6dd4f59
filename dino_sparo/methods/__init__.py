"""Training methods: what a step computes. The loop in :mod:`dino_sparo.train` drives any of them."""

from __future__ import annotations

import importlib
from typing import Any
from dino_sparo.errors import ConfigError

METHODS = {"dino": "dino_sparo.methods.dino:DinoMethod", "clip": "dino_sparo.methods.clip:ClipMethod"}


def build_method(cfg: Any, device: Any):
    """The method object for ``cfg.mode``."""
    if cfg.mode not in METHODS:
        raise ConfigError(f"config key 'mode' must be one of {sorted(METHODS)}, got {cfg.mode!r}")
    module, name = METHODS[cfg.mode].split(":")
    return getattr(importlib.import_module(module), name)(cfg, device)
