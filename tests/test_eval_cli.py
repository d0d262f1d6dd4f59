"""dino-sparo-knn end to end on a checkpoint from the real training program, against k-NN and
features computed here; checkpoint loading, baselines, slot options and the feature cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dino_sparo.checkpoint import load_checkpoint, save_checkpoint
from dino_sparo.data.datasets import FashionMNIST
from dino_sparo.data.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD, eval_transform
from dino_sparo.cli import knn as knn_cli
from dino_sparo.evaluation import knn as knn_protocol
from dino_sparo.evaluation.api import knn_from_checkpoint, linear_from_checkpoint
from dino_sparo.evaluation.options import Extraction
from dino_sparo.models.build import load_backbone_from_checkpoint
from dino_sparo.models.vit import VisionTransformer

from tiny_checkpoint import NUM_SLOTS, SLOT_DIM

TRAIN_LIMIT, TEST_LIMIT = 200, 60
KS = (5, 20)


@pytest.fixture(scope="module")
def images():
    """The class-balanced subsets the CLI's limits select, as model inputs (N × 3 × 28 × 28) and labels."""
    transform = eval_transform(28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, resize_ratio=1.0, grayscale_input=True)
    out = {}
    for split, limit in (("train", TRAIN_LIMIT), ("test", TEST_LIMIT)):
        ds = FashionMNIST(split=split, limit=limit, transform=transform)
        out[split] = (torch.stack([ds[i][0] for i in range(len(ds))]), np.asarray(ds.targets))
    return out


def reference_knn(train_x, train_y, test_x, test_y, ks, temperature=0.07, num_classes=10):
    """Cosine similarities, the k largest, exp(sim / T) votes: top-1 / top-5 accuracy, in float64 numpy."""
    a = np.asarray(train_x, np.float64)
    b = np.asarray(test_x, np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    sims = b @ a.T
    order = np.argsort(-sims, axis=1, kind="stable")
    out = {}
    for k in ks:
        scores = np.zeros((len(b), num_classes))
        for i in range(len(b)):
            for j in order[i, :k]:
                scores[i, train_y[j]] += np.exp(sims[i, j] / temperature)
        ranked = np.argsort(-scores, axis=1, kind="stable")
        out[str(k)] = {"top1": float(np.mean(ranked[:, 0] == test_y)),
                       "top5": float(np.mean((ranked[:, :5] == test_y[:, None]).any(1)))}
    return out


def run_knn(checkpoint, tmp_path, *extra, name="knn.json"):
    out = tmp_path / name
    knn_cli.main(["--checkpoint", str(checkpoint), "--train-limit", str(TRAIN_LIMIT), "--test-limit", str(TEST_LIMIT),
                  "--ks", ",".join(map(str, KS)), "--num-workers", "0", "--batch-size", "64", "--backend", "torch",
                  "--quiet", "--output-json", str(out), *extra])
    return json.loads(out.read_text())


def assert_same_accuracy(got, expected):
    assert set(got) == set(expected)
    for k in expected:
        for metric in ("top1", "top5"):
            assert got[k][metric] == pytest.approx(expected[k][metric], abs=1.5 / TEST_LIMIT), (k, metric)


# --------------------------------------------------------------------------- checkpoint loading


def test_load_backbone_from_checkpoint_is_strict_frozen_and_in_eval_mode(checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    backbone, cfg = load_backbone_from_checkpoint(checkpoint, "teacher")
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert cfg.model.sparo.num_slots == NUM_SLOTS and backbone.out_dim == NUM_SLOTS * SLOT_DIM
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, state["teacher"]["backbone." + name])
    student, _ = load_backbone_from_checkpoint(checkpoint, "student")
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), backbone.state_dict().values()))

    broken = dict(state, teacher={k: v for k, v in state["teacher"].items() if k != "backbone.norm.weight"})
    save_checkpoint(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="norm.weight"):
        load_backbone_from_checkpoint(tmp_path / "broken.pth", "teacher")
    with pytest.raises(ValueError, match="'model'"):
        load_backbone_from_checkpoint(checkpoint, "model")


# --------------------------------------------------------------------------- the k-NN program


def test_knn_cli_matches_features_and_knn_computed_here(checkpoint, images, tmp_path, capsys):
    result = run_knn(checkpoint, tmp_path)
    table = capsys.readouterr().out
    backbone, _ = load_backbone_from_checkpoint(checkpoint, "teacher")
    with torch.no_grad():
        train_x, test_x = backbone(images["train"][0]), backbone(images["test"][0])
    expected = reference_knn(train_x.numpy(), images["train"][1], test_x.numpy(), images["test"][1], KS)
    assert_same_accuracy(result["knn"], expected)
    assert result["num_train"] == TRAIN_LIMIT and result["num_test"] == TEST_LIMIT
    assert result["feature_dim"] == NUM_SLOTS * SLOT_DIM and result["source"] == "teacher"
    assert result["slot_layout"] == {"num_slots": NUM_SLOTS, "slot_dim": SLOT_DIM, "norm": "cont:const"}
    for k in KS:  # the table prints the JSON's numbers, in percent
        row = next(line for line in table.splitlines() if line.split() and line.split()[0] == str(k))
        assert f"{100 * result['knn'][str(k)]['top1']:.2f}" in row
        assert f"{100 * result['knn'][str(k)]['top5']:.2f}" in row


def test_second_run_reads_the_cache_without_any_forward(checkpoint, tmp_path, monkeypatch):
    first = run_knn(checkpoint, tmp_path, "--cache-dir", str(tmp_path / "cache"))
    assert first["cache_hit"] == {"train": False, "test": False}

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran although its features are cached")

    monkeypatch.setattr(VisionTransformer, "forward", no_forward)
    second = run_knn(checkpoint, tmp_path, "--cache-dir", str(tmp_path / "cache"), name="again.json")
    assert second["cache_hit"] == {"train": True, "test": True}
    assert second["knn"] == first["knn"]
    # other weights (the student) are a different cache entry
    monkeypatch.undo()
    student = run_knn(checkpoint, tmp_path, "--cache-dir", str(tmp_path / "cache"), "--checkpoint-key", "student",
                      name="student.json")
    assert student["cache_hit"] == {"train": False, "test": False}


def test_slots_option_equals_knn_on_kept_slots(checkpoint, images, tmp_path):
    keep = [2, 0]
    result = run_knn(checkpoint, tmp_path, "--slots", ",".join(map(str, keep)))
    backbone, _ = load_backbone_from_checkpoint(checkpoint, "teacher")

    def kept(x):  # the kept slots, each unit, concatenated: cosine = mean of per-slot cosines
        slots = backbone(x).view(len(x), NUM_SLOTS, SLOT_DIM)[:, keep]
        return torch.nn.functional.normalize(slots, dim=-1).flatten(1).numpy()

    with torch.no_grad():
        expected = reference_knn(kept(images["train"][0]), images["train"][1], kept(images["test"][0]),
                                 images["test"][1], KS)
    assert result["slots"]["slots"] == keep
    assert_same_accuracy(result["slots"]["knn"], expected)
    every = run_knn(checkpoint, tmp_path, "--slots", ",".join(map(str, range(NUM_SLOTS))), name="all.json")
    assert_same_accuracy(every["slots"]["knn"], every["knn"])


def test_selection_sees_train_rows_only_and_per_slot_writes_a_chart(checkpoint, tmp_path, monkeypatch):
    seen = {}
    original = knn_protocol.greedy_slot_selection

    def spy(features, labels, *args, **kwargs):
        seen["rows"], seen["labels"] = len(features), np.asarray(labels).copy()
        return original(features, labels, *args, **kwargs)

    monkeypatch.setattr(knn_protocol, "greedy_slot_selection", spy)
    result = run_knn(checkpoint, tmp_path, "--select-slots", "--per-slot", "--slot-k", "5")
    train_labels = np.asarray(FashionMNIST(split="train", limit=TRAIN_LIMIT).targets)
    assert seen["rows"] == TRAIN_LIMIT and np.array_equal(seen["labels"], train_labels)
    selection = result["slot_selection"]
    assert 1 <= len(selection["selected"]) <= NUM_SLOTS
    assert selection["num_fit"] + selection["num_heldout"] == TRAIN_LIMIT
    assert set(selection["knn"]) == {str(k) for k in KS}
    per_slot = result["per_slot"]
    assert len(per_slot["top1"]) == NUM_SLOTS and all(0 <= a <= 1 for a in per_slot["top1"])
    with open(per_slot["plot"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # the selection written as JSON is a valid --slots-file
    again = run_knn(checkpoint, tmp_path, "--slots-file", str(tmp_path / "knn.json"), name="from_file.json")
    assert again["slots"]["slots"] == selection["selected"]
    assert again["slots"]["knn"] == selection["knn"]


def test_baselines_pixels_and_init(checkpoint, images, tmp_path):
    pixels = run_knn(checkpoint, tmp_path, "--baseline", "pixels", name="pixels.json")
    flat = lambda x: x[:, 0].flatten(1).numpy()  # noqa: E731 (one channel of the three equal ones)
    expected = reference_knn(flat(images["train"][0]), images["train"][1], flat(images["test"][0]),
                             images["test"][1], KS)
    assert pixels["source"] == "pixels" and pixels["feature_dim"] == 28 * 28
    assert_same_accuracy(pixels["knn"], expected)
    assert pixels["knn"]["20"]["top1"] > 0.6  # pixels classify Fashion-MNIST well above chance

    init = run_knn(checkpoint, tmp_path, "--baseline", "init", name="init.json")
    again = run_knn(checkpoint, tmp_path, "--baseline", "init", "--no-cache", name="init2.json")
    assert init["source"] == "init" and init["knn"] == again["knn"]  # seeded: reproducible


def test_evaluate_knn_in_process_and_errors(checkpoint, tmp_path, capsys):
    result = knn_from_checkpoint(checkpoint, train_limit=TRAIN_LIMIT, test_limit=TEST_LIMIT, ks=(20,),
                                         cache_dir=None, backend="torch", progress=False)
    assert 0.0 <= result["knn"]["20"]["top1"] <= 1.0 and result["cache_dir"] is None
    # in process, on a model in training mode: the same numbers, and the model stays in training mode
    backbone, _ = load_backbone_from_checkpoint(checkpoint, "teacher")
    backbone.train()
    train = FashionMNIST(split="train", limit=TRAIN_LIMIT, transform=eval_transform(
        28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, resize_ratio=1.0, grayscale_input=True))
    test = FashionMNIST(split="test", limit=TEST_LIMIT, transform=train.transform)
    direct = knn_protocol.evaluate_knn(backbone, train, test, ks=(20,), backend="torch",
                                       extraction=Extraction("embedding", progress=False))
    assert direct["knn"] == result["knn"] and backbone.training
    for args, words in ((["--ks", "500"], "k=500 exceeds"), (["--slots", "0,9"], "slots must be distinct")):
        with pytest.raises(SystemExit) as stop:  # a user's mistake: exit 2, one line (defect 10 of issue 22)
            run_knn(checkpoint, tmp_path, *args)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert stop.value.code == 2 and words in err[-1] and "Traceback" not in "\n".join(err)


# --------------------------------------------------------------------------- a CLIP checkpoint


def test_knn_and_linear_of_a_clip_checkpoint_use_its_image_size_and_normalisation(clip_checkpoint, tmp_path):
    """A CLIP run evaluates at its own 28 px with clip.image_mean/std, the view its training-time
    evaluations use (data.transforms.clip_eval_transform), not at DINO's default crop size of 224."""
    from dino_sparo.data.transforms import clip_eval_transform
    from dino_sparo.cli.common import request_from_args
    from dino_sparo.data.transforms import probe_train_transform
    from dino_sparo.evaluation.inputs import data_for, load_source
    from tiny_checkpoint import CLIP_IMAGE_SIZE

    backbone, cfg = load_backbone_from_checkpoint(clip_checkpoint, "model")
    assert cfg.model.img_size == CLIP_IMAGE_SIZE != cfg.crops.global_crops_size
    view = clip_eval_transform(cfg.model.img_size, cfg.clip.image_mean, cfg.clip.image_std)
    args = knn_cli.build_parser().parse_args(["--checkpoint", str(clip_checkpoint), "--train-limit", str(TRAIN_LIMIT),
                                              "--test-limit", str(TEST_LIMIT)])
    data = data_for(request_from_args(args), load_source(clip_checkpoint))
    assert data.info["image_size"] == CLIP_IMAGE_SIZE
    splits = {}
    for split, dataset in (("train", data.train), ("test", data.test)):
        raw = FashionMNIST(split=split, limit=len(dataset))
        images = torch.stack([view(raw[i][0]) for i in range(len(raw))])
        assert images.shape[-2:] == (CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE)
        for i in (0, len(raw) // 2, len(raw) - 1):  # the very pixels the evaluation feeds the model
            torch.testing.assert_close(dataset[i][0], images[i], rtol=0, atol=1e-6)
        with torch.no_grad():
            splits[split] = (backbone(images).numpy(), np.asarray(raw.targets))

    result = run_knn(clip_checkpoint, tmp_path)
    expected = reference_knn(*splits["train"], *splits["test"], KS)
    assert result["source"] == "model" and result["data"]["image_size"] == CLIP_IMAGE_SIZE
    for k in KS:  # top-1 only: two steps of training leave near-ties between classes further down
        assert result["knn"][str(k)]["top1"] == pytest.approx(expected[str(k)]["top1"], abs=1.5 / TEST_LIMIT)

    linear = linear_from_checkpoint(clip_checkpoint, train_limit=TRAIN_LIMIT, test_limit=TEST_LIMIT,
                                               cache_dir=None, device="cpu", epochs=1, lrs=(0.01,), progress=False,
                                               augment=True, num_workers=0)
    assert linear["data"]["image_size"] == CLIP_IMAGE_SIZE
    normalise = probe_train_transform("fashion_mnist", CLIP_IMAGE_SIZE, cfg=cfg).transforms[-1]
    assert tuple(normalise.mean) == tuple(cfg.clip.image_mean) and tuple(normalise.std) == tuple(cfg.clip.image_std)


# --------------------------------------------------------------------------- image folders


def _image_folder(root, classes=("a", "b"), per_class=6, seed=0):
    """Class folders of small PNGs whose brightness depends on the class (so k-NN has signal)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 120 * c, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _pixel_knn(*args):
    return knn_cli.run(knn_cli.build_parser().parse_args(
        ["--baseline", "pixels", "--dataset", "imagefolder", "--image-size", "8", "--ks", "3", "--backend", "torch",
         "--num-workers", "0", "--no-cache", "--quiet", "--device", "cpu", *args]))


def test_image_folder_without_train_and_val_is_refused_unless_both_paths_are_given(tmp_path, capsys):
    from dino_sparo.cli import linear as linear_cli

    flat = _image_folder(tmp_path / "flat")
    common = ["--baseline", "pixels", "--dataset", "imagefolder", "--data-path", str(flat), "--image-size", "8",
              "--no-cache", "--quiet", "--num-workers", "0", "--device", "cpu"]
    for main, extra in ((knn_cli.main, ["--ks", "3"]), (linear_cli.main, ["--epochs", "1", "--lrs", "0.01"])):
        with pytest.raises(SystemExit) as error:
            main(common + extra)
        assert error.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert str(flat) in message and "train/" in message and "val/" in message and "--train-path" in message
    only_train = tmp_path / "only_train"
    _image_folder(only_train / "train")
    with pytest.raises(ValueError, match=r"no val/ \(or test/\) sub-folder"):
        _pixel_knn("--data-path", str(only_train))
    with pytest.raises(ValueError, match="give both --train-path and --test-path"):
        _pixel_knn("--train-path", str(flat))

    # the proper layout, and the same two folders named explicitly: the same held-out result
    split = tmp_path / "split"
    _image_folder(split / "train", seed=1)
    _image_folder(split / "val", per_class=3, seed=2)
    layout = _pixel_knn("--data-path", str(split))
    explicit = _pixel_knn("--train-path", str(split / "train"), "--test-path", str(split / "val"))
    assert layout["num_train"] == explicit["num_train"] == 12 and layout["num_test"] == explicit["num_test"] == 6
    assert layout["knn"] == explicit["knn"]
    assert explicit["data"]["train_path"] == str(split / "train")


# --------------------------------------------------------------------------- first contact


@pytest.mark.parametrize("module", ["dino_sparo.cli.knn", "dino_sparo.cli.linear", "dino_sparo.cli.zeroshot",
                                    "dino_sparo.cli.visualize", "dino_sparo.cli.sugarcrepe", "dino_sparo.cli.scenes",
                                    "dino_sparo.cli.clip_study"])
def test_every_option_has_a_help_text_that_shows_its_default(module):
    import argparse
    import importlib

    parser = importlib.import_module(module).build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = [parser] + [p for a in subparsers for p in a.choices.values()]  # dino-sparo-scenes' commands
    for one in parsers:
        text = " ".join(one.format_help().split())
        for action in one._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{action.option_strings or action.dest} has no help text"
            if not (action.default is None or action.default is False or action.default == argparse.SUPPRESS):
                assert f"(default: {action.default})" in text or "default" in action.help.lower(), \
                    action.option_strings  # 0 included


def test_knn_table_names_its_columns(checkpoint, tmp_path, capsys):
    result = run_knn(checkpoint, tmp_path, "--slots", "0,2")
    table = capsys.readouterr().out
    assert knn_protocol.format_knn_table(result) in table
    lines = table.splitlines()
    head = next(i for i, line in enumerate(lines) if "all slots" in line)
    assert "slots [0,2]" in lines[head]
    units = lines[head + 1].split()
    assert units[0] == "k" and lines[head + 1].count("top-1 / top-5 %") == 2
    assert lines[head + 2].split()[0] == str(KS[0])  # then one row per k
    assert any("accuracy in %" in line for line in lines[:head])
