"""The submitit launcher: a local job trains to the end; a preempted one (signalled as SLURM does)
requeues itself and finishes with the same parameters; the sbatch script carries every resource
option (only the cluster's binaries are faked); evaluations run as generic entry-point jobs."""

import contextlib
import io
import json
import os
import pickle
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from dino_sparo.checkpoint import load_checkpoint
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from dino_sparo.cli.submit import ENTRY_POINTS, build_parser, main, plan_submission
from dino_sparo.submit import EntryPointJob

from conftest import TINY_TRAINING, program_exit, read_log

needs_data = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                reason="Fashion-MNIST not installed (make data)")

TINY = [
    *TINY_TRAINING, "data.limit=96", "dino.out_dim=256", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "optim.warmup_epochs=1", "optim.lr=0.004",
]  # 6 steps per epoch, 12 steps
LOCAL = ["--cluster", "local", "--gpus-per-node", "0", "--timeout-min", "20"]  # 20 min: a signal is a preemption


def submit_local(output_dir: Path) -> str:
    """Submit the tiny training to the local executor; returns the job id printed."""
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setenv("OMP_NUM_THREADS", "1")  # the same threads in every job: bit-identical runs
        assert main(LOCAL + TINY + [f"output_dir={output_dir}"]) == 0
    out = printed.getvalue()
    assert f"training output: {output_dir}" in out and "log of task 0:" in out
    return out.split("submitted job ", 1)[1].split()[0]


def wait_for_result(output_dir: Path, job_id: str, timeout_s: float = 240) -> dict:
    result = output_dir / "submitit" / f"{job_id}_0_result.pkl"
    deadline = time.monotonic() + timeout_s
    while not result.exists():
        if time.monotonic() > deadline:
            os.kill(int(job_id), signal.SIGTERM)  # the controller passes it to the task
            log = output_dir / "submitit" / f"{job_id}_0_log.err"
            pytest.fail(f"local job did not finish:\n{log.read_text()[-3000:] if log.exists() else ''}")
        time.sleep(0.1)
    time.sleep(0.2)  # the result file is moved into place when complete; let the job exit
    with result.open("rb") as handle:
        outcome, value = pickle.load(handle)
    assert outcome == "success", value
    return value


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A local job trained to the end: its output folder and result."""
    output_dir = tmp_path_factory.mktemp("local") / "run"
    job_id = submit_local(output_dir)
    return output_dir, wait_for_result(output_dir, job_id)


@needs_data
def test_local_job_trains_to_the_end(uninterrupted):
    output_dir, result = uninterrupted
    assert result["step"] == 12 and "stopped_by" not in result
    assert load_checkpoint(output_dir / "checkpoint.pth")["step"] == 12
    assert [r["step"] for r in read_log(output_dir)] == list(range(1, 13))
    assert any(p.name.endswith("_0_log.err") for p in (output_dir / "submitit").iterdir())


def _task_pid(controller_pid: int) -> int:
    children = Path(f"/proc/{controller_pid}/task/{controller_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@needs_data
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
def test_preempted_local_job_requeues_and_ends_as_the_uninterrupted_one(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    job_id = submit_local(tmp_path)
    deadline = time.monotonic() + 120
    while len(read_log(tmp_path)) < 2:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.02)
    task = _task_pid(int(job_id))
    os.kill(task, signal.SIGTERM)  # SLURM's preemption: SIGTERM, then submitit's USR2
    os.kill(task, signal.SIGUSR2)
    result = wait_for_result(tmp_path, job_id)
    assert result["step"] == 12 and "stopped_by" not in result
    train_log = (tmp_path / "train.log").read_text()
    assert "by SIGTERM and SIGUSR2" in train_log and "resumed from" in train_log  # requeued, resumed
    submitit_log = (tmp_path / "submitit" / f"{job_id}_0_log.err").read_text()
    assert "Requeued job" in submitit_log
    a, b = load_checkpoint(reference / "checkpoint.pth"), load_checkpoint(tmp_path / "checkpoint.pth")
    for name in ("student", "teacher", "loss", "optimizer"):
        flat_a, flat_b = _tensors(a[name]), _tensors(b[name])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), f"{name}.{key} differs after the requeue"
    assert [r["loss"] for r in read_log(reference)] == [r["loss"] for r in read_log(tmp_path)]


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _tensors(sub, f"{prefix}.{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _tensors(sub, f"{prefix}.{i}").items()}
    return {prefix: torch.tensor(tree)} if isinstance(tree, (int, float)) else {}


def test_checkpoint_requeues_the_same_command():
    job = EntryPointJob(ENTRY_POINTS["train"], ["--config", "c.yaml", "optim.lr=0.1"])
    delayed = pickle.loads(pickle.dumps(job.checkpoint()))  # submitit pickles it into the job folder
    again = delayed.function
    assert isinstance(again, EntryPointJob)
    assert (again.entry_point, again.argv, again.attempt) == (job.entry_point, job.argv, 1)
    assert delayed.args == () and delayed.kwargs == {}


def _fake_slurm(bin_dir: Path) -> None:
    """srun and sbatch stand-ins: the only part of SLURM that is mocked."""
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", 'echo "Submitted batch job 4242"')):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sbatch_script_carries_every_resource_option(tmp_path, monkeypatch, capsys):
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    output_dir = tmp_path / "out"
    code = main(["--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "10", "--mem-gb", "64",
                 "--timeout-min", "4320", "--partition", "gpu", "--account", "vision", "--qos", "high",
                 "--constraint", "a100", "--comment", "deadline", "--exclude", "node[03-05]", "--name", "s16",
                 "--signal-delay-s", "90", "--max-num-timeout", "7",
                 "--config", "configs/dino/demo_fashion_mnist.yaml", f"output_dir={output_dir}", "optim.epochs=9"])
    assert code == 0
    out = capsys.readouterr().out
    assert "submitted job 4242" in out and f"{output_dir}/submitit/4242/4242_0_log.out" in out
    script = (output_dir / "submitit" / "4242" / "4242_submission.sh").read_text()
    for flag in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=10", "--mem=64GB",
                 "--time=4320", "--partition=gpu", "--account=vision", "--qos=high", "--constraint=a100",
                 "--comment=deadline", "--exclude='node[03-05]'", "--job-name=s16", "--signal=USR2@90"):
        assert f"#SBATCH {flag}\n" in script, flag
    assert "srun" in script and "submitit.core._submit" in script
    with (output_dir / "submitit" / "4242" / "4242_submitted.pkl").open("rb") as handle:
        delayed = pickle.load(handle)
    job = delayed.function
    assert job.entry_point == ENTRY_POINTS["train"]
    assert job.argv[:2] == ["--config", str(Path("configs/dino/demo_fashion_mnist.yaml").absolute())]
    assert "optim.epochs=9" in job.argv and job.argv[-1] == f"output_dir={output_dir}"
    assert delayed._timeout_countdown == 7  # time-outs allowed before the job stops requeueing


def test_training_jobs_ask_for_a_core_per_loader_worker_and_one_more(tmp_path, monkeypatch, capsys):
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for extra, cpus in (([], 7), (["--cpus-per-task", "3"], 3)):
        output_dir = tmp_path / f"out{cpus}"
        assert main([*extra, "--config", "configs/dino/demo_fashion_mnist.yaml", f"output_dir={output_dir}",
                     "data.num_workers=6"]) == 0
        script = next((output_dir / "submitit").rglob("*_submission.sh")).read_text()
        assert f"#SBATCH --cpus-per-task={cpus}\n" in script


def test_cli_refuses_bad_requests(tmp_path, capsys):
    bad = [
        (["--cluster", "local", "--nodes", "2", f"output_dir={tmp_path}"], "--nodes must be 1"),
        (["--cluster", "local", "--gpus-per-node", "2", "--tasks-per-node", "1", f"output_dir={tmp_path}"],
         "one process per GPU"),
        (["--cluster", "local", "optim.learning_rate=1"], "unknown config key 'optim.learning_rate'"),
        (["--job", "knn", "--cluster", "local", "--", "--test-limit", "5"], "--job-dir"),
        (["--job", "knn", "--config", "x.yaml", "--", "--checkpoint", "c.pth"], "--config is for training"),
    ]
    for argv, message in bad:
        code, last = program_exit(capsys, main, argv)
        assert code == 2 and message in last and last.startswith("dino-sparo-submit: error: "), argv


def test_evaluation_jobs_pass_their_arguments_through(tmp_path):
    args = build_parser().parse_args(["--job", "linear", "--", "--checkpoint", str(tmp_path / "run" / "checkpoint.pth"),
                                      "--epochs", "3"])
    plan = plan_submission(args)
    assert plan.entry_point == ENTRY_POINTS["linear"] == "dino_sparo.cli.linear:main"
    assert plan.argv == ["--checkpoint", str(tmp_path / "run" / "checkpoint.pth"), "--epochs", "3"]
    assert plan.job_dir == tmp_path / "run" / "submitit"


def test_any_entry_point_runs_in_process_on_the_debug_cluster(tmp_path, capsys):
    assert main(["--cluster", "debug", "--entry-point", "json:dumps", "--job-dir", str(tmp_path),
                 "--", "--checkpoint", "x"]) == 0
    assert 'finished: ["--checkpoint", "x"]' in capsys.readouterr().out


@needs_data
def test_knn_evaluation_job_on_a_trained_checkpoint(uninterrupted, tmp_path, capsys):
    run, _ = uninterrupted
    result = tmp_path / "knn.json"
    code = main(["--job", "knn", "--cluster", "debug", "--", "--checkpoint", str(run / "checkpoint.pth"),
                 "--train-limit", "100", "--test-limit", "50", "--num-workers", "0", "--device", "cpu",
                 "--ks", "10,20", "--no-cache", "--quiet", "--output-json", str(result)])
    assert code == 0, capsys.readouterr().err
    assert f"job folder: {run / 'submitit'}" in capsys.readouterr().out
    assert result.exists()
