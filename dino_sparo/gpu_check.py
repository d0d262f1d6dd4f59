"""One short run that proves the GPU paths on a fresh GPU machine with no package registry:
install the project and the wheels brought along, then the GPU tests, the training-step benchmark,
a DINO training that is killed and resumed and ends with k-NN, and a few CLIP steps with zero-shot.
Each step is time-boxed so that the whole run ends within ``--budget`` seconds; every figure and
log goes into one output folder of a few files. Entry point: ``tools/gpu_check.sh`` (``--help``).

The main process uses the standard library only (it runs before the project is installed); every
step is a child process of its own, killed with its process group when its time is up.
The command line is :mod:`dino_sparo.cli.gpu_check`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# The check's options: an object with the attributes of its flags (dino_sparo.cli.gpu_check.build_parser)
Options = Any
ROOT = Path(__file__).resolve().parent.parent  # the repository: tests/, configs/, setup.py

# Wheels for Python 3.12 on x86-64 Linux that a GPU image with torch lacks (its torch, torchvision,
# timm, numpy, pillow, pyyaml, tqdm, matplotlib and pytest are used as they are). faiss-gpu is left
# out: its wheels (faiss-gpu 129 MB; faiss-gpu-cu12 46 MB but needing CUDA 12's 554 MB cuBLAS wheel)
# are too large to bring along, so k-NN on the GPU runs the torch backend.
WHEELS = ("xformers==0.0.35", "submitit==1.5.4", "open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.4",
          "webdataset==1.0.2", "braceexpand==0.1.7")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")
DEFAULT_WHEELS = ".gpu_wheels"
DEFAULT_BUDGET_S = 285  # one call of the two (CALLS); a call may run 300 s
GROUPS = ("install", "pytest", "bench", "dino", "clip")
OUTPUT_FILES = ("summary.txt", "gpu_check.json", "gpu_check.log", "training_curves.png")
BOOKKEEPING_S = 5  # of the budget, kept for reading results and writing the report between steps
LOG_TAIL_BYTES = 400_000  # of each step in gpu_check.log: the folder must travel back small

SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "frame", "stripes", "checkerboard", "dots")


# --------------------------------------------------------------------------------------------
# The generated data: ten classes of shapes, as an image folder and as caption tables
# --------------------------------------------------------------------------------------------

def _draw_shape(name: str, size: int, rng: Any) -> Any:
    """One ``size`` × ``size`` RGB image of the shape ``name`` at a random place, scale and colour
    on a noisy background."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image, ImageDraw  # noqa: PLC0415

    background = rng.integers(0, 256, 3)
    foreground = (background + rng.integers(80, 176, 3)) % 256  # far from the background in each channel
    pixels = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    fill = tuple(int(c) for c in foreground)
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    width = max(2, int(r / 3))
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif name == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif name == "triangle":
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=fill)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=width)
    elif name == "cross":
        draw.rectangle([cx - r, cy - width, cx + r, cy + width], fill=fill)
        draw.rectangle([cx - width, cy - r, cx + width, cy + r], fill=fill)
    elif name == "star":
        angles = rng.uniform(0, 2 * np.pi) + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.4 * r)
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)], fill=fill)
    elif name == "frame":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], outline=fill, width=width)
    elif name == "stripes":
        period, offset = rng.uniform(size / 10, size / 5), rng.uniform(0, size)
        for x in np.arange(-offset, size, period):
            draw.rectangle([x, 0, x + period / 2, size], fill=fill)
    elif name == "checkerboard":
        cell = int(rng.uniform(size / 10, size / 5))
        for i, y in enumerate(range(0, size, cell)):
            for j, x in enumerate(range(0, size, cell)):
                if (i + j) % 2 == 0:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill)
    elif name == "dots":
        step, dot = rng.uniform(size / 7, size / 4), size / 40
        for y in np.arange(step / 2, size, step):
            for x in np.arange(step / 2, size, step):
                draw.ellipse([x - dot * 2, y - dot * 2, x + dot * 2, y + dot * 2], fill=fill)
    else:
        raise ValueError(f"unknown shape {name!r}; the shapes are {', '.join(SHAPES)}")
    return image


def make_shapes_folder(root: str | os.PathLike, train_per_class: int, val_per_class: int, size: int,
                       seed: int = 0) -> dict[str, Any]:
    """Write ``root/{train,val}/<shape>/NNNNN.jpg`` (an image folder for DINO and k-NN) and
    ``root/captions_{train,val}.csv`` (path, caption: "a photo of a circle." for CLIP); the same
    seed gives the same files. A folder already complete with these settings is kept as it is."""
    import numpy as np  # noqa: PLC0415

    root = Path(root)
    settings = {"train_per_class": train_per_class, "val_per_class": val_per_class, "size": size, "seed": seed,
                "classes": list(SHAPES)}
    stamp = root / "generated.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return settings
    if root.exists():
        shutil.rmtree(root)
    templates = ("a photo of a {}.", "a picture of a {}.", "a low resolution photo of a {}.")
    for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        rows = []
        for class_id, name in enumerate(SHAPES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_id, class_id, i])
                path = folder / f"{i:05d}.jpg"
                _draw_shape(name, size, rng).save(path, quality=90)
                rows.append((path.relative_to(root).as_posix(), templates[i % len(templates)].format(name)))
        with (root / f"captions_{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "caption"])
            writer.writerows(rows)
    stamp.write_text(json.dumps(settings))
    return settings


# --------------------------------------------------------------------------------------------
# The environment probe (run as a child process: it imports torch and the optional packages)
# --------------------------------------------------------------------------------------------

def probe_environment() -> dict[str, Any]:
    """What the GPU paths depend on: torch and CUDA, bf16, xformers (imports, and its kernel runs),
    the k-NN backends, open_clip, submitit, NCCL."""
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    bf16_supported=torch.cuda.is_bf16_supported(), device_count=torch.cuda.device_count())
    for module in ("xformers", "open_clip", "submitit", "faiss", "webdataset", "ftfy"):
        try:
            info[f"{module}_version"] = getattr(__import__(module), "__version__", "installed")
        except Exception as exc:  # noqa: BLE001  an import failure is a finding, not a crash
            info[f"{module}_version"] = None
            info[f"{module}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    from dino_sparo.evaluation.knn_search import available_backends  # noqa: PLC0415
    from dino_sparo.layers.attention import xformers_report  # noqa: PLC0415

    xformers = xformers_report()  # the calls the runs make: bf16 block-diagonal forward + backward at head dim 64, ...
    info.update(xformers_imports=xformers["imports"], xformers_runs=xformers["runs"],
                xformers_reason=xformers["reason"], xformers_checks=xformers["checks"])
    info.update(host_resources())
    info["knn_backends"] = list(available_backends())
    info["nccl_available"] = bool(torch.distributed.is_available() and torch.distributed.is_nccl_available())
    if info["nccl_available"] and info["cuda_available"]:
        info["nccl_version"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    return info


def host_resources() -> dict[str, Any]:
    """The host's memory and ``/dev/shm`` (where loader workers hand over batches: containers often
    give it 64 MiB, and workers then die with a bus error), and its CPU count."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        stat = os.statvfs("/dev/shm")
        info["shm_gib"] = round(stat.f_frsize * stat.f_blocks / 2**30, 2)
    except OSError:
        info["shm_gib"] = None
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        for key, name in (("MemTotal", "memory_gib"), ("MemAvailable", "memory_available_gib")):
            info[name] = round(int(meminfo[key].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    return info


def loader_workers(configured: int, shm_gib: Optional[float]) -> int:
    """Loader workers that ``/dev/shm`` can hold: each keeps about two batches there (a DINO batch of 64
    images with 2×224 + 6×96 crops is about 150 MB in fp32), so a small ``/dev/shm`` gets fewer."""
    if shm_gib is None or shm_gib >= 8:
        return configured
    if shm_gib < 1:
        return 0  # the main process loads: slower, but nothing goes through /dev/shm
    return max(1, min(configured, int(shm_gib * 2)))


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

@dataclass
class Step:
    """One time-boxed step: a command run as a child process in its own process group. ``cap_s`` is
    the most it may take, ``floor_s`` the least it needs (what an H100 needs, with some margin: kept free
    for it by the steps before it unless it is ``optional``; optional steps come last). ``signal_at`` =
    (logged training step, signal): send the signal once ``watch_log`` shows that step; ``exit_code`` is
    the code that means success (a signal stop exits 128 + the signal, a kill -9 gives -9)."""

    name: str
    group: str
    title: str
    cap_s: float
    floor_s: float
    argv: Optional[list[str]] = None
    optional: bool = False
    needs: Optional[str] = None  # "cuda", "xformers" (its kernels run) or "xformers-import": skipped without it
    signal_at: Optional[tuple[int, int]] = None
    watch_log: Optional[Path] = None
    exit_code: int = 0
    xformers_argv: list[str] = field(default_factory=list)  # appended where the probe found xformers running
    workers: Optional[int] = None  # the config's loader workers: lowered where /dev/shm is small
    outputs: dict[str, Path] = field(default_factory=dict)  # what the result is read from
    note: str = ""

    def command(self, environment: dict[str, Any]) -> Optional[list[str]]:
        """The argv to run on the machine the probe described in ``environment``."""
        if self.argv is None:
            return None
        argv = self.argv + (self.xformers_argv if environment.get("xformers_runs") else [])
        if self.workers is not None:
            workers = loader_workers(self.workers, environment.get("shm_gib"))
            if workers != self.workers:
                argv = argv + [f"data.num_workers={workers}"]
        return argv


@dataclass
class Context:
    args: Options
    work: Path
    output: Path
    environment: dict[str, Any] = field(default_factory=dict)


def plan_sizes(smoke: bool) -> dict[str, Any]:
    """Every number of the plan that differs between the GPU check and its toy-size smoke run."""
    if smoke:
        return dict(data=dict(train_per_class=8, val_per_class=4, size=32),
                    bench_s=["--arch", "vit_pico", "--patch-size", "8", "--batch", "2", "--local-crops", "2",
                             "--global-size", "32", "--local-size", "16", "--out-dim", "256", "--steps", "1",
                             "--warmup", "1", "--matmul-size", "256", "--device", "auto"],
                    bench_b=["--arch", "vit_tiny", "--patch-size", "8", "--batch", "2", "--local-crops", "2",
                             "--global-size", "32", "--local-size", "16", "--out-dim", "256", "--steps", "1",
                             "--warmup", "1", "--matmul-size", "256", "--device", "auto"],
                    precision="auto", dino_config="configs/gpu_check/dino_smoke.yaml",
                    clip_config="configs/gpu_check/clip_smoke.yaml", kill_at=15, term_at=25, total_steps=40,
                    eval_batch="16", workers="1",
                    feed=["--arch", "vit_pico", "--batch", "4", "--steps", "2", "--out-dim", "256", "--feed-workers",
                          "1"])
    return dict(data=dict(train_per_class=256, val_per_class=50, size=128),
                bench_s=["--arch", "vit_small", "--patch-size", "16", "--batch", "64", "--local-crops", "10",
                         "--global-size", "224", "--local-size", "96", "--steps", "10", "--warmup", "3",
                         "--device", "cuda"],
                bench_b=["--arch", "vit_base", "--patch-size", "16", "--batch", "64", "--local-crops", "10",
                         "--global-size", "224", "--local-size", "96", "--steps", "8", "--warmup", "3",
                         "--device", "cuda"],
                precision="bf16", dino_config="configs/gpu_check/dino.yaml",
                clip_config="configs/gpu_check/clip.yaml", kill_at=100, term_at=220, total_steps=320,
                eval_batch="256", workers="12", feed=["--batch", "64", "--steps", "10"])


# The benchmark rows: (step name, title, our options, the reference's precision, required). Required: the
# headline (SPARO, packed crops), the same with the class-token read-out (SPARO runs 11 blocks and the
# read-out, the reference 12 blocks, so only the cls row compares implementations of one architecture),
# and SDPA, the figure that stands where xformers does not run.
BENCH_RUNS = (
    ("bench-s16-packed", "ours SPARO, xformers, packed crops / reference bf16",
     ["--attn-backend", "xformers", "--pack-crops"], "bf16", True),
    ("bench-s16-cls-packed", "ours class token (12 blocks, as the reference), xformers, packed / reference bf16",
     ["--readout", "cls", "--attn-backend", "xformers", "--pack-crops"], "bf16", True),
    ("bench-s16-sdpa", "ours SDPA, per crop size / reference bf16", ["--attn-backend", "sdpa"], "bf16", True),
    ("bench-s16-packed-fp16ref", "ours xformers, packed crops / reference fp16 (as DINO v1 runs)",
     ["--attn-backend", "xformers", "--pack-crops"], "fp16", False),
    ("bench-s16-xformers", "ours xformers, one forward per crop size / reference bf16",
     ["--attn-backend", "xformers"], "bf16", False),
    ("bench-s16-math", "ours explicit softmax attention, per crop size / reference bf16",
     ["--attn-backend", "math"], "bf16", False),
)

# The two calls that fit a GPU machine borrowed for 15 minutes (its start included, and time left for a
# second try): each at most DEFAULT_BUDGET_S. Each installs again: a machine given back between the calls
# comes back bare, and on a warm one the install takes seconds.
CALLS = {1: ("install", "pytest", "bench"), 2: ("install", "dino", "clip")}


def _program(tool: str) -> list[str]:
    """A program of this project by module (``python -m dino_sparo.cli.<tool>``): it runs from the
    source tree even where the editable install failed, so one failure does not fail every step."""
    return [sys.executable, "-m", f"dino_sparo.cli.{tool}"]


def build_plan(args: Options) -> list[Step]:
    """Every step the check runs for ``args``, in order (``--steps`` chooses the groups): the required
    steps first, then the optional ones, so that an optional step never takes a required one's time."""
    sizes = plan_sizes(args.smoke)
    work = Path(args.work_dir).resolve()
    data = work / "data"
    wanted = set(args.steps)
    plan = _install_steps(args) if "install" in wanted else []
    plan += _probe_steps(work)
    if "pytest" in wanted:
        plan += _pytest_steps(work)
    if "bench" in wanted:
        plan += _bench_steps(sizes, work)
    if "dino" in wanted or "clip" in wanted:
        plan += _data_steps(args, data)
    if "dino" in wanted:
        plan += _dino_steps(args, sizes, work, data)
    if "clip" in wanted:
        plan += _clip_steps(args, sizes, work, data)
    plan += _curve_steps(args, work, wanted)
    return [s for s in plan if not s.optional] + [s for s in plan if s.optional]


def _install_steps(args: Options) -> list[Step]:
    """The project, then the wheels brought along, both without a package index."""
    py, plan = sys.executable, []
    plan.append(Step("install-project", "install", "pip install --no-deps -e . (no package index)", 60, 20,
                     argv=[py, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
                           "--disable-pip-version-check", "-q", "-e", str(ROOT)]))
    wheels = find_wheels(args.wheels)
    plan.append(Step("install-wheels", "install", f"pip install {len(wheels)} wheels from {args.wheels}", 60,
                     15, argv=[py, "-m", "pip", "install", "--no-deps", "--no-index",
                               "--disable-pip-version-check", "-q", *map(str, wheels)] if wheels else None,
                     optional=not wheels,  # then the steps needing them say what is missing
                     note="" if wheels else "no wheels found: xformers, open_clip and submitit must be there"))
    return plan


def _probe_steps(work: Path) -> list[Step]:
    """What the machine has (torch, CUDA, xformers and its kernels, k-NN backends, memory, /dev/shm): run
    whichever groups are chosen; the GPU's and xformers' own reports last, as optional steps."""
    py, plan = sys.executable, []
    plan.append(Step("environment", "install", "torch, CUDA, xformers kernels, k-NN backends, open_clip, /dev/shm",
                     45, 20, argv=[*_program("gpu_check"), "--probe-json", str(work / "environment.json")],
                     outputs={"json": work / "environment.json"}))
    plan.append(Step("nvidia-smi", "install", "the GPU, its driver and clocks", 15, 3, argv=["nvidia-smi"],
                     optional=True, needs="cuda"))
    plan.append(Step("xformers-info", "install", "python -m xformers.info (which kernels xformers has)", 20, 5,
                     argv=[py, "-m", "xformers.info"], optional=True, needs="xformers-import"))
    return plan


def _pytest_steps(work: Path) -> list[Step]:
    py, plan = sys.executable, []
    xml = work / "pytest_gpu.xml"
    plan.append(Step("pytest-gpu", "pytest", "pytest -m gpu: xformers/SDPA/math, packed = per size, no host "
                     "sync in bf16/fp16 steps, CUDA k-NN = CPU k-NN", 120, 60,
                     argv=[py, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", str(ROOT / "tests")], outputs={"xml": xml}))
    return plan


def _bench_steps(sizes: dict[str, Any], work: Path) -> list[Step]:
    plan = []
    common = [*sizes["bench_s"], "--precision", sizes["precision"]]
    for name, title, ours, ref, required in BENCH_RUNS:
        out = work / "bench" / f"{name}.json"
        plan.append(Step(name, "bench", f"ViT-S/16: {title}", 60, 40,
                         argv=[*_program("bench"), *common, *ours, "--reference-precision",
                               ref if sizes["precision"] != "auto" else "same", "--output-json", str(out)],
                         optional=not required, needs="xformers" if "xformers" in ours else None,
                         outputs={"json": out}))
    out = work / "bench" / "loader-feed.json"  # does the data pipeline keep the step fed? both augment_on modes
    plan.append(Step("loader-feed", "bench", "ViT-S/16 DINO steps, 2×224 + 10×96, batch 64: model-bound, loader-"
                     "bound and end-to-end images/s, data.augment_on loader and device", 90, 45,
                     argv=[*_program("bench_loader"), "--feed-check", "--device",
                           "cuda" if sizes["precision"] != "auto" else "auto", *sizes["feed"], "--output-json",
                           str(out)], optional=True, outputs={"json": out}))
    out = work / "bench" / "bench-b16-packed.json"
    plan.append(Step("bench-b16-packed", "bench", "ViT-B/16: ours xformers, packed crops / reference bf16", 60,
                     40, argv=[*_program("bench"), *sizes["bench_b"], "--precision", sizes["precision"],
                               "--attn-backend", "xformers", "--pack-crops", "--output-json", str(out)],
                     optional=True, needs="xformers", outputs={"json": out}))
    return plan


def _data_steps(args: Options, data: Path) -> list[Step]:
    """The generated image folder and caption tables, in a child process like every step (time-boxed)."""
    return [Step("shapes-data", "data", "generate the image folder of ten shape classes", 40, 10,
                 argv=[*_program("gpu_check"), "--make-shapes", str(data), *(["--smoke"] if args.smoke else [])])]


def _dino_steps(args: Options, sizes: dict[str, Any], work: Path, data: Path) -> list[Step]:
    """DINO training killed, resumed, stopped and resumed to its end; k-NN of the result and of its start."""
    plan = []
    run_dir = work / "dino"
    config = ROOT / sizes["dino_config"]
    train = [*_program("train"), "--config", str(config), "--output-dir", str(run_dir), f"data.path={data}"]
    workers = int(sizes["workers"])
    log = run_dir / "log.jsonl"
    packed = ["model.attn_backend=xformers", "model.pack_crops=true"]  # all crop sizes in one forward
    plan.append(Step("dino-train-killed", "dino", f"DINO training, SIGKILL once step {sizes['kill_at']} "
                     "is logged", 75, 40, argv=list(train), signal_at=(sizes["kill_at"], signal.SIGKILL),
                     watch_log=log, exit_code=-signal.SIGKILL, xformers_argv=packed, workers=workers))
    plan.append(Step("dino-train-stopped", "dino", f"resumed, SIGTERM once step {sizes['term_at']} is logged "
                     "(saves and stops)", 75, 40, argv=list(train), signal_at=(sizes["term_at"], signal.SIGTERM),
                     watch_log=log, exit_code=128 + signal.SIGTERM, xformers_argv=packed, workers=workers))
    plan.append(Step("dino-train-finish", "dino", f"resumed to the end (step {sizes['total_steps']})", 75, 40,
                     argv=list(train), watch_log=log, xformers_argv=packed, workers=workers))
    knn = ["--dataset", "imagefolder", "--data-path", str(data), "--device", "auto" if args.smoke else "cuda",
           "--backend", "torch", "--ks", "10,20", "--batch-size", sizes["eval_batch"], "--num-workers",
           sizes["workers"], "--no-cache", "--quiet"]
    plan.append(Step("dino-knn", "dino", "k-NN of the trained teacher (torch backend on the GPU)", 45, 20,
                     argv=[*_program("knn"), "--checkpoint", str(run_dir / "checkpoint.pth"), *knn,
                           "--output-json", str(work / "knn.json")], outputs={"json": work / "knn.json"}))
    plan.append(Step("dino-knn-init", "dino", "k-NN of the same network at initialisation", 40, 20,
                     argv=[*_program("knn"), "--baseline", "init", "--config", str(config), *knn,
                           "--output-json", str(work / "knn_init.json")],
                     optional=True, outputs={"json": work / "knn_init.json"}))
    return plan


def _clip_steps(args: Options, sizes: dict[str, Any], work: Path, data: Path) -> list[Step]:
    plan = []
    run_dir = work / "clip"
    plan.append(Step("clip-train", "clip", "CLIP training with zero-shot at each epoch's end", 60, 30,
                     argv=[*_program("train"), "--config", str(ROOT / sizes["clip_config"]), "--output-dir",
                           str(run_dir), f"clip.train_data={data / 'captions_train.csv'}",
                           f"clip.zeroshot_data={data}"], watch_log=run_dir / "log.jsonl",
                     workers=int(sizes["workers"])))
    plan.append(Step("clip-zeroshot", "clip", "zero-shot classification and retrieval of the CLIP checkpoint",
                     40, 15, argv=[*_program("zeroshot"), "--checkpoint", str(run_dir / "checkpoint.pth"),
                                   "--dataset", "imagefolder", "--data-path", str(data), "--split", "val",
                                   "--retrieval", str(data / "captions_val.csv"), "--batch-size",
                                   sizes["eval_batch"], "--num-workers", sizes["workers"], "--device",
                                   "auto" if args.smoke else "cuda", "--output-json", str(work / "zeroshot.json")],
                     outputs={"json": work / "zeroshot.json"}))
    return plan


def _curve_steps(args: Options, work: Path, wanted: set[str]) -> list[Step]:
    py, plan = sys.executable, []
    logs = [str(work / run / "log.jsonl") for run in ("dino", "clip") if run in wanted]
    if logs:
        plan.append(Step("curves", "plot", "training curves of the DINO and CLIP runs", 30, 10,
                         argv=[py, str(ROOT / "tools" / "plot_log.py"), *logs, "--labels",
                               *[run for run in ("dino", "clip") if run in wanted], "--title",
                               "GPU check: training curves", "--output",
                               str(Path(args.output).resolve() / OUTPUT_FILES[3])],
                         optional=True))
    return plan


def find_wheels(folder: Optional[str]) -> list[Path]:
    return sorted(Path(folder).glob("*.whl")) if folder and Path(folder).is_dir() else []


def step_timeout(step: Step, later: list[Step], remaining_s: float) -> float:
    """Seconds ``step`` may run: its cap, less what the mandatory steps after it need at least."""
    reserved = sum(s.floor_s for s in later if not s.optional)
    return min(step.cap_s, remaining_s - reserved)


# --------------------------------------------------------------------------------------------
# Running the steps
# --------------------------------------------------------------------------------------------

def last_logged_step(path: Optional[Path]) -> int:
    if path is None or not path.is_file():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in row:
            step = int(row["step"])
    return step


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def run_command(argv: list[str], step: Step, timeout_s: float, log_path: Path) -> dict[str, Any]:
    """Run ``argv`` (``step``'s command) in its own process group, its output into ``log_path``; stop it (the
    whole group, at once) when ``timeout_s`` is up, and send ``step.signal_at``'s signal when due."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="10")
    start = time.monotonic()
    result: dict[str, Any] = {}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        sent = False
        while process.poll() is None:
            elapsed = time.monotonic() - start
            if elapsed > timeout_s:  # no grace period: the budget holds to the second
                _kill_group(process, signal.SIGKILL)
                process.wait()
                result["timed_out"] = True
                break
            if step.signal_at and not sent and last_logged_step(step.watch_log) >= step.signal_at[0]:
                sig = step.signal_at[1]
                result["signal"] = {"name": signal.Signals(sig).name, "after_s": round(elapsed, 1),
                                    "at_logged_step": last_logged_step(step.watch_log)}
                if sig == signal.SIGKILL:  # as a crash or a pre-emption: the loader workers too
                    _kill_group(process, sig)
                else:  # as a scheduler's warning: to the training process, which saves and stops
                    process.send_signal(sig)
                sent = True
            time.sleep(0.2)
        _kill_group(process, signal.SIGKILL)  # whatever it left behind
    result.update(returncode=process.returncode, seconds=round(time.monotonic() - start, 1))
    return result


def _read_json(path: Optional[Path]) -> Optional[dict]:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------------------------
# Reading each step's result
# --------------------------------------------------------------------------------------------

def read_pytest(xml_path: Path, output: str) -> dict[str, Any]:
    """Outcome of each GPU test, from the JUnit XML (or the ``-v`` lines when pytest was stopped)."""
    tests: list[dict[str, str]] = []
    if xml_path.is_file():
        for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                    message = (child.get("message") or "")[:300]
            tests.append({"name": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}",
                          "outcome": outcome, "message": message})
    else:
        for match in re.finditer(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, re.M):
            tests.append({"name": match.group(1).split("/")[-1].replace(".py", ""),
                          "outcome": match.group(2).lower(), "message": ""})
    counts = {key: sum(t["outcome"] == key for t in tests) for key in ("passed", "failed", "error", "skipped")}
    return {**counts, "tests": tests}


def bench_row(figures: dict[str, Any]) -> dict[str, Any]:
    ours, ref = figures["ours"], figures["reference"]
    return {"ours_tflops_per_s": ours["flops_per_s"] / 1e12, "reference_tflops_per_s": ref["flops_per_s"] / 1e12,
            "ours_images_per_s": ours["images_per_s"], "reference_images_per_s": ref["images_per_s"],
            "speed_ratio": figures["ratio"]["images_per_s"], "ours_peak_mem_mb": ours["peak_mem_mb"],
            "reference_peak_mem_mb": ref["peak_mem_mb"], "mem_ratio": figures["ratio"]["peak_mem"],
            "ours_fraction_of_matmul_peak": ours["fraction_of_matmul_peak"],
            "reference_fraction_of_matmul_peak": ref["fraction_of_matmul_peak"],
            "matmul_peak_tflops": figures["matmul_peak_flops_per_s"] / 1e12,
            "precision": figures["environment"]["precision"],
            "reference_precision": figures["environment"]["reference_precision"]}


def read_training(output: str, log_rows: list[dict]) -> dict[str, Any]:
    """What a training process said about resuming and stopping, and its last logged figures."""
    info: dict[str, Any] = {}
    if match := re.search(r"resumed from \S+ at step (\d+)", output):
        info["resumed_at"] = int(match.group(1))
    if match := re.search(r"stopped at step (\d+)", output):
        info["stopped_at"] = int(match.group(1))
    if match := re.search(r"finished (\d+) steps", output):
        info["finished_steps"] = int(match.group(1))
    rows = [r for r in log_rows if "loss" in r]
    if rows:
        info.update(last_step=rows[-1]["step"], last_loss=rows[-1]["loss"],
                    images_per_s=sorted(r["images_per_s"] for r in rows)[len(rows) // 2])
    evals = [r for r in log_rows if any(k.endswith("_top1") for k in r)]
    if evals:
        info["last_eval"] = evals[-1]
    return info


def read_log_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def judge(step: Step, run: dict[str, Any], ctx: Context, output: str, previous: dict[str, dict]) -> dict[str, Any]:
    """The step's figures and its status: ok, or failed with the reason."""
    figures: dict[str, Any] = {}
    problems: list[str] = []
    if run.get("timed_out"):
        problems.append(f"stopped at its time limit ({run['timeout_s']:.0f} s)")
    name = step.name
    if name == "environment":
        figures = _read_json(step.outputs["json"]) or {}
        ctx.environment = figures
        if not figures:
            problems.append("the probe wrote nothing (is the project installed? see gpu_check.log)")
        elif not figures.get("cuda_available") and not ctx.args.smoke:
            problems.append("no CUDA device")
    elif name == "pytest-gpu":
        figures = read_pytest(step.outputs["xml"], output)
        if figures["failed"] or figures["error"]:
            problems.append(f"{figures['failed']} failed, {figures['error']} errors")
        if not figures["tests"]:
            problems.append("no GPU test ran")
        elif figures["skipped"] and ctx.environment.get("cuda_available"):
            problems.append(f"{figures['skipped']} skipped on a GPU")
    elif name == "loader-feed":
        figures = _read_json(step.outputs["json"]) or {}
        if not figures:
            problems.append("no feeding-check JSON")
    elif name.startswith("bench-"):
        bench = _read_json(step.outputs["json"])
        if bench:
            figures = {"row": bench_row(bench), "figures": bench}
        else:
            problems.append("no benchmark JSON")
    elif name.startswith("dino-train") or name == "clip-train":
        log_rows = read_log_rows(step.watch_log)
        figures = read_training(output, log_rows)
        if name == "dino-train-killed":
            if not (run.get("signal") and run["returncode"] == -signal.SIGKILL):
                problems.append("the training was not killed mid-run (it ended or failed first)")
        elif name == "dino-train-stopped":
            killed = previous.get("dino-train-killed", {}).get("figures", {})
            if "resumed_at" not in figures:
                problems.append("did not resume from the checkpoint")
            elif killed.get("last_step") is not None and figures["resumed_at"] > killed["last_step"]:
                problems.append(f"resumed at {figures['resumed_at']}, past the killed run's last step")
            if figures.get("stopped_at") is None:
                problems.append("SIGTERM did not save and stop cleanly")
        else:
            stopped = previous.get("dino-train-stopped", {}).get("figures", {}).get("stopped_at")
            if name == "dino-train-finish" and stopped is not None and figures.get("resumed_at") != stopped:
                problems.append(f"resumed at {figures.get('resumed_at')}, not at the step SIGTERM saved ({stopped})")
            if figures.get("finished_steps") is None:
                problems.append("did not finish")
            if not figures.get("last_eval"):
                problems.append("no k-NN / zero-shot during training in log.jsonl")
        if name in ("dino-train-finish", "clip-train"):
            figures["log"] = log_rows
    elif name in ("dino-knn", "dino-knn-init"):
        result = _read_json(step.outputs["json"])
        if result:
            figures = {"top1_k20": result["knn"]["20"]["top1"], "top5_k20": result["knn"]["20"]["top5"],
                       "backend": result.get("backend"), "num_train": result.get("num_train"),
                       "num_test": result.get("num_test")}
        else:
            problems.append("no k-NN JSON")
    elif name == "clip-zeroshot":
        result = _read_json(step.outputs["json"])
        if result and "zeroshot" in result:
            figures = {"zeroshot": result["zeroshot"], "retrieval": result.get("retrieval", {})}
        else:
            problems.append("no zero-shot JSON")
    code = run.get("returncode")
    if code is not None and code != step.exit_code and not run.get("timed_out"):
        meaning = " (killed: out of memory?)" if code == -signal.SIGKILL else ""
        problems.append(f"exit code {code}{meaning}, expected {step.exit_code}")
    return {"status": "failed" if problems else "ok", "problems": problems, "figures": figures}


# --------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------

TARGETS = {"speed_ratio": 1.5, "mem_ratio": 0.7, "ours_fraction_of_matmul_peak": 0.35}


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_summary(report: dict[str, Any]) -> str:
    env, steps = report.get("environment", {}), report["steps"]
    lines = [f"GPU check {report['started']}: {env.get('device_name', 'no CUDA device')}, torch {env.get('torch')} "
             f"(CUDA {env.get('torch_cuda')}), xformers {env.get('xformers_version')} "
             f"({_xformers_state(env) if env else 'not probed'}), k-NN backends "
             f"{','.join(env.get('knn_backends', []))}; {report['seconds']:.0f} s of a {report['budget_s']} s budget",
             f"host: {env.get('cpu_count')} CPUs, {env.get('memory_gib')} GiB memory "
             f"({env.get('memory_available_gib')} available), /dev/shm {env.get('shm_gib')} GiB",
             "", f"{'step':<26}{'status':<9}{'s':>6}  detail"]
    for name, step in steps.items():
        detail = "; ".join(step.get("problems", [])) or step.get("reason", "") or step.get("attention", "")
        lines.append(f"{name:<26}{step['status']:<9}{step.get('seconds', 0):>6.0f}  {detail}"[:160])
    tests = steps.get("pytest-gpu", {}).get("figures", {}).get("tests", [])
    if tests:
        lines += ["", "GPU tests:"] + [f"  {t['outcome']:<8}{t['name']}  {t['message']}"[:160] for t in tests]
    rows = {name: s["figures"]["row"] for name, s in steps.items() if s.get("figures", {}).get("row")}
    if rows:
        precision = next(iter(rows.values()))["precision"]
        lines += ["", f"{'benchmark (' + precision + ')':<27}{'ours TF/s':>10}{'ref TF/s':>9}{'ours im/s':>10}"
                      f"{'ref im/s':>10}{'speed':>7}{'ours MiB':>10}{'ref MiB':>9}{'mem':>6}{'ours peak':>10}"
                      f"{'ref peak':>9}"]
        for name, r in rows.items():
            label = name.replace("bench-", "") + ("" if r["reference_precision"] == r["precision"]
                                                  else f" (ref {r['reference_precision']})")
            lines.append(f"{label[:27]:<27}{r.get('ours_tflops_per_s', 0):>10.1f}"
                         f"{r.get('reference_tflops_per_s', 0):>9.1f}"
                         f"{r['ours_images_per_s']:>10.0f}{r['reference_images_per_s']:>10.0f}"
                         f"{r['speed_ratio']:>6.2f}×{r['ours_peak_mem_mb']:>10.0f}{r['reference_peak_mem_mb']:>9.0f}"
                         f"{r['mem_ratio']:>5.2f}×{_pct(r['ours_fraction_of_matmul_peak']):>10}"
                         f"{_pct(r['reference_fraction_of_matmul_peak']):>9}")
        head = rows.get("bench-s16-packed")
        if head:
            verdicts = {key: "met" if ok else "NOT met" for key, ok in (
                ("speed_ratio", head["speed_ratio"] >= TARGETS["speed_ratio"]),
                ("mem_ratio", head["mem_ratio"] <= TARGETS["mem_ratio"]),
                ("peak", head["ours_fraction_of_matmul_peak"] >= TARGETS["ours_fraction_of_matmul_peak"]))}
            lines.append(f"targets (ViT-S/16 packed vs reference {head['reference_precision']}): speed "
                         f"{head['speed_ratio']:.2f}× ≥ 1.5× {verdicts['speed_ratio']}; memory "
                         f"{head['mem_ratio']:.2f}× ≤ 0.7× {verdicts['mem_ratio']}; "
                         f"{_pct(head['ours_fraction_of_matmul_peak'])} of the {head['precision']} matmul peak "
                         f"({head['matmul_peak_tflops']:.1f} TFLOP/s) ≥ 35% {verdicts['peak']}")
        same = rows.get("bench-s16-cls-packed")
        if same:  # SPARO runs 11 blocks and a read-out, the reference 12 blocks: this row is one architecture
            lines.append(f"the implementation alone (class token, 12 blocks each): {same['ours_tflops_per_s']:.1f} "
                         f"against {same['reference_tflops_per_s']:.1f} TFLOP/s, speed {same['speed_ratio']:.2f}×, "
                         f"memory {same['mem_ratio']:.2f}×")
    feed = steps.get("loader-feed", {}).get("figures", {})
    if feed:
        lines += ["", f"feeding ({feed.get('workers')} loader workers, images/s): " + "; ".join(
            f"augment_on {mode}: model-bound {feed[f'{mode}_model_bound']:.0f}, loader-bound "
            f"{feed[f'{mode}_loader_bound']:.0f}, end to end {feed[f'{mode}_end_to_end']:.0f}"
            for mode in ("loader", "device") if f"{mode}_end_to_end" in feed)]
    dino = {name: steps.get(name, {}).get("figures", {}) for name in
            ("dino-train-killed", "dino-train-stopped", "dino-train-finish", "dino-knn", "dino-knn-init")}
    if dino["dino-train-finish"] or dino["dino-train-killed"]:
        killed, stopped, finish = dino["dino-train-killed"], dino["dino-train-stopped"], dino["dino-train-finish"]
        lines += ["", f"DINO: killed after step {killed.get('last_step')}, resumed at {stopped.get('resumed_at')}, "
                      f"SIGTERM saved at {stopped.get('stopped_at')}, resumed at {finish.get('resumed_at')}, finished "
                      f"{finish.get('finished_steps')} steps; loss {finish.get('last_loss', float('nan')):.3f}, "
                      f"{finish.get('images_per_s', 0):.0f} images/s (median of the logged windows)"]
        knn, init = dino["dino-knn"], dino["dino-knn-init"]
        if knn:
            lines.append(f"DINO k-NN (k=20, {knn.get('backend')}, {knn.get('num_train')} train / {knn.get('num_test')} "
                         f"val): top-1 {_pct(knn.get('top1_k20'))}, at initialisation {_pct(init.get('top1_k20'))}")
    clip, zs = steps.get("clip-train", {}).get("figures", {}), steps.get("clip-zeroshot", {}).get("figures", {})
    if clip or zs:
        retrieval = zs.get("retrieval", {})
        r1 = ", ".join(f"{k} {_pct(v)}" for k, v in retrieval.items() if k.endswith("R@1"))
        lines += ["", f"CLIP: {clip.get('finished_steps')} steps, loss {clip.get('last_loss', float('nan')):.3f}; "
                      f"zero-shot top-1 {_pct(zs.get('zeroshot', {}).get('top1'))} (10 classes); {r1}"]
    lines += ["", f"status: {report['status']}; figures in {report['output']}: {', '.join(report['files'])}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

def fetch_wheels(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS]
    print(shlex.join(argv), flush=True)
    code = subprocess.call(argv)
    wheels = find_wheels(str(folder))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {folder}")
    return code


def write_report(ctx: Context, report: dict[str, Any]) -> None:
    report["files"] = [f for f in OUTPUT_FILES if f != "training_curves.png" or (ctx.output / f).is_file()]
    (ctx.output / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (ctx.output / "summary.txt").write_text(format_summary(report) + "\n")


def _has(environment: dict[str, Any], need: str) -> bool:
    return bool(environment.get({"cuda": "cuda_available", "xformers": "xformers_runs",
                                 "xformers-import": "xformers_imports"}[need]))


def _xformers_state(environment: dict[str, Any]) -> str:
    if environment.get("xformers_runs"):
        return "runs"
    return environment.get("xformers_reason") or "was not probed"


def run_plan(plan: list[Step], ctx: Context) -> int:
    start = time.monotonic()
    deadline = start + ctx.args.budget - BOOKKEEPING_S
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": ctx.args.budget,
                              "output": str(ctx.output), "status": "running", "seconds": 0.0, "steps": {},
                              "smoke": ctx.args.smoke}
    combined = ctx.output / "gpu_check.log"
    combined.write_text("")
    for index, step in enumerate(plan):
        timeout = step_timeout(step, plan[index + 1:], deadline - time.monotonic())
        argv = step.command(ctx.environment)
        entry: dict[str, Any] = {"title": step.title, "command": shlex.join(argv) if argv else None}
        if step.xformers_argv and ctx.environment and not ctx.environment.get("xformers_runs"):
            entry["attention"] = f"crops not packed, one forward per size (xformers: {_xformers_state(ctx.environment)})"
        if step.needs and not _has(ctx.environment, step.needs):
            why = _xformers_state(ctx.environment) if "xformers" in step.needs else "no CUDA device"
            entry.update(status="skipped", reason=f"{step.needs} is not available here ({why})")
        elif argv is None:
            entry.update(status="skipped", reason=step.note or "nothing to run")
        elif timeout < step.floor_s:
            entry.update(status="skipped", reason=f"no time left ({max(timeout, 0):.0f} s for a step needing "
                                                  f"{step.floor_s:.0f} s)")
        else:
            print(f"[{step.name}] {step.title} (up to {timeout:.0f} s)", flush=True)
            step_log = ctx.work / "logs" / f"{step.name}.log"
            try:
                run = run_command(argv, step, timeout, step_log)
            except FileNotFoundError as exc:
                run = {"returncode": None, "seconds": 0.0, "error": str(exc)}
            run["timeout_s"] = timeout
            output = step_log.read_text(errors="replace") if step_log.is_file() else run.get("error", "")
            entry.update(run)
            entry.update(judge(step, run, ctx, output, report["steps"]))
            if run.get("error"):
                entry["problems"].append(run["error"])
                entry["status"] = "failed"
            with combined.open("a") as handle:
                handle.write(f"\n===== [{step.name}] {entry.get('command') or step.title}\n")
                handle.write(output[-LOG_TAIL_BYTES:])
            if entry["status"] == "failed" and "problems" in entry:
                tail = output.strip().splitlines()[-3:]
                print(f"[{step.name}] FAILED: {'; '.join(entry['problems'])}" +
                      "".join(f"\n    {line[:200]}" for line in tail), flush=True)
        entry.setdefault("seconds", 0.0)
        report["steps"][step.name] = entry
        report["environment"] = ctx.environment
        report["seconds"] = time.monotonic() - start
        write_report(ctx, report)  # after every step: a run cut short still leaves its figures
        if step.name == "environment" and entry["status"] != "ok":
            report["status"] = "failed"
            write_report(ctx, report)
            print(f"error: environment: {'; '.join(entry.get('problems', []))}; the other steps need it "
                  "(--dry-run shows the plan, --smoke checks the check on a CPU)", file=sys.stderr)
            return 2
    failed = [n for n, s in report["steps"].items() if s["status"] == "failed"
              or (s["status"] == "skipped" and not next(p for p in plan if p.name == n).optional
                  and not (ctx.args.smoke and "available" in s.get("reason", "")))]
    report["status"] = f"{len(failed)} step(s) failed or skipped: {', '.join(failed)}" if failed else "all steps ok"
    report["seconds"] = time.monotonic() - start
    write_report(ctx, report)
    print("\n" + format_summary(report))
    return 1 if failed else 0
