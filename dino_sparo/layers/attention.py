"""The one attention function of the project, with three interchangeable backends.

* ``xformers``: ``memory_efficient_attention`` (GPU only). Its real value is packing crops of
  different sizes into one sequence with a ``BlockDiagonalMask`` bias (DINOv2's approach).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (any device).
* ``math``: explicit ``softmax(q kᵀ / sqrt(d)) v``; the only one that can return the weights.

``auto`` picks xformers on CUDA when it imports and runs, SDPA otherwise, except for bf16/fp16
tensors on CPU, where explicit attention is 2-6x faster than PyTorch's CPU flash kernel (measured in
BENCHMARKS.md); it logs the choice.
Tensors are laid out ``B × H × N × D`` here (xformers wants ``B × N × H × D``; the conversion
happens in one place, :func:`attention`).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xformers", "sdpa", "math")


def _xformers_checks(device: torch.device) -> dict[str, Any]:
    """The calls the runs make, each run once: ``{check: None when it ran, else the exception text}``.

    * ``bf16_block_diagonal_backward``: packed crops (a ``BlockDiagonalMask`` over three sequences of
      different lengths) in bf16 at head dim 64, forward and backward, as a DINO step runs them;
    * ``bf16_dense_backward``: one crop size, no mask, bf16, head dim 64, forward and backward;
    * ``fp32_tensor_bias``: an fp32 forward with a tensor bias (key padding), as the text tower runs.
    """
    from xformers.ops import memory_efficient_attention
    from xformers.ops.fmha import BlockDiagonalMask

    def block_diagonal() -> None:
        lengths = [197, 50, 37]
        bias = BlockDiagonalMask.from_seqlens(lengths)
        q, k, v = (torch.randn(1, sum(lengths), 6, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        memory_efficient_attention(q, k, v, attn_bias=bias).float().sum().backward()

    def dense() -> None:
        q, k, v = (torch.randn(2, 50, 6, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        memory_efficient_attention(q, k, v).float().sum().backward()

    def tensor_bias() -> None:
        q = torch.randn(2, 4, 77, 64, device=device)
        keep = torch.ones(2, 77, dtype=torch.bool, device=device)
        keep[1, 40:] = False
        with torch.no_grad():
            _xformers_attention(q, q, q, ~keep, None, False, 1 / 8)

    results: dict[str, Any] = {}
    for name, check in (("bf16_block_diagonal_backward", block_diagonal), ("bf16_dense_backward", dense),
                        ("fp32_tensor_bias", tensor_bias)):
        try:
            check()
            torch.cuda.synchronize(device)
            results[name] = None
        except Exception as exc:  # noqa: BLE001  a missing kernel is a finding: the run falls back to SDPA
            results[name] = f"{type(exc).__name__}: {exc}"[:500]
    return results


@functools.lru_cache(maxsize=None)
def xformers_report() -> dict[str, Any]:
    """Whether xformers can serve this process' runs, and why not: ``{"imports": bool, "runs": bool,
    "version", "reason", "checks"}``. ``runs`` needs CUDA, the import, and every call of
    :func:`_xformers_checks` (bf16 forward and backward with and without a block-diagonal mask at head
    dim 64, an fp32 tensor-bias forward): a kernel missing for one of them would fail the training
    mid-run, so ``auto`` then picks SDPA for the whole run and says why."""
    report: dict[str, Any] = {"imports": False, "runs": False, "version": None, "reason": None, "checks": {}}
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001  not installed, or built for another torch
        report["reason"] = f"does not import: {type(exc).__name__}: {exc}"[:500]
        return report
    report.update(imports=True, version=getattr(xformers, "__version__", "unknown"))
    if not torch.cuda.is_available():
        report["reason"] = "no CUDA device (xformers has no CPU kernels)"
        return report
    checks = report["checks"] = _xformers_checks(torch.device("cuda", torch.cuda.current_device()))
    failed = {name: error for name, error in checks.items() if error}
    report["runs"] = not failed
    if failed:
        report["reason"] = "; ".join(f"{name}: {error}" for name, error in failed.items())
    return report


def xformers_available() -> bool:
    """True when xformers imports and every kernel the runs use works on the current GPU."""
    report = xformers_report()
    if report["imports"] and not report["runs"] and torch.cuda.is_available():
        _log_xformers_fallback(report["reason"])
    return report["runs"]


@functools.lru_cache(maxsize=None)
def _log_xformers_fallback(reason: str) -> None:
    logger.warning("xformers is installed but not usable here (%s): using PyTorch SDPA", reason)


@functools.lru_cache(maxsize=None)
def _log_choice(requested: str, chosen: str, device_type: str, dtype: Optional[torch.dtype]) -> None:
    # debug only: a run states its kernel once, with the reason (describe_attention_backend)
    logger.debug("attention backend: %s (requested %s, device %s, %s)", chosen, requested, device_type,
                 str(dtype or "any dtype").replace("torch.", ""))


def describe_attention_backend(backend: str, device: torch.device | str, dtype: Optional[torch.dtype]) -> str:
    """One line for a run's start-up log: the kernel its blocks use and why (under ``auto``)."""
    chosen = resolve_attention_backend(backend, device, dtype)
    if backend != "auto":
        return f"attention kernel: {chosen} (model.attn_backend)"
    reason = {"xformers": "xformers' memory-efficient kernel on this GPU",
              "math": "explicit softmax attention: on the CPU, PyTorch's fused kernel is slower in "
                      f"{str(dtype).replace('torch.', '')}",
              "sdpa": "PyTorch's scaled_dot_product_attention, which picks its fastest kernel"}[chosen]
    return f"attention kernel: {chosen} (auto: {reason})"


def resolve_attention_backend(
    backend: str, device: torch.device | str, dtype: Optional[torch.dtype] = None
) -> str:
    """Turn ``auto`` into a concrete backend for ``device`` (and the tensors' ``dtype`` where known);
    refuse impossible requests clearly."""
    device_type = torch.device(device).type
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device_type == "cuda" and xformers_available():
            chosen = "xformers"
        elif device_type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            chosen = "math"  # the CPU flash kernel is slow in reduced precision
        else:
            chosen = "sdpa"
    elif backend == "xformers":
        if device_type != "cuda":
            raise ValueError(
                f"attention backend 'xformers' needs CUDA tensors (got device '{device_type}'): "
                "xformers has no CPU kernels; use 'sdpa' or 'auto'"
            )
        if not xformers_available():
            raise ValueError("attention backend 'xformers' requested but xformers is not installed "
                             "or does not run on this GPU; install the 'gpu' extra or use 'sdpa'")
        chosen = "xformers"
    else:
        chosen = backend
    _log_choice(backend, chosen, device_type, dtype)
    return chosen


def _bool_keep_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    # B × N (True = ignore)  ->  B × 1 × 1 × N (True = attend), broadcast over heads and queries
    return ~key_padding_mask[:, None, None, :]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    key_padding_mask: Optional[torch.Tensor] = None,
    attn_bias: Any = None,
    is_causal: bool = False,
    return_weights: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scaled dot-product attention over ``q, k, v`` of shape ``B × H × N × D``.

    ``key_padding_mask`` (``B × Nk``, True = ignore) masks keys; ``attn_bias`` is an additive
    float tensor broadcastable to ``B × H × Nq × Nk`` or, on the xformers backend, an xformers
    bias object (e.g. ``BlockDiagonalMask`` for packed crops). ``return_weights`` forces the math
    path (fused kernels never materialise the attention matrix). Returns ``(out, weights)``.
    """
    backend = resolve_attention_backend(backend, q.device, q.dtype)
    if return_weights:
        backend = "math"
    scale = 1.0 / math.sqrt(q.shape[-1])

    if backend == "xformers":
        return _xformers_attention(q, k, v, key_padding_mask, attn_bias, is_causal, scale), None

    if attn_bias is not None and not isinstance(attn_bias, torch.Tensor):
        raise ValueError(f"backend '{backend}' takes tensor biases only, got {type(attn_bias).__name__}; "
                         "packed multi-crop sequences need the xformers backend")
    mask = attn_bias
    if key_padding_mask is not None:
        keep = _bool_keep_mask(key_padding_mask)
        if mask is None:
            mask = keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))

    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
        return out, None

    # math. The softmax stays in the compute dtype: its kernels accumulate in fp32 (CPU) or autocast
    # runs it in fp32 (CUDA), and keeping bf16 weights for backward halves the memory of an fp32 copy.
    scores = (q * scale) @ k.transpose(-2, -1)  # B × H × Nq × Nk
    if is_causal:
        nq, nk = scores.shape[-2:]
        causal = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    weights = scores.softmax(dim=-1)
    out = weights.to(v.dtype) @ v
    return out, weights


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                        attn_bias: Any, is_causal: bool, scale: float) -> torch.Tensor:
    """:func:`attention`'s xformers path (``B × H × N × D`` in and out)."""
    from xformers.ops import LowerTriangularMask, memory_efficient_attention

    bias = attn_bias
    if key_padding_mask is not None:
        if bias is not None:
            raise ValueError("xformers backend: pass either key_padding_mask or attn_bias, not both")
        b, h, nq, _ = q.shape
        # xformers needs the bias' last dim aligned to 8 elements: slice a padded tensor.
        nk = k.shape[-2]
        padded = q.new_zeros(b, h, nq, (nk + 7) // 8 * 8)
        padded[..., :nk].masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))
        bias = padded[..., :nk]
    if is_causal:
        if bias is not None:
            raise ValueError("xformers backend: is_causal cannot be combined with a bias here")
        bias = LowerTriangularMask()
    out = memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )  # B × N × H × D
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``) so timm and DINO
    weights load unchanged, running on the project's one :func:`attention` function."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: Any = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B × H × N × D
        out, weights = attention(
            q, k, v, backend=self.backend, key_padding_mask=key_padding_mask,
            attn_bias=attn_bias, is_causal=is_causal, return_weights=return_weights,
        )
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out)), weights
