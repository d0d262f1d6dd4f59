"""dino_sparo: self-supervised Vision Transformers (DINO, CLIP) with SPARO read-outs."""

from dino_sparo.sparo import SPARO, SparoOutput, keep_slots, normalize_slots

__version__ = "0.1.0"
__all__ = ["SPARO", "SparoOutput", "keep_slots", "normalize_slots", "__version__"]
