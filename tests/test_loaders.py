"""A corrupt image under ``corrupt_images: error`` stops the program within seconds, naming the file,
with a non-zero exit, whatever the number of loader workers (they ignore the stop signals, so a
worker left running would keep the process waiting at exit forever)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL

TIMEOUT_S = 90  # a hang is forever; a healthy run of these tiny programs takes seconds
CORRUPT = "b/05.png"


@pytest.fixture(scope="module")
def folder_with_a_corrupt_image(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / name / f"{i:02d}.png")
    data = (root / CORRUPT).read_bytes()
    (root / CORRUPT).write_bytes(data[: len(data) // 2])  # a truncated download
    return root


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed the child
        pytest.fail(f"still running after {TIMEOUT_S} s: {(exc.stderr or b'')[-2000:]!r}")


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_training_stops_on_a_corrupt_image_naming_it(folder_with_a_corrupt_image, tmp_path, workers):
    done = run(["-m", "dino_sparo.cli.train", *TINY_MODEL, "crops.local_crops_number=0",
                f"data.path={folder_with_a_corrupt_image}", "data.batch_size_per_gpu=4", f"data.num_workers={workers}",
                "optim.epochs=1", "optim.warmup_epochs=0", f"output_dir={tmp_path}"])
    assert done.returncode == 1, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and str(folder_with_a_corrupt_image / CORRUPT) in error[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert str(folder_with_a_corrupt_image / CORRUPT) in (tmp_path / "train.log").read_text()


EXTRACT = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from torch.utils.data import DataLoader
    from dino_sparo.data.datasets import ImageFolder
    from dino_sparo.data.loaders import leave_stop_signals_to_main_process
    from dino_sparo.evaluation.feature_store import extract_features

    root, workers, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dataset = ImageFolder(root, transform=lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32)))
    loader = DataLoader(dataset, batch_size=4, num_workers=workers,
                        worker_init_fn=leave_stop_signals_to_main_process)  # as the training loop's workers
    extract_features(lambda images: images.flatten(1), loader, out, progress=False)
""")


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_feature_extraction_stops_on_a_corrupt_image_naming_it(folder_with_a_corrupt_image, tmp_path, workers):
    done = run(["-c", EXTRACT, str(folder_with_a_corrupt_image), str(workers), str(tmp_path / "store")])
    assert done.returncode != 0
    assert f"corrupt or unreadable image {folder_with_a_corrupt_image / CORRUPT}" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "store").exists()
