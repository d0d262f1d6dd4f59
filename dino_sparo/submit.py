"""Submit training (and k-NN / linear evaluations) through submitit: to SLURM, to the local machine
(``--cluster local``: the same job, requeue included, without a cluster) or in-process (``debug``).

A job is an entry point ``module:function`` called with an argument list, in every task. It is
picklable and checkpointable: on preemption or time-out submitit calls :meth:`EntryPointJob.checkpoint`,
which hands back the same job, so the requeued job re-runs the same command and training resumes
from ``OUTPUT_DIR/checkpoint.pth``. Training stops at a step boundary first (the loop defers SIGUSR2
and SIGTERM to the end of the step and saves), so the requeued run continues exactly where it stopped.
The command line, ``dino-sparo-submit``, is :mod:`dino_sparo.cli.submit`.
"""

from __future__ import annotations

import importlib
import math
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from dino_sparo import distributed
from dino_sparo.errors import UsageError

# Seconds a job stopped by SIGTERM alone waits for the USR2 that SLURM sends on preemption.
TERM_GRACE_S = 3.0


def resolve_entry_point(spec: str) -> Callable[[list[str]], Any]:
    """``package.module:function`` -> the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entry point must be 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"entry point {spec!r}: cannot import {module_name!r} ({exc})") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"entry point {spec!r}: {module_name} has no function {attr!r}")
    return function


@dataclass
class EntryPointJob:
    """What submitit pickles and runs in each task: ``entry_point(argv)``.

    ``attempt`` counts requeues; it only changes the process group's port so that a restarted job
    never meets the store of its previous attempt.
    """

    entry_point: str
    argv: list[str] = field(default_factory=list)
    attempt: int = 0

    def __call__(self) -> Any:
        self._export_local_ranks()
        function = resolve_entry_point(self.entry_point)
        try:
            result = function(list(self.argv))
        finally:
            distributed.cleanup()
        stopped_by = result.get("stopped_by", []) if isinstance(result, dict) else []
        if stopped_by:
            self._hand_stop_to_submitit(stopped_by)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on preemption or time-out: requeue the same command (it resumes)."""
        import submitit  # noqa: PLC0415

        return submitit.helpers.DelayedSubmission(replace(self, attempt=self.attempt + 1))

    def _export_local_ranks(self) -> None:
        """Tasks of a local job learn their rank from submitit; SLURM tasks read SLURM's variables."""
        import submitit  # noqa: PLC0415

        try:
            env = submitit.JobEnvironment()
        except RuntimeError:  # not inside a submitit job (called directly)
            return
        if env.cluster == "local" and env.num_tasks > 1:
            distributed.export_env(distributed.DistInfo(
                rank=env.global_rank, world_size=env.num_tasks, local_rank=env.local_rank,
                master_addr="127.0.0.1", master_port=distributed.port_for_job(env.job_id, self.attempt),
                launcher="torchrun"))

    @staticmethod
    def _hand_stop_to_submitit(stopped_by: list[str]) -> None:
        """The loop deferred the preemption signal to a step boundary and saved; deliver it now to
        submitit's handler, which calls :meth:`checkpoint`, requeues and exits. A SIGTERM alone
        (``scancel``, or preemption whose USR2 is still on its way) waits briefly for that USR2."""
        import submitit  # noqa: PLC0415

        usr_sig = submitit.JobEnvironment._usr_sig()
        handler = signal.getsignal(usr_sig)
        if handler in (signal.SIG_DFL, signal.SIG_IGN, None):
            return  # not run by a submitit task process (e.g. the in-process debug cluster)
        if signal.Signals(usr_sig).name in stopped_by:
            signal.raise_signal(usr_sig)
        elif "SIGTERM" in stopped_by:
            time.sleep(TERM_GRACE_S)  # a USR2 arriving now requeues through submitit's handler


# --------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------

@dataclass
class Resources:
    """What a job asks of the cluster; None leaves the cluster's default."""

    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: Optional[int] = None  # None: one per GPU (or 1 without GPUs)
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    timeout_min: float = 60 * 24
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    comment: Optional[str] = None
    exclude: Optional[str] = None
    name: str = "dino-sparo"
    signal_delay_s: int = 120
    max_num_timeout: int = 30

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return max(1, self.gpus_per_node)


def build_executor(folder: str | Path, cluster: str, res: Resources) -> Any:
    """A submitit executor for ``cluster`` (auto | slurm | local | debug) with ``res`` applied."""
    import submitit  # noqa: PLC0415

    if res.nodes < 1 or res.gpus_per_node < 0 or res.ntasks_per_node < 1:
        raise ValueError(f"need nodes >= 1, gpus per node >= 0, tasks per node >= 1; got {res.nodes}, "
                         f"{res.gpus_per_node}, {res.ntasks_per_node}")
    if res.gpus_per_node and res.ntasks_per_node != res.gpus_per_node:
        raise UsageError(f"--tasks-per-node ({res.ntasks_per_node}) must equal --gpus-per-node "
                         f"({res.gpus_per_node}): training runs one process per GPU")
    if cluster == "local":
        if res.nodes != 1:
            raise UsageError(f"--cluster local runs on this machine: --nodes must be 1, got {res.nodes}")
        executor = submitit.LocalExecutor(folder, max_num_timeout=res.max_num_timeout)
        executor.update_parameters(timeout_min=res.timeout_min, gpus_per_node=res.gpus_per_node,
                                   tasks_per_node=res.ntasks_per_node, signal_delay_s=res.signal_delay_s)
        return executor
    if cluster not in ("auto", "slurm", "debug"):
        raise UsageError(f"--cluster must be one of auto, slurm, local, debug; got {cluster!r}")
    if cluster == "auto":
        import shutil  # noqa: PLC0415

        if shutil.which("srun") is None:
            raise RuntimeError("no SLURM here (srun not found): use --cluster local to run the job on this "
                               "machine, or --cluster debug to run it in this process")
        cluster = "slurm"
    timeout = res.timeout_min
    if cluster == "slurm" and timeout != int(timeout):
        raise UsageError(f"--timeout-min must be a whole number of minutes on SLURM, got {timeout}")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=res.max_num_timeout)
    slurm = {"partition": res.partition, "account": res.account, "qos": res.qos, "constraint": res.constraint,
             "comment": res.comment, "exclude": res.exclude, "signal_delay_s": res.signal_delay_s}
    executor.update_parameters(
        name=res.name, nodes=res.nodes, gpus_per_node=res.gpus_per_node, tasks_per_node=res.ntasks_per_node,
        cpus_per_task=res.cpus_per_task, mem_gb=res.mem_gb, timeout_min=int(math.ceil(timeout)),
        **{f"slurm_{key}": value for key, value in slurm.items() if value is not None},
    )
    return executor


@dataclass
class Submission:
    entry_point: str
    argv: list[str]
    job_dir: Path
    output_dir: Optional[Path] = None  # training only
    cpus_per_task: Optional[int] = None  # training: its loader workers + the training process, unless asked


def submit(submission: Submission, cluster: str, res: Resources) -> tuple[Any, str]:
    """Submit ``submission``; returns the submitit job and the cluster it went to."""
    submission.job_dir.mkdir(parents=True, exist_ok=True)
    # SLURM jobs get a folder each; local ones share one (submitit names their files by job id anyway)
    folder = submission.job_dir if cluster in ("local", "debug") else submission.job_dir / "%j"
    executor = build_executor(folder, cluster, res)
    job = executor.submit(EntryPointJob(submission.entry_point, submission.argv))
    return job, getattr(executor, "cluster", cluster)


def describe(job: Any, submission: Submission, cluster: str) -> list[str]:
    """Lines telling where the job and its logs are."""
    lines = [f"submitted job {job.job_id} ({submission.entry_point}) to {cluster}",
             f"  job folder: {job.paths.folder}",
             f"  log of task 0: {job.paths.stdout}",
             f"  errors of task 0: {job.paths.stderr}"]
    if submission.output_dir is not None:
        lines += [f"  training output: {submission.output_dir} (checkpoint.pth, log.jsonl, train.log)",
                  "  resume: re-run this command (it continues from checkpoint.pth)"]
    return lines
