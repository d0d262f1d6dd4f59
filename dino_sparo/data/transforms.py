"""Multi-crop training views (DINO's augmentations), the evaluation transform, and the collate
function that turns per-image crop lists into per-crop batches.

The augmentations are those of facebookresearch/dino's `DataAugmentationDINO`, on PIL images, with
one extension: the Gaussian-blur radius (DINO: 0.1–2.0 px) is scaled by `global_crops_size / 224`,
so the ImageNet recipe is unchanged and 28-px images are not blurred into blobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import default_collate
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from dino_sparo.errors import ConfigError

from dino_sparo.data.images import to_mode

if TYPE_CHECKING:
    from dino_sparo.config import TrainConfig

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropTransform",
    "RandomGaussianBlur",
    "channel_values",
    "clip_eval_transform",
    "clip_train_transform",
    "dino_normalization",
    "eval_image_size",
    "eval_normalization",
    "eval_transform",
    "eval_transform_for",
    "input_channels",
    "is_clip",
    "multicrop_collate",
    "normalization_for",
    "probe_train_transform",
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


class _ToThreeChannels:
    """1 × H × W -> 3 × H × W, so grayscale images fit an RGB ViT."""

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat(3, 1, 1) if tensor.shape[0] == 1 else tensor

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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


def _to_tensor_and_normalise(mean: Sequence[float], std: Sequence[float], channels: int = 3) -> transforms.Compose:
    """ToTensor, grey images repeated to three channels unless the network takes one, Normalize."""
    mean_c, std_c = channel_values("mean", mean, channels), channel_values("std", std, channels)
    if any(s <= 0 for s in std_c):
        raise ValueError(f"'std' values must be > 0, got {std_c}")
    steps: list[Any] = [transforms.ToTensor()] + ([_ToThreeChannels()] if channels == 3 else [])
    return transforms.Compose(steps + [transforms.Normalize(mean_c, std_c)])


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
        if global_crops_number not in (1, 2):
            raise ValueError(f"'global_crops_number' must be 1 or 2 (DINO's two recipes), got {global_crops_number}")
        if local_crops_number < 0:
            raise ValueError(f"'local_crops_number' must be >= 0, got {local_crops_number}")
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"'{name}' must be (low, high) with 0 < low <= high <= 1, got {tuple(scale)}")
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

    def __call__(self, image: Any) -> list[torch.Tensor]:
        image = self.to_pil(image)
        crops = [t(image) for t in self.global_transforms]
        crops.extend(self.local_transform(image) for _ in range(self.local_crops_number))
        return crops

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(input={self.to_pil!r}, local_crops_number={self.local_crops_number},"]
        lines += [f"  global_{i + 1}={t!r}," for i, t in enumerate(self.global_transforms)]
        lines.append(f"  local={self.local_transform!r})")
        return "\n".join(lines)


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
