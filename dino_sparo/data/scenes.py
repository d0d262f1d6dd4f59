"""A procedural scene world in which compositional binding can be measured.

Each scene holds a few objects (a shape, a colour, a size and a position each) on a small
canvas; its caption names every described object with its attributes and one spatial relation.
Everything is a pure function of ``(world seed, split, index)``: no files, so the training
loop's resumable sampler and per-sample seeding apply unchanged, and any scene can be rebuilt
from its index (its scene graph and one mask per object included).

Captions vary the order in which objects are named, the direction of the relation ("a red circle
left of a blue square" = "a blue square right of a red circle") and a prefix, so word order never
gives position away. Hard negatives of SugarCrepe's seven kinds are each checked false against
the scene graph under every reading (relations read leniently, without the margin positives
keep), and each negative has as many words as its positive, so length is no cue.

Splits: ``train`` and ``test`` draw from the same distribution (other scenes, never the
withheld colour–shape pairs); ``heldout`` scenes each describe at least one withheld pair
(CLEVR-CoGenT's out-of-distribution test).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dino_sparo.config import SCENE_COLOURS, SCENE_SHAPES, SUGARCREPE_CATEGORIES, check_scene_settings

SHAPES, COLOURS = SCENE_SHAPES, SCENE_COLOURS
COLOUR_RGB = np.array([(225, 30, 30), (30, 175, 50), (45, 80, 235), (240, 220, 35), (155, 55, 205),
                       (250, 140, 20), (40, 215, 225), (240, 240, 240)], dtype=np.float32)
SIZE_WORDS = ("small", "large")
RADIUS = (0.125, 0.19)  # object radius as a fraction of the canvas side, per size
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PREFIXES = ("", "there is ", "a picture of ")
BACKGROUND = 28.0
SPLITS = ("train", "test", "heldout")
KINDS = SUGARCREPE_CATEGORIES  # the seven kinds of hard negatives
ZEROSHOT_TASKS = ("shape", "colour", "colour_shape")


# ------------------------------------------------------------------------------------ shapes


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (u right, v down, the object's radius = 1) a shape covers."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "triangle":  # apex up
        return (v <= 0.8) & (np.abs(u) <= (v + 0.95) * 0.56)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95))
    if shape == "ring":
        rho = u * u + v * v
        return (rho <= 1.0) & (rho >= 0.3)
    if shape == "star":  # five points, one up
        theta = np.arctan2(v, u) + np.pi / 2
        return np.sqrt(u * u + v * v) <= 0.42 + 0.58 * ((np.cos(5 * theta) + 1) / 2) ** 2
    if shape == "bar":
        return (np.abs(u) <= 0.95) & (np.abs(v) <= 0.38)
    raise ValueError(f"unknown shape {shape!r}")


# ------------------------------------------------------------------------------ the scene graph


@dataclass(frozen=True)
class SceneObject:
    shape: int
    colour: int
    size: int  # 0 small, 1 large
    x: float  # centre, pixels
    y: float
    radius: float
    shade: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added to the colour's RGB (each object its own)


@dataclass(frozen=True)
class Description:
    """A noun phrase: a shape and colour, and a size when it is named."""
    shape: int
    colour: int
    size: Optional[int] = None

    def matches(self, obj: SceneObject) -> bool:
        return (self.shape == obj.shape and self.colour == obj.colour
                and (self.size is None or self.size == obj.size))


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption claims: ``objects[0] relation objects[1]`` (when two or more are named), and
    that each further object exists too; ``prefix`` is one of :data:`PREFIXES`."""
    objects: tuple[Description, ...]
    relation: Optional[str] = None
    prefix: str = ""


@dataclass
class Scene:
    objects: list[SceneObject]
    described: int  # the first `described` objects are the caption's; the rest are distractors
    index: int = 0
    split: str = "train"
    spec: CaptionSpec = field(default=None)  # type: ignore[assignment]  # the canonical positive caption
    order: tuple[int, ...] = ()  # which object each of spec.objects names


def relation_holds(a: SceneObject, b: SceneObject, relation: str, margin: float) -> bool:
    """``a relation b``, with centres at least ``margin`` pixels apart along its axis."""
    if relation == "left of":
        return b.x - a.x >= margin
    if relation == "right of":
        return a.x - b.x >= margin
    if relation == "above":
        return b.y - a.y >= margin
    if relation == "below":
        return a.y - b.y >= margin
    raise ValueError(f"unknown relation {relation!r}")


def describes(objects: Sequence[SceneObject], spec: CaptionSpec, margin: float = 1e-6) -> bool:
    """Whether some reading of ``spec`` is true of the scene: distinct objects matching every
    description, the first two in the relation (by at least ``margin`` pixels)."""
    for chosen in itertools.permutations(range(len(objects)), len(spec.objects)):
        if all(d.matches(objects[i]) for d, i in zip(spec.objects, chosen)):
            if spec.relation is None or relation_holds(objects[chosen[0]], objects[chosen[1]], spec.relation, margin):
                return True
    return False


def article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def phrase(d: Description) -> str:
    words = (f"{SIZE_WORDS[d.size]} " if d.size is not None else "") + f"{COLOURS[d.colour]} {SHAPES[d.shape]}"
    return article(words)


def caption_text(spec: CaptionSpec) -> str:
    """The caption of a spec: "a red circle left of a blue square, and a green cross." """
    parts = [phrase(spec.objects[0])]
    if spec.relation is not None:
        parts.append(f" {spec.relation} {phrase(spec.objects[1])}")
    rest = spec.objects[2:] if spec.relation is not None else spec.objects[1:]
    for d in rest:
        parts.append(f", and {phrase(d)}")
    return spec.prefix + "".join(parts) + "."


# ----------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class WorldSettings:
    """The world's knobs (``data.scenes`` in a config holds the same names)."""
    size: int = 32
    shapes: int = 6
    colours: int = 6
    sizes: int = 2
    objects: tuple[int, int] = (1, 3)
    distractors: tuple[int, int] = (0, 0)
    size_words: float = 0.5
    heldout_pairs: int = 0
    seed: int = 0
    train_size: int = 100_000
    test_size: int = 5_000
    margin: float = 0.1
    hard_replacements: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "WorldSettings":
        names = cls.__dataclass_fields__
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(cfg).items() if k in names})


def world_of(scenes_cfg: Any = None) -> "SceneWorld":
    """The world a config's ``data.scenes`` describes (the defaults when None)."""
    return SceneWorld(WorldSettings() if scenes_cfg is None else WorldSettings.from_config(scenes_cfg))


class SceneWorld:
    """Scenes, captions and hard negatives as pure functions of ``(settings.seed, split, index)``."""

    def __init__(self, settings: WorldSettings = WorldSettings()) -> None:
        check_scene_settings(settings)
        self.settings = s = settings
        rng = np.random.default_rng([s.seed, 7919])
        # withheld pairs: one per colour and per shape at most, so each colour and shape is still seen
        shapes = rng.permutation(s.shapes)[: s.heldout_pairs]
        colours = rng.permutation(s.colours)[: s.heldout_pairs]
        self.heldout = frozenset(zip(colours.tolist(), shapes.tolist()))  # {(colour, shape)}
        self.margin_px = s.margin * s.size
        self._subsamples = (np.arange(2) + 0.5) / 2  # 2 × 2 samples per pixel (anti-aliasing)
        self._coverages: dict[tuple, tuple[int, int, np.ndarray]] = {}

    def __repr__(self) -> str:
        s = self.settings
        return (f"SceneWorld({s.size} px, {s.shapes} shapes, {s.colours} colours, {s.sizes} sizes, "
                f"{s.objects[0]}-{s.objects[1]} objects + {s.distractors[0]}-{s.distractors[1]} distractors, "
                f"{len(self.heldout)} withheld pairs" + (f", margin {s.margin:g}" if s.margin != 0.1 else "")
                + (", hard replacements" if s.hard_replacements else "") + ")")

    def split_size(self, split: str) -> int:
        return self.settings.train_size if split == "train" else self.settings.test_size

    def rng(self, split: str, index: int, stream: int = 0) -> np.random.Generator:
        if split not in SPLITS:
            raise ValueError(f"scene split must be one of {list(SPLITS)}, got {split!r}")
        return np.random.default_rng([self.settings.seed, SPLITS.index(split), index, stream])

    # -- sampling

    def _pair_allowed(self, colour: int, shape: int, split: str, described: bool) -> bool:
        withheld = (colour, shape) in self.heldout
        return not withheld or (split == "heldout" and described)

    def _draw_attributes(self, rng: np.random.Generator, split: str, described: bool) -> tuple[int, int]:
        while True:
            colour, shape = int(rng.integers(self.settings.colours)), int(rng.integers(self.settings.shapes))
            if self._pair_allowed(colour, shape, split, described):
                return colour, shape

    def _place(self, rng: np.random.Generator, radii: Sequence[float]) -> Optional[list[tuple[float, float]]]:
        """Centres on a quarter-pixel grid, objects apart by 1.5 px at least (64 tries each)."""
        side = self.settings.size
        placed = np.zeros((0, 3))  # x, y, radius
        for r in radii:
            tries = np.round(rng.uniform(r + 1, side - r - 1, size=(64, 2)) * 4) / 4  # 64 × 2
            gaps = np.sqrt(((tries[:, None, :] - placed[None, :, :2]) ** 2).sum(-1)) - placed[None, :, 2] - r
            free = np.flatnonzero((gaps >= 1.5).all(axis=1))
            if len(free) == 0:
                return None
            placed = np.vstack([placed, [*tries[free[0]], r]])
        return [(float(x), float(y)) for x, y, _ in placed]

    def scene(self, split: str, index: int) -> Scene:
        """The scene graph of ``(split, index)``, with its canonical positive caption (``scene.spec``)."""
        s = self.settings
        rng = self.rng(split, index)
        while True:
            described = int(rng.integers(s.objects[0], s.objects[1] + 1))
            total = described + int(rng.integers(s.distractors[0], s.distractors[1] + 1))
            attributes = [self._draw_attributes(rng, split, i < described) for i in range(total)]
            if split == "heldout" and not any(a in self.heldout for a in attributes[:described]):
                first = sorted(self.heldout)[int(rng.integers(len(self.heldout)))] if self.heldout else None
                if first is None:
                    raise ValueError("the heldout split needs data.scenes.heldout_pairs > 0")
                attributes[int(rng.integers(described))] = first
            sizes = rng.integers(s.sizes, size=total) if s.sizes == 2 else np.ones(total, dtype=int)
            radii = [RADIUS[int(z)] * s.size for z in sizes]
            # new positions for the same objects until they fit and two of them stand in a relation, so
            # that neither sizes nor attributes are biased by which scenes are easy to lay out
            for _ in range(100):
                centres = self._place(rng, radii)
                if centres is None:
                    continue
                shades = rng.uniform(-12, 12, size=(total, 3)).tolist()
                objects = [SceneObject(shape, colour, int(z), x, y, r, tuple(shade))
                           for (colour, shape), z, (x, y), r, shade in zip(attributes, sizes, centres, radii, shades)]
                made = self.positive(objects, described, rng)
                if made is not None:
                    return Scene(objects, described, index, split, *made)

    def positive(self, objects: Sequence[SceneObject], described: int, rng: Any,
                 size_named: Optional[Sequence[bool]] = None) -> Optional[tuple[CaptionSpec, tuple[int, ...]]]:
        """A true caption naming the first ``described`` objects in a random order, with a relation
        that holds by the margin, and which object each description names (None when no pair of
        them is far enough apart)."""
        order = [int(i) for i in rng.permutation(described)]
        if size_named is None:
            size_named = [self.settings.sizes == 2 and rng.random() < self.settings.size_words
                          for _ in range(described)]
        descriptions = {i: Description(objects[i].shape, objects[i].colour,
                                       objects[i].size if size_named[i] else None) for i in range(described)}
        relation = None
        if described >= 2:
            options = [(a, b, rel) for a, b in itertools.permutations(range(described), 2) for rel in RELATIONS
                       if relation_holds(objects[a], objects[b], rel, self.margin_px)]
            if not options:
                return None
            a, b, relation = options[int(rng.integers(len(options)))]
            order = [a, b] + [i for i in order if i not in (a, b)]
        prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
        return CaptionSpec(tuple(descriptions[i] for i in order), relation, prefix), tuple(order)

    def caption(self, scene: Scene, rng: Any = None) -> str:
        """A caption of the scene: the canonical one, or a fresh paraphrase drawn with ``rng`` (order,
        relation, prefix and named sizes vary; training draws one per epoch)."""
        if rng is None:
            return caption_text(scene.spec)
        made = self.positive(scene.objects, scene.described, rng)
        return caption_text(made[0] if made is not None else scene.spec)

    # -- pictures

    def _coverage(self, shape: int, radius: float, fx: float, fy: float) -> tuple[int, int, np.ndarray]:
        """A shape's anti-aliased coverage (2 × 2 samples a pixel) around a centre at sub-pixel
        offset ``(fx, fy)``, with the offset of its box from the centre's pixel; cached, since
        centres sit on a quarter-pixel grid."""
        key = (shape, radius, fx, fy)
        if key not in self._coverages:
            lo_x, lo_y = int(np.floor(fx - radius)) - 1, int(np.floor(fy - radius)) - 1
            hi_x, hi_y = int(np.floor(fx + radius)) + 2, int(np.floor(fy + radius)) + 2
            u = ((np.arange(lo_x, hi_x)[:, None] + self._subsamples).reshape(-1) - fx) / radius
            v = ((np.arange(lo_y, hi_y)[:, None] + self._subsamples).reshape(-1) - fy) / radius
            inside = _inside(SHAPES[shape], u[None, :], v[:, None]).astype(np.float32)
            coverage = inside.reshape(hi_y - lo_y, 2, hi_x - lo_x, 2).mean(axis=(1, 3))
            self._coverages[key] = (lo_x, lo_y, coverage)
        return self._coverages[key]

    def render(self, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        """``(H × W × 3 uint8 image, K × H × W bool masks)``, one mask per object (distractors too)."""
        side = self.settings.size
        image = np.full((side, side, 3), BACKGROUND, dtype=np.float32)
        masks = np.zeros((len(scene.objects), side, side), dtype=bool)
        for k, obj in enumerate(scene.objects):
            ix, iy = int(np.floor(obj.x)), int(np.floor(obj.y))
            lo_x, lo_y, coverage = self._coverage(obj.shape, obj.radius, obj.x - ix, obj.y - iy)
            x0, y0 = ix + lo_x, iy + lo_y
            h, w = coverage.shape
            cx0, cy0 = max(0, -x0), max(0, -y0)  # the part of the box inside the canvas
            cx1, cy1 = min(w, side - x0), min(h, side - y0)
            coverage = coverage[cy0:cy1, cx0:cx1]
            colour = np.clip(COLOUR_RGB[obj.colour] + np.asarray(obj.shade, dtype=np.float32), 0, 255)
            patch = image[y0 + cy0:y0 + cy1, x0 + cx0:x0 + cx1]
            patch += coverage[..., None] * (colour - patch)
            masks[k, y0 + cy0:y0 + cy1, x0 + cx0:x0 + cx1] = coverage >= 0.5
        return np.round(image).astype(np.uint8), masks

    def image(self, scene: Scene) -> Image.Image:
        return Image.fromarray(self.render(scene)[0])

    # -- hard negatives

    def negative(self, scene: Scene, kind: str, rng: Any) -> Optional[tuple[str, str]]:
        """``(positive, negative)`` captions of one SugarCrepe kind for the scene, or None when the
        scene admits none. The negative is false under every reading and has the positive's length."""
        if kind not in KINDS:
            raise ValueError(f"unknown hard-negative kind {kind!r}; the kinds are {list(KINDS)}")
        made = _NEGATIVES[kind](self, scene, rng)
        if made is None:
            return None
        positive, negative = made
        assert describes(scene.objects, positive, self.margin_px), (kind, positive)
        if describes(scene.objects, negative, 0.0) or len(caption_text(positive).split()) != len(
                caption_text(negative).split()):
            return None
        return caption_text(positive), caption_text(negative)

    def benchmark_item(self, split: str, index: int, kind: str) -> Optional[tuple[Scene, str, str]]:
        scene = self.scene(split, index)
        made = self.negative(scene, kind, self.rng(split, index, stream=2 + KINDS.index(kind)))
        return None if made is None else (scene, *made)


def _first_false(candidates: list[CaptionSpec], objects: Sequence[SceneObject], rng: Any) -> Optional[CaptionSpec]:
    for j in rng.permutation(len(candidates)):
        if not describes(objects, candidates[int(j)], 0.0):
            return candidates[int(j)]
    return None


def _with(spec: CaptionSpec, i: int, **change: Any) -> CaptionSpec:
    objects = list(spec.objects)
    objects[i] = replace(objects[i], **change)
    return replace(spec, objects=tuple(objects))


def _replacement(world: SceneWorld, scene: Scene, candidates: list[tuple[CaptionSpec, Optional[int]]],
                 attribute: str, rng: Any) -> Optional[tuple[CaptionSpec, CaptionSpec]]:
    """A false candidate ``(spec, new value)``; with ``hard_replacements``, one whose new value an
    unnamed object of the scene has comes first: the picture then holds the word, only not bound to
    that object (the text never shows it, so no word count gives it away)."""
    first: Optional[CaptionSpec] = None
    if world.settings.hard_replacements:
        hidden = {getattr(o, attribute) for o in scene.objects[scene.described:]}
        first = _first_false([c for c, value in candidates if value in hidden], scene.objects, rng)
    negative = first or _first_false([c for c, _ in candidates], scene.objects, rng)
    return None if negative is None else (scene.spec, negative)


def _replace_obj(world: SceneWorld, scene: Scene, rng: Any) -> Optional[tuple[CaptionSpec, CaptionSpec]]:
    spec = scene.spec
    candidates = [(_with(spec, i, shape=s), s) for i, d in enumerate(spec.objects)
                  for s in range(world.settings.shapes) if s != d.shape]
    return _replacement(world, scene, candidates, "shape", rng)


def _replace_att(world: SceneWorld, scene: Scene, rng: Any) -> Optional[tuple[CaptionSpec, CaptionSpec]]:
    spec = scene.spec
    candidates = [(_with(spec, i, colour=c), c) for i, d in enumerate(spec.objects)
                  for c in range(world.settings.colours) if c != d.colour]
    candidates += [(_with(spec, i, size=1 - d.size), None) for i, d in enumerate(spec.objects) if d.size is not None]
    return _replacement(world, scene, candidates, "colour", rng)


def _replace_rel(world: SceneWorld, scene: Scene, rng: Any) -> Optional[tuple[CaptionSpec, CaptionSpec]]:
    spec = scene.spec
    if spec.relation is None:
        return None
    negative = _first_false([replace(spec, relation=r) for r in RELATIONS if r != spec.relation], scene.objects, rng)
    return None if negative is None else (spec, negative)


def _swap(spec: CaptionSpec, i: int, j: int, attribute: str) -> CaptionSpec:
    a, b = getattr(spec.objects[i], attribute), getattr(spec.objects[j], attribute)
    return _with(_with(spec, i, **{attribute: b}), j, **{attribute: a})


def _swap_att(world: SceneWorld, scene: Scene, rng: Any) -> Optional[tuple[CaptionSpec, CaptionSpec]]:
    spec = scene.spec
    objs = spec.objects
    candidates = [_swap(spec, i, j, attr) for i, j in itertools.combinations(range(len(objs)), 2)
                  for attr in ("colour", "size")
                  if getattr(objs[i], attr) is not None and getattr(objs[j], attr) is not None
                  and getattr(objs[i], attr) != getattr(objs[j], attr)]
    negative = _first_false(candidates, scene.objects, rng)
    return None if negative is None else (spec, negative)


def _swap_obj(world: SceneWorld, scene: Scene, rng: Any) -> Optional[tuple[CaptionSpec, CaptionSpec]]:
    spec = scene.spec
    objs = spec.objects
    candidates = [_swap(spec, i, j, "shape") for i, j in itertools.combinations(range(len(objs)), 2)
                  if objs[i].shape != objs[j].shape]
    negative = _first_false(candidates, scene.objects, rng)
    return None if negative is None else (spec, negative)


def _add_att(world: SceneWorld, scene: Scene, rng: Any) -> Optional[tuple[CaptionSpec, CaptionSpec]]:
    """The positive names one object's (true) size; the negative gives that size word instead to an
    object of the other size: one size word in each, so neither length nor the word tells them apart."""
    n = len(scene.spec.objects)
    if world.settings.sizes < 2 or n < 2:
        return None
    bare = replace(scene.spec, objects=tuple(replace(d, size=None) for d in scene.spec.objects))
    sizes = [scene.objects[k].size for k in scene.order]
    pairs = [(i, j) for i, j in itertools.permutations(range(n), 2) if sizes[i] != sizes[j]]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    # the same size word in both: its truth, not the word (nor how often sizes occur), tells them apart
    return _with(bare, i, size=sizes[i]), _with(bare, j, size=sizes[i])


def _add_obj(world: SceneWorld, scene: Scene, rng: Any) -> Optional[tuple[CaptionSpec, CaptionSpec]]:
    """The positive names, after the relation, one more object that is in the scene (a described one
    or a distractor); the negative names in its place one that is not."""
    spec = scene.spec
    if spec.relation is None:
        return None
    head = spec.objects[:2]
    extra = [Description(o.shape, o.colour) for k, o in enumerate(scene.objects) if k not in scene.order[:2]]
    if not extra:
        return None
    positive = replace(spec, objects=head + (extra[int(rng.integers(len(extra)))],))
    # the added object matches no object of the scene, so no reading (not even one naming an
    # object twice) makes the negative true
    fakes = [replace(positive, objects=head + (Description(s, c),))
             for s in range(world.settings.shapes) for c in range(world.settings.colours)
             if not any(Description(s, c).matches(o) for o in scene.objects)]
    negative = _first_false(fakes, scene.objects, rng)
    return None if negative is None else (positive, negative)


_NEGATIVES: dict[str, Callable[[SceneWorld, Scene, Any], Optional[tuple[CaptionSpec, CaptionSpec]]]] = {
    "add_att": _add_att, "add_obj": _add_obj, "replace_att": _replace_att, "replace_obj": _replace_obj,
    "replace_rel": _replace_rel, "swap_att": _swap_att, "swap_obj": _swap_obj,
}


# ------------------------------------------------------------------------------------ datasets


class SceneCaptions(Dataset):
    """Image–caption pairs of one split for CLIP mode: ``(image, tokens)`` (or the caption string
    without a tokeniser). The caption is a fresh paraphrase per epoch in training (drawn from
    Python's ``random``, which the training loop seeds per sample), the canonical one otherwise."""

    def __init__(self, world: SceneWorld, split: str = "train", transform: Optional[Callable] = None,
                 tokenizer: Optional[Callable] = None, paraphrase: bool = True) -> None:
        self.world, self.split, self.transform, self.tokenizer = world, split, transform, tokenizer
        self.paraphrase = paraphrase

    def __len__(self) -> int:
        return self.world.split_size(self.split)

    def caption(self, index: int) -> str:
        return self.world.caption(self.world.scene(self.split, index))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        scene = self.world.scene(self.split, index)
        image: Any = self.world.image(scene)
        caption = self.world.caption(scene, PyRandom() if self.paraphrase else None)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.tokenizer([caption])[0] if self.tokenizer is not None else caption


class PyRandom:
    """The few numpy Generator calls :meth:`SceneWorld.positive` makes, on Python's ``random``."""

    def integers(self, high: int) -> int:
        return random.randrange(high)

    def random(self) -> float:
        return random.random()

    def permutation(self, n: int) -> list[int]:
        order = list(range(n))
        random.shuffle(order)
        return order


class SceneImages(Dataset):
    """Scene images with a label for k-NN and zero-shot: the ``label`` ('shape', 'colour' or
    'colour_shape') of each scene's first object. ``single=True`` gives one-object scenes without
    distractors (the zero-shot label sets)."""

    def __init__(self, world: SceneWorld, split: str = "train", transform: Optional[Callable] = None,
                 label: str = "shape", single: bool = False, limit: Optional[int] = None) -> None:
        if label not in ZEROSHOT_TASKS:
            raise ValueError(f"scene label must be one of {list(ZEROSHOT_TASKS)}, got {label!r}")
        if single:
            world = SceneWorld(replace(world.settings, objects=(1, 1), distractors=(0, 0)))
        self.world, self.split, self.transform, self.label = world, split, transform, label
        s = world.settings
        self.classes = label_names(label, s.shapes, s.colours)
        self.num_classes = len(self.classes)
        n = world.split_size(split) if limit is None else min(limit, world.split_size(split))
        self.targets = np.array([self._label(world.scene(split, i).objects[0]) for i in range(n)], dtype=np.int64)

    def _label(self, obj: SceneObject) -> int:
        if self.label == "shape":
            return obj.shape
        if self.label == "colour":
            return obj.colour
        return obj.colour * self.world.settings.shapes + obj.shape

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image: Any = self.world.image(self.world.scene(self.split, index))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"SceneImages({self.world!r}, split={self.split}, label={self.label})"


def label_names(label: str, shapes: int, colours: int) -> list[str]:
    """Class names of a label set, in label order ("red circle" = colour · shapes + shape)."""
    if label == "shape":
        return list(SHAPES[:shapes])
    if label == "colour":
        return list(COLOURS[:colours])
    return [f"{c} {s}" for c in COLOURS[:colours] for s in SHAPES[:shapes]]


def zeroshot_prompts(label: str, shapes: int, colours: int) -> tuple[list[str], list[str]]:
    """``(class names as prompts use them, templates)`` of a label set, ``{}`` = the name; the
    attribute a label leaves out is ensembled over ("a red {}.", "an orange {}.", … for shapes), as
    captions always name both. Articles go with the names, so every prompt reads as a caption does."""
    if label == "shape":
        return list(SHAPES[:shapes]), [article(f"{c} {{}}.") for c in COLOURS[:colours]]
    if label == "colour":
        return [article(c) for c in COLOURS[:colours]], [f"{{}} {s}." for s in SHAPES[:shapes]]
    return [article(name) for name in label_names(label, shapes, colours)], [f"{p}{{}}." for p in PREFIXES]


def benchmark(world: SceneWorld, split: str, count: int, kinds: Sequence[str] = KINDS,
              limit: Optional[int] = None) -> dict[str, list[tuple[int, str, str]]]:
    """Up to ``count`` SugarCrepe-style items per kind: ``(scene index, positive, negative)``, from
    the split's scenes in index order, the first ``limit`` at most (default: all); a scene that
    admits no negative of a kind is passed over."""
    items: dict[str, list[tuple[int, str, str]]] = {}
    limit = world.split_size(split) if limit is None else min(limit, world.split_size(split))
    for kind in kinds:
        found: list[tuple[int, str, str]] = []
        index = 0
        while len(found) < count and index < limit:
            made = world.benchmark_item(split, index, kind)
            if made is not None:
                found.append((index, made[1], made[2]))
            index += 1
        items[kind] = found
    return items
