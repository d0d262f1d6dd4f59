"""Threads on small machines: OpenMP's passive wait policy by default before torch loads (the
user's environment wins), loader workers and intra-op threads sized to the cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from dino_sparo.runtime import available_cores, plan_threads

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import dino_sparo, os; print(os.environ['OMP_WAIT_POLICY'], dino_sparo.OMP_WAIT_POLICY_SOURCE)"


def _probe(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                            env=dict(base, PYTHONPATH=str(ROOT), **env))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_passive_wait_is_the_default_and_the_environment_wins():
    assert _probe() == "PASSIVE default"
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE environment"


def test_workers_never_outnumber_the_cores_and_a_gpu_step_leaves_them_their_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    cores = available_cores()
    plan = plan_threads(torch.device("cuda"), cores + 5, apply=False)
    assert plan.workers == cores and plan.threads == 1 and "capped" in plan.describe()
    plan = plan_threads(torch.device("cpu"), 0, apply=False)
    assert plan.workers == 0 and plan.threads == min(torch.get_num_threads(), cores)  # a CPU step: torch's count
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert plan_threads(torch.device("cpu"), 0, apply=False).threads == torch.get_num_threads()


def test_torchrun_processes_share_the_cores(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    alone = len(os.sched_getaffinity(0))
    if alone == (os.cpu_count() or alone):
        assert available_cores() == max(1, alone // 2)


def test_a_run_logs_its_thread_plan(tmp_path):
    from conftest import TINY_TRAINING

    from dino_sparo.config import load_config
    from dino_sparo.train import train

    train(load_config(None, TINY_TRAINING + ["max_steps=1", f"output_dir={tmp_path}"]))
    log = (tmp_path / "train.log").read_text()
    assert "loader worker(s)" in log and "intra-op thread(s)" in log and "OMP_WAIT_POLICY=" in log
