"""DINO loss against a per-pair reference, the centre EMA, precision under autocast, gradient flow
to every crop, and the collapse watch."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dino_sparo.losses import DINOLoss, collapse_warnings
from dino_sparo.schedules import linear_warmup_then_constant

TEACHER_TEMP = 0.07  # the temperature handed to the loss where a test does not vary it


def _make_loss(out_dim, n_local, n_global=2, **kw):
    return DINOLoss(out_dim, n_global_crops=n_global, n_local_crops=n_local, **kw)


def _reference_loss(student, teacher, center, n_global, n_crops, student_temp, teacher_temp):
    """DINO v1's loop in float64: every (teacher global crop, other student crop) pair, averaged."""
    student, teacher, center = student.double(), teacher.double(), center.double()
    s_chunks = (student / student_temp).chunk(n_crops)
    t_chunks = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(n_global)
    total, n_terms, kl_total = 0.0, 0, 0.0
    for iq, q in enumerate(t_chunks):
        for v, s in enumerate(s_chunks):
            if v == iq:
                continue
            log_p = F.log_softmax(s, dim=-1)
            total += (-(q * log_p).sum(-1)).mean()
            kl_total += (q * (q.clamp_min(1e-300).log() - log_p)).sum(-1).mean()
            n_terms += 1
    return total / n_terms, kl_total / n_terms


def _reference_temperature(warmup_temp, temp, warmup_epochs, epoch):
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * (epoch / (warmup_epochs - 1) if warmup_epochs > 1 else 0.0)


@pytest.mark.parametrize(
    "batch,out_dim,n_global,n_local",
    [(4, 16, 2, 0), (3, 32, 2, 4), (5, 7, 2, 8), (2, 64, 1, 3), (3, 10, 3, 2)],
)
@pytest.mark.parametrize("epoch", [0, 1, 5])
@pytest.mark.parametrize("student_temp,temps", [(0.1, (0.04, 0.07)), (0.2, (0.02, 0.04)), (0.1, (0.05, 0.05))])
def test_loss_matches_per_pair_reference(batch, out_dim, n_global, n_local, epoch, student_temp, temps):
    torch.manual_seed(batch * 1000 + out_dim + epoch)
    n_crops = n_global + n_local
    loss_fn = _make_loss(out_dim, n_local, n_global=n_global, student_temp=student_temp)
    loss_fn.center.copy_(torch.randn(1, out_dim) * 0.3)  # a non-trivial centre
    center_before = loss_fn.center.clone()
    student = torch.randn(n_crops * batch, out_dim) * 2
    teacher = torch.randn(n_global * batch, out_dim) * 2
    schedule = linear_warmup_then_constant(*temps, 3, 10)  # what the loop indexes and hands in
    loss, stats = loss_fn(student, teacher, float(schedule[epoch]), return_stats=True)

    t_temp = _reference_temperature(*temps, 3, epoch)
    assert float(schedule[epoch]) == pytest.approx(t_temp)
    ref_loss, ref_kl = _reference_loss(student, teacher, center_before, n_global, n_crops, student_temp, t_temp)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    assert stats["kl_teacher_student"].item() == pytest.approx(ref_kl.item(), rel=1e-4, abs=1e-5)
    assert stats["kl_teacher_student"].item() >= -1e-5

    q = F.softmax((teacher.double() - center_before.double()) / t_temp, dim=-1)
    ref_entropy = (-(q * q.clamp_min(1e-300).log()).sum(-1)).mean()
    mean_q = q.mean(0)
    ref_mean_entropy = -(mean_q * mean_q.clamp_min(1e-300).log()).sum()
    assert stats["teacher_entropy"].item() == pytest.approx(ref_entropy.item(), rel=1e-4, abs=1e-5)
    assert stats["teacher_mean_entropy"].item() == pytest.approx(ref_mean_entropy.item(), rel=1e-4, abs=1e-5)
    assert loss_fn.last_stats is stats
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_teacher_temperature_schedule_is_dino_linear_warmup_then_constant():
    from types import SimpleNamespace

    from dino_sparo.schedules import teacher_temperature_schedule
    dino = SimpleNamespace(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    expected = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    np.testing.assert_allclose(teacher_temperature_schedule(dino, 100), expected)
    with pytest.raises(ValueError, match="teacher_temp must be > 0"):
        _make_loss(8, 2)(torch.randn(4 * 3, 8), torch.randn(2 * 3, 8), 0.0)


def test_center_update_is_the_ema_formula_and_uses_the_old_centre():
    torch.manual_seed(0)
    loss_fn = _make_loss(12, 3, center_momentum=0.8)
    c0 = torch.randn(1, 12)
    loss_fn.center.copy_(c0)
    teacher = torch.randn(2 * 5, 12)
    student = torch.randn(5 * 5, 12)
    loss = loss_fn(student, teacher, TEACHER_TEMP)
    expected = 0.8 * c0 + 0.2 * teacher.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected, rtol=1e-6, atol=1e-6)
    ref, _ = _reference_loss(student, teacher, c0, 2, 5, 0.1, 0.07)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)

    # A second batch moves the centre again; the separate call does the same as the one in forward.
    teacher2 = torch.randn(2 * 5, 12)
    loss_fn.update_center(teacher2)
    torch.testing.assert_close(loss_fn.center, 0.8 * expected + 0.2 * teacher2.mean(0, keepdim=True))


def test_update_center_false_leaves_centre_and_centre_is_in_state_dict():
    loss_fn = _make_loss(6, 2)
    loss_fn(torch.randn(4 * 3, 6), torch.randn(2 * 3, 6), TEACHER_TEMP, update_center=False)
    assert torch.count_nonzero(loss_fn.center) == 0
    loss_fn.update_center(torch.ones(6, 6))
    sd = loss_fn.state_dict()
    assert set(sd) == {"center"}
    other = _make_loss(6, 2)
    other.load_state_dict(sd)
    torch.testing.assert_close(other.center, torch.full((1, 6), 0.1))


def test_center_update_with_single_process_group_matches_local(tmp_path):
    """With a process group the batch mean is all-reduced; world size 1 must give the local mean."""
    assert not dist.is_initialized()
    torch.manual_seed(1)
    teacher = torch.randn(8, 5)
    local = _make_loss(5, 2)
    local.update_center(teacher)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        grouped = _make_loss(5, 2)
        grouped.update_center(teacher)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(grouped.center, local.center)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_is_fp32_under_autocast(dtype):
    torch.manual_seed(2)
    n_local, batch, out_dim = 4, 6, 256
    student = (torch.randn(6 * batch, out_dim) * 3).to(dtype)
    teacher = (torch.randn(2 * batch, out_dim) * 3).to(dtype)
    plain = _make_loss(out_dim, n_local)
    auto = _make_loss(out_dim, n_local)
    expected = plain(student.float(), teacher.float(), TEACHER_TEMP)
    with torch.autocast("cpu", dtype=dtype):
        got, stats = auto(student, teacher, TEACHER_TEMP, return_stats=True)
        # fp32 inputs under autocast give the plain fp32 result too
        got_fp32_inputs = _make_loss(out_dim, n_local)(student.float(), teacher.float(), TEACHER_TEMP)
    assert got.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in stats.values())
    assert auto.center.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_fp32_inputs, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(auto.center, plain.center, rtol=1e-6, atol=1e-6)


def test_every_student_crop_gets_gradient_and_teacher_none():
    torch.manual_seed(3)
    n_global, n_local, batch, out_dim = 2, 6, 4, 32
    n_crops = n_global + n_local
    student = torch.randn(n_crops * batch, out_dim, requires_grad=True)
    teacher = torch.randn(n_global * batch, out_dim, requires_grad=True)
    loss = _make_loss(out_dim, n_local)(student, teacher, TEACHER_TEMP)
    loss.backward()
    assert teacher.grad is None
    for crop, grad in enumerate(student.grad.chunk(n_crops)):
        assert grad.abs().sum() > 0, f"crop {crop} receives no gradient"
        # log-softmax gradients sum to zero over the outputs of each sample
        torch.testing.assert_close(grad.sum(-1), torch.zeros(batch), atol=1e-6, rtol=0)


def test_shape_errors_name_the_problem():
    loss_fn = _make_loss(8, 2)
    with pytest.raises(ValueError, match="crop-major"):
        loss_fn(torch.randn(4 * 3 + 1, 8), torch.randn(2 * 3, 8), TEACHER_TEMP)
    with pytest.raises(ValueError, match="student_output"):
        loss_fn(torch.randn(4 * 3, 9), torch.randn(2 * 3, 8), TEACHER_TEMP)
    with pytest.raises(ValueError, match="student_temp"):
        _make_loss(8, 2, student_temp=0.0)


def _stats_for_teacher(teacher_logits, out_dim, n_local=2):
    batch = teacher_logits.shape[0] // 2
    loss_fn = _make_loss(out_dim, n_local)
    student = torch.randn((2 + n_local) * batch, out_dim)
    _, stats = loss_fn(student, teacher_logits, TEACHER_TEMP, return_stats=True)
    return stats


def test_collapse_warnings_uniform_teacher():
    out_dim = 512
    stats = _stats_for_teacher(torch.zeros(2 * 16, out_dim), out_dim)
    assert stats["teacher_entropy"].item() == pytest.approx(math.log(out_dim), rel=1e-5)
    warnings = collapse_warnings(stats, out_dim)
    assert len(warnings) == 1 and warnings[0].startswith("uniform collapse")
    assert "teacher temperature" in warnings[0]


def test_collapse_warnings_one_hot_constant_teacher():
    out_dim = 512
    teacher = torch.zeros(2 * 16, out_dim)
    teacher[:, 7] = 10.0  # every image to output 7
    stats = _stats_for_teacher(teacher, out_dim)
    assert stats["teacher_mean_entropy"].item() < 1e-3
    warnings = collapse_warnings(stats, out_dim)
    assert len(warnings) == 1 and warnings[0].startswith("one-prototype collapse")
    assert "centre momentum" in warnings[0]


def test_collapse_warnings_quiet_for_healthy_random_teacher():
    torch.manual_seed(4)
    out_dim = 512
    stats = _stats_for_teacher(torch.randn(2 * 16, out_dim), out_dim)
    assert collapse_warnings(stats, out_dim) == []


def test_collapse_warnings_non_finite():
    stats = {"teacher_entropy": torch.tensor(float("nan")), "teacher_mean_entropy": torch.tensor(1.0)}
    warnings = collapse_warnings(stats, 64)
    assert len(warnings) == 1 and "non-finite" in warnings[0] and "teacher_entropy" in warnings[0]


@pytest.mark.gpu
def test_forward_backward_and_centre_update_do_not_sync_with_the_host():
    device = torch.device("cuda")
    loss_fn = _make_loss(1024, 6).to(device)
    student = torch.randn(8 * 16, 1024, device=device, requires_grad=True)
    teacher = torch.randn(2 * 16, 1024, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            loss, stats = loss_fn(student.half(), teacher.half(), TEACHER_TEMP, return_stats=True)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.dtype == torch.float32 and torch.isfinite(loss).item()
    assert student.grad is not None and len(stats) == 3
