"""Multi-crop and evaluation transforms: crop counts and sizes, normalisation, grayscale input,
DINO's augmentation recipe, the collate function and the dataset constants."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from dino_sparo.data.transforms import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropTransform,
    RandomGaussianBlur,
    eval_transform,
    multicrop_collate,
    normalization_for,
)

FASHION_MNIST_TRAIN = Path(DEFAULT_FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz"


def _rgb_image(h=180, w=240, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _gray_image(size=28, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L")


@pytest.mark.parametrize(
    "global_size,local_size,n_local,image",
    [(224, 96, 8, _rgb_image()), (28, 12, 6, _rgb_image(28, 28)), (32, 16, 0, _rgb_image(40, 30))],
)
def test_crop_counts_and_sizes(global_size, local_size, n_local, image):
    torch.manual_seed(0)
    t = MultiCropTransform(global_size, local_size, local_crops_number=n_local)
    crops = t(image)
    assert len(crops) == 2 + n_local
    for crop in crops[:2]:
        assert crop.shape == (3, global_size, global_size) and crop.dtype == torch.float32
    for crop in crops[2:]:
        assert crop.shape == (3, local_size, local_size)


def test_values_are_normalised_with_the_given_statistics():
    torch.manual_seed(1)
    raw = MultiCropTransform(64, 32, local_crops_number=3, mean=(0.0,), std=(1.0,))(_rgb_image())
    for crop in raw:
        assert crop.min() >= 0.0 and crop.max() <= 1.0  # ToTensor range before normalising
    torch.manual_seed(1)
    normed = MultiCropTransform(64, 32, local_crops_number=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)(_rgb_image())
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    for r, n in zip(raw, normed):
        torch.testing.assert_close(n, (r - mean) / std)


def test_grayscale_input_gives_three_equal_channels():
    torch.manual_seed(2)
    t = MultiCropTransform(28, 12, local_crops_number=4, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                           grayscale_input=True)
    for crop in t(_gray_image()):
        assert crop.shape[0] == 3
        torch.testing.assert_close(crop[0], crop[1])
        torch.testing.assert_close(crop[0], crop[2])
    # numpy arrays and uint8 tensors, as some datasets return them, work too
    array = np.array(_gray_image())
    assert len(t(array)) == 6 and len(t(torch.from_numpy(array))) == 6


def test_grayscale_path_matches_rgb_path_on_a_gray_image():
    """One channel through the same augmentations equals three equal channels (up to rounding)."""
    gray = _gray_image(48)
    kw = dict(global_crops_size=32, local_crops_size=16, local_crops_number=3, mean=(0.0,), std=(1.0,))
    for seed in range(5):
        torch.manual_seed(seed)
        one = MultiCropTransform(**kw, grayscale_input=True)(gray)
        torch.manual_seed(seed)
        three = MultiCropTransform(**kw, grayscale_input=False)(gray.convert("RGB"))
        for a, b in zip(one, three):
            torch.testing.assert_close(a, b, atol=2 / 255, rtol=0)


def test_rgb_model_input_from_grayscale_image_without_flag():
    crops = MultiCropTransform(28, 12, local_crops_number=2)(_gray_image())
    assert all(c.shape[0] == 3 for c in crops)


def test_dino_recipe():
    t = MultiCropTransform()

    def find(compose, kind):
        """Every step of type `kind`, looking inside nested Compose and RandomApply."""
        found = []
        for step in compose.transforms:
            if isinstance(step, kind):
                found.append(step)
            if isinstance(step, (transforms.Compose, transforms.RandomApply)):
                found += find(step, kind)
        return found

    g1, g2 = t.global_transforms
    for compose, size, scale in ((g1, 224, (0.4, 1.0)), (g2, 224, (0.4, 1.0)), (t.local_transform, 96, (0.05, 0.4))):
        (crop,) = find(compose, transforms.RandomResizedCrop)
        assert crop.size == (size, size) and crop.scale == scale
        assert crop.interpolation == transforms.InterpolationMode.BICUBIC
        (apply,) = find(compose, transforms.RandomApply)
        assert apply.p == 0.8
        (jitter,) = find(apply, transforms.ColorJitter)
        assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
        assert jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)
        (gray,) = find(compose, transforms.RandomGrayscale)
        assert gray.p == 0.2
        (flip,) = find(compose, transforms.RandomHorizontalFlip)
        assert flip.p == 0.5
    blur_p = [find(c, RandomGaussianBlur)[0].p for c in (g1, g2, t.local_transform)]
    assert blur_p == [1.0, 0.1, 0.5]
    assert (find(g1, RandomGaussianBlur)[0].radius_min, find(g1, RandomGaussianBlur)[0].radius_max) == (0.1, 2.0)
    assert find(g1, transforms.RandomSolarize) == [] and find(t.local_transform, transforms.RandomSolarize) == []
    (solarize,) = find(g2, transforms.RandomSolarize)
    assert solarize.p == 0.2 and solarize.threshold == 128


def test_blur_radius_scales_with_crop_size():
    small = MultiCropTransform(28, 12, local_crops_number=1)
    blur = small.global_transforms[0].transforms[2]
    assert isinstance(blur, RandomGaussianBlur)
    assert blur.radius_min == pytest.approx(0.1 * 28 / 224) and blur.radius_max == pytest.approx(2.0 * 28 / 224)


def test_blur_probability_and_effect():
    image = _rgb_image(32, 32)
    torch.manual_seed(0)
    assert RandomGaussianBlur(0.0)(image) is image
    blurred = np.asarray(RandomGaussianBlur(1.0, 1.5, 1.5)(image), dtype=np.float64)
    # blurring smooths neighbouring pixels of a noise image
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.5 * np.abs(np.diff(np.asarray(image, np.float64), axis=1)).mean()


def test_transform_is_picklable_for_worker_processes():
    t = MultiCropTransform(28, 12, local_crops_number=2, grayscale_input=True)
    clone = pickle.loads(pickle.dumps(t))
    assert len(clone(_gray_image())) == 4


@pytest.mark.parametrize("size,ratio,image", [(224, 256 / 224, _rgb_image(300, 260)), (28, 1.0, _gray_image())])
def test_eval_transform_resizes_and_centre_crops(size, ratio, image):
    t = eval_transform(size, (0.0,), (1.0,), resize_ratio=ratio)
    out = t(image)
    assert out.shape == (3, size, size)
    assert out.min() >= 0 and out.max() <= 1
    again = t(image)
    torch.testing.assert_close(out, again)  # deterministic
    if ratio == 1.0:  # same size in and out: the pixels are the image's own
        expected = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
        torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)


def test_eval_transform_grayscale_normalisation():
    t = eval_transform(28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, resize_ratio=1.0, grayscale_input=True)
    out = t(_gray_image())
    raw = torch.from_numpy(np.asarray(_gray_image(), dtype=np.float32) / 255)
    torch.testing.assert_close(out, ((raw - 0.2860) / 0.3530).expand(3, -1, -1), atol=1e-5, rtol=0)


def test_multicrop_collate_through_a_dataloader():
    t = MultiCropTransform(28, 12, local_crops_number=3, grayscale_input=True)
    dataset = [(t(_gray_image(seed=i)), i % 10) for i in range(5)]
    crops, labels = next(iter(DataLoader(dataset, batch_size=4, collate_fn=multicrop_collate)))
    assert len(crops) == 5
    assert [tuple(c.shape) for c in crops] == [(4, 3, 28, 28)] * 2 + [(4, 3, 12, 12)] * 3
    torch.testing.assert_close(crops[3][2], dataset[2][0][3])
    assert labels.tolist() == [0, 1, 2, 3]


def test_multicrop_collate_rejects_ragged_crop_lists():
    with pytest.raises(ValueError, match="item 1 has 2 crops"):
        multicrop_collate([([torch.zeros(3, 4, 4)] * 3, 0), ([torch.zeros(3, 4, 4)] * 2, 1)])


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="local_crops_scale"):
        MultiCropTransform(local_crops_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="mean"):
        MultiCropTransform(mean=(0.1, 0.2))
    with pytest.raises(TypeError, match="list"):
        MultiCropTransform(28, 12)([1, 2, 3])


@pytest.mark.skipif(not FASHION_MNIST_TRAIN.exists(), reason="Fashion-MNIST not installed (tools/get_fashion_mnist.sh)")
def test_fashion_mnist_constants_match_the_training_set():
    with gzip.open(FASHION_MNIST_TRAIN) as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    counts = np.bincount(pixels, minlength=256).astype(np.float64)
    values = np.arange(256) / 255
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert FASHION_MNIST_MEAN == (pytest.approx(mean, abs=1e-4),) * 3
    assert FASHION_MNIST_STD == (pytest.approx(std, abs=1e-4),) * 3


def test_normalization_for_dataset_names():
    assert normalization_for("fashion_mnist") == (FASHION_MNIST_MEAN, FASHION_MNIST_STD, True)
    assert normalization_for("imagefolder") == (IMAGENET_MEAN, IMAGENET_STD, False)


def test_colour_augmentation_strength_and_grey_probability_are_settable():
    def steps(compose, kind):
        return [s for s in compose.transforms[1].transforms if isinstance(s, kind)]  # flip and colour

    half = MultiCropTransform(28, 12, local_crops_number=1, color_jitter_strength=0.5, grayscale_prob=0.0)
    (apply,) = steps(half.global_transforms[0], transforms.RandomApply)
    jitter = apply.transforms[0]
    assert apply.p == 0.8 and jitter.brightness == (0.8, 1.2) and jitter.saturation == (0.9, 1.1)
    assert jitter.hue == (-0.05, 0.05)
    assert steps(half.global_transforms[0], transforms.RandomGrayscale)[0].p == 0.0
    off = MultiCropTransform(28, 12, local_crops_number=1, color_jitter_strength=0.0)
    assert steps(off.local_transform, transforms.RandomApply)[0].p == 0.0


def test_one_channel_transforms_give_one_channel_with_per_channel_statistics():
    rgb = _rgb_image(64, 64)
    crops = MultiCropTransform(28, 12, local_crops_number=2, mean=[0.5], std=[0.25], channels=1)(rgb)
    assert [c.shape[0] for c in crops] == [1, 1, 1, 1]
    evaluated = eval_transform(28, [0.5], [0.25], resize_ratio=1.0, channels=1)(rgb)
    grey = np.asarray(rgb.convert("L").resize((28, 28), Image.BICUBIC), dtype=np.float32) / 255
    assert evaluated.shape == (1, 28, 28)
    assert torch.allclose(evaluated[0], (torch.from_numpy(grey) - 0.5) / 0.25, atol=1e-5)


def _constant_folder(root: Path, value: int = 100) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_normalisation_keys_reach_dino_training_and_evaluation_views(tmp_path):
    from conftest import TINY_MODEL
    from dino_sparo.config import load_config
    from dino_sparo.data.transforms import eval_transform_for
    from dino_sparo.methods import build_method

    folder = _constant_folder(tmp_path / "images")
    cfg = load_config(None, [*TINY_MODEL, f"data.path={folder}", "data.mean=[0.5,0.25,0.125]",
                             "data.std=[0.25,0.5,1.0]", "crops.color_jitter_strength=0", "crops.grayscale_prob=0",
                             f"output_dir={tmp_path / 'run'}"])
    expected = (100 / 255 - torch.tensor([0.5, 0.25, 0.125])) / torch.tensor([0.25, 0.5, 1.0])
    crops, _ = build_method(cfg, torch.device("cpu")).train_dataset()[0]
    for crop in crops:  # a constant image stays constant through crops, flips, blur and solarisation (< 128)
        assert torch.allclose(crop.mean(dim=(1, 2)), expected, atol=1e-4) and crop.std(dim=(1, 2)).max() < 1e-4
    view = eval_transform_for("imagefolder", 28, cfg=cfg)(Image.open(folder / "a" / "0.png"))
    assert torch.allclose(view.mean(dim=(1, 2)), expected, atol=1e-4)


@pytest.mark.skipif(not FASHION_MNIST_TRAIN.is_file(), reason="needs Fashion-MNIST")
def test_a_one_channel_vit_trains_evaluates_and_draws(tmp_path):
    """model.in_chans: 1 end to end: training with k-NN during it, k-NN afterwards, the picture."""
    from conftest import TINY_TRAINING
    from dino_sparo.config import load_config
    from dino_sparo.evaluation.api import evaluate_checkpoint
    from dino_sparo.train import train
    from dino_sparo.visualize import visualize_checkpoint

    out = tmp_path / "run"
    metrics = train(load_config(None, [*TINY_TRAINING, "model.in_chans=1", "data.mean=[0.286]", "data.std=[0.353]",
                                       "optim.epochs=1", "eval.knn_every=1", "eval.knn_train_limit=100",
                                       "eval.knn_test_limit=50", f"output_dir={out}"]))
    assert np.isfinite(metrics["loss"]) and 0.0 <= metrics["knn_top1"] <= 1.0
    checkpoint = out / "checkpoint.pth"
    result = evaluate_checkpoint("knn", checkpoint, train_limit=100, test_limit=50, ks=(5,), cache_dir=tmp_path / "c")
    assert result["num_test"] == 50 and result["feature_dim"] == 32
    assert result["knn"]["5"]["top1"] > 0.2  # features of one-channel inputs, above chance (0.1)
    drawn = visualize_checkpoint(checkpoint, [0, 1], tmp_path / "slots.png", num_slots=2)
    assert Image.open(drawn["image_png"]).size[0] > 0
