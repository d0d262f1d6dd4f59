"""Process-group set-up from torchrun or SLURM variables (or none), and small collective helpers
that also work, as no-ops, in a single process.

Where the rank comes from, in order: torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``); SLURM's, when ``srun`` started several tasks (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST`` as master, a port
derived from the job id and its restart count); else one process. The backend is NCCL only when
the training runs on CUDA devices, gloo otherwise (NCCL on a node without GPUs fails at start-up).
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800  # collectives (and start-up) wait this long for a missing rank
TIMEOUT_ENV = "DINO_SPARO_DIST_TIMEOUT_S"
PORT_RANGE = (20000, 60000)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    launcher: str = "single"  # "torchrun" (or any env:// launcher), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --------------------------------------------------------------------------------------------
# Reading the launcher's variables (pure functions of a mapping: testable without a cluster)
# --------------------------------------------------------------------------------------------

def _expand_brackets(body: str, name: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]``, keeping zero padding."""
    items = []
    for part in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if match is None:
            raise ValueError(f"SLURM node list {name!r}: cannot read the range {part!r}")
        low, high = match.group(1), match.group(2)
        if high is None:
            items.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"SLURM node list {name!r}: the range {part!r} runs backwards")
        items.extend(f"{i:0{len(low)}d}" for i in range(int(low), int(high) + 1))
    return items


def expand_nodelist(nodelist: str) -> list[str]:
    """All hosts of a SLURM node list, in order: ``node[01-03,07],gpu5`` -> node01, node02,
    node03, node07, gpu5. Several bracket groups in one name multiply (``r[1-2]n[1-2]``)."""
    hosts: list[str] = []
    name, depth, start = nodelist.strip(), 0, 0
    if not name:
        raise ValueError("SLURM node list is empty")
    groups = []
    for i, char in enumerate(name + ","):  # split on commas outside brackets
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"SLURM node list {nodelist!r}: unbalanced ']'")
        elif char == "," and depth == 0:
            groups.append(name[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"SLURM node list {nodelist!r}: unbalanced '['")
    for group in groups:
        if not group:
            raise ValueError(f"SLURM node list {nodelist!r}: empty host name")
        expanded = [""]
        for literal, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", group):
            suffixes = _expand_brackets(body, nodelist) if body else [""]
            expanded = [prefix + literal + suffix for prefix in expanded for suffix in suffixes]
        hosts.extend(expanded)
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (the master of the process group)."""
    return expand_nodelist(nodelist)[0]


def port_for_job(job_id: str, attempt: int = 0) -> int:
    """A TCP port every task of a job derives alike, different for each restart of the job: a
    requeued job does not meet the store (or the stray processes) of its previous attempt."""
    low, high = PORT_RANGE
    return low + zlib.crc32(f"{job_id}/{attempt}".encode()) % (high - low)


def _int_var(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    match = re.match(r"\s*(\d+)", value)  # SLURM writes counts such as "4(x2)"
    if match is None:
        raise ValueError(f"environment variable {name} must be a non-negative integer, got {value!r}")
    return int(match.group(1))


def _checked(info: DistInfo, source: str) -> DistInfo:
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"{source}: rank {info.rank} is not within a world of {info.world_size} processes")
    return info


def env_info(env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Rank, world size, local rank and master from torchrun's variables, else SLURM's, else one
    process. Reads ``env`` (default ``os.environ``) and changes nothing."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(DistInfo(
            rank=_int_var(env, "RANK"), world_size=_int_var(env, "WORLD_SIZE"),
            local_rank=_int_var(env, "LOCAL_RANK", 0), master_addr=env.get("MASTER_ADDR"),
            master_port=_int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else None, launcher="torchrun",
        ), "RANK/WORLD_SIZE")
    # srun sets SLURM_PROCID in each task; SLURM_STEP_NUM_TASKS counts this step's tasks
    world = _int_var(env, "SLURM_STEP_NUM_TASKS", _int_var(env, "SLURM_NTASKS", 1))
    if "SLURM_PROCID" in env and world > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if env.get("MASTER_ADDR"):
            master = env["MASTER_ADDR"]
        elif nodelist:
            master = first_host(nodelist)
        else:
            raise ValueError("SLURM_PROCID is set but neither SLURM_JOB_NODELIST nor MASTER_ADDR is: "
                             "cannot tell which host runs rank 0")
        if env.get("MASTER_PORT"):
            port = _int_var(env, "MASTER_PORT")
        else:
            job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
            if not job_id:
                raise ValueError("SLURM_PROCID is set but SLURM_JOB_ID is not: set MASTER_PORT")
            port = port_for_job(job_id, _int_var(env, "SLURM_RESTART_COUNT", 0))
        return _checked(DistInfo(
            rank=_int_var(env, "SLURM_PROCID"), world_size=world, local_rank=_int_var(env, "SLURM_LOCALID", 0),
            master_addr=master, master_port=port, launcher="slurm",
        ), "SLURM_PROCID/SLURM_NTASKS")
    return DistInfo()


def export_env(info: DistInfo) -> None:
    """Write ``info`` as torchrun's variables, for code that initialises from ``env://``."""
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
    if info.master_addr is not None:
        os.environ["MASTER_ADDR"] = info.master_addr
    if info.master_port is not None:
        os.environ["MASTER_PORT"] = str(info.master_port)


# --------------------------------------------------------------------------------------------
# The process group
# --------------------------------------------------------------------------------------------

def choose_backend(device_type: str) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones; never NCCL on a machine without GPUs."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("training on 'cuda' but this process sees no GPU (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); use device=cpu or "
                               "request GPUs (--gpus-per-node)")
        return "nccl" if dist.is_nccl_available() else "gloo"
    return "gloo"


def local_device_index(local_rank: int) -> int:
    """The CUDA device of this process: ``local_rank``, or 0 when SLURM binds one GPU per task."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise RuntimeError(f"local rank {local_rank} but this process sees {count} GPU(s): start one process "
                       "per GPU (tasks per node = GPUs per node)")


def _timeout(timeout_s: Optional[float]) -> timedelta:
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ValueError(f"environment variable {TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if timeout_s <= 0:
        raise ValueError(f"process-group timeout must be positive, got {timeout_s} s")
    return timedelta(seconds=timeout_s)


def init_distributed(device_type: str, timeout_s: Optional[float] = None) -> DistInfo:
    """Join the process group when launched with several processes: NCCL on GPU, gloo on CPU.

    A group left from an earlier run in this process (an in-process requeue) is reused when it has
    the same rank and size, and replaced otherwise. ``timeout_s`` (default ``$DINO_SPARO_DIST_TIMEOUT_S``
    or 30 min) bounds how long start-up and every collective wait for a missing rank.
    """
    info = env_info()
    if info.world_size == 1:
        return info
    backend = choose_backend(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(local_device_index(info.local_rank))
    if is_dist():
        if (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (info.rank, info.world_size, backend):
            return info
        dist.destroy_process_group()
    if info.launcher == "torchrun":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise ValueError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: launch with torchrun "
                             "or set them")
        init_method = "env://"  # torchrun's agent may host the store: let torch find it
    else:
        init_method = f"tcp://{info.master_addr}:{info.master_port}"
    # device_id binds the group to this process' GPU: NCCL then knows the device at start-up instead of
    # guessing it at the first collective (and warning that it may hang)
    device_id = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else None
    dist.init_process_group(backend=backend, init_method=init_method, rank=info.rank,
                            world_size=info.world_size, timeout=_timeout(timeout_s), device_id=device_id)
    logger.info("process group: %s, rank %d of %d (local rank %d), master %s:%s, from %s", backend, info.rank,
                info.world_size, info.local_rank, info.master_addr or os.environ.get("MASTER_ADDR"),
                info.master_port or os.environ.get("MASTER_PORT"), info.launcher)
    return info


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Collectives (identities in one process)
# --------------------------------------------------------------------------------------------

def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place and returned); the identity in one process."""
    if is_dist():
        dist.all_reduce(tensor)
        tensor /= get_world_size()
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (in place and returned); the identity in one process."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """``src``'s ``obj`` on every rank (pickled); ``obj`` itself in one process."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj``, by rank, on every rank (pickled); ``[obj]`` in one process."""
    if not is_dist():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def host_group() -> Optional[object]:
    """A process group for small host-side votes: the default group when it is gloo, else a gloo group
    over the same ranks. Collective (every rank must call it at the same point). Under NCCL a vote on
    CUDA tensors costs two device synchronisations (the host list copied in, the result read back),
    each waiting for the whole queued step; a gloo vote on CPU tensors waits for nothing on the GPU."""
    if not is_dist():
        return None
    if dist.get_backend() == "gloo":
        return None  # the default group
    return dist.new_group(backend="gloo")


class AnyRankFlags:
    """Flags raised on any rank (e.g. "a stop signal arrived"), agreed on by all ranks at the same
    step. With several processes the vote runs on CPU tensors over a gloo group (:func:`host_group`)
    and is one step late: the all-reduce started at step k is read at step k+1, so the host never
    waits for the vote nor for the GPU. Created at the same point on every rank."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._pending: Optional[tuple[torch.Tensor, object]] = None
        self.group = host_group()

    def vote(self, raised: set[str]) -> set[str]:
        """Offer this rank's ``raised`` flags; returns the flags every rank now agrees were raised."""
        if not is_dist():
            return set(raised) & set(self.names)
        agreed: set[str] = set()
        if self._pending is not None:
            agreed = self._collect()
        flags = torch.tensor([name in raised for name in self.names], dtype=torch.int32)  # on the CPU
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (flags, work)
        return agreed

    def _collect(self) -> set[str]:
        flags, work = self._pending  # type: ignore[misc]
        self._pending = None
        work.wait()  # type: ignore[attr-defined]
        return {name for name, up in zip(self.names, flags.tolist()) if up}

    def close(self) -> set[str]:
        """Finish the vote in flight (before a barrier or the end); returns what it agreed on."""
        return self._collect() if self._pending is not None else set()
