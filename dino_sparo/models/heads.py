"""The DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

Same architecture, initialisation and parameter semantics as facebookresearch/dino's `DINOHead`,
built on `torch.nn.utils.parametrizations.weight_norm` (the hook-based `nn.utils.weight_norm` is
deprecated and breaks `copy.deepcopy`). Checkpoints with DINO's `last_layer.weight_g/weight_v`
keys still load: the parametrisation converts them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """`in_dim` embedding -> `out_dim` logits (the prototypes scored by the DINO loss).

    With `norm_last_layer` (DINO's default) the weight-norm magnitude g is fixed at 1 and not
    trained, so each prototype is a unit vector and the logits are cosine similarities; this
    stabilises training. The last layer is `self.last_layer`: its parameters' names contain
    "last_layer", and `last_layer_parameters()` yields them for freezing in the first epoch(s).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        # Created after `apply`, as in DINO: the prototypes keep nn.Linear's default init (only their
        # directions matter once g = 1).
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # g: out_dim × 1
        with torch.no_grad():
            magnitude.fill_(1.0)
        if norm_last_layer:
            magnitude.requires_grad_(False)
        self.norm_last_layer = norm_last_layer

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            # DINO's trunc_normal_(std=.02) truncates at ±2 (absolute), i.e. effectively untruncated.
            nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # B × bottleneck_dim
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)  # B × out_dim

    def last_layer_parameters(self) -> Iterator[nn.Parameter]:
        """The prototype layer's parameters (direction v and magnitude g; g has requires_grad=False
        when `norm_last_layer`): drop their gradients, or give them lr 0, while the layer is frozen."""
        return self.last_layer.parameters()
