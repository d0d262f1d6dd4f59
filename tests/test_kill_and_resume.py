"""A training process killed with SIGKILL at random moments always leaves a loadable checkpoint;
re-running the same command resumes from it, and the run ends as an uninterrupted one does."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_sparo.checkpoint import load_checkpoint
from dino_sparo.config import load_config
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from dino_sparo.train import train

from conftest import TINY_TRAINING

pytestmark = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                reason="Fashion-MNIST not installed (make data)")

TINY = [
    *TINY_TRAINING, "model.drop_path_rate=0.1", "data.limit=16",
    "dino.out_dim=256", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "optim.epochs=8", "optim.warmup_epochs=2",
]  # one step per epoch: a checkpoint is written after every step, so kills often land in a save


def start(output_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # as this process: identical sums
    return subprocess.Popen([sys.executable, "-m", "dino_sparo.cli.train", *TINY, f"output_dir={output_dir}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_steps(output_dir: Path) -> int:
    path = output_dir / "log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_at_random_moments_leaves_a_checkpoint_to_resume_from(tmp_path):
    run, reference = tmp_path / "killed", tmp_path / "reference"
    rng = random.Random(0)
    last_step = 0
    for trial in range(1):
        process = start(run)
        before, deadline = logged_steps(run), time.monotonic() + 120
        while logged_steps(run) <= before + 1:  # this attempt has trained (and saved) a step at least
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        process.kill()  # SIGKILL: no handler runs, possibly in the middle of writing the checkpoint
        process.communicate()
        step = load_checkpoint(run / "checkpoint.pth")["step"]  # always loadable
        assert last_step <= step <= 8 and (trial > 0 or step < 8), (trial, step)  # never backwards
        last_step = step
    process = start(run)
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0, out[-3000:]
    assert f"resumed from {run / 'checkpoint.pth'} at step {last_step}" in out

    train(load_config(None, TINY + [f"output_dir={reference}"]))
    a, b = load_checkpoint(reference / "checkpoint.pth"), load_checkpoint(run / "checkpoint.pth")
    assert a["step"] == b["step"] == 8
    for name in ("student", "teacher", "loss"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), f"{name}.{key} differs after kills and resumes"
    final = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert final["loss"] == json.loads((reference / "log.jsonl").read_text().splitlines()[-1])["loss"]
