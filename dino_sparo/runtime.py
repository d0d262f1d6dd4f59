"""How a process runs, decided in one place: device, precision, seeding and RNG state, logging.

Training, evaluation, the demo, the study and the benchmarks all call these, so ``--device auto``
or ``precision: auto`` means the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from dino_sparo import distributed
from dino_sparo.errors import ConfigError, UsageError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


# --------------------------------------------------------------------------------------------- device

def resolve_device(name: "str | torch.device | None", key: str = "config key 'device'") -> torch.device:
    """``auto`` (or None): a GPU when there is one, else the CPU. ``cuda`` is this process' GPU (its
    local rank under torchrun or SLURM). ``key`` names the option in the error (a config key or a flag)."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{key} is 'cuda' but no CUDA device is available")
        return torch.device("cuda", distributed.local_device_index(distributed.env_info().local_rank))
    return torch.device(name)


# ------------------------------------------------------------------------------------------ precision

# CPU flags of native bf16 matrix products (AVX-512 BF16, AMX); without them bf16 is emulated and
# runs far slower than fp32 (two orders of magnitude on AVX2-only CPUs).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises one of ``NATIVE_BF16_CPU_FLAGS`` (False where the file is missing)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32. ``auto``: bf16 on GPU and on CPUs with native bf16
    (``NATIVE_BF16_CPU_FLAGS``), fp32 on other CPUs."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'precision': fp16 needs a GPU; use fp32 or bf16 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def set_tf32(enabled: bool) -> None:
    """The config key ``tf32``: fp32 matmuls and convolutions on GPUs in TF32 or in full fp32 (torch's
    default lets convolutions use TF32; here fp32 means fp32 unless asked). No effect on CPUs nor on
    bf16/fp16 autocast, whose matmuls are not fp32."""
    mode = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:  # torch before 2.9
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def precision_reason(precision: str, device: torch.device) -> str:
    """Why ``precision: auto`` chose what it chose, for the start-up log ('' when set explicitly)."""
    if precision != "auto":
        return ""
    if device.type == "cuda":
        return " (auto: GPU)"
    if cpu_has_native_bf16():
        return " (auto: this CPU has native bf16)"
    return f" (auto: this CPU has none of {', '.join(NATIVE_BF16_CPU_FLAGS)})"


# ------------------------------------------------------------------------------------------ threads

def available_cores() -> int:
    """This process' share of the cores: its affinity mask (a SLURM or taskset share, not the whole
    machine), divided among torchrun's processes on the node (``LOCAL_WORLD_SIZE``) when they share one mask."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_processes = 1
    if local_processes > 1 and cores == (os.cpu_count() or cores):
        cores //= local_processes
    return max(1, cores)


@dataclass
class ThreadPlan:
    """What :func:`plan_threads` chose: loader worker processes, intra-op threads, and why."""
    cores: int
    workers: int
    requested_workers: int
    threads: int
    reason: str

    def describe(self) -> str:
        capped = (f" (data.num_workers {self.requested_workers}, capped at the cores)"
                  if self.workers < self.requested_workers else "")
        from dino_sparo import OMP_WAIT_POLICY_SOURCE  # noqa: PLC0415
        return (f"threads: {self.cores} cores; {self.workers} loader worker(s){capped}; {self.threads} intra-op "
                f"thread(s) ({self.reason}); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
                f"({OMP_WAIT_POLICY_SOURCE})")


def set_threads(threads: int) -> None:
    """A program's ``--threads``: torch's intra-op threads now, and ``OMP_NUM_THREADS`` so that
    :func:`plan_threads` (and worker processes) keep the choice."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def plan_threads(device: torch.device, num_workers: int, apply: bool = True) -> ThreadPlan:
    """Loader workers and intra-op threads that do not oversubscribe the cores: no more workers than
    cores (each runs one thread, torch's DataLoader sets that); on a GPU the training process keeps
    the cores the workers leave (at least one), since the workers do the CPU work; on a CPU it keeps
    torch's count (all cores unless set otherwise), never more than the cores, since the step is the
    work and the workers only fill the pipeline between steps (waiting passively, see
    ``OMP_WAIT_POLICY`` in the package). ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the
    environment: torch's threads are left as the user set them."""
    cores = available_cores()
    workers = min(num_workers, cores)
    current = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        threads, reason = current, "OMP_NUM_THREADS / MKL_NUM_THREADS from the environment"
    elif device.type == "cuda":
        threads, reason = max(1, cores - workers), "GPU step: the cores the loader workers leave"
    else:
        threads, reason = min(current, cores), "CPU step: torch's count, at most the cores"
    if apply and threads != current:
        torch.set_num_threads(threads)
    return ThreadPlan(cores, workers, num_workers, threads, reason)


# ---------------------------------------------------------------------------------------- randomness

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python's, NumPy's, torch's CPU and this process' own GPU's generator states (one GPU per process:
    the state of every visible GPU would tie a checkpoint to the number of GPUs it was written with)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; its tensors may have been loaded onto a GPU, torch wants them on the CPU.
    Checkpoints written before held every visible GPU's state (``cuda``): the current device's entry is
    restored when there is one, so a run resumes on fewer visible GPUs too."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"].cpu())
    elif "cuda" in state:
        states, index = state["cuda"], torch.cuda.current_device()
        if index < len(states):
            torch.cuda.set_rng_state(states[index].cpu())
        else:
            logger.warning("the checkpoint holds GPU generator states for %d device(s), none for device %d: "
                           "this GPU's random numbers (drop path) start afresh", len(states), index)


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Python, NumPy and torch (CPU and ``device``'s) RNG states as they were on entry."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


# ------------------------------------------------------------------------------------------- logging

class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line is written (a redirected or captured stream too)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def setup_logging(is_main: bool = True, log_file: Optional[Path] = None) -> None:
    """One console handler on stderr (added once, however often this is called) and, on the main
    process, at most one log file (``log_file``, replacing an earlier one). Other ranks log warnings only."""
    root = logging.getLogger()
    formatter = logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT)
    ours = [h for h in root.handlers if getattr(h, "_dino_sparo", False)]
    if not any(not isinstance(h, logging.FileHandler) for h in ours):
        console = _StderrHandler()
        console.setFormatter(formatter)
        console._dino_sparo = True  # type: ignore[attr-defined]
        root.addHandler(console)
    for handler in ours:
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    if is_main and log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(formatter)
        file_handler._dino_sparo = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
