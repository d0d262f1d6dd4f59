"""Evaluations run when a training epoch ends (k-NN, CLIP's zero-shot), behind one protocol so the
loop runs whatever a method lists (:meth:`dino_sparo.methods.base.Method.epoch_end_hooks`) without
knowing what each measures."""

from __future__ import annotations

import logging
from typing import Callable, Protocol

from dino_sparo import distributed
from dino_sparo.evaluation.periodic_knn import PeriodicKnn

logger = logging.getLogger("dino_sparo")


class EpochEndHook(Protocol):
    """Asked after every epoch, on every rank; the metrics of a due one go into log.jsonl."""

    def due(self, epochs_done: int) -> bool: ...

    def evaluate(self) -> dict[str, float]: ...


class LoggedKnn:
    """k-NN during training (``eval.knn_every``), its accuracy also written to train.log."""

    def __init__(self, knn: PeriodicKnn) -> None:
        self.knn, self.epochs_done = knn, 0

    def due(self, epochs_done: int) -> bool:
        self.epochs_done = epochs_done
        return self.knn.due(epochs_done)

    def evaluate(self) -> dict[str, float]:
        metrics = self.knn.evaluate()
        if distributed.is_main_process():
            logger.info("after %d epoch(s): k-NN (k=%d) top-1 %.2f%%, top-5 %.2f%%", self.epochs_done,
                        self.knn.cfg.knn_k, 100 * metrics["knn_top1"], 100 * metrics["knn_top5"])
        return metrics


class EveryNEpochs:
    """``measure(epochs_done)`` every ``every`` epochs (0: never); e.g. CLIP's zero-shot accuracy."""

    def __init__(self, every: int, measure: Callable[[int], dict[str, float]]) -> None:
        self.every, self.measure, self.epochs_done = every, measure, 0

    def due(self, epochs_done: int) -> bool:
        self.epochs_done = epochs_done
        return bool(self.every) and epochs_done % self.every == 0

    def evaluate(self) -> dict[str, float]:
        return self.measure(self.epochs_done)
