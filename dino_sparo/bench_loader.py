"""``dino-sparo-bench loader`` / ``tools/bench_loader.py``: images/s of DINO's multi-crop data pipeline
per CPU core, ours against the reference, on JPEGs made from real photographs.

Rows: the reference (DINO v1's ``DataAugmentationDINO``: torchvision v1 transforms on PIL images
after ``pil_loader``, written here after facebookresearch/dino's main_dino.py and utils.py), our
default pipeline (``data.augment_on: loader``: one decode, JPEG draft decoding where the crops need no
upsampling, the same PIL augmentations), and ``data.augment_on: device`` in its two halves: the
loader workers' (decode, crop, resize, flip, uint8) and the batched photometric ops, here on CPU
tensors (on a GPU they run on the device at the start of the step).

"Per core" is images per CPU-second of one single-threaded process (``time.process_time``), which a
busy shared machine disturbs far less than wall time; the rows alternate, repeat, and report
medians, so ratios within one run are the figures to compare. With ``--workers N`` a DataLoader of
N worker processes also gives wall-clock images/s.

:func:`gpu_feed_check` is the GPU check's step: model-bound images/s (synthetic crops), loader-bound
images/s (the machine's cores, real JPEGs) and the end-to-end training step, in both modes.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dino_sparo.data.batched_augment import augment_crops
from dino_sparo.data.images import open_image
from dino_sparo.data.transforms import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD,
                                        DeviceMultiCropTransform, MultiCropTransform, device_multicrop_collate,
                                        multicrop_collate)

# --------------------------------------------------------------------------------------------
# The reference: DINO v1's augmentation, as its code writes it
# --------------------------------------------------------------------------------------------


class ReferenceGaussianBlur:
    """DINO's ``utils.GaussianBlur``: PIL blur with probability p, radius uniform in [0.1, 2]."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        do_it = random.random() <= self.prob
        if not do_it:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class ReferenceSolarization:
    """DINO's ``utils.Solarization``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return ImageOps.solarize(img)
        return img


class DataAugmentationDINO:
    """DINO v1's ``DataAugmentationDINO`` (main_dino.py); the crop sides, fixed at 224 and 96 there,
    are arguments here so the demo's recipe has a reference too."""

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_size: int = 224, local_size: int = 96) -> None:
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                p=0.8
            ),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])
        bicubic = transforms.InterpolationMode.BICUBIC
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(global_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            ReferenceGaussianBlur(1.0),
            normalize,
        ])
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(global_size, scale=global_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            ReferenceGaussianBlur(0.1),
            ReferenceSolarization(0.2),
            normalize,
        ])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(local_size, scale=local_crops_scale, interpolation=bicubic),
            flip_and_color_jitter,
            ReferenceGaussianBlur(p=0.5),
            normalize,
        ])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        for _ in range(self.local_crops_number):
            crops.append(self.local_transfo(image))
        return crops


def pil_loader(path: str) -> Image.Image:
    """torchvision's ``ImageFolder`` loader, which DINO uses."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


# --------------------------------------------------------------------------------------------
# Recipes and photos
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    name: str
    global_size: int
    global_scale: tuple[float, float]
    local_size: int
    local_scale: tuple[float, float]
    local_number: int

    def describe(self) -> str:
        return (f"2×{self.global_size} at {self.global_scale[0]}–{self.global_scale[1]} + "
                f"{self.local_number}×{self.local_size} at {self.local_scale[0]}–{self.local_scale[1]}")


RECIPES = {
    # DINO's ViT-S/16 release: 2×224 at 0.25–1 and 10×96 at 0.05–0.25
    "release": Recipe("release", 224, (0.25, 1.0), 96, (0.05, 0.25), 10),
    # configs/dino/demo_fashion_mnist.yaml
    "demo": Recipe("demo", 28, (0.35, 1.0), 12, (0.1, 0.35), 2),
}
SIZES = {"imagenet": (500, 375), "large": (2000, 1500)}


def installed_photos() -> list[Path]:
    """Real photographs that ship inside installed packages: scikit-image's data, matplotlib's
    sample_data, Pillow's test images (each where installed)."""
    import importlib.util  # noqa: PLC0415

    found: list[Path] = []
    skimage_photos = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
    candidates = {"skimage": ("data", skimage_photos),
                  "matplotlib": ("mpl-data/sample_data", ("grace_hopper.jpg",)),
                  "PIL": ("../Tests/images", ("hopper.jpg",))}
    for package, (folder, names) in candidates.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0]) / folder
        found += [root / name for name in names if (root / name).is_file()]
    return found


def make_benchmark_jpegs(photos: Sequence[Path], out_dir: Path, size: tuple[int, int], copies: int = 8,
                         quality: int = 90) -> list[Path]:
    """``copies`` JPEGs of ``size`` from the photos: centre-cropped to the aspect ratio, resized
    (Lanczos), mirrored and framed tighter so that no two files are the same. Sources smaller than
    ``size`` are upsampled and get mild sensor-like noise (sigma 3 levels), so the files carry
    about the detail, and the JPEG bits, of a real photograph of that size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for index in range(copies):
        source = Image.open(photos[index % len(photos)]).convert("RGB")
        width, height = source.size
        variant = index // len(photos)  # of the same photo: mirrored every other, framed 4 % tighter every two
        target, tighter = size[0] / size[1], 1 - 0.04 * (variant // 2)
        crop_w, crop_h = (width, width / target) if width / height < target else (height * target, height)
        crop_w, crop_h = round(crop_w * tighter), round(crop_h * tighter)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        image = source.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.LANCZOS)
        if variant % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if size[0] > width:
            noisy = np.asarray(image, np.float32) + rng.normal(0, 3, (size[1], size[0], 3))
            image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
        path = out_dir / f"photo{index}_{size[0]}x{size[1]}.jpg"
        image.save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# The pipelines
# --------------------------------------------------------------------------------------------

# A pipeline: path -> what one sample yields to the collate function.
Pipeline = Callable[[str], Any]


def pipelines(recipe: Recipe, grayscale: bool = False) -> dict[str, Pipeline]:
    """The rows' load-and-augment functions of one recipe, each a whole sample from its source: a
    file path (decoded by each pipeline's own loader) or, for in-memory data (the demo's
    Fashion-MNIST), a PIL image (ours keep it one channel, the reference makes it RGB as DINO's loader)."""
    mean, std = ((FASHION_MNIST_MEAN, FASHION_MNIST_STD) if grayscale else (IMAGENET_MEAN, IMAGENET_STD))
    kw = dict(global_crops_size=recipe.global_size, local_crops_size=recipe.local_size,
              global_crops_scale=recipe.global_scale, local_crops_scale=recipe.local_scale,
              local_crops_number=recipe.local_number, mean=mean, std=std, grayscale_input=grayscale)
    reference = DataAugmentationDINO(recipe.global_scale, recipe.local_scale, recipe.local_number,
                                     recipe.global_size, recipe.local_size)
    ours, device = MultiCropTransform(**kw), DeviceMultiCropTransform(**kw)

    def load(item: Any, draft: Callable) -> Image.Image:
        return item if isinstance(item, Image.Image) else open_image(item, "RGB", draft=draft)

    return {
        REFERENCE_ROW: lambda item: reference(item.convert("RGB") if isinstance(item, Image.Image)
                                              else pil_loader(item)),
        "loader": lambda item: ours(load(item, ours.draft_size)),
        "device (loader half)": lambda item: device(load(item, device.draft_size)),
    }


def _item(item: Any) -> Any:
    return str(item) if isinstance(item, Path) else item


def _seeded(index: int) -> None:
    random.seed(index)
    torch.manual_seed(index)


def cpu_rate(pipeline: Pipeline, paths: Sequence[Path], images: int, start: int = 0) -> tuple[float, float]:
    """Images per CPU-second and per wall-second of ``pipeline`` in this (single-threaded) process."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(start, start + images):
        _seeded(i)
        pipeline(_item(paths[i % len(paths)]))
    return images / max(time.process_time() - cpu0, 1e-9), images / max(time.perf_counter() - wall0, 1e-9)


def device_half_rate(recipe: Recipe, items: Sequence[Any], batch: int, batches: int, grayscale: bool = False) -> float:
    """Images per CPU-second of the batched photometric ops on CPU tensors (``augment_crops``), on
    collated batches the loader half made (made before the clock starts)."""
    half = pipelines(recipe, grayscale)["device (loader half)"]
    samples = []
    for i in range(batch):
        _seeded(i)
        samples.append((half(_item(items[i % len(items)])), 0))
    crops, _, params = device_multicrop_collate(samples)
    mean, std = ((FASHION_MNIST_MEAN, FASHION_MNIST_STD) if grayscale else (IMAGENET_MEAN, IMAGENET_STD))
    kernel = DeviceMultiCropTransform(recipe.global_size, recipe.local_size, recipe.global_scale,
                                      recipe.local_scale, recipe.local_number).kernel_size
    cpu = torch.device("cpu")
    augment_crops(crops, params, mean, std, kernel, cpu)  # warm-up
    cpu0 = time.process_time()
    for _ in range(batches):
        augment_crops(crops, params, mean, std, kernel, cpu)
    return batch * batches / max(time.process_time() - cpu0, 1e-9)


class _Files(Dataset):
    """Paths through a pipeline, each sample seeded by its index (a DataLoader's dataset)."""

    def __init__(self, pipeline: Pipeline, paths: Sequence[Path], length: int) -> None:
        self.pipeline, self.paths, self.length = pipeline, [_item(p) for p in paths], length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        _seeded(index)
        return self.pipeline(self.paths[index % len(self.paths)]), 0


def loader_rate(pipeline: Pipeline, paths: Sequence[Path], workers: int, images: int, batch: int,
                collate: Callable) -> float:
    """Wall-clock images/s of a DataLoader of ``workers`` processes (started before the clock)."""
    loader = DataLoader(_Files(pipeline, paths, images), batch_size=batch, num_workers=workers, collate_fn=collate,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    iterator = iter(loader)
    next(iterator)  # the workers are up and the first batch is made
    start, seen = time.perf_counter(), 0
    for crops, *_ in iterator:
        seen += crops[0].shape[0]
    return seen / max(time.perf_counter() - start, 1e-9)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

REFERENCE_ROW = "reference"
DEVICE_ROWS = ("device (loader half)", "device ops (CPU tensors)", "device, both halves on one core")


def fashion_mnist_images(count: int) -> list[Image.Image]:
    """The demo's own images (Fashion-MNIST, 28×28 grey) as PIL images, as its dataset hands them over."""
    from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT, FashionMNIST  # noqa: PLC0415

    dataset = FashionMNIST(DEFAULT_FASHION_MNIST_ROOT, "train", limit=count)
    return [dataset[i][0] for i in range(len(dataset))]


def _median_rates(rows: dict[str, Pipeline], items: Sequence[Any], images: int, repeats: int
                  ) -> dict[str, tuple[float, float]]:
    """Median (per CPU-second, per wall-second) of each row over ``repeats`` alternating rounds."""
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    names = list(rows)
    for round_ in range(repeats):
        for name in (names if round_ % 2 == 0 else names[::-1]):  # alternate the order: load hits all alike
            rates[name].append(cpu_rate(rows[name], items, images, start=round_ * images))
    return {name: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for name, v in rates.items()}


def measure_recipe(recipe: Recipe, source: str, items: Sequence[Any], images: int, repeats: int, workers: int,
                   grayscale: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """The rows of one recipe on one set of sources (JPEG paths, or in-memory images for the demo)."""
    rows = pipelines(recipe, grayscale)
    log(f"{recipe.name} on {source}: {images} images × {repeats} rounds per row")
    rates = _median_rates(rows, items, images, repeats)
    half = rates["device (loader half)"][0]
    ops = device_half_rate(recipe, items, batch=32, batches=max(1, images // 32), grayscale=grayscale)
    rates["device ops (CPU tensors)"] = (ops, float("nan"))
    rates["device, both halves on one core"] = (1 / (1 / half + 1 / ops), float("nan"))
    reference = rates[REFERENCE_ROW][0]
    out = []
    for name, (per_core, wall) in rates.items():
        row = {"recipe": recipe.name, "source": source, "pipeline": name, "images_per_cpu_s": per_core,
               "images_per_wall_s": wall, "vs_reference": per_core / reference}
        if workers and name in rows:
            collate = device_multicrop_collate if name.startswith("device") else multicrop_collate
            length = max(images * 2, 8 * (2 + 4 * workers))  # beyond the first batches the workers prefetch
            row["workers_images_per_s"] = loader_rate(rows[name], items, workers, length, 8, collate)
        out.append(row)
    return out


def run_loader_benchmark(recipes: Sequence[str] = ("release", "demo"), sizes: Sequence[str] = ("imagenet", "large"),
                         images: int = 24, repeats: int = 3, workers: int = 0, photos: Optional[Sequence[Path]] = None,
                         workdir: Optional[Path] = None, log: Callable[[str], None] = print) -> dict:
    """All rows; the JPEGs are made once from ``photos`` (default: :func:`installed_photos`)."""
    import tempfile  # noqa: PLC0415

    torch.set_num_threads(1)
    photos = list(photos) if photos else installed_photos()
    if not photos:
        raise ValueError("no photographs in the installed packages (scikit-image, matplotlib, Pillow): "
                         "pass --photos with JPEG or PNG photographs")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="bench_loader_"))
    rows, files = [], {}
    for recipe_name in recipes:
        recipe = RECIPES[recipe_name]
        if recipe_name == "demo":
            rows += measure_recipe(recipe, "Fashion-MNIST 28×28", fashion_mnist_images(256), images * 4, repeats,
                                   workers, grayscale=True, log=log)
            continue
        for size_name in sizes:
            size = SIZES[size_name]
            if size_name not in files:
                files[size_name] = make_benchmark_jpegs(photos, workdir / size_name, size)
            bits = 8 * sum(p.stat().st_size for p in files[size_name]) / (len(files[size_name]) * size[0] * size[1])
            source = f"{size_name} JPEG {size[0]}×{size[1]} ({bits:.2f} bits/pixel)"
            rows += measure_recipe(recipe, source, files[size_name], images, repeats, workers, log=log)
    return {"rows": rows, "photos": [str(p) for p in photos], "workers": workers, "images": images,
            "repeats": repeats, "torch": torch.__version__, "pillow": Image.__version__}


def headline_ratio(figures: dict) -> Optional[float]:
    """``device (loader half)`` / ``reference`` images per CPU-second, release recipe, ImageNet size."""
    by = {(r["recipe"], r["source"].split()[0], r["pipeline"]): r for r in figures["rows"]}
    device, reference = by.get(("release", "imagenet", DEVICE_ROWS[0])), by.get(("release", "imagenet", REFERENCE_ROW))
    return None if device is None or reference is None else device["images_per_cpu_s"] / reference["images_per_cpu_s"]


def format_loader_report(figures: dict) -> str:
    workers = figures["workers"]
    head = f"{'recipe':8} {'source':44} {'pipeline':34} {'img/CPU-s':>9} {'img/wall-s':>10} {'× ref':>6}"
    head += f" {f'{workers} workers img/s':>17}" if workers else ""
    lines = [f"photos: {', '.join(Path(p).name for p in figures['photos'])}; torch {figures['torch']}, "
             f"Pillow {figures['pillow']}; one thread per process", head, "-" * len(head)]
    for r in figures["rows"]:
        wall = "" if math.isnan(r["images_per_wall_s"]) else f"{r['images_per_wall_s']:.1f}"
        line = (f"{r['recipe']:8} {r['source']:44} {r['pipeline']:34} {r['images_per_cpu_s']:9.1f} {wall:>10} "
                f"{r['vs_reference']:5.2f}×")
        if workers:
            line += f" {r['workers_images_per_s']:17.1f}" if "workers_images_per_s" in r else f" {'':>17}"
        lines.append(line)
    ratio = headline_ratio(figures)
    if ratio is not None:
        lines.append(f"device-augment / reference images/s per core (ImageNet-size JPEG): {ratio:.2f}×")
    return "\n".join(lines)



# --------------------------------------------------------------------------------------------
# The GPU check's step: is the GPU fed?
# --------------------------------------------------------------------------------------------

def _step_options(recipe: Recipe, batch: int, device: torch.device, arch: str, out_dim: int) -> Any:
    """dino-sparo-bench's options for :class:`dino_sparo.bench.OursStep` with ``recipe``'s crops."""
    from types import SimpleNamespace  # noqa: PLC0415

    return SimpleNamespace(arch=arch, patch_size=16 if recipe.global_size % 16 == 0 else 4, readout="sparo",
                           global_size=recipe.global_size, local_size=recipe.local_size, global_crops=2,
                           local_crops=recipe.local_number, batch=batch, out_dim=out_dim, precision="auto",
                           attn_backend="auto", pack_crops=False, compile=False, grad_checkpointing=False,
                           fused="auto", device=device.type, seed=0)


def _timed_steps(step: Callable[[Any, int], None], batches: Callable[[], Any], steps: int, warmup: int,
                 device: torch.device, batch: int) -> float:
    """Images/s of ``steps`` training steps after ``warmup`` untimed ones, each on ``batches()``."""
    from dino_sparo.bench import synchronize  # noqa: PLC0415

    for it in range(warmup):
        step(batches(), it)
    synchronize(device)
    start = time.perf_counter()
    for it in range(steps):
        step(batches(), warmup + it)
    synchronize(device)
    return steps * batch / max(time.perf_counter() - start, 1e-9)


def gpu_feed_check(device: str = "auto", recipe: str = "release", batch: int = 64, steps: int = 10,
                   warmup: int = 3, workers: Optional[int] = None, arch: str = "vit_small", out_dim: int = 65536,
                   photos: Optional[Sequence[Path]] = None, workdir: Optional[Path] = None,
                   log: Callable[[str], None] = print) -> dict:
    """Images/s of DINO training on this machine, in both ``data.augment_on`` modes: model-bound
    (the step on synthetic crops, nothing loaded), loader-bound (a DataLoader of ``workers``
    processes, default all cores but one, on ImageNet-size JPEGs from real photographs, the
    device mode's photometric half included on the device) and end-to-end (the loader feeding the
    step). The loader feeds the GPU where loader-bound ≥ model-bound; end-to-end shows what a run gets."""
    import tempfile  # noqa: PLC0415

    from dino_sparo.bench import OursStep  # noqa: PLC0415
    from dino_sparo.runtime import available_cores, resolve_device  # noqa: PLC0415
    from dino_sparo.train import train_step  # noqa: PLC0415

    dev, spec = resolve_device(device), RECIPES[recipe]
    workers = max(1, available_cores() - 1) if workers is None else workers
    photos = list(photos) if photos else installed_photos()
    if not photos:
        raise ValueError("no photographs in the installed packages: pass photos")
    files = make_benchmark_jpegs(photos, Path(workdir or tempfile.mkdtemp(prefix="feed_check_")), SIZES["imagenet"])
    figures: dict[str, Any] = {"device": str(dev), "recipe": spec.describe(), "batch": batch, "workers": workers,
                               "arch": arch}
    for mode in ("loader", "device"):
        ours = OursStep(_step_options(spec, batch, dev, arch, out_dim), dev, **{"data.augment_on": mode})
        method, collate = ours.method, (device_multicrop_collate if mode == "device" else multicrop_collate)
        rows = pipelines(spec)
        pipeline = rows["loader" if mode == "loader" else "device (loader half)"]
        sample = collate([(pipeline(str(files[i % len(files)])), 0) for i in range(batch)])
        synthetic = (sample if mode == "device" else
                     ([c.to(dev) for c in sample[0]], sample[1]))  # float crops already on the device

        def step(data: Any, it: int) -> None:
            train_step(method, data, it % 1000, 0, ours.schedules.at(it % 1000, 0), ours.optimizer, ours.scaler,
                       ours.params, ours.cfg.optim, ours.autocast_dtype)

        log(f"{mode}: model-bound ({steps} steps of {batch} on one batch of crops)")
        figures[f"{mode}_model_bound"] = _timed_steps(step, lambda: synthetic, steps, warmup, dev, batch)
        loader = DataLoader(_Files(pipeline, files, batch * (steps + warmup) * 2), batch_size=batch,
                            num_workers=workers, collate_fn=collate, pin_memory=dev.type == "cuda", drop_last=True)
        log(f"{mode}: loader-bound ({workers} workers)")
        iterator = iter(loader)

        def loaded() -> Any:
            data = next(iterator)
            if mode == "device":  # the photometric half runs on the device: part of feeding
                method.views(data)
            return data

        figures[f"{mode}_loader_bound"] = _timed_steps(lambda data, it: None, loaded, steps, warmup, dev, batch)
        log(f"{mode}: end to end")
        figures[f"{mode}_end_to_end"] = _timed_steps(step, lambda: next(iterator), steps, warmup, dev, batch)
        del iterator, loader, ours
    return figures


def format_feed_check(figures: dict) -> str:
    lines = [f"feeding check on {figures['device']}: {figures['arch']}, {figures['recipe']}, batch "
             f"{figures['batch']}, {figures['workers']} loader workers (images/s)",
             f"{'data.augment_on':16} {'model-bound':>12} {'loader-bound':>13} {'end to end':>11}"]
    for mode in ("loader", "device"):
        lines.append(f"{mode:16} {figures[f'{mode}_model_bound']:12.1f} {figures[f'{mode}_loader_bound']:13.1f} "
                     f"{figures[f'{mode}_end_to_end']:11.1f}")
    return "\n".join(lines)
