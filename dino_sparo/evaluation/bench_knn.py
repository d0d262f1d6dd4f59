"""Benchmark of the k-NN search: ``python tools/bench_knn.py`` (``--help`` for the options; the
program is :mod:`dino_sparo.cli.bench_knn`).

The issue this answers: a SPARO embedding is 4096-d, and k-NN on ImageNet-sized feature sets ran
out of memory in the reference script. Here the search is timed on ``num_train × D`` train and
``num_test × D`` test features kept in memory-mapped ``.npy`` files (as the evaluation's feature
cache keeps them; fp16 for wide features by default), for each backend, each run in a fresh
process so that its peak memory is its own. The features are random but clustered (one Gaussian
cloud per class), so the neighbours have structure like real features (the vote is far from
chance), and the backends are checked to return the same neighbours.

Beside the streamed backends, two one-shot references do the same job without a memory bound:
``faiss-flat`` (every train feature loaded and normalised, one ``IndexFlatIP``, one search) and
``torch-oneshot`` (everything loaded and normalised, blocked matmul against all of train, one top-k
per query block). ``--repeats`` runs every measurement several times, interleaved, so that the
ratio of the streamed search to the faster one-shot comes from one run of a (noisy) machine.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from dino_sparo.errors import UsageError

DEFAULT_DIMS = (384, 4096)
DEFAULT_BACKENDS = ("faiss-cpu", "torch", "faiss-flat", "torch-oneshot")
ONE_SHOT = ("faiss-flat", "torch-oneshot")  # references without the memory bound


def make_clustered_features(path: Path, num: int, dim: int, labels: np.ndarray, centres: np.ndarray,
                            noise: float, dtype: np.dtype, seed: int, block: int = 4096) -> None:
    """Write ``num × dim`` features to ``path`` (a ``.npy`` memmap): the label's centre plus
    Gaussian noise, written block by block so the set never has to fit in memory."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(num, dim))
    for start in range(0, num, block):
        stop = min(start + block, num)
        noise_block = rng.standard_normal((stop - start, dim), dtype=np.float32) * noise  # b × D
        out[start:stop] = (centres[labels[start:stop]] + noise_block).astype(dtype)
    out.flush()
    del out


def prepare(folder: Path, num_train: int, num_test: int, dim: int, num_classes: int, dtype: str,
            noise: float, seed: int) -> dict[str, str]:
    """Train/test features and labels of one dimension in ``folder``; returns their paths."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32) / np.sqrt(dim)  # C × D, unit-ish norm
    np_dtype = np.dtype(np.float16 if dtype == "fp16" else np.float32)
    paths = {}
    for split, num, split_seed in (("train", num_train, seed + 1), ("test", num_test, seed + 2)):
        labels = np.random.default_rng(split_seed).integers(0, num_classes, num)
        feature_path = folder / f"{split}_{dim}.npy"
        make_clustered_features(feature_path, num, dim, labels, centres, noise / np.sqrt(dim), np_dtype,
                                split_seed + 100)
        np.save(folder / f"{split}_{dim}_labels.npy", labels)
        paths[split] = str(feature_path)
        paths[f"{split}_labels"] = str(folder / f"{split}_{dim}_labels.npy")
    return paths


# --------------------------------------------------------------------------- one measurement (worker)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """Peak of the process' anonymous resident memory (heap, tensors: not the memmapped file's
    pages, which the kernel can drop), sampled every few milliseconds on a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))


def one_shot_search(train: np.ndarray, test: np.ndarray, k: int, backend: str,
                    query_chunk_size: int = 1024) -> tuple[Any, Any]:
    """The references: all train features in memory, normalised, searched at once (``faiss-flat``:
    one ``IndexFlatIP``; ``torch-oneshot``: ``query_chunk_size`` queries × all train per matmul)."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    if backend == "faiss-flat":
        import faiss  # noqa: PLC0415

        xb, xq = np.array(train, dtype=np.float32), np.array(test, dtype=np.float32)
        faiss.normalize_L2(xb)
        faiss.normalize_L2(xq)
        index = faiss.IndexFlatIP(xb.shape[1])
        index.add(xb)
        sims, idx = index.search(xq, k)
        return torch.from_numpy(sims), torch.from_numpy(idx)
    xb = F.normalize(torch.from_numpy(np.array(train, dtype=np.float32)), dim=-1)  # N × D
    xq = F.normalize(torch.from_numpy(np.array(test, dtype=np.float32)), dim=-1)  # M × D
    blocks = [(xq[q0:q0 + query_chunk_size] @ xb.T).topk(k, dim=-1) for q0 in range(0, len(xq), query_chunk_size)]
    return torch.cat([b.values for b in blocks]), torch.cat([b.indices for b in blocks])


def measure(paths: dict[str, str], backend: str, k: int, temperature: float, num_classes: int,
            threads: int, neighbours_out: Optional[str] = None) -> dict[str, Any]:
    """Time one k-NN evaluation (search + vote) on memmapped features; memory as deltas from
    the moment the features are opened (so imports and the interpreter do not count)."""
    import torch  # noqa: PLC0415 (imported here: the parent process stays light)

    from dino_sparo.evaluation.knn_search import knn_search, knn_vote, topk_accuracy  # noqa: PLC0415

    torch.set_num_threads(threads)
    if backend.startswith("faiss"):
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every build it tries
        import faiss  # noqa: PLC0415

        faiss.omp_set_num_threads(threads)
    train = np.load(paths["train"], mmap_mode="r")
    test = np.load(paths["test"], mmap_mode="r")
    y_train = torch.from_numpy(np.load(paths["train_labels"]))
    y_test = torch.from_numpy(np.load(paths["test_labels"]))
    anon0, hwm0 = _status_kb("RssAnon"), _status_kb("VmHWM")
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with AnonPeak() as peak:
        if backend in ONE_SHOT:
            sims, idx = one_shot_search(train, test, k, backend)
        else:
            sims, idx = knn_search(train, test, k, backend=backend, device="cpu")
        scores = knn_vote(sims, y_train[idx], num_classes, temperature)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime  # all threads
    accuracy = topk_accuracy(scores, y_test, (1, 5))
    if neighbours_out is not None:
        np.save(neighbours_out, idx.numpy())
    return {
        "backend": backend, "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
        "peak_anon_mb": round((peak.peak_kb - anon0) / 1024, 1),
        "peak_rss_mb": round((_status_kb("VmHWM") - hwm0) / 1024, 1),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "top1": accuracy["top1"], "top5": accuracy["top5"],
        "feature_bytes_mb": round((train.nbytes + test.nbytes) / 2**20, 1),
    }


# --------------------------------------------------------------------------- the bench (parent)


def _run_worker(paths: dict[str, str], backend: str, dim: int, k: int, temperature: float, num_classes: int,
                threads: int, neighbours_out: Optional[str]) -> dict[str, Any]:
    """One measurement in a fresh process; a backend that cannot run here (e.g. faiss-gpu without a
    GPU, faiss without faiss) gives ``{"error": its last line}`` instead of stopping the bench."""
    spec = json.dumps({"paths": paths, "backend": backend, "k": k, "temperature": temperature,
                       "num_classes": num_classes, "threads": threads, "neighbours_out": neighbours_out})
    proc = subprocess.run([sys.executable, "-m", "dino_sparo.evaluation.bench_knn", spec],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()] or [f"exit {proc.returncode}"]
        return {"error": lines[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rows_of_dim(dim: int, dim_dtype: str, runs: dict[str, list[dict[str, Any]]], neighbours: dict[str, np.ndarray],
                 num_train: int, num_test: int, k: int) -> list[dict[str, Any]]:
    """One row per backend: the measured ones with their figures, the others with their error."""
    rows, measured = [], [b for b, r in runs.items() if "error" not in r[0]]
    reference = measured[0] if measured else None
    for backend, results in runs.items():
        row: dict[str, Any] = {"dim": dim, "dtype": dim_dtype, "num_train": num_train, "num_test": num_test, "k": k,
                               "backend": backend, "one_shot": backend in ONE_SHOT}
        if "error" in results[0]:
            rows.append({**row, "error": results[0]["error"]})
            continue
        times = [r["seconds"] for r in results]
        row.update({**results[0], "seconds": min(times), "seconds_median": float(np.median(times)),
                    "seconds_all": times,
                    "cpu_seconds_median": float(np.median([r["cpu_seconds"] for r in results]))})
        del row["cpu_seconds"]
        row["same_neighbours_as_" + reference] = float((neighbours[backend] == neighbours[reference]).mean())
        rows.append(row)
    for key, ratio in (("seconds_median", "vs_one_shot"), ("cpu_seconds_median", "cpu_vs_one_shot")):
        fastest = min((r[key] for r in rows if r["one_shot"] and "error" not in r), default=None)
        for row in rows:
            if "error" not in row:
                row[ratio] = round(row[key] / fastest, 3) if fastest else None
    return rows


def run_bench(dims: list[int], backends: list[str], num_train: int, num_test: int, num_classes: int,
              k: int, temperature: float, dtype: str, noise: float, threads: int, seed: int,
              folder: Optional[str] = None, repeats: int = 1) -> list[dict[str, Any]]:
    """Every (dim, backend) pair ``repeats`` times, each in its own process, the backends taking
    turns; one row per pair: the fastest and the median wall time, the median CPU time (all
    threads), their ratios to the fastest one-shot reference's medians, memory of the first run.
    A backend that cannot run here keeps its row, with ``error`` saying why; the others are measured."""
    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_knn_", dir=folder) as tmp:
        for dim in dims:
            dim_dtype = dtype if dtype != "auto" else ("fp16" if dim >= 1024 else "fp32")
            t0 = time.perf_counter()
            paths = prepare(Path(tmp), num_train, num_test, dim, num_classes, dim_dtype, noise, seed)
            print(f"D={dim}: features written ({dim_dtype}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
            neighbours = {}
            for repeat in range(repeats):
                for backend in backends:
                    if runs[backend] and "error" in runs[backend][0]:
                        continue  # not available here: tried once
                    out = os.path.join(tmp, f"neighbours_{dim}_{backend}.npy")
                    result = _run_worker(paths, backend, dim, k, temperature, num_classes, threads,
                                         out if repeat == 0 else None)
                    runs[backend].append(result)
                    if "error" in result:
                        print(f"D={dim} {backend}: not measured: {result['error']}", file=sys.stderr)
                        continue
                    if repeat == 0:
                        neighbours[backend] = np.load(out)
                    print(f"D={dim} {backend} (run {repeat + 1}/{repeats}): {result['seconds']} s", file=sys.stderr)
            rows.extend(_rows_of_dim(dim, dim_dtype, runs, neighbours, num_train, num_test, k))
            for name in os.listdir(tmp):  # free the disk before the next dimension
                os.remove(os.path.join(tmp, name))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'D':>5} {'dtype':>5} {'backend':>13} {'bounded':>7} {'fastest s':>9} {'median s':>8} " \
           f"{'÷ one-shot':>10} {'CPU s':>6} {'÷ one-shot':>10} {'peak anon MB':>12} {'peak RSS MB':>11} " \
           f"{'top-1':>6} {'same nbrs':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['dim']:>5} {r['dtype']:>5} {r['backend']:>13}   not measured: {r['error']}")
            continue
        same = next(v for key, v in r.items() if key.startswith("same_neighbours_as_"))
        ratios = [f"{r[key]:.2f}" if r.get(key) is not None else "-" for key in ("vs_one_shot", "cpu_vs_one_shot")]
        lines.append(f"{r['dim']:>5} {r['dtype']:>5} {r['backend']:>13} {'no' if r['one_shot'] else 'yes':>7} "
                     f"{r['seconds']:>9.2f} {r['seconds_median']:>8.2f} {ratios[0]:>10} "
                     f"{r['cpu_seconds_median']:>6.1f} {ratios[1]:>10} {r['peak_anon_mb']:>12.0f} "
                     f"{r['peak_rss_mb']:>11.0f} {100 * r['top1']:>5.1f}% {same:>9.4f}")
    return "\n".join(lines)


if __name__ == "__main__":  # one measurement in a fresh process: python -m dino_sparo.evaluation.bench_knn SPEC
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
