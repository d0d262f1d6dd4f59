"""The training program (both modes): ``dino-sparo-train --config FILE [key.sub=value ...]``.

Reads top to bottom: configuration, device and precision, process group, method (DINO or CLIP),
data, optimiser and schedules, resume, then the loop. Re-running the same command resumes from
``output_dir/checkpoint.pth``, exactly: the sampler position, every RNG, the schedules' index and
the method's state (teacher, DINO centre) are restored, and each sample's augmentation is seeded by
(seed, epoch, index), so it does not depend on which loader worker draws it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dino_sparo import distributed
from dino_sparo.checkpoint import load_checkpoint, save_checkpoint
from dino_sparo.config import (ConfigError, OptimConfig, TrainConfig, format_config_reference, from_dict,
                               load_config, save_config, to_dict, validate_config)
from dino_sparo.data.datasets import CorruptImageError
from dino_sparo.data.loaders import STOP_SIGNALS, LoaderWorkers, leave_stop_signals_to_main_process
from dino_sparo.evaluation.periodic_knn import PeriodicKnn
from dino_sparo.methods import build_method
from dino_sparo.methods.base import Method
from dino_sparo.models.build import load_pretrained_file
from dino_sparo.models.vit import VisionTransformer
from dino_sparo.schedules import cosine_schedule

logger = logging.getLogger("dino_sparo")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# Device, precision, seeding: the one place that decides them
# --------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device' is 'cuda' but no CUDA device is available")
    return torch.device(name)


# CPU flags of native bf16 matrix products (AVX-512 BF16, AMX); without them bf16 is emulated and
# runs far slower than fp32 (two orders of magnitude on AVX2-only CPUs).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises one of ``NATIVE_BF16_CPU_FLAGS`` (False where the file is missing)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on GPU and on CPUs with native bf16
    (``NATIVE_BF16_CPU_FLAGS``), fp32 on other CPUs."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("config key 'precision': fp16 needs a GPU; use fp32 or bf16 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_reason(precision: str, device: torch.device) -> str:
    """Why ``precision: auto`` chose what it chose, for the start-up log ('' when set explicitly)."""
    if precision != "auto":
        return ""
    if device.type == "cuda":
        return " (auto: GPU)"
    if cpu_has_native_bf16():
        return " (auto: this CPU has native bf16)"
    return f" (auto: this CPU has none of {', '.join(NATIVE_BF16_CPU_FLAGS)})"


def build_lr_schedule(optim: OptimConfig, global_batch: int, iters_per_epoch: int) -> np.ndarray:
    """Per-step learning rates: warm-up then cosine to ``optim.min_lr``, peaking at ``optim.lr`` scaled
    by the global batch / 256 (``lr_scaling: linear``, DINO's rule) or at ``optim.lr`` itself (``none``)."""
    if optim.warmup_steps:
        if optim.warmup_steps > optim.epochs * iters_per_epoch:
            raise ValueError(f"config key 'optim.warmup_steps' ({optim.warmup_steps}) exceeds the run's "
                             f"{optim.epochs * iters_per_epoch} steps")
        warmup = {"warmup_iters": optim.warmup_steps}
    else:
        if optim.warmup_epochs > optim.epochs:
            raise ValueError(f"config key 'optim.warmup_epochs' ({optim.warmup_epochs}) exceeds "
                             f"'optim.epochs' ({optim.epochs})")
        warmup = {"warmup_epochs": optim.warmup_epochs}
    peak = optim.lr * global_batch / 256.0 if optim.lr_scaling == "linear" else optim.lr
    return cosine_schedule(peak, optim.min_lr, optim.epochs, iters_per_epoch, **warmup)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; its tensors may have been loaded onto a GPU, torch wants them on the CPU."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --------------------------------------------------------------------------------------------
# Data: a resumable sampler and per-sample seeded augmentations
# --------------------------------------------------------------------------------------------

class ResumableSampler(Sampler):
    """Distributed, shuffled, drop-last sampler that can start mid-epoch.

    Yields ``(epoch, index)`` pairs so the dataset wrapper can seed each sample's augmentation;
    the permutation depends only on (seed, epoch), so every rank agrees and a resumed run sees
    the same order as an uninterrupted one.
    """

    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.batches_per_epoch = dataset_len // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"the dataset has {dataset_len} images, fewer than one global batch "
                             f"({batch_size} × {world_size} processes): lower data.batch_size_per_gpu")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g)
        else:
            order = torch.arange(self.dataset_len)
        used = self.batches_per_epoch * self.batch_size * self.world_size
        mine = order[:used][self.rank::self.world_size][self.start_batch * self.batch_size:]
        return ((self.epoch, int(i)) for i in mine)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class SeededSamples(Dataset):
    """Runs the wrapped dataset's random augmentation under a seed made of (seed, epoch, index),
    restoring the process' RNG states afterwards, so results do not depend on worker scheduling."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            torch.manual_seed(sample_seed)
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


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


def train_step(method: Method, batch: Any, step: int, epoch: int, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, params: list[nn.Parameter], optim_cfg: Any,
               autocast_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step: forward under autocast, backward, unscale, clip, optimiser, the
    method's after-step update (DINO: teacher EMA). Returns the loss and metrics as device tensors;
    nothing here reads a value back to the host (under fp16, GradScaler does so to skip a bad step
    unless the optimiser is fused, which takes the skip decision on the device)."""
    autocast = torch.autocast(method.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with autocast:
        loss, metrics = method.loss(batch, step, epoch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    clip_gradients(params, optim_cfg.clip_grad, optim_cfg.clip_mode)
    method.before_optimizer_step(step, epoch)
    scaler.step(optimizer)
    scaler.update()
    method.after_optimizer_step(step)
    return loss, metrics


# --------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------

# Exit codes of dino-sparo-train (listed in the README's Training section)
EXIT_FAILED = 1  # the run failed: a non-finite loss, a corrupt image, or an error shown with its traceback
EXIT_USER_ERROR = 2  # a configuration the program cannot use (one line naming the key); nothing was trained
# stopped by a signal before the end, after saving a checkpoint: 128 + the signal's number, as a shell
# reports a process killed by it (see stopped_exit_code)


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


def setup_logging(output_dir: Path, is_main: bool) -> None:
    """One console handler, and (rank 0) one ``train.log`` in the current output folder."""
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    ours = [h for h in root.handlers if getattr(h, "_dino_sparo", False)]
    if not any(isinstance(h, logging.FileHandler) is False for h in ours):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        console._dino_sparo = True  # type: ignore[attr-defined]
        root.addHandler(console)
    for handler in ours:
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(output_dir / "train.log")
        file_handler.setFormatter(formatter)
        file_handler._dino_sparo = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
    root.setLevel(level)


# What a resumed run may change. Keys that shape the trained state cannot change (the weights would
# not fit); keys that only say how to run (where, on what, how often to log, when to stop) change
# freely; any other change (the recipe: lr, epochs, temperatures, crops, seed...) is allowed with a
# warning in train.log, since the run then no longer follows one recipe from start to end.
ARCHITECTURE_KEYS = (
    "mode", "model.arch", "model.patch_size", "model.img_size", "model.in_chans", "model.embed_dim",
    "model.depth", "model.num_heads", "model.readout", "model.reduce_depth", "model.sparo.",
    "dino.out_dim", "dino.head_hidden_dim", "dino.head_bottleneck_dim", "dino.use_bn_in_head",
    "dino.norm_last_layer", "clip.text_width", "clip.text_depth", "clip.text_heads", "clip.text_mlp_ratio",
    "clip.context_length", "clip.text_readout", "clip.text_reduce_depth", "clip.share_queries", "clip.embed_dim",
)
RUN_KEYS = (
    "output_dir", "device", "precision", "compile", "grad_checkpointing", "log_every", "save_every_epochs",
    "max_steps", "model.attn_backend", "model.pack_crops", "data.path", "data.num_workers",
    "data.corrupt_images", "eval.", "clip.zeroshot_",
    "data.batch_size_per_gpu",  # the global batch it makes is checked apart: it must not change
    "log.",
)


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith((".", "_")) and key.startswith(p)) for p in patterns)


def check_resumable(saved: dict, cfg: TrainConfig, checkpoint_path: Path) -> list[str]:
    """Compare the config a checkpoint was written with to this run's: refuse a changed architecture
    (naming the keys), return one line per changed recipe key (for a warning)."""
    try:
        saved = to_dict(from_dict(saved))  # the defaults of keys added since the checkpoint was written
    except ValueError:
        pass
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    changed = {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}
    described = {key: f"{key} {a!r} -> {b!r}" for key, (a, b) in changed.items()}
    refused = [described[key] for key in changed if _matches(key, ARCHITECTURE_KEYS)]
    if refused:
        raise ConfigError(f"{checkpoint_path} holds another architecture than this config: {', '.join(refused)}; "
                          "resume with the run's own values (its config.yaml) or start a new output_dir")
    return [described[key] for key in changed if not _matches(key, RUN_KEYS)]


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


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) as ``cfg`` says; returns the last logged metrics."""
    output_dir = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    info = distributed.init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", distributed.local_device_index(info.local_rank))
    setup_logging(output_dir, info.is_main)
    validate_config(cfg)  # also when built in code (from_dict): refused here, with the key, into train.log
    autocast_dtype = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP broadcasts the student only)
    method = build_method(cfg, device)
    if cfg.model.pretrained:
        if (output_dir / "checkpoint.pth").is_file():
            logger.info("model.pretrained is not loaded: the run resumes from its checkpoint")
        else:
            load_pretrained(method, cfg.model.pretrained)
    seed_everything(cfg.seed + info.rank)  # rank-specific randomness from here on (drop path)
    dataset = method.train_dataset()
    batch = cfg.data.batch_size_per_gpu
    global_batch = batch * info.world_size
    sampler = ResumableSampler(len(dataset), batch, info.rank, info.world_size, seed=cfg.seed)
    loader = DataLoader(
        SeededSamples(dataset, cfg.seed), batch_size=batch, sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=method.collate_fn, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=leave_stop_signals_to_main_process,
    )
    iters_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.optim.epochs * iters_per_epoch
    lr_schedule = build_lr_schedule(cfg.optim, global_batch, iters_per_epoch)
    wd_schedule = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.epochs,
                                  iters_per_epoch)
    method.setup_schedules(cfg.optim.epochs, iters_per_epoch)

    knn = PeriodicKnn(cfg.eval, method, batch, cfg.data.num_workers, device) if cfg.eval.knn_every else None
    apply_speed_options(method, cfg)
    if info.world_size > 1:
        method.train_module = nn.parallel.DistributedDataParallel(
            method.train_module, device_ids=[device.index] if device.type == "cuda" else None)
    groups = method.param_groups()
    optimizer = build_optimizer(groups, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    params = [p for g in groups for p in g["params"]]

    checkpoint_path = output_dir / "checkpoint.pth"
    start_step = 0
    if checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, map_location=device)
        for change in check_resumable(state["config"], cfg, checkpoint_path):
            if info.is_main:
                logger.warning("resuming with a changed recipe: %s (the run so far followed the old value)", change)
        saved_world = len(state["rng"])  # one RNG state per process that wrote it
        saved_global = state["config"]["data"]["batch_size_per_gpu"] * saved_world
        if saved_global != global_batch:  # steps per epoch and the schedules depend on it
            raise ConfigError(f"{checkpoint_path} was written with a global batch of {saved_global} ({saved_world} "
                             f"process(es)); this run has {global_batch} ({info.world_size} process(es) × "
                             f"data.batch_size_per_gpu {batch}): resume with the same global batch, or start a "
                             "new output_dir")
        for name, module in method.modules().items():
            module.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        start_step = state["step"]
        set_rng_state(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0])
        logger.info("resumed from %s at step %d (epoch %d)", checkpoint_path, start_step, state["epoch"])
        if info.is_main:
            dropped = truncate_log(output_dir / "log.jsonl", start_step)
            if dropped:
                logger.info("log.jsonl: dropped %d row(s) written after the checkpoint's step %d (they are "
                            "logged again as the run repeats those steps)", dropped, start_step)
    if info.world_size > 1:  # every rank must have read the same checkpoint
        steps = torch.tensor([start_step, -start_step], device=distributed.collective_device())
        distributed.all_reduce_max(steps)
        if int(steps[0]) != -int(steps[1]):
            raise RuntimeError(f"ranks resume from different steps ({-int(steps[1])} to {int(steps[0])}): "
                               f"output_dir ({output_dir}) must be on a file system that every node sees")
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        with (output_dir / "config.yaml").open("a") as handle:  # derived values, as a comment
            scaling = f" = optim.lr x {global_batch}/256" if cfg.optim.lr_scaling == "linear" else " = optim.lr"
            handle.write(f"# {info.world_size} process(es) x batch_size_per_gpu {batch} = global batch {global_batch}; "
                         f"peak lr {lr_schedule.max():.6g}{scaling}\n")
        logger.info("output: %s | device %s | precision %s%s | %d process(es)", output_dir, device,
                    autocast_dtype or "fp32", precision_reason(cfg.precision, device), info.world_size)
        logger.info("batch %d per process, global batch %d, %d steps per epoch, %d epochs, peak lr %.3g (optim.lr "
                    "%.3g, scaling %s)", batch, global_batch, iters_per_epoch, cfg.optim.epochs, lr_schedule.max(),
                    cfg.optim.lr, cfg.optim.lr_scaling)
        for line in method.describe():
            logger.info(line)

    saved_step = start_step if checkpoint_path.is_file() else None  # what checkpoint.pth holds, for messages

    def save(step: int) -> None:
        nonlocal saved_step
        saved_step = step
        if not info.is_main:
            return
        state = {name: module.state_dict() for name, module in method.modules().items()}
        state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else None,
                     step=step, epoch=step // iters_per_epoch, config=to_dict(cfg), rng=rngs)
        save_checkpoint(state, checkpoint_path)
        epoch_done = step // iters_per_epoch
        if cfg.save_every_epochs and step % iters_per_epoch == 0 and epoch_done % cfg.save_every_epochs == 0:
            save_checkpoint(state, output_dir / f"checkpoint_epoch{epoch_done:04d}.pth")

    def gather_rng() -> list:
        states = [None] * info.world_size
        if info.world_size > 1:
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        return states

    end_step = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # device-side NaN watch
    metrics: dict[str, float] = {}
    metrics_log = MetricsLog(output_dir, tensorboard=cfg.log.tensorboard and info.is_main, resumed_at=start_step)
    progress = tqdm(total=end_step, initial=start_step, disable=not info.is_main, dynamic_ncols=True,
                    desc=f"{cfg.mode} train", unit="step")
    method.train_module.train()
    step = start_step
    window_start, window_images = time.perf_counter(), 0
    rngs: list = []
    eval_postfix: dict[str, str] = {}  # the latest k-NN / zero-shot accuracy, shown beside the loss

    def check_finite(at_step: int) -> None:
        bad = int(distributed.all_reduce_max(first_bad_step.clone()))  # every rank stops together
        if bad >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at step {bad} (epoch {bad // iters_per_epoch}); stopping without saving. "
                + (f"The last good checkpoint, {checkpoint_path} at step {saved_step}, is kept (re-running resumes "
                   "from it). " if saved_step is not None else
                   f"No checkpoint was written yet (the first comes at the end of epoch 0, step {iters_per_epoch}). ")
                + "Usual causes: too high a learning rate, fp16 overflow (use bf16), no gradient clipping.")

    stopping = False
    # log lines go through tqdm.write above the bar instead of breaking it; the bar closes on an error too
    with _StopRequest() as stop, LoaderWorkers() as workers, logging_redirect_tqdm(), progress, metrics_log:
        while step < end_step:
            epoch = step // iters_per_epoch
            sampler.set_epoch(epoch, start_batch=step % iters_per_epoch)
            for batch_data in workers.iterate(loader):
                for group in optimizer.param_groups:
                    group["lr"] = lr_schedule[step]
                    if group["apply_wd"]:
                        group["weight_decay"] = wd_schedule[step]
                loss, step_metrics = train_step(method, batch_data, step, epoch, optimizer, scaler, params,
                                                cfg.optim, autocast_dtype)
                first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()),
                                             torch.full_like(first_bad_step, step), first_bad_step)
                step += 1
                window_images += method.batch_size(batch_data) * info.world_size
                progress.update(1)

                stopping = stop.poll()
                last_of_epoch = step % iters_per_epoch == 0
                if step % cfg.log_every == 0 or last_of_epoch or step == end_step or stopping:
                    check_finite(step)
                    values = torch.stack([loss.detach().float()] + [v.detach().float().to(device).reshape(())
                                                                    for v in step_metrics.values()])
                    distributed.all_reduce_mean(values)
                    elapsed = time.perf_counter() - window_start
                    metrics = {"step": step, "epoch": epoch, "loss": float(values[0]),
                               **{k: float(v) for k, v in zip(step_metrics, values[1:])},
                               "lr": float(lr_schedule[step - 1]), "weight_decay": float(wd_schedule[step - 1]),
                               "images_per_s": window_images / max(elapsed, 1e-9), "global_batch_size": global_batch}
                    window_start, window_images = time.perf_counter(), 0
                    if info.is_main:
                        metrics_log.write(metrics, "train")
                        postfix = dict(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                       img_s=f"{metrics['images_per_s']:.0f}")
                        progress.set_postfix(**postfix, **eval_postfix)
                        for warning in method.warnings(metrics):
                            logger.warning("step %d: %s", step, warning)
                if last_of_epoch or step == end_step or stopping:
                    check_finite(step)
                    rngs = gather_rng()
                    save(step)
                    eval_metrics: dict[str, float] = {}
                    if last_of_epoch:  # every rank
                        if knn is not None and knn.due(step // iters_per_epoch):
                            eval_metrics.update(knn.evaluate())
                            if info.is_main:
                                logger.info("after %d epoch(s): k-NN (k=%d) top-1 %.2f%%, top-5 %.2f%%", epoch + 1,
                                            cfg.eval.knn_k, 100 * eval_metrics["knn_top1"],
                                            100 * eval_metrics["knn_top5"])
                        eval_metrics.update(method.periodic_eval(step // iters_per_epoch))
                    metrics.update(eval_metrics)
                    if eval_metrics and info.is_main:
                        metrics_log.write({"step": step, "epoch": epoch, **eval_metrics}, "eval")
                        eval_postfix = {key.split("_")[0]: f"{100 * value:.1f}%" for key, value in eval_metrics.items()
                                       if key.endswith("_top1")}
                        progress.set_postfix(**postfix, **eval_postfix)
                if stopping or step >= end_step:
                    break
            if stopping:
                break
    progress.close()
    if stopping and step < end_step:
        metrics["stopped_by"] = sorted(stop.agreed)  # a launcher may requeue on SIGUSR2
        logger.info("stopped at step %d by %s; re-run the same command to resume", step,
                    " and ".join(sorted(stop.agreed)))
    elif info.is_main:
        logger.info("finished %d steps; checkpoint: %s", step, checkpoint_path)
    distributed.barrier()
    return metrics


def corrupt_image_message(exc: CorruptImageError) -> str:
    """The one line that names the file: a loader worker's error arrives with the worker's traceback."""
    last = str(exc).strip().splitlines()[-1]
    name, _, message = last.partition(": ")
    return message if name.endswith(CorruptImageError.__name__) and message else last


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-train",
        description="Train a ViT with a SPARO (or class-token) read-out by DINO self-distillation or CLIP. "
                    "Re-running the same command resumes from OUTPUT_DIR/checkpoint.pth.",
        epilog="Examples:\n  dino-sparo-train --config configs/dino/demo_fashion_mnist.yaml\n"
               "  dino-sparo-train --config configs/dino/vit_small16_vanilla_sparo.yaml data.path=/data/imagenet "
               "optim.epochs=300\n  torchrun --nproc_per_node 8 -m dino_sparo.train --config FILE\n"
               "Every config key (listed by --help-config) can be overridden as key.sub=value.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (keys not given keep their defaults: see --help-config)")
    parser.add_argument("--mode", choices=["dino", "clip"], help="training method; overrides 'mode' in the config")
    parser.add_argument("--output-dir", help="where config.yaml, checkpoint.pth and log.jsonl go "
                                             "(overrides 'output_dir')")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its type, default and meaning, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. optim.lr=0.001 model.readout=cls")
    return parser


def config_from_args(args: argparse.Namespace, validate: bool = True) -> TrainConfig:
    overrides = list(args.overrides)
    if args.mode:
        overrides.append(f"mode={args.mode}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides, validate=validate)


def is_user_error(exc: BaseException) -> bool:
    """A configuration the program cannot use: a ``ConfigError``, or a ``ValueError`` that names
    its config key as the project's errors do (``config key 'x.y' ...``). Anything else is a bug
    and keeps its traceback."""
    return isinstance(exc, ConfigError) or (isinstance(exc, ValueError) and str(exc).startswith("config key '"))


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print(format_config_reference())
        return
    try:
        cfg = config_from_args(args, validate=False)  # values are validated by train(), into train.log
        if args.print_config:
            validate_config(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    if args.print_config:
        import yaml
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return
    try:
        metrics = train(cfg)
    except NonFiniteLossError as exc:
        logger.error("%s", exc)
        raise SystemExit(EXIT_FAILED) from None
    except CorruptImageError as exc:
        logger.error("%s; data.corrupt_images=skip skips such files (with a warning naming each)",
                     corrupt_image_message(exc))
        raise SystemExit(EXIT_FAILED) from None
    except ValueError as exc:
        if not is_user_error(exc):
            raise
        logger.error("error: %s", exc)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        distributed.cleanup()
    if metrics.get("stopped_by"):  # stopped before the end: a script can tell it from a finished run
        raise SystemExit(stopped_exit_code(metrics["stopped_by"]))


if __name__ == "__main__":
    main()
