"""WebDataset shards in DINO mode: images (and labels) read by offset, and training on them with the
guarantees of every other dataset: exact resume mid-epoch, the index kept for the resumed run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL
from dino_sparo.checkpoint import load_checkpoint
from dino_sparo.config import ConfigError, load_config
from dino_sparo.data.shards import TarShardImages
from dino_sparo.train import train

wds = pytest.importorskip("webdataset")


def write_shards(root, shards=2, per_shard=20, labels=True):
    """Shards of 28-px images whose pixels encode (shard, index); ``.cls`` labels when asked."""
    rng = np.random.default_rng(0)
    expected = []
    for shard in range(shards):
        with wds.TarWriter(str(root / f"train-{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                sample = {"__key__": f"{shard:05d}_{i:04d}", "png": Image.fromarray(pixels)}
                if labels:
                    sample["cls"] = str(i % 3).encode()
                sink.write(sample)
                expected.append((pixels, i % 3 if labels else -1))
    return str(root / f"train-{{00000..{shards - 1:05d}}}.tar"), expected


def test_shard_images_are_read_by_offset_with_their_labels(tmp_path):
    spec, expected = write_shards(tmp_path)
    data = TarShardImages(spec)
    assert len(data) == len(expected) == 40
    for index in (0, 19, 20, 39):
        image, label = data[index]
        assert np.array_equal(np.asarray(image), expected[index][0]) and label == expected[index][1]
    (tmp_path / "unlabelled").mkdir()
    spec, _ = write_shards(tmp_path / "unlabelled", shards=1, per_shard=3, labels=False)
    assert TarShardImages(spec)[2][1] == -1


def shard_run(tmp_path, out, spec, *extra):
    return load_config(None, [*TINY_MODEL, "data.dataset=webdataset", f"data.path={spec}",
                              "data.batch_size_per_gpu=8", "data.num_workers=0", "optim.epochs=2",
                              "optim.warmup_epochs=0", "log_every=1", f"output_dir={out}", *extra])


@pytest.mark.parametrize("workers", [0, 2])
def test_dino_trains_on_shards_and_resumes_bit_identically(tmp_path, workers):
    spec, _ = write_shards(tmp_path)  # 40 images: 5 steps per epoch
    full, split = tmp_path / "full", tmp_path / "split"
    loading = f"data.num_workers={workers}"
    train(shard_run(tmp_path, full, spec, "max_steps=8", loading))
    train(shard_run(tmp_path, split, spec, "max_steps=3", loading))  # stops mid-epoch
    assert (split / "shard_index.npz").is_file()  # the resumed run reads the index instead of the tars
    train(shard_run(tmp_path, split, spec, "max_steps=8", loading))
    a, b = load_checkpoint(full / "checkpoint.pth"), load_checkpoint(split / "checkpoint.pth")
    assert a["step"] == b["step"] == 8
    for name in ("student", "teacher", "loss"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), f"{name}.{key} differs after resume"
    losses = [[json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in (full, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_shards_cannot_feed_knn_during_training(tmp_path):
    with pytest.raises(ConfigError, match="'eval.knn_every' must be 0 with data.dataset webdataset"):
        load_config(None, ["data.dataset=webdataset", "data.path=x.tar", "eval.knn_every=1"])
    with pytest.raises(ConfigError, match="'data.dataset' must be not webdataset in CLIP mode"):
        load_config(None, ["mode=clip", "data.dataset=webdataset", "data.path=x.tar"])
