"""dino-sparo-bench loader: the reference pipeline is DINO's, the table and its last line come out
of a real (tiny) run on the installed photographs, the feeding check runs end to end on the CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dino_sparo.bench_loader import (RECIPES, DataAugmentationDINO, format_feed_check, format_loader_report,
                                     gpu_feed_check, installed_photos, make_benchmark_jpegs, run_loader_benchmark)

ROOT = Path(__file__).resolve().parents[1]
needs_photos = pytest.mark.skipif(not installed_photos(), reason="no photographs in the installed packages")


def test_reference_is_dinos_recipe():
    t = DataAugmentationDINO((0.25, 1.0), (0.05, 0.25), 10)
    image = Image.new("RGB", (300, 200), (120, 60, 200))
    crops = t(image)
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 10
    assert t.global_transfo1.transforms[0].scale == (0.25, 1.0) and t.local_transfo.transforms[0].scale == (0.05, 0.25)
    assert [s.prob for s in (t.global_transfo1.transforms[2], t.global_transfo2.transforms[2],
                             t.local_transfo.transforms[2])] == [1.0, 0.1, 0.5]
    assert t.global_transfo2.transforms[3].p == 0.2


@needs_photos
def test_jpegs_have_the_sizes_and_differ(tmp_path):
    paths = make_benchmark_jpegs(installed_photos(), tmp_path, (200, 150), copies=3)
    images = [Image.open(p) for p in paths]
    assert all(im.size == (200, 150) and im.format == "JPEG" for im in images)
    assert len({im.tobytes() for im in images}) == 3


@needs_photos
def test_a_tiny_run_prints_every_row_and_the_headline(tmp_path):
    figures = run_loader_benchmark(["release"], ["imagenet"], images=2, repeats=1, workers=1, workdir=tmp_path,
                                   log=lambda line: None)
    names = [r["pipeline"] for r in figures["rows"]]
    assert names == ["reference", "loader", "device (loader half)", "device ops (CPU tensors)",
                     "device, both halves on one core"]
    assert all(r["images_per_cpu_s"] > 0 for r in figures["rows"])
    assert all(r["workers_images_per_s"] > 0 for r in figures["rows"][:3])
    report = format_loader_report(figures)
    last = report.splitlines()[-1]
    assert re.fullmatch(r"device-augment / reference images/s per core \(ImageNet-size JPEG\): \d+\.\d\d×", last)
    device, reference = figures["rows"][2]["images_per_cpu_s"], figures["rows"][0]["images_per_cpu_s"]
    assert last.endswith(f"{device / reference:.2f}×")


@needs_photos
def test_feed_check_runs_both_modes_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    figures = gpu_feed_check("cpu", "demo", batch=4, steps=1, warmup=1, workers=1, arch="vit_pico", out_dim=64,
                             workdir=tmp_path, log=lambda line: None)
    for mode in ("loader", "device"):
        for kind in ("model_bound", "loader_bound", "end_to_end"):
            assert figures[f"{mode}_{kind}"] > 0
    assert "end to end" in format_feed_check(figures)


def test_bad_input_is_one_line():
    command = [sys.executable, str(ROOT / "tools" / "bench_loader.py"), "--recipes", "imagenet1k"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "Traceback" not in result.stderr  # a user's mistake, as argparse's
    assert result.stderr.strip() == (f"dino-sparo-bench loader: error: --recipes 'imagenet1k': expected names from "
                                     f"{', '.join(RECIPES)}")
