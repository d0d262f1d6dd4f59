"""Launcher variables read without a cluster; two gloo processes (torchrun) train as one process
with the same global batch does, write one set of files, and stop and resume exactly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino_sparo import distributed
from dino_sparo.checkpoint import load_checkpoint
from dino_sparo.config import load_config
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from dino_sparo.distributed import DistInfo, env_info, expand_nodelist, first_host, port_for_job

from conftest import TINY_TRAINING, read_log

# --------------------------------------------------------------------------------------------
# Variables of torchrun and SLURM
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodelist, hosts", [
    ("node07", ["node07"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[8-10],cpu-a1", ["gpu8", "gpu9", "gpu10", "cpu-a1"]),
    ("rack[1-2]-n[098-099]", ["rack1-n098", "rack1-n099", "rack2-n098", "rack2-n099"]),
    ("a[3],b[005-006,9]", ["a3", "b005", "b006", "b9"]),
])
def test_nodelist_expands_ranges_with_padding(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["", "node[01-", "node]", "node[a-b]", "node[5-3]", "n1,,n2"])
def test_nodelist_errors_name_the_list(bad):
    with pytest.raises(ValueError, match="SLURM node list"):
        expand_nodelist(bad)


SLURM_TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
              "SLURM_JOB_NODELIST": "learn[0100-0103]", "SLURM_NTASKS_PER_NODE": "2(x4)"}


def test_slurm_task_variables_give_rank_and_master():
    info = env_info(SLURM_TASK)
    assert (info.rank, info.world_size, info.local_rank) == (5, 8, 1)
    assert info.master_addr == "learn0100" and info.launcher == "slurm"
    assert 20000 <= info.master_port < 60000
    assert env_info(dict(SLURM_TASK, SLURM_PROCID="0")).master_port == info.master_port  # every task agrees


def test_requeued_job_gets_a_fresh_port():
    ports = {env_info(dict(SLURM_TASK, SLURM_RESTART_COUNT=str(n))).master_port for n in range(5)}
    assert len(ports) == 5
    assert port_for_job("4242", 0) == env_info(SLURM_TASK).master_port


def test_launcher_precedence_and_single_process():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    info = env_info({**SLURM_TASK, **torchrun})  # torchrun inside a SLURM allocation wins
    assert info == DistInfo(1, 2, 1, "h", 1234, "torchrun")
    assert env_info({}) == DistInfo()
    assert env_info(dict(SLURM_TASK, SLURM_NTASKS="1")).world_size == 1  # one task: no process group
    step_of_one = dict(SLURM_TASK, SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="1")  # srun -n1 in a larger job
    assert env_info(step_of_one).world_size == 1
    assert env_info(dict(SLURM_TASK, MASTER_ADDR="login", MASTER_PORT="999")).master_addr == "login"


def test_bad_launcher_variables_are_named():
    with pytest.raises(ValueError, match="RANK"):
        env_info({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        env_info({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        env_info({k: v for k, v in SLURM_TASK.items() if k != "SLURM_JOB_NODELIST"})


def test_gloo_on_cpu_and_never_nccl_without_gpus():
    assert distributed.choose_backend("cpu") == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no GPU"):
            distributed.choose_backend("cuda")


def test_collectives_are_identities_in_one_process():
    x = torch.arange(3.0)
    assert torch.equal(distributed.all_reduce_mean(x.clone()), x)
    assert torch.equal(distributed.all_reduce_max(x.clone()), x)
    flags = distributed.AnyRankFlags(["SIGTERM", "SIGUSR2"])
    assert flags.vote({"SIGUSR2"}) == {"SIGUSR2"} and flags.close() == set()


def _vote_in_two_processes(rank: int, init_file: str, default_backend: str, queue) -> None:
    """Rank 1 raises SIGTERM before step 2; every rank records what each step's vote agreed on."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if default_backend == "nccl":  # as under NCCL: the vote must build a gloo group of its own
        real = dist.get_backend
        dist.get_backend = lambda group=None: "nccl" if group is None else real(group)
    try:
        flags = distributed.AnyRankFlags(["SIGTERM", "SIGUSR2"])
        agreed = []
        for step in range(4):
            raised = {"SIGTERM"} if rank == 1 and step >= 2 else set()
            agreed.append(sorted(flags.vote(raised)))
            assert flags._pending[0].device.type == "cpu"
        agreed.append(sorted(flags.close()))
        own_group = flags.group is not None
        if own_group:
            dist.get_backend = real
            assert dist.get_backend(flags.group) == "gloo"
        queue.put((rank, agreed, own_group))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("default_backend", ["gloo", "nccl"])
def test_two_ranks_agree_on_a_stop_one_step_late_on_a_cpu_group(tmp_path, default_backend):
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_vote_in_two_processes,
                                 args=(rank, str(tmp_path / "init"), default_backend, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = dict((rank, (agreed, own)) for rank, agreed, own in (queue.get(timeout=120) for _ in processes))
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    # the flag raised on rank 1 before step 2 is agreed by both ranks at step 3 (one step late), and stays
    expected = [[], [], [], ["SIGTERM"], ["SIGTERM"]]
    assert results[0][0] == results[1][0] == expected
    assert results[0][1] == results[1][1] == (default_backend == "nccl")


# --------------------------------------------------------------------------------------------
# Two processes against one
# --------------------------------------------------------------------------------------------

needs_data = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                reason="Fashion-MNIST not installed (make data)")

TINY = [
    *TINY_TRAINING, "dino.out_dim=256", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "optim.epochs=3", "optim.warmup_epochs=1", "optim.lr=0.004",
]  # 64 images, global batch 16: 4 steps per epoch, 12 steps


def torchrun(output_dir: Path, *extra: str, wait: bool = True):
    """``torchrun --nproc_per_node 2 -m dino_sparo.cli.train`` on the tiny config, 8 images per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dino_sparo.cli.train", *TINY, "data.batch_size_per_gpu=8", f"output_dir={output_dir}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = process.communicate(timeout=240)
        assert process.returncode == 0, out[-4000:]
    return process


def assert_states(a: dict, b: dict, atol: float) -> None:
    for name in ("student", "teacher", "loss"):
        assert a[name].keys() == b[name].keys()
        for key, value in a[name].items():
            other = b[name][key]
            if atol == 0:
                assert torch.equal(value, other), f"{name}.{key} differs"
                continue
            if key.endswith("attn.qkv.bias"):
                # The key bias adds a constant to each query's logits, which softmax ignores: its
                # gradient is zero up to rounding, and AdamW turns that rounding noise into updates
                # of about lr. Compare the query and value biases only.
                dim = value.shape[0] // 3
                value, other = torch.cat([value[:dim], value[2 * dim:]]), torch.cat([other[:dim], other[2 * dim:]])
            assert torch.allclose(value, other, rtol=0, atol=atol), \
                f"{name}.{key}: max difference {(value - other).abs().max():.3g}"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(output_dir)
    return output_dir


@needs_data
def test_two_processes_match_one_process_with_the_same_global_batch(two_process_run, tmp_path):
    from dino_sparo.train import train

    train(load_config(None, TINY + ["data.batch_size_per_gpu=16", f"output_dir={tmp_path}"]))
    two, one = read_log(two_process_run), read_log(tmp_path)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 13))  # one line per step
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)  # lr scaled by the same global batch
    a, b = load_checkpoint(two_process_run / "checkpoint.pth"), load_checkpoint(tmp_path / "checkpoint.pth")
    assert a["step"] == b["step"] == 12
    assert_states(a, b, atol=1e-5)
    assert len(a["rng"]) == 2  # each rank's RNG states


@needs_data
def test_two_processes_match_one_process_with_augmentation_on_the_device(tmp_path):
    """``data.augment_on: device`` draws each crop's parameters from the sample's seed, as the loader
    path does: two processes still train as one with the same global batch."""
    from dino_sparo.train import train

    torchrun(tmp_path / "two", "data.augment_on=device", "max_steps=4")
    train(load_config(None, TINY + ["data.batch_size_per_gpu=16", "data.augment_on=device", "max_steps=4",
                                    f"output_dir={tmp_path / 'one'}"]))
    two, one = read_log(tmp_path / "two"), read_log(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
    assert_states(load_checkpoint(tmp_path / "two" / "checkpoint.pth"),
                  load_checkpoint(tmp_path / "one" / "checkpoint.pth"), atol=1e-5)


@needs_data
def test_only_rank_zero_writes(two_process_run):
    names = sorted(p.name for p in two_process_run.iterdir())
    assert names == ["checkpoint.pth", "config.yaml", "log.jsonl", "train.log"]
    config_text = (two_process_run / "config.yaml").read_text()
    assert "batch_size_per_gpu: 8" in config_text and "global batch 16" in config_text
    assert read_log(two_process_run)[-1]["global_batch_size"] == 16
    assert (two_process_run / "train.log").read_text().count("global batch 16") == 1


def _rank_pids(agent_pid: int) -> dict[int, int]:
    """Rank -> pid of the worker processes torchrun's agent started."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


@needs_data
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
def test_signal_to_one_rank_stops_both_and_resume_is_bit_identical(two_process_run, tmp_path):
    process = torchrun(tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "log.jsonl").exists() and len(read_log(tmp_path)) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.02)
        os.kill(_rank_pids(process.pid)[1], signal.SIGUSR2)  # the warning SLURM sends, to rank 1 only
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0 and "exitcode  : 140" in out, out[-4000:]  # stopped by SIGUSR2: 128 + 12
    stopped = load_checkpoint(tmp_path / "checkpoint.pth")
    assert 2 <= stopped["step"] < 12, "the stop came too late to test a resume"
    assert "re-run the same command to resume" in out
    torchrun(tmp_path)  # the same command resumes
    a, b = load_checkpoint(two_process_run / "checkpoint.pth"), load_checkpoint(tmp_path / "checkpoint.pth")
    assert b["step"] == 12
    assert_states(a, b, atol=0)
    assert [r["loss"] for r in read_log(two_process_run)] == [r["loss"] for r in read_log(tmp_path)]


@needs_data
def test_two_processes_train_sparo_with_separate_values_and_a_batch_norm_head(tmp_path):
    """DistributedDataParallel waits for every parameter's gradient: with ``share_kv: false`` the read-out
    once had a key bias without one, and DDP failed at step 2. With the head's batch norm (per process on
    CPU, SyncBatchNorm on GPUs) the run ends and logs every step."""
    out = tmp_path / "run"
    done = torchrun(out, "model.sparo.share_kv=false", "dino.use_bn_in_head=true",
                    "optim.epochs=1")
    assert [row["step"] for row in read_log(out) if "loss" in row][-1] == 4
    assert "normalises each process' batch separately" in (out / "train.log").read_text()
    assert done.returncode == 0
