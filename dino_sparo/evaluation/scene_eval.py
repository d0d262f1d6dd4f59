"""Everything a CLIP model can be measured by on the scene world, in one call.

Zero-shot on one-object scenes (shape, colour, colour + shape), image↔text retrieval where every
pair with the same caption text counts as a hit, SugarCrepe-style accuracy per hard-negative kind
on the in-distribution test split and on the held-out-combination split (through the SugarCrepe
protocol of :mod:`dino_sparo.evaluation.sugarcrepe`), and for SPARO models how the slots'
attention lines up with the objects. A bag-of-words text-only baseline says how far the captions
alone go.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dino_sparo.data.scenes import (KINDS, ZEROSHOT_TASKS, SceneCaptions, SceneImages, SceneWorld, benchmark,
                                    zeroshot_prompts)
from dino_sparo.errors import UsageError
from dino_sparo.evaluation import sugarcrepe
from dino_sparo.evaluation.slot_objects import patch_coverage, slot_object_alignment
from dino_sparo.evaluation.zeroshot import encode_images, encode_tokens, evaluate, retrieval_recall

logger = logging.getLogger(__name__)


def load_scene_run(checkpoint: str | Path, device: Any = "cpu", with_initial: bool = False) -> dict[str, Any]:
    """A CLIP run on the scene world, ready to measure: ``model``, ``cfg``, ``tokenizer``, its
    ``world`` and evaluation ``transform``, and with ``with_initial`` the same seed's model at
    initialisation (``initial``; the training program seeds the same way before it builds the model)."""
    from dino_sparo.data.scenes import world_of  # noqa: PLC0415
    from dino_sparo.data.transforms import clip_eval_transform  # noqa: PLC0415
    from dino_sparo.models.clip import build_clip_model, load_clip_model  # noqa: PLC0415
    from dino_sparo.runtime import seed_everything  # noqa: PLC0415

    model, cfg, tokenizer = load_clip_model(checkpoint, device)
    if cfg.clip.dataset != "scenes":
        raise UsageError(f"checkpoint {checkpoint} was trained on clip.dataset={cfg.clip.dataset!r}, not scenes")
    run = {"model": model, "cfg": cfg, "tokenizer": tokenizer, "world": world_of(cfg.data.scenes),
           "transform": clip_eval_transform(cfg.model.img_size, cfg.clip.image_mean, cfg.clip.image_std)}
    if with_initial:
        seed_everything(cfg.seed)
        run["initial"] = build_clip_model(cfg).to(device).eval()
    return run


def scene_benchmark(world: SceneWorld, split: str, count: int, kinds: Sequence[str] = KINDS
                    ) -> dict[str, list[sugarcrepe.SugarCrepeItem]]:
    """``count`` items per kind as the SugarCrepe protocol takes them, images in memory."""
    items = benchmark(world, split, count, kinds)
    return {kind: [sugarcrepe.SugarCrepeItem(world.image(world.scene(split, index)), positive, negative,
                                             key=str(index))
                   for index, positive, negative in rows] for kind, rows in items.items()}


def zeroshot_tasks(model: Any, tokenizer: Any, world: SceneWorld, transform: Any, count: int,
                   device: Any, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Zero-shot top-1/top-5 on ``count`` one-object test scenes for each label set."""
    s = world.settings
    result = {}
    for task in ZEROSHOT_TASKS:
        test_set = SceneImages(world, "test", transform, label=task, single=True, limit=count)
        names, templates = zeroshot_prompts(task, s.shapes, s.colours)
        z = evaluate(model, tokenizer, test_set=test_set, classnames=names, templates=templates,
                     batch_size=batch_size, device=device)["zeroshot"]
        result[task] = {"top1": z["top1"], "top5": z["top5"], "num_classes": z["num_classes"],
                        "chance": 1.0 / z["num_classes"], "num_images": z["num_images"]}
    return result


def scene_retrieval(model: Any, tokenizer: Any, world: SceneWorld, transform: Any, count: int, device: Any,
                    batch_size: int = 256) -> dict[str, Any]:
    """Image↔text R@1/5/10 over ``count`` test scenes and their canonical captions; pairs with the
    same caption text form one group (a hit for each other)."""
    pairs = SceneCaptions(world, "test", transform, tokenizer, paraphrase=False)
    subset = torch.utils.data.Subset(pairs, range(min(count, len(pairs))))
    images, tokens = encode_images(model, DataLoader(subset, batch_size=batch_size), device)
    texts = encode_tokens(model, tokens, device, batch_size)
    groups = torch.unique(tokens, dim=0, return_inverse=True)[1]
    return {**retrieval_recall(images, texts, groups=groups), "num_pairs": len(images),
            "num_distinct_captions": int(groups.max()) + 1}


@torch.no_grad()
def scene_slot_objects(model: Any, world: SceneWorld, transform: Any, count: int, device: Any) -> dict[str, Any]:
    """Slot–object alignment (:func:`slot_object_alignment`) of the image SPARO on ``count`` test scenes."""
    visual = model.visual
    k_max = world.settings.objects[1] + world.settings.distractors[1]
    images, masks, counts = [], [], []
    for index in range(count):
        scene = world.scene("test", index)
        picture, object_masks = world.render(scene)
        padded = np.zeros((k_max, *object_masks.shape[1:]), dtype=bool)
        padded[:len(object_masks)] = object_masks
        images.append(transform(Image.fromarray(picture)))
        masks.append(torch.from_numpy(padded))
        counts.append(len(object_masks))
    attn = []
    for start in range(0, count, 256):
        batch = torch.stack(images[start:start + 256]).to(device)
        _, weights = visual.readout(visual.forward_tokens(batch), return_attn=True)
        attn.append(visual.class_and_patch_attention(weights.float())[0].cpu())  # registers left out
    coverage = patch_coverage(torch.stack(masks), visual.patch_size)
    return slot_object_alignment(torch.cat(attn), coverage, torch.tensor(counts))


def evaluate_scenes(model: Any, tokenizer: Any, world: SceneWorld, transform: Any, *, count: int = 1000,
                    splits: Sequence[str] = ("test", "heldout"), per_slot: bool = False, select_slots: bool = False,
                    selection_fraction: float = 0.5, seed: int = 0, device: Any = "cpu", batch_size: int = 256,
                    progress: bool = False) -> dict[str, Any]:
    """The whole measurement of a CLIP model on the scene world (fp32, unit-norm embeddings)."""
    model.eval()
    result: dict[str, Any] = {"world": repr(world), "count": count}
    logger.info("scene world: zero-shot on one-object scenes")
    result["zeroshot"] = zeroshot_tasks(model, tokenizer, world, transform, count, device, batch_size)
    logger.info("scene world: retrieval on %d test scenes", count)
    result["retrieval"] = scene_retrieval(model, tokenizer, world, transform, count, device, batch_size)
    result["sugarcrepe"] = {}
    for split in splits:
        if split == "heldout" and not world.heldout:
            continue
        logger.info("scene world: SugarCrepe-style items of the %s split (%d per kind)", split, count)
        items = scene_benchmark(world, split, count)
        result["sugarcrepe"][split] = sugarcrepe.evaluate(
            model, tokenizer, items, transform, per_slot=per_slot, select_slots=select_slots,
            selection_fraction=selection_fraction, seed=seed, batch_size=batch_size, device=device,
            progress=progress)
    if getattr(model.visual, "sparo", None) is not None:
        result["slot_objects"] = scene_slot_objects(model, world, transform, min(count, 1000), device)
    return result


# ----------------------------------------------------------------------------- text only


def _bag_of_words(captions: Sequence[str], vocabulary: dict[str, int]) -> torch.Tensor:
    rows = torch.zeros(len(captions), len(vocabulary))
    for i, caption in enumerate(captions):
        for word, n in Counter(caption.replace(",", " ").replace(".", " ").split()).items():
            if word in vocabulary:
                rows[i, vocabulary[word]] = n
    return rows


def bag_of_words_baseline(fit: dict[str, list[tuple[Any, str, str]]], score: dict[str, list[tuple[Any, str, str]]],
                          l2: float = 1e-3) -> dict[str, float]:
    """A blind text model per kind: logistic regression on word counts, fitted to tell the
    positives of ``fit`` from their negatives, then scored on ``score`` by the SugarCrepe rule
    (positive above negative; a tie counts half, as a blind guess). Items: ``(_, positive, negative)``.
    Near 0.5 for every kind means no caption-only shortcut."""
    result = {}
    for kind, rows in fit.items():
        if kind not in score or not rows:
            continue
        words = sorted({w for _, p, n in rows for w in (p + " " + n).replace(",", " ").replace(".", " ").split()})
        vocabulary = {w: i for i, w in enumerate(words)}
        x = torch.cat([_bag_of_words([p for _, p, _ in rows], vocabulary),
                       _bag_of_words([n for _, _, n in rows], vocabulary)])
        y = torch.cat([torch.ones(len(rows)), torch.zeros(len(rows))])
        weight = torch.zeros(len(vocabulary) + 1, requires_grad=True)
        optimiser = torch.optim.LBFGS([weight], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            logits = x @ weight[:-1] + weight[-1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * weight[:-1].pow(2).sum()
            loss.backward()
            return loss

        optimiser.step(closure)
        with torch.no_grad():
            sp = _bag_of_words([p for _, p, _ in score[kind]], vocabulary) @ weight[:-1]
            sn = _bag_of_words([n for _, _, n in score[kind]], vocabulary) @ weight[:-1]
            result[kind] = float(((sp > sn).float() + 0.5 * (sp == sn).float()).mean())
    return result


def text_only_baseline(world: SceneWorld, count: int, splits: Sequence[str] = ("test", "heldout")
                       ) -> dict[str, dict[str, float]]:
    """:func:`bag_of_words_baseline` fitted on ``count`` train-split items per kind, scored on each split."""
    fit = benchmark(world, "train", count)
    return {split: bag_of_words_baseline(fit, benchmark(world, split, count))
            for split in splits if split != "heldout" or world.heldout}


def format_scene_table(results: dict[str, dict[str, Any]], baseline: Optional[dict[str, dict[str, float]]] = None
                       ) -> str:
    """The scene evaluation as text, one column per result (``{"trained": ..., "at init": ...}``):
    zero-shot, retrieval, SugarCrepe-style accuracy per split (and the text-only baseline), slots."""
    names = list(results)
    first = results[names[0]]
    col = max(12, *(len(n) + 2 for n in names))
    lines = [first["world"], "", f"{'zero-shot top-1 (one-object test scenes)':<42}"
             + "".join(f"{n:>{col}}" for n in names) + f"{'chance':>9}"]
    for task, z in first["zeroshot"].items():
        lines.append(f"  {task:<40}" + "".join(f"{100 * results[n]['zeroshot'][task]['top1']:>{col - 1}.2f}%"
                                              for n in names) + f"{100 * z['chance']:>8.2f}%")
    r = first["retrieval"]
    lines += ["", f"retrieval over {r['num_pairs']} test scenes ({r['num_distinct_captions']} distinct captions; "
                  "the same caption counts as a hit)"]
    for direction in ("image_to_text", "text_to_image"):
        pairs = [f"{100 * results[n]['retrieval'][direction + '_R@1']:.1f} / "
                 f"{100 * results[n]['retrieval'][direction + '_R@5']:.1f}" for n in names]
        lines.append(f"  {direction.replace('_to_', '→') + ' R@1 / R@5':<40}" + "".join(f"{p:>{col}}" for p in pairs))
    splits = list(first["sugarcrepe"])
    columns = [(n, sp) for sp in splits for n in names]
    if splits:
        labels = [f"{n}, {sp}" for n, sp in columns] + [f"text-only, {sp}" for sp in splits if baseline and sp in baseline]
        width = max(14, *(len(label) + 2 for label in labels))
        lines += ["", f"{'SugarCrepe-style (chance 50%)':<30}" + "".join(f"{label:>{width}}" for label in labels)]
        for kind in KINDS:
            row = f"  {kind:<28}"
            for n, sp in columns:
                cat = results[n]["sugarcrepe"][sp]["per_category"].get(kind)
                row += f"{100 * cat['accuracy']:>{width - 1}.2f}%" if cat else f"{'-':>{width}}"
            for sp in splits:
                if baseline and sp in baseline:
                    value = baseline[sp].get(kind)
                    row += f"{100 * value:>{width - 1}.2f}%" if value is not None else f"{'-':>{width}}"
            lines.append(row)
        lines.append(f"  {'micro-average':<28}" + "".join(
            f"{100 * results[n]['sugarcrepe'][sp]['micro_average']:>{width - 1}.2f}%" for n, sp in columns))
        for n, sp in columns:
            selection = results[n]["sugarcrepe"][sp].get("slot_selection")
            if selection:
                lines.append(f"  {n}, {sp}: selected slots (chosen on half the items, scored on the others) "
                             f"{100 * selection['micro_selected']:.2f}% vs all slots {100 * selection['micro_all']:.2f}%")
    for n in names:
        o = results[n].get("slot_objects")
        if o:
            lines += ["", f"slots against objects, {n} ({o['num_images']} test scenes; even attention in brackets)",
                      f"  attention share on a slot's best object: mean {100 * o['mean_best_object_share']:.1f}%, "
                      f"best slot {100 * o['max_best_object_share']:.1f}% ({100 * o['uniform_best_object_share']:.1f}%);"
                      f" on background {100 * o['mean_background_share']:.1f}% "
                      f"({100 * o['uniform_background_share']:.1f}%)",
                      f"  ARI of the argmax-slot partition of patches {o['ari']:.3f}, foreground ARI "
                      f"{o['foreground_ari']:.3f}"]
    return "\n".join(lines)
