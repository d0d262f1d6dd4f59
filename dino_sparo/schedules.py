"""Training schedules as precomputed arrays, indexed by iteration (or epoch).

Arrays rather than scheduler objects: they are pure functions of their arguments, trivial to test,
and resuming at any step is just indexing (the DINO recipe: lr, weight decay, teacher momentum and
teacher temperature all follow one of the two shapes below).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
from dino_sparo.errors import ConfigError

__all__ = ["Schedules", "StepValues", "build_schedules", "cosine_schedule", "linear_warmup_then_constant",
           "lr_schedule", "method_schedules", "teacher_temperature_schedule"]


def _check_non_negative_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"schedule argument '{name}' must be a non-negative int, got {value!r}")


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
    warmup_iters: int = 0,
) -> np.ndarray:
    """Per-iteration values: linear warm-up to `base_value`, then cosine decay towards `final_value`.

    The warm-up lasts `warmup_epochs` whole epochs or, when `warmup_iters` > 0, that many iterations.

    Same values as DINO's `cosine_scheduler`: the warm-up is `np.linspace(start, base, W)` (its last
    step already equals `base_value`), the cosine part starts at `base_value` and its last step is
    one step short of `final_value` (the cosine phase is `pi * i / n` for i in 0..n-1).
    Returns an array of length `epochs * iters_per_epoch`.
    """
    _check_non_negative_int("epochs", epochs)
    _check_non_negative_int("iters_per_epoch", iters_per_epoch)
    _check_non_negative_int("warmup_epochs", warmup_epochs)
    _check_non_negative_int("warmup_iters", warmup_iters)
    if warmup_epochs > epochs:
        raise ValueError(
            f"schedule argument 'warmup_epochs' ({warmup_epochs}) must not exceed 'epochs' ({epochs})"
        )
    total_iters = epochs * iters_per_epoch
    if warmup_iters and warmup_epochs:
        raise ValueError("schedule arguments 'warmup_epochs' and 'warmup_iters': give one of them, not both")
    if warmup_iters > total_iters:
        raise ValueError(
            f"schedule argument 'warmup_iters' ({warmup_iters}) must not exceed the {total_iters} iterations"
        )
    warmup_iters = warmup_iters or warmup_epochs * iters_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    n_cosine = total_iters - warmup_iters
    iters = np.arange(n_cosine)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(n_cosine, 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total_iters
    return schedule


def linear_warmup_then_constant(
    start_value: float, final_value: float, warmup_steps: int, total_steps: int
) -> np.ndarray:
    """Per-step values: `np.linspace(start, final, warmup_steps)` then `final_value` until `total_steps`.

    DINO's teacher-temperature schedule (per epoch): a too hot teacher early on destabilises
    training, so it starts at `start_value` and reaches `final_value` at step `warmup_steps - 1`.
    """
    _check_non_negative_int("warmup_steps", warmup_steps)
    _check_non_negative_int("total_steps", total_steps)
    if warmup_steps > total_steps:
        raise ValueError(
            f"schedule argument 'warmup_steps' ({warmup_steps}) must not exceed 'total_steps' ({total_steps})"
        )
    return np.concatenate(
        (
            np.linspace(start_value, final_value, warmup_steps),
            np.full(total_steps - warmup_steps, final_value, dtype=np.float64),
        )
    )


# ----------------------------------------------------------------------------------- a run's schedules

@dataclass
class Schedules:
    """Every schedule of one run, built together so that the loop, the method and the loss read the
    same numbers; indexed by step except ``teacher_temperature`` (by epoch, as DINO)."""

    lr: Optional[np.ndarray] = None  # None: a method used on its own (see method_schedules)
    weight_decay: Optional[np.ndarray] = None
    teacher_momentum: Optional[np.ndarray] = None  # DINO: the teacher's EMA momentum
    teacher_temperature: Optional[np.ndarray] = None  # DINO: the loss' teacher temperature

    def at(self, step: int, epoch: int) -> "StepValues":
        """The values a method is handed at ``step`` (of ``epoch``): the loop indexes, the method uses."""
        return StepValues(
            teacher_temp=None if self.teacher_temperature is None else float(self.teacher_temperature[epoch]),
            teacher_momentum=None if self.teacher_momentum is None else float(self.teacher_momentum[step]),
        )


@dataclass(frozen=True)
class StepValues:
    """One step's scheduled values for the method (None where its mode has no such schedule):
    ``method.loss(..., teacher_temp=)`` and ``method.after_optimizer_step(step, momentum)``."""

    teacher_temp: Optional[float] = None
    teacher_momentum: Optional[float] = None


def lr_schedule(optim: Any, global_batch: int, iters_per_epoch: int) -> np.ndarray:
    """Per-step learning rates: warm-up then cosine to ``optim.min_lr``, peaking at ``optim.lr`` scaled
    by the global batch / 256 (``lr_scaling: linear``, DINO's rule) or at ``optim.lr`` itself (``none``)."""
    if optim.warmup_steps:
        if optim.warmup_steps > optim.epochs * iters_per_epoch:
            raise ConfigError(f"config key 'optim.warmup_steps' ({optim.warmup_steps}) exceeds the run's "
                             f"{optim.epochs * iters_per_epoch} steps")
        warmup = {"warmup_iters": optim.warmup_steps}
    else:
        if optim.warmup_epochs > optim.epochs:
            raise ConfigError(f"config key 'optim.warmup_epochs' ({optim.warmup_epochs}) exceeds "
                             f"'optim.epochs' ({optim.epochs})")
        warmup = {"warmup_epochs": optim.warmup_epochs}
    peak = optim.lr * global_batch / 256.0 if optim.lr_scaling == "linear" else optim.lr
    return cosine_schedule(peak, optim.min_lr, optim.epochs, iters_per_epoch, **warmup)


def teacher_temperature_schedule(dino: Any, epochs: int) -> np.ndarray:
    """DINO's per-epoch teacher temperature: a too hot teacher early on destabilises training, so
    it warms up linearly from ``dino.warmup_teacher_temp`` to ``dino.teacher_temp``."""
    return linear_warmup_then_constant(dino.warmup_teacher_temp, dino.teacher_temp, dino.warmup_teacher_temp_epochs,
                                       epochs)


def build_schedules(cfg: Any, global_batch: int, iters_per_epoch: int, epochs: Optional[int] = None) -> Schedules:
    """All schedules of a run of ``cfg`` (a ``TrainConfig``), as DINOv2 builds them in one place.
    ``epochs`` defaults to ``cfg.optim.epochs``; the DINO ones are left out in other modes."""
    optim = cfg.optim
    epochs = optim.epochs if epochs is None else epochs
    if epochs != optim.epochs:
        optim = replace(optim, epochs=epochs)
    schedules = method_schedules(cfg, iters_per_epoch, epochs)
    schedules.lr = lr_schedule(optim, global_batch, iters_per_epoch)
    schedules.weight_decay = cosine_schedule(optim.weight_decay, optim.weight_decay_end, epochs, iters_per_epoch)
    return schedules


def method_schedules(cfg: Any, iters_per_epoch: int, epochs: Optional[int] = None) -> Schedules:
    """The schedules a method follows itself (DINO: the teacher's), without the optimiser's: what a
    method used outside the training loop (a benchmark, a test) needs."""
    epochs = cfg.optim.epochs if epochs is None else epochs
    schedules = Schedules()
    if cfg.mode == "dino":  # teacher momentum: cosine from dino.momentum_teacher to 1 over the whole run
        schedules.teacher_momentum = cosine_schedule(cfg.dino.momentum_teacher, 1.0, epochs, iters_per_epoch)
        schedules.teacher_temperature = teacher_temperature_schedule(cfg.dino, epochs)
    return schedules
