"""``data.augment_on: device``: each batched op against torchvision's functional op on the same image
with the same parameter, the drawn parameters against DINO's distributions, the loader half (crop
boxes, JPEG draft decoding) against torchvision's RandomResizedCrop and the full decode."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from dino_sparo.data import batched_augment as ba
from dino_sparo.data.images import FULL_SIZE_KEY, open_image
from dino_sparo.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, DeviceMultiCropTransform, MultiCropTransform,
                                        device_multicrop_collate, image_tensor, jpeg_draft_scale,
                                        random_resized_crop_box, resized_crop, resized_crop_tensor)

# float32 ops in a different association order than torchvision's: a few ulps of [0, 1]
ATOL = 2e-6


def _images(batch: int = 6, channels: int = 3, size: int = 20, seed: int = 0) -> torch.Tensor:
    """Smooth colour gradients plus noise: every op has something to change, values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = (ramp.view(1, 1, -1, 1) * torch.rand(batch, channels, 1, 1, generator=g)
            + ramp.view(1, 1, 1, -1) * torch.rand(batch, channels, 1, 1, generator=g)) / 2
    return (base + 0.2 * torch.rand(batch, channels, size, size, generator=g)).clamp(0, 1)


def _factors(low: float, high: float, n: int = 6) -> torch.Tensor:
    return torch.linspace(low, high, n)


@pytest.mark.parametrize("op,reference,low,high", [
    (ba.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (ba.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (ba.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
    (ba.adjust_hue, TF.adjust_hue, -0.1, 0.1),
])
@pytest.mark.parametrize("channels", [3, 1])
def test_each_jitter_op_equals_torchvision(op, reference, low, high, channels):
    x, factors = _images(channels=channels), _factors(low, high)
    if channels == 1 and reference is TF.adjust_hue:
        expected = x  # torchvision refuses hue on one channel; ours leaves it unchanged, as PIL does on 'L'
    else:
        expected = torch.stack([reference(img, float(f)) for img, f in zip(x, factors)])
    torch.testing.assert_close(op(x, factors), expected, atol=ATOL, rtol=0)


def test_hue_over_the_whole_circle_and_grey_pixels():
    x = torch.cat([_images(4), torch.full((2, 3, 20, 20), 0.5)])  # grey: hue undefined
    factors = torch.tensor([-0.5, -0.25, 0.3, 0.5, 0.1, -0.1])
    expected = torch.stack([TF.adjust_hue(img, float(f)) for img, f in zip(x, factors)])
    torch.testing.assert_close(ba.adjust_hue(x, factors), expected, atol=ATOL, rtol=0)


def test_grayscale_and_solarize_equal_torchvision():
    x = _images()
    torch.testing.assert_close(ba.to_grayscale(x), TF.rgb_to_grayscale(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(ba.solarize(x), TF.solarize(x, 128 / 255), atol=0, rtol=0)


@pytest.mark.parametrize("sigma_max,size", [(2.0, 32), (0.25, 12)])
def test_blur_equals_torchvision_gaussian_blur(sigma_max, size):
    x = _images(size=size)
    k = ba.blur_kernel_size(sigma_max)
    assert k % 2 == 1 and (k - 1) / 2 >= 3 * sigma_max  # holds ±3 sigma of the widest blur
    sigmas = torch.linspace(0.1 * sigma_max / 2, sigma_max, x.shape[0])
    expected = torch.stack([TF.gaussian_blur(img, [k, k], [float(s), float(s)]) for img, s in zip(x, sigmas)])
    torch.testing.assert_close(ba.gaussian_blur(x, sigmas, k), expected, atol=1e-5, rtol=0)


def _reference_photometric(image: torch.Tensor, row: torch.Tensor, k: int) -> torch.Tensor:
    """One image through torchvision's functional ops, in the row's order, then normalised."""
    p = dict(zip(ba.PARAMS, row.tolist()))
    x = image.float() / 255
    if p["jitter"]:
        ops = {0: lambda y: TF.adjust_brightness(y, p["brightness"]), 1: lambda y: TF.adjust_contrast(y, p["contrast"]),
               2: lambda y: TF.adjust_saturation(y, p["saturation"]), 3: lambda y: TF.adjust_hue(y, p["hue"])}
        for position in range(4):
            x = ops[int(p[f"order{position}"])](x)
    if p["grayscale"]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p["sigma"] > 0:
        x = TF.gaussian_blur(x, [k, k], [p["sigma"], p["sigma"]])
    if p["solarize"]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def test_whole_batch_equals_torchvision_image_by_image():
    torch.manual_seed(3)
    crops = (torch.rand(48, 3, 24, 24) * 255).to(torch.uint8)
    rows = torch.stack([ba.draw_photometric(0.5, (0.1, 2.0), 0.5) for _ in range(48)])
    assert rows[:, ba.PARAMS.index("jitter")].sum() > 20 and (rows[:, ba.PARAMS.index("sigma")] > 0).sum() > 10
    k = ba.blur_kernel_size(2.0)
    out = ba.apply_photometric(crops, rows, IMAGENET_MEAN, IMAGENET_STD, k)
    expected = torch.stack([_reference_photometric(c, r, k) for c, r in zip(crops, rows)])
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=0)  # normalised: ulps of [0, 1] / std


def test_augment_crops_keeps_crop_order_and_runs_outside_autocast():
    t = DeviceMultiCropTransform(32, 16, local_crops_number=3)
    images = [Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)) for i in range(4)]
    torch.manual_seed(0)
    crops, labels, params = device_multicrop_collate([(t(im), i) for i, im in enumerate(images)])
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3 and params.shape == (4, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ba.augment_crops(crops, params, t.mean, t.std, t.kernel_size, torch.device("cpu"))
    assert all(o.dtype == torch.float32 for o in out)
    for crop_index, sample in itertools.product(range(5), range(4)):
        alone = ba.apply_photometric(crops[crop_index][sample:sample + 1], params[sample, crop_index:crop_index + 1],
                                     t.mean, t.std, t.kernel_size)
        torch.testing.assert_close(out[crop_index][sample:sample + 1], alone, atol=1e-6, rtol=0)


def test_grayscale_data_stays_one_channel_until_normalised():
    t = DeviceMultiCropTransform(28, 12, local_crops_number=2, mean=(0.286,), std=(0.353,), grayscale_input=True)
    crops, rows = t(Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)))
    assert all(c.shape[0] == 1 and c.dtype == torch.uint8 for c in crops)
    out = ba.apply_photometric(torch.stack(crops[2:]), rows[2:], t.mean, t.std, t.kernel_size)
    assert out.shape == (2, 3, 12, 12) and torch.equal(out[:, 0], out[:, 2])


# ------------------------------------------------------------------------------ the distributions

def _rows(n: int, blur_p: float, solarize_p: float) -> torch.Tensor:
    torch.manual_seed(12345)
    return torch.stack([ba.draw_photometric(blur_p, (0.1, 2.0), solarize_p) for _ in range(n)])


def _within(count: float, n: int, p: float) -> bool:
    """An observed count within 5 standard deviations of a binomial's mean (false alarm < 1e-6)."""
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


def _uniform_ks(values: torch.Tensor, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance of the values to uniform(low, high)."""
    u = ((values.double() - low) / (high - low)).sort().values
    n = len(u)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(grid - u, u - (grid - 1 / n)).max())


@pytest.mark.parametrize("blur_p,solarize_p", [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)])  # DINO's three crop kinds
def test_drawn_parameters_follow_dinos_distributions(blur_p, solarize_p):
    n = 4000
    rows = _rows(n, blur_p, solarize_p)
    col = {name: rows[:, i] for i, name in enumerate(ba.PARAMS)}
    assert _within(col["jitter"].sum(), n, 0.8)
    assert _within(col["grayscale"].sum(), n, 0.2)
    assert _within((col["sigma"] > 0).sum(), n, blur_p)
    assert _within(col["solarize"].sum(), n, solarize_p)
    ks_limit = 1.95 / math.sqrt(n)  # KS critical value at 0.1 %
    for name, (low, high) in {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2),
                              "hue": (-0.1, 0.1)}.items():
        assert col[name].min() >= low and col[name].max() <= high
        assert _uniform_ks(col[name], low, high) < ks_limit, name
    sigma = col["sigma"][col["sigma"] > 0]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and _uniform_ks(sigma, 0.1, 2.0) < 1.95 / math.sqrt(len(sigma))
    orders = rows[:, ba.PARAMS.index("order0"):ba.PARAMS.index("order3") + 1].long()
    assert all(sorted(o.tolist()) == [0, 1, 2, 3] for o in orders)
    counts = {}
    for o in orders.tolist():
        counts[tuple(o)] = counts.get(tuple(o), 0) + 1
    assert len(counts) == 24 and all(_within(c, n, 1 / 24) for c in counts.values())


def test_flips_and_crop_kinds_of_the_loader_half():
    t = DeviceMultiCropTransform(32, 16, global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25),
                                 local_crops_number=10)
    assert [v[2:] for v in t.views] == [(1.0, 0.0), (0.1, 0.2)] + [(0.5, 0.0)] * 10  # blur p, solarise p
    image = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3)))  # left dark
    flips = []
    torch.manual_seed(0)
    for _ in range(200):
        crops, _ = t(image)
        flips.append(float(crops[0][0, 0, 0]) > float(crops[0][0, 0, -1]))
    assert _within(sum(flips), 200, 0.5)


# ------------------------------------------------------------------------------- the loader half

@pytest.mark.parametrize("width,height,scale", [(500, 375, (0.25, 1.0)), (37, 200, (0.05, 0.25)),
                                                (1000, 20, (0.9, 1.0)), (64, 64, (0.08, 1.0))])
def test_crop_box_draws_as_torchvision(width, height, scale):
    image = Image.new("RGB", (width, height))
    for seed in range(50):
        torch.manual_seed(seed)
        expected = transforms.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        assert random_resized_crop_box(width, height, scale) == tuple(expected)


def test_loader_pipeline_unchanged_on_full_decodes():
    """The default path crops by :func:`random_resized_crop_box`: on a full decode it gives exactly
    what its torchvision pipelines (RandomResizedCrop first) give."""
    t = MultiCropTransform(64, 32, local_crops_number=3)
    image = Image.fromarray((np.random.default_rng(1).random((90, 120, 3)) * 255).astype(np.uint8))
    torch.manual_seed(7)
    ours = t(image)
    torch.manual_seed(7)
    theirs = [c(image) for c in t.global_transforms] + [t.local_transform(image) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def _photo_jpeg(width: int, height: int) -> bytes:
    """A smooth synthetic photo-like picture, JPEG-encoded (what matters here is the codec)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(9 * x) * 0.5 + 0.5, np.cos(7 * y) * 0.5 + 0.5, (x + y) / 2], -1)
    buffer = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def test_draft_scale_keeps_the_crops_from_upsampling():
    release = [(224, 0.25), (96, 0.05)]
    assert jpeg_draft_scale(500, 375, release) == 1  # ImageNet size: the small locals already upsample
    assert jpeg_draft_scale(2000, 1500, release) == 2
    assert jpeg_draft_scale(8000, 6000, release) == 8
    for width, height in ((2000, 1500), (3000, 800), (700, 5000)):
        reduction = jpeg_draft_scale(width, height, release)
        for side, low in release:  # the smallest region of each crop kind, after the reduction
            assert math.sqrt(low * width * height * 3 / 4) / reduction >= side


def test_draft_decoded_crops_match_the_full_decode(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_photo_jpeg(1600, 1200))
    t = MultiCropTransform(224, 96, global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25),
                           local_crops_number=4)
    drafted = open_image(str(path), "RGB", draft=t.draft_size)
    full = open_image(str(path), "RGB")
    assert drafted.size == (800, 600) and drafted.info[FULL_SIZE_KEY] == (1600, 1200) and full.size == (1600, 1200)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for seed in range(3):
        torch.manual_seed(seed)
        a = t(drafted)
        torch.manual_seed(seed)
        b = t(full)
        for x, y in zip(a, b):  # same region, same augmentation: pixels within a few levels of 255
            diff = ((x - y) * std).abs()
            assert diff.mean() < 4 / 255 and diff.max() < 0.25


@pytest.mark.parametrize("mode,side,scale", [("RGB", 64, (0.25, 1.0)), ("RGB", 24, (0.05, 0.25)),
                                             ("L", 28, (0.35, 1.0))])
def test_tensor_crops_are_pils_within_one_level(mode, side, scale):
    """The device path's loader half resamples with torch's antialiased bicubic: the same boxes as
    the PIL path, the same filter, within one level of 255 (rounding)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:90, 0:120]
    smooth = np.stack([np.sin(x / 9), np.cos(y / 7), np.sin((x + y) / 13)], -1) * 100 + 128
    image = Image.fromarray((smooth + rng.normal(0, 10, smooth.shape)).clip(0, 255).astype(np.uint8)).convert(mode)
    pixels = image_tensor(image)
    for seed in range(10):
        torch.manual_seed(seed)
        ours = resized_crop_tensor(pixels, image.size, side, scale)
        torch.manual_seed(seed)
        theirs = torch.from_numpy(np.array(resized_crop(image, side, scale)))
        theirs = theirs.unsqueeze(0) if theirs.dim() == 2 else theirs.permute(2, 0, 1)
        assert ours.dtype == torch.uint8 and ours.shape == theirs.shape
        assert (ours.int() - theirs.int()).abs().max() <= 1


def test_device_loader_half_on_a_draft_decode_matches_the_full_decode(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_photo_jpeg(1600, 1200))
    t = DeviceMultiCropTransform(224, 96, global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25),
                                 local_crops_number=4)
    drafted, full = open_image(str(path), "RGB", draft=t.draft_size), open_image(str(path), "RGB")
    assert drafted.size == (800, 600)
    for seed in range(3):
        torch.manual_seed(seed)
        a, rows_a = t(drafted)
        torch.manual_seed(seed)
        b, rows_b = t(full)
        assert torch.equal(rows_a, rows_b)  # the same draws
        for x, y in zip(a, b):
            assert (x.float() - y.float()).abs().mean() < 4


def test_device_augmentation_is_dino_mode_only():
    from dino_sparo.config import ConfigError, load_config

    load_config(None, ["data.augment_on=device"])
    with pytest.raises(ConfigError, match="'data.augment_on' must be 'loader' in CLIP mode"):
        load_config(None, ["mode=clip", "data.augment_on=device"])
    with pytest.raises(ConfigError, match="data.augment_on"):
        load_config(None, ["data.augment_on=gpu"])


@pytest.mark.parametrize("override, key", [("crops.color_jitter_strength=0.5", "crops.color_jitter_strength"),
                                           ("crops.grayscale_prob=0.0", "crops.grayscale_prob"),
                                           ("model.in_chans=1", "model.in_chans"),
                                           ("ibot.loss_weight=1.0", "data.augment_on")])
def test_device_augmentation_refuses_what_its_batched_ops_do_not_follow(override, key):
    """The batched ops follow DINO's colour recipe on three channels and carry no iBOT masks: a config
    asking for more is refused at load, naming the key; with the loader it loads."""
    from dino_sparo.config import ConfigError, load_config

    load_config(None, [override])
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, ["data.augment_on=device", override])


def test_ops_on_every_image_then_on_some():
    """An op chosen for the whole batch, then one for part of it (the in-place path after the whole-batch one)."""
    torch.manual_seed(5)
    crops = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8)
    rows = torch.stack([ba.draw_photometric(0.5, (0.1, 2.0), 0.0) for _ in range(6)])
    col = {name: i for i, name in enumerate(ba.PARAMS)}
    rows[:, col["jitter"]], rows[:, col["grayscale"]] = 0, 1
    rows[:, col["sigma"]] = torch.tensor([0.0, 1.0, 0.0, 1.5, 0.0, 0.5])
    rows[:, col["solarize"]] = torch.tensor([1.0, 0, 0, 1, 1, 0])
    k = ba.blur_kernel_size(2.0)
    out = ba.apply_photometric(crops, rows, IMAGENET_MEAN, IMAGENET_STD, k)
    expected = torch.stack([_reference_photometric(c, r, k) for c, r in zip(crops, rows)])
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_default_normalisation_is_torchvisions_to_the_bit(mode):
    from dino_sparo.data.transforms import _to_tensor_and_normalise

    image = Image.fromarray((np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)).convert(mode)
    theirs = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = theirs(image.convert("RGB") if mode == "L" else image)  # L -> RGB repeats the channel
    assert torch.equal(_to_tensor_and_normalise(IMAGENET_MEAN, IMAGENET_STD)(image), expected)
