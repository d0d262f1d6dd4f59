"""Pictures of what the slots attend to: each slot's attention over the patch grid, on the image."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dino_sparo.errors import UsageError
from dino_sparo.models.vit import VisionTransformer


@torch.no_grad()
def slot_attention(backbone: VisionTransformer, images: torch.Tensor, with_registers: bool = False):
    """SPARO attention ``B × L × N`` (N = 1 class token + patches; registers left out) for normalised
    ``images``; ``with_registers`` also returns each slot's weight on the registers (``B × L``, or
    None when the slots do not attend to them)."""
    if backbone.sparo is None:
        raise UsageError("slot attention needs a SPARO model (model.readout: sparo)")
    tokens = backbone.forward_tokens(images)
    _, attn = backbone.readout(tokens, return_attn=True)
    attn, registers = backbone.class_and_patch_attention(attn.float())
    return (attn, registers) if with_registers else attn


def most_attended_slots(attn: torch.Tensor, count: int) -> list[int]:
    """Slots ranked by how often they put the most mass on some patch (ties by total mass)."""
    patch_attn = attn[..., 1:]  # B × L × P
    winners = patch_attn.argmax(dim=1)  # B × P: the slot attending most to each patch
    votes = torch.bincount(winners.flatten(), minlength=attn.shape[1])  # L
    mass = patch_attn.double().sum(dim=(0, 2))  # L
    # lexicographic (votes, then mass): a weighted sum would lose the tie-break to float rounding
    by_mass = mass.argsort(descending=True, stable=True)
    order = by_mass[votes[by_mass].argsort(descending=True, stable=True)]
    return order[:count].tolist()


def plot_slot_attention(
    backbone: VisionTransformer,
    images: torch.Tensor,
    display: np.ndarray,
    path: str | Path,
    slots: Optional[Sequence[int]] = None,
    num_slots: int = 8,
    title: str = "",
) -> list[int]:
    """A grid PNG: one row per image (the image, then each chosen slot's attention over the
    patches: over a grey image, beside a colour one, where an overlay would mix the map's colours
    with the photo's), one colour scale for every map; the weight a slot puts on the class token (and,
    when the slots attend to registers, on the registers together) is printed above its map.

    ``images`` are the network's inputs (normalised, ``B × C × H × W``); ``display`` the same
    images for showing (``B × H × W`` or ``B × H × W × 3``, values in [0, 1]). Slots are chosen by
    :func:`most_attended_slots` unless given. Returns the slots shown.
    """
    plt = _pyplot()
    attn, registers = slot_attention(backbone, images, with_registers=True)
    if slots is None:
        slots = most_attended_slots(attn, min(num_slots, attn.shape[1]))
    slots = list(slots)
    b = images.shape[0]
    grid_h, grid_w = images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
    fig, axes = plt.subplots(b, len(slots) + 1, figsize=(1.3 * (len(slots) + 1), 1.4 * b), squeeze=False)
    grey = display.ndim == 3
    cmap = "gray" if grey else None
    top = max(float(attn[:, slots, 1:].max()), 1e-6)  # one scale for every map of the picture
    shown = None
    for row in range(b):
        axes[row, 0].imshow(display[row], cmap=cmap)
        axes[row, 0].set_title("image", fontsize=7)
        for col, slot in enumerate(slots, start=1):
            weights = attn[row, slot]
            patch_map = weights[1:].reshape(1, 1, grid_h, grid_w)
            up = torch.nn.functional.interpolate(patch_map, size=display.shape[1:3], mode="nearest")[0, 0]
            if grey:
                axes[row, col].imshow(display[row], cmap=cmap)
            shown = axes[row, col].imshow(up.numpy(), cmap="inferno", vmin=0.0, vmax=top, alpha=0.6 if grey else 1.0)
            label = f"slot {slot} · cls {weights[0]:.2f}"
            if registers is not None:
                label += f" · reg {registers[row, slot]:.2f}"
            axes[row, col].set_title(label, fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    if shown is not None:
        scale = fig.colorbar(shown, cax=fig.add_axes((0.945, 0.12, 0.015, 0.76)))
        scale.ax.tick_params(labelsize=6)
        scale.set_label("attention on the patch", fontsize=6)
    _save(fig, path)
    return slots


@torch.no_grad()
def text_slot_attention(text: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """SPARO attention ``B × L × N`` of a CLIP text tower over token ids ``B × N`` (zero after end of text)."""
    if getattr(text, "sparo", None) is None:
        raise UsageError("text slot attention needs a SPARO text tower (clip.text_readout: sparo)")
    _, attn = text.readout(tokens, text.forward_tokens(tokens), return_attn=True)
    return attn.float()


def token_strings(tokenizer: Any, tokens: torch.Tensor) -> list[str]:
    """The readable piece of each token of one row ``N``, up to and including end of text."""
    ids = tokens.tolist()
    end = ids.index(tokenizer.eot_token_id) + 1 if tokenizer.eot_token_id in ids else len(ids)
    names = []
    for i in ids[:end]:
        if i == tokenizer.sot_token_id:
            names.append("<start>")
        elif i == tokenizer.eot_token_id:
            names.append("<end>")
        else:
            names.append(tokenizer.decode([i]) or "?")
    return names


def plot_text_attention(
    text: torch.nn.Module,
    tokenizer: Any,
    caption: str,
    path: str | Path,
    slots: Optional[Sequence[int]] = None,
    num_slots: int = 8,
    title: str = "",
) -> list[int]:
    """A heat strip PNG: one row per chosen slot, one column per caption token, the slot's weight
    on that token printed in the cell. Slots are chosen by :func:`most_attended_slots` (class-token
    column excluded, so here the start-of-text token) unless given. Returns the slots shown."""
    plt = _pyplot()
    tokens = tokenizer([caption])  # 1 × context_length
    attn = text_slot_attention(text, tokens)  # 1 × L × N
    names = token_strings(tokenizer, tokens[0])
    attn = attn[..., : len(names)]
    if slots is None:
        slots = most_attended_slots(attn, min(num_slots, attn.shape[1]))
    slots = list(slots)
    strip = attn[0, slots].numpy()  # S × T
    fig, ax = plt.subplots(figsize=(0.55 * len(names) + 1.2, 0.32 * len(slots) + 1.0))
    ax.imshow(strip, cmap="inferno", vmin=0.0, vmax=max(float(strip.max()), 1e-6), aspect="auto")
    for r in range(strip.shape[0]):
        for c in range(strip.shape[1]):
            ax.text(c, r, f"{strip[r, c]:.2f}", ha="center", va="center", fontsize=5,
                    color="black" if strip[r, c] > 0.6 * strip.max() else "white")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
    ax.set_yticks(range(len(slots)), [f"slot {s}" for s in slots], fontsize=6)
    ax.set_title(title or f"text slot attention: {caption!r}", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return slots


def load_images(items: Sequence[str | int], size: int, mean: Sequence[float], std: Sequence[float],
                grayscale: bool, fashion_mnist_root: Optional[str] = None, world: Any = None,
                run_images: Optional[Dataset] = None, channels: int = 3) -> tuple[torch.Tensor, np.ndarray]:
    """Network inputs ``B × C × size × size`` and display images (``B × H × W`` grey or
    ``B × H × W × 3``, in [0, 1]) from indices (integers: into ``run_images`` when given, else the
    scene ``world``'s test split when given, else Fashion-MNIST's test set) or image file paths,
    opened as training opens them (:func:`dino_sparo.data.images.open_image`)."""
    from PIL import Image  # noqa: PLC0415

    from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT, FashionMNIST  # noqa: PLC0415
    from dino_sparo.data.images import open_image, to_mode  # noqa: PLC0415
    from dino_sparo.data.transforms import eval_transform  # noqa: PLC0415

    grayscale = grayscale or channels == 1
    mode = "L" if grayscale else "RGB"
    transform = eval_transform(size, mean, std, resize_ratio=1.0, grayscale_input=grayscale, channels=channels)
    test_set = None
    pictures = []
    for item in items:
        if not (isinstance(item, int) or str(item).isdigit()):
            if not Path(item).is_file():
                raise FileNotFoundError(f"image not found: {item}")
            picture = open_image(item, mode)
        elif run_images is not None:
            if not 0 <= int(item) < len(run_images):
                raise IndexError(f"image index {item} is outside the run's {len(run_images)} images "
                                 f"(0..{len(run_images) - 1}): {run_images!r}")
            picture = run_images[int(item)][0]
        elif world is not None:
            if not 0 <= int(item) < world.split_size("test"):
                raise UsageError(f"scene index {item} is outside the test split's 0..{world.split_size('test') - 1}")
            picture = world.image(world.scene("test", int(item)))
        else:
            if test_set is None:
                test_set = FashionMNIST(fashion_mnist_root or DEFAULT_FASHION_MNIST_ROOT, "test")
            if not 0 <= int(item) < len(test_set):
                raise UsageError(f"Fashion-MNIST test index {item} is outside 0..{len(test_set) - 1}")
            picture = test_set[int(item)][0]
        pictures.append(to_mode(picture, mode).resize((size, size), Image.BICUBIC))
    images = torch.stack([transform(p) for p in pictures])  # B × C × size × size
    display = np.stack([np.asarray(p, dtype=np.float32) / 255 for p in pictures])
    return images, display


def images_of_run(cfg: Any) -> Optional[Dataset]:
    """The images a run was trained or evaluated on, as PIL images, for pictures without ``--images``:
    an image folder's ``val/`` (or ``test/``, or the folder), a caption table, WebDataset shards.
    None for Fashion-MNIST and the scene world, which have their own indices."""
    from dino_sparo.data.captions import CaptionTable, TarShardCaptions  # noqa: PLC0415
    from dino_sparo.data.datasets import build_dataset  # noqa: PLC0415

    if cfg.mode == "clip":
        clip = cfg.clip
        if clip.dataset == "table":
            return CaptionTable(clip.train_data, image_column=clip.image_column, caption_column=clip.caption_column,
                                corrupt_images="skip", background=tuple(cfg.data.alpha_background))
        if clip.dataset == "webdataset":
            return TarShardCaptions(clip.train_data, image_keys=clip.shard_image_keys,
                                    caption_key=clip.shard_caption_key, corrupt_images="skip")
        return None
    if cfg.data.dataset in ("imagefolder", "webdataset"):
        split = "val" if cfg.data.dataset == "imagefolder" else "train"
        index = Path(cfg.output_dir) / "shard_index.npz"  # the training run's, when still there
        return build_dataset(dataclasses.replace(cfg.data, limit=None, corrupt_images="skip"), split,
                             index_cache=index if index.is_file() else None)
    return None


def default_items(run_images: Optional[Dataset], world: Any, count: int = 8) -> list[int]:
    """Which images a picture shows without ``--images``: one per class, spread over the classes,
    of a labelled image folder; the first ones of a table or shards, or of the scene world; a
    spread of Fashion-MNIST's classes."""
    if run_images is not None:
        targets = getattr(run_images, "targets", None)
        if targets is not None and len(targets):
            from dino_sparo.data.datasets import balanced_subset_indices  # noqa: PLC0415

            return [int(i) for i in balanced_subset_indices(np.asarray(targets), min(count, len(targets)))]
        return list(range(min(count, len(run_images))))
    if world is not None:
        return list(range(count))
    return [0, 1250, 2500, 3750, 5000, 6250, 7500, 8750]


def visualize_checkpoint(
    checkpoint: str | Path,
    items: Optional[Sequence[str | int]],
    output: str | Path,
    slots: Optional[Sequence[int]] = None,
    num_slots: int = 8,
    caption: Optional[str] = None,
    key: str = "teacher",
    fashion_mnist_root: Optional[str] = None,
) -> dict[str, Any]:
    """Slot attention pictures of a DINO (``key``: teacher/student) or CLIP checkpoint; for CLIP
    with a ``caption`` also the text strip (written beside ``output`` as ``*_text.png``). Without
    ``items``, images of the run's own data (:func:`images_of_run`, :func:`default_items`)."""
    from dino_sparo.checkpoint import load_run  # noqa: PLC0415
    from dino_sparo.data.transforms import dino_normalization  # noqa: PLC0415

    output = Path(output)
    mode = load_run(checkpoint).cfg.mode
    text, tokenizer = None, None
    if mode == "clip":
        from dino_sparo.models.clip import load_clip_model  # noqa: PLC0415

        model, cfg, tokenizer = load_clip_model(checkpoint)
        backbone, text = model.visual, model.text
        mean, std = cfg.clip.image_mean, cfg.clip.image_std
        grayscale = False
    else:
        from dino_sparo.models.build import load_backbone_from_checkpoint  # noqa: PLC0415

        backbone, cfg = load_backbone_from_checkpoint(checkpoint, key=key)
        mean, std, grayscale = dino_normalization(cfg)
    world = None
    if cfg.data.dataset == "scenes" or (mode == "clip" and cfg.clip.dataset == "scenes"):
        from dino_sparo.data.scenes import world_of  # noqa: PLC0415

        world = world_of(cfg.data.scenes)
    run_images = _run_images_or_ask(cfg, items)
    if items is None:
        items = default_items(run_images, world)
    images, display = load_images(items, cfg.model.img_size, mean, std, grayscale,
                                  fashion_mnist_root or cfg.data.path, world=world, run_images=run_images,
                                  channels=cfg.model.in_chans)
    shown = plot_slot_attention(backbone, images, display, output, slots=slots, num_slots=num_slots,
                                title=f"{Path(checkpoint).parent.name}: slot attention over patches")
    source = (repr(run_images) if run_images is not None else "the scene world's test split" if world is not None
              else "Fashion-MNIST's test set")
    result: dict[str, Any] = {"image_png": str(output), "slots": shown, "images": [str(i) for i in items],
                              "indices_into": source}
    if caption is not None:
        if text is None:
            raise UsageError(f"--caption needs a CLIP checkpoint; {checkpoint} was trained with mode {mode!r}")
        text_png = output.with_name(output.stem + "_text.png")
        result["text_slots"] = plot_text_attention(text, tokenizer, caption, text_png, slots=slots, num_slots=num_slots)
        result["text_png"] = str(text_png)
    return result


def _run_images_or_ask(cfg: Any, items: Optional[Sequence[str | int]]) -> Optional[Dataset]:
    """:func:`images_of_run`, needed when indices (or nothing) are asked for; when the run's data
    is no longer where its config says, an error that asks for ``--images`` files."""
    if items is not None and not any(isinstance(i, int) or str(i).isdigit() for i in items):
        return None
    try:
        return images_of_run(cfg)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the run's images ({' '.join(str(exc).split())}); pass image files "
                         "with --images") from None


def _pyplot() -> Any:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig: Any, path: str | Path, dpi: int = 110) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
