"""Backbone shapes for every size and crop size with both read-outs; weights load strictly."""

import pytest
import torch

from dino_sparo.config import ModelConfig, SparoConfig
from dino_sparo.models.build import build_backbone, load_pretrained_backbone
from dino_sparo.models.vit import ARCHS, count_parameters, vit


@pytest.mark.parametrize("arch", ["vit_tiny", "vit_small", "vit_base"])
@pytest.mark.parametrize("patch", [16, 8])
@pytest.mark.parametrize("readout", ["sparo", "cls"])
def test_output_shapes_for_sizes_and_crops(arch, patch, readout):
    model = vit(arch, patch_size=patch, readout=readout, depth=2)  # depth 2 keeps the test fast
    width = ARCHS[arch][0]
    expected = 64 * 64 if readout == "sparo" else width
    assert model.out_dim == expected
    for size in (224, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            tokens = model.forward_tokens(x)
            emb = model(x)
        assert tokens.shape == (2, 1 + (size // patch) ** 2, width)
        assert emb.shape == (2, expected)
    print(f"{arch}/{patch} {readout}: {count_parameters(model):,} parameters at depth 2")


@pytest.mark.parametrize("readout", ["sparo", "cls"])
def test_small_image_variant_on_28_px(readout):
    model = vit("vit_pico", patch_size=4, img_size=28, readout=readout,
                sparo=dict(num_slots=16, slot_dim=16))
    for size in (28, 12):
        assert model(torch.randn(3, 3, size, size)).shape == (3, model.out_dim)


def test_full_size_parameter_counts_sparo_not_larger_than_cls():
    for arch in ("vit_small", "vit_base"):
        sparo, cls = vit(arch, readout="sparo"), vit(arch, readout="cls")
        print(f"{arch}/16: sparo {count_parameters(sparo):,} vs cls {count_parameters(cls):,}")
        assert len(sparo.blocks) == 11 and len(cls.blocks) == 12
        assert count_parameters(sparo) <= count_parameters(cls)


def test_sparo_reads_final_normed_tokens_including_class_token():
    torch.manual_seed(0)
    model = vit("vit_pico", patch_size=4, img_size=28, depth=2)
    x = torch.randn(2, 3, 28, 28)
    tokens = model.forward_tokens(x)
    # the final LayerNorm is applied to every token
    raw = model.run_blocks(model.prepare_tokens(x))
    assert torch.allclose(tokens, model.norm(raw))
    assert torch.allclose(model(x), model.sparo(tokens).embedding, atol=1e-6)


def test_reduce_depth_removes_last_blocks():
    assert len(vit("vit_pico", depth=6, reduce_depth=2).blocks) == 4
    with pytest.raises(ValueError, match="reduce_depth"):
        vit("vit_pico", depth=6, reduce_depth=6)


def test_build_backbone_from_config():
    cfg = ModelConfig(arch="vit_pico", patch_size=4, img_size=28, depth=3,
                      sparo=SparoConfig(num_slots=8, slot_dim=4))
    model = build_backbone(cfg)
    assert len(model.blocks) == 2
    assert model.sparo.attn_dim == 96 // 3  # the backbone's head width
    assert model.out_dim == 32


def test_timm_weights_load_strictly_with_pos_embed_resampling():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=3)
    ours = vit("vit_small", readout="sparo", depth=3, img_size=96)  # 2 blocks + SPARO
    dropped = load_pretrained_backbone(ours, ref.state_dict())
    assert any(k.startswith("blocks.2.") for k in dropped)
    assert torch.equal(ours.blocks[1].attn.qkv.weight, ref.blocks[1].attn.qkv.weight)
    assert ours.pos_embed.shape == (1, 37, 384)
    # a plain class-token model of the same depth computes exactly timm's features
    plain = vit("vit_small", readout="cls", depth=3, drop_path_rate=0.0)
    load_pretrained_backbone(plain, ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(plain(x), ref.forward_features(x)[:, 0], atol=1e-5)


def test_mismatched_weights_name_the_keys():
    ours = vit("vit_pico", readout="cls", depth=2)
    state = ours.state_dict()
    state.pop("norm.weight")
    state["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="norm.weight.*blocks.0.attn.extra"):
        load_pretrained_backbone(vit("vit_pico", readout="cls", depth=2), state)
