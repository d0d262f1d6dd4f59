"""Configuration: dataclasses with defaults in code, YAML files holding what an experiment changes,
dotted ``key.sub=value`` overrides on the command line. Unknown keys and wrong types are refused
with a message naming the key.

A YAML file may start from another with ``_base_: other.yaml`` (a path relative to the file).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dino_sparo.errors import ConfigError  # noqa: F401 (where the config's callers find it)


def option(default: Any = dataclasses.MISSING, meaning: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its one-line meaning, which ``dino-sparo-train --help-config`` lists."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"meaning": meaning})
    return field(default=default, metadata={"meaning": meaning})


# The values some keys name, kept here (the lowest floor) so that loading a config can check them;
# models.vit builds these sizes and sparo implements these normalisations.
ARCHS: dict[str, tuple[int, int, int]] = {  # model.arch -> (width, depth, heads)
    "vit_pico": (96, 6, 3),  # for 28–32 px images on a laptop CPU
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
SPARO_REPRESENTATIONS = ("cont", "sem", "sqrtsem")  # model.sparo.norm = representation:weighting
SPARO_WEIGHTINGS = ("const", "norm", "softmax", "sqrtsoftmax")
SPARO_NORMS = tuple(f"{r}:{w}" for r in SPARO_REPRESENTATIONS for w in SPARO_WEIGHTINGS)
SCENE_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")  # data.scenes.shapes
SCENE_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")  # data.scenes.colours
# SugarCrepe's seven hard-negative categories (dino-sparo-sugarcrepe --categories; the scene world's kinds)
SUGARCREPE_CATEGORIES = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


@dataclass
class SparoConfig:
    num_slots: int = option(64, "L, the number of slots read out")
    slot_dim: int = option(64, "V, the width of each slot")
    attn_dim: Optional[int] = option(None, "d_a, the key width; null = the backbone's head width")
    value_dim: Optional[int] = option(None, "d_v, the value width; null = d_a")
    num_heads: Optional[int] = option(None, "key/value projections; null = one per slot")
    share_kv: bool = option(True, "one projection for keys and values (needs value_dim == attn_dim)")
    norm: str = option(
        "cont:const",
        "slot normalisation, representation:weighting (cont|sem|sqrtsem : const|norm|softmax|sqrtsoftmax)")
    attend_registers: bool = option(
        False, "the slots may attend to the register tokens (model.num_registers); false: class token and patches")


@dataclass
class ModelConfig:
    arch: str = option("vit_small", "ViT size: vit_pico | vit_tiny | vit_small | vit_base | vit_large")
    patch_size: int = option(16, "patch side in pixels; must divide the image and crop sizes")
    img_size: int = option(224, "the size position embeddings are stored for (CLIP: the training image size)")
    in_chans: int = option(3, "input channels: 3 (RGB) or 1 (grey: every view gives one channel; DINO mode)")
    embed_dim: Optional[int] = option(None, "transformer width; null = the arch's")
    depth: Optional[int] = option(None, "transformer blocks; null = the arch's")
    num_heads: Optional[int] = option(None, "attention heads; null = the arch's")
    drop_path_rate: float = option(0.1, "stochastic depth of the student (the teacher has none)")
    readout: Literal["sparo", "cls"] = option("sparo", "sparo: SPARO slots; cls: the class token (the baseline)")
    reduce_depth: Optional[int] = option(None, "blocks removed at the end; null = 1 for sparo, 0 for cls")
    attn_backend: Literal["auto", "xformers", "sdpa", "math"] = option(
        "auto", "attention kernel; auto picks by device and dtype (and logs its choice)")
    pack_crops: bool = option(False, "all crop sizes in one forward (xformers block-diagonal attention, GPU)")
    pretrained: Optional[str] = option(
        None, "backbone weights to start from: a timm or DINO ViT file or a dino_sparo checkpoint; null = random")
    num_registers: int = option(
        0, "register tokens after the class token (DINOv2-reg: 4); dropped from every output's patch tokens")
    layer_scale_init: Optional[float] = option(
        None, "LayerScale on each block's branches, started at this value (DINOv2: 1e-5; its weights need it); "
              "null = none (DINO)")
    sparo: SparoConfig = option(meaning="the SPARO read-out", factory=SparoConfig)


@dataclass
class ScenesConfig:
    """The procedural scene world (``data.dataset: scenes``, ``clip.dataset: scenes``): every scene is
    a pure function of (seed, split, index); see dino_sparo/data/scenes.py."""
    size: int = option(32, "canvas side in pixels")
    shapes: int = option(6, "shapes used (2..8: circle square triangle diamond cross ring star bar)")
    colours: int = option(6, "colours used (2..8: red green blue yellow purple orange cyan white)")
    sizes: int = option(2, "object sizes (1, or 2: small and large)")
    objects: tuple[int, int] = option((1, 3), "objects a caption describes, drawn in [low, high] (at most 4)")
    distractors: tuple[int, int] = option((0, 0), "objects no caption names, drawn in [low, high]")
    size_words: float = option(0.5, "chance that a caption names an object's size (with sizes: 2)")
    heldout_pairs: int = option(0, "colour-shape pairs never in train/test scenes, only in the heldout split")
    seed: int = option(0, "the world's seed: which pairs are withheld, and every split's scenes")
    train_size: int = option(100000, "scenes in the train split (an epoch)")
    test_size: int = option(5000, "scenes in the test and heldout splits")
    margin: float = option(0.1, "a caption's relation holds by at least this fraction of the canvas")
    hard_replacements: bool = option(
        False, "replace_att / replace_obj negatives take, when they can, a colour / shape of a distractor")
    label: Literal["shape", "colour", "colour_shape"] = option(
        "shape", "the label of a scene for k-NN and the linear probe: its first object's")


@dataclass
class DataConfig:
    dataset: Literal["imagefolder", "fashion_mnist", "scenes", "webdataset"] = option(
        "imagefolder", "imagefolder (root/<class>/<image>), fashion_mnist (its IDX files), scenes (made by the "
        "code) or webdataset (tar shards; DINO training only)")
    path: Optional[str] = option(None, "image-folder root, a folder with the four Fashion-MNIST files, or "
                                       "WebDataset shards ('x/{00000..00099}.tar', a folder of .tar)")
    corrupt_images: Literal["error", "skip"] = option(
        "error", "missing or undecodable images (folders, caption tables, shards): error stops, naming the file; "
                 "skip warns, naming it, takes the next image, and counts the skips at each epoch's end")
    alpha_background: tuple[int, int, int] = option(
        (255, 255, 255), "RGB colour (0-255) that images with transparency (RGBA, LA, P) are composited on")
    limit: Optional[int] = option(None, "use only this many training images (class-balanced; tables and shards: "
                                        "the first ones); above the data's size: all, with a warning")
    mean: Optional[list[float]] = option(
        None, "DINO: normalisation mean, one value per input channel; null = the dataset's (ImageNet's, "
              "Fashion-MNIST's)")
    std: Optional[list[float]] = option(None, "DINO: normalisation std, one value per input channel; null = the dataset's")
    shard_image_keys: str = option("jpg;jpeg;png;webp", "data.dataset webdataset: the image member of a sample, "
                                                        "first found")
    shard_label_key: Optional[str] = option("cls", "data.dataset webdataset: a member holding an integer label "
                                                   "(null: none; DINO does not use it)")
    batch_size_per_gpu: int = option(64, "per process; the global batch is this × world size")
    num_workers: int = option(8, "DataLoader worker processes per training process (0 = load in the main process)")
    augment_on: Literal["loader", "device"] = option(
        "loader", "where DINO's colour jitter, greyscale, blur, solarisation and normalisation run: loader (PIL, "
                  "in the loader workers, as DINO) or device (batched on the training device at the start of the "
                  "step, the workers only decode, crop, resize and flip; DINO mode only)")
    scenes: ScenesConfig = option(meaning="the procedural scene world", factory=ScenesConfig)


@dataclass
class CropsConfig:
    global_crops_number: int = option(2, "global crops per image, seen by student and teacher (DINO's loss needs 2)")
    global_crops_size: int = option(224, "global crop side in pixels")
    global_crops_scale: tuple[float, float] = option(
        (0.4, 1.0), "area range of the global crops (RandomResizedCrop scale)")
    local_crops_number: int = option(8, "local crops per image, seen by the student only (0 = none)")
    local_crops_size: int = option(96, "local crop side in pixels")
    local_crops_scale: tuple[float, float] = option(
        (0.05, 0.4), "area range of the local crops (RandomResizedCrop scale)")
    color_jitter_strength: float = option(
        1.0, "scales DINO's colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1); 0 = none")
    grayscale_prob: float = option(0.2, "chance that a crop is turned grey (DINO's 0.2; 0 for grey data)")


@dataclass
class DinoConfig:
    out_dim: int = option(65536, "K, the prototypes of the DINO head")
    head_hidden_dim: int = option(2048, "hidden width of the head's MLP")
    head_bottleneck_dim: int = option(256, "width before the head's weight-normalised last layer")
    use_bn_in_head: bool = option(False, "batch norm in the head's MLP")
    norm_last_layer: bool = option(
        True, "last layer weight-normalised with its norm fixed (steadier; false can score higher)")
    momentum_teacher: float = option(0.996, "teacher EMA momentum at the start, on a cosine schedule to 1")
    warmup_teacher_temp: float = option(0.04, "teacher temperature at the start of its warm-up")
    teacher_temp: float = option(0.04, "teacher temperature after the warm-up")
    warmup_teacher_temp_epochs: int = option(0, "epochs of linear teacher-temperature warm-up")
    student_temp: float = option(0.1, "student softmax temperature")
    center_momentum: float = option(0.9, "EMA momentum of the teacher centre")
    centering: Literal["center", "sinkhorn_knopp"] = option(
        "center", "DINO v1's EMA centre | DINOv2's Sinkhorn-Knopp (3 iterations)")
    koleo_weight: float = option(0.0, "DINOv2's KoLeo regulariser on the student's global-crop embeddings (0 = off)")


@dataclass
class IbotConfig:
    loss_weight: float = option(0.0, "weight of iBOT's masked-patch loss beside DINO's (0 = off; DINOv2: 1)")
    mask_probability: float = option(0.5, "share of the student's global crops that are masked")
    mask_ratio: tuple[float, float] = option(
        (0.1, 0.5), "[low, high]: a masked crop's share of masked patches is drawn uniformly in it")
    separate_head: bool = option(
        True, "a head of its own for the patches (DINOv2's recipes); false: the DINO head (needs the read-out's "
        "width to equal the backbone's, i.e. model.readout cls)")
    out_dim: Optional[int] = option(None, "prototypes of the separate iBOT head; null = dino.out_dim")


@dataclass
class OptimConfig:
    epochs: int = option(100, "training epochs; every schedule spans them")
    lr: float = option(0.0005, "peak learning rate at a global batch of 256, scaled with it (see lr_scaling)")
    lr_scaling: Literal["linear", "none"] = option(
        "linear", "linear: lr × global batch / 256 (DINO); none: lr as given")
    min_lr: float = option(1e-6, "learning rate at the end of the cosine schedule")
    warmup_epochs: int = option(10, "epochs of linear learning-rate warm-up")
    warmup_steps: int = option(0, "> 0: warm up for this many optimiser steps instead of warmup_epochs (open_clip)")
    weight_decay: float = option(0.04, "weight decay at the start, on a cosine schedule to weight_decay_end")
    weight_decay_end: float = option(0.4, "weight decay at the end")
    clip_grad: float = option(3.0, "gradient norm clipped at this (see clip_mode); 0 = no clipping")
    clip_mode: Literal["per_param", "global"] = option(
        "per_param", "per_param: each tensor apart (DINO v1); global: one norm over all (DINOv2)")
    freeze_last_layer: int = option(1, "epochs during which the head's last layer is not trained")
    fused: Literal["auto", "on", "off"] = option("auto", "fused AdamW kernel; auto = on for CUDA and CPU")


# OpenAI CLIP's image normalisation (the SPARO reference trains with it)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CAPTION_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
]


@dataclass
class ClipConfig:
    """CLIP mode: the text tower, the contrastive loss and the image–caption data. The image tower
    is ``model``; the text SPARO uses ``model.sparo`` too, so both towers read out the same L slots."""
    # text tower (CLIP's: width 512, 8 heads, 12 layers, BPE context of 77 tokens)
    text_width: int = option(512, "text tower width")
    text_depth: int = option(12, "text tower blocks")
    text_heads: int = option(8, "text tower attention heads")
    text_mlp_ratio: float = option(4.0, "text MLP width / text width")
    context_length: int = option(77, "BPE tokens per caption, start and end included")
    text_readout: Optional[Literal["sparo", "eot"]] = option(
        None, "text read-out; null = sparo if model.readout is sparo, else eot")
    text_reduce_depth: Optional[int] = option(None, "text blocks removed at the end; null = 1 for sparo, 0 for eot")
    share_queries: bool = option(False, "tie the text SPARO's queries to the image SPARO's")
    embed_dim: int = option(512, "joint width of the plain-CLIP projections (SPARO embeddings are L·V wide)")
    # contrastive loss
    init_temperature: float = option(0.07, "the logit scale starts at ln(1 / this)")
    max_logit_scale: float = option(100.0, "the logit scale is clamped at ln(this)")
    local_loss: bool = option(False, "logits of local rows against all columns only (open_clip's, scales)")
    gather_with_grad: bool = option(False, "gradients flow through the features gathered from other ranks")
    accum_steps: int = option(1, "micro-batches per step; the loss still sees all of their negatives")
    # AdamW settings of CLIP (DINO keeps torch's defaults)
    betas: tuple[float, float] = option((0.9, 0.98), "AdamW betas (CLIP's)")
    eps: float = option(1e-6, "AdamW epsilon (CLIP's)")
    # data
    dataset: Literal["fashion_mnist", "table", "webdataset", "scenes"] = option(
        "fashion_mnist", "fashion_mnist (captions from templates), table (.csv/.tsv), webdataset (.tar shards) "
        "or scenes (data.scenes' world, captions with relations)")
    train_data: Optional[str] = option(None, "table (.csv/.tsv), shards ('x/{00000..00099}.tar'), Fashion-MNIST folder")
    image_column: str = option("path", "table column with image paths, relative to the table's folder")
    caption_column: str = option("caption", "table column with the captions")
    shard_image_keys: str = option("jpg;jpeg;png;webp", "WebDataset: the image member of a sample, first found")
    shard_caption_key: str = option("txt", "WebDataset: the caption member")
    templates: list[str] = option(
        meaning="templates of the Fashion-MNIST captions ({} = the class name)",
        factory=lambda: list(DEFAULT_CAPTION_TEMPLATES))
    crop_scale: tuple[float, float] = option((0.9, 1.0), "RandomResizedCrop scale of the training images")
    crop_ratio: tuple[float, float] = option(
        (0.75, 4 / 3), "RandomResizedCrop aspect-ratio range (no flip ever: captions say 'left of')")
    image_mean: tuple[float, float, float] = option(CLIP_MEAN, "image normalisation mean (OpenAI CLIP's)")
    image_std: tuple[float, float, float] = option(CLIP_STD, "image normalisation std (OpenAI CLIP's)")
    # zero-shot classification during training (every N epochs, 0 = never); fashion_mnist or a folder
    zeroshot_every_epochs: int = option(0, "zero-shot accuracy every N epochs during training (0 = never)")
    zeroshot_data: Optional[str] = option(
        None, "'fashion_mnist' (default) or an image folder (with val/ or the classes)")
    zeroshot_classnames: Optional[str] = option(
        None, "'imagenet' (open_clip's names for wnid folders), a file, or folder names")
    zeroshot_templates: str = option(
        "auto", "'auto' (openai for an image folder, config for Fashion-MNIST), 'config' (clip.templates), "
                "'simple', 'openai' (CLIP's 80 ImageNet prompts), or a file")


@dataclass
class EvalConfig:
    """Evaluation during training: DINO's weighted k-NN on the method's image backbone (the
    teacher's in DINO mode), at the end of every ``knn_every``-th epoch, logged to log.jsonl."""
    knn_every: int = option(0, "epochs between k-NN evaluations (0 = never)")
    knn_k: int = option(20, "neighbours in the weighted vote")
    knn_temperature: float = option(0.07, "temperature of the vote's similarity weights")
    knn_train_limit: Optional[int] = option(10000, "class-balanced subset of the train split (null = all)")
    knn_test_limit: Optional[int] = option(2000, "class-balanced subset of the evaluated split (null = all)")
    knn_split: Literal["test", "val"] = option("test", "Fashion-MNIST: its test set; image folders: test/ or val/")


@dataclass
class LogConfig:
    """Logs besides log.jsonl and train.log."""
    tensorboard: bool = option(False, "also write log.jsonl's scalars to output_dir/tensorboard (needs tensorboard)")


@dataclass
class TrainConfig:
    mode: Literal["dino", "clip"] = option("dino", "dino: self-distillation; clip: image-text contrastive training")
    output_dir: str = option(
        "output", "where config.yaml, checkpoint.pth, log.jsonl and train.log go; re-running resumes")
    seed: int = option(0, "seeds the initial weights, the data order and every augmentation")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda when available, else cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "autocast dtype; auto = bf16 on GPU and on CPUs with native bf16, fp32 on other CPUs")
    tf32: bool = option(False, "fp32 on GPUs (Ampere and newer): matmuls and convolutions in TF32, several times "
                               "faster with a 10-bit mantissa; off, so that fp32 means fp32")
    compile: bool = option(False, "torch.compile the backbone")
    grad_checkpointing: bool = option(False, "recompute each block in backward: less memory, more time")
    log_every: int = option(20, "steps between log.jsonl lines")
    save_every_epochs: int = option(0, "also keep checkpoint_epochNNNN.pth every N epochs (0 = never)")
    max_steps: Optional[int] = option(
        None, "stop after this many steps in total (tests, smoke runs); null = the whole run")
    model: ModelConfig = option(meaning="the image backbone", factory=ModelConfig)
    data: DataConfig = option(meaning="the training images", factory=DataConfig)
    crops: CropsConfig = option(meaning="DINO's multi-crop augmentation", factory=CropsConfig)
    dino: DinoConfig = option(meaning="DINO's head, teacher and loss", factory=DinoConfig)
    ibot: IbotConfig = option(meaning="iBOT's masked-patch loss (DINOv2), beside DINO's", factory=IbotConfig)
    optim: OptimConfig = option(meaning="AdamW and its schedules", factory=OptimConfig)
    clip: ClipConfig = option(meaning="CLIP mode", factory=ClipConfig)
    eval: EvalConfig = option(meaning="evaluation during training", factory=EvalConfig)
    log: LogConfig = option(meaning="logs besides log.jsonl and train.log", factory=LogConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert the harmless cases (int→float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for choice in options:
            if choice is type(None):
                continue
            try:
                return _coerce(value, choice, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' must have {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of its sub-keys, got {value!r}")
        return _build(tp, value, key + ".")
    raise ConfigError(f"config key '{key}' has an unsupported type {_type_name(tp)}")


def _build(cls: type, values: dict, prefix: str = "", base: Any = None) -> Any:
    """Instantiate dataclass ``cls`` from ``values`` over ``base`` (or the defaults)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    result = base if base is not None else cls()
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(prefix + c) for c in sorted(close))}?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{key}' must be a mapping of its sub-keys, got {value!r}")
            setattr(result, key, _build(tp, value, f"{prefix}{key}.", getattr(result, key)))
        else:
            setattr(result, key, _coerce(value, tp, prefix + key))
    return result


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, following ``_base_`` includes (deep-merged, the file's keys win)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} includes itself through _base_")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return deep_merge(_read_yaml(path.parent / base, seen + (path,)), data)


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=1e-3", "model.readout=cls"]`` -> nested dict; values are parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return nested


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                cls: type = TrainConfig, validate: bool = True) -> Any:
    """Defaults, then the YAML file (with its ``_base_``), then the overrides: types checked, and
    (``validate``) the values of a ``TrainConfig`` too (:func:`validate_config`)."""
    values = _read_yaml(Path(path)) if path is not None else {}
    values = deep_merge(values, parse_overrides(overrides or []))
    cfg = _build(cls, values)
    if validate and isinstance(cfg, TrainConfig):
        validate_config(cfg)
    return cfg


class _Checks:
    """The checks of :func:`validate_config` on one config, each refusal naming its key."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def value(self, key: str) -> Any:
        value: Any = self.cfg
        for part in key.split("."):
            value = getattr(value, part)
        return value

    def need(self, key: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' must be {allowed}, got {self.value(key)!r}")

    def at_least(self, key: str, low: int, optional: bool = False) -> None:
        value = self.value(key)
        self.need(key, (optional and value is None) or (value is not None and value >= low),
                  f"an integer >= {low}" + (" or null" if optional else ""))

    def scale(self, key: str) -> None:
        value = self.value(key)
        self.need(key, 0 < value[0] <= value[1] <= 1, "[low, high] with 0 < low <= high <= 1")


def _check_model(c: _Checks, model: ModelConfig) -> None:
    need, at_least, sparo = c.need, c.at_least, model.sparo
    need("model.arch", model.arch in ARCHS, f"one of {sorted(ARCHS)}")
    for key in ("patch_size", "in_chans"):
        at_least(f"model.{key}", 1)
    for key in ("embed_dim", "depth", "num_heads", "reduce_depth"):
        at_least(f"model.{key}", 0 if key == "reduce_depth" else 1, optional=True)
    need("model.img_size", model.img_size >= model.patch_size and model.img_size % model.patch_size == 0,
         f"a multiple of model.patch_size ({model.patch_size})")
    width, depth, heads = ARCHS[model.arch]
    width, depth, heads = model.embed_dim or width, model.depth or depth, model.num_heads or heads
    if model.embed_dim is not None:
        need("model.embed_dim", width % heads == 0, f"a multiple of the number of heads ({heads})")
    else:
        need("model.num_heads", width % heads == 0, f"a divisor of {model.arch}'s width ({width})")
    if model.reduce_depth is not None:
        need("model.reduce_depth", model.reduce_depth < depth, f"in [0, {depth - 1}] (model.depth - 1)")
    else:  # the read-out's default: one block removed before SPARO, none before the class token
        need("model.depth", depth > int(model.readout == "sparo"),
             f"> {int(model.readout == 'sparo')} for model.readout {model.readout}")
    need("model.drop_path_rate", 0 <= model.drop_path_rate < 1, "in [0, 1)")
    at_least("model.num_registers", 0)
    need("model.layer_scale_init", model.layer_scale_init is None or model.layer_scale_init > 0, "> 0, or null for none")
    for key in ("num_slots", "slot_dim"):
        at_least(f"model.sparo.{key}", 1)
    for key in ("attn_dim", "value_dim", "num_heads"):
        at_least(f"model.sparo.{key}", 1, optional=True)
    need("model.sparo.norm", sparo.norm in SPARO_NORMS, f"one of {list(SPARO_NORMS)}")
    need("model.sparo.num_slots", sparo.num_heads is None or sparo.num_slots % sparo.num_heads == 0,
         f"a multiple of model.sparo.num_heads ({sparo.num_heads})")


def _check_data_optim_eval(c: _Checks, cfg: TrainConfig) -> None:
    need, at_least, optim = c.need, c.at_least, cfg.optim
    at_least("data.batch_size_per_gpu", 1)
    at_least("data.num_workers", 0)
    at_least("data.limit", 0, optional=True)
    at_least("optim.epochs", 1)
    need("optim.lr", optim.lr > 0, "> 0")
    for key in ("min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
        need(f"optim.{key}", getattr(optim, key) >= 0, ">= 0")
    for key in ("warmup_steps", "freeze_last_layer"):
        at_least(f"optim.{key}", 0)
    at_least("optim.warmup_epochs", 0)  # longer than the run: refused where the schedule is built, naming it
    at_least("eval.knn_every", 0)  # evaluation during training
    at_least("eval.knn_k", 1)
    need("eval.knn_temperature", cfg.eval.knn_temperature > 0, "> 0")
    at_least("eval.knn_train_limit", 1, optional=True)
    at_least("eval.knn_test_limit", 1, optional=True)
    if cfg.data.dataset == "scenes" or (cfg.mode == "clip" and cfg.clip.dataset == "scenes"):
        check_scene_settings(cfg.data.scenes)
    _check_images(c, cfg)


def _check_images(c: _Checks, cfg: TrainConfig) -> None:
    """Channels, normalisation and the image sources: refused here rather than at the first forward."""
    need, data, channels = c.need, cfg.data, cfg.model.in_chans
    need("model.in_chans", channels in (1, 3), "1 (grey images) or 3 (RGB)")
    if cfg.mode == "clip":
        need("model.in_chans", channels == 3, "3 in CLIP mode (clip.image_mean and image_std are RGB)")
    need("data.alpha_background", all(0 <= v <= 255 for v in data.alpha_background), "an RGB triple in 0..255")
    for key in ("mean", "std"):
        values = getattr(data, key)
        need(f"data.{key}", values is None or len(values) == channels,
             f"null or a list of model.in_chans ({channels}) values, one per channel")
    need("data.std", data.std is None or all(v > 0 for v in data.std), "null or values > 0")
    if data.dataset == "webdataset":
        need("data.dataset", cfg.mode == "dino", "not webdataset in CLIP mode (its shards are clip.train_data)")
        need("eval.knn_every", cfg.eval.knn_every == 0,
             "0 with data.dataset webdataset (k-NN needs a labelled image folder: evaluate afterwards with "
             "dino-sparo-knn on one)")


def _check_dino(c: _Checks, cfg: TrainConfig) -> None:
    need, at_least, crops, dino, patch = c.need, c.at_least, cfg.crops, cfg.dino, cfg.model.patch_size
    need("crops.global_crops_number", crops.global_crops_number == 2, "2 (DINO's loss pairs two global crops)")
    at_least("crops.local_crops_number", 0)
    need("crops.global_crops_size", crops.global_crops_size % patch == 0, f"a multiple of model.patch_size ({patch})")
    at_least("crops.global_crops_size", patch)
    if crops.local_crops_number:
        need("crops.local_crops_size", crops.local_crops_size % patch == 0,
             f"a multiple of model.patch_size ({patch})")
        at_least("crops.local_crops_size", patch)
    c.scale("crops.global_crops_scale")
    c.scale("crops.local_crops_scale")
    need("crops.color_jitter_strength", 0 <= crops.color_jitter_strength <= 5,
         "in [0, 5] (the hue jitter, 0.1 × this, must stay <= 0.5)")
    need("crops.grayscale_prob", 0 <= crops.grayscale_prob <= 1, "a probability in [0, 1]")
    if cfg.data.augment_on == "device":  # the batched ops follow DINO's colour recipe on three channels
        need("crops.color_jitter_strength", crops.color_jitter_strength == 1.0, "1.0 with data.augment_on: device")
        need("crops.grayscale_prob", crops.grayscale_prob == 0.2, "0.2 with data.augment_on: device")
        need("model.in_chans", cfg.model.in_chans == 3, "3 with data.augment_on: device")
        need("data.augment_on", not cfg.ibot.loss_weight, "'loader' with iBOT (ibot.loss_weight > 0): the device "
             "path does not carry the masks yet")
    for key in ("out_dim", "head_hidden_dim", "head_bottleneck_dim"):
        at_least(f"dino.{key}", 1)
    for key in ("momentum_teacher", "center_momentum"):
        need(f"dino.{key}", 0 <= getattr(dino, key) <= 1, "in [0, 1]")
    for key in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
        need(f"dino.{key}", getattr(dino, key) > 0, "> 0")
    need("dino.warmup_teacher_temp_epochs", 0 <= dino.warmup_teacher_temp_epochs <= cfg.optim.epochs,
         f"in [0, optim.epochs ({cfg.optim.epochs})]")
    need("dino.koleo_weight", dino.koleo_weight >= 0, ">= 0")
    _check_ibot(c, cfg)


def _check_ibot(c: _Checks, cfg: TrainConfig) -> None:
    need, ibot = c.need, cfg.ibot
    need("ibot.loss_weight", ibot.loss_weight >= 0, ">= 0")
    need("ibot.mask_probability", 0 <= ibot.mask_probability <= 1, "in [0, 1]")
    need("ibot.mask_ratio", len(ibot.mask_ratio) == 2 and 0 <= ibot.mask_ratio[0] <= ibot.mask_ratio[1] <= 1,
         "[low, high] with 0 <= low <= high <= 1")
    c.at_least("ibot.out_dim", 1, optional=True)
    if ibot.loss_weight and not ibot.separate_head:
        model = cfg.model
        width = model.embed_dim or ARCHS[model.arch][0]
        readout_width = width if model.readout == "cls" else model.sparo.num_slots * model.sparo.slot_dim
        need("ibot.separate_head", readout_width == width,
             f"true with model.readout {model.readout}: the DINO head takes the read-out's {readout_width} "
             f"dims, the patch tokens have {width}")


def _check_clip(c: _Checks, cfg: TrainConfig) -> None:
    need, at_least, clip, batch = c.need, c.at_least, cfg.clip, cfg.data.batch_size_per_gpu
    for key in ("text_width", "text_depth", "text_heads", "embed_dim"):
        at_least(f"clip.{key}", 1)
    need("clip.text_width", clip.text_width % clip.text_heads == 0,
         f"a multiple of clip.text_heads ({clip.text_heads})")
    at_least("clip.context_length", 2)
    need("clip.accum_steps", clip.accum_steps >= 1 and batch % clip.accum_steps == 0,
         f"an integer >= 1 that divides data.batch_size_per_gpu ({batch})")
    need("clip.init_temperature", clip.init_temperature > 0, "> 0")
    need("data.augment_on", cfg.data.augment_on == "loader", "'loader' in CLIP mode (device is DINO's multi-crop)")
    c.scale("clip.crop_scale")
    need("clip.crop_ratio", 0 < clip.crop_ratio[0] <= clip.crop_ratio[1], "(low, high) with 0 < low <= high")
    at_least("clip.zeroshot_every_epochs", 0)


def check_scene_settings(s: Any, key: str = "data.scenes") -> None:
    """Refuse scene-world settings the world cannot honour, naming the key (configs and the
    world's own constructor both call this)."""
    objects, distractors = tuple(s.objects), tuple(s.distractors)
    rules = [
        ("size", 16 <= s.size <= 256, "within 16..256 pixels"),
        ("shapes", 2 <= s.shapes <= len(SCENE_SHAPES), f"within 2..{len(SCENE_SHAPES)}"),
        ("colours", 2 <= s.colours <= len(SCENE_COLOURS), f"within 2..{len(SCENE_COLOURS)}"),
        ("sizes", s.sizes in (1, 2), "1 or 2"),
        ("objects", len(objects) == 2 and 1 <= objects[0] <= objects[1] <= 4, "[low, high], 1 <= low <= high <= 4"),
        ("distractors", len(distractors) == 2 and 0 <= distractors[0] <= distractors[1]
         and objects[-1] + distractors[-1] <= 5, "[low, high], 0 <= low <= high, at most 5 objects in all"),
        ("size_words", 0 <= s.size_words <= 1, "a probability"),
        ("heldout_pairs", 0 <= s.heldout_pairs <= min(s.shapes, s.colours),
         f"within 0..min(shapes, colours) = {min(s.shapes, s.colours)} (one pair per colour and shape at most)"),
        ("margin", 0 <= s.margin < 0.5, "a fraction of the canvas in [0, 0.5)"),
        ("train_size", s.train_size >= 1, ">= 1"),
        ("test_size", s.test_size >= 1, ">= 1"),
    ]
    for name, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"config key '{key}.{name}' must be {allowed}, got {getattr(s, name)!r}")


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Refuse values that have the right type but that the program cannot use, naming the key and
    what is allowed, before anything is built (instead of an error at the first forward)."""
    checks = _Checks(cfg)
    checks.at_least("log_every", 1)
    checks.at_least("save_every_epochs", 0)
    checks.at_least("max_steps", 1, optional=True)
    _check_model(checks, cfg.model)
    _check_data_optim_eval(checks, cfg)
    (_check_dino if cfg.mode == "dino" else _check_clip)(checks, cfg)
    return cfg


def _describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe_type(a) for a in args)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_describe_type(a) for a in args) + "]"
    if origin is list:
        return f"list of {_describe_type(args[0])}"
    return _type_name(tp)


def _describe_value(value: Any, in_list: bool = False) -> str:
    """As one would write it in YAML or on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_describe_value(v, in_list=True) for v in value) + "]"
    if isinstance(value, str) and in_list:
        return '"' + value.replace('"', '\\"') + '"'
    return str(value)


def config_reference(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every config key as ``(key, type, default, meaning)``, in the dataclasses' order, read from
    their annotations, defaults and ``option(meaning=...)``: the reference cannot drift from the code.
    A section (a nested dataclass) comes as one row with an empty type, before its keys."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key, tp, meaning = prefix + f.name, hints[f.name], f.metadata.get("meaning", "")
        if dataclasses.is_dataclass(tp):
            rows.append((key, "", "", meaning))
            rows.extend(config_reference(tp, key + "."))
        else:
            rows.append((key, _describe_type(tp), _describe_value(getattr(defaults, f.name)), meaning))
    return rows


def format_config_reference(cls: type = TrainConfig) -> str:
    """The text of ``dino-sparo-train --help-config``: one line per key, sections as headings."""
    lines = ["Config keys: set them in the YAML file, or on the command line as key.sub=value.",
             "key = default  (type)  meaning"]
    for key, tp, default, meaning in config_reference(cls):
        if not tp:
            lines += ["", f"{key}: {meaning}"]
        else:
            lines.append(f"  {key} = {default}  ({tp})  {meaning}")
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML and checkpoints."""
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(cfg))


def from_dict(values: dict, cls: type = TrainConfig) -> Any:
    return _build(cls, values)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
