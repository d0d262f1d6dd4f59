"""CLIP's text tower on the project's own blocks, and the glue to CLIP's BPE tokeniser.

The tower is a causal transformer (CLIP's: width 512, 8 heads, 12 layers, 77 tokens) whose final
LayerNorm is applied to every token. Its read-out is either SPARO over those normed tokens, with
every position after the end-of-text token masked out (the SPARO paper's text tower), or the
end-of-text token itself (plain CLIP; the joint projection lives in
:class:`dino_sparo.models.clip.CLIPModel`). Causal attention means no token up to the end-of-text
token ever sees the padding, so neither read-out depends on what follows it.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import nn

from dino_sparo.errors import ConfigError
from dino_sparo.layers.block import Block
from dino_sparo.sparo import SPARO, create_readout

logger = logging.getLogger(__name__)

TEXT_READOUTS = ("sparo", "eot")
CONTEXT_LENGTH = 77  # every released CLIP model
VOCAB_SIZE = 49408  # CLIP's BPE: 49152 merges and bytes, start- and end-of-text tokens
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407


class Tokenizer:
    """CLIP's byte-pair tokeniser, from the vocabulary file shipped in open_clip_torch's wheel.

    ``tokenizer(["a photo of a cat."])`` -> ``B × context_length`` int64: start-of-text, the BPE
    ids, end-of-text, zero padding; too long captions are truncated with the end-of-text token
    kept last (open_clip's behaviour). Imported lazily: only CLIP mode needs open_clip.
    """

    def __init__(self, context_length: int = CONTEXT_LENGTH) -> None:
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError("CLIP mode needs open_clip_torch for its BPE vocabulary: "
                              "pip install 'dino_sparo[clip]'") from exc
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start- and end-of-text), got {context_length}")
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab_size = self._bpe.vocab_size
        self.sot_token_id = self._bpe.sot_token_id
        self.eot_token_id = self._bpe.eot_token_id

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self._bpe(list(texts), context_length=self.context_length)  # B × context_length

    def decode(self, tokens: torch.Tensor | Sequence[int]) -> str:
        """Text of one token row, without the special tokens and the padding after end-of-text."""
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        ids = [i for i in ids if i != self.sot_token_id]
        return self._bpe.decode(ids).strip()


def eot_positions(tokens: torch.Tensor, eot_token_id: int = EOT_TOKEN_ID) -> torch.Tensor:
    """Index of the first end-of-text token in each row of ``tokens`` (``B × N``); the last
    position for a row without one (no host sync, so no error can be raised here)."""
    is_eot = tokens == eot_token_id  # B × N
    first = is_eot.int().argmax(dim=-1)  # argmax returns the first maximum
    return torch.where(is_eot.any(dim=-1), first, torch.full_like(first, tokens.shape[-1] - 1))


def padding_mask(tokens: torch.Tensor, eot_token_id: int = EOT_TOKEN_ID) -> torch.Tensor:
    """``B × N`` bool, True after the end-of-text token: the positions a read-out must ignore."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    return positions[None, :] > eot_positions(tokens, eot_token_id)[:, None]


class TextTransformer(nn.Module):
    """Causal text transformer returning a SPARO embedding (``L·V``) or the end-of-text token (``width``).

    ``depth`` is the architecture's depth; ``reduce_depth`` blocks are removed from its end so the
    SPARO read-out takes the place of their parameters (default 1 for SPARO, 0 for ``eot``).
    Parameter names follow CLIP's (``token_embedding``, ``positional_embedding``, ``ln_final``).
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        context_length: int = CONTEXT_LENGTH,
        width: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        readout: str = "sparo",
        reduce_depth: Optional[int] = None,
        sparo: Optional[dict] = None,
        eot_token_id: int = EOT_TOKEN_ID,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        if readout not in TEXT_READOUTS:
            raise ConfigError(f"config key 'clip.text_readout' must be one of {TEXT_READOUTS}, got {readout!r}")
        if reduce_depth is None:
            reduce_depth = 1 if readout == "sparo" else 0
        if not 0 <= reduce_depth < depth:
            raise ConfigError(f"config key 'clip.text_reduce_depth' must lie in [0, {depth - 1}], got {reduce_depth}")
        if not 0 <= eot_token_id < vocab_size:
            raise ValueError(f"eot_token_id {eot_token_id} lies outside the vocabulary of {vocab_size}")
        self.readout_type = readout
        self.context_length, self.vocab_size, self.eot_token_id = context_length, vocab_size, eot_token_id
        self.width, self.num_heads, self.arch_depth, self.reduce_depth = width, num_heads, depth, reduce_depth
        self.attn_backend = attn_backend
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias=True, attn_backend=attn_backend)
            for _ in range(depth - reduce_depth)
        )
        self.ln_final = nn.LayerNorm(width)
        self.sparo: Optional[SPARO] = create_readout(readout, width, num_heads, sparo)
        self.out_dim = width if self.sparo is None else self.sparo.embed_dim
        self._init_weights()

    def _init_weights(self) -> None:
        """CLIP's initialisation (residual projections scaled down with the architecture's depth)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.arch_depth) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(layer.bias)

    def set_attn_backend(self, backend: str) -> None:
        self.attn_backend = backend
        for block in self.blocks:
            block.attn.backend = backend

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-normed tokens ``B × N × width`` from token ids ``B × N`` (N <= context_length)."""
        n = tokens.shape[-1]
        if n > self.context_length:
            raise ValueError(f"text of {n} tokens exceeds the context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        for block in self.blocks:
            x = block(x, is_causal=True)  # B × N × width
        return self.ln_final(x)

    def readout(self, tokens: torch.Tensor, normed: torch.Tensor, return_attn: bool = False):
        """Embedding of ``normed`` tokens (ids in ``tokens`` locate the end of text); with
        ``return_attn`` also SPARO's ``B × L × N`` weights (zero after the end of text)."""
        if self.sparo is None:
            eot = eot_positions(tokens, self.eot_token_id)
            return normed[torch.arange(normed.shape[0], device=normed.device), eot], None  # B × width
        out = self.sparo(normed, key_padding_mask=padding_mask(tokens, self.eot_token_id),
                         return_attn=return_attn)
        return out.embedding, out.attn

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embedding, _ = self.readout(tokens, self.forward_tokens(tokens))
        return embedding
