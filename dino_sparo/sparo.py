"""SPARO: the read-out both training modes share (Vani et al., ECCV 2024).

A transformer's final (normed) tokens ``x`` (``B × N × D``) are read out into L separately
attended slots: each slot is one single-head attention with a learned query over keys from one
linear layer per head, its value projected to V dims. Slots are normalised and concatenated into
one ``L·V`` embedding. The definition follows the authors' reference implementation (see
``docs/architecture.md``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dino_sparo.config import SPARO_NORMS as NORMS
from dino_sparo.config import SPARO_REPRESENTATIONS as REPRESENTATIONS
from dino_sparo.config import SPARO_WEIGHTINGS as WEIGHTINGS
from dino_sparo.layers.attention import attention



@dataclass
class SparoOutput:
    embedding: torch.Tensor  # B × (L·V), normalised as ``norm`` says
    slots: torch.Tensor  # B × L × V, the same values unflattened
    attn: Optional[torch.Tensor]  # B × L × N, each slot's attention over the tokens


def parse_norm(norm: str) -> tuple[str, str]:
    """Split ``"rep:weighting"`` and refuse unknown settings by name."""
    parts = norm.split(":")
    if len(parts) != 2 or parts[0] not in REPRESENTATIONS or parts[1] not in WEIGHTINGS:
        raise ValueError(f"SPARO norm must be one of {', '.join(NORMS)}; got {norm!r}")
    return parts[0], parts[1]


def normalize_slots(raw: torch.Tensor, norm: str = "cont:const") -> torch.Tensor:
    """Normalise raw slot outputs ``B × L × V'`` into slots ``B × L × V`` whose concatenation has
    unit norm. Half-precision inputs are computed in float32, float32 and float64 in their own precision.

    The representation (``cont``: the vector itself; ``sem``: a softmax within the slot;
    ``sqrtsem``: its square root) gives each slot's unit direction; the weighting gives each slot's
    share of the norm: ``const`` = sqrt(1/L) (the paper's setting: cosine similarity is then the mean
    of per-slot cosines), ``norm`` = the slot's norm over the whole vector's, ``softmax`` /
    ``sqrtsoftmax`` = a softmax over one extra logit per slot (the last of ``V' = V + 1`` outputs),
    renormalised or square-rooted.
    """
    rep, weighting = parse_norm(norm)
    if weighting in ("softmax", "sqrtsoftmax"):
        raw, logits = raw[..., :-1], raw[..., -1]  # B × L × V, B × L
    compute = torch.promote_types(raw.dtype, torch.float32)  # half precisions upcast, float64 stays
    raw = raw.to(compute)
    if rep == "cont":
        content = raw
    else:
        content = raw.softmax(dim=-1)
        if rep == "sqrtsem":
            content = content.sqrt()
    direction = F.normalize(content, dim=-1)  # B × L × V, unit per slot
    num_slots = raw.shape[-2]
    if weighting == "const":
        weights = raw.new_full(raw.shape[:-1], math.sqrt(1.0 / num_slots))
    elif weighting == "norm":
        slot_norms = content.norm(dim=-1)  # B × L
        weights = slot_norms / slot_norms.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    elif weighting == "softmax":
        weights = F.normalize(logits.to(compute).softmax(dim=-1), dim=-1)
    else:
        weights = logits.to(compute).softmax(dim=-1).sqrt()
    return direction * weights.unsqueeze(-1)


def keep_slots(slots: torch.Tensor, keep: Sequence[int]) -> torch.Tensor:
    """Embedding from a subset of slots: the others dropped, the rest renormalised to unit norm.

    ``slots`` is ``B × L × V`` (or a flat ``B × (L·V)`` embedding together with ``.view``); returns
    ``B × (|keep|·V)``. Under ``cont:const`` this rescales by sqrt(L/|keep|), so the cosine
    similarity stays the mean of the kept slots' cosines.
    """
    index = torch.as_tensor(list(keep), dtype=torch.long, device=slots.device)
    if index.numel() == 0:
        raise ValueError("keep_slots: choose at least one slot")
    if int(index.min()) < 0 or int(index.max()) >= slots.shape[1]:
        raise ValueError(f"keep_slots: slot ids must lie in [0, {slots.shape[1] - 1}], got {list(keep)}")
    kept = slots.index_select(1, index).flatten(1)
    return F.normalize(kept, dim=-1)


def _drop_unused_key_bias(module: "SPARO", state_dict: dict, prefix: str, *args: Any) -> None:
    """Checkpoints written before the unused key bias was left out (``share_kv: false``) still load:
    the bias never changed an output, so dropping it loses nothing."""
    if module.key.bias is None:
        state_dict.pop(prefix + "key.bias", None)


class SPARO(nn.Module):
    """The SPARO read-out.

    Args:
        dim: width D of the tokens read.
        num_slots: L, the number of slots.
        slot_dim: V, the dims of each slot after the output projection.
        attn_dim: d_a, key/query width (default: 64).
        value_dim: d_v, value width (default: d_a; must equal d_a when ``share_kv``).
        num_heads: h key/value projections (default L); when h < L each head serves L/h slots
            ("sub-heads") with their own queries.
        share_kv: values are the very same vectors as the keys.
        norm: slot normalisation ``rep:weighting`` (see :func:`normalize_slots`).
    """

    def __init__(
        self,
        dim: int,
        num_slots: int = 64,
        slot_dim: int = 64,
        attn_dim: Optional[int] = None,
        value_dim: Optional[int] = None,
        num_heads: Optional[int] = None,
        share_kv: bool = True,
        norm: str = "cont:const",
    ) -> None:
        super().__init__()
        parse_norm(norm)
        attn_dim = attn_dim or 64
        value_dim = value_dim or attn_dim
        num_heads = num_heads or num_slots
        if num_slots % num_heads:
            raise ValueError(f"SPARO num_slots ({num_slots}) must be a multiple of num_heads ({num_heads})")
        if share_kv and value_dim != attn_dim:
            raise ValueError(f"SPARO share_kv needs value_dim == attn_dim, got {value_dim} != {attn_dim}")
        self.dim, self.num_slots, self.slot_dim = dim, num_slots, slot_dim
        self.attn_dim, self.value_dim, self.num_heads = attn_dim, value_dim, num_heads
        self.share_kv, self.norm = share_kv, norm
        self.slots_per_head = num_slots // num_heads

        # The key bias only adds a per-slot constant to the logits, which the softmax ignores: it is kept
        # where it is the value bias too (share_kv) and left out otherwise, where it would get no gradient
        # (DistributedDataParallel then fails at its second step waiting for it).
        self.key = nn.Linear(dim, num_heads * attn_dim, bias=share_kv)
        self.value = None if share_kv else nn.Linear(dim, num_heads * value_dim)
        self.register_load_state_dict_pre_hook(_drop_unused_key_bias)
        self.queries = nn.Parameter(torch.randn(num_heads, self.slots_per_head, attn_dim))
        extra = 1 if parse_norm(norm)[1] in ("softmax", "sqrtsoftmax") else 0
        self.out_proj = nn.Linear(value_dim, slot_dim + extra)
        for layer in (self.key, self.value):
            if layer is not None:
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.out_proj.bias)

    @property
    def embed_dim(self) -> int:
        """Width of the embedding: L·V."""
        return self.num_slots * self.slot_dim

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        return_attn: bool = True,
    ) -> SparoOutput:
        """Read out ``x`` (``B × N × D``); ``key_padding_mask`` (``B × N``) is True where a token
        must be ignored. ``return_attn=False`` returns no weights. The read-out's attention is small
        (``L × N`` per image) and always runs explicitly, so it takes no attention backend.

        Computed in the tokens' space, exactly: slot l's logit ``q·(W x + b) / sqrt(d_a)`` is
        ``(Wᵀq)·x / sqrt(d_a)`` plus a constant that the softmax ignores, and its output
        ``Σ_n a_n (V x_n + c)`` is ``V (Σ_n a_n x_n) + c`` because the weights sum to one. So the keys
        and values of every token (``N × h·d_a``: ten times the width of ViT-S's tokens with the
        default L = 64) are never formed, and the read-out costs ``L·D`` per token instead of ``h·d_a·D``.
        """
        b, n, d = x.shape
        h, s = self.num_heads, self.slots_per_head
        key_weight = self.key.weight.view(h, self.attn_dim, d)  # h × d_a × D
        folded = torch.einsum("hsa,had->hsd", self.queries, key_weight).reshape(1, 1, h * s, d)  # 1 × 1 × L × D
        folded = folded * math.sqrt(d / self.attn_dim)  # attention() divides by sqrt(D); the logits want sqrt(d_a)
        # Each query is its own single-head attention: the h heads only group slots sharing k/v.
        pooled, weights = attention(
            folded.to(x.dtype), x.unsqueeze(1), x.unsqueeze(1), backend="math",
            key_padding_mask=key_padding_mask, return_weights=True,
        )  # B × 1 × L × D (each slot's attention-weighted token), B × 1 × L × N
        projection = self.key if self.value is None else self.value
        value_weight = projection.weight.view(h, self.value_dim, d)  # h × d_v × D
        out = torch.einsum("bhsd,hvd->bhsv", pooled.view(b, h, s, d), value_weight)
        out = out + projection.bias.view(h, 1, self.value_dim)  # B × h × L/h × d_v
        raw = self.out_proj(out.reshape(b, h * s, self.value_dim))  # B × L × V'
        slots = normalize_slots(raw, self.norm).to(x.dtype)  # B × L × V
        attn = weights.reshape(b, h * s, n) if return_attn else None
        return SparoOutput(embedding=slots.flatten(1), slots=slots, attn=attn)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_slots={self.num_slots}, slot_dim={self.slot_dim}, "
                f"attn_dim={self.attn_dim}, value_dim={self.value_dim}, num_heads={self.num_heads}, "
                f"share_kv={self.share_kv}, norm={self.norm!r}")


# keys of the ``model.sparo`` config section that are the backbone's, not SPARO's own arguments
BACKBONE_KEYS = ("attend_registers",)


def readout_options(section: Any) -> dict:
    """SPARO's arguments from a ``model.sparo`` config section (a dataclass or a dict): the keys set,
    without the backbone's (:data:`BACKBONE_KEYS`)."""
    options = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
    return {k: v for k, v in options.items() if v is not None and k not in BACKBONE_KEYS}


def create_readout(kind: str, dim: int, num_heads: int, options: Optional[dict] = None) -> Optional[SPARO]:
    """The read-out of a tower of width ``dim``: SPARO for ``kind == "sparo"`` (``options`` are its
    arguments; the key width defaults to the tower's head width ``dim // num_heads``, as the SPARO
    paper sets it), else None: the tower reads one of its own tokens (class or end-of-text)."""
    if kind != "sparo":
        return None
    options = dict(options or {})
    options.setdefault("attn_dim", dim // num_heads)
    return SPARO(dim, **options)
