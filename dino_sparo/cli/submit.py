"""``dino-sparo-submit``: the command line of :mod:`dino_sparo.submit` (what to run, where, on what
resources); a training submission's config is validated here, before it waits in a queue."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from dino_sparo.cli.common import run_program
from dino_sparo.errors import Failure, UsageError
from dino_sparo.submit import Resources, Submission, describe, submit

# Entry points by job name; evaluation entry points take their own command-line arguments.
ENTRY_POINTS = {
    "train": "dino_sparo.cli.train:train_entry",
    "knn": "dino_sparo.cli.knn:main",
    "linear": "dino_sparo.cli.linear:main",
}

EPILOG = """\
examples:
  # DINO + SPARO ViT-S/16 on 2 nodes of 8 GPUs, 3 days per job, requeued on preemption/time-out
  dino-sparo-submit --config configs/dino/vit_small16_vanilla_sparo.yaml --nodes 2 --gpus-per-node 8 \\
      --partition gpu --timeout-min 4320 data.path=/datasets/imagenet/train output_dir=/checkpoints/dino_s16

  # the same job on this machine (no SLURM), two CPU processes
  dino-sparo-submit --cluster local --gpus-per-node 0 --tasks-per-node 2 \\
      --config configs/dino/demo_fashion_mnist.yaml --wait

  # k-NN evaluation of a checkpoint: the evaluation's own arguments go after --
  dino-sparo-submit --job knn --gpus-per-node 1 --timeout-min 120 -- --checkpoint OUT/checkpoint.pth ...

Re-running a training submission resumes from OUTPUT_DIR/checkpoint.pth. Job folders (submitit's
pickles and the logs of each task) go to OUTPUT_DIR/submitit/JOB_ID.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-submit", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit dino_sparo training or evaluation to SLURM through submitit (or run it locally). "
                    "The job requeues itself on preemption or time-out and resumes from its last checkpoint.")
    what = parser.add_argument_group("what to run")
    what.add_argument("--job", choices=sorted(ENTRY_POINTS), default="train",
                      help="train (default), or the knn / linear evaluation")
    what.add_argument("--entry-point", metavar="MODULE:FUNCTION",
                      help="run any function that takes a list of arguments instead of --job's")
    what.add_argument("--config", help="training: the YAML config (as for dino-sparo-train)")
    what.add_argument("--mode", choices=["dino", "clip"], help="training: override the config's mode")
    what.add_argument("--output-dir", help="training: override output_dir (checkpoints, logs and job folders)")
    what.add_argument("args", nargs="*", metavar="ARG",
                      help="training: config overrides key.sub=value; other jobs: their own arguments, after --")
    where = parser.add_argument_group("where it runs")
    where.add_argument("--cluster", choices=["auto", "slurm", "local", "debug"], default="auto",
                       help="auto/slurm: submit with sbatch; local: run on this machine through submitit "
                            "(same requeue logic, no cluster); debug: run in this process, for a debugger")
    where.add_argument("--job-dir", help="submitit folder (pickles, per-task logs); default OUTPUT_DIR/submitit "
                                         "for training, the folder of --checkpoint + /submitit otherwise")
    where.add_argument("--wait", action="store_true", help="wait for the job to end and print its result")
    res = parser.add_argument_group("resources (SLURM)")
    res.add_argument("--nodes", type=int, default=1, help="nodes; the global batch grows with nodes × GPUs")
    res.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, one training process each")
    res.add_argument("--tasks-per-node", type=int,
                     help="processes per node; defaults to --gpus-per-node (set it for CPU-only jobs)")
    res.add_argument("--cpus-per-task", type=int,
                     help="CPU cores per process (default for training: the config's data.num_workers + 1, "
                          "one per loader worker and one for the training process; else the cluster's default)")
    res.add_argument("--mem-gb", type=float, help="memory per node in GB (cluster default if unset)")
    res.add_argument("--timeout-min", type=float, default=60 * 24,
                     help="time limit of each job in minutes (default one day); the job requeues when it ends")
    res.add_argument("--partition", help="SLURM partition")
    res.add_argument("--account", help="SLURM account to charge")
    res.add_argument("--qos", help="SLURM quality of service")
    res.add_argument("--constraint", help="SLURM node features, e.g. volta32gb")
    res.add_argument("--comment", help="SLURM comment, e.g. why the job is urgent")
    res.add_argument("--exclude", help="nodes not to use, e.g. node[03-05]")
    res.add_argument("--name", help="job name shown by squeue (default dino-sparo-JOB)")
    res.add_argument("--signal-delay-s", type=int, default=120,
                     help="seconds between the warning signal (USR2) and the time limit: enough to finish a "
                          "step and write a checkpoint")
    res.add_argument("--max-num-timeout", type=int, default=30,
                     help="how many times a job may reach its time limit and requeue (preemptions do not count)")
    return parser


def plan_submission(args: argparse.Namespace) -> Submission:
    """Turn parsed options into what to run and where its files go; validates a training config
    here, before it waits in a queue."""
    if args.job == "train" and args.entry_point is None:
        from dino_sparo.cli import train as program  # noqa: PLC0415 (heavy imports only for training)

        overrides = list(args.args)
        config_args = argparse.Namespace(config=args.config, mode=args.mode, output_dir=args.output_dir,
                                         overrides=overrides)
        cfg = program.config_from_args(config_args)
        output_dir = Path(cfg.output_dir).absolute()
        argv = ([] if args.config is None else ["--config", str(Path(args.config).absolute())])
        argv += ([] if args.mode is None else ["--mode", args.mode])
        argv += overrides + [f"output_dir={output_dir}"]
        job_dir = Path(args.job_dir).absolute() if args.job_dir else output_dir / "submitit"
        return Submission(ENTRY_POINTS["train"], argv, job_dir, output_dir, cpus_per_task=cfg.data.num_workers + 1)
    entry_point = args.entry_point or ENTRY_POINTS[args.job]
    for flag in ("config", "mode", "output_dir"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} is for training; pass evaluation arguments after --")
    argv = list(args.args)
    if args.job_dir:
        job_dir = Path(args.job_dir).absolute()
    elif "--checkpoint" in argv[:-1]:
        job_dir = Path(argv[argv.index("--checkpoint") + 1]).absolute().parent / "submitit"
    else:
        raise UsageError("--job-dir is needed for this job (no --checkpoint argument to put it beside)")
    return Submission(entry_point, argv, job_dir)


def resources_from_args(args: argparse.Namespace, default_name: str, submission: Submission) -> Resources:
    cpus = args.cpus_per_task if args.cpus_per_task is not None else submission.cpus_per_task
    return Resources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=cpus, mem_gb=args.mem_gb, timeout_min=args.timeout_min,
        partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
        comment=args.comment, exclude=args.exclude, name=args.name or default_name,
        signal_delay_s=args.signal_delay_s, max_num_timeout=args.max_num_timeout)


def run(args: argparse.Namespace) -> None:
    """What ``main`` does with parsed options: submit, describe the job, wait when asked."""
    submission = plan_submission(args)
    default_name = "dino-sparo-" + (args.job if args.entry_point is None else "job")
    job, cluster = submit(submission, args.cluster, resources_from_args(args, default_name, submission))
    for line in describe(job, submission, cluster):
        print(line, flush=True)
    if args.wait or args.cluster == "debug":  # the debug cluster runs the job when asked for its result
        try:
            results = job.results()
        except Exception as exc:  # the job's own error, as submitit reports it
            raise Failure(f"job {job.job_id} failed: {' '.join(str(exc).split())[-2000:]}") from None
        print(f"job {job.job_id} finished: {results[0]}")


def main(argv: Optional[list[str]] = None) -> int:
    """The console script (exit statuses: :func:`~dino_sparo.cli.common.run_program`); returns 0."""
    args = build_parser().parse_args(argv)
    run_program("dino-sparo-submit", lambda: run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
