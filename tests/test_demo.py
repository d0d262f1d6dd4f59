"""The demo's one-pass evaluation gives the numbers of the library's k-NN evaluation."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from dino_sparo.config import ModelConfig
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT, FashionMNIST
from dino_sparo.data.transforms import eval_transform, normalization_for
from dino_sparo.demo import features_in_one_pass
from dino_sparo.evaluation.knn import knn_evaluate
from dino_sparo.evaluation.knn_cli import evaluate_knn
from dino_sparo.models.build import build_backbone

pytestmark = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                reason="Fashion-MNIST not installed (make data)")


def test_one_pass_features_give_the_library_knn_for_networks_and_pixels():
    mean, std, grayscale = normalization_for("fashion_mnist")
    transform = eval_transform(28, mean, std, resize_ratio=1.0, grayscale_input=grayscale)
    train_set = Subset(FashionMNIST(DEFAULT_FASHION_MNIST_ROOT, "train", transform), range(0, 6000, 10))
    test_set = Subset(FashionMNIST(DEFAULT_FASHION_MNIST_ROOT, "test", transform), range(0, 2000, 10))
    torch.manual_seed(0)
    nets = [build_backbone(ModelConfig(arch="vit_pico", depth=2, patch_size=4, img_size=28, drop_path_rate=0.0,
                                       readout=readout)).eval() for readout in ("sparo", "cls")]
    networks = {"sparo": nets[0], "cls": nets[1], "pixels": None}
    train_features, train_labels = features_in_one_pass(networks, train_set, batch_size=128)
    test_features, test_labels = features_in_one_pass(networks, test_set, batch_size=128)
    assert train_features["pixels"].shape == (600, 784) and train_features["sparo"].shape[0] == 600
    for name, net in networks.items():
        ours = knn_evaluate(train_features[name], train_labels, test_features[name], test_labels,
                            num_classes=10, ks=(20,), temperature=0.07, device="cpu")[20]["top1"]
        library = evaluate_knn(net, train_set, test_set, ks=(20,), temperature=0.07, batch_size=100,
                               device="cpu", progress=False)["knn"]["20"]["top1"]
        assert ours == pytest.approx(library, abs=1 / 200 + 1e-9), name  # at most one query may flip (fp ties)
    assert knn_evaluate(train_features["pixels"], train_labels, test_features["pixels"], test_labels,
                        num_classes=10, ks=(20,), device="cpu")[20]["top1"] > 0.6  # real images, real labels
