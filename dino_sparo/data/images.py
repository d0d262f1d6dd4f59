"""The one way an image file becomes pixels: training, evaluation and pictures all open images here,
and all apply one policy to the files that cannot be read.

PIL's plain ``convert("RGB")`` is wrong for two kinds of files. 16-bit images (modes ``I;16``,
``I``) are clipped at 255, so nearly every pixel turns white; here their values are scaled to
8 bits (÷ 257, rounded). Transparency is dropped, showing whatever colour the transparent pixels
happen to store; here images with transparency (RGBA, LA, PA, or P, L and RGB with a transparent
colour) are composited on a stated background, white unless ``data.alpha_background`` says otherwise.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

CORRUPT_IMAGE_POLICIES = ("error", "skip")

# The colour transparent pixels are shown on (config key data.alpha_background).
ALPHA_BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

T = TypeVar("T")

# Where a draft-decoded image keeps the size of its full decode (the multi-crop transforms crop by it).
FULL_SIZE_KEY = "dino_sparo_full_size"


class CorruptImageError(OSError):
    """An image file that is missing or that PIL cannot decode; the message names the file (and the
    table line or shard sample that lists it).

    Takes a single message argument so that DataLoader workers can re-raise it in the main process.
    """


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit (``I;16*``, ``I``: values 0..65535) and float (``F``: values 0..1) single-channel
    images as 8-bit ``L``, scaled rather than clipped; a transparent grey level becomes an alpha channel."""
    if image.mode not in _SIXTEEN_BIT_MODES and image.mode != "F":
        return image
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(values.astype(np.float64), 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(values.astype(np.float64), 0, 65535) / 257.0
    grey = Image.fromarray(np.rint(scaled).astype(np.uint8), "L")
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), "L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def has_transparency(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def to_mode(image: Image.Image, mode: str = "RGB", background: Sequence[int] = ALPHA_BACKGROUND) -> Image.Image:
    """A copy of ``image`` in ``mode`` ('RGB', or 'L' for one channel), loaded now (the file behind a
    lazily opened image may be closed afterwards): 16-bit values scaled, transparency composited on
    ``background`` (an RGB triple, 0..255)."""
    image = _eight_bit(image)
    if has_transparency(image):
        rgba = image.convert("RGBA")  # P and L/RGB with a transparent colour: PIL makes the alpha channel
        base = Image.new("RGBA", rgba.size, tuple(int(v) for v in background) + (255,))
        image = Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert(mode)


def open_image(source: str | os.PathLike | bytes, mode: str = "RGB", background: Sequence[int] = ALPHA_BACKGROUND,
               where: str = "", name: str | None = None,
               draft: Optional[Callable[[int, int], Optional[tuple[int, int]]]] = None) -> Image.Image:
    """Open and fully decode one image (a file path, or the bytes of one file) into ``mode``, as
    :func:`to_mode` converts it. Any failure, a missing file too, is a :class:`CorruptImageError`
    whose message starts with ``where`` (e.g. ``"caption table T, line 7: "``) and names the file
    (``name``, default the path).

    ``draft(width, height)`` (a multi-crop transform's ``draft_size``) may ask for a smaller JPEG
    decode (libjpeg's DCT scaling, several times faster on large photos); the full size is then kept
    in ``info[FULL_SIZE_KEY]``, so that crops land where they would on the full decode."""
    name = name or (str(source) if not isinstance(source, bytes) else "in memory")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        with handle, Image.open(handle) as image:
            full_size = image.size
            if draft is not None and image.format == "JPEG":
                wanted = draft(*full_size)
                if wanted is not None:
                    image.draft(None, wanted)
            loaded = to_mode(image, mode, background)  # decodes every pixel: truncation surfaces here
            if loaded.size != full_size:
                loaded.info[FULL_SIZE_KEY] = full_size
            return loaded
    except FileNotFoundError:
        raise CorruptImageError(f"{where}image not found: {name}") from None
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise CorruptImageError(f"{where}corrupt or unreadable image {name}: {type(exc).__name__}: {exc}") from exc


def check_policy(policy: str) -> str:
    if policy not in CORRUPT_IMAGE_POLICIES:
        raise ValueError(f"config key 'data.corrupt_images' must be one of {list(CORRUPT_IMAGE_POLICIES)}, "
                         f"got {policy!r}")
    return policy


class UnreadableImages:
    """What a dataset does with a sample whose image cannot be read (``data.corrupt_images``):
    ``error`` raises the :class:`CorruptImageError`, which names the file; ``skip`` logs it once
    per process and serves the next readable sample instead, counting the replaced requests in
    ``skipped`` (the training loop reports them at each epoch's end)."""

    def __init__(self, policy: str, source: str) -> None:
        self.policy, self.source = check_policy(policy), source
        self.bad: set[int] = set()
        self.skipped = 0

    def load(self, load_item: Callable[[int], T], index: int, size: int) -> T:
        """``load_item(index)``, or under ``skip`` the first readable item after it (cyclically)."""
        if self.policy == "error":
            return load_item(index)
        for step in range(size):
            i = (index + step) % size
            if i in self.bad:
                continue
            try:
                item = load_item(i)
            except CorruptImageError as exc:
                self.bad.add(i)
                logger.warning("skipping %s (data.corrupt_images: skip)", exc)
                continue
            self.skipped += int(i != index)
            return item
        raise CorruptImageError(f"no readable image in {self.source}: every one of {size} files is missing or corrupt")


def skipped_images(dataset: object) -> int:
    """How many requested samples ``dataset`` has replaced by readable ones in this process (0 for
    datasets without image files)."""
    policy = getattr(dataset, "unreadable", None)
    return policy.skipped if isinstance(policy, UnreadableImages) else 0
