"""One checkpoint format for both modes, written atomically: a crash or a kill while saving never
leaves a corrupt ``checkpoint.pth`` (the new file is written beside it, flushed, then renamed).

A training state holds one state dict per module of the method (DINO: ``student``, ``teacher``,
``loss``; CLIP: ``model``), ``optimizer``, ``scaler`` (None without fp16), ``step``, ``epoch``, the
run's ``config`` (a dict) and ``rng`` (one RNG state per process). This module builds, restores and
reads it; nothing else looks inside it by key except the model loaders, through :func:`load_run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dino_sparo.config import ConfigError, TrainConfig, from_dict, to_dict
from dino_sparo.errors import CheckpointError, UsageError
from dino_sparo.files import atomic_write


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, rename); a
    full disk is one line (``DiskFullError``)."""
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Our checkpoints hold numpy RNG states and the config dict besides tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); it may be truncated or not "
                              "a dino_sparo checkpoint") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict of states")
    return state


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """Keys starting with ``prefix`` with it removed (e.g. ``backbone.``, DDP's ``module.``)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


@dataclass
class Run:
    """A training checkpoint with the config it was written with (``cfg`` rebuilt as a ``TrainConfig``,
    keys added since then at their defaults)."""

    state: dict
    cfg: TrainConfig
    path: Path


def is_training_state(state: dict) -> bool:
    """Whether a loaded file is a dino_sparo training state (it carries its ``config``)."""
    return isinstance(state.get("config"), dict)


def load_run(path: str | Path, map_location: Any = "cpu") -> Run:
    """The training checkpoint at ``path`` and its config; a file without one is refused, naming it."""
    state = load_checkpoint(path, map_location=map_location)
    if not is_training_state(state):
        raise UsageError(f"checkpoint {path} has no 'config' entry; it was not written by dino-sparo-train")
    return Run(state=state, cfg=from_dict(state["config"]), path=Path(path))


def training_state(modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, step: int, iters_per_epoch: int, cfg: TrainConfig,
                   rngs: list) -> dict:
    """What ``checkpoint.pth`` holds after ``step`` steps (see the module's doc)."""
    state = {name: module.state_dict() for name, module in modules.items()}
    state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else None,
                 step=step, epoch=step // iters_per_epoch, config=to_dict(cfg), rng=rngs)
    return state


def restore_training_state(state: dict, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler, rank: int) -> dict:
    """Load ``state`` into the method's modules, the optimiser and the scaler; returns this process'
    RNG state (a process the checkpoint had no state for takes rank 0's)."""
    for name, module in modules.items():
        module.load_state_dict(state[name])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:  # e.g. a share_kv: false run written when SPARO still had a key bias there
        raise ConfigError(f"the checkpoint's optimiser state does not fit this run's parameters ({exc}): start a "
                          "new output_dir from its weights (model.pretrained=<the checkpoint>)") from None
    if state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]


def check_global_batch(state: dict, batch_size_per_gpu: int, world_size: int, checkpoint_path: Path) -> None:
    """Refuse to resume with another global batch: the steps per epoch and the schedules depend on it."""
    saved_world = len(state["rng"])  # one RNG state per process that wrote it
    saved_global = state["config"]["data"]["batch_size_per_gpu"] * saved_world
    global_batch = batch_size_per_gpu * world_size
    if saved_global != global_batch:
        raise ConfigError(f"{checkpoint_path} was written with a global batch of {saved_global} ({saved_world} "
                          f"process(es)); this run has {global_batch} ({world_size} process(es) × "
                          f"data.batch_size_per_gpu {batch_size_per_gpu}): resume with the same global batch, or "
                          "start a new output_dir")


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
    "max_steps", "model.attn_backend", "model.pack_crops", "model.pretrained", "data.path", "data.num_workers",
    "data.corrupt_images", "eval.", "clip.zeroshot_", "clip.train_data",
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
