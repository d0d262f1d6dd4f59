"""The benchmark runs end to end on a tiny model and writes positive, finite figures; its pieces
(FLOP count, reference step) behave as documented."""

import argparse
import json
import math

import pytest
import torch

from dino_sparo.bench import count_step_flops, format_report, make_crops, validate
from dino_sparo.cli.bench import build_parser, main
from dino_sparo.bench_reference import ReferenceStep, clip_gradients

TINY = ["--arch", "vit_pico", "--patch-size", "4", "--global-size", "16", "--local-size", "8",
        "--local-crops", "2", "--batch", "2", "--out-dim", "64", "--device", "cpu", "--threads", "1",
        "--matmul-size", "128"]


def numbers(tree, path=""):
    """Every number in a JSON tree, with its path."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from numbers(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_bench_writes_positive_finite_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(TINY + ["--steps", "2", "--warmup", "1", "--output-json", str(out)])
    figures = json.loads(out.read_text())
    for kind in ("ours", "reference"):
        for key in ("images_per_s", "step_s", "peak_mem_mb", "flops_per_step", "flops_per_s",
                    "fraction_of_matmul_peak"):
            assert key in figures[kind], (kind, key)
        assert len(figures[kind]["step_s_all"]) == 2
        assert figures[kind]["images_per_s"] == pytest.approx(2 / figures[kind]["step_s"])
    for key in ("images_per_s", "peak_mem"):
        assert key in figures["ratio"]
    for key in ("sparo_s", "block_s", "sparo_over_block"):
        assert key in figures["readout"]
    assert figures["matmul_peak_flops_per_s"] > 0
    config_numbers = {path for path, _ in numbers(figures["config"])} | {"environment.threads"}
    for path, value in numbers(figures):
        if path.lstrip(".") in config_numbers or path.startswith(".config") or path.startswith(".environment"):
            continue
        assert math.isfinite(value) and value > 0, (path, value)
    report = capsys.readouterr().out
    assert "ours / reference" in report and "SPARO read-out" in report
    assert format_report(figures) in report


def test_reference_can_run_at_its_own_precision(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(TINY + ["--steps", "1", "--warmup", "1", "--precision", "bf16", "--reference-precision", "fp32",
                 "--output-json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["environment"]["precision"] == "bfloat16"
    assert figures["environment"]["reference_precision"] == "fp32"
    for kind, peak in (("ours", "matmul_peak_flops_per_s"), ("reference", "reference_matmul_peak_flops_per_s")):
        r = figures[kind]  # each step's fraction is of the peak in its own dtype
        assert r["fraction_of_matmul_peak"] == pytest.approx(r["flops_per_s"] / figures[peak])
    assert "ours bfloat16, reference fp32" in capsys.readouterr().out


def test_flops_are_counted_per_image_and_include_attention():
    args = build_parser().parse_args(TINY)
    validate(args)
    device = torch.device("cpu")
    one = count_step_flops("ours", argparse.Namespace(**{**vars(args), "batch": 1}), device)
    three = count_step_flops("ours", argparse.Namespace(**{**vars(args), "batch": 3}), device)
    assert one > 0 and three == 3 * one
    # the reference (class token after every block) against an independent count of its matmuls
    ref = count_step_flops("reference", argparse.Namespace(**{**vars(args), "batch": 1}), device)
    width, depth, hidden, out_dim = 96, 6, 2048, 64
    tokens_g, tokens_l = 1 + (16 // 4) ** 2, 1 + (8 // 4) ** 2

    def block(n):  # the four linear layers (12·D² weights) and the two attention products
        return 2 * n * 12 * width * width + 2 * 2 * n * n * width

    def patch(n):  # the 4×4 patch convolution over 3 channels
        return 2 * (n - 1) * width * 3 * 4 * 4

    def vit(n, crops):
        return crops * (depth * block(n) + patch(n))

    head = 2 * (width * hidden + hidden * hidden + hidden * 256 + 256 * out_dim)
    student = vit(tokens_g, 2) + vit(tokens_l, 2) + 4 * head
    teacher = vit(tokens_g, 2) + 2 * head
    # backward: input and weight gradients (twice the forward), but no gradient for the images
    assert ref == teacher + 3 * student - 2 * patch(tokens_g) - 2 * patch(tokens_l)


def test_ours_against_ours_times_ibot_and_flops_count_its_heads(tmp_path, capsys):
    out = tmp_path / "ibot.json"
    main(TINY + ["--steps", "1", "--warmup", "1", "--set", "ibot.loss_weight=1.0", "--set", "dino.koleo_weight=0.1",
                 "--reference-set", "ibot.loss_weight=0.0", "--output-json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["config"]["reference_set"] == ["ibot.loss_weight=0.0"]
    # the second step is ours without iBOT: fewer FLOPs (no patch head), never DINO v1's step
    assert 0 < figures["reference"]["flops_per_step"] < figures["ours"]["flops_per_step"]


def test_bench_refuses_bad_options(capsys):
    from conftest import program_exit

    code, line = program_exit(capsys, main, TINY + ["--set", "ibot.loss_weight=-1"])
    assert code == 2 and "ibot.loss_weight" in line
    assert program_exit(capsys, main, TINY + ["--local-size", "10"]) == (
        2, "dino-sparo-bench: error: --local-size 10 is not a multiple of --patch-size 4")
    code, line = program_exit(capsys, main, TINY + ["--warmup", "0"])
    assert code == 2 and "--warmup must be at least 1" in line


def test_reference_step_learns_and_clips_like_dino():
    torch.manual_seed(0)
    args = build_parser().parse_args(TINY)
    step = ReferenceStep(arch=(48, 2, 3), patch_size=4, img_size=16, out_dim=32, n_local_crops=2,
                         device=torch.device("cpu"), autocast_dtype=None, lr=1e-3, momentum_teacher=0.9)
    images = make_crops(args, torch.device("cpu"))
    before = [p.detach().clone() for p in step.teacher.parameters()]
    losses = [step.step(images, i) for i in range(3)]
    assert all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(b, a) for b, a in zip(before, step.teacher.parameters()))  # the EMA moved
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 10.0)  # norm 20 > 3: scaled to norm 3
    norms = clip_gradients(torch.nn.ParameterList([p]), 3.0)
    assert norms == [20.0] and p.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
