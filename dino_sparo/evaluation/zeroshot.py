"""Zero-shot evaluation of CLIP-mode models: classification from class names and prompt templates,
image↔text retrieval recall@k, per-slot image–text alignment, and zero-shot with a slot subset.

A class embedding is the mean of the class' normalised text embeddings over the templates,
renormalised (CLIP's prompt ensembling). With SPARO embeddings (``cont:const``) the cosine of two
embeddings is the mean of their L per-slot cosines, so a slot subset S scores
``(1/|S|) Σ_{l∈S} cos(x_l, y_l)`` (``slots.select_slot_features``). The subset is chosen greedily
on data held out from the test set (a part of the train split); the test set only measures it.

Command line: ``dino-sparo-zeroshot`` (:mod:`dino_sparo.cli.zeroshot`); from a checkpoint:
:func:`zeroshot_from_checkpoint`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from dino_sparo.config import DataConfig
from dino_sparo.data.captions import CaptionTable, clip_labelled_data
from dino_sparo.data.datasets import build_dataset
from dino_sparo.data.transforms import clip_eval_transform
from dino_sparo.errors import UsageError
from dino_sparo.evaluation.options import Extraction
from dino_sparo.evaluation.slots import greedy_forward_selection, select_slot_features
from dino_sparo.models.clip import load_clip_model
from dino_sparo.runtime import resolve_device

logger = logging.getLogger(__name__)

SIMPLE_TEMPLATES = ["a photo of a {}."]


# --------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_images(model: Any, loader: Any, device: torch.device | str = "cpu", progress: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image embeddings ``N × E`` (float32, CPU) and the second item of each batch
    (labels, or caption tokens) in dataset order."""
    from tqdm import tqdm  # noqa: PLC0415

    features, seconds = [], []
    model.eval()
    for images, second in tqdm(loader, disable=not progress, desc="images", unit="batch"):
        features.append(model.encode_image(images.to(device)).float().cpu())
        seconds.append(second if isinstance(second, torch.Tensor) else torch.as_tensor(second))
    return torch.cat(features), torch.cat(seconds)


@torch.no_grad()
def encode_texts(model: Any, tokenizer: Callable, texts: Sequence[str], device: torch.device | str = "cpu",
                 batch_size: int = 256) -> torch.Tensor:
    """Unit-norm text embeddings ``N × E`` (float32, CPU)."""
    model.eval()
    out = [model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device)).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def encode_tokens(model: Any, tokens: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 256
                  ) -> torch.Tensor:
    model.eval()
    return torch.cat([model.encode_text(tokens[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(tokens), batch_size)])


def class_embeddings(model: Any, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str],
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """``C × E``: per class, the mean of its normalised template embeddings, renormalised."""
    if not templates or any("{}" not in t for t in templates):
        raise UsageError(f"prompt templates must each hold '{{}}' for the class name, got {list(templates)[:3]}")
    texts = [t.format(name) for name in classnames for t in templates]
    embeddings = encode_texts(model, tokenizer, texts, device).view(len(classnames), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)  # C × E


# --------------------------------------------------------------------------- metrics


def zeroshot_accuracy(image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor,
                      topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (fractions) of classifying each image by its most similar class embedding."""
    scores = image_features.float() @ class_features.float().T  # N × C
    result = {}
    for k in topk:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=-1).indices == labels[:, None]).any(dim=-1)
        result[f"top{k}"] = int(hit.sum()) / len(hit)
    return result


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     chunk_size: int = 4096, groups: Optional[torch.Tensor] = None,
                     image_of_text: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Recall@k for image→text and text→image retrieval over N matching pairs (row i ↔ row i), or
    over I images and T captions with ``image_of_text`` (``T`` indices into the images: several
    captions per image, as COCO and Flickr have five).

    A query counts at k when a candidate of its own group ranks among the k most similar ones,
    i.e. fewer than k candidates of other groups score at least as high as its best (ties counted
    against it). With ``image_of_text`` an image's group is its captions (a hit: any of them) and a
    caption's is its image. For pairs, ``groups`` (``N`` ids, e.g. one per distinct caption text)
    makes every pair with the same caption a hit, as a finite world repeats captions; by default
    each pair is its own group."""
    if image_of_text is not None:
        image_labels = torch.arange(len(image_features))
        text_labels = torch.as_tensor(image_of_text)
        if len(text_labels) != len(text_features) or len(text_labels) and int(text_labels.max()) >= len(image_features):
            raise ValueError(f"image_of_text must give each of the {len(text_features)} captions one of the "
                             f"{len(image_features)} images")
    else:
        if image_features.shape != text_features.shape:
            raise ValueError(f"retrieval needs paired features of one shape, got {tuple(image_features.shape)} "
                             f"and {tuple(text_features.shape)}")
        image_labels = text_labels = torch.arange(len(image_features)) if groups is None else torch.as_tensor(groups)
    result: dict[str, float] = {}
    for name, queries, query_labels, candidates, candidate_labels in (
            ("image_to_text", image_features, image_labels, text_features, text_labels),
            ("text_to_image", text_features, text_labels, image_features, image_labels)):
        ranks = []
        for start in range(0, len(queries), chunk_size):
            sims = queries[start:start + chunk_size].float() @ candidates.float().T  # q × candidates
            same = query_labels[start:start + sims.shape[0], None] == candidate_labels[None, :]  # q × candidates
            best = sims.masked_fill(~same, float("-inf")).max(dim=-1, keepdim=True).values
            ranks.append(((sims >= best) & ~same).sum(dim=-1))  # other groups' candidates at least as high
        rank = torch.cat(ranks)
        for k in ks:
            result[f"{name}_R@{k}"] = int((rank < k).sum()) / len(rank)
    return result


def per_slot_cosine(a: torch.Tensor, b: torch.Tensor, num_slots: int, slot_dim: int) -> torch.Tensor:
    """``N × L``: cosine of each slot of ``a`` with the same slot of ``b`` (row by row)."""
    a = F.normalize(a.float().view(a.shape[0], num_slots, slot_dim), dim=-1)
    b = F.normalize(b.float().view(b.shape[0], num_slots, slot_dim), dim=-1)
    return (a * b).sum(dim=-1)


def slot_alignment(image_features: torch.Tensor, text_features: torch.Tensor, num_slots: int, slot_dim: int,
                   seed: int = 0) -> dict[str, list[float]]:
    """Per-slot image–text alignment: the mean per-slot cosine of matching pairs, and of mismatched
    pairs (texts shuffled) as the chance level each slot should beat."""
    matched = per_slot_cosine(image_features, text_features, num_slots, slot_dim).mean(dim=0)
    g = torch.Generator().manual_seed(seed)
    shuffled = text_features[torch.randperm(len(text_features), generator=g)]
    mismatched = per_slot_cosine(image_features, shuffled, num_slots, slot_dim).mean(dim=0)
    return {"matched": matched.tolist(), "mismatched": mismatched.tolist()}


def per_slot_scores(image_features: torch.Tensor, class_features: torch.Tensor, num_slots: int, slot_dim: int
                    ) -> torch.Tensor:
    """``L × N × C``: per-slot cosine of every image with every class embedding."""
    x = F.normalize(image_features.float().view(-1, num_slots, slot_dim), dim=-1).transpose(0, 1)  # L × N × V
    c = F.normalize(class_features.float().view(-1, num_slots, slot_dim), dim=-1).transpose(0, 1)  # L × C × V
    return torch.bmm(x, c.transpose(1, 2))


def zeroshot_subset_accuracy(image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor,
                             num_slots: int, slot_dim: int, slots: Sequence[int]) -> float:
    """Zero-shot top-1 with only ``slots`` (each side renormalised: the mean of their per-slot cosines)."""
    x = select_slot_features(image_features, num_slots, slot_dim, slots)
    c = select_slot_features(class_features, num_slots, slot_dim, slots)
    return zeroshot_accuracy(x, c, labels, topk=(1,))["top1"]


def greedy_zeroshot_slots(image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor,
                          num_slots: int, slot_dim: int, max_slots: Optional[int] = None) -> dict[str, Any]:
    """Greedy forward selection of the slots that most raise zero-shot top-1 on THESE (held-out)
    images: start empty, add the best slot (ties: lowest id) while accuracy rises, up to ``max_slots``.
    Pass selection data only, never the test set."""
    scores = per_slot_scores(image_features, class_features, num_slots, slot_dim)  # L × N × C

    def accuracies(selected: list[int], remaining: list[int]) -> list[float]:
        # the argmax of a mean of per-slot cosines is the argmax of their sum
        summed = scores[selected].sum(dim=0) if selected else torch.zeros_like(scores[0])
        return [float(((summed + scores[s]).argmax(dim=-1) == labels).float().mean()) for s in remaining]

    selected, curve, per_slot = greedy_forward_selection(accuracies, num_slots, max_slots)
    return {"selected": selected, "curve": curve, "per_slot_accuracy": per_slot}


# --------------------------------------------------------------------------- data for the CLI


def load_templates(spec: str, config_templates: Sequence[str], dataset: Optional[str] = None) -> list[str]:
    """``auto`` (``openai`` for an image folder, else ``config``), ``config`` (the templates of
    Fashion-MNIST's synthetic training captions, ``clip.templates``), ``simple``, ``openai`` (CLIP's
    80 ImageNet prompts, from open_clip), or a text file with one template per line."""
    if spec == "auto":
        spec = "openai" if dataset == "imagefolder" else "config"
    if spec == "config":
        return list(config_templates)
    if spec == "simple":
        return list(SIMPLE_TEMPLATES)
    if spec == "openai":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # noqa: PLC0415

        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--templates: not auto/config/simple/openai and no such file: {spec}")
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise UsageError(f"--templates file {spec}: every line must hold '{{}}' for the class name"
                         + (f", e.g. not {bad[0]!r}" if bad else " (the file is empty)"))
    return templates


def load_classnames(spec: Optional[str], dataset_classes: Sequence[str]) -> list[str]:
    """Class names for prompts: the dataset's (lower-cased), ``imagenet`` (open_clip's 1000 names, for
    an ImageNet folder of wnids), or a text file with one name per line in class-index order."""
    if spec is None:
        return [name.lower() for name in dataset_classes]
    if spec == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # noqa: PLC0415

        names = list(IMAGENET_CLASSNAMES)
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--classnames: no such file: {spec}")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != len(dataset_classes):
        raise UsageError(f"--classnames {spec} gives {len(names)} names for a dataset of {len(dataset_classes)} classes")
    return names


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def evaluate(model: Any, tokenizer: Callable, *, test_set: Optional[Dataset] = None,
             classnames: Optional[Sequence[str]] = None, templates: Sequence[str] = SIMPLE_TEMPLATES,
             selection_set: Optional[Dataset] = None, retrieval_set: Optional[Dataset] = None,
             max_slots: Optional[int] = None, batch_size: int = 256, num_workers: int = 0,
             device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Every evaluation that its inputs allow, as one JSON-ready dict.

    ``test_set``/``selection_set`` yield ``(image, label)``; ``retrieval_set`` yields
    ``(image, tokens)`` pairs. Slot results need a SPARO model (``model.slot_layout()``).
    """
    result: dict[str, Any] = {}
    layout = model.slot_layout() if hasattr(model, "slot_layout") else None
    class_features = None
    if test_set is not None:
        if classnames is None:
            raise UsageError("zero-shot classification needs class names")
        class_features = class_embeddings(model, tokenizer, classnames, templates, device)
        images, labels = encode_images(model, _loader(test_set, batch_size, num_workers), device, progress)
        result["zeroshot"] = {**zeroshot_accuracy(images, class_features, labels), "num_images": len(labels),
                              "num_classes": len(classnames), "num_templates": len(templates)}
        if layout is not None:
            num_slots, slot_dim = layout
            result["slot_alignment_classes"] = slot_alignment(images, class_features[labels], num_slots, slot_dim)
            if selection_set is not None:
                sel_images, sel_labels = encode_images(model, _loader(selection_set, batch_size, num_workers),
                                                       device, progress)
                selection = greedy_zeroshot_slots(sel_images, class_features, sel_labels, num_slots, slot_dim,
                                                  max_slots)
                selection["num_selection_images"] = len(sel_labels)
                selection["test_top1_selected"] = zeroshot_subset_accuracy(
                    images, class_features, labels, num_slots, slot_dim, selection["selected"])
                selection["test_top1_all"] = result["zeroshot"]["top1"]
                result["slot_selection"] = selection
    if retrieval_set is not None:
        result.update(_retrieval(model, retrieval_set, layout, batch_size, num_workers, device, progress))
    return result


def _retrieval(model: Any, retrieval_set: Dataset, layout: Any, batch_size: int, num_workers: int,
               device: torch.device | str, progress: bool) -> dict[str, Any]:
    """Recall@k on image–caption pairs; on a caption table that lists an image on several rows
    (COCO, Flickr), each image once against all its captions."""
    ids = retrieval_set.image_ids() if hasattr(retrieval_set, "image_ids") else None
    if ids is not None and int(ids.max()) + 1 < len(ids):
        firsts = np.unique(ids, return_index=True)[1]  # the first row of each image, in image-id order
        images, _ = encode_images(model, _loader(Subset(retrieval_set, firsts.tolist()), batch_size, num_workers),
                                  device, progress)
        tokens = retrieval_set.tokenizer(list(retrieval_set.captions))
        texts = encode_tokens(model, tokens, device, batch_size)
        image_of_text = torch.from_numpy(ids)
        out: dict[str, Any] = {"retrieval": {**retrieval_recall(images, texts, image_of_text=image_of_text),
                                             "num_pairs": len(texts), "num_images": len(images)}}
        paired = images[image_of_text]
    else:
        images, tokens = encode_images(model, _loader(retrieval_set, batch_size, num_workers), device, progress)
        texts = encode_tokens(model, tokens, device, batch_size)
        groups = torch.unique(tokens, dim=0, return_inverse=True)[1]  # pairs with the same caption: one group
        out = {"retrieval": {**retrieval_recall(images, texts, groups=groups), "num_pairs": len(images),
                             "num_images": len(images), "num_distinct_captions": int(groups.max()) + 1}}
        paired = images
    if layout is not None:
        out["slot_alignment_pairs"] = slot_alignment(paired, texts, *layout)
    return out


def format_table(result: dict[str, Any]) -> str:
    """Plain-text summary of ``evaluate``'s result."""
    rows: list[tuple[str, str]] = []
    if "zeroshot" in result:
        z = result["zeroshot"]
        rows += [("zero-shot top-1", f"{100 * z['top1']:.2f}%"), ("zero-shot top-5", f"{100 * z['top5']:.2f}%"),
                 ("  images / classes / templates", f"{z['num_images']} / {z['num_classes']} / {z['num_templates']}")]
    if "retrieval" in result:
        r = result["retrieval"]
        for direction in ("image_to_text", "text_to_image"):
            rows.append((direction.replace("_", " ") + " R@1/5/10",
                         " / ".join(f"{100 * r[f'{direction}_R@{k}']:.2f}" for k in (1, 5, 10))))
        rows.append(("  images / captions", f"{r.get('num_images', r['num_pairs'])} / {r['num_pairs']}"))
    for key, label in (("slot_alignment_classes", "slot alignment (image · class)"),
                       ("slot_alignment_pairs", "slot alignment (image · caption)")):
        if key in result:
            matched, mismatched = np.array(result[key]["matched"]), np.array(result[key]["mismatched"])
            rows.append((label, f"mean {matched.mean():.3f} (mismatched {mismatched.mean():.3f}); "
                                f"best slot {int(matched.argmax())} {matched.max():.3f}, worst {matched.min():.3f}"))
    if "slot_selection" in result:
        s = result["slot_selection"]
        rows += [("selected slots (held-out greedy)", f"{len(s['selected'])}: {s['selected'][:12]}"
                  + ("…" if len(s["selected"]) > 12 else "")),
                 ("test top-1, selected slots", f"{100 * s['test_top1_selected']:.2f}%"),
                 ("test top-1, all slots", f"{100 * s['test_top1_all']:.2f}%")]
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def zeroshot_from_checkpoint(
    checkpoint: str | Path, *, dataset: Optional[str] = None, data_path: Optional[str] = None, split: str = "test",
    limit: Optional[int] = None, classnames: Optional[str] = None, templates: str = "auto",
    slot_selection: bool = False, selection_size: int = 5000, retrieval: Optional[str] = None,
    max_slots: Optional[int] = None, extraction: Optional[Extraction] = None,
) -> dict[str, Any]:
    """:func:`evaluate` on a CLIP-mode checkpoint: zero-shot on ``dataset`` (default: Fashion-MNIST
    when the model was trained on it, else none; ``"none"`` skips it) and retrieval on a caption table.
    ``extraction`` gives the batch size, loader workers, device and progress bars (its feature kind
    and cache do not apply: a CLIP model's embeddings are read directly)."""
    extraction = extraction or Extraction(num_workers=2)
    batch_size, num_workers, progress = extraction.batch_size, extraction.num_workers, extraction.progress
    device = resolve_device(extraction.device or "auto", key="--device")
    try:
        model, cfg, tokenizer = load_clip_model(checkpoint, device)
    except RuntimeError as exc:  # a state dict that does not fit the config
        raise UsageError(str(exc)) from None
    transform = clip_eval_transform(cfg.model.img_size, cfg.clip.image_mean, cfg.clip.image_std)
    dataset = dataset or ("fashion_mnist" if cfg.clip.dataset == "fashion_mnist" else "none")
    inputs: dict[str, Any] = {}
    if dataset != "none":
        labelled = clip_labelled_data(cfg)
        path = data_path or (labelled.path if dataset == "fashion_mnist" else None)
        test_set = build_dataset(DataConfig(dataset=dataset, path=path, limit=limit), split, transform)
        inputs.update(test_set=test_set, classnames=load_classnames(classnames, test_set.classes),
                      templates=load_templates(templates, cfg.clip.templates, dataset))
        if slot_selection:
            if model.slot_layout() is None:
                raise UsageError("--slot-selection needs a model with SPARO read-outs on both towers")
            inputs["selection_set"] = build_dataset(DataConfig(dataset=dataset, path=path, limit=selection_size),
                                                    "train", transform)
    if retrieval:
        inputs["retrieval_set"] = CaptionTable(retrieval, transform, tokenizer, cfg.clip.image_column,
                                               cfg.clip.caption_column)
    if not inputs:
        raise UsageError("nothing to evaluate: give --dataset and/or --retrieval")
    result = evaluate(model, tokenizer, max_slots=max_slots, batch_size=batch_size, num_workers=num_workers,
                      device=device, progress=progress, **inputs)
    result["checkpoint"] = str(checkpoint)
    return result
