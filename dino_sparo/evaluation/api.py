"""The one way from a checkpoint (or a baseline) to an evaluation's result, for every protocol:
the command-line programs, the demo and the study all come through :func:`evaluate_inputs`.

>>> evaluate_checkpoint("knn", "output/run/checkpoint.pth", train_limit=10000, ks=(20,))
>>> evaluate_checkpoint("linear", baseline="pixels", dataset="fashion_mnist", epochs=10)

Keyword options that are :class:`~dino_sparo.evaluation.inputs.EvalRequest` fields choose the
network and data; the rest go to the protocol (:func:`~dino_sparo.evaluation.knn.evaluate_knn`,
:func:`~dino_sparo.evaluation.linear.evaluate_linear`).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from dino_sparo.data.transforms import probe_train_transform
from dino_sparo.evaluation.inputs import EvalInputs, EvalRequest, data_for, labelled_result, open_request
from dino_sparo.evaluation.knn import evaluate_knn
from dino_sparo.evaluation.linear import evaluate_linear

PROTOCOLS = ("knn", "linear")


def evaluate_checkpoint(protocol: str, checkpoint: Optional[str | os.PathLike] = None, **options: Any) -> dict[str, Any]:
    """``protocol`` ("knn" or "linear") on a checkpoint's network (or ``baseline="init"|"pixels"``)
    and its dataset; features are cached beside the checkpoint unless ``cache_dir`` says otherwise."""
    request, protocol_options = EvalRequest.split_options({"checkpoint": checkpoint, **options})
    return evaluate_inputs(protocol, open_request(request), **protocol_options)


def evaluate_inputs(protocol: str, inputs: EvalInputs, **options: Any) -> dict[str, Any]:
    """``protocol`` on an opened request, the result headed by what was evaluated. For the linear
    probe, ``augment=True`` trains on views of the train split with ``crop_scale`` (default DINO's)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluation protocol must be one of {PROTOCOLS}, got {protocol!r}")
    data = inputs.data
    common = dict(cache_dir=inputs.request.cache_path(), device=inputs.device, num_classes=data.num_classes)
    if protocol == "knn":
        result = evaluate_knn(inputs.source.backbone, data.train, data.test, **common, **options)
    else:
        crop_scale = tuple(options.pop("crop_scale", (0.08, 1.0)))
        if options.get("augment"):
            options["augment_dataset"] = augmented_train_split(inputs, crop_scale)
        result = evaluate_linear(inputs.source.backbone, data.train, data.test, **common, **options)
    return labelled_result(result, inputs)


def augmented_train_split(inputs: EvalInputs, crop_scale: tuple[float, float]) -> Any:
    """The train split again, with the probe's training transform (same images, same order)."""
    transform = probe_train_transform(inputs.data.dataset, inputs.data.info["image_size"], crop_scale,
                                      inputs.source.cfg)
    return data_for(inputs.request, inputs.source, transform=transform).train


def knn_from_checkpoint(checkpoint: Optional[str | os.PathLike] = None, **options: Any) -> dict[str, Any]:
    """``evaluate_checkpoint("knn", ...)``."""
    return evaluate_checkpoint("knn", checkpoint, **options)


def linear_from_checkpoint(checkpoint: Optional[str | os.PathLike] = None, **options: Any) -> dict[str, Any]:
    """``evaluate_checkpoint("linear", ...)``."""
    return evaluate_checkpoint("linear", checkpoint, **options)
