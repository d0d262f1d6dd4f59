"""The read-out study's bookkeeping: mean ± std over seeds, the table, resuming past finished runs."""

import json
import statistics
from pathlib import Path

import pytest

from dino_sparo import study
from dino_sparo.config import load_config, save_config
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT

from conftest import TINY_MODEL


def _fake_run(arm, seed, knn, linear, selected=None, slots=None):
    return {"arm": arm, "seed": seed, "knn_top1": knn, "linear_top1": linear, "selected_knn_top1": selected,
            "num_selected_slots": slots, "backbone_params": 1000 if arm == "cls" else 900, "train_seconds": 10.0}


def test_aggregate_gives_mean_and_sample_std_per_arm(tmp_path):
    runs = [_fake_run("cls", 0, 0.70, 0.75), _fake_run("cls", 1, 0.72, 0.77), _fake_run("cls", 2, 0.74, 0.70),
            _fake_run("sparo", 0, 0.71, 0.76, 0.73, 5), _fake_run("sparo", 1, 0.69, 0.74, 0.70, 7),
            _fake_run("sparo", 2, 0.73, 0.78, 0.75, 6)]
    (tmp_path / "runs").mkdir()
    for run in runs:
        (tmp_path / "runs" / f"{study.run_name(run['arm'], run['seed'])}.json").write_text(json.dumps(run))
    summary = study.aggregate(study.load_runs(tmp_path))
    assert summary["cls"]["seeds"] == [0, 1, 2]
    assert summary["cls"]["knn_top1"]["mean"] == pytest.approx(statistics.mean([0.70, 0.72, 0.74]))
    assert summary["cls"]["knn_top1"]["std"] == pytest.approx(statistics.stdev([0.70, 0.72, 0.74]))
    assert summary["sparo"]["linear_top1"]["std"] == pytest.approx(statistics.stdev([0.76, 0.74, 0.78]))
    assert summary["sparo"]["num_selected_slots"]["mean"] == pytest.approx(6.0)
    assert "selected_knn_top1" not in summary["cls"]  # None everywhere: left out, not averaged as 0
    table = study.format_summary(summary)
    assert "| cls | 3 | 1,000 | 72.00 ± 2.00 |" in table
    assert "| 6.0 ± 1.0 |" in table


def test_mean_std_of_one_value_has_zero_std():
    assert study.mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1, "values": [0.5]}


def test_study_skips_finished_runs_and_writes_the_summary(tmp_path, monkeypatch):
    calls = []

    def fake_run_one(config, arm, seed, budget, output_dir, device="cpu"):
        calls.append((arm, seed))
        return _fake_run(arm, seed, 0.7 + seed / 100, 0.8)

    monkeypatch.setattr(study, "run_one", fake_run_one)
    runs_dir = tmp_path / "results" / "smoke" / "runs"
    runs_dir.mkdir(parents=True)
    (runs_dir / "cls_seed0.json").write_text(json.dumps(_fake_run("cls", 0, 0.6, 0.6)))
    (tmp_path / "base.yaml").write_text("seed: 0\n")
    payload = study.run_study(tmp_path / "base.yaml", [0, 1], "smoke", tmp_path / "results", tmp_path / "out")
    assert calls == [("sparo", 0), ("cls", 1), ("sparo", 1)]
    assert payload["arms"]["cls"]["knn_top1"]["values"] == [0.6, 0.71]
    assert json.loads((tmp_path / "results" / "smoke" / "summary.json").read_text())["budget"] == "smoke"


def test_unknown_budget_and_arm_are_named():
    with pytest.raises(ValueError, match="'huge'"):
        study.run_study("base.yaml", [0], "huge", "r", "o")
    with pytest.raises(ValueError, match="'mean'"):
        study.run_overrides("mean", 0, study.BUDGETS["smoke"], "o")


def test_study_keeps_its_base_config_and_refuses_a_changed_one(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run_one", lambda config, arm, seed, *a, **k: _fake_run(arm, seed, 0.7, 0.8))
    base = tmp_path / "base.yaml"
    base.write_text("optim: {epochs: 3}\n")
    study.run_study(base, [0], "smoke", tmp_path / "results", tmp_path / "out")
    snapshot = tmp_path / "results" / "smoke" / "base_config.yaml"
    assert snapshot.read_text() == "optim: {epochs: 3}\n"
    base.write_text("optim: {epochs: 4}\n")
    with pytest.raises(ValueError, match="base_config.yaml"):
        study.run_study(base, [1], "smoke", tmp_path / "results", tmp_path / "out")
    study.run_study(snapshot, [1], "smoke", tmp_path / "results", tmp_path / "out")  # the copy continues it


def test_gain_table_is_trained_minus_the_same_seeds_initialisation(tmp_path):
    runs = []
    for seed, (knn, init) in enumerate([(0.80, 0.70), (0.84, 0.71), (0.82, 0.69)]):
        run = dict(_fake_run("sparo", seed, knn, 0.8), init_knn_top1=init, init_linear_top1=0.75,
                   knn_gain=knn - init, linear_gain=0.05)
        runs.append(run)
    summary = study.aggregate(runs)
    gains = [0.80 - 0.70, 0.84 - 0.71, 0.82 - 0.69]
    assert summary["sparo"]["knn_gain"]["mean"] == pytest.approx(statistics.mean(gains))
    table = study.format_summary(summary)
    assert "What training adds" in table
    assert f"| sparo | 70.00 ± 1.00 | {100 * statistics.mean(gains):.2f} ± {100 * statistics.stdev(gains):.2f} |" in table


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(), reason="Fashion-MNIST not installed (make data)")
def test_a_real_smoke_run_reports_its_initialisation_and_the_gain(tmp_path):
    save_config(load_config(None, [*TINY_MODEL, "data.dataset=fashion_mnist"]), tmp_path / "base.yaml")
    run = study.run_one(tmp_path / "base.yaml", "sparo", 0, study.BUDGETS["smoke"], tmp_path / "run")
    init = study.run_baseline("init", "sparo", 0, study.BUDGETS["smoke"], tmp_path / "run")
    assert run["init_knn_top1"] == init["knn_top1"]  # the same seed's untrained network, same protocol
    assert run["knn_gain"] == pytest.approx(run["knn_top1"] - run["init_knn_top1"])
    assert run["linear_gain"] == pytest.approx(run["linear_top1"] - run["init_linear_top1"])


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(), reason="Fashion-MNIST not installed (make data)")
def test_a_signal_during_training_ends_the_study_without_a_result(tmp_path, monkeypatch):
    import os
    import signal

    from dino_sparo.cli.study import main
    from dino_sparo.methods.dino import DinoMethod
    original = DinoMethod.loss

    def interrupted(self, batch, step, epoch, **values):
        if step == 0:  # the first of the smoke budget's 2 steps
            os.kill(os.getpid(), signal.SIGTERM)  # what a shell's kill or a scheduler sends
        return original(self, batch, step, epoch, **values)

    monkeypatch.setattr(DinoMethod, "loss", interrupted)
    save_config(load_config(None, [*TINY_MODEL, "data.dataset=fashion_mnist"]), tmp_path / "base.yaml")
    argv = ["--config", str(tmp_path / "base.yaml"), "--budget", "smoke", "--seeds", "0", "--arms", "cls",
            "--results-dir", str(tmp_path / "results"), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "results" / "smoke" / "runs" / "cls_seed0.json").exists()  # nothing half-trained
    assert not (tmp_path / "out" / "smoke" / "cls_seed0" / "eval_features").exists()  # and nothing evaluated


def _write_study(folder, runs):
    (folder / "runs").mkdir(parents=True)
    for run in runs:
        (folder / "runs" / f"{study.run_name(run['arm'], run['seed'])}.json").write_text(json.dumps(run))


def test_comparison_with_another_study_is_the_difference_of_means_and_its_standard_error(tmp_path):
    ours = [dict(_fake_run("cls", s, knn, 0.8), init_knn_top1=0.6, knn_gain=knn - 0.6)
            for s, knn in enumerate([0.72, 0.74, 0.73])]
    theirs = [dict(_fake_run("cls", s, knn, 0.7), init_knn_top1=0.6, knn_gain=knn - 0.6)
              for s, knn in enumerate([0.70, 0.69, 0.71, 0.70])]
    _write_study(tmp_path / "with" / "recipe", ours)
    _write_study(tmp_path / "without" / "recipe", theirs)
    payload = study.write_summary(tmp_path / "with" / "recipe", "recipe", "base.yaml", tmp_path / "without")
    got = payload["compared_with"]["differences"]["cls"]["knn_top1"]
    a, b = [0.72, 0.74, 0.73], [0.70, 0.69, 0.71, 0.70]
    assert got["difference"] == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert got["standard_error"] == pytest.approx((statistics.variance(a) / 3 + statistics.variance(b) / 4) ** 0.5)
    assert payload["compared_with"]["differences"]["cls"]["linear_top1"]["difference"] == pytest.approx(0.1)
    text = (tmp_path / "with" / "recipe" / "summary.md").read_text()
    # every run has its row, and the comparison is in the summary
    assert "| cls, seed 1 | 74.00 | 60.00 | +14.00 | 80.00 |" in text
    assert f"| cls | 3 vs 4 | {100 * (statistics.mean(a) - statistics.mean(b)):+.2f} ± " in text
    with pytest.raises(study.UsageError, match="--compare-with"):
        study.write_summary(tmp_path / "with" / "recipe", "recipe", "base.yaml", tmp_path / "nowhere")


def test_a_missing_comparison_is_refused_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run_one", lambda *a, **k: pytest.fail("trained before checking --compare-with"))
    (tmp_path / "base.yaml").write_text("seed: 0\n")
    with pytest.raises(study.UsageError, match="--compare-with"):
        study.run_study(tmp_path / "base.yaml", [0], "smoke", tmp_path / "results", tmp_path / "out",
                        compare_with=tmp_path / "nowhere")
