"""Atomic file writes, in one place: checkpoints, exported weights and every program's
``--output-json`` are written beside their destination, flushed to disk, then renamed over it, so
a crash, a kill or a full disk never leaves a half-written file under the final name. A full disk
is reported as one line naming the file (:class:`~dino_sparo.errors.DiskFullError`)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from dino_sparo.errors import DiskFullError


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an error in its chain is ENOSPC (torch.save wraps it in its own RuntimeError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.
    On any error the temporary file is removed and ``path`` is left as it was; a full disk raises
    :class:`DiskFullError` (one line) instead of the writer's own, often long, error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and _disk_full(exc):
            raise DiskFullError(f"cannot write {path}: No space left on device (the previous {path.name}, if "
                                "any, is kept; free some space and re-run)") from None
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a write that was SIGKILLed
        stale.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, result: Any) -> Path:
    """``result`` as indented JSON at ``path``, atomically: the one writer of ``--output-json``."""
    text = json.dumps(result, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode()))
