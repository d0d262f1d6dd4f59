"""Building blocks below the models: the attention every transformer and the SPARO read-out run on."""

from dino_sparo.layers.attention import Attention, attention, resolve_attention_backend, xformers_available

__all__ = ["Attention", "attention", "resolve_attention_backend", "xformers_available"]
