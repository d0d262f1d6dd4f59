"""DataLoader worker processes that leave the stop signals to the main process, and that are always
shut down when their loop ends, by an error too.

Loader workers ignore SIGINT, SIGTERM and SIGUSR2 so that a signal sent to the whole process group
(Ctrl-C, SLURM) reaches the training loop, which finishes its step and saves. The other side of
that: multiprocessing's exit handler stops leftover workers with SIGTERM and then waits for them,
forever when they ignore it. A worker's error (a corrupt image) re-raised in the main process keeps
its iterator, and so its workers, alive until exit; :class:`LoaderWorkers` shuts them down first.
"""

from __future__ import annotations

import signal
from typing import Any, Iterable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


def leave_stop_signals_to_main_process(worker_id: int) -> None:
    """``worker_init_fn``: the worker ignores :data:`STOP_SIGNALS`; the main process stops it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class LoaderWorkers:
    """``with LoaderWorkers() as workers: for batch in workers.iterate(loader): ...`` shuts down the
    worker processes of every loader iterated in the block when the block exits, however it exits."""

    def __init__(self) -> None:
        self._iterators: list[Iterator] = []

    def __enter__(self) -> "LoaderWorkers":
        return self

    def iterate(self, loader: Iterable) -> Iterator:
        iterator = iter(loader)
        self._iterators.append(iterator)
        return iterator

    def close(self) -> None:
        while self._iterators:
            shutdown = getattr(self._iterators.pop(), "_shutdown_workers", None)  # multi-process iterators
            if shutdown is not None:
                shutdown()  # idempotent; joins the workers, which leave their loop when told to

    def __exit__(self, *exc: Any) -> None:
        self.close()
