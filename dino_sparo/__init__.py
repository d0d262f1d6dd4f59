"""dino_sparo: self-supervised Vision Transformers (DINO, CLIP) with SPARO read-outs."""

import os as _os
import sys as _sys

# OpenMP threads that spin while they wait take the cores other work needs (on a shared machine a
# 6-15x slow-down where a fair share is 3x); passive waiting costs nothing measurable on an idle one.
# Set before torch (and its OpenMP runtime) loads; a value in the user's environment wins.
OMP_WAIT_POLICY_DEFAULT = "PASSIVE"
OMP_WAIT_POLICY_SOURCE = ("environment" if "OMP_WAIT_POLICY" in _os.environ else
                          "too late: torch was loaded first" if "torch" in _sys.modules else "default")
_os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT)

from dino_sparo.sparo import SPARO, SparoOutput, keep_slots, normalize_slots  # noqa: E402

__version__ = "0.1.0"
__all__ = ["SPARO", "SparoOutput", "keep_slots", "normalize_slots", "__version__"]
