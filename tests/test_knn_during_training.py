"""k-NN during training (``eval.knn_every``): logged rows, no effect on the training itself."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_sparo.checkpoint import load_checkpoint
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from dino_sparo.evaluation.periodic import PeriodicKnn
from dino_sparo.methods.dino import DinoMethod
from dino_sparo.train import train

from conftest import TINY_TRAINING, read_log, tiny_config

pytestmark = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                reason="Fashion-MNIST not installed (make data)")

TINY = [
    *TINY_TRAINING, "model.embed_dim=48", "model.drop_path_rate=0.1", "data.limit=32",
    "optim.warmup_epochs=1", "log_every=2", "eval.knn_k=10", "eval.knn_train_limit=200", "eval.knn_test_limit=100",
]


def tiny(path, *extra):
    return tiny_config(f"output_dir={path}", *extra, base=TINY)


def test_knn_rows_are_logged_every_epoch_and_training_is_unchanged(tmp_path):
    with_knn, without = tmp_path / "knn", tmp_path / "plain"
    metrics = train(tiny(with_knn, "eval.knn_every=1"))
    train(tiny(without))
    rows = read_log(with_knn)
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in knn_rows] == [(2, 0), (4, 1)]  # 2 steps per epoch
    for r in knn_rows:
        assert 0.0 <= r["knn_top1"] <= r["knn_top5"] <= 1.0
        assert "loss" not in r  # a row of its own
    assert metrics["knn_top1"] == knn_rows[-1]["knn_top1"]
    assert "k-NN (k=10) top-1" in (with_knn / "train.log").read_text()
    # the evaluation neither draws from the training RNGs nor leaves a mode changed
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in read_log(without)]
    a, b = load_checkpoint(with_knn / "checkpoint.pth"), load_checkpoint(without / "checkpoint.pth")
    for name in ("student", "teacher"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), f"{name}.{key} differs with k-NN during training"


def periodic_knn(cfg, method, batch_size):
    """The k-NN hook of ``method`` as the training loop builds it, on the CPU without loader workers."""
    data_cfg, transform = method.eval_data()
    return PeriodicKnn(cfg.eval, method.eval_backbone(), data_cfg, transform, batch_size, 0, torch.device("cpu"))


def test_every_n_epochs_only(tmp_path):
    cfg = tiny(tmp_path, "eval.knn_every=2")
    knn = periodic_knn(cfg, DinoMethod(cfg, torch.device("cpu")), 64)
    assert [e for e in range(0, 7) if knn.due(e)] == [2, 4, 6]
    assert len(knn.train_set) == 200 and len(knn.test_set) == 100
    assert knn.test_set.split == "test"
    assert np.bincount(knn.train_set.targets, minlength=10).tolist() == [20] * 10  # class-balanced


def test_evaluation_keeps_train_and_eval_modes(tmp_path):
    cfg = tiny(tmp_path, "eval.knn_every=1", "eval.knn_train_limit=50", "eval.knn_test_limit=20")
    method = DinoMethod(cfg, torch.device("cpu"))
    method.teacher.train()
    method.teacher.backbone.blocks[0].eval()  # a mixed state, restored exactly
    before = {name: m.training for name, m in method.teacher.named_modules()}
    result = periodic_knn(cfg, method, 64).evaluate()
    assert set(result) == {"knn_top1", "knn_top5"}
    assert {name: m.training for name, m in method.teacher.named_modules()} == before


def test_k_larger_than_the_memory_is_refused_naming_the_key(tmp_path):
    cfg = tiny(tmp_path, "eval.knn_every=1", "eval.knn_train_limit=5")
    with pytest.raises(ValueError, match="eval.knn_k"):
        periodic_knn(cfg, DinoMethod(cfg, torch.device("cpu")), 64)


def _png_classes(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_an_image_folder_without_a_held_out_split_is_refused(tmp_path):
    flat = tmp_path / "flat"
    _png_classes(flat)  # class folders only: memory and queries would be the same images
    cfg = tiny(tmp_path / "out", "eval.knn_every=1", "eval.knn_k=2", "data.dataset=imagefolder", f"data.path={flat}",
               "data.limit=null", "eval.knn_train_limit=null", "eval.knn_test_limit=null")
    with pytest.raises(ValueError, match=r"eval.knn_every.*no val/"):
        periodic_knn(cfg, DinoMethod(cfg, torch.device("cpu")), 4)
    split = tmp_path / "split"
    _png_classes(split / "train")
    _png_classes(split / "val")
    cfg = tiny(tmp_path / "out2", "eval.knn_every=1", "eval.knn_k=2", "data.dataset=imagefolder",
               f"data.path={split}", "data.limit=null", "eval.knn_train_limit=null", "eval.knn_test_limit=null")
    knn = periodic_knn(cfg, DinoMethod(cfg, torch.device("cpu")), 4)
    assert knn.train_set.root != knn.test_set.root and len(knn.test_set) == 8
