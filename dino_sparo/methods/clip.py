"""CLIP: contrastive image–text training with SPARO (or class/end-of-text token) read-outs on both towers.

Gradient accumulation (``clip.accum_steps``) splits each batch into micro-batches without
shrinking the contrastive problem (open_clip's ``accum_freq``): the embeddings of every micro-batch
are first computed without gradient; then each micro-batch is recomputed with gradient and scored
against all the others' cached embeddings. The gradients of all but the last micro-batch are
collected inside :meth:`ClipMethod.loss` and handed to the loop's backward pass through a term of
value zero, so the loop sees one loss and one backward pass, as in any other method.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from dino_sparo import distributed
from dino_sparo.runtime import preserved_rng, resolve_precision
from dino_sparo.config import DataConfig
from dino_sparo.data.captions import build_caption_dataset, clip_labelled_data
from dino_sparo.data.transforms import clip_eval_transform, clip_train_transform
from dino_sparo.errors import ConfigError
from dino_sparo.losses import ClipLoss
from dino_sparo.methods.base import Method, param_groups, shard_index_cache
from dino_sparo.evaluation.periodic import PeriodicZeroShot
from dino_sparo.models.clip import baseline_config, build_clip_model, describe_parameters
from dino_sparo.models.text import Tokenizer
from dino_sparo.models.vit import count_parameters

logger = logging.getLogger(__name__)


class ClipMethod(Method):
    def __init__(self, cfg: Any, device: torch.device) -> None:
        super().__init__(cfg, device)
        clip = cfg.clip
        if clip.accum_steps > 1 and cfg.precision == "fp16":
            raise ConfigError("config key 'clip.accum_steps' > 1 needs precision bf16 or fp32: the micro-batch "
                             "gradients collected inside the step are not loss-scaled")
        self.tokenizer = Tokenizer(clip.context_length)
        self.model = build_clip_model(cfg).to(device)
        self.train_module: nn.Module = self.model
        self.loss_fn = ClipLoss(local_loss=clip.local_loss, gather_with_grad=clip.gather_with_grad)

    def train_dataset(self) -> Dataset:
        clip = self.cfg.clip
        transform = clip_train_transform(self.cfg.model.img_size, clip.crop_scale, clip.image_mean, clip.image_std,
                                         clip.crop_ratio)
        return build_caption_dataset(self.cfg, transform, self.tokenizer, index_cache=shard_index_cache(self.cfg))

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def modules_to_optimise(self) -> nn.Module:
        return self.model

    def eval_backbone(self) -> nn.Module:
        return self.model.visual  # the image tower

    def eval_data(self) -> tuple[Any, Callable]:
        clip = self.cfg.clip
        return clip_labelled_data(self.cfg), clip_eval_transform(self.cfg.model.img_size, clip.image_mean,
                                                                 clip.image_std)

    def param_groups(self) -> list[dict]:
        # CLIP's AdamW betas (0.9, 0.98) and eps 1e-6, carried by the groups themselves
        return param_groups(self.model, betas=tuple(self.cfg.clip.betas), eps=self.cfg.clip.eps)

    def batch_size(self, batch: Any) -> int:
        return batch[0].shape[0]

    def loss(self, batch: Any, step: int, epoch: int, teacher_temp: Optional[float] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch[0].to(self.device, non_blocking=True)  # B × 3 × H × W
        tokens = batch[1].to(self.device, non_blocking=True)  # B × context_length
        if self.cfg.clip.accum_steps == 1:
            image_features, text_features, scale = self.train_module(images, tokens)
            loss = self.loss_fn(image_features, text_features, scale)
        else:
            loss, image_features, text_features, scale = self._accumulated_loss(images, tokens)
        positive = (image_features.detach().float() * text_features.detach().float()).sum(-1).mean()
        return loss, {"logit_scale": scale.detach(), "positive_cosine": positive}

    def _accumulated_loss(self, images: torch.Tensor, tokens: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss of the whole batch, computed one micro-batch at a time (see the module's doc)."""
        steps = self.cfg.clip.accum_steps
        image_chunks, token_chunks = images.chunk(steps), tokens.chunk(steps)
        with torch.no_grad():
            cached = [self.model(i, t) for i, t in zip(image_chunks, token_chunks)]
        cached_images, cached_texts = [c[0] for c in cached], [c[1] for c in cached]
        params = [p for p in self.model.parameters() if p.requires_grad]
        collected: list[torch.Tensor | None] = [None] * len(params)
        no_sync = getattr(self.train_module, "no_sync", nullcontext)  # DDP: reduce once, in the loop
        for j in range(steps):
            last = j == steps - 1
            with nullcontext() if last else no_sync():
                image_j, text_j, scale = self.train_module(image_chunks[j], token_chunks[j])
                all_images = torch.cat(cached_images[:j] + [image_j] + cached_images[j + 1:])
                all_texts = torch.cat(cached_texts[:j] + [text_j] + cached_texts[j + 1:])
                # the logit scale's gradient is taken once, in the last micro-batch
                loss = self.loss_fn(all_images, all_texts, scale if last else scale.detach())
                if not last:
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    collected = [c if g is None else (g if c is None else c + g) for c, g in zip(collected, grads)]
        # Zero-valued term whose gradient is the collected one: the loop's backward adds it.
        carried = [(p, g) for p, g in zip(params, collected) if g is not None]
        if carried:
            loss = loss + sum((p * g).sum() - (p.detach() * g).sum() for p, g in carried)
        return loss, all_images, all_texts, scale

    @torch.no_grad()
    def after_optimizer_step(self, step: int, momentum: Optional[float] = None) -> None:
        self.model.clamp_logit_scale()

    def epoch_end_hooks(self) -> list:
        """k-NN of the image tower when configured, then zero-shot every ``clip.zeroshot_every_epochs``
        (its test set built here, once, on the main process only)."""
        hooks = super().epoch_end_hooks()
        every = self.cfg.clip.zeroshot_every_epochs
        if every:
            with preserved_rng(self.device):  # building it draws nothing from the run's random streams
                name, test_set, classnames, templates = (self._zeroshot_inputs() if distributed.is_main_process()
                                                         else ("", None, [], []))
            hooks.append(PeriodicZeroShot(every, self.model, self.tokenizer, name, test_set, classnames, templates,
                                          self.cfg.data.batch_size_per_gpu, self.cfg.data.num_workers, self.device,
                                          resolve_precision(self.cfg.precision, self.device)))
        return hooks

    def _zeroshot_inputs(self) -> tuple[str, Dataset, list[str], list[str]]:
        """What zero-shot during training scores: ``(name, test set, class names, prompt templates)``."""
        from dino_sparo.data.datasets import build_dataset  # noqa: PLC0415
        from dino_sparo.evaluation.zeroshot import load_classnames, load_templates  # noqa: PLC0415

        clip = self.cfg.clip
        transform = clip_eval_transform(self.cfg.model.img_size, clip.image_mean, clip.image_std)
        if clip.dataset == "scenes" and not clip.zeroshot_data:  # colour + shape of one-object scenes
            from dino_sparo.data.scenes import SceneImages, world_of, zeroshot_prompts  # noqa: PLC0415

            name = "colour_shape"
            test_set = SceneImages(world_of(self.cfg.data.scenes), "test", transform, label=name, single=True,
                                   limit=2000)
            classnames, templates = zeroshot_prompts(name, self.cfg.data.scenes.shapes, self.cfg.data.scenes.colours)
        else:
            name = clip.zeroshot_data or "fashion_mnist"
            if name == "fashion_mnist":
                labelled = clip_labelled_data(self.cfg)
                path = labelled.path if labelled.dataset == "fashion_mnist" else self.cfg.data.path
                data_cfg, split = DataConfig(dataset="fashion_mnist", path=path), "test"
            else:
                data_cfg, split = DataConfig(dataset="imagefolder", path=name), "val"
            test_set = build_dataset(data_cfg, split, transform)
            classnames = load_classnames(clip.zeroshot_classnames, test_set.classes)
            templates = load_templates(clip.zeroshot_templates, clip.templates, data_cfg.dataset)
        return name, test_set, classnames, templates

    def describe(self) -> list[str]:
        lines = describe_parameters(self.model)
        if self.model.is_sparo:
            baseline = build_clip_model(baseline_config(self.cfg))
            ours, theirs = count_parameters(self.model), count_parameters(baseline)
            lines.append(f"plain-CLIP baseline (class / end-of-text token + projection, all blocks): {theirs:,} "
                         f"parameters (the SPARO model is {ours / theirs:.3f}× its size)")
        if self.cfg.clip.accum_steps > 1:
            lines.append(f"gradient accumulation: {self.cfg.clip.accum_steps} micro-batches of "
                         f"{self.cfg.data.batch_size_per_gpu // self.cfg.clip.accum_steps} per process")
        return lines
