"""SugarCrepe (Hsieh et al., NeurIPS 2023): does a CLIP model prefer an image's own caption to a
hard negative made from it by adding, replacing or swapping an object, attribute or relation?

The rule is that of the benchmark's official ``main_eval.py``: the checkpoint's evaluation
transform, fp32 (no autocast), L2-normalised embeddings; an item is correct when
cos(image, positive) > cos(image, negative) STRICTLY (a tie is wrong); a category's score is its
fraction of correct items. Here each distinct image and each distinct caption is encoded once, in
batches (a benchmark reuses its images), which differs from the official one-item loop only by the
rounding of batched matrix products.

With SPARO (``cont:const``) the cosine of two embeddings is the mean of their L per-slot cosines,
so a slot subset S scores by ``(1/|S|) Σ_{l∈S} cos(x_l, y_l)`` (``slots.select_slot_features``).
Slot subsets are chosen greedily on a seeded part of each category's items and measured only on
the rest, never on the items used to choose.

Command line: ``dino-sparo-sugarcrepe`` (:mod:`dino_sparo.cli.sugarcrepe`); from a checkpoint:
:func:`sugarcrepe_from_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dino_sparo.config import SUGARCREPE_CATEGORIES
from dino_sparo.data.datasets import CorruptImageError
from dino_sparo.data.transforms import clip_eval_transform, to_rgb
from dino_sparo.errors import UsageError
from dino_sparo.evaluation.slots import greedy_forward_selection, select_slot_features
from dino_sparo.evaluation.zeroshot import encode_images, encode_texts, per_slot_cosine
from dino_sparo.models.clip import load_clip_model
from dino_sparo.runtime import resolve_device

logger = logging.getLogger(__name__)

CATEGORIES = SUGARCREPE_CATEGORIES
GROUPS = {"ADD": ("add_att", "add_obj"), "REPLACE": ("replace_att", "replace_obj", "replace_rel"),
          "SWAP": ("swap_att", "swap_obj")}
FIELDS = ("filename", "caption", "negative_caption")  # what every entry of a category's JSON file holds
SELECTION_SCOPES = ("category", "all")

Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # image, positive, negative: N × E each


@dataclass
class SugarCrepeItem:
    """One image with its caption and the caption's hard negative."""

    image: str | Image.Image  # a path, or an image already in memory (synthetic benchmarks)
    caption: str  # the positive
    negative: str  # the hard negative
    key: str = ""  # the item's key in its JSON file ("0", "1", ...)


# --------------------------------------------------------------------------- the data


def _read_category(path: Path, images_dir: Path, missing: list[tuple[Path, str, Path]]) -> list[SugarCrepeItem]:
    """The items of one category file, in the file's order; items whose image is absent are added
    to ``missing`` so that one error can count them all."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(entries, dict) or not entries:
        raise UsageError(f"{path}: expected a non-empty JSON object of items keyed \"0\", \"1\", ..., "
                         f"got {'an empty object' if entries == {} else 'a JSON ' + type(entries).__name__}")
    items, seen = [], {}
    for key, entry in entries.items():  # keys may have gaps: the file's order is the order
        for field in FIELDS:
            if not isinstance(entry, dict) or not isinstance(entry.get(field), str):
                raise UsageError(f"{path}, item {key!r}: no text field {field!r}")
        image = images_dir / entry["filename"]
        if image not in seen:
            seen[image] = image.is_file()
        if not seen[image]:
            missing.append((path, key, image))
        items.append(SugarCrepeItem(str(image), entry["caption"], entry["negative_caption"], str(key)))
    return items


def load_benchmark(data_dir: str | os.PathLike, images_dir: str | os.PathLike,
                   categories: Sequence[str] = CATEGORIES) -> dict[str, list[SugarCrepeItem]]:
    """The items of every category in ``categories`` whose ``DATA_DIR/<category>.json`` exists (at
    least one must); images are ``images_dir / filename`` (COCO val2017 for the real benchmark).
    Every image is checked before anything is encoded, so a missing one costs no model time."""
    data_dir, images_dir = Path(data_dir), Path(images_dir)
    if isinstance(categories, str):  # "add_att,swap_obj"
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise UsageError(f"unknown SugarCrepe categories {unknown or '(none given)'}; "
                         f"choose among {', '.join(CATEGORIES)}")
    for folder, what in ((data_dir, "SugarCrepe JSON folder"), (images_dir, "image folder")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} not found: {folder}")
    benchmark: dict[str, list[SugarCrepeItem]] = {}
    missing: list[tuple[Path, str, Path]] = []
    for category in dict.fromkeys(categories):  # in the order asked, once each
        path = data_dir / f"{category}.json"
        if path.is_file():
            benchmark[category] = _read_category(path, images_dir, missing)
    if not benchmark:
        raise FileNotFoundError(f"no SugarCrepe JSON file in {data_dir}: expected one or more of "
                                + ", ".join(f"{c}.json" for c in categories))
    if missing:
        path, key, image = missing[0]
        others = {0: "", 1: "; 1 other item's image is missing too"}.get(
            len(missing) - 1, f"; {len(missing) - 1} other items' images are missing too")
        raise FileNotFoundError(f"{path}, item {key!r}: image not found: {image}{others}")
    absent = [c for c in categories if c not in benchmark]
    logger.info("SugarCrepe: found %s; not found: %s",
                ", ".join(f"{c} ({len(items)} items)" for c, items in benchmark.items()), ", ".join(absent) or "none")
    return benchmark


class _Images(Dataset):
    """Distinct images of a benchmark through the evaluation transform, each with its index."""

    def __init__(self, images: Sequence[str | Image.Image], transform: Callable) -> None:
        self.images, self.transform = list(images), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if not isinstance(image, Image.Image):
            try:
                with Image.open(image) as opened:
                    image = to_rgb(opened)
            except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError...
                raise CorruptImageError(f"corrupt or unreadable image {image}: {type(exc).__name__}: {exc}") from exc
        return self.transform(image), index


def _image_key(image: str | os.PathLike | Image.Image) -> tuple[str, Any]:
    """Paths are the same image when their text is; images in memory when they are the same object."""
    return ("path", os.fspath(image)) if isinstance(image, (str, os.PathLike)) else ("object", id(image))


@torch.no_grad()
def encode_benchmark(model: Any, tokenizer: Callable, benchmark: dict[str, list[SugarCrepeItem]], transform: Callable,
                     batch_size: int = 256, num_workers: int = 0, device: torch.device | str = "cpu",
                     progress: bool = False) -> dict[str, Features]:
    """Per category, the unit-norm fp32 embeddings (CPU) of each item's image, positive and negative;
    each distinct image and caption is encoded once."""
    from tqdm import tqdm  # noqa: PLC0415

    device = resolve_device(device)
    images: dict[tuple[str, Any], int] = {}  # image key -> row of the image features
    distinct: list[str | Image.Image] = []
    texts: dict[str, int] = {}  # caption -> row of the text features
    for items in benchmark.values():
        for item in items:
            if _image_key(item.image) not in images:
                images[_image_key(item.image)] = len(distinct)
                distinct.append(item.image)
            texts.setdefault(item.caption, len(texts))
            texts.setdefault(item.negative, len(texts))
    loader = DataLoader(_Images(distinct, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    text_list = list(texts)
    with torch.autocast(device.type, enabled=False):  # fp32, as the official rule
        image_features, _ = encode_images(model, loader, device, progress)
        starts = tqdm(range(0, len(text_list), batch_size), disable=not progress, desc="captions", unit="batch")
        text_features = torch.cat([encode_texts(model, tokenizer, text_list[start:start + batch_size], device,
                                                batch_size) for start in starts])
    logger.info("SugarCrepe: encoded %d distinct images and %d distinct captions", len(distinct), len(text_list))
    out = {}
    for category, items in benchmark.items():
        rows = torch.tensor([images[_image_key(item.image)] for item in items])
        positive = torch.tensor([texts[item.caption] for item in items])
        negative = torch.tensor([texts[item.negative] for item in items])
        out[category] = (image_features[rows], text_features[positive], text_features[negative])
    return out


# --------------------------------------------------------------------------- the rule and its summaries


def correct_items(image_features: torch.Tensor, positive_features: torch.Tensor, negative_features: torch.Tensor
                  ) -> torch.Tensor:
    """``N`` booleans: the official rule, cos(image, positive) > cos(image, negative) strictly (a tie
    is wrong), in float32, from unit-norm ``N × E`` embeddings."""
    if not (image_features.dim() == 2 and image_features.shape == positive_features.shape == negative_features.shape):
        raise ValueError(f"correct_items needs three N × E tensors of one shape, got {tuple(image_features.shape)}, "
                         f"{tuple(positive_features.shape)} and {tuple(negative_features.shape)}")
    image = image_features.float()
    positive = (image * positive_features.float()).sum(dim=-1)  # N
    negative = (image * negative_features.float()).sum(dim=-1)  # N
    return positive > negative


def group_means(accuracies: dict[str, float]) -> dict[str, float]:
    """ADD / REPLACE / SWAP: the mean accuracy of the group's categories present (as the paper
    reports them); a group with none present is left out."""
    out = {}
    for group, members in GROUPS.items():
        present = [accuracies[c] for c in members if c in accuracies]
        if present:
            out[group] = sum(present) / len(present)
    return out


def summarize(correct: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-category accuracy and item count, the micro-average over all items, the group means."""
    per_category = {c: {"accuracy": int(ok.sum()) / len(ok), "num_items": len(ok)} for c, ok in correct.items()}
    total = sum(len(ok) for ok in correct.values())
    return {"per_category": per_category,
            "micro_average": sum(int(ok.sum()) for ok in correct.values()) / total,
            "groups": group_means({c: v["accuracy"] for c, v in per_category.items()}),
            "num_items": total}


# --------------------------------------------------------------------------- slots


def _subset(features: Features, num_slots: int, slot_dim: int, slots: Sequence[int]) -> Features:
    return tuple(select_slot_features(x, num_slots, slot_dim, slots) for x in features)  # type: ignore[return-value]


def per_slot_accuracy(features: dict[str, Features], num_slots: int, slot_dim: int) -> dict[str, list[float]]:
    """The accuracy of each slot used alone (its renormalised sub-vectors under the same rule), per
    category and over all items (``micro``)."""
    correct = {c: torch.stack([correct_items(*_subset(f, num_slots, slot_dim, [s])) for s in range(num_slots)])
               for c, f in features.items()}  # L × N per category
    correct = {"micro": torch.cat(list(correct.values()), dim=1), **correct}  # L × all items
    return {c: [count / ok.shape[1] for count in ok.sum(dim=1).tolist()] for c, ok in correct.items()}


def selection_split(category: str, num_items: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions (sorted) of a category's items that choose slots and of those that measure them;
    drawn by a ``torch.Generator`` seeded from ``seed`` and the category's name, so one category's
    split does not depend on which others are evaluated."""
    if num_items < 2:
        raise UsageError(f"SugarCrepe category {category!r} has {num_items} item(s): slot selection needs at least 2 "
                         "to split into selection and evaluation items")
    num_selection = min(max(1, round(fraction * num_items)), num_items - 1)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{category}".encode()))
    order = torch.randperm(num_items, generator=generator)
    return sorted(order[:num_selection].tolist()), sorted(order[num_selection:].tolist())


def greedy_sugarcrepe_slots(positive: torch.Tensor, negative: torch.Tensor, max_slots: Optional[int] = None
                            ) -> tuple[list[int], list[float], list[float]]:
    """Greedy forward selection of the slots that most raise SugarCrepe accuracy on THESE
    (selection) items, from their per-slot cosines ``N × L`` with the positive and the negative.
    A subset's cosine is the mean of its slots' (the same |S| on both sides, so sums compare alike)."""
    num_items, num_slots = positive.shape

    def accuracies(selected: list[int], remaining: list[int]) -> list[float]:
        base_positive = positive[:, selected].sum(dim=1) if selected else torch.zeros(num_items)
        base_negative = negative[:, selected].sum(dim=1) if selected else torch.zeros(num_items)
        return [int(((base_positive + positive[:, s]) > (base_negative + negative[:, s])).sum()) / num_items
                for s in remaining]

    return greedy_forward_selection(accuracies, num_slots, max_slots)


def slot_selection(features: dict[str, Features], num_slots: int, slot_dim: int, *, fraction: float = 0.5,
                   scope: str = "category", seed: int = 0, max_slots: Optional[int] = None) -> dict[str, Any]:
    """Slots chosen on each category's selection items (``scope="category"``) or on all of them
    pooled (``"all"``), then measured, with all slots for reference, on the evaluation items only."""
    splits = {c: selection_split(c, len(f[0]), fraction, seed) for c, f in features.items()}
    cosines = {c: (per_slot_cosine(i, p, num_slots, slot_dim), per_slot_cosine(i, n, num_slots, slot_dim))
               for c, (i, p, n) in features.items()}  # N × L each
    shared = None
    if scope == "all":
        shared = greedy_sugarcrepe_slots(torch.cat([cosines[c][0][splits[c][0]] for c in features]),
                                         torch.cat([cosines[c][1][splits[c][0]] for c in features]), max_slots)
    per_category, correct_selected, correct_all = {}, {}, {}
    for category, (image, positive, negative) in features.items():
        chosen, measured = splits[category]
        pos, neg = cosines[category]
        selected, curve, _ = shared if shared is not None else greedy_sugarcrepe_slots(pos[chosen], neg[chosen],
                                                                                       max_slots)
        evaluation = (image[measured], positive[measured], negative[measured])
        correct_selected[category] = correct_items(*_subset(evaluation, num_slots, slot_dim, selected))
        correct_all[category] = correct_items(*evaluation)
        per_category[category] = {
            "selected": selected, "curve": curve,
            "accuracy_selected": int(correct_selected[category].sum()) / len(measured),
            "accuracy_all": int(correct_all[category].sum()) / len(measured),
            "num_selection": len(chosen), "num_evaluation": len(measured),
            "selection_items": chosen, "evaluation_items": measured}
        logger.info("SugarCrepe %s: %d slots %s chosen on %d items; on %d others %.4f (all slots %.4f)", category,
                    len(selected), selected, len(chosen), len(measured), per_category[category]["accuracy_selected"],
                    per_category[category]["accuracy_all"])
    with_selected, with_all = summarize(correct_selected), summarize(correct_all)
    return {"scope": scope, "fraction": fraction, "seed": seed, "per_category": per_category,
            "micro_selected": with_selected["micro_average"], "micro_all": with_all["micro_average"],
            "groups_selected": with_selected["groups"], "groups_all": with_all["groups"]}


# --------------------------------------------------------------------------- the protocol


def _check_options(model: Any, benchmark: dict[str, list[SugarCrepeItem]], slots_asked: bool, selection_fraction: float,
                   selection_scope: str, max_slots: Optional[int], batch_size: int, num_workers: int
                   ) -> Optional[tuple[int, int]]:
    """The model's slot layout, once every option is known to make sense (before any encoding)."""
    if not benchmark or any(not items for items in benchmark.values()):
        raise UsageError(f"the SugarCrepe benchmark needs at least one category with items, got "
                         f"{ {c: len(items) for c, items in benchmark.items()} }")
    if batch_size < 1 or num_workers < 0:
        raise UsageError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    layout = model.slot_layout() if hasattr(model, "slot_layout") else None
    if slots_asked and layout is None:
        raise UsageError("per-slot accuracy and slot selection need a model with SPARO read-outs on both towers; "
                         "this one has none")
    if not 0.0 < selection_fraction < 1.0:
        raise UsageError(f"selection_fraction must lie in (0, 1), got {selection_fraction}")
    if selection_scope not in SELECTION_SCOPES:
        raise UsageError(f"selection_scope must be one of {SELECTION_SCOPES}, got {selection_scope!r}")
    if max_slots is not None and layout is not None and not 1 <= max_slots <= layout[0]:
        raise UsageError(f"max_slots must lie in [1, {layout[0]}] (the model's slots), got {max_slots}")
    return layout


def evaluate(model: Any, tokenizer: Callable, benchmark: dict[str, list[SugarCrepeItem]], transform: Callable, *,
             per_slot: bool = False, select_slots: bool = False, selection_fraction: float = 0.5,
             selection_scope: str = "category", seed: int = 0, max_slots: Optional[int] = None, batch_size: int = 256,
             num_workers: int = 0, device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Any]:
    """SugarCrepe accuracy of a CLIP model per category, micro-averaged and per group, as one
    JSON-ready dict; with a SPARO model also its slot layout, and when asked each slot's accuracy
    alone (``per_slot``) and greedily chosen slot subsets (``select_slots``)."""
    layout = _check_options(model, benchmark, per_slot or select_slots, selection_fraction, selection_scope,
                            max_slots, batch_size, num_workers)
    features = encode_benchmark(model, tokenizer, benchmark, transform, batch_size, num_workers, device, progress)
    result: dict[str, Any] = {"categories_found": list(benchmark),
                              "categories_missing": [c for c in CATEGORIES if c not in benchmark],
                              **summarize({c: correct_items(*f) for c, f in features.items()})}
    if layout is not None:
        result["slot_layout"] = list(layout)
    if per_slot:
        result["per_slot"] = per_slot_accuracy(features, *layout)
    if select_slots:
        result["slot_selection"] = slot_selection(features, *layout, fraction=selection_fraction,
                                                  scope=selection_scope, seed=seed, max_slots=max_slots)
    return result


def sugarcrepe_from_checkpoint(
    checkpoint: str | Path, data_dir: str | os.PathLike, images_dir: str | os.PathLike, *,
    categories: Sequence[str] = CATEGORIES, per_slot: bool = False, select_slots: bool = False,
    selection_fraction: float = 0.5, selection_scope: str = "category", seed: int = 0, max_slots: Optional[int] = None,
    batch_size: int = 256, num_workers: int = 2, device: torch.device | str = "auto", progress: bool = True,
) -> dict[str, Any]:
    """:func:`evaluate` on a CLIP-mode checkpoint with its own evaluation transform; the data are
    read and every image checked first, so a mistake there costs no model loading."""
    benchmark = load_benchmark(data_dir, images_dir, categories)
    device = resolve_device(device, key="--device")
    try:
        model, cfg, tokenizer = load_clip_model(checkpoint, device)
    except RuntimeError as exc:  # a state dict that does not fit the config, an unreadable file
        raise UsageError(str(exc)) from None
    transform = clip_eval_transform(cfg.model.img_size, cfg.clip.image_mean, cfg.clip.image_std)
    result = evaluate(model, tokenizer, benchmark, transform, per_slot=per_slot, select_slots=select_slots,
                      selection_fraction=selection_fraction, selection_scope=selection_scope, seed=seed,
                      max_slots=max_slots, batch_size=batch_size, num_workers=num_workers, device=device,
                      progress=progress)
    result["checkpoint"] = str(checkpoint)
    return result


# --------------------------------------------------------------------------- the table


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as text: the first column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]).rstrip()
            for row in rows]


def format_table(result: dict[str, Any]) -> str:
    """Plain-text summary of :func:`evaluate`'s result: one row per category, the micro-average and
    the groups; then, when present, each category's best and worst slot and the slot selection."""
    rows = [("SugarCrepe", "items", "accuracy")]
    rows += [(c, str(v["num_items"]), _percent(v["accuracy"])) for c, v in result["per_category"].items()]
    rows.append(("micro-average", str(result["num_items"]), _percent(result["micro_average"])))
    rows += [(group, "", _percent(value)) for group, value in result["groups"].items()]
    lines = _columns(rows)
    if "per_slot" in result:
        rows = [("one slot alone", "best slot", "worst slot")]
        for name, accuracy in result["per_slot"].items():
            best = max(range(len(accuracy)), key=accuracy.__getitem__)  # the first maximum
            worst = min(range(len(accuracy)), key=accuracy.__getitem__)
            rows.append((name, f"{best}: {_percent(accuracy[best])}", f"{worst}: {_percent(accuracy[worst])}"))
        lines += [""] + _columns(rows)
    if "slot_selection" in result:
        s = result["slot_selection"]
        lines += ["", f"slot selection (scope {s['scope']}, seed {s['seed']}): slots chosen greedily on a "
                      f"{s['fraction']:g} share of the items, measured on the others"]
        rows = [("category", "items: choose / measure", "selected slots", "selected", "all slots")]
        for c, v in s["per_category"].items():
            slots = f"{len(v['selected'])} {v['selected'][:8]}" + ("…" if len(v["selected"]) > 8 else "")
            rows.append((c, f"{v['num_selection']} / {v['num_evaluation']}", slots,
                         _percent(v["accuracy_selected"]), _percent(v["accuracy_all"])))
        rows.append(("micro-average", "", "", _percent(s["micro_selected"]), _percent(s["micro_all"])))
        rows += [(g, "", "", _percent(s["groups_selected"][g]), _percent(s["groups_all"][g]))
                 for g in s["groups_selected"]]
        lines += _columns(rows)
    return "\n".join(lines)
