"""The GPU check (tools/gpu_check.sh): its dry run, every command it would run against the real
command lines, its time boxes against the budget, and the data it generates."""

import filecmp
import importlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dino_sparo import gpu_check
from dino_sparo.cli import gpu_check as gpu_check_cli
from dino_sparo.data.datasets import build_dataset

ROOT = Path(__file__).resolve().parent.parent


def plan_for(*argv):
    args = gpu_check_cli.build_parser().parse_args(list(argv))
    gpu_check_cli.choose_steps(args)
    return args, gpu_check.build_plan(args)


def test_dry_run_prints_every_step_and_writes_nothing(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    for extra in ([], ["--smoke", "--steps", "dino", "clip"]):
        done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--output", str(out),
                               "--work-dir", str(work), *extra], env=dict(os.environ, PYTHON=sys.executable),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        _, plan = plan_for("--output", str(out), "--work-dir", str(work), *extra)
        for step in plan:
            assert f"[{step.name}]" in done.stdout
            if step.argv:
                assert str(step.argv[-1]) in done.stdout
        assert not out.exists() and not work.exists()
    assert "dino-train-stopped" in done.stdout and "bench-s16-packed" not in done.stdout  # --steps chooses


def test_a_missing_wheel_folder_is_one_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dino_sparo.cli.gpu_check", "--wheels", str(tmp_path / "none"),
                           "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --wheels {tmp_path / 'none'}: no such folder"


# --------------------------------------------------------------------------- the commands


def _console_scripts() -> dict:
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")
            if ep.name.startswith("dino-sparo-")}


def _help_text(argv: list[str]) -> str:
    done = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _options(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


RUNS = {"xformers_runs": True, "xformers_imports": True, "cuda_available": True, "shm_gib": 64.0}


def check_command(step: gpu_check.Step, scripts: dict, help_cache: dict) -> None:
    argv = step.command(RUNS)  # the longer of the two
    module_name = argv[2] if argv[0] == sys.executable and argv[1] == "-m" else None
    if module_name and module_name.startswith("dino_sparo.cli.") and module_name != "dino_sparo.cli.gpu_check":
        # a program of this project, by module: its own parser takes the options, its console script exists
        subcommands = {"dino_sparo.cli.bench_loader"}  # dino-sparo-bench loader
        assert f"{module_name}:main" in set(scripts.values()) or module_name in subcommands, module_name
        module = importlib.import_module(module_name)
        try:
            parsed = module.build_parser().parse_args(argv[3:])
        except SystemExit:
            pytest.fail(f"{step.name}: {module_name} refuses {argv[3:]}")
        if module_name == "dino_sparo.cli.train":  # the config file and every override load
            cfg = module.config_from_args(parsed)
            assert Path(cfg.output_dir) == Path(argv[argv.index("--output-dir") + 1])
            assert cfg.mode == ("clip" if step.group == "clip" else "dino")
        if module_name == "dino_sparo.cli.knn" and parsed.config:
            assert Path(parsed.config).is_file()
        return
    assert argv[0] == sys.executable or argv[0] == "nvidia-smi", f"{step.name}: unknown program {argv[0]}"
    if argv[0] == "nvidia-smi" or argv[1:3] == ["-m", "xformers.info"]:
        return  # programs of the GPU machine's own
    if argv[1:3] == ["-m", "dino_sparo.cli.gpu_check"]:
        gpu_check_cli.build_parser().parse_args(argv[3:])
    elif argv[1:3] == ["-m", "pip"]:
        text = help_cache.setdefault("pip", _help_text(argv[:4]))
        assert all(option in text for option in _options(argv)), step.name
        if "-e" in argv:
            assert (Path(argv[argv.index("-e") + 1]) / "setup.py").is_file()
    elif argv[1:3] == ["-m", "pytest"]:  # the exact options, and -m gpu selects the GPU tests
        done = subprocess.run([*argv, "--collect-only", "-q", "-q"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        selected = [line for line in done.stdout.splitlines() if "::" in line]
        assert any("test_perf_paths.py::test_gpu_packed_loss_equals_per_size_loss" in line for line in selected)
        assert all(name in " ".join(selected) for name in ("test_attention.py", "test_knn.py", "test_losses.py"))
    elif argv[1].endswith(".py"):  # a script in tools/
        assert Path(argv[1]).is_file()
        text = _help_text(argv[:2])
        assert all(option in text for option in _options(argv)), step.name
    else:
        pytest.fail(f"{step.name}: no check for {argv[:3]}")


def test_every_command_of_the_plan_is_accepted_by_the_real_command_line(tmp_path):
    scripts = _console_scripts()
    assert {"dino-sparo-train", "dino-sparo-bench", "dino-sparo-knn", "dino-sparo-zeroshot"} <= set(scripts)
    help_cache: dict = {}
    seen = set()
    for extra in ([], ["--smoke"]):
        _, plan = plan_for("--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), *extra)
        for step in plan:
            if step.argv is None:
                continue
            ours = step.argv[0] == sys.executable and str(step.argv[2]).startswith("dino_sparo.cli.")
            key = (step.argv[0], tuple(step.argv[1:3])) if step.argv[0] == sys.executable and not ours else step.name
            if key in seen and step.argv[0] == sys.executable:
                continue  # one collection / help run per program
            seen.add(key)
            check_command(step, scripts, help_cache)


def test_the_plan_measures_what_the_issue_asks_for(tmp_path):
    _, plan = plan_for("--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"))
    bench = {s.name: s.argv for s in plan if s.name.startswith("bench-")}
    for argv in bench.values():
        values = dict(zip(argv[1::2], argv[2::2]))
        assert values["--batch"] == "64" and values["--local-crops"] == "10" and values["--precision"] == "bf16"
        assert values["--global-size"] == "224" and values["--local-size"] == "96" and values["--device"] == "cuda"
    kinds = {(argv[argv.index("--attn-backend") + 1], "--pack-crops" in argv,
              argv[argv.index("--reference-precision") + 1] if "--reference-precision" in argv else "same",
              argv[argv.index("--arch") + 1], argv[argv.index("--readout") + 1] if "--readout" in argv else "sparo")
             for argv in bench.values()}
    assert kinds == {("xformers", True, "bf16", "vit_small", "sparo"), ("xformers", True, "fp16", "vit_small", "sparo"),
                     ("xformers", False, "bf16", "vit_small", "sparo"), ("sdpa", False, "bf16", "vit_small", "sparo"),
                     ("math", False, "bf16", "vit_small", "sparo"), ("xformers", True, "same", "vit_base", "sparo"),
                     ("xformers", True, "bf16", "vit_small", "cls")}  # cls: the same 12 blocks as the reference
    feed = next(s for s in plan if s.name == "loader-feed")  # whether the data pipeline keeps the GPU fed
    assert "--feed-check" in feed.argv and feed.argv[feed.argv.index("--device") + 1] == "cuda"
    trainings = [s for s in plan if s.name.startswith("dino-train")]
    assert len(trainings) == 3 and all(s.command(RUNS)[:len(s.argv)] == s.argv for s in trainings)
    assert all("model.pack_crops=true" in s.command(RUNS) and "model.pack_crops=true" not in s.command({})
               for s in trainings)  # packed crops where xformers runs, else the per-size forward
    small_shm = dict(RUNS, shm_gib=0.06)  # a container's default 64 MiB: the main process loads
    assert all(s.command(small_shm)[-1] == "data.num_workers=0" for s in trainings)
    signals = [s.signal_at[1] for s in plan if s.signal_at]
    assert signals == [signal.SIGKILL, signal.SIGTERM]  # killed, then stopped, then resumed to the end
    assert [s.exit_code for s in trainings] == [-signal.SIGKILL, 128 + signal.SIGTERM, 0]
    names = [s.name for s in plan]
    assert names.index("dino-train-finish") < names.index("dino-knn")
    first_optional = next(i for i, s in enumerate(plan) if s.optional)
    assert all(s.optional for s in plan[first_optional:])  # optional steps last: they take no required time


# --------------------------------------------------------------------------- the time boxes


def worst_case(plan: list, budget: float) -> tuple[float, list[str]]:
    """Seconds taken when every step runs until it is stopped, and the steps left out."""
    remaining, left_out = budget, []
    for i, step in enumerate(plan):
        timeout = gpu_check.step_timeout(step, plan[i + 1:], remaining)
        if timeout < step.floor_s:
            left_out.append(step.name)
        else:
            remaining -= timeout
    return budget - remaining, left_out


@pytest.mark.parametrize("call", sorted(gpu_check.CALLS))
def test_each_call_fits_its_budget_and_starves_no_required_step(tmp_path, call):
    args, plan = plan_for("--call", str(call), "--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w"))
    gpu_check_cli.choose_steps(args)
    assert args.budget == gpu_check.DEFAULT_BUDGET_S <= 5 * 60 - 10  # a device call of 5 minutes, with margin
    plan = gpu_check.build_plan(args)
    budget = args.budget - gpu_check.BOOKKEEPING_S
    required = [s for s in plan if not s.optional]
    assert sum(s.floor_s for s in required) <= budget  # what every required step needs fits
    taken, left_out = worst_case(plan, budget)
    assert taken <= budget and not {s.name for s in required} & set(left_out), left_out
    assert all(s.argv is not None or s.optional for s in plan)  # every step is a time-boxed child process
    taken, left_out = worst_case(plan, 120)  # too small a budget: steps are left out, the bound holds
    assert taken <= 120 and left_out


def test_both_calls_cover_every_group(tmp_path):
    assert set().union(*gpu_check.CALLS.values()) == set(gpu_check.GROUPS)
    assert all("install" in groups for groups in gpu_check.CALLS.values())  # a machine given back comes bare


# --------------------------------------------------------------------------- judging each step


@pytest.mark.parametrize("smoke", [False, True])
def test_judge_takes_each_steps_documented_exit_code_and_no_other(tmp_path, smoke):
    """A signal stop exits 128 + the signal (143 for SIGTERM), a kill -9 gives -9, everything else 0: the
    judge accepts exactly the code each step documents, whatever the rest of its findings."""
    args, plan = plan_for("--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
                          *(["--smoke"] if smoke else []))
    ctx = gpu_check.Context(args=args, work=tmp_path / "work", output=tmp_path / "out", environment=dict(RUNS))
    expected = {"dino-train-killed": -signal.SIGKILL, "dino-train-stopped": 143}
    for step in plan:
        assert step.exit_code == expected.get(step.name, 0), step.name
        for code in {step.exit_code, 0, 1, 2, 143, -signal.SIGKILL}:
            run = {"returncode": code, "seconds": 1.0, "timeout_s": 60.0}
            if step.signal_at:
                run["signal"] = {"name": signal.Signals(step.signal_at[1]).name}
            problems = gpu_check.judge(step, run, ctx, "", {})["problems"]
            flagged = any(p.startswith("exit code") for p in problems)
            assert flagged == (code != step.exit_code), (step.name, code, problems)
        ctx.environment = dict(RUNS)  # the environment step reads its (absent) JSON into the context


def test_the_smoke_call_passes_on_this_machine(tmp_path):
    """The check itself, end to end at toy size on a CPU: the DINO training is killed, resumed, stopped by
    SIGTERM (exit 143) and resumed to its end, k-NN runs, CLIP trains and zero-shot runs; exit 0."""
    done = subprocess.run([sys.executable, "-m", "dino_sparo.cli.gpu_check", "--smoke", "--call", "2",
                           "--skip-install", "--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    summary = (tmp_path / "out" / "summary.txt").read_text() if (tmp_path / "out" / "summary.txt").is_file() else ""
    assert done.returncode == 0, summary or done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["status"] == "all steps ok"
    assert report["steps"]["dino-train-stopped"]["returncode"] == 143
    figures = report["steps"]["dino-train-finish"]["figures"]
    assert figures["resumed_at"] == report["steps"]["dino-train-stopped"]["figures"]["stopped_at"]


# --------------------------------------------------------------------------- the generated data


def test_generated_shapes_are_reproducible_and_read_by_the_image_folder(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 0), (b, 0), (c, 1)):
        gpu_check.make_shapes_folder(root, train_per_class=3, val_per_class=2, size=32, seed=seed)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 10 * 5
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    assert not all(filecmp.cmp(a / f, c / f, shallow=False) for f in files)
    stamp = (a / "generated.json").stat().st_mtime_ns
    gpu_check.make_shapes_folder(a, train_per_class=3, val_per_class=2, size=32, seed=0)  # kept as it is
    assert (a / "generated.json").stat().st_mtime_ns == stamp

    for split, per_class in (("train", 3), ("val", 2)):
        data = build_dataset(SimpleNamespace(dataset="imagefolder", path=str(a), limit=None, corrupt_images="error"),
                             split)
        assert sorted(data.classes) == sorted(gpu_check.SHAPES) and len(data) == 10 * per_class
        image, label = data[0]
        assert image.size == (32, 32)
        rows = (a / f"captions_{split}.csv").read_text().splitlines()
        assert rows[0] == "path,caption" and len(rows) == 1 + 10 * per_class
        for row in rows[1:]:
            path, caption = row.split(",")
            assert (a / path).is_file() and Path(path).parent.name in caption
