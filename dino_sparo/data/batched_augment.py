"""DINO's photometric augmentations as batched tensor ops, for ``data.augment_on: device``.

The loader workers decode, crop, resize and flip (:class:`~dino_sparo.data.transforms.DeviceMultiCropTransform`)
and hand over uint8 crops with one row of parameters per crop, drawn in the worker under the
sample's seed (:func:`draw_photometric`), so exact resume and "two processes equal one" hold as in
the loader path. At the start of the step :func:`apply_photometric` runs colour jitter (in each
crop's own random order), greyscale, Gaussian blur, solarisation and normalisation on the whole
batch at once, on the training device (a GPU; on a CPU the same code runs on CPU tensors).

Each op computes what torchvision's functional op of the same name computes on a float image in
[0, 1] with the same parameter (tests/test_batched_augment.py checks them against each other).
Unlike DINO's PIL pipeline nothing is rounded to uint8 between the ops.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PARAMS", "draw_photometric", "apply_photometric", "augment_crops", "blur_kernel_size", "adjust_brightness",
           "adjust_contrast", "adjust_saturation", "adjust_hue", "to_grayscale", "gaussian_blur", "solarize"]

# One row per crop: the columns of the parameter tensor.
PARAMS = ("jitter", "brightness", "contrast", "saturation", "hue", "order0", "order1", "order2", "order3",
          "grayscale", "sigma", "solarize")
_COL = {name: i for i, name in enumerate(PARAMS)}

# DINO's recipe (facebookresearch/dino, main_dino.py DataAugmentationDINO)
JITTER_P, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.8, 0.4, 0.4, 0.2, 0.1
GRAYSCALE_P = 0.2
SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize(threshold=128) on [0, 1] values
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())


def draw_photometric(blur_p: float, radius: tuple[float, float], solarize_p: float) -> torch.Tensor:
    """One crop's parameters (a row of :data:`PARAMS`), from torch's global generator (seeded per
    sample by :class:`~dino_sparo.data.samplers.SeededSamples`), with DINO's probabilities and ranges:
    jitter p 0.8 (brightness 0.6–1.4, contrast 0.6–1.4, saturation 0.8–1.2, hue ±0.1, in a random
    order), greyscale p 0.2, blur p ``blur_p`` with sigma uniform in ``radius``, solarise p ``solarize_p``.
    sigma 0 means no blur."""
    row = torch.zeros(len(PARAMS))
    row[_COL["jitter"]] = float(torch.rand(1).item() <= JITTER_P)  # torchvision's RandomApply
    row[_COL["order0"]:_COL["order3"] + 1] = torch.randperm(4).float()
    row[_COL["brightness"]] = _uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)
    row[_COL["contrast"]] = _uniform(1 - CONTRAST, 1 + CONTRAST)
    row[_COL["saturation"]] = _uniform(1 - SATURATION, 1 + SATURATION)
    row[_COL["hue"]] = _uniform(-HUE, HUE)
    row[_COL["grayscale"]] = float(torch.rand(1).item() < GRAYSCALE_P)
    if torch.rand(1).item() < blur_p:
        row[_COL["sigma"]] = radius[0] + (radius[1] - radius[0]) * torch.rand(1).item()
    row[_COL["solarize"]] = float(torch.rand(1).item() < solarize_p)
    return row


def blur_kernel_size(sigma_max: float) -> int:
    """The odd kernel side that holds ±3 sigma of the widest blur (one size for the whole batch)."""
    return 2 * max(1, math.ceil(3 * sigma_max)) + 1


# ------------------------------------------------------------------------------------ the ops
# x: float B × C × H × W in [0, 1] (C = 3, or 1 for greyscale data); factors: B values.

def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    ratio = _per_sample(ratio)
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601-2, torchvision's weights), B × 1 × H × W; a one-channel image is its own."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (_per_sample(factor) * x).clamp(0.0, 1.0)  # a blend with black


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return _blend(x, to_grayscale(x), factor)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's RGB -> HSV (hue in turns), as three B × H × W tensors."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB in closed form, channel n of (R, G, B) = v - v·s·clamp(min(k, 4 - k), 0, 1) with
    k = (n' + 6h) mod 6, n' = 5, 3, 1: torchvision's six-sector table without materialising it."""
    h6 = h * 6.0
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + offset, 6.0)
        channels.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` turns (in [-0.5, 0.5]) in HSV space, as torchvision does."""
    if x.shape[1] == 1:
        return x
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(torch.remainder(h + factor.reshape(-1, 1, 1), 1.0), s, v)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Each image blurred with its own sigma: a separable ``kernel_size`` Gaussian, reflect padding
    (torchvision's ``gaussian_blur`` with that kernel size)."""
    b, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    positions = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    pdf = torch.exp(-0.5 * (positions / sigma.to(x.dtype).reshape(-1, 1)) ** 2)
    kernel = (pdf / pdf.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B·C) × k
    pad = kernel_size // 2
    flat = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    return flat.reshape(b, c, h, w)


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


_JITTER_OPS = ((adjust_brightness, "brightness"), (adjust_contrast, "contrast"),
               (adjust_saturation, "saturation"), (adjust_hue, "hue"))  # torchvision's fn_idx order


def _on_rows(x: torch.Tensor, rows: torch.Tensor, op, *args: torch.Tensor) -> torch.Tensor:
    """``op`` applied to the images where ``rows`` (a CPU mask) is True, the others untouched, in
    place (``x`` is :func:`apply_photometric`'s own buffer). ``args`` are per-image CPU values. The
    indices are found on the host, where the parameters come from, so a GPU is never waited on."""
    index = rows.nonzero().squeeze(1)
    if index.numel() == 0:
        return x
    values = [a[index].to(x.device, non_blocking=True) for a in args]
    if index.numel() == x.shape[0]:
        return op(x, *values)
    index = index.to(x.device, non_blocking=True)
    x[index] = op(x[index], *values)
    return x


def apply_photometric(crops: torch.Tensor, params: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                      kernel_size: int) -> torch.Tensor:
    """uint8 crops B × C × H × W (on the device) and their parameter rows B × len(PARAMS) (on the
    host) -> float32 normalised B × 3 × H × W: colour jitter (each crop in its own order),
    greyscale, blur, solarise, normalise."""
    x = crops.float().div_(255.0)
    params = params.detach().to("cpu", torch.float32)
    jitter = params[:, _COL["jitter"]] > 0
    for position in range(4):
        order = params[:, _COL["order0"] + position]
        for op_index, (op, name) in enumerate(_JITTER_OPS):
            x = _on_rows(x, jitter & (order == op_index), op, params[:, _COL[name]])
    gray = params[:, _COL["grayscale"]] > 0
    x = _on_rows(x, gray, lambda images: to_grayscale(images).repeat(1, images.shape[1], 1, 1))
    sigma = params[:, _COL["sigma"]]
    x = _on_rows(x, sigma > 0, lambda images, s: gaussian_blur(images, s, kernel_size), sigma)
    x = _on_rows(x, params[:, _COL["solarize"]] > 0, solarize)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1).to(x.device, non_blocking=True)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1).to(x.device, non_blocking=True)
    return (x - mean_t) / std_t


def augment_crops(crops: Sequence[torch.Tensor], params: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                  kernel_size: int, device: torch.device) -> list[torch.Tensor]:
    """A batch of ``data.augment_on: device``: uint8 crops (one B × C × H × W tensor per crop index)
    and their parameters (B × crops × len(PARAMS)) -> float32 normalised crops on ``device``, one op
    call per crop size (all global crops together, all local ones together). Runs outside autocast:
    the pixels are computed in float32 whatever the step's precision."""
    batch = crops[0].shape[0]
    out: list[torch.Tensor] = []
    start = 0
    with torch.autocast(device.type, enabled=False):
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            images = torch.cat([c.to(device, non_blocking=True) for c in crops[start:end]])
            rows = params[:, start:end].transpose(0, 1).reshape(-1, params.shape[-1])  # crop-major, as cat
            out.extend(apply_photometric(images, rows, mean, std, kernel_size).split(batch))
            start = end
    return out
