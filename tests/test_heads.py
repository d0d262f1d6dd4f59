"""DINO head: shapes, weight-normalised prototypes with g fixed at 1, normalised bottleneck,
initialisation, deep copies and state-dict round trips."""

import copy

import pytest
import torch
import torch.nn as nn

from dino_sparo.models.heads import DINOHead


def _magnitude(head):
    return head.last_layer.parametrizations.weight.original0


@pytest.mark.parametrize("nlayers,use_bn", [(1, False), (2, False), (3, False), (3, True), (4, True)])
def test_output_shape_and_layers(nlayers, use_bn):
    head = DINOHead(24, 50, use_bn=use_bn, nlayers=nlayers, hidden_dim=32, bottleneck_dim=16)
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 50)
    linears = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == nlayers
    assert linears[-1].out_features == 16
    assert any(isinstance(m, nn.BatchNorm1d) for m in head.mlp.modules()) == (use_bn and nlayers > 1)
    assert sum(isinstance(m, nn.GELU) for m in head.mlp.modules()) == nlayers - 1


def test_last_layer_is_weight_normalised_with_fixed_unit_magnitude():
    head = DINOHead(16, 40, hidden_dim=32, bottleneck_dim=8)
    g = _magnitude(head)
    assert g.shape == (40, 1)
    assert torch.all(g == 1) and not g.requires_grad
    assert head.last_layer.bias is None
    # effective weight rows are unit vectors: the logits are cosine similarities in [-1, 1]
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))
    out = head(torch.randn(7, 16) * 100)
    assert out.abs().max() <= 1 + 1e-5
    # g stays 1 after an optimiser step on everything trainable
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(7, 16)).square().sum().backward()
    opt.step()
    assert torch.all(_magnitude(head) == 1)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))


def test_magnitude_trainable_without_norm_last_layer():
    head = DINOHead(16, 40, norm_last_layer=False, hidden_dim=32, bottleneck_dim=8)
    g = _magnitude(head)
    assert torch.all(g == 1) and g.requires_grad
    head(torch.randn(3, 16)).sum().backward()
    assert g.grad is not None


def test_bottleneck_is_l2_normalised_before_last_layer():
    head = DINOHead(16, 30, hidden_dim=32, bottleneck_dim=8)
    seen = {}
    head.last_layer.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    x = torch.randn(6, 16)
    out = head(x)
    torch.testing.assert_close(seen["x"].norm(dim=-1), torch.ones(6))
    bottleneck = head.mlp(x)
    expected = (bottleneck / bottleneck.norm(dim=-1, keepdim=True)) @ head.last_layer.weight.T
    torch.testing.assert_close(out, expected)


def test_mlp_init_is_truncated_normal_std_002_with_zero_bias():
    torch.manual_seed(0)
    head = DINOHead(256, 10, hidden_dim=512, bottleneck_dim=128)
    for module in head.mlp.modules():
        if isinstance(module, nn.Linear):
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.05)
            assert torch.all(module.bias == 0)


def test_last_layer_parameters_are_the_prototype_layer():
    head = DINOHead(16, 30, hidden_dim=32, bottleneck_dim=8)
    ids = {id(p) for p in head.last_layer_parameters()}
    named = {id(p) for name, p in head.named_parameters() if "last_layer" in name}
    assert ids == named and len(ids) == 2
    # freezing: the rest still trains
    rest = [p for p in head.parameters() if id(p) not in ids]
    assert rest and all(p.requires_grad for p in rest)


def test_deepcopy_is_independent():
    head = DINOHead(16, 30, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    clone = copy.deepcopy(head)
    x = torch.randn(4, 16)
    torch.testing.assert_close(clone(x), head(x))
    for (name, p), (_, q) in zip(head.named_parameters(), clone.named_parameters()):
        assert p.data_ptr() != q.data_ptr(), name
        assert p.requires_grad == q.requires_grad, name
    with torch.no_grad():
        for q in clone.parameters():
            q.add_(1.0)
    assert not torch.allclose(clone(x), head(x))
    # the original is untouched
    assert torch.all(_magnitude(head) == 1)
    # teacher-style copy with frozen parameters keeps g frozen in a norm_last_layer head
    frozen = copy.deepcopy(DINOHead(16, 30, hidden_dim=32, bottleneck_dim=8))
    assert not _magnitude(frozen).requires_grad


def test_state_dict_round_trip():
    torch.manual_seed(1)
    head = DINOHead(16, 30, use_bn=True, hidden_dim=32, bottleneck_dim=8)
    head.eval()
    sd = head.state_dict()
    assert "last_layer.parametrizations.weight.original0" in sd
    assert "last_layer.parametrizations.weight.original1" in sd
    fresh = DINOHead(16, 30, use_bn=True, hidden_dim=32, bottleneck_dim=8).eval()
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(4, 16)
    torch.testing.assert_close(fresh(x), head(x))


def test_loads_dino_v1_weight_g_weight_v_keys():
    head = DINOHead(16, 30, hidden_dim=32, bottleneck_dim=8)
    sd = head.state_dict()
    legacy = {k: v for k, v in sd.items() if not k.startswith("last_layer.")}
    direction = torch.randn(30, 8)
    legacy["last_layer.weight_g"] = torch.ones(30, 1)
    legacy["last_layer.weight_v"] = direction
    fresh = DINOHead(16, 30, hidden_dim=32, bottleneck_dim=8)
    fresh.load_state_dict(legacy, strict=True)
    torch.testing.assert_close(fresh.last_layer.weight, direction / direction.norm(dim=1, keepdim=True))
