"""The attention backends compute the same function."""

import math

import pytest
import torch

from dino_sparo.layers.attention import Attention, attention, resolve_attention_backend


def reference(q, k, v, mask=None, causal=False):
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("masked,causal", [(False, False), (True, False), (False, True)])
def test_cpu_backends_match_reference(backend, masked, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 13, 8) for _ in range(3))
    mask = None
    if masked:
        mask = torch.zeros(2, 13, dtype=torch.bool)
        mask[0, 10:] = True
    out, _ = attention(q, k, v, backend=backend, key_padding_mask=mask, is_causal=causal)
    assert (out - reference(q, k, v, mask, causal)).abs().max() < 1e-5


def test_sdpa_and_math_agree_in_the_module():
    torch.manual_seed(0)
    m = Attention(32, num_heads=4)
    x = torch.randn(2, 17, 32)
    m.backend = "sdpa"
    a, _ = m(x)
    m.backend = "math"
    b, w = m(x, return_weights=True)
    assert (a - b).abs().max() < 1e-5
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 17))


def test_auto_never_picks_xformers_on_cpu():
    assert resolve_attention_backend("auto", "cpu") == "sdpa"
    assert resolve_attention_backend("auto", "cpu", torch.float32) == "sdpa"


def test_auto_on_cpu_in_bf16_runs_explicit_attention_with_the_same_result():
    assert resolve_attention_backend("auto", "cpu", torch.bfloat16) == "math"
    assert resolve_attention_backend("sdpa", "cpu", torch.bfloat16) == "sdpa"  # explicit requests are kept
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 21, 16).unbind(0)
    q64, k64, v64 = q.double(), k.double(), v.double()
    expected = (q64 @ k64.transpose(-2, -1) / 4.0).softmax(-1) @ v64  # head dim 16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="auto")
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max() < 3e-2


def test_xformers_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="xformers.*CUDA"):
        resolve_attention_backend("xformers", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_attention_backend("flash", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_xformers_matches_sdpa_on_gpu(dtype, tol):
    pytest.importorskip("xformers")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 6, 197, 64, device="cuda", dtype=dtype) for _ in range(3))
    mask = torch.zeros(2, 197, dtype=torch.bool, device="cuda")
    mask[1, 150:] = True
    a, _ = attention(q, k, v, backend="xformers", key_padding_mask=mask)
    b, _ = attention(q, k, v, backend="sdpa", key_padding_mask=mask)
    assert (a.float() - b.float()).abs().max() < tol


@pytest.mark.gpu
def test_xformers_block_diagonal_equals_separate_sequences():
    xops = pytest.importorskip("xformers.ops")
    torch.manual_seed(0)
    m = Attention(64, num_heads=4, backend="xformers").cuda()
    a, b = torch.randn(2, 50, 64, device="cuda"), torch.randn(3, 10, 64, device="cuda")
    bias, packed = xops.fmha.BlockDiagonalMask.from_tensor_list([a, b])
    out, _ = m(packed, attn_bias=bias)
    pa, pb = bias.split(out)
    m.backend = "sdpa"
    assert (pa - m(a)[0]).abs().max() < 1e-4
    assert (pb - m(b)[0]).abs().max() < 1e-4
