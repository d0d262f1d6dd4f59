"""The demo as a program: a stop request during its training ends it, before any evaluation."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT

pytestmark = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                reason="Fashion-MNIST not installed (make data)")

TINY = ["model.depth=2", "model.sparo.num_slots=4", "model.sparo.slot_dim=4", "data.limit=256",
        "data.batch_size_per_gpu=16", "data.num_workers=1", "dino.out_dim=64", "dino.head_hidden_dim=32",
        "dino.head_bottleneck_dim=16", "optim.epochs=50", "log_every=1", "precision=fp32", "device=cpu"]


def test_sigterm_during_training_ends_the_demo_with_143(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "dino_sparo.cli.demo", "--output-dir", str(tmp_path), *TINY],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "log.jsonl").exists() or not (tmp_path / "log.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running 120 s after SIGTERM: {process.communicate()[1][-2000:]}")
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "k-NN" not in out + err and not (tmp_path / "demo_results.json").exists()  # no evaluation
    assert "by SIGTERM" in err and (tmp_path / "checkpoint.pth").is_file()
