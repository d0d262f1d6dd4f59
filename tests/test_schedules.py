"""Schedules: lengths, end-points, warm-up shape, monotonic cosine, against per-element formulas."""

import math

import numpy as np
import pytest

from dino_sparo.schedules import cosine_schedule, linear_warmup_then_constant


def _reference_cosine(base, final, epochs, ipe, warmup_epochs, start, warmup_iters=0):
    """Element-by-element DINO cosine schedule, written independently of the implementation."""
    total, warm = epochs * ipe, warmup_iters or warmup_epochs * ipe
    values = []
    for i in range(total):
        if i < warm:
            # np.linspace(start, base, 1) == [start]
            values.append(start + (base - start) * (i / (warm - 1) if warm > 1 else 0.0))
        else:
            j, n = i - warm, total - warm
            values.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * j / n)))
    return np.array(values)


@pytest.mark.parametrize(
    "base,final,epochs,ipe,warmup,start",
    [
        (5e-4, 1e-6, 10, 7, 2, 0.0),
        (0.04, 0.4, 5, 3, 0, 0.0),  # weight decay goes up
        (0.996, 1.0, 4, 5, 0, 0.0),  # teacher momentum
        (1.0, 0.0, 3, 1, 1, 0.5),
        (1.0, 0.0, 2, 4, 2, 0.1),  # warm-up covers everything
    ],
)
def test_cosine_schedule_matches_reference(base, final, epochs, ipe, warmup, start):
    schedule = cosine_schedule(base, final, epochs, ipe, warmup_epochs=warmup, start_warmup_value=start)
    assert schedule.shape == (epochs * ipe,)
    np.testing.assert_allclose(schedule, _reference_cosine(base, final, epochs, ipe, warmup, start), rtol=0, atol=1e-12)


def test_cosine_schedule_warms_up_for_a_number_of_iterations():
    schedule = cosine_schedule(5e-4, 0.0, 4, 10, warmup_iters=13)
    np.testing.assert_allclose(schedule, _reference_cosine(5e-4, 0.0, 4, 10, 0, 0.0, warmup_iters=13),
                               rtol=0, atol=1e-12)
    assert schedule.argmax() in (12, 13) and schedule.max() == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="warmup_iters"):
        cosine_schedule(1.0, 0.0, 2, 3, warmup_iters=7)
    with pytest.raises(ValueError, match="not both"):
        cosine_schedule(1.0, 0.0, 2, 3, warmup_epochs=1, warmup_iters=2)


def test_cosine_schedule_end_points_and_warmup():
    epochs, ipe, warmup = 10, 20, 3
    s = cosine_schedule(1.0, 0.01, epochs, ipe, warmup_epochs=warmup, start_warmup_value=0.2)
    w = warmup * ipe
    assert s[0] == pytest.approx(0.2)
    assert s[w - 1] == pytest.approx(1.0)  # linspace includes its end point
    assert s[w] == pytest.approx(1.0)  # cosine starts at the base value
    assert np.all(np.diff(s[:w]) > 0)  # warm-up rises linearly
    np.testing.assert_allclose(np.diff(s[:w]), (1.0 - 0.2) / (w - 1))
    assert s[-1] > 0.01 and s[-1] == pytest.approx(0.01, abs=1e-3)  # one step short of final
    assert np.all(np.diff(s[w:]) < 0)  # strictly decreasing cosine


def test_cosine_schedule_increasing_when_final_above_base():
    s = cosine_schedule(0.996, 1.0, 5, 10)
    assert s[0] == pytest.approx(0.996)
    assert np.all(np.diff(s) > 0)
    assert np.all(s < 1.0)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(epochs=2, iters_per_epoch=3, warmup_epochs=3), "warmup_epochs"),
        (dict(epochs=-1, iters_per_epoch=3), "epochs"),
        (dict(epochs=2, iters_per_epoch=2.5), "iters_per_epoch"),
    ],
)
def test_cosine_schedule_rejects_bad_arguments_naming_them(kwargs, key):
    with pytest.raises(ValueError, match=key):
        cosine_schedule(1.0, 0.0, **kwargs)


def test_linear_warmup_then_constant():
    s = linear_warmup_then_constant(0.04, 0.07, 30, 100)
    assert s.shape == (100,)
    assert s[0] == pytest.approx(0.04)
    assert s[29] == pytest.approx(0.07)  # reaches the final value at the last warm-up step
    np.testing.assert_allclose(s[:30], [0.04 + 0.03 * i / 29 for i in range(30)])
    assert np.all(s[30:] == 0.07)
    assert np.all(np.diff(s) >= 0)


def test_linear_warmup_then_constant_without_warmup_is_constant():
    np.testing.assert_array_equal(linear_warmup_then_constant(0.04, 0.04, 0, 5), np.full(5, 0.04))


def test_linear_warmup_then_constant_rejects_warmup_longer_than_total():
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup_then_constant(0.04, 0.07, 30, 10)


def test_schedules_at_hands_the_method_its_step_and_epoch_values():
    from dino_sparo.config import load_config
    from dino_sparo.schedules import build_schedules, teacher_temperature_schedule

    cfg = load_config(None, ["optim.epochs=3", "optim.warmup_epochs=1", "dino.warmup_teacher_temp_epochs=2", "dino.warmup_teacher_temp=0.01"])
    schedules = build_schedules(cfg, global_batch=64, iters_per_epoch=4)
    temps = teacher_temperature_schedule(cfg.dino, 3)
    momentum = cosine_schedule(cfg.dino.momentum_teacher, 1.0, 3, 4)
    for step in range(12):
        values = schedules.at(step, step // 4)
        assert values.teacher_temp == temps[step // 4] and values.teacher_momentum == momentum[step]
    assert build_schedules(load_config(None, ["mode=clip", "optim.epochs=3", "optim.warmup_epochs=1"]), 64, 4).at(0, 0).teacher_temp is None
