"""SPARO against an independent per-slot loop, and the properties the paper relies on."""

import math

import pytest
import torch
import torch.nn.functional as F

from dino_sparo import SPARO, keep_slots
from dino_sparo.sparo import NORMS


def reference_sparo(m: SPARO, x: torch.Tensor, mask=None):
    """Slot by slot, token by token where it matters: no shared code with the module."""
    b, n, _ = x.shape
    slots, attns = [], []
    for slot in range(m.num_slots):
        head, sub = divmod(slot, m.slots_per_head)
        ka, kb = head * m.attn_dim, (head + 1) * m.attn_dim
        keys = x @ m.key.weight[ka:kb].T  # B × N × d_a
        if m.key.bias is not None:
            keys = keys + m.key.bias[ka:kb]
        if m.value is None:
            values = keys
        else:
            va, vb = head * m.value_dim, (head + 1) * m.value_dim
            values = x @ m.value.weight[va:vb].T + m.value.bias[va:vb]
        q = m.queries[head, sub]  # d_a
        logits = (keys @ q) / math.sqrt(m.attn_dim)  # B × N
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        a = torch.softmax(logits, dim=-1)
        o = (a.unsqueeze(-1) * values).sum(1)  # B × d_v
        slots.append(o @ m.out_proj.weight.T + m.out_proj.bias)
        attns.append(a)
    raw = torch.stack(slots, 1)  # B × L × V'
    rep, weighting = m.norm.split(":")
    if weighting in ("softmax", "sqrtsoftmax"):
        raw, logit = raw[..., :-1], raw[..., -1]
    content = raw if rep == "cont" else torch.softmax(raw, -1)
    if rep == "sqrtsem":
        content = content.sqrt()
    out = []
    for slot in range(m.num_slots):
        c = content[:, slot]
        unit = c / c.norm(dim=-1, keepdim=True)
        if weighting == "const":
            w = torch.full((b,), 1 / math.sqrt(m.num_slots), dtype=c.dtype)
        elif weighting == "norm":
            w = c.norm(dim=-1) / content.flatten(1).norm(dim=-1)
        elif weighting == "softmax":
            p = torch.softmax(logit, -1)
            w = p[:, slot] / p.norm(dim=-1)
        else:
            w = torch.softmax(logit, -1)[:, slot].sqrt()
        out.append(unit * w[:, None])
    return torch.cat(out, dim=1), torch.stack(attns, 1)


SETTINGS = [
    dict(num_slots=8, slot_dim=6, attn_dim=5, share_kv=True),
    dict(num_slots=8, slot_dim=4, attn_dim=5, value_dim=7, share_kv=False),
    dict(num_slots=8, slot_dim=6, attn_dim=4, num_heads=2, share_kv=True),
    dict(num_slots=6, slot_dim=3, attn_dim=4, num_heads=3, value_dim=5, share_kv=False),
]


def _module_and_reference(setting, norm, dtype):
    """Module output and the per-slot loop's, both in ``dtype``, on masked random tokens."""
    torch.manual_seed(0)
    m = SPARO(dim=16, norm=norm, **setting).to(dtype)
    with torch.no_grad():  # non-zero biases so they are exercised
        for layer in (m.key, m.value, m.out_proj):
            if layer is not None and layer.bias is not None:
                layer.bias.normal_()
    x = torch.randn(3, 11, 16, dtype=dtype)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[1, 7:] = True
    mask[2, :3] = True
    out = m(x, key_padding_mask=mask)
    with torch.no_grad():
        ref_emb, ref_attn = reference_sparo(m, x, mask)
    return m, out, ref_emb, ref_attn


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_float64_module_matches_float64_loop_to_double_precision(setting, norm):
    _, out, ref_emb, ref_attn = _module_and_reference(setting, norm, torch.float64)
    assert out.embedding.dtype == out.slots.dtype == torch.float64
    assert ref_emb.dtype == torch.float64
    rel = (out.embedding - ref_emb).norm() / ref_emb.norm()
    assert rel < 1e-12, float(rel)  # float32 anywhere on the way gives ~1e-7
    assert (out.attn - ref_attn).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_slots_are_normalised_in_float32(dtype):
    from dino_sparo.sparo import normalize_slots

    raw = torch.randn(4, 8, 6, dtype=torch.float64) * 3
    got = normalize_slots(raw.to(dtype), "cont:const")
    expected = normalize_slots(raw.to(dtype).float(), "cont:const")
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert normalize_slots(raw.float()).dtype == torch.float32


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_independent_per_slot_loop(setting, norm):
    m, out, ref_emb, ref_attn = _module_and_reference(setting, norm, torch.float32)
    assert out.embedding.shape == (3, m.num_slots * m.slot_dim)
    assert out.slots.shape == (3, m.num_slots, m.slot_dim)
    assert out.attn.shape == (3, m.num_slots, 11)
    rel = (out.embedding - ref_emb).norm() / ref_emb.norm()
    assert rel < 1e-5
    assert torch.allclose(out.attn, ref_attn, atol=1e-6)
    assert torch.equal(out.slots.flatten(1), out.embedding)


@pytest.mark.parametrize("norm", NORMS)
def test_embedding_has_unit_norm(norm):
    m = SPARO(dim=16, num_slots=8, slot_dim=6, norm=norm)
    emb = m(torch.randn(4, 9, 16)).embedding
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_cont_const_slots_each_have_norm_sqrt_one_over_l():
    m = SPARO(dim=16, num_slots=8, slot_dim=6)
    slots = m(torch.randn(4, 9, 16)).slots
    assert torch.allclose(slots.norm(dim=-1), torch.full((4, 8), 1 / math.sqrt(8)), atol=1e-6)


def test_cont_const_cosine_is_mean_of_per_slot_cosines():
    m = SPARO(dim=16, num_slots=8, slot_dim=6)
    a, b = m(torch.randn(1, 9, 16)).slots[0], m(torch.randn(1, 9, 16)).slots[0]
    per_slot = F.cosine_similarity(a, b, dim=-1)
    assert torch.allclose((a.flatten() @ b.flatten()), per_slot.mean(), atol=1e-6)


@pytest.mark.parametrize("what", ["query", "key"])
def test_a_slot_moves_only_with_its_own_query_or_projection(what):
    torch.manual_seed(1)
    m = SPARO(dim=16, num_slots=6, slot_dim=5, attn_dim=4)  # num_heads = L
    x = torch.randn(2, 10, 16)
    before = m(x).slots
    with torch.no_grad():
        if what == "query":
            m.queries[3].add_(torch.randn_like(m.queries[3]))
        else:
            m.key.weight[3 * 4:4 * 4].add_(torch.randn(4, 16))
    after = m(x).slots
    moved = (after - before).abs().amax(dim=(0, 2)) > 1e-6
    assert moved.tolist() == [i == 3 for i in range(6)]


def test_permuting_tokens_changes_nothing():
    m = SPARO(dim=16, num_slots=8, slot_dim=6)
    x = torch.randn(2, 12, 16)
    perm = torch.randperm(12)
    a, b = m(x), m(x[:, perm])
    assert torch.allclose(a.embedding, b.embedding, atol=1e-6)
    assert torch.allclose(a.attn[..., perm], b.attn, atol=1e-6)


def test_masked_tokens_change_nothing():
    m = SPARO(dim=16, num_slots=8, slot_dim=6)
    x = torch.randn(2, 12, 16)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 9:] = True
    y = x.clone()
    y[:, 9:] = torch.randn(2, 3, 16) * 100
    a, b = m(x, key_padding_mask=mask), m(y, key_padding_mask=mask)
    assert torch.allclose(a.embedding, b.embedding, atol=1e-6)
    assert torch.all(a.attn[..., 9:] == 0)
    # and equals reading out only the kept tokens
    c = m(x[:, :9])
    assert torch.allclose(a.embedding, c.embedding, atol=1e-6)


def test_fused_path_equals_weights_path():
    m = SPARO(dim=16, num_slots=8, slot_dim=6, num_heads=4)
    x = torch.randn(3, 10, 16)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 5:] = True
    a = m(x, key_padding_mask=mask, return_attn=True)
    b = m(x, key_padding_mask=mask, return_attn=False)
    assert b.attn is None
    assert torch.allclose(a.embedding, b.embedding, atol=1e-6)


def test_keep_slots_renormalises_to_mean_of_kept_cosines():
    m = SPARO(dim=16, num_slots=8, slot_dim=6)
    a, b = m(torch.randn(1, 9, 16)).slots, m(torch.randn(1, 9, 16)).slots
    keep = [0, 5, 6]
    ka, kb = keep_slots(a, keep), keep_slots(b, keep)
    assert ka.shape == (1, 18)
    assert torch.allclose(ka.norm(dim=-1), torch.ones(1), atol=1e-6)
    per_slot = F.cosine_similarity(a[0, keep], b[0, keep], dim=-1)
    assert torch.allclose((ka * kb).sum(), per_slot.mean(), atol=1e-6)
    with pytest.raises(ValueError, match="slot ids"):
        keep_slots(a, [8])


@pytest.mark.parametrize("bad", [dict(norm="cont:max"), dict(num_slots=6, num_heads=4),
                                 dict(attn_dim=8, value_dim=4, share_kv=True)])
def test_bad_settings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="SPARO"):
        SPARO(dim=16, **bad)


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_parameter_gets_a_gradient(setting):
    """What DistributedDataParallel needs (it waits for every parameter's gradient): no parameter of the
    read-out may be left out of the output, whichever keys and values it shares."""
    torch.manual_seed(0)
    m = SPARO(dim=16, **setting)
    m(torch.randn(2, 9, 16)).embedding.square().sum().backward()
    missing = [name for name, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_checkpoints_with_the_unused_key_bias_still_load():
    torch.manual_seed(0)
    m = SPARO(dim=16, num_slots=4, slot_dim=3, attn_dim=4, value_dim=5, share_kv=False)
    old = dict(m.state_dict(), **{"key.bias": torch.randn(16)})  # as written before the bias was left out
    fresh = SPARO(dim=16, num_slots=4, slot_dim=3, attn_dim=4, value_dim=5, share_kv=False)
    fresh.load_state_dict(old, strict=True)
    x = torch.randn(2, 7, 16)
    assert torch.equal(fresh(x).embedding, m(x).embedding)
