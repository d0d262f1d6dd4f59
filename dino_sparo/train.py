"""The training loop of both modes, :func:`train`; its command line, ``dino-sparo-train``, is
:mod:`dino_sparo.cli.train`.

:class:`TrainingRun` reads top to bottom: device and precision, process group, method (DINO or
CLIP), data, schedules and optimiser, resume, then the loop. Re-running the same command resumes from
``output_dir/checkpoint.pth``, exactly: the sampler position, every RNG, the schedules' index and
the method's state (teacher, DINO centre) are restored, and each sample's augmentation is seeded by
(seed, epoch, index), so it does not depend on which loader worker draws it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dino_sparo import distributed
from dino_sparo.checkpoint import (check_global_batch, check_resumable, load_checkpoint, restore_training_state,
                                   save_checkpoint, training_state)
from dino_sparo.config import ConfigError, TrainConfig, save_config, validate_config
from dino_sparo.errors import Failure, UsageError
from dino_sparo.layers.attention import describe_attention_backend
from dino_sparo.data.loaders import STOP_SIGNALS, LoaderWorkers, leave_stop_signals_to_main_process
from dino_sparo.data.samplers import CollateSkipped, CountSkipped, ResumableSampler, SeededSamples
from dino_sparo.methods import build_method
from dino_sparo.methods.base import Method
from dino_sparo.models.build import load_pretrained_file
from dino_sparo.models.vit import VisionTransformer
from dino_sparo.runtime import (plan_threads, precision_reason, resolve_device, resolve_precision, rng_state,
                                seed_everything, set_rng_state, set_tf32, setup_logging)
from dino_sparo.schedules import StepValues, build_schedules

logger = logging.getLogger("dino_sparo")


class NonFiniteLossError(Failure):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# Optimisation helpers
# --------------------------------------------------------------------------------------------

def clip_gradients(parameters: list[nn.Parameter], max_norm: float, mode: str) -> None:
    """DINO v1 clips each parameter tensor apart (``per_param``); DINOv2 one global norm.

    No host sync on a GPU: every gradient is multiplied by its (often 1) scale. On the CPU, where
    reading the scales costs nothing and multiplying by a tensor is slow, only the clipped ones are.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
        return
    norms = torch.stack(torch._foreach_norm(grads))  # one norm per tensor
    scales = (max_norm / (norms + 1e-6)).clamp_(max=1.0)  # DINO's clip_coef, applied when below 1
    if scales.device.type == "cpu":
        clipped = [(grad, scale) for grad, scale in zip(grads, scales.tolist()) if scale < 1.0]
        if clipped:
            torch._foreach_mul_([grad for grad, _ in clipped], [scale for _, scale in clipped])
    else:
        torch._foreach_mul_(grads, scales.unbind())


def build_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW. ``optim.fused: auto`` takes the fused kernel on CUDA and CPU: one pass over each
    parameter instead of one per operation (the same update; on CPU about 5× faster than the loop)."""
    fused = cfg.optim.fused == "on" or (cfg.optim.fused == "auto" and device.type in ("cuda", "cpu"))
    return torch.optim.AdamW(groups, lr=0.0, fused=fused or None)


def apply_speed_options(method: Method, cfg: TrainConfig) -> None:
    """Activation checkpointing (blocks recomputed in backward: memory for time) and
    ``torch.compile`` of the trained module, as the config asks; before any DDP wrapping."""
    if cfg.grad_checkpointing:
        for module in method.modules().values():
            for sub in module.modules():
                if hasattr(sub, "grad_checkpointing"):
                    sub.grad_checkpointing = True
    if cfg.compile:
        method.train_module = torch.compile(method.train_module)


def sync_batchnorms(method: Method, device: torch.device, world_size: int) -> None:
    """Batch norm layers (``dino.use_bn_in_head``) normalise over the global batch under several
    processes, as DINO does (SyncBatchNorm in the student and the teacher). torch's SyncBatchNorm has
    GPU kernels only: on CPU (gloo) each process normalises its own batch, and the log says so."""
    if world_size == 1:
        return
    norms = [m for module in method.modules().values() for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    if device.type != "cuda":
        logger.warning("batch norm in %d layer(s) normalises each process' batch separately: SyncBatchNorm "
                       "runs on GPUs only", len(norms))
        return
    for name, module in method.modules().items():
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        if converted is not module:  # a top-level batch norm would be replaced, not changed in place
            raise TypeError(f"{name} is itself a batch norm layer: cannot convert it in place")
    logger.info("batch norm: %d layer(s) synchronised over %d processes (SyncBatchNorm)", len(norms), world_size)


def train_step(method: Method, batch: Any, step: int, epoch: int, values: StepValues,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[nn.Parameter],
               optim_cfg: Any, autocast_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step: forward under autocast, backward, unscale, clip, optimiser, the
    method's after-step update (DINO: teacher EMA). ``values`` are the step's scheduled values for the
    method (``Schedules.at``: teacher temperature and momentum); the optimiser's lr and weight decay
    are set by the caller. Returns the loss and metrics as device tensors;
    nothing here reads a value back to the host (under fp16, GradScaler does so to skip a bad step
    unless the optimiser is fused, which takes the skip decision on the device)."""
    autocast = torch.autocast(method.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with autocast:
        loss, metrics = method.loss(batch, step, epoch, teacher_temp=values.teacher_temp)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    clip_gradients(params, optim_cfg.clip_grad, optim_cfg.clip_mode)
    method.before_optimizer_step(step, epoch)
    scaler.step(optimizer)
    scaler.update()
    method.after_optimizer_step(step, values.teacher_momentum)
    return loss, metrics


# --------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------

def stopped_exit_code(signal_names: list[str]) -> int:
    """128 + the number of the signal that stopped the run: 130 for SIGINT, 143 for SIGTERM, 140 for
    SIGUSR2 (Linux numbers); with several, the first of that list."""
    first = next(sig for sig in STOP_SIGNALS if sig.name in signal_names)
    return 128 + int(first)


class _StopRequest:
    """SIGINT, SIGTERM and SIGUSR2 (the warning SLURM sends before a time limit or on preemption,
    as submitit asks for it) set a flag; the loop saves a checkpoint at the end of the step and
    exits. Ranks vote on the flags, so all of them stop after the same step even when only one
    process received the signal; ``agreed`` holds the signals that stopped the run."""

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.received: set[str] = set()
        self.agreed: set[str] = set()
        self._previous: dict[int, Any] = {}
        self._votes = distributed.AnyRankFlags([sig.name for sig in self.SIGNALS])

    def __enter__(self) -> "_StopRequest":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an in-process launcher)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and "SIGINT" in self.received:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received.add(name)
        logger.warning("received %s: saving a checkpoint after this step, then stopping", name)

    def poll(self) -> bool:
        """Once per step, on every rank: True when the ranks agree that a stop was asked for."""
        self.agreed |= self._votes.vote(self.received)
        return bool(self.agreed)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self._votes.close()  # the vote in flight; a finished run ignores it
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def load_pretrained(method: Method, path: str) -> None:
    """``model.pretrained``: the file's weights into every image backbone of the method (DINO: the
    student's and the teacher's), strictly, with a report of what was loaded and what was not."""
    backbones = {f"{name}.{sub}" if sub else name: module
                 for name, top in method.modules().items() for sub, module in top.named_modules()
                 if isinstance(module, VisionTransformer)}
    try:
        reports = {name: load_pretrained_file(backbone, path) for name, backbone in backbones.items()}
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise ConfigError(f"config key 'model.pretrained' ({path}): {' '.join(str(message).split())}") from exc
    report = next(iter(reports.values()))
    parameters = sum(tensor.numel() for key, tensor in next(iter(backbones.values())).state_dict().items()
                     if key in report.loaded)
    logger.info("model.pretrained: %s from %s: %d tensors (%s values) loaded into %s", report.kind, path,
                len(report.loaded), f"{parameters:,}", " and ".join(backbones))
    initialised = sorted({key.split(".")[0] + ".*" for key in report.initialised})
    others = sorted({f"{name}.{child}" for name, top in method.modules().items() for child, _ in top.named_children()
                     if not any(b == f"{name}.{child}" or b.startswith(f"{name}.{child}.") for b in backbones)
                     and any(p.numel() for p in getattr(top, child).parameters())})
    logger.info("model.pretrained: newly initialised: %s", ", ".join(
        ([f"the backbone's {', '.join(initialised)}"] if initialised else []) + others) or "nothing")
    if report.dropped:
        logger.info("model.pretrained: not used from the file: %d keys (%s)", len(report.dropped),
                    ", ".join(sorted({".".join(k.split(".")[:2]) for k in report.dropped})[:8]))


@dataclass
class StartFrom:
    """Where a run starts (``dino-sparo-train --resume / --fresh / --finetune``).

    By default a run resumes from ``output_dir/checkpoint.pth`` when there is one (re-running a
    command continues it). ``resume``: continue another run's checkpoint exactly (weights, optimiser,
    schedules, step, RNG) into this ``output_dir``. ``fresh``: start at step 0 even though
    ``output_dir`` holds a checkpoint (replaced at the first save; log.jsonl restarts). ``finetune``:
    start from a run's trained weights (every module of the method: DINO's student, teacher and
    centre; CLIP's model) with a new optimiser and schedules from step 0. Once this run has saved its
    own checkpoint, re-running the same command resumes from it, whatever these say."""

    resume: Optional[str] = None
    fresh: bool = False
    finetune: Optional[str] = None

    def __post_init__(self) -> None:
        given = [name for name, on in (("--resume", self.resume), ("--fresh", self.fresh),
                                       ("--finetune", self.finetune)) if on]
        if len(given) > 1:
            raise UsageError(f"give at most one of --resume, --fresh and --finetune, got {' and '.join(given)}")
        for flag, path in (("--resume", self.resume), ("--finetune", self.finetune)):
            if path is not None and not Path(path).is_file():
                raise UsageError(f"{flag}: no such checkpoint: {path}")

    def resume_path(self, own: Path) -> Optional[Path]:
        """The checkpoint to resume from: the run's own (unless ``fresh``), else ``resume``'s, else none."""
        if own.is_file() and not self.fresh:
            return own
        return Path(self.resume) if self.resume else None


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its paths (``output_dir``, ``data.path``, ``clip.train_data``,
    ``model.pretrained``) made absolute against the folder the command runs in, so that the saved
    config.yaml and checkpoint can be used from anywhere."""
    def absolute(value: Optional[str]) -> Optional[str]:
        if value in (None, "") or "://" in value:  # a URL (WebDataset pipe or http) stays as given
            return value
        return str(Path(os.path.expanduser(value)).absolute())

    cfg = copy.deepcopy(cfg)
    cfg.output_dir = absolute(cfg.output_dir)
    cfg.data.path = absolute(cfg.data.path)
    cfg.model.pretrained = absolute(cfg.model.pretrained)
    if cfg.clip.train_data and not cfg.clip.train_data.startswith("pipe:"):  # shard lists are joined by ::
        cfg.clip.train_data = "::".join(absolute(part) for part in cfg.clip.train_data.split("::"))
    return cfg


def load_run_weights(method: Method, path: str, cfg: TrainConfig) -> None:
    """``--finetune``: every module of the method from a run's checkpoint (strictly, same
    architecture), leaving the optimiser, schedules, step and RNG to start afresh."""
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict):
        raise UsageError(f"--finetune {path}: not a checkpoint written by dino-sparo-train")
    check_resumable(state["config"], cfg, Path(path))  # refuses another architecture, naming the keys
    for name, module in method.modules().items():
        if name not in state:
            raise UsageError(f"--finetune {path}: it has no {name!r} weights (a run of another mode?)")
        module.load_state_dict(state[name])
    logger.info("--finetune: weights of %s from %s (step %d); optimiser and schedules start at step 0",
                " and ".join(method.modules()), path, state.get("step", 0))


class MetricsLog:
    """``log.jsonl`` rows, for machines; with ``log.tensorboard`` the same scalars in TensorBoard
    (``output_dir/tensorboard``), as ``train/<key>`` and ``eval/<key>`` at the row's step."""

    def __init__(self, output_dir: Path, tensorboard: bool, resumed_at: int = 0) -> None:
        self.path, self.writer = output_dir / "log.jsonl", None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (an optional dependency)
            except ImportError:
                raise ConfigError("config key 'log.tensorboard' needs the tensorboard package: pip install "
                                  "tensorboard (or the project's [tensorboard] extra)") from None
            # resumed: the events past the checkpoint's step are dropped, as log.jsonl's rows are
            self.writer = SummaryWriter(str(output_dir / "tensorboard"),
                                        purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, row: dict, group: str) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{group}/{key}", value, row["step"])

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_log(log_file: Path, step: int) -> int:
    """Drop the rows of ``log.jsonl`` past ``step`` (and a torn last line), which a process killed
    after logging a step but before saving it left behind; returns how many. Rewritten atomically."""
    if not log_file.is_file():
        return 0
    lines = log_file.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # only the last line can be torn: a kill while it was written
            continue
        if row_step <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    partial = log_file.with_name(log_file.name + ".tmp")
    partial.write_text("".join(line + "\n" for line in kept))
    partial.replace(log_file)
    return len(lines) - len(kept)


class TrainingRun:
    """One run of :func:`train`, in the order it happens: set-up (here), :meth:`resume`,
    :meth:`announce`, then :meth:`loop`, whose steps log (:meth:`_log_step`) and whose epochs end
    in a checkpoint and the due evaluations (:meth:`_end_of_epoch`)."""

    def __init__(self, cfg: TrainConfig, start: Optional["StartFrom"] = None) -> None:
        self.cfg = cfg = absolute_paths(cfg)
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_path = self.output_dir / "checkpoint.pth"
        self.start = start or StartFrom()
        self.device = device = resolve_device(cfg.device)
        self.info = info = distributed.init_distributed(device.type)
        setup_logging(info.is_main, self.output_dir / "train.log")
        validate_config(cfg)  # also when built in code (from_dict): refused here, with the key, into train.log
        self.autocast_dtype = resolve_precision(cfg.precision, device)
        set_tf32(cfg.tf32)
        self.threads = plan_threads(device, cfg.data.num_workers)
        seed_everything(cfg.seed)  # the same initial weights on every rank (DDP broadcasts the student only)
        self.method = method = build_method(cfg, device)
        self.resume_path = self.start.resume_path(self.checkpoint_path)
        if cfg.model.pretrained:
            if self.resume_path is not None or self.start.finetune:
                logger.info("model.pretrained is not loaded: the run starts from %s",
                            self.resume_path or self.start.finetune)
            else:
                load_pretrained(method, cfg.model.pretrained)
        if self.start.finetune and self.resume_path is None:
            load_run_weights(method, self.start.finetune, cfg)
        seed_everything(cfg.seed + info.rank)  # rank-specific randomness from here on (drop path)
        self._build_loader()
        self.schedules = build_schedules(cfg, self.global_batch, self.iters_per_epoch)
        self.epoch_end_hooks = method.epoch_end_hooks()
        apply_speed_options(method, cfg)
        sync_batchnorms(method, device, info.world_size)
        if info.world_size > 1:
            method.train_module = nn.parallel.DistributedDataParallel(
                method.train_module, device_ids=[device.index] if device.type == "cuda" else None)
        groups = method.param_groups()
        self.optimizer = build_optimizer(groups, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        self.params = [p for g in groups for p in g["params"]]
        self.saved_step: Optional[int] = None  # what checkpoint.pth holds, for messages
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # device-side NaN watch

    def _build_loader(self) -> None:
        """The method's dataset behind the resumable sampler, each sample's augmentation seeded; each
        batch comes with the number of its samples replaced for an unreadable image (``data.corrupt_images``)."""
        cfg, info = self.cfg, self.info
        try:
            dataset = self.method.train_dataset()
        except FileNotFoundError as exc:  # a path in the config: the user's to fix, said in one line
            key = "clip.train_data" if cfg.mode == "clip" and cfg.clip.dataset in ("table", "webdataset") else "data.path"
            raise ConfigError(f"config key '{key}': {' '.join(str(exc).split())}") from None
        batch = cfg.data.batch_size_per_gpu
        self.global_batch = batch * info.world_size
        self.sampler = ResumableSampler(len(dataset), batch, info.rank, info.world_size, seed=cfg.seed)
        self.loader = DataLoader(
            SeededSamples(CountSkipped(dataset), cfg.seed), batch_size=batch, sampler=self.sampler,
            num_workers=self.threads.workers, collate_fn=CollateSkipped(self.method.collate_fn),
            pin_memory=self.device.type == "cuda", drop_last=True, persistent_workers=False,
            generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=leave_stop_signals_to_main_process,
        )
        self.iters_per_epoch = self.sampler.batches_per_epoch
        total_steps = cfg.optim.epochs * self.iters_per_epoch
        self.end_step = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)

    def resume(self) -> int:
        """Restore ``checkpoint.pth`` when there is one (every rank must read the same); the step to start at."""
        info, start_step = self.info, 0
        if self.resume_path is not None:
            state = load_checkpoint(self.resume_path, map_location=self.device)
            for change in check_resumable(state["config"], self.cfg, self.resume_path):
                if info.is_main:
                    logger.warning("resuming with a changed recipe: %s (the run so far followed the old value)",
                                   change)
            check_global_batch(state, self.cfg.data.batch_size_per_gpu, info.world_size, self.resume_path)
            set_rng_state(restore_training_state(state, self.method.modules(), self.optimizer, self.scaler,
                                                 info.rank))
            start_step = self.saved_step = state["step"]
            logger.info("resumed from %s at step %d (epoch %d)", self.resume_path, start_step, state["epoch"])
            if info.is_main:
                dropped = truncate_log(self.output_dir / "log.jsonl", start_step)
                if dropped:
                    logger.info("log.jsonl: dropped %d row(s) written after the checkpoint's step %d (they are "
                                "logged again as the run repeats those steps)", dropped, start_step)
        elif info.is_main and self.start.fresh and self.checkpoint_path.is_file():
            truncate_log(self.output_dir / "log.jsonl", 0)
            logger.info("--fresh: starting at step 0; %s is replaced at the first save", self.checkpoint_path)
        if info.world_size > 1:
            steps = torch.tensor([start_step, -start_step], device=distributed.collective_device())
            distributed.all_reduce_max(steps)
            if int(steps[0]) != -int(steps[1]):
                raise RuntimeError(f"ranks resume from different steps ({-int(steps[1])} to {int(steps[0])}): "
                                   f"output_dir ({self.output_dir}) must be on a file system that every node sees")
        return start_step

    def announce(self) -> None:
        """config.yaml (with the derived global batch and peak lr as a comment) and the start-up log."""
        cfg, info, batch = self.cfg, self.info, self.cfg.data.batch_size_per_gpu
        if not info.is_main:
            return
        peak_lr = self.schedules.lr.max()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.output_dir / "config.yaml")
        with (self.output_dir / "config.yaml").open("a") as handle:
            scaling = f" = optim.lr x {self.global_batch}/256" if cfg.optim.lr_scaling == "linear" else " = optim.lr"
            handle.write(f"# {info.world_size} process(es) x batch_size_per_gpu {batch} = global batch "
                         f"{self.global_batch}; peak lr {peak_lr:.6g}{scaling}\n")
        logger.info("output: %s | device %s | precision %s%s | %d process(es)", self.output_dir, self.device,
                    self.autocast_dtype or "fp32", precision_reason(cfg.precision, self.device), info.world_size)
        logger.info("batch %d per process, global batch %d, %d steps per epoch, %d epochs, peak lr %.3g (optim.lr "
                    "%.3g, scaling %s)", batch, self.global_batch, self.iters_per_epoch, cfg.optim.epochs, peak_lr,
                    cfg.optim.lr, cfg.optim.lr_scaling)
        logger.info(self.threads.describe())
        for line in self.method.describe():
            logger.info(line)
        logger.info(describe_attention_backend(cfg.model.attn_backend, self.device, self.autocast_dtype))

    def save(self, step: int) -> None:
        """Every rank's RNG state gathered, then ``checkpoint.pth`` (and, when due, a kept per-epoch copy)."""
        rngs = distributed.all_gather_object(rng_state())
        self.saved_step = step
        if not self.info.is_main:
            return
        state = training_state(self.method.modules(), self.optimizer, self.scaler, step, self.iters_per_epoch,
                               self.cfg, rngs)
        save_checkpoint(state, self.checkpoint_path)
        epoch_done, every = step // self.iters_per_epoch, self.cfg.save_every_epochs
        if every and step % self.iters_per_epoch == 0 and epoch_done % every == 0:
            save_checkpoint(state, self.output_dir / f"checkpoint_epoch{epoch_done:04d}.pth")

    def check_finite(self) -> None:
        """Stop every rank together at the first non-finite loss, naming the step and the checkpoint kept."""
        bad = int(distributed.all_reduce_max(self.first_bad_step.clone()))
        if bad < 0:
            return
        kept = (f"The last good checkpoint, {self.checkpoint_path} at step {self.saved_step}, is kept (re-running "
                "resumes from it). " if self.saved_step is not None else
                f"No checkpoint was written yet (the first comes at the end of epoch 0, step {self.iters_per_epoch}). ")
        raise NonFiniteLossError(f"non-finite loss at step {bad} (epoch {(bad - 1) // self.iters_per_epoch}); stopping "
                                 f"without saving. {kept}Usual causes: too high a learning rate, fp16 overflow "
                                 "(use bf16), no gradient clipping.")

    def _set_schedules(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedules.lr[step]
            if group["apply_wd"]:
                group["weight_decay"] = self.schedules.weight_decay[step]

    def loop(self, start_step: int) -> dict:
        """Train from ``start_step`` to the end (or a stop signal); returns the last logged metrics."""
        self.metrics: dict[str, float] = {}
        self.metrics_log = MetricsLog(self.output_dir, tensorboard=self.cfg.log.tensorboard and self.info.is_main,
                                      resumed_at=start_step)
        self.progress = tqdm(total=self.end_step, initial=start_step, disable=not self.info.is_main,
                             dynamic_ncols=True, desc=f"{self.cfg.mode} train", unit="step")
        self.method.train_module.train()
        self.window_start, self.window_images = time.perf_counter(), 0
        self.postfix: dict[str, str] = {}
        self.eval_postfix: dict[str, str] = {}  # the latest k-NN / zero-shot accuracy, shown beside the loss
        self.skipped_images = 0  # samples replaced for an unreadable image since the epoch began (or the resume)
        step, stopping = start_step, False
        # log lines go through tqdm.write above the bar instead of breaking it; the bar closes on an error too
        with _StopRequest() as stop, LoaderWorkers() as workers, logging_redirect_tqdm(), self.progress, \
                self.metrics_log:
            while step < self.end_step and not stopping:
                epoch = step // self.iters_per_epoch
                self.sampler.set_epoch(epoch, start_batch=step % self.iters_per_epoch)
                for batch_data, skipped in workers.iterate(self.loader):
                    self.skipped_images += skipped
                    self._set_schedules(step)
                    loss, step_metrics = train_step(self.method, batch_data, step, epoch,
                                                    self.schedules.at(step, epoch), self.optimizer, self.scaler,
                                                    self.params, self.cfg.optim, self.autocast_dtype)
                    self.first_bad_step = torch.where(
                        (self.first_bad_step < 0) & ~torch.isfinite(loss.detach()),
                        torch.full_like(self.first_bad_step, step + 1), self.first_bad_step)  # as log.jsonl counts
                    step += 1
                    self.window_images += self.method.batch_size(batch_data) * self.info.world_size
                    self.progress.update(1)
                    stopping = stop.poll()
                    last_of_epoch = step % self.iters_per_epoch == 0
                    if step % self.cfg.log_every == 0 or last_of_epoch or step == self.end_step or stopping:
                        self._log_step(step, epoch, loss, step_metrics)
                    if last_of_epoch or step == self.end_step or stopping:
                        self._end_of_epoch(step, epoch, last_of_epoch)
                    if stopping or step >= self.end_step:
                        break
        self.progress.close()
        return self._finish(step, stopping, stop.agreed)

    def _log_step(self, step: int, epoch: int, loss: torch.Tensor, step_metrics: dict[str, torch.Tensor]) -> None:
        """Every rank's loss and metrics averaged into one log.jsonl row (one host sync per logged step)."""
        self.check_finite()
        values = torch.stack([loss.detach().float()] + [v.detach().float().to(self.device).reshape(())
                                                        for v in step_metrics.values()])
        distributed.all_reduce_mean(values)
        elapsed = time.perf_counter() - self.window_start
        self.metrics = {"step": step, "epoch": epoch, "loss": float(values[0]),
                        **{k: float(v) for k, v in zip(step_metrics, values[1:])},
                        "lr": float(self.schedules.lr[step - 1]),
                        "weight_decay": float(self.schedules.weight_decay[step - 1]),
                        "images_per_s": self.window_images / max(elapsed, 1e-9), "global_batch_size": self.global_batch}
        self.window_start, self.window_images = time.perf_counter(), 0
        if self.info.is_main:
            self.metrics_log.write(self.metrics, "train")
            self.postfix = dict(loss=f"{self.metrics['loss']:.4f}", lr=f"{self.metrics['lr']:.2e}",
                                img_s=f"{self.metrics['images_per_s']:.0f}")
            self.progress.set_postfix(**self.postfix, **self.eval_postfix)
            for warning in self.method.warnings(self.metrics):
                logger.warning("step %d: %s", step, warning)

    def _end_of_epoch(self, step: int, epoch: int, last_of_epoch: bool) -> None:
        """A checkpoint; at a real epoch end (not a stop or max_steps) the due evaluations, on every rank."""
        self.check_finite()
        self.save(step)
        eval_metrics: dict[str, float] = {}
        if last_of_epoch:
            self._report_skipped(step, epoch)
            for hook in self.epoch_end_hooks:
                if hook.due(step // self.iters_per_epoch):
                    eval_metrics.update(hook.evaluate())
        self.metrics.update(eval_metrics)
        if eval_metrics and self.info.is_main:
            self.metrics_log.write({"step": step, "epoch": epoch, **eval_metrics}, "eval")
            self.eval_postfix = {key.split("_")[0]: f"{100 * value:.1f}%" for key, value in eval_metrics.items()
                                 if key.endswith("_top1")}
            self.progress.set_postfix(**self.postfix, **self.eval_postfix)

    def _report_skipped(self, step: int, epoch: int) -> None:
        """Under ``data.corrupt_images: skip``, the epoch's replaced samples over all ranks: a warning
        when there were any, and a ``skipped_images`` row in log.jsonl every epoch."""
        if self.cfg.data.corrupt_images != "skip":
            return
        count = torch.tensor(float(self.skipped_images), device=distributed.collective_device())
        total = int(round(float(distributed.all_reduce_mean(count)) * self.info.world_size))
        self.skipped_images = 0
        if not self.info.is_main:
            return
        if total:
            logger.warning("epoch %d: %d sample(s) had an unreadable image and were replaced by the next readable "
                           "one (data.corrupt_images: skip; each file is named in a warning above)", epoch, total)
        self.metrics_log.write({"step": step, "epoch": epoch, "skipped_images": total}, "data")

    def _finish(self, step: int, stopping: bool, stopped_by: set[str]) -> dict:
        if stopping and step < self.end_step:
            self.metrics["stopped_by"] = sorted(stopped_by)  # a launcher may requeue on SIGUSR2
            logger.info("stopped at step %d by %s; re-run the same command to resume", step,
                        " and ".join(sorted(stopped_by)))
        elif self.info.is_main:
            logger.info("finished %d steps; checkpoint: %s", step, self.checkpoint_path)
        distributed.barrier()
        return self.metrics


def train(cfg: TrainConfig, start: Optional[StartFrom] = None) -> dict:
    """Train (or resume) as ``cfg`` says, from where ``start`` says (default: ``output_dir``'s own
    checkpoint when there is one); returns the last logged metrics."""
    run = TrainingRun(cfg, start)
    start_step = run.resume()
    run.announce()
    return run.loop(start_step)
