"""The CLIP cls-vs-SPARO study runner on a tiny model: one JSON per run with trained, initial and
gain numbers, the summary over runs, and a re-run that skips what is done."""

from __future__ import annotations

import json

import pytest

from dino_sparo import clip_study

TINY = ["precision=fp32", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
        "model.sparo.num_slots=4", "model.sparo.slot_dim=8", "clip.text_width=32", "clip.text_depth=2",
        "clip.text_heads=2", "clip.embed_dim=32", "data.scenes.train_size=64", "data.scenes.test_size=40",
        "data.batch_size_per_gpu=16", "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0", "max_steps=2",
        "clip.zeroshot_every_epochs=0", "log_every=1"]


def test_study_writes_runs_with_gains_and_skips_them_when_rerun(tmp_path, monkeypatch):
    config = "configs/clip/scenes_hard_sparo.yaml"
    results, output = tmp_path / "results", tmp_path / "output"
    payload = clip_study.run_study(config, [0], results, output, overrides=TINY, count=20)
    runs = {p.stem: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}
    assert set(runs) == {"cls_seed0", "sparo_seed0"}
    for run in runs.values():
        for key in ("test_replace_obj", "heldout_micro", "zeroshot_colour_shape", "i2t_r1"):
            assert run[f"gain_{key}"] == pytest.approx(run[key] - run[f"init_{key}"])
    assert "slot_ari" in runs["sparo_seed0"] and "slot_ari" not in runs["cls_seed0"]
    assert "test_micro_selected" in runs["sparo_seed0"]
    assert payload["arms"]["sparo"]["test_micro"]["n"] == 1
    assert set(payload["text_only"]) == {"test", "heldout"}
    assert "| test replace_obj |" in (results / "summary.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(clip_study, "run_one", no_training)
    again = clip_study.run_study(config, [0], results, output, overrides=TINY, count=20)
    assert again["arms"] == payload["arms"]
