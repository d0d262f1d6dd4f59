"""The programs' common conduct: exit statuses and one-line errors (also in train.log), ``--output-json``
everywhere, a full disk said in one line, absolute paths saved with a run, where a run starts
(``--resume``, ``--fresh``, ``--finetune``), and start-up lines that say something."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from dino_sparo.checkpoint import load_checkpoint, save_checkpoint
from dino_sparo.cli import knn as knn_cli
from dino_sparo.cli import linear as linear_cli
from dino_sparo.cli import train as train_cli
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from dino_sparo.errors import DiskFullError, UsageError
from dino_sparo.train import StartFrom, TrainingRun, train

from conftest import TINY_TRAINING, program_exit, read_log, tiny_config

pytestmark = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                reason="Fashion-MNIST not installed (make data)")

EVAL = ["--train-limit", "60", "--test-limit", "20", "--num-workers", "0", "--no-cache", "--quiet", "--device", "cpu"]
KNN = [*EVAL, "--ks", "5"]


# --------------------------------------------------------------------------- --output-json


@pytest.mark.parametrize("module,argv", [
    ("knn", []), ("linear", []), ("zeroshot", []), ("sugarcrepe", []), ("scenes", ["evaluate"]), ("bench", []),
    ("bench_knn", [])])
def test_every_json_writing_program_names_its_flag_output_json(module, argv):
    import importlib

    parser = importlib.import_module(f"dino_sparo.cli.{module}").build_parser()
    if argv:  # a sub-command's own options
        parser = next(a for a in parser._actions if a.choices and argv[0] in a.choices).choices[argv[0]]
    text = parser.format_help()
    assert "--output-json" in text and "--json" not in text and "--output " not in text


def test_output_json_is_written_atomically_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    from dino_sparo import files

    files.write_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    save_checkpoint({"step": 1, "w": torch.zeros(10)}, tmp_path / "checkpoint.pth")
    before = (tmp_path / "checkpoint.pth").read_bytes()

    class FullDisk:
        """A file on a disk with 1 kB left: writes past it fail with ENOSPC, as the kernel reports it."""

        def __init__(self, handle):
            self.handle, self.left = handle, 1024

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    real_fdopen = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    for write in (lambda: save_checkpoint({"step": 2, "w": torch.zeros(100000)}, tmp_path / "checkpoint.pth"),
                  lambda: files.write_json(tmp_path / "r.json", {"a": "x" * 5000})):
        with pytest.raises(DiskFullError) as error:
            write()
        message = str(error.value)
        assert "No space left on device" in message and "\n" not in message and str(tmp_path) in message
    assert (tmp_path / "checkpoint.pth").read_bytes() == before  # the previous file is kept
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "r.json"]  # no temporary left


def test_a_full_disk_during_training_is_one_line_in_stderr_and_train_log(tmp_path, monkeypatch, capsys):
    from dino_sparo import files

    real_write = files.atomic_write

    def full(path, write):
        if Path(path).name == "checkpoint.pth":
            try:
                raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0") from OSError(
                    errno.ENOSPC, os.strerror(errno.ENOSPC))
            except RuntimeError as exc:
                assert files._disk_full(exc)
                raise DiskFullError(f"cannot write {path}: No space left on device") from None
        return real_write(path, write)

    monkeypatch.setattr("dino_sparo.checkpoint.atomic_write", full)
    code, last = program_exit(capsys, train_cli.main, [*TINY_TRAINING, f"output_dir={tmp_path}", "max_steps=2"])
    assert code == 1 and "No space left on device" in last and last.startswith("dino-sparo-train: error:")
    assert last in (tmp_path / "train.log").read_text()


# --------------------------------------------------------------------------- truncated checkpoints


@pytest.fixture
def truncated(checkpoint, tmp_path):
    path = tmp_path / "truncated" / "checkpoint.pth"
    path.parent.mkdir()
    path.write_bytes(checkpoint.read_bytes()[:5000])
    return path


@pytest.mark.parametrize("program", [knn_cli, linear_cli])
def test_a_truncated_checkpoint_is_one_line_in_the_evaluation_programs(program, truncated, capsys):
    extra = ["--epochs", "1", "--lrs", "0.01"] if program is linear_cli else ["--ks", "5"]
    code, last = program_exit(capsys, program.main, ["--checkpoint", str(truncated), *EVAL, *extra])
    assert code == 1 and "cannot be read" in last and str(truncated) in last
    assert "Traceback" not in capsys.readouterr().err


def test_a_truncated_checkpoint_on_resume_is_one_line_in_train_log(truncated, capsys):
    output = truncated.parent
    code, last = program_exit(capsys, train_cli.main, [*TINY_TRAINING, f"output_dir={output}", "max_steps=2"])
    assert code == 1 and "cannot be read" in last and last in (output / "train.log").read_text()


# --------------------------------------------------------------------------- missing data


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_a_missing_or_empty_image_folder_is_a_config_error_in_train_log(tmp_path, capsys, make):
    data = tmp_path / "data"
    if make == "empty":
        data.mkdir()
    output = tmp_path / "run"
    code, last = program_exit(capsys, train_cli.main, [*TINY_TRAINING, "data.dataset=imagefolder",
                                                       f"data.path={data}", f"output_dir={output}"])
    assert code == 2 and "config key 'data.path'" in last and str(data) in last
    log = (output / "train.log").read_text().strip().splitlines()
    assert log[-1].endswith(last)  # the last word of the log is the reason, not "using the folder itself"
    assert make == "empty" or not any("using the folder itself" in line for line in log)


# --------------------------------------------------------------------------- paths


def test_a_run_saves_absolute_paths_and_evaluates_from_elsewhere(tmp_path, monkeypatch, checkpoint):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    data = os.path.relpath(DEFAULT_FASHION_MNIST_ROOT, work)
    train(tiny_config("output_dir=runs/a", f"data.path={data}", "max_steps=1"))
    saved = load_checkpoint(work / "runs" / "a" / "checkpoint.pth")["config"]
    written = (work / "runs" / "a" / "config.yaml").read_text()
    assert saved["output_dir"] == str(work / "runs" / "a") and f"output_dir: {work / 'runs' / 'a'}" in written
    assert saved["data"]["path"] == str(Path(DEFAULT_FASHION_MNIST_ROOT).absolute().resolve()) or \
        Path(saved["data"]["path"]).resolve() == Path(DEFAULT_FASHION_MNIST_ROOT).resolve()
    assert Path(saved["data"]["path"]).is_absolute()
    monkeypatch.chdir(elsewhere)  # the checkpoint's data.path still names the data
    out = elsewhere / "knn.json"
    knn_cli.main(["--checkpoint", str(work / "runs" / "a" / "checkpoint.pth"), *KNN, "--backend", "torch",
                  "--output-json", str(out)])
    assert json.loads(out.read_text())["data"]["path"] == saved["data"]["path"]


# --------------------------------------------------------------------------- where a run starts


def states_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_another_run_continues_it_exactly(tmp_path):
    straight, first, second = tmp_path / "straight", tmp_path / "first", tmp_path / "second"
    train(tiny_config(f"output_dir={straight}", "max_steps=6"))
    train(tiny_config(f"output_dir={first}", "max_steps=3"))
    train(tiny_config(f"output_dir={second}", "max_steps=6"), StartFrom(resume=str(first / "checkpoint.pth")))
    assert [row["step"] for row in read_log(second)] == [4, 5, 6]
    assert [row["loss"] for row in read_log(second)] == [row["loss"] for row in read_log(straight)][3:]
    a, b = load_checkpoint(straight / "checkpoint.pth"), load_checkpoint(second / "checkpoint.pth")
    assert a["step"] == b["step"] == 6 and states_equal(a["teacher"], b["teacher"])


def test_fresh_starts_at_step_0_beside_an_old_checkpoint(tmp_path):
    train(tiny_config(f"output_dir={tmp_path}", "max_steps=3"))
    train(tiny_config(f"output_dir={tmp_path}", "max_steps=2"), StartFrom(fresh=True))
    assert [row["step"] for row in read_log(tmp_path)] == [1, 2]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 2


def test_finetune_takes_a_run_s_weights_with_a_new_optimiser_and_schedule(tmp_path):
    source = tmp_path / "source"
    train(tiny_config(f"output_dir={source}", "max_steps=3"))
    saved = load_checkpoint(source / "checkpoint.pth")
    run = TrainingRun(tiny_config(f"output_dir={tmp_path / 'ft'}", "optim.lr=0.001"),
                      StartFrom(finetune=str(source / "checkpoint.pth")))
    for name, module in run.method.modules().items():
        assert states_equal(module.state_dict(), saved[name]), name
    assert run.resume() == 0 and not run.optimizer.state  # step 0, no moments: a new optimiser
    with pytest.raises(ValueError, match="model.arch"):  # another architecture is refused, naming the key
        TrainingRun(tiny_config(f"output_dir={tmp_path / 'other'}", "model.arch=vit_tiny"),
                    StartFrom(finetune=str(source / "checkpoint.pth")))


def test_start_options_are_exclusive_and_name_missing_files(tmp_path, capsys):
    with pytest.raises(UsageError, match="--finetune: no such checkpoint"):
        StartFrom(finetune=str(tmp_path / "none.pth"))
    with pytest.raises(SystemExit) as stop:  # argparse: one of them
        train_cli.main([*TINY_TRAINING, "--fresh", "--resume", "x.pth"])
    assert stop.value.code == 2
    for flag in ("--resume", "--fresh", "--finetune"):
        assert flag in train_cli.build_parser().format_help()


# --------------------------------------------------------------------------- start-up lines


def test_one_attention_line_with_its_reason_and_no_requested_line_for_auto_knn(checkpoint, tmp_path, caplog):
    from dino_sparo.evaluation.knn_search import _log_backend

    caplog.set_level(logging.INFO, logger="dino_sparo")
    train(tiny_config(f"output_dir={tmp_path / 'run'}", "max_steps=2", "eval.knn_every=1", "eval.knn_train_limit=100",
                      "eval.knn_test_limit=20", "eval.knn_k=5", "data.limit=32"))
    attention = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention")]
    assert len(attention) == 1 and "(auto: " in attention[0], attention
    _log_backend.cache_clear()
    caplog.clear()
    knn_cli.main(["--checkpoint", str(checkpoint), *KNN, "--backend", "auto", "--output-json",
                  str(tmp_path / "k.json")])
    lines = [r.getMessage() for r in caplog.records if "k-NN backend" in r.getMessage()]
    assert len(lines) == 1 and "(auto: the first available of" in lines[0] and "requested" not in lines[0]


def test_bench_help_states_the_rule_precision_auto_follows():
    from dino_sparo.cli import bench
    from dino_sparo.runtime import NATIVE_BF16_CPU_FLAGS

    text = " ".join(bench.build_parser().format_help().split())
    assert "fp32 on CPU" not in text and "native bf16" in text
    assert all(flag in text for flag in NATIVE_BF16_CPU_FLAGS)


def test_a_loader_worker_s_error_is_told_by_its_last_line(capsys):
    """DataLoader re-raises a worker's error with the worker's traceback in its message: one line stays."""
    from dino_sparo.cli.common import run_program
    from dino_sparo.data.datasets import CorruptImageError

    def fails():
        raise CorruptImageError("Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback (most "
                                "recent call last):\n  File \"x.py\", line 1, in f\ndino_sparo.data.datasets."
                                "CorruptImageError: corrupt or unreadable image /d/a.png: OSError: truncated")

    with pytest.raises(SystemExit) as stop:
        run_program("prog", fails)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and err == ["prog: error: corrupt or unreadable image /d/a.png: OSError: truncated"]
