"""Training schedules as precomputed arrays, indexed by iteration (or epoch).

Arrays rather than scheduler objects: they are pure functions of their arguments, trivial to test,
and resuming at any step is just indexing (the DINO recipe: lr, weight decay, teacher momentum and
teacher temperature all follow one of the two shapes below).
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_schedule", "linear_warmup_then_constant"]


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
