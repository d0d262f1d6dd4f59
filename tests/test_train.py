"""The training program end to end on a tiny config: learning, exact resume, clean failures."""

import json
import math
from pathlib import Path

import pytest
import torch

from dino_sparo.checkpoint import load_checkpoint
from dino_sparo.config import ConfigError, load_config
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from dino_sparo.cli.train import main
from dino_sparo.data.samplers import ResumableSampler
from dino_sparo.train import NonFiniteLossError, train

from conftest import TINY_TRAINING, read_log, tiny_config

pytestmark = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                reason="Fashion-MNIST not installed (make data)")

TINY = [
    *TINY_TRAINING, "model.embed_dim=48", "model.drop_path_rate=0.1", "data.limit=128",
    "dino.out_dim=128", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "optim.epochs=3", "optim.warmup_epochs=1", "optim.lr=0.005", "optim.freeze_last_layer=1",
]


def tiny(tmp_path, *extra):
    return tiny_config(f"output_dir={tmp_path}", *extra, base=TINY)


def test_a_few_steps_lower_the_loss(tmp_path):
    # A frozen teacher and centre (momentum 1) make the target fixed: the student must approach it.
    # (With the usual moving teacher, DINO's loss may rise early on while the centre flattens it.)
    train(tiny(tmp_path, "optim.epochs=4", "dino.momentum_teacher=1.0",
               "dino.center_momentum=1.0"))
    losses = [row["loss"] for row in read_log(tmp_path)]
    assert len(losses) == 4 * 8
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first - 0.1, (first, last)


def test_outputs_and_checkpoint_contents(tmp_path):
    train(tiny(tmp_path, "max_steps=3"))
    assert {p.name for p in tmp_path.iterdir()} >= {"config.yaml", "checkpoint.pth", "log.jsonl", "train.log"}
    state = load_checkpoint(tmp_path / "checkpoint.pth")
    assert state["step"] == 3 and state["epoch"] == 0
    for key in ("student", "teacher", "optimizer", "loss", "rng", "config"):
        assert key in state
    assert state["loss"]["center"].abs().sum() > 0  # the DINO centre is saved
    assert load_config(tmp_path / "config.yaml") == tiny(tmp_path, "max_steps=3")
    row = read_log(tmp_path)[-1]
    for key in ("loss", "lr", "teacher_entropy", "teacher_mean_entropy", "kl_teacher_student", "images_per_s"):
        assert key in row


@pytest.mark.parametrize("workers,augment_on", [(0, "loader"), (2, "loader"), (2, "device")])
def test_stop_and_resume_is_bit_identical(tmp_path, workers, augment_on):
    full, split = tmp_path / "full", tmp_path / "split"
    options = [f"data.num_workers={workers}", f"data.augment_on={augment_on}"]
    train(tiny(full, "max_steps=13", *options))
    train(tiny(split, "max_steps=5", *options))  # stops mid-epoch (8 steps/epoch)
    train(tiny(split, "max_steps=13", *options))  # the same command resumes
    a, b = load_checkpoint(full / "checkpoint.pth"), load_checkpoint(split / "checkpoint.pth")
    assert a["step"] == b["step"] == 13
    for name in ("student", "teacher", "loss"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), f"{name}.{key} differs after resume"
    losses_full = [r["loss"] for r in read_log(full)]
    losses_split = [r["loss"] for r in read_log(split)]
    assert losses_full == losses_split


def test_every_crop_reaches_the_loss_and_last_layer_is_frozen_first_epoch(tmp_path):
    cfg = tiny(tmp_path, "max_steps=2")
    from dino_sparo.methods.dino import DinoMethod
    from dino_sparo.runtime import seed_everything
    seed_everything(cfg.seed)  # as train() does: the same initial weights
    method = DinoMethod(cfg, torch.device("cpu"))
    before = [p.clone() for p in method.student.head.last_layer_parameters()]
    train(cfg)
    state = load_checkpoint(tmp_path / "checkpoint.pth")["student"]
    after = [v for k, v in state.items() if "last_layer" in k]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    # a local crop's pixels change the student output: it is not dropped on the way
    crops = [torch.randn(2, 3, s, s, requires_grad=True) for s in (28, 28, 12, 12)]
    method.loss_fn(method.student(crops), method.teacher(crops[:2]).detach(), cfg.dino.teacher_temp).backward()
    assert all(c.grad.abs().sum() > 0 for c in crops)


def test_non_finite_loss_stops_with_the_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    from dino_sparo.methods.dino import DinoMethod
    original = DinoMethod.loss

    def poisoned(self, batch, step, epoch, **values):
        loss, stats = original(self, batch, step, epoch, **values)
        return (loss * float("nan") if step == 10 else loss), stats

    monkeypatch.setattr(DinoMethod, "loss", poisoned)
    with pytest.raises(NonFiniteLossError) as stop:
        train(tiny(tmp_path))
    # one step numbering (issue 22, defect 6): the 11th step is log.jsonl's step 11, as the bar and checkpoints count
    rows = read_log(tmp_path)
    assert [row["step"] for row in rows] == list(range(1, 11)) and all(math.isfinite(r["loss"]) for r in rows)
    assert "non-finite loss at step 11 (epoch 1)" in str(stop.value)
    assert load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 8  # the end of epoch 0, untouched


def test_sampler_shards_and_resumes():
    whole = list(ResumableSampler(100, 8, seed=3))
    assert len(whole) == 96 and len(set(whole)) == 96
    ranks = [list(ResumableSampler(100, 4, rank=r, world_size=2, seed=3)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(whole)
    resumed = ResumableSampler(100, 8, seed=3)
    resumed.set_epoch(0, start_batch=5)
    assert list(resumed) == whole[40:]


def test_cli_refuses_bad_keys_and_missing_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(TINY + [f"output_dir={tmp_path}", "optim.learning_rate=0.1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dino-sparo-train: error: unknown config key 'optim.learning_rate'") and "\n" not in err
    with pytest.raises(SystemExit) as stopped:  # a missing data path is a configuration error (issue 22, defect 5)
        main(TINY + [f"output_dir={tmp_path}", f"data.path={tmp_path / 'nowhere'}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and "config key 'data.path'" in last and "nowhere" in last
    assert last in (tmp_path / "train.log").read_text()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "key.sub=value" in capsys.readouterr().out


def test_config_types_are_checked_at_load(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size_per_gpu"):
        tiny(tmp_path, "data.batch_size_per_gpu=many")


def run_train_cli(*args, timeout=120):
    import os
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dino_sparo.cli.train", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("override,key", [
    ("data.batch_size_per_gpu=0", "data.batch_size_per_gpu"),
    ("model.patch_size=5", "model.img_size"),
    ("crops.global_crops_number=3", "crops.global_crops_number"),
    ("model.arch=vit_huge", "model.arch"),
])
def test_a_config_error_is_one_line_on_stderr_and_in_train_log_with_exit_2(tmp_path, override, key):
    done = run_train_cli(*TINY, f"output_dir={tmp_path}", override)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"config key '{key}'" in lines[0], done.stderr[-3000:]
    assert lines[0].startswith("dino-sparo-train: error: ") and lines[0] in (tmp_path / "train.log").read_text()
    assert not (tmp_path / "checkpoint.pth").exists()


def test_user_errors_are_told_from_bugs_by_type_not_text(capsys):
    from dino_sparo.cli.common import run_program
    from dino_sparo.errors import CheckpointError, UsageError

    def fails(exc):
        def run():
            raise exc
        return run

    cases = [(ConfigError("anything"), 2), (UsageError("--x must be > 0"), 2), (FileNotFoundError("no such file"), 2),
             (ValueError("config key 'precision' in the text decides nothing"), 1),  # a bug: its traceback
             (ZeroDivisionError("division by zero"), 1), (CheckpointError("checkpoint x cannot be read"), 1),
             (NonFiniteLossError("non-finite loss at step 3"), 1)]
    for exc, code in cases:
        with pytest.raises(SystemExit) as stop:
            run_program("prog", fails(exc))
        err = capsys.readouterr().err
        assert stop.value.code == code, exc
        assert ("Traceback" in err) == (type(exc) in (ValueError, ZeroDivisionError)), err
        assert err.strip().splitlines()[-1].startswith("prog: ") and str(exc) in err.strip().splitlines()[-1]
    with pytest.raises(SystemExit) as stop:
        run_program("prog", lambda: {"stopped_by": ["SIGTERM"]})
    assert stop.value.code == 143
    assert run_program("prog", lambda: {"loss": 1.0}) == {"loss": 1.0}


def test_resume_refuses_another_architecture_naming_the_keys(tmp_path):
    train(tiny(tmp_path, "max_steps=2"))
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with pytest.raises(ConfigError, match=r"another architecture .*dino.out_dim 128 -> 64, model.depth 2 -> 3"):
        train(tiny(tmp_path, "max_steps=4", "model.depth=3", "dino.out_dim=64"))
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_resume_with_a_changed_recipe_warns_naming_each_key(tmp_path):
    train(tiny(tmp_path, "max_steps=2"))
    train(tiny(tmp_path, "max_steps=3", "optim.lr=0.002", "optim.epochs=4", "data.num_workers=1", "log_every=2"))
    log = (tmp_path / "train.log").read_text()
    warned = [line for line in log.splitlines() if "resuming with a changed recipe" in line]
    assert len(warned) == 2, warned  # not for max_steps, num_workers or log_every: they do not change the recipe
    assert "optim.epochs 3 -> 4" in warned[0] and "optim.lr 0.005 -> 0.002" in warned[1]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 3


def _start_training_process(tmp_path):
    """A long tiny training in its own process, returned once it has written its first log row."""
    import os
    import subprocess
    import sys
    import time
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "dino_sparo.cli.train", *TINY, "optim.epochs=50",
                                f"output_dir={tmp_path}"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "log.jsonl").exists() or not (tmp_path / "log.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_run_stopped_by_a_signal_exits_with_128_plus_its_number(tmp_path, sig, code):
    import signal
    import subprocess
    process = _start_training_process(tmp_path)
    process.send_signal(getattr(signal, sig))
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running 120 s after {sig}: {process.communicate()[1][-2000:]}")
    assert process.returncode == code == 128 + getattr(signal, sig), err[-3000:]
    step = load_checkpoint(tmp_path / "checkpoint.pth")["step"]
    assert 0 < step < 50 * 8 and f"stopped at step {step} by {sig}" in err


@pytest.mark.parametrize("bad_step,says", [(10, "checkpoint.pth at step 8, is kept"),
                                            (3, "No checkpoint was written yet")])
def test_non_finite_loss_message_says_which_checkpoint_exists(tmp_path, monkeypatch, bad_step, says):
    from dino_sparo.methods.dino import DinoMethod
    original = DinoMethod.loss

    def poisoned(self, batch, step, epoch, **values):
        loss, stats = original(self, batch, step, epoch, **values)
        return (loss * float("nan") if step == bad_step else loss), stats

    monkeypatch.setattr(DinoMethod, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=says):
        train(tiny(tmp_path))
    assert (tmp_path / "checkpoint.pth").is_file() == (bad_step > 8)


def test_resume_after_sigkill_drops_the_log_rows_past_the_checkpoint(tmp_path):
    import os
    import subprocess
    import sys
    import time
    run, reference = tmp_path / "killed", tmp_path / "reference"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # as this process: identical sums
    process = subprocess.Popen([sys.executable, "-m", "dino_sparo.cli.train", *TINY, f"output_dir={run}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "log.jsonl").exists() or len(read_log_lines(run)) < 10:  # a row past the step-8 checkpoint
        assert process.poll() is None and time.monotonic() < deadline, "training did not get past step 9"
        time.sleep(0.005)
    process.kill()  # SIGKILL just after a log row
    process.wait()
    saved = load_checkpoint(run / "checkpoint.pth")["step"]
    assert json.loads(read_log_lines(run)[-1])["step"] > saved  # rows the resumed run writes again
    train(tiny(run))
    train(tiny(reference))
    steps = [row["step"] for row in read_log(run)]
    assert steps == sorted(set(steps)) == list(range(1, 3 * 8 + 1))
    assert [row["loss"] for row in read_log(run)] == [row["loss"] for row in read_log(reference)]


def read_log_lines(path):
    return [line for line in (path / "log.jsonl").read_text().splitlines() if line.endswith("}")]


def test_log_lines_during_training_do_not_break_the_progress_bar(tmp_path):
    import re
    import signal
    import subprocess
    process = _start_training_process(tmp_path)
    process.send_signal(signal.SIGTERM)  # logged from the middle of the loop, while the bar is drawn
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("still running 120 s after SIGTERM")
    # what a terminal shows of each line: the text after its last carriage return
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    logged = [line for line in shown if re.search(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", line)]
    assert any("received SIGTERM" in line for line in logged), err[-3000:]
    broken = [line for line in logged if not re.match(r"\d\d:\d\d:\d\d ", line)]  # glued to a bar
    assert not broken, broken


PRETRAINED_RUN = ["max_steps=1", "dino.momentum_teacher=1.0"]  # a teacher that keeps its starting weights


def timm_vit(embed_dim=48):
    import timm
    return timm.models.vision_transformer.VisionTransformer(img_size=28, patch_size=4, embed_dim=embed_dim, depth=2,
                                                            num_heads=3, num_classes=10)


@pytest.fixture(scope="module")
def fresh_teacher(tmp_path_factory):
    """The teacher of the same run without model.pretrained: what the newly initialised parts must equal."""
    output = tmp_path_factory.mktemp("fresh")
    train(tiny(output, *PRETRAINED_RUN))
    return load_checkpoint(output / "checkpoint.pth")["teacher"]


def _layout(state, layout):
    if layout == "timm":
        return state
    if layout == "dino_release":  # dino_deitsmall16_pretrain.pth: the backbone only
        return {k: v for k, v in state.items() if not k.startswith("head.")}
    if layout == "wrapped":  # DeiT's and timm's training checkpoints
        return {"model": state, "epoch": 300}
    head = {"head.mlp.0.weight": torch.zeros(3, 48)}  # DINO's training checkpoint: the wrapper's keys
    return {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **head},
            "student": {**{f"module.backbone.{k}": v for k, v in state.items()}}, "epoch": 3}


@pytest.mark.parametrize("layout", ["timm", "safetensors", "wrapped", "dino_release", "dino_checkpoint"])
def test_pretrained_backbone_from_timm_or_dino_is_loaded_and_the_rest_initialised(tmp_path, fresh_teacher, layout):
    source = timm_vit().state_dict()
    weights = tmp_path / ("weights.safetensors" if layout == "safetensors" else "weights.pth")
    if layout == "safetensors":
        from safetensors.torch import save_file
        save_file(source, str(weights))
    else:
        torch.save(_layout(source, layout), weights)
    train(tiny(tmp_path / "run", *PRETRAINED_RUN, f"model.pretrained={weights}"))
    teacher = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["teacher"]
    backbone = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    for key, value in backbone.items():
        if key.startswith("sparo."):  # the read-out the file has none of: as in a run without it
            assert torch.equal(value, fresh_teacher[f"backbone.{key}"]), key
        else:
            assert torch.equal(value, source[key]), key
    for key, value in teacher.items():
        if key.startswith("head."):
            assert torch.equal(value, fresh_teacher[key]), key
    log = (tmp_path / "run" / "train.log").read_text()
    assert "loaded into student.backbone and teacher.backbone" in log
    assert "newly initialised: the backbone's sparo.*, student.head, teacher.head" in log


def test_pretrained_from_a_dino_sparo_checkpoint_brings_its_read_out(tmp_path, fresh_teacher):
    train(tiny(tmp_path / "first", "max_steps=2"))
    first = load_checkpoint(tmp_path / "first" / "checkpoint.pth")["teacher"]
    train(tiny(tmp_path / "run", *PRETRAINED_RUN, f"model.pretrained={tmp_path / 'first' / 'checkpoint.pth'}"))
    teacher = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["teacher"]
    for key, value in teacher.items():
        expected = first[key] if key.startswith("backbone.") else fresh_teacher[key]  # the head starts anew
        assert torch.equal(value, expected), key
    assert "newly initialised: student.head, teacher.head" in (tmp_path / "run" / "train.log").read_text()


def test_pretrained_weights_that_do_not_fit_are_refused_naming_the_key(tmp_path):
    torch.save(timm_vit(embed_dim=96).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ConfigError, match=r"config key 'model.pretrained' \(.*wide.pth\).*cls_token \[1, 1, 96\] in the "
                                          r"file, \[1, 1, 48\] here"):
        train(tiny(tmp_path / "run", "max_steps=1", f"model.pretrained={tmp_path / 'wide.pth'}"))
    with pytest.raises(ConfigError, match="config key 'model.pretrained'.*no such file"):
        train(tiny(tmp_path / "run", "max_steps=1", f"model.pretrained={tmp_path / 'missing.pth'}"))


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_scalars_of_log_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny(tmp_path, "max_steps=10", "log.tensorboard=true", "eval.knn_every=1", "eval.knn_k=5",
               "eval.knn_train_limit=50", "eval.knn_test_limit=20"))
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    expected: dict = {}
    for row in read_log(tmp_path):
        group = "train" if "loss" in row else "eval"
        for key, value in row.items():
            if key not in ("step", "epoch"):
                expected.setdefault(f"{group}/{key}", []).append((row["step"], value))
    assert {"train/loss", "train/lr", "train/images_per_s", "train/teacher_entropy", "eval/knn_top1"} <= set(expected)
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        assert [step for step, _ in scalars[tag]] == [step for step, _ in points], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_missing_is_one_line_naming_the_key(tmp_path):
    import os
    import subprocess
    import sys
    blocked = "import sys; sys.modules['tensorboard'] = None; from dino_sparo.cli.train import main; main()"  # not installed
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", blocked, *TINY, "max_steps=1", "log.tensorboard=true",
                           f"output_dir={tmp_path}"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "config key 'log.tensorboard' needs the tensorboard package" in errors[0]
    assert "Traceback" not in done.stderr
