"""Multi-crop training views (DINO's augmentations), the evaluation transform, and the collate
function that turns per-image crop lists into per-crop batches.

The augmentations are those of facebookresearch/dino's `DataAugmentationDINO`, on PIL images, with
one extension: the Gaussian-blur radius (DINO: 0.1–2.0 px) is scaled by `global_crops_size / 224`,
so the ImageNet recipe is unchanged and 28-px images are not blurred into blobs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import default_collate
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from dino_sparo.data.batched_augment import blur_kernel_size, draw_photometric
from dino_sparo.data.images import FULL_SIZE_KEY, to_mode
from dino_sparo.errors import ConfigError

if TYPE_CHECKING:
    from dino_sparo.config import TrainConfig

__all__ = [
    "CROP_RATIO",
    "DeviceMultiCropTransform",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropTransform",
    "RandomGaussianBlur",
    "channel_values",
    "clip_eval_transform",
    "clip_train_transform",
    "device_multicrop_collate",
    "dino_normalization",
    "draft_request",
    "eval_image_size",
    "eval_normalization",
    "eval_transform",
    "eval_transform_for",
    "image_tensor",
    "input_channels",
    "is_clip",
    "jpeg_draft_scale",
    "multicrop_collate",
    "normalization_for",
    "probe_train_transform",
    "random_resized_crop_box",
    "resized_crop",
    "resized_crop_tensor",
    "to_rgb",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Over all pixels of the 60000 training images, in [0, 1] (0.28604, 0.35302); repeated for the
# three channels the ViT sees.
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)

# The crop size DINO's blur radii were chosen for.
_BLUR_REFERENCE_SIZE = 224
# RandomResizedCrop's aspect-ratio range (DINO keeps torchvision's default).
CROP_RATIO = (3 / 4, 4 / 3)
# The reductions libjpeg decodes at directly (DCT scaling).
_DRAFT_SCALES = (8, 4, 2)


def random_resized_crop_box(width: int, height: int, scale: Sequence[float],
                            ratio: Sequence[float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop of a ``width`` × ``height`` image: torchvision's
    ``RandomResizedCrop.get_params``, the same draws from torch's generator, computed from the size
    alone, so that a draft-decoded image is cropped where its full decode would have been."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)  # fallback: the central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def jpeg_draft_scale(width: int, height: int, crops: Sequence[tuple[int, float]],
                     ratio: Sequence[float] = CROP_RATIO) -> int:
    """The largest JPEG draft reduction (8, 4, 2, else 1) after which every crop kind ``(side,
    smallest scale)`` still shrinks (or keeps its size) from its smallest possible region: the
    crops then need no more upsampling than from the full decode."""
    for reduction in _DRAFT_SCALES:
        if all(math.sqrt(low * width * height * min(ratio)) / reduction >= side for side, low in crops):
            return reduction
    return 1


def draft_request(width: int, height: int, crops: Sequence[tuple[int, float]]) -> Optional[tuple[int, int]]:
    """The size to ask ``Image.draft`` for (None: decode in full); see :func:`jpeg_draft_scale`."""
    reduction = jpeg_draft_scale(width, height, crops)
    return None if reduction == 1 else (math.ceil(width / reduction), math.ceil(height / reduction))


def resized_crop(image: Image.Image, size: int, scale: Sequence[float], ratio: Sequence[float] = CROP_RATIO
                 ) -> Image.Image:
    """A random crop, resized (bicubic) to ``size`` × ``size``: torchvision's RandomResizedCrop on
    PIL (crop, then resize) where ``image`` is the full decode; from a draft-decoded image, the same
    region in its coordinates, cropped and resized in one call."""
    full_w, full_h = image.info.get(FULL_SIZE_KEY, image.size)
    i, j, h, w = random_resized_crop_box(full_w, full_h, scale, ratio)
    if image.size == (full_w, full_h):
        return image.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)
    sx, sy = image.size[0] / full_w, image.size[1] / full_h
    return image.resize((size, size), Image.BICUBIC, box=(j * sx, i * sy, (j + w) * sx, (i + h) * sy))


class RandomGaussianBlur:
    """PIL Gaussian blur with probability `p`, radius drawn uniformly from [radius_min, radius_max].

    DINO's `GaussianBlur`, drawing from torch's generator (seeded per DataLoader worker) so one seed
    fixes all augmentations.
    """

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return image
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min:.4g}, {self.radius_max:.4g}))"


class _ToPIL:
    """Any image-like input -> PIL image in `mode` ('RGB', or 'L' for grayscale data)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Any) -> Image.Image:
        if isinstance(image, torch.Tensor):  # uint8, H × W or C × H × W (torch's layout)
            image = (image.permute(1, 2, 0) if image.dim() == 3 else image).numpy()
        if isinstance(image, np.ndarray):  # uint8, H × W or H × W × C
            if image.ndim == 3 and image.shape[-1] == 1:
                image = image[..., 0]
            image = Image.fromarray(np.ascontiguousarray(image))
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")
        return image if image.mode == self.mode else to_mode(image, self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


# PIL's RGB -> L weights (ITU-R 601), which also turn RGB statistics into grey ones.
_LUMA = (0.299, 0.587, 0.114)


def channel_values(name: str, values: Sequence[float], channels: int = 3) -> tuple[float, ...]:
    """``values`` for ``channels`` channels: one value is repeated; three (RGB statistics) for one
    channel become their luminance, as the images themselves do."""
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * channels
    elif len(values) == 3 and channels == 1:
        values = (sum(w * v for w, v in zip(_LUMA, values)),)
    if len(values) != channels:
        raise ValueError(f"'{name}' must have 1 or {channels} values (one per channel), got {values}")
    return values


class _ToNormalisedTensor:
    """PIL uint8 image -> normalised float C × H × W tensor: torchvision's ToTensor, grey images
    repeated to three channels unless the network takes one (``channels=1``), then Normalize: the same
    arithmetic in the same order (so the same values to the bit), with the mean and std tensors made
    once instead of on every call."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int = 3) -> None:
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        self.channels = channels

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True))
        pixels = pixels.view(image.size[1], image.size[0], -1).permute(2, 0, 1).contiguous()
        tensor = pixels.to(dtype=torch.get_default_dtype()).div(255)
        if tensor.shape[0] == 1 and self.channels == 3:
            tensor = tensor.repeat(3, 1, 1)
        return tensor.sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def _normalisation(mean: Sequence[float], std: Sequence[float], channels: int = 3
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean`` and ``std`` per channel (:func:`channel_values`), the std checked positive."""
    mean_c, std_c = channel_values("mean", mean, channels), channel_values("std", std, channels)
    if any(s <= 0 for s in std_c):
        raise ValueError(f"'std' values must be > 0, got {std_c}")
    return mean_c, std_c


def _to_tensor_and_normalise(mean: Sequence[float], std: Sequence[float], channels: int = 3) -> _ToNormalisedTensor:
    return _ToNormalisedTensor(*_normalisation(mean, std, channels), channels)


def _check_crop_arguments(global_crops_number: int, local_crops_number: int, global_crops_scale: Sequence[float],
                          local_crops_scale: Sequence[float]) -> None:
    if global_crops_number not in (1, 2):
        raise ValueError(f"'global_crops_number' must be 1 or 2 (DINO's two recipes), got {global_crops_number}")
    if local_crops_number < 0:
        raise ValueError(f"'local_crops_number' must be >= 0, got {local_crops_number}")
    for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"'{name}' must be (low, high) with 0 < low <= high <= 1, got {tuple(scale)}")


class MultiCropTransform:
    """One image -> `[global_1, global_2, local_1, ..., local_n]` normalised 3 × H × W tensors.

    Globals: RandomResizedCrop (bicubic), flip, colour jitter (p 0.8), grayscale (p 0.2), blur
    (p 1.0 on the first, 0.1 on the second), solarisation (p 0.2, second only). Locals: the same with
    blur p 0.5. With `grayscale_input` the image is processed as one channel (saturation, hue and
    grayscale are no-ops there; brightness and contrast still act) and repeated to three channels,
    or kept as one with ``channels=1`` (a one-channel ViT, ``model.in_chans: 1``; RGB images are then
    made grey first). ``color_jitter_strength`` scales DINO's jitter (0: none) and ``grayscale_prob``
    replaces its 0.2.
    """

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        grayscale_input: bool = False,
        global_crops_number: int = 2,
        channels: int = 3,
        color_jitter_strength: float = 1.0,
        grayscale_prob: float = 0.2,
    ) -> None:
        _check_crop_arguments(global_crops_number, local_crops_number, global_crops_scale, local_crops_scale)
        self.global_crops_number = global_crops_number
        self.local_crops_number = local_crops_number
        self.to_pil = _ToPIL("L" if grayscale_input or channels == 1 else "RGB")
        blur_scale = global_crops_size / _BLUR_REFERENCE_SIZE
        radius = (0.1 * blur_scale, 2.0 * blur_scale)

        s = color_jitter_strength
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.2 * s, hue=0.1 * s)],
                    p=0.8 if s > 0 else 0.0,
                ),
                transforms.RandomGrayscale(p=grayscale_prob),
            ]
        )
        normalise = _to_tensor_and_normalise(mean, std, channels)

        def crop(size: int, scale: tuple[float, float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC)

        self.global_transforms = [
            transforms.Compose(
                [
                    crop(global_crops_size, global_crops_scale),
                    flip_and_color_jitter,
                    RandomGaussianBlur(1.0, *radius),
                    normalise,
                ]
            ),
            transforms.Compose(
                [
                    crop(global_crops_size, global_crops_scale),
                    flip_and_color_jitter,
                    RandomGaussianBlur(0.1, *radius),
                    transforms.RandomSolarize(threshold=128, p=0.2),
                    normalise,
                ]
            ),
        ][:global_crops_number]
        self.local_transform = transforms.Compose(
            [
                crop(local_crops_size, local_crops_scale),
                flip_and_color_jitter,
                RandomGaussianBlur(0.5, *radius),
                normalise,
            ]
        )

    def draft_size(self, width: int, height: int) -> Optional[tuple[int, int]]:
        """The JPEG draft size a dataset may decode a ``width`` × ``height`` image at (None: in full)."""
        return draft_request(width, height, self.crop_kinds)

    @property
    def crop_kinds(self) -> list[tuple[int, float]]:
        kinds = [t.transforms[0] for t in self.global_transforms]
        kinds += [self.local_transform.transforms[0]] if self.local_crops_number else []
        return [(crop.size[0], crop.scale[0]) for crop in kinds]

    @staticmethod
    def _view(compose: transforms.Compose, image: Image.Image) -> torch.Tensor:
        """The pipeline's first step (its RandomResizedCrop) done by :func:`resized_crop`, the rest as is."""
        crop = compose.transforms[0]
        out = resized_crop(image, crop.size[0], crop.scale, crop.ratio)
        for step in compose.transforms[1:]:
            out = step(out)
        return out

    def __call__(self, image: Any) -> list[torch.Tensor]:
        image = self.to_pil(image)
        crops = [self._view(t, image) for t in self.global_transforms]
        crops.extend(self._view(self.local_transform, image) for _ in range(self.local_crops_number))
        return crops

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(input={self.to_pil!r}, local_crops_number={self.local_crops_number},"]
        lines += [f"  global_{i + 1}={t!r}," for i, t in enumerate(self.global_transforms)]
        lines.append(f"  local={self.local_transform!r})")
        return "\n".join(lines)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 1 × C × H × W tensor, channels last in memory (as decoded; no copy
    beyond the one out of PIL), the layout torch's uint8 resampling is fastest on."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return (pixels.unsqueeze(-1) if pixels.dim() == 2 else pixels).permute(2, 0, 1).unsqueeze(0)


def resized_crop_tensor(pixels: torch.Tensor, full_size: tuple[int, int], size: int, scale: Sequence[float],
                        ratio: Sequence[float] = CROP_RATIO) -> torch.Tensor:
    """:func:`resized_crop` on a uint8 ``1 × C × H × W`` tensor (:func:`image_tensor`) -> ``C × size ×
    size`` uint8: the same box draws, resampled by torch's antialiased bicubic (Pillow's filter,
    a = -0.5, within one level of PIL's result and several times faster). From a draft decode
    (``full_size`` larger than the tensor) the box is rounded to the reduced pixel grid."""
    full_w, full_h = full_size
    i, j, h, w = random_resized_crop_box(full_w, full_h, scale, ratio)
    height, width = pixels.shape[-2:]
    if (width, height) != (full_w, full_h):
        sx, sy = width / full_w, height / full_h
        top, left = min(round(i * sy), height - 1), min(round(j * sx), width - 1)
        i, j, h, w = top, left, max(1, min(round(h * sy), height - top)), max(1, min(round(w * sx), width - left))
    region = pixels[:, :, i:i + h, j:j + w]
    return F.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]


class DeviceMultiCropTransform:
    """The loader half of ``data.augment_on: device``: one image -> (its crops as uint8 C × H × W
    tensors, their photometric parameters, one row each of
    :data:`~dino_sparo.data.batched_augment.PARAMS`). Crops, resizing and flips as
    :class:`MultiCropTransform` does; the colour jitter, greyscale, blur and solarisation parameters
    are drawn here, under the sample's seed, with DINO's probabilities (blur 1.0 / 0.1 / 0.5,
    solarise 0.2 on the second global crop), and applied batched on the training device
    (:func:`~dino_sparo.data.batched_augment.augment_crops`), followed by normalisation with
    ``mean`` and ``std``. Grayscale data stays one channel until then."""

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        grayscale_input: bool = False,
        global_crops_number: int = 2,
    ) -> None:
        _check_crop_arguments(global_crops_number, local_crops_number, global_crops_scale, local_crops_scale)
        self.mean, self.std = _normalisation(mean, std)
        self.to_pil = _ToPIL("L" if grayscale_input else "RGB")
        blur_scale = global_crops_size / _BLUR_REFERENCE_SIZE
        self.radius = (0.1 * blur_scale, 2.0 * blur_scale)
        self.kernel_size = blur_kernel_size(self.radius[1])
        # (side, scale range, blur p, solarise p) of each crop, in output order
        globals_ = [(global_crops_size, tuple(global_crops_scale), 1.0, 0.0),
                    (global_crops_size, tuple(global_crops_scale), 0.1, 0.2)][:global_crops_number]
        self.views = globals_ + [(local_crops_size, tuple(local_crops_scale), 0.5, 0.0)] * local_crops_number
        self.local_crops_number = local_crops_number

    def draft_size(self, width: int, height: int) -> Optional[tuple[int, int]]:
        return draft_request(width, height, sorted({(side, scale[0]) for side, scale, _, _ in self.views}))

    def __call__(self, image: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        image = self.to_pil(image)
        full_size = image.info.get(FULL_SIZE_KEY, image.size)
        pixels = image_tensor(image)  # the one PIL -> tensor trip
        crops, rows = [], []
        for side, scale, blur_p, solarize_p in self.views:
            view = resized_crop_tensor(pixels, full_size, side, scale)
            if torch.rand(1) < 0.5:  # RandomHorizontalFlip's draw
                view = view.flip(-1)
            crops.append(view)
            rows.append(draw_photometric(blur_p, self.radius, solarize_p))
        return crops, torch.stack(rows)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input={self.to_pil!r}, views={self.views}, blur radius={self.radius}, "
                f"kernel {self.kernel_size}, mean={self.mean}, std={self.std})")


def eval_transform(
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_ratio: float = 256 / 224,
    grayscale_input: bool = False,
    channels: int = 3,
) -> transforms.Compose:
    """Resize the short side to `round(size · resize_ratio)` (bicubic), centre-crop `size`, normalise
    (`channels=1`: one grey channel, for a one-channel ViT).

    DINO's k-NN / linear evaluation view (256 -> 224); use `resize_ratio=1.0` for small images.
    """
    if resize_ratio < 1.0:
        raise ValueError(f"'resize_ratio' must be >= 1 (resize, then crop), got {resize_ratio}")
    return transforms.Compose(
        [
            _ToPIL("L" if grayscale_input or channels == 1 else "RGB"),
            transforms.Resize(int(round(size * resize_ratio)), interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            _to_tensor_and_normalise(mean, std, channels),
        ]
    )


def multicrop_collate(batch: Sequence[tuple[Sequence[torch.Tensor], Any]]) -> tuple[list[torch.Tensor], Any]:
    """`[(crops, label), ...]` -> `([crop_0 B × 3 × H × W, crop_1, ...], labels)`.

    Per-crop batches (crops differ in size between global and local); `torch.cat(crops)` gives
    the crop-major order the DINO loss expects.
    """
    if len(batch) == 0:
        raise ValueError("multicrop_collate got an empty batch")
    n_crops = len(batch[0][0])
    for index, (crops, _) in enumerate(batch):
        if len(crops) != n_crops:
            raise ValueError(f"multicrop_collate: item {index} has {len(crops)} crops, item 0 has {n_crops}")
    crops_by_index = [torch.stack([crops[i] for crops, _ in batch]) for i in range(n_crops)]
    labels = default_collate([label for _, label in batch])
    return crops_by_index, labels


def normalization_for(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
    """Mean, std and whether images are grayscale, for a ``data.dataset`` name."""
    if dataset == "fashion_mnist":
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD, True
    return IMAGENET_MEAN, IMAGENET_STD, False


# --------------------------------------------------------------------------- the views evaluations use


def eval_transform_for(
    dataset: str,
    image_size: int,
    resize_ratio: Optional[float] = None,
    cfg: Optional[TrainConfig] = None,
) -> Any:
    """DINO's evaluation view (resize the short side by 256/224, centre-crop) for image folders;
    the whole image (ratio 1) for Fashion-MNIST, whose 28-px images the model saw whole. With the
    ``cfg`` of a CLIP run: CLIP's view (ratio 1) and the run's ``clip.image_mean`` / ``image_std``."""
    mean, std, grayscale = eval_normalization(cfg, dataset)
    if resize_ratio is None:
        resize_ratio = 1.0 if dataset == "fashion_mnist" or is_clip(cfg) else 256 / 224
    return eval_transform(image_size, mean, std, resize_ratio=resize_ratio, grayscale_input=grayscale,
                          channels=input_channels(cfg))


def input_channels(cfg: Optional[TrainConfig]) -> int:
    """The channels a run's network takes (``model.in_chans``; 3 without a config)."""
    return int(cfg.model.in_chans) if cfg is not None else 3


def is_clip(cfg: Optional[TrainConfig]) -> bool:
    return cfg is not None and cfg.mode == "clip"


def eval_image_size(cfg: TrainConfig) -> int:
    """The side a run's network was trained at, which its evaluations use: ``model.img_size`` for
    CLIP (its only image size), the global crops' ``crops.global_crops_size`` for DINO."""
    return int(cfg.model.img_size if is_clip(cfg) else cfg.crops.global_crops_size)


def eval_normalization(cfg: Optional[TrainConfig], dataset: str) -> tuple[Any, Any, bool]:
    """Mean, std and grayscale-ness of the evaluation images: a CLIP run's own ``clip.image_mean`` /
    ``clip.image_std`` (whatever the dataset), else as DINO trains: ``data.mean`` / ``data.std``, or
    the dataset's."""
    mean, std, grayscale = normalization_for(dataset)
    if is_clip(cfg):
        return tuple(cfg.clip.image_mean), tuple(cfg.clip.image_std), grayscale
    if cfg is not None:
        return dino_normalization(cfg, dataset)
    return mean, std, grayscale


def dino_normalization(cfg: TrainConfig, dataset: Optional[str] = None) -> tuple[Any, Any, bool]:
    """A DINO run's mean, std (``data.mean`` / ``data.std``, else the dataset's) and grayscale-ness."""
    mean, std, grayscale = normalization_for(dataset or cfg.data.dataset)
    data = cfg.data
    return (tuple(data.mean) if data.mean else mean), (tuple(data.std) if data.std else std), grayscale


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy, loaded now (so the file behind a lazily opened image may be closed); 16-bit images
    scaled, transparency composited as :func:`dino_sparo.data.images.to_mode` does."""
    return to_mode(image, "RGB")


def probe_train_transform(dataset: str, image_size: int, scale: tuple[float, float] = (0.08, 1.0),
                          cfg: Optional[Any] = None) -> Any:
    """DINO's linear-probe training view: RandomResizedCrop + horizontal flip, then normalise as the
    evaluation transform does (a CLIP run's own mean and std; grayscale images become three equal
    channels)."""
    mean, std, grayscale = eval_normalization(cfg, dataset)
    channels = input_channels(cfg)
    steps: list[Any] = [transforms.Grayscale(num_output_channels=channels) if grayscale or channels == 1
                        else transforms.Lambda(to_rgb)]
    steps += [
        transforms.RandomResizedCrop(image_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(channel_values("mean", mean, channels), channel_values("std", std, channels)),
    ]
    return transforms.Compose(steps)


def clip_train_transform(size: int, scale: Sequence[float], mean: Sequence[float], std: Sequence[float],
                         ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Callable:
    """CLIP's training view: RandomResizedCrop (bicubic) at ``scale`` and aspect ``ratio``, nothing
    else (open_clip's). No horizontal flip, deliberately: a flipped image makes a caption that says
    "left of" false."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"config key 'clip.crop_scale' must be (low, high) with 0 < low <= high <= 1, got {scale}")
    return transforms.Compose([
        to_rgb,
        transforms.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio),
                                     interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(tuple(mean), tuple(std)),
    ])


def clip_eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """CLIP's evaluation view: resize the short side to ``size``, centre crop, normalise."""
    return eval_transform(size, mean, std, resize_ratio=1.0)


def device_multicrop_collate(batch: Sequence[tuple[tuple[Sequence[torch.Tensor], torch.Tensor], Any]]
                             ) -> tuple[list[torch.Tensor], Any, torch.Tensor]:
    """``[((uint8 crops, parameter rows), label), ...]`` (:class:`DeviceMultiCropTransform`) ->
    ``([crop_0 B × C × H × W uint8, ...], labels, parameters B × crops × len(PARAMS))``."""
    crops, labels = multicrop_collate([(crops, label) for (crops, _), label in batch])
    return crops, labels, torch.stack([rows for (_, rows), _ in batch])
