"""One checkpoint format for both modes, written atomically: a crash or a kill while saving never
leaves a corrupt ``checkpoint.pth`` (the new file is written beside it, flushed, then renamed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was SIGKILLed
        stale.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Our checkpoints hold numpy RNG states and the config dict besides tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} cannot be read ({exc}); it may be truncated or not "
                           "a dino_sparo checkpoint") from exc
    if not isinstance(state, dict):
        raise RuntimeError(f"checkpoint {path} does not hold a dict of states")
    return state


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """Keys starting with ``prefix`` with it removed (e.g. ``backbone.``, DDP's ``module.``)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
