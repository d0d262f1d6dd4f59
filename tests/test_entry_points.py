"""Every console script of setup.py, run as a separate process the way the installed script runs
it (``sys.exit(main())``): exit status 0 on a tiny successful case, non-zero with one line naming
the mistake (no traceback) on a bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from tiny_checkpoint import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                reason="Fashion-MNIST not installed (make data)")


def console_scripts() -> dict[str, str]:
    """``name -> module:function`` as setup.py declares them."""
    text = (ROOT / "setup.py").read_text()
    return dict(re.findall(r'"([\w-]+)=([\w.]+:\w+)"', text))


def run_script(name: str, args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """The installed script when it is on this interpreter's bin folder, else the same two lines it holds."""
    installed = shutil.which(name, path=str(Path(sys.executable).parent))
    if installed is not None:
        command = [sys.executable, installed, *args]
    else:
        module, function = console_scripts()[name].split(":")
        command = [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def overrides(config: dict, prefix: str = "") -> list[str]:
    """A nested config dict as the ``key.sub=value`` arguments of dino-sparo-train."""
    out = []
    for key, value in config.items():
        if isinstance(value, dict):
            out += overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


BENCH = ["--arch", "vit_pico", "--patch-size", "4", "--global-size", "16", "--local-size", "8", "--local-crops", "2",
         "--batch", "2", "--out-dim", "64", "--device", "cpu", "--threads", "1", "--matmul-size", "64"]
EVAL = ["--train-limit", "60", "--test-limit", "20", "--num-workers", "0", "--batch-size", "64", "--no-cache",
        "--quiet", "--device", "cpu"]


def scene_files(out: Path) -> Path:
    """A few scenes in SugarCrepe's file format, as dino-sparo-scenes export writes them."""
    from dino_sparo.data.scenes import SceneWorld
    from dino_sparo.data.scenes_export import export_scenes

    export_scenes(SceneWorld(), out, 8, progress=False)
    return out


def cases(tmp: Path, dino: Path, clip: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """Per script: arguments that succeed, arguments that fail, and a word the failure's line must hold."""
    missing = str(tmp / "missing.pth")
    scenes = scene_files(tmp / "scenes")
    return {
        "dino-sparo-train": (["--output-dir", str(tmp / "train"), *overrides(TINY_CONFIG), "max_steps=1"],
                             ["--output-dir", str(tmp / "bad"), "optim.learning_rate=1"], "optim.learning_rate"),
        "dino-sparo-bench": ([*BENCH, "--steps", "1", "--warmup", "1"], [*BENCH, "--warmup", "0"], "--warmup"),
        "dino-sparo-knn": (["--checkpoint", str(dino), *EVAL, "--ks", "5", "--backend", "torch"],
                           ["--checkpoint", missing, *EVAL], "missing.pth"),
        "dino-sparo-linear": (["--checkpoint", str(dino), *EVAL, "--epochs", "1", "--lrs", "0.01"],
                              ["--checkpoint", missing, *EVAL], "missing.pth"),
        "dino-sparo-submit": (["--cluster", "debug", "--entry-point", "json:dumps", "--job-dir", str(tmp / "jobs"),
                               "--", "x"],
                              ["--cluster", "local", "--job-dir", str(tmp / "jobs"), "optim.learning_rate=1"],
                              "optim.learning_rate"),
        "dino-sparo-zeroshot": (["--checkpoint", str(clip), "--limit", "20", "--num-workers", "0", "--device", "cpu",
                                 "--output-json", str(tmp / "zeroshot.json")],
                                ["--checkpoint", str(dino), "--num-workers", "0", "--device", "cpu"], "CLIP"),
        "dino-sparo-gpu-check": (["--dry-run", "--output", str(tmp / "gpu_check")],
                                 ["--budget", "0", "--output", str(tmp / "gpu_check")], "--budget"),
        "dino-sparo-scenes": (["export", "--out", str(tmp / "scenes_export"), "--count", "8"],
                              ["show", "--out", str(tmp / "x.png"), "data.scenes.shapes=12"], "data.scenes.shapes"),
        "dino-sparo-sugarcrepe": (["--checkpoint", str(clip), "--data", str(scenes / "sugarcrepe"),
                                   "--images", str(scenes / "images"), "--num-workers", "0", "--device", "cpu"],
                                  ["--checkpoint", str(clip), "--data", str(tmp / "nowhere"), "--images",
                                   str(scenes / "images")], "not found"),
        "dino-sparo-export": (["--checkpoint", str(dino), "--output", str(tmp / "teacher.pth")],
                              ["--checkpoint", str(clip), "--key", "teacher"], "--key"),
        "dino-sparo-visualize": (["--checkpoint", str(dino), "--images", "0", "1", "--output", str(tmp / "s.png")],
                                 ["--checkpoint", str(dino), "--images", "99999", "--output", str(tmp / "t.png")],
                                 "99999"),
    }


def test_every_console_script_has_a_case(tmp_path):
    assert set(console_scripts()) == set(cases(tmp_path, tmp_path, tmp_path))


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_console_script_exits_0_on_success_and_non_zero_with_one_line_on_failure(name, checkpoint, clip_checkpoint,
                                                                                tmp_path):
    good, bad, word = cases(tmp_path, checkpoint, clip_checkpoint)[name]
    done = run_script(name, good, tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    failed = run_script(name, bad, tmp_path)
    assert failed.returncode == 2, (failed.returncode, failed.stderr[-2000:])  # a user's mistake, as argparse
    assert "Traceback" not in failed.stderr, failed.stderr[-2000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert word in last and "error" in last.lower(), failed.stderr[-2000:]
