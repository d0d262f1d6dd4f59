"""``dino-sparo-linear``: linear-probe accuracy of a checkpoint's frozen features (or a baseline's).

Two data modes. Default: features are extracted once (eval transform, cached like k-NN's) and the
heads train on them; fast, and what runs on a CPU. ``--augment``: DINO's full protocol, every
step forwards a RandomResizedCrop + flip batch through the frozen backbone (held-out and test
accuracy still use the cached eval-transform features). See ``evaluation.linear`` for the heads,
the learning-rate sweep and the selection on held-out train rows.

Library entry points: :func:`evaluate_linear` (a backbone and two datasets, in-process) and
:func:`linear_from_checkpoint`; both return a JSON-ready dict (``result["test_top1"]``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset
from torchvision import transforms

from dino_sparo import distributed
from dino_sparo.evaluation.frozen_features import FeatureSpec, feature_fn, resolve_spec, slot_layout
from dino_sparo.evaluation.knn import as_label_tensor
from dino_sparo.evaluation.linear import (
    DEFAULT_LRS,
    SWEEP_LRS,
    feature_scale,
    linear_probe,
    slot_block_fn,
    train_probe,
)
from dino_sparo.evaluation.slots import stratified_split
from dino_sparo.evaluation.sources import (
    FeatureWorkspace,
    HelpFormatter,
    _broadcast,
    add_source_arguments,
    cache_dir_from_args,
    data_from_args,
    eval_normalization,
    extract_splits,
    frozen,
    is_grayscale,
    labelled_result,
    load_source,
    num_classes_of,
    open_for_evaluation,
    parse_float_list,
    setup_process,
    slots_from_args,
    write_json,
)

logger = logging.getLogger(__name__)


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB")


def probe_train_transform(dataset: str, image_size: int, scale: tuple[float, float] = (0.08, 1.0),
                          cfg: Optional[Any] = None) -> Any:
    """DINO's linear-probe training view: RandomResizedCrop + horizontal flip, then normalise as the
    evaluation transform does (a CLIP run's own mean and std; grayscale images become three equal
    channels)."""
    mean, std, grayscale = eval_normalization(cfg, dataset)
    steps: list[Any] = [transforms.Grayscale(num_output_channels=3) if grayscale else transforms.Lambda(_to_rgb)]
    steps += [
        transforms.RandomResizedCrop(image_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ]
    return transforms.Compose(steps)


def _augmented_batches(
    backbone: nn.Module, spec: FeatureSpec, dataset: Dataset, fit_rows: np.ndarray, batch_size: int,
    num_workers: int, block_fn: Any, scale: float, device: torch.device, seed: int, progress: bool,
) -> tuple[Any, int]:
    """A function epoch -> batches of (scaled features, labels) from freshly augmented images."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    subset = Subset(dataset, fit_rows.tolist())
    world = distributed.get_world_size()
    per_rank = max(1, batch_size // world)
    if distributed.is_dist():
        sampler: Any = DistributedSampler(subset, shuffle=True, seed=seed)
    else:
        sampler = RandomSampler(subset, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(subset, batch_size=per_rank, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    fn = feature_fn(backbone, spec)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        for images, labels in tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                                   disable=not (progress and distributed.is_main_process())):
            with torch.no_grad():
                feats = fn(images.to(device, non_blocking=True)).float()
                if block_fn is not None:
                    feats = block_fn(feats)
            yield feats * scale, torch.as_tensor(labels)

    return batches, len(loader)


def evaluate_linear(
    backbone: Optional[nn.Module],
    train_dataset: Dataset,
    test_dataset: Dataset,
    *,
    features: str | FeatureSpec = "auto",
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = (0.0,),
    epochs: int = 100,
    batch_size: int = 1024,
    val_fraction: Optional[float] = None,
    slots: Optional[Sequence[int]] = None,
    augment: bool = False,
    augment_dataset: Optional[Dataset] = None,
    seed: int = 0,
    extract_batch_size: int = 256,
    num_workers: int = 0,
    device: Optional[str | torch.device] = None,
    fp16_features: bool = False,
    cache_dir: Optional[str | Path] = None,
    num_classes: Optional[int] = None,
    save_head: Optional[str | Path] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Linear-probe accuracy of ``backbone``'s frozen features (``None``: raw pixels).

    ``features="auto"``: the SPARO embedding for SPARO models, DINO's last-blocks class tokens for
    class-token models (``frozen_features.dino_linear_spec``). ``batch_size`` is the global probe
    batch (the base lrs are scaled by batch / 256). With ``augment``, ``augment_dataset`` is the
    train split with a training transform, row for row the same images as ``train_dataset``.
    ``save_head`` writes the chosen classifier with what is needed to apply it. The backbone is
    moved to ``device`` and keeps its train/eval mode. Under ``torch.distributed`` every rank
    calls this and returns rank 0's result.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = features if isinstance(features, FeatureSpec) else resolve_spec(
        features, backbone, grayscale=is_grayscale(train_dataset))
    layout = slot_layout(backbone, spec)
    block_fn = slot_block_fn(slots, layout)
    if augment and (backbone is None or augment_dataset is None):
        raise ValueError("--augment needs a network and the train split with the training transform")
    if augment and len(augment_dataset) != len(train_dataset):
        raise ValueError(f"the augmented train split has {len(augment_dataset)} images, the train split "
                         f"{len(train_dataset)}: they must be the same images")
    if num_classes is None:
        num_classes = num_classes_of(train_dataset)
    n_heads = len(lrs) * len(weight_decays)
    if val_fraction is None:
        val_fraction = 0.1 if n_heads > 1 else 0.0

    t0 = time.perf_counter()
    with FeatureWorkspace(cache_dir) as workspace, frozen(backbone, dev):
        stores, hits = extract_splits(workspace, backbone, spec, {"train": train_dataset, "test": test_dataset},
                                      fp16_features, extract_batch_size, num_workers, dev, progress)
        t_features = time.perf_counter() - t0
        train, test = stores["train"], stores["test"]
        probe = None
        if not augment:
            if distributed.is_main_process():
                probe = linear_probe(train.features, train.labels, test.features, test.labels, num_classes,
                                     lrs=lrs, weight_decays=weight_decays, epochs=epochs, batch_size=batch_size,
                                     val_fraction=val_fraction, block_fn=block_fn, seed=seed, device=dev,
                                     progress=progress)
        else:
            y_train = as_label_tensor(train.labels, len(train), "train_labels")
            if val_fraction > 0:
                fit_rows, val_rows = stratified_split(train.labels, val_fraction, seed)
                val = (train.features, y_train, val_rows)
            else:
                fit_rows, val = np.arange(len(train)), None
            scale = feature_scale(train.features, block_fn, seed=seed)
            dim = int(block_fn(torch.zeros(1, train.dim)).shape[1]) if block_fn is not None else train.dim
            batches, steps = _augmented_batches(backbone, spec, augment_dataset, fit_rows, batch_size, num_workers,
                                                block_fn, scale, dev, seed, progress)
            test_set = (test.features, as_label_tensor(test.labels, len(test)))
            probe = train_probe(batches, steps, dim, num_classes, test_set,
                                val, lrs, weight_decays, epochs, batch_size, scale=scale, block_fn=block_fn, seed=seed,
                                device=dev, progress=progress, num_fit=int(fit_rows.size), across_ranks=True)
        result = None
        if distributed.is_main_process():
            result = {
                "features": spec.describe(), "feature_spec": spec.to_dict(), "feature_dim": train.dim,
                "slots": [int(s) for s in slots] if slots is not None else None,
                "mode": "augment" if augment else "cached features", "epochs": epochs, "batch_size": batch_size,
                "lrs": [float(v) for v in lrs], "weight_decays": [float(v) for v in weight_decays],
                "lr_scaling": f"lr × {batch_size}/256", "val_fraction": val_fraction, "num_classes": num_classes,
                **probe.to_dict(), "cache_hit": hits,
                "cache_dir": str(cache_dir) if cache_dir is not None else None,
                "seconds": {"features": round(t_features, 3), "probe": round(time.perf_counter() - t0 - t_features, 3)},
            }
            if save_head is not None:
                result["head_path"] = str(_save_head(save_head, probe, spec, slots, num_classes))
        result = _broadcast(result)
    return result


def _save_head(path: str | Path, probe: Any, spec: FeatureSpec, slots: Optional[Sequence[int]],
               num_classes: int) -> Path:
    from dino_sparo.checkpoint import save_checkpoint  # noqa: PLC0415

    path = Path(path)
    save_checkpoint({
        "state_dict": probe.classifier.state_dict(),  # nn.Linear(D, C), applied to feature_scale · features
        "feature_scale": probe.feature_scale,
        "feature_spec": spec.to_dict(),
        "slots": [int(s) for s in slots] if slots is not None else None,
        "num_classes": num_classes,
        "lr": probe.lrs[probe.selected],
        "weight_decay": probe.weight_decays[probe.selected],
        "epoch": probe.selected_epoch,
    }, path)
    return path


# --------------------------------------------------------------------------- from a checkpoint


def linear_from_checkpoint(
    checkpoint: Optional[str | Path] = None,
    *,
    checkpoint_key: str = "auto",
    baseline: Optional[str] = None,
    config: Optional[str | Path] = None,
    dataset: Optional[str] = None,
    data_path: Optional[str] = None,
    train_path: Optional[str] = None,
    test_path: Optional[str] = None,
    train_limit: Optional[int] = None,
    test_limit: Optional[int] = None,
    image_size: Optional[int] = None,
    resize_ratio: Optional[float] = None,
    cache_dir: Optional[str | Path] = "auto",
    device: Optional[str | torch.device] = None,
    augment: bool = False,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    **options: Any,
) -> dict[str, Any]:
    """:func:`evaluate_linear` on a checkpoint's network (or ``baseline``) and its dataset;
    ``cache_dir="auto"`` caches beside the checkpoint. ``options`` go to :func:`evaluate_linear`."""
    args, dev, source, data = open_for_evaluation(
        checkpoint, checkpoint_key, baseline, config, dataset=dataset, data_path=data_path, train_limit=train_limit,
        test_limit=test_limit, image_size=image_size, resize_ratio=resize_ratio, cache_dir=cache_dir, device=device,
        train_path=train_path, test_path=test_path)
    augment_dataset = _augment_split(args, source, data, crop_scale) if augment else None
    result = evaluate_linear(source.backbone, data.train, data.test, augment=augment, augment_dataset=augment_dataset,
                             cache_dir=cache_dir_from_args(args), device=dev, **options)
    return labelled_result(result, args, source, data)


def _augment_split(args: argparse.Namespace, source: Any, data: Any, crop_scale: tuple[float, float]) -> Dataset:
    """The train split again, with the probe's training transform (same images, same order)."""
    transform = probe_train_transform(data.dataset, data.info["image_size"], crop_scale, source.cfg)
    return data_from_args(args, source, transform=transform).train


def format_linear_table(result: dict[str, Any]) -> str:
    """Per-head accuracies and the chosen head, as aligned text (percent)."""
    slots = f", slots {result['slots']}" if result.get("slots") else ""
    lines = [f"linear probe on {result['features']}{slots} ({result.get('source', 'model')}), "
             f"{result['num_fit']} fit / {result['num_val']} held-out train / {result['num_test']} test, "
             f"{result['epochs']} epochs, {result['mode']}"]
    lines.append(f"{'lr':>10} {'wd':>8} {'epoch':>6} {'held-out':>9} {'top-1':>7} {'top-5':>7}")
    chosen = result["selected"]["head"]
    for i, head in enumerate(result["heads"]):
        val = f"{100 * head['val_top1']:9.2f}" if head["val_top1"] is not None else f"{'-':>9}"
        mark = "  <- chosen on held-out train" if i == chosen and len(result["heads"]) > 1 else ""
        lines.append(f"{head['lr']:>10.3g} {head['weight_decay']:>8.3g} {head['epoch']:>6} {val} "
                     f"{100 * head['test_top1']:7.2f} {100 * head['test_top5']:7.2f}{mark}")
    best = result["test_best_over_epochs"]
    lines.append(f"test top-1 {100 * result['test_top1']:.2f}, top-5 {100 * result['test_top5']:.2f} "
                 f"(max over epochs of test top-1, DINO v1's optimistic report: {100 * best['top1']:.2f} "
                 f"at epoch {best['epoch']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dino-sparo-linear",
        description="Linear-probe accuracy of a checkpoint's frozen features: a grid of linear classifiers "
                    "trained at once, chosen on held-out train images, reported on test. Prints a table, "
                    "writes JSON.",
        epilog="Examples:\n"
               "  dino-sparo-linear --checkpoint output/demo_fashion_mnist/checkpoint.pth\n"
               "  dino-sparo-linear --checkpoint CKPT --lrs sweep --epochs 50 --output-json linear.json\n"
               "  dino-sparo-linear --checkpoint CKPT --slots-file knn.json   # slots chosen by dino-sparo-knn\n"
               "  dino-sparo-linear --baseline pixels --dataset fashion_mnist --lrs 0.001,0.01,0.1\n"
               "  torchrun --nproc_per_node 8 -m dino_sparo.evaluation.linear_cli --checkpoint CKPT "
               "--dataset imagefolder --data-path /data/imagenet --augment",
        formatter_class=HelpFormatter,
    )
    add_source_arguments(parser)
    lin = parser.add_argument_group("linear probe")
    lin.add_argument("--features", default="auto", choices=["auto", "embedding", "last_blocks", "pixels"],
                     help="auto: the SPARO embedding for SPARO models, DINO's protocol for class-token models "
                          "(class tokens of the last 4 blocks for ViT-S and smaller, last block + average-pooled "
                          "patch tokens for ViT-B and wider)")
    lin.add_argument("--n-last-blocks", type=int, help="with last_blocks features: how many class tokens")
    lin.add_argument("--avgpool", action=argparse.BooleanOptionalAction, default=None,
                     help="with last_blocks features: append the mean of the last block's patch tokens")
    lin.add_argument("--lrs", default=",".join(str(v) for v in DEFAULT_LRS),
                     help="base learning rates, comma-separated, one head each (scaled by batch/256); "
                          "'sweep' is DINOv2's grid of 13 from 1e-5 to 0.1")
    lin.add_argument("--weight-decays", default="0", help="weight decays, comma-separated (DINO: 0)")
    lin.add_argument("--epochs", type=int, default=100, help="passes over the train split (DINO: 100)")
    lin.add_argument("--probe-batch-size", type=int, default=1024,
                     help="global batch of the probe (DINO: 1024); the lr is scaled by it / 256")
    lin.add_argument("--val-fraction", type=float,
                     help="train images held out to choose lr / wd / epoch (default 0.1 with several heads; "
                          "0 with one: train on all, report the last epoch)")
    lin.add_argument("--augment", action="store_true",
                     help="train on RandomResizedCrop + flip views through the frozen network each step "
                          "(DINO's full protocol; slow) instead of cached features")
    lin.add_argument("--crop-scale", default="0.08,1.0", help="RandomResizedCrop scale range with --augment")
    lin.add_argument("--slots", help="SPARO models: probe only these slots, e.g. 0,5,17 (renormalised)")
    lin.add_argument("--slots-file", help="slot ids from a file: a list, or the JSON dino-sparo-knn writes")
    lin.add_argument("--seed", type=int, default=0, help="held-out split, head init and batch order")
    lin.add_argument("--save-head", help="save the chosen classifier here (.pth)")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``main`` does with parsed options; returns the result (on every rank)."""
    device = setup_process(args.device)
    lrs = list(SWEEP_LRS) if args.lrs.strip() == "sweep" else parse_float_list(args.lrs, "--lrs")
    wds = parse_float_list(args.weight_decays, "--weight-decays")
    crop_scale = parse_float_list(args.crop_scale, "--crop-scale")
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"--crop-scale must be two numbers 0 < low <= high <= 1, got {args.crop_scale!r}")
    slots = slots_from_args(args)
    if args.epochs < 1 or args.probe_batch_size < 1:
        raise ValueError(f"--epochs and --probe-batch-size must be >= 1, got {args.epochs}, {args.probe_batch_size}")
    source = load_source(args.checkpoint, args.checkpoint_key, args.baseline, args.config, device)
    data = data_from_args(args, source)
    spec = resolve_spec(args.features, source.backbone, grayscale=data.grayscale,
                        n_last_blocks=args.n_last_blocks, avgpool=args.avgpool)
    augment_dataset = _augment_split(args, source, data, tuple(crop_scale)) if args.augment else None
    result = evaluate_linear(
        source.backbone, data.train, data.test, features=spec, lrs=lrs, weight_decays=wds, epochs=args.epochs,
        batch_size=args.probe_batch_size, val_fraction=args.val_fraction, slots=slots, augment=args.augment,
        augment_dataset=augment_dataset, seed=args.seed, extract_batch_size=args.batch_size,
        num_workers=args.num_workers, device=device, fp16_features=args.fp16_features,
        cache_dir=cache_dir_from_args(args), num_classes=data.num_classes, save_head=args.save_head,
        progress=not args.quiet,
    )
    result = labelled_result(result, args, source, data)
    if distributed.is_main_process():
        print(format_linear_table(result), flush=True)
        if args.output_json:
            logger.info("results written to %s", write_json(args.output_json, result))
    return result


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise SystemExit(f"dino-sparo-linear: error: {exc}") from None
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
