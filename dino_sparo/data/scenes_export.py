"""The scene world written to disk in the formats real data comes in, and drawn for a person.

``export_scenes`` writes PNGs, a caption table in CLIP mode's CSV format and the seven hard-negative
kinds in SugarCrepe's JSON format, so the training program (``clip.dataset: table``) and the
SugarCrepe evaluator run on the synthetic set exactly as on real data. ``scene_grid`` draws scenes
with their captions and hard negatives. ``generation_speed`` times the world.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import textwrap
import time
from pathlib import Path
from typing import Any

from dino_sparo.data.scenes import COLOURS, KINDS, SHAPES, SIZE_WORDS, SceneWorld, benchmark
from dino_sparo.errors import UsageError

logger = logging.getLogger(__name__)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_scenes(world: SceneWorld, out: str | os.PathLike, count: int, split: str = "test",
                  progress: bool = True) -> dict[str, Any]:
    """Write scenes ``0 .. count-1`` of ``split`` under ``out``: ``images/<split>_NNNNNN.png``,
    ``captions.csv`` (columns ``path``, ``caption``; the canonical captions), ``scenes.jsonl`` (each
    scene graph), and ``sugarcrepe/<kind>.json`` (items from those scenes, keyed "0", "1", …, their
    ``filename`` relative to ``images/``; a kind none of these scenes admits is not written).
    Returns what was written."""
    from tqdm import tqdm  # noqa: PLC0415

    if count < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    count = min(count, world.split_size(split))
    root = Path(out)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    (root / "sugarcrepe").mkdir(exist_ok=True)
    rows, graphs = [], []
    for index in tqdm(range(count), desc=f"scenes ({split})", unit="scene", disable=not progress):
        scene = world.scene(split, index)
        name = f"{split}_{index:06d}.png"
        world.image(scene).save(images / name)
        caption = world.caption(scene)
        rows.append((f"images/{name}", caption))
        graphs.append({"index": index, "split": split, "filename": name, "caption": caption,
                       "objects": [{"shape": SHAPES[o.shape], "colour": COLOURS[o.colour], "size": SIZE_WORDS[o.size],
                                    "x": o.x, "y": o.y, "described": k < scene.described}
                                   for k, o in enumerate(scene.objects)]})
    with (root / "captions.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    _write_atomically(root / "scenes.jsonl", "".join(json.dumps(g) + "\n" for g in graphs))
    items = benchmark(world, split, count, limit=count)
    for kind, found in items.items():
        if not found:  # a world without this kind (e.g. one object a scene: no relation to replace)
            logger.warning("no %s item in these %d scenes: sugarcrepe/%s.json not written", kind, count, kind)
            continue
        data = {str(i): {"filename": f"{split}_{index:06d}.png", "caption": positive, "negative_caption": negative}
                for i, (index, positive, negative) in enumerate(found)}
        _write_atomically(root / "sugarcrepe" / f"{kind}.json", json.dumps(data, indent=1))
    summary = {"out": str(root), "split": split, "scenes": count, "items": {k: len(v) for k, v in items.items()},
               "world": repr(world)}
    logger.info("wrote %d scenes of split %s and %s SugarCrepe items to %s", count, split,
                summary["items"], root)
    return summary


def scene_grid(world: SceneWorld, path: str | os.PathLike, count: int = 12, split: str = "test",
               columns: int = 4) -> Path:
    """One PNG: ``count`` scenes, each with its caption and a hard negative (kinds in turn)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 5.4 * rows), squeeze=False)
    index, shown = 0, 0
    while shown < count and index < world.split_size(split):
        kind = KINDS[shown % len(KINDS)]
        made = world.benchmark_item(split, index, kind)
        index += 1
        if made is None:
            continue
        scene, positive, negative = made
        ax = axes[shown // columns][shown % columns]
        ax.imshow(world.render(scene)[0], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        wrap = "\n".join
        ax.set_title(f"{split} #{scene.index}", fontsize=9)
        ax.set_xlabel(f"✓ {wrap(textwrap.wrap(positive, 44))}\n✗ {kind}: {wrap(textwrap.wrap(negative, 40))}",
                      fontsize=8, loc="left")
        shown += 1
    for k in range(shown, rows * columns):
        axes[k // columns][k % columns].axis("off")
    fig.suptitle(f"{world!r}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def generation_speed(world: SceneWorld, count: int = 5000, split: str = "train", transform: Any = None,
                     tokenizer: Any = None) -> dict[str, float]:
    """Scenes per second on this process' one core: the scene graph alone; with its picture; with
    its picture as a PIL image and a paraphrased caption; and, given the run's image ``transform``
    and ``tokenizer``, a whole training sample as the loader makes it (per-sample seeding included)."""
    import random  # noqa: PLC0415

    from dino_sparo.data.samplers import SeededSamples  # noqa: PLC0415
    from dino_sparo.data.scenes import PyRandom, SceneCaptions  # noqa: PLC0415

    rows = ["graph", "graph + picture", "graph + PIL image + caption"]
    if transform is not None and tokenizer is not None:
        rows.append("training sample (seeded, transformed, tokenised)")
    samples = SeededSamples(SceneCaptions(world, split, transform, tokenizer), seed=0)
    result = {}
    for name in rows:
        start = time.perf_counter()
        for index in range(count):
            if name.startswith("training"):
                samples[(0, index)]
                continue
            scene = world.scene(split, index)
            if name == "graph + picture":
                world.render(scene)
            elif name != "graph":
                random.seed(index)
                world.image(scene)
                world.caption(scene, PyRandom())
        result[name] = count / (time.perf_counter() - start)
    return result
