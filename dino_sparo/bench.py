"""``dino-sparo-bench``: time full DINO training steps, ours against the reference DINO step.

Ours is the training program's own step (:func:`dino_sparo.train.train_step` over
:class:`~dino_sparo.methods.dino.DinoMethod`, with the loop's optimiser and speed options): forward of
teacher and student over all crops, DINO loss, backward, clipping, AdamW, teacher EMA. The reference
(:mod:`dino_sparo.bench_reference`) is the same step written as DINO v1 writes it. Both run on
identical crops, at the same thread count and (unless ``--reference-precision`` says otherwise) the
same precision, each in its own worker process so that peak
memory is each one's own; the parent alternates their steps (ours, reference, then reference, ours,
...) so a busy machine slows both alike, and reports medians after warm-up.

Also measured in the same run: FLOPs per step (``FlopCounterMode``), a matmul peak to compare the
achieved FLOP/s with, and the SPARO read-out against the transformer block it replaces.
The command line is :mod:`dino_sparo.cli.bench`.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
import traceback
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

from dino_sparo.config import ARCHS
from dino_sparo.errors import UsageError
from dino_sparo.files import write_json
from dino_sparo.runtime import resolve_device
from dino_sparo.schedules import method_schedules

ARCH_CHOICES = tuple(ARCHS)
# The benchmark's options: an object with the attributes dino-sparo-bench's flags give
# (dino_sparo.cli.bench.build_parser), e.g. a parsed argparse namespace or a SimpleNamespace.
Options = Any


# --------------------------------------------------------------------------------------------
# The two steps
# --------------------------------------------------------------------------------------------

def autocast_dtype_for(precision: str, device: torch.device) -> Optional[torch.dtype]:
    from dino_sparo.train import resolve_precision

    return resolve_precision(precision, device)


def make_crops(args: Options, device: torch.device, batch: Optional[int] = None) -> list[torch.Tensor]:
    """The step's crops (2 global then the local ones), the same for ours and the reference."""
    batch = batch or args.batch
    g = torch.Generator().manual_seed(args.seed)
    sizes = [args.global_size] * args.global_crops + [args.local_size] * args.local_crops
    return [torch.randn(batch, 3, s, s, generator=g).to(device) for s in sizes]  # each B × 3 × S × S


def train_config(args: Options, **changes: Any):
    """The training config of our step: DINO ViT-S/16 defaults with the benchmark's model and crops."""
    from dino_sparo.config import load_config

    overrides = [
        f"model.arch={args.arch}", f"model.patch_size={args.patch_size}", f"model.readout={args.readout}",
        f"model.img_size={args.global_size}", f"model.attn_backend={args.attn_backend}",
        f"model.pack_crops={str(args.pack_crops).lower()}", f"crops.global_crops_number={args.global_crops}",
        f"crops.global_crops_size={args.global_size}", f"crops.local_crops_number={args.local_crops}",
        f"crops.local_crops_size={args.local_size}", f"data.batch_size_per_gpu={args.batch}",
        f"dino.out_dim={args.out_dim}", f"precision={args.precision}", f"compile={str(args.compile).lower()}",
        f"grad_checkpointing={str(args.grad_checkpointing).lower()}", f"optim.fused={args.fused}",
        "optim.epochs=1", "optim.freeze_last_layer=0",  # steady state: every parameter is updated
        f"device={'cuda' if args.device.startswith('cuda') else 'cpu'}",
    ]
    overrides += list(getattr(args, "set", None) or [])  # --set: ours' own config keys (e.g. the demo's)
    for key, value in changes.items():
        overrides.append(f"{key}={value}")
    return load_config(None, overrides)


def ours_as_reference(args: Options) -> bool:
    """``--reference-set``: the second step is ours again, with those keys changed (e.g. iBOT off),
    instead of DINO v1's, so the two differ only there."""
    return bool(getattr(args, "reference_set", None))


def bench_masking(cfg: Any, batch: int, seed: int) -> tuple:
    """iBOT's masks of one step (drawn as the training data draws them, once, seeded): what the
    collate function hands the method with the crops."""
    import random

    from dino_sparo.data.masking import MaskedCrops, masked_multicrop_collate

    crops = cfg.crops
    draw = MaskedCrops(lambda image: [], crops.global_crops_number, crops.global_crops_size // cfg.model.patch_size,
                       cfg.ibot.mask_probability, cfg.ibot.mask_ratio)
    state = random.getstate()
    random.seed(seed)
    try:
        items = [(([torch.zeros(1)], draw(None)[1]), 0) for _ in range(batch)]
    finally:
        random.setstate(state)
    return masked_multicrop_collate(items)[2]


class OursStep:
    """Our training step, built from the training program's pieces."""

    def __init__(self, args: Options, device: torch.device, batch: Optional[int] = None,
                 **changes: Any) -> None:
        from dino_sparo.methods.dino import DinoMethod
        from dino_sparo.train import apply_speed_options, build_optimizer

        torch.manual_seed(args.seed)
        self.cfg = cfg = train_config(args, **({"data.batch_size_per_gpu": batch} if batch else {}), **changes)
        self.device, self.autocast_dtype = device, autocast_dtype_for(cfg.precision, device)
        self.method = DinoMethod(cfg, device)
        self.schedules = method_schedules(cfg, iters_per_epoch=1000, epochs=1)  # the teacher's, as a run's first epoch
        apply_speed_options(self.method, cfg)
        groups = self.method.param_groups()
        self.optimizer = build_optimizer(groups, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        self.params = [p for g in groups for p in g["params"]]
        self.lr = cfg.optim.lr * cfg.data.batch_size_per_gpu / 256.0
        self.masking = bench_masking(cfg, cfg.data.batch_size_per_gpu, args.seed) if cfg.ibot.loss_weight else None
        self.method.train_module.train()

    def step(self, images: list[torch.Tensor], it: int) -> None:
        from dino_sparo.train import train_step

        for group in self.optimizer.param_groups:  # as the loop sets its schedules each step
            group["lr"] = self.lr
            if group["apply_wd"]:
                group["weight_decay"] = self.cfg.optim.weight_decay
        batch = (images, None) if self.masking is None else (images, None, self.masking)
        train_step(self.method, batch, it % 1000, 0, self.schedules.at(it % 1000, 0), self.optimizer,
                   self.scaler, self.params, self.cfg.optim, self.autocast_dtype)


def reference_step(args: Options, device: torch.device, batch: Optional[int] = None):
    from dino_sparo.bench_reference import ReferenceStep

    torch.manual_seed(args.seed)
    batch = batch or args.batch
    return ReferenceStep(arch=ARCHS[args.arch], patch_size=args.patch_size, img_size=args.global_size,
                         out_dim=args.out_dim, n_local_crops=args.local_crops, device=device,
                         autocast_dtype=autocast_dtype_for(args.precision, device), lr=5e-4 * batch / 256.0)


def build_step(kind: str, args: Options, device: torch.device, batch: Optional[int] = None,
               **changes: Any):
    if kind == "ours":
        return OursStep(args, device, batch, **changes)
    if ours_as_reference(args):
        return OursStep(SimpleNamespace(**{**vars(args), "set": list(args.set or []) + list(args.reference_set)}),
                        device, batch, **changes)
    return reference_step(args, device, batch)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """This process' peak: allocated CUDA memory on GPU, resident set size (RSS) on CPU (which
    includes the Python interpreter and the imported libraries: see ``base_mem_mb``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _cpu_flash_attention_flops() -> dict:
    """FlopCounterMode has no formula for PyTorch's CPU flash attention; give it the SDPA ones."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return mapping


def count_step_flops(kind: str, args: Options, device: torch.device) -> int:
    """Matmul/convolution/attention FLOPs of one full step at the benchmark's batch.

    Counted on a two-image step (KoLeo needs a neighbour) and scaled by the batch (every counted
    operation is per image, up to KoLeo's B × B similarities, which are negligible); ours
    is counted with explicit attention and without packing, so fused kernels the counter cannot see
    (xformers) are not missed and both steps are counted alike.
    """
    ours = kind == "ours" or ours_as_reference(args)
    changes = {"model.attn_backend": "math", "model.pack_crops": "false", "compile": "false"} if ours else {}
    runner = build_step(kind, args, device, batch=2, **changes)
    images = make_crops(args, device, batch=2)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_flash_attention_flops()) as counter:
        runner.step(images, 0)
    return int(counter.get_total_flops()) * args.batch // 2


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: Optional[int] = None,
                      repeats: Optional[int] = None) -> float:
    """The best FLOP/s of a large square matmul, in the step's compute dtype."""
    size = size or (8192 if device.type == "cuda" else 2048)
    repeats = repeats or (20 if device.type == "cuda" else 5)  # a GPU needs a while to reach its clocks
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def time_readout_vs_block(args: Options, device: torch.device, repeats: int = 5) -> dict:
    """Forward + backward of the SPARO read-out against one transformer block (the one SPARO's
    ``reduce_depth`` removes) on the step's token tensors: every global and local crop's tokens."""
    from dino_sparo.layers.block import Block
    from dino_sparo.sparo import create_readout, readout_options

    cfg = train_config(args)
    width, _, heads = ARCHS[args.arch]
    torch.manual_seed(args.seed)
    sparo = create_readout("sparo", width, heads, readout_options(cfg.model.sparo)).to(device)  # as the backbone
    block = Block(width, heads, attn_backend=args.attn_backend).to(device)
    tokens = []  # one B·crops × N × D tensor per crop size
    for n_crops, size in ((args.global_crops, args.global_size), (args.local_crops, args.local_size)):
        if n_crops:
            n = 1 + (size // args.patch_size) ** 2
            tokens.append(torch.randn(n_crops * args.batch, n, width, device=device, requires_grad=True))
    autocast_dtype = autocast_dtype_for(args.precision, device)

    def run(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
        synchronize(device)
        start = time.perf_counter()
        for x in tokens:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = fn(x)
            out.float().sum().backward()
        synchronize(device)
        return time.perf_counter() - start

    readout = lambda x: sparo(x, return_attn=False).embedding  # noqa: E731
    run(readout), run(block)  # warm-up
    times: dict[str, list[float]] = {"sparo": [], "block": []}
    for i in range(repeats):
        for name in (("sparo", "block") if i % 2 == 0 else ("block", "sparo")):
            times[name].append(run(readout if name == "sparo" else block))
    sparo_s, block_s = statistics.median(times["sparo"]), statistics.median(times["block"])
    return {"sparo_s": sparo_s, "block_s": block_s, "sparo_over_block": sparo_s / block_s}


# --------------------------------------------------------------------------------------------
# Worker processes: each holds one step, so its peak memory is its own
# --------------------------------------------------------------------------------------------

def _process_cpu_s() -> float:
    """CPU seconds of this process, all threads (user + system): on a shared machine this grows
    by the work done whether or not other processes take turns on the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(conn: Any, kind: str, options: dict) -> None:
    args = SimpleNamespace(**options)
    try:
        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        import dino_sparo.bench_reference  # noqa: F401  both workers import the same modules,
        import dino_sparo.methods.dino  # noqa: F401  so their memory differs only by what they build
        import dino_sparo.train  # noqa: F401
        base_mb = peak_memory_mb(device)
        runner = build_step(kind, args, device)
        images = make_crops(args, device)
        it = 0
        conn.send(("ok", None))
        while True:
            command = conn.recv()
            if command == "step":
                synchronize(device)
                start, start_cpu = time.perf_counter(), _process_cpu_s()
                runner.step(images, it)
                synchronize(device)
                it += 1
                conn.send(("ok", (time.perf_counter() - start, _process_cpu_s() - start_cpu)))
            elif command == "memory":
                conn.send(("ok", (peak_memory_mb(device), base_mb)))
            elif command == "flops":
                del runner
                conn.send(("ok", count_step_flops(kind, args, device)))
            elif command == "matmul":
                dtype = autocast_dtype_for(args.precision, device) or torch.float32
                conn.send(("ok", matmul_peak_flops(device, dtype, size=args.matmul_size or None)))
            elif command == "readout":
                conn.send(("ok", time_readout_vs_block(args, device)))
            elif command == "stop":
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {command!r}"))
    except Exception:  # report to the parent, which raises with the worker's traceback
        conn.send(("error", traceback.format_exc()))


class Worker:
    def __init__(self, kind: str, options: dict) -> None:
        context = mp.get_context("spawn")
        self.kind = kind
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, kind, options), daemon=True)
        self.process.start()
        self._receive()

    def _receive(self) -> Any:
        if not self.conn.poll(None):
            raise RuntimeError(f"{self.kind} worker gave no answer")
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.kind} worker died (exit code {self.process.exitcode}); "
                               "out of memory? Try a smaller --batch") from None
        if status != "ok":
            raise RuntimeError(f"{self.kind} worker failed:\n{value}")
        return value

    def call(self, command: str) -> Any:
        self.conn.send(command)
        return self._receive()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.call("stop")
            except (RuntimeError, BrokenPipeError, OSError):
                pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

def dtype_name(precision: str, device: torch.device) -> str:
    return str(autocast_dtype_for(precision, device) or "fp32").replace("torch.", "")


def summarise(step_times: list[float], cpu_times: list[float], flops: int, batch: int,
              memory: tuple[float, float], matmul_peak: float) -> dict:
    step_s = statistics.median(step_times)
    peak_mb, base_mb = memory
    return {"images_per_s": batch / step_s, "step_s": step_s, "step_s_all": step_times,
            "cpu_s": statistics.median(cpu_times), "cpu_s_all": cpu_times, "peak_mem_mb": peak_mb,
            "base_mem_mb": base_mb, "flops_per_step": flops, "flops_per_s": flops / step_s,
            "fraction_of_matmul_peak": flops / step_s / matmul_peak}


def run_benchmark(args: Options, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark as ``args`` says; returns the figures (also written to ``args.output_json``)."""
    validate(args)
    options = dict(vars(args))
    reference_options = dict(options, precision=reference_precision(args))
    log(f"starting workers ({args.device}, {args.threads} threads)")
    workers = {"ours": Worker("ours", options)}
    try:
        workers["reference"] = Worker("reference", reference_options)
        times: dict[str, list[float]] = {"ours": [], "reference": []}
        cpu_times: dict[str, list[float]] = {"ours": [], "reference": []}
        for i in range(args.warmup + args.steps):
            order = ("ours", "reference") if i % 2 == 0 else ("reference", "ours")
            for kind in order:
                seconds, cpu_seconds = workers[kind].call("step")
                if i >= args.warmup:
                    times[kind].append(seconds)
                    cpu_times[kind].append(cpu_seconds)
            if i >= args.warmup:
                log(f"step {i + 1 - args.warmup}/{args.steps}: ours {times['ours'][-1]:.3f} s, "
                    f"reference {times['reference'][-1]:.3f} s")
            else:
                log(f"warm-up step {i + 1}/{args.warmup} done")
        memory = {kind: worker.call("memory") for kind, worker in workers.items()}
        flops = {kind: worker.call("flops") for kind, worker in workers.items()}
        matmul_peak = {"reference": workers["reference"].call("matmul")} if reference_options != options else {}
        workers["reference"].close()
        matmul_peak["ours"] = workers["ours"].call("matmul")
        matmul_peak.setdefault("reference", matmul_peak["ours"])  # same dtype: one measurement
        readout = workers["ours"].call("readout")
    finally:
        for worker in workers.values():
            worker.close()
    results = {kind: summarise(times[kind], cpu_times[kind], flops[kind], args.batch, memory[kind],
                               matmul_peak[kind]) for kind in ("ours", "reference")}
    device = torch.device(args.device)
    figures = {
        "config": {k: v for k, v in options.items() if k != "output_json"},
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "threads": args.threads,
            "precision": dtype_name(args.precision, device),
            "reference_precision": dtype_name(reference_options["precision"], device),
        },
        "ours": results["ours"],
        "reference": results["reference"],
        "ratio": {"images_per_s": results["ours"]["images_per_s"] / results["reference"]["images_per_s"],
                  "cpu_s": results["ours"]["cpu_s"] / results["reference"]["cpu_s"],
                  "peak_mem": results["ours"]["peak_mem_mb"] / results["reference"]["peak_mem_mb"]},
        "matmul_peak_flops_per_s": matmul_peak["ours"],
        "reference_matmul_peak_flops_per_s": matmul_peak["reference"],
        "readout": readout,
    }
    if args.output_json:
        write_json(args.output_json, figures)
    return figures


def format_report(figures: dict) -> str:
    cfg, env = figures["config"], figures["environment"]
    ref_precision = env.get("reference_precision", env["precision"])
    same_precision = ref_precision == env["precision"]
    precision = env["precision"] if same_precision else f"ours {env['precision']}, reference {ref_precision}"
    lines = [
        f"{cfg['arch']}/{cfg['patch_size']} {cfg['readout']} read-out, batch {cfg['batch']}, "
        f"{cfg['global_crops']}×{cfg['global_size']} + {cfg['local_crops']}×{cfg['local_size']} crops, "
        f"{cfg['device']} {precision}, {env['threads']} threads, attention {cfg['attn_backend']}"
        f"{', packed crops' if cfg['pack_crops'] else ''}{', compiled' if cfg['compile'] else ''}; "
        f"median of {cfg['steps']} steps after {cfg['warmup']} warm-up",
        f"{'':<22}{'images/s':>10}{'step s':>10}{'CPU s':>10}{'peak MiB':>10}{'GFLOP/step':>12}"
        f"{'GFLOP/s':>10}{'of peak':>9}",
    ]
    for kind, name in (("ours", f"ours ({cfg['readout']})"), ("reference", "reference DINO v1")):
        r = figures[kind]
        lines.append(f"{name:<22}{r['images_per_s']:>10.2f}{r['step_s']:>10.3f}{r['cpu_s']:>10.2f}"
                     f"{r['peak_mem_mb']:>10.0f}{r['flops_per_step'] / 1e9:>12.1f}{r['flops_per_s'] / 1e9:>10.1f}"
                     f"{r['fraction_of_matmul_peak']:>9.1%}")
    ratio = figures["ratio"]
    lines.append(f"{'ours / reference':<22}{ratio['images_per_s']:>9.2f}×{'':>10}{1 / ratio['cpu_s']:>9.2f}×"
                 f"{ratio['peak_mem']:>9.2f}×   (speed-ups: images/s and CPU time; memory: ratio)")
    base = figures["ours"]["base_mem_mb"]
    if base > 0:
        lines.append(f"peak memory is the process' RSS; {base:.0f} MiB of it is Python, torch and the imports")
    lines.append(f"matmul peak ({env['precision']}): {figures['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    if not same_precision:
        lines.append(f"matmul peak ({ref_precision}, the reference's 'of peak'): "
                     f"{figures['reference_matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    ro = figures["readout"]
    lines.append(f"SPARO read-out fwd+bwd {ro['sparo_s'] * 1e3:.1f} ms vs the block it replaces "
                 f"{ro['block_s'] * 1e3:.1f} ms ({ro['sparo_over_block']:.2f}×)")
    return "\n".join(lines)


def reference_precision(args: Options) -> str:
    return args.precision if args.reference_precision == "same" else args.reference_precision


def validate(args: Options) -> None:
    args.device = str(resolve_device(args.device, key="--device"))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if args.threads is None:
        args.threads = torch.get_num_threads()
    for name in ("batch", "steps", "global_crops", "global_size", "local_size", "out_dim", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 1:
        raise UsageError(f"--warmup must be at least 1 (the first step initialises kernels), got {args.warmup}")
    if args.global_crops != 2:
        raise UsageError(f"--global-crops must be 2 (the DINO loss pairs two global views), got {args.global_crops}")
    for name in ("global_size", "local_size"):
        if getattr(args, name) % args.patch_size:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} is not a multiple of "
                             f"--patch-size {args.patch_size}")
    train_config(args)  # a bad --set / --reference-set key: one line naming it, before any worker starts
    if ours_as_reference(args):
        train_config(SimpleNamespace(**{**vars(args), "set": list(args.set or []) + list(args.reference_set)}))
