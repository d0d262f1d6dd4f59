"""The one way from a checkpoint (or a baseline) to an evaluation's result, for every protocol:
the command-line programs, the demo and the study all come through :func:`evaluate_inputs`.

>>> evaluate_checkpoint("knn", "output/run/checkpoint.pth", train_limit=10000, ks=(20,))
>>> evaluate_checkpoint("linear", baseline="pixels", dataset="fashion_mnist", epochs=10)

Keyword options that are :class:`~dino_sparo.evaluation.inputs.EvalRequest` fields choose the
network and data; the rest go to the protocol (:func:`~dino_sparo.evaluation.knn.evaluate_knn`,
:func:`~dino_sparo.evaluation.linear.evaluate_linear`) as its option objects (:func:`protocol_options`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from dino_sparo.data.transforms import probe_train_transform
from dino_sparo.errors import UsageError
from dino_sparo.evaluation.inputs import EvalInputs, EvalRequest, data_for, labelled_result, open_request
from dino_sparo.evaluation.knn import evaluate_knn
from dino_sparo.evaluation.linear import ProbeOptions, evaluate_linear
from dino_sparo.evaluation.options import Extraction, SlotAnalysis, split_options

PROTOCOLS = ("knn", "linear")


def evaluate_checkpoint(protocol: str, checkpoint: Optional[str | os.PathLike] = None, **options: Any) -> dict[str, Any]:
    """``protocol`` ("knn" or "linear") on a checkpoint's network (or ``baseline="init"|"pixels"``)
    and its dataset; features are cached beside the checkpoint unless ``cache_dir`` says otherwise."""
    request, protocol_options = EvalRequest.split_options({"checkpoint": checkpoint, **options})
    return evaluate_inputs(protocol, open_request(request), **protocol_options)


def protocol_options(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """Flat keyword options (as the programs, the demo and the study give them) as the protocol's
    arguments: :class:`Extraction`, :class:`SlotAnalysis` / :class:`ProbeOptions` and its own numbers.
    For the linear probe ``batch_size`` is the probe's batch and ``extract_batch_size`` the extraction's."""
    options = dict(options)
    if protocol == "linear":
        extract_batch = options.pop("extract_batch_size", None)
        probe, options = split_options(ProbeOptions, options)
        if extract_batch is not None:
            options["batch_size"] = extract_batch
    extraction, options = split_options(Extraction, options)
    if protocol == "knn":
        slots, options = split_options(SlotAnalysis, options)
        return {"extraction": extraction, "slots": slots, **options}
    return {"extraction": extraction, "probe": probe, **options}


def evaluate_inputs(protocol: str, inputs: EvalInputs, **options: Any) -> dict[str, Any]:
    """``protocol`` on an opened request, the result headed by what was evaluated; ``options`` as
    :func:`protocol_options` reads them. For the linear probe, ``augment=True`` trains on views of
    the train split with ``crop_scale`` (default DINO's)."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"evaluation protocol must be one of {PROTOCOLS}, got {protocol!r}")
    data = inputs.data
    arguments = protocol_options(protocol, options)
    arguments["extraction"] = dataclasses.replace(arguments["extraction"], device=inputs.device,
                                                  cache_dir=inputs.request.cache_path())
    if protocol == "knn":
        result = evaluate_knn(inputs.source.backbone, data.train, data.test, num_classes=data.num_classes,
                              **arguments)
    else:
        crop_scale = tuple(arguments.pop("crop_scale", (0.08, 1.0)))
        if arguments.pop("augment", False):
            arguments["augment_dataset"] = augmented_train_split(inputs, crop_scale)
        result = evaluate_linear(inputs.source.backbone, data.train, data.test, num_classes=data.num_classes,
                                 **arguments)
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
