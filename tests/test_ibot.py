"""iBOT's masked-patch loss: the loss against a per-patch loop, the masks' ratio and block shape, the
teacher never seeing a mask, exact resume and two processes against one with iBOT on."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from dino_sparo.checkpoint import load_checkpoint
from dino_sparo.config import load_config
from dino_sparo.data.masking import BlockMaskGenerator, MaskedCrops, masked_multicrop_collate
from dino_sparo.losses import IBOTPatchLoss
from dino_sparo.methods.dino import DinoMethod
from dino_sparo.train import train

from conftest import TINY_MODEL, TINY_TRAINING
from test_dinov2_options import _reference_sinkhorn
from test_distributed import needs_data

IBOT = ["ibot.loss_weight=0.5"]


def _reference_ibot(student, teacher, masks, teacher_temp, student_temp, center=None, sinkhorn=False):
    """Per crop, the mean over its masked patches of -sum_k q log p; then the mean over all crops
    (crops without a mask add 0), in float64 with explicit loops."""
    n_crops, n_patches = masks.shape
    rows = masks.flatten().nonzero().flatten().tolist()
    if sinkhorn:
        q_all = torch.from_numpy(_reference_sinkhorn(teacher.double().numpy(), teacher_temp, 3))
    else:
        q_all = F.softmax((teacher.double() - center.double()) / teacher_temp, dim=-1)
    total, row = 0.0, 0
    per_crop = {}
    for flat in rows:
        crop = flat // n_patches
        log_p = F.log_softmax(student[row].double() / student_temp, dim=-1)
        per_crop.setdefault(crop, []).append(float(-(q_all[row] * log_p).sum()))
        row += 1
    for values in per_crop.values():
        total += sum(values) / len(values)
    return total / n_crops


def _random_masks(n_crops, n_patches, seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_crops, n_patches, generator=g) < 0.3
    masks[0] = False  # one crop without a mask: it counts in the mean as 0
    return masks


def _patch_weight(masks):
    index = masks.flatten().nonzero().flatten()
    weight = (1.0 / masks.sum(1, keepdim=True).clamp_min(1).float()).expand_as(masks).flatten()[index]
    return index, weight


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
def test_loss_matches_a_per_patch_reference(centering, teacher_temp):
    torch.manual_seed(0)
    k, n_crops, n_patches = 12, 6, 16
    masks = _random_masks(n_crops, n_patches, 1)
    index, weight = _patch_weight(masks)
    m = index.numel()
    student, teacher = torch.randn(m, k) * 2, torch.randn(m, k) * 0.5  # teacher logits / 0.04 stay within fp32's exp
    loss_fn = IBOTPatchLoss(k, student_temp=0.1, center_momentum=0.8, centering=centering)
    center = torch.randn(1, k) * 0.3
    loss_fn.center.copy_(center)
    loss, stats = loss_fn(student, teacher, weight, n_crops, teacher_temp, return_stats=True)
    expected = _reference_ibot(student, teacher, masks, teacher_temp, 0.1, center, centering == "sinkhorn_knopp")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    if centering == "center":  # the EMA centre moves towards the mean of the masked patches' teacher outputs
        torch.testing.assert_close(loss_fn.center, 0.8 * center + 0.2 * teacher.mean(0, keepdim=True))
    else:
        torch.testing.assert_close(loss_fn.center, center)
    assert set(stats) == {"ibot_teacher_entropy", "ibot_teacher_mean_entropy"}


def test_no_masked_patch_gives_zero_loss_and_keeps_the_centre():
    loss_fn = IBOTPatchLoss(8)
    loss_fn.center.fill_(0.5)
    student = torch.zeros(0, 8, requires_grad=True)
    loss = loss_fn(student, torch.zeros(0, 8), torch.zeros(0), 4, 0.04)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(loss_fn.center == 0.5)


def test_block_masks_reach_their_size_and_one_rectangle_has_a_bounded_aspect():
    random.seed(0)
    generator = BlockMaskGenerator(14, 14)
    for n in (4, 19, 58, 98):
        counts = [int(generator(n).sum()) for _ in range(100)]
        assert max(counts) <= n and sum(counts) / len(counts) >= 0.95 * n
    for _ in range(200):  # one rectangle on an empty grid: a filled box, aspect within [0.3, 1 / 0.3] up to rounding
        mask = torch.zeros(14, 14, dtype=torch.bool)
        added = generator._add_rectangle(mask, 40)
        if not added:
            continue
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(mask.sum()) == h * w == added <= 40
        assert 0.3 * (w - 0.5) / (h + 0.5) <= 1 and (h - 0.5) / (w + 0.5) <= 1 / 0.3


def test_masked_crops_follow_the_probability_and_the_ratio():
    transform = MaskedCrops(lambda image: [image, image], n_global=2, grid=7, mask_probability=0.5,
                            mask_ratio=(0.1, 0.5))
    random.seed(3)
    masks = torch.cat([transform(torch.zeros(1))[1] for _ in range(600)])  # 1200 crops × 49
    counts = masks.sum(1)
    share = (counts > 0).float().mean().item()
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / 1200)  # a binomial share within 4 standard deviations
    masked = counts[counts > 0]
    assert masked.min() >= int(49 * 0.1) - 2 and masked.max() <= int(49 * 0.5)


def test_collate_gives_crop_major_masks_and_per_crop_weights():
    items = [(([torch.full((1, 4, 4), float(i)), torch.full((1, 4, 4), 10.0 + i)],
               torch.tensor([[True, False, True, False], [False, False, False, i == 1]])), i) for i in range(2)]
    crops, labels, (masks, index, weight) = masked_multicrop_collate(items)
    assert [c[:, 0, 0, 0].tolist() for c in crops] == [[0.0, 1.0], [10.0, 11.0]]
    # crop-major: image 0 and 1 of crop 0, then of crop 1
    assert masks.tolist() == [[True, False, True, False], [True, False, True, False],
                              [False, False, False, False], [False, False, False, True]]
    assert index.tolist() == [0, 2, 4, 6, 15] and weight.tolist() == [0.5, 0.5, 0.5, 0.5, 1.0]


def _tiny_method(*extra):
    cfg = load_config(None, [*TINY_MODEL, *IBOT, *extra])
    torch.manual_seed(0)
    return cfg, DinoMethod(cfg, torch.device("cpu"))


def _batch(cfg, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [cfg.crops.global_crops_size] * 2 + [cfg.crops.local_crops_size] * cfg.crops.local_crops_number
    crops = [torch.randn(batch, 3, s, s, generator=g) for s in sizes]
    n_patches = (cfg.crops.global_crops_size // cfg.model.patch_size) ** 2
    masks = _random_masks(2 * batch, n_patches, seed + 1)
    index, weight = _patch_weight(masks)
    return crops, None, (masks, index, weight)


@pytest.mark.parametrize("extra", [[], ["model.num_registers=2"], ["model.readout=cls", "ibot.separate_head=false"]])
def test_the_teacher_never_sees_a_mask_token(monkeypatch, extra):
    cfg, method = _tiny_method(*extra)
    batch = _batch(cfg)
    seen = []
    original = type(method.teacher.backbone).prepare_tokens

    def spy(backbone, x, masks=None, mask_token=None):
        seen.append((backbone is method.teacher.backbone, masks is not None and bool(masks.any())))
        return original(backbone, x, masks, mask_token)

    monkeypatch.setattr(type(method.teacher.backbone), "prepare_tokens", spy)
    loss, metrics = method.loss(batch, 0, 0, teacher_temp=0.04)
    assert seen and all(not masked for is_teacher, masked in seen if is_teacher)
    assert any(masked for is_teacher, masked in seen if not is_teacher)  # the student's global crops are masked
    assert {"ibot_loss", "ibot_teacher_entropy", "ibot_teacher_mean_entropy"} <= set(metrics)
    # the teacher's patch targets do not move with the mask token; the student's patch outputs do
    crops, _, (masks, index, _) = batch
    with torch.no_grad():
        teacher_before = method.teacher(crops[:2], patch_index=index)[2]
        student_before = method.student(crops, masks=masks, patch_index=index)[2]
        for wrapper in (method.teacher, method.student):
            wrapper.mask_token.add_(1.0)
        torch.testing.assert_close(method.teacher(crops[:2], patch_index=index)[2], teacher_before, rtol=0, atol=0)
        assert not torch.allclose(method.student(crops, masks=masks, patch_index=index)[2], student_before)


def test_the_step_loss_is_dino_plus_the_weighted_ibot_loss_of_the_last_blocks_patches():
    cfg, method = _tiny_method("dino.koleo_weight=0.0")
    crops, _, (masks, index, weight) = batch = _batch(cfg)
    loss, metrics = method.loss(batch, 0, 0, teacher_temp=0.04)
    with torch.no_grad():  # the patch tokens are the normed tokens of the last block before the read-out
        backbone = method.student.backbone
        tokens = backbone.forward_tokens(torch.cat(crops[:2]), masks, method.student.mask_token)
        patches = tokens[:, backbone.num_prefix_tokens:].reshape(-1, tokens.shape[-1])[index]
        student_patch_out = method.student.ibot_head(patches)
        _, _, teacher_patch_out = method.teacher(crops[:2], patch_index=index)
    fresh = IBOTPatchLoss(method.ibot_loss_fn.out_dim, centering=cfg.dino.centering)
    expected_ibot = fresh(student_patch_out, teacher_patch_out, weight, masks.shape[0], 0.04)
    assert metrics["ibot_loss"].item() == pytest.approx(expected_ibot.item(), rel=1e-5)
    dino_part = loss.item() - 0.5 * metrics["ibot_loss"].item()
    assert dino_part == pytest.approx(metrics["kl_teacher_student"].item() + metrics["teacher_entropy"].item(),
                                      rel=1e-4)


def _tiny_run(path, *extra):
    return load_config(None, [*TINY_TRAINING, *IBOT, "dino.centering=sinkhorn_knopp", "model.num_registers=2",
                              f"output_dir={path}", *extra])


def test_stop_and_resume_with_ibot_is_bit_identical(tmp_path):
    from test_train import read_log

    full, split = tmp_path / "full", tmp_path / "split"
    train(_tiny_run(full, "max_steps=7", "data.num_workers=2"))
    train(_tiny_run(split, "max_steps=3", "data.num_workers=2"))  # stops mid-epoch (4 steps/epoch)
    train(_tiny_run(split, "max_steps=7", "data.num_workers=2"))
    a, b = load_checkpoint(full / "checkpoint.pth"), load_checkpoint(split / "checkpoint.pth")
    assert a["step"] == b["step"] == 7
    for name in ("student", "teacher", "loss", "ibot_loss"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), f"{name}.{key} differs after resume"
    rows_full, rows_split = read_log(full), read_log(split)
    assert [r["ibot_loss"] for r in rows_full] == [r["ibot_loss"] for r in rows_split]
    assert all(r["ibot_loss"] > 0 for r in rows_full)


@needs_data
def test_two_processes_with_ibot_match_one_process(tmp_path):
    from test_distributed import TINY, assert_states, read_log, torchrun

    extra = [*IBOT, "model.num_registers=2", "dino.centering=sinkhorn_knopp", "optim.epochs=1"]
    torchrun(tmp_path / "two", *extra)
    train(load_config(None, TINY + extra + ["data.batch_size_per_gpu=16", f"output_dir={tmp_path / 'one'}"]))
    two, one = read_log(tmp_path / "two"), read_log(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["ibot_loss"] == pytest.approx(b["ibot_loss"], abs=1e-5), a["step"]
    a, b = load_checkpoint(tmp_path / "two" / "checkpoint.pth"), load_checkpoint(tmp_path / "one" / "checkpoint.pth")
    assert_states(a, b, atol=1e-5)
    for key, value in a["ibot_loss"].items():
        torch.testing.assert_close(value, b["ibot_loss"][key], rtol=0, atol=1e-6)
