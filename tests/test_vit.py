"""Backbone shapes for every size and crop size with both read-outs; weights load strictly."""

import pytest
import torch

from dino_sparo.config import ModelConfig, SparoConfig, load_config
from dino_sparo.errors import ConfigError, UsageError
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


# --------------------------------------------------------------------------------------------
# Register tokens
# --------------------------------------------------------------------------------------------

def test_registers_sit_after_the_class_token_and_leave_every_patch_output():
    torch.manual_seed(0)
    model = vit("vit_pico", depth=3, patch_size=4, img_size=28, readout="sparo", num_registers=3,
                sparo={"num_slots": 4, "slot_dim": 8}).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        assert tokens.shape == (2, 1 + 3 + 49, 96) and model.num_prefix_tokens == 4
        # the patch tokens (iBOT, pictures, slot measures) are the last 49; the registers carry no position
        assert torch.equal(model.patch_tokens(tokens), tokens[:, 4:])
        prepared = model.prepare_tokens(x)
        torch.testing.assert_close(prepared[:, 1:4], model.reg_token.expand(2, -1, -1))
        # slots that do not attend to registers read the class token and the patches only
        embedding, attn = model.readout(tokens, return_attn=True)
        expected = model.sparo(torch.cat([tokens[:, :1], tokens[:, 4:]], dim=1)).embedding
        torch.testing.assert_close(embedding, expected)
        cls, registers, patches = model.split_attention(attn)
        assert registers is None and patches.shape == (2, 4, 49)
        # with attend_registers, the slots' weights split into class token, registers and patches, summing to 1
        model.sparo_attend_registers = True
        _, attn = model.readout(tokens, return_attn=True)
        cls, registers, patches = model.split_attention(attn)
        assert registers.shape == (2, 4, 3)
        torch.testing.assert_close(cls + registers.sum(-1) + patches.sum(-1), torch.ones(2, 4))


def test_registers_change_the_patches_through_the_blocks():
    torch.manual_seed(0)
    model = vit("vit_pico", depth=2, patch_size=4, img_size=28, readout="cls", num_registers=2).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        before = model.patch_tokens(model.forward_tokens(x))
        model.reg_token.add_(1.0)
        assert not torch.allclose(model.patch_tokens(model.forward_tokens(x)), before)


def test_timm_register_layout_loads_and_computes_timms_features():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # timm's vit_*_reg4_* layout: reg_token, position embeddings without a class-token entry
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=4, embed_dim=96, depth=2, num_heads=3, num_classes=0, reg_tokens=4,
        no_embed_class=True, class_token=True).eval()
    assert "reg_token" in ref.state_dict() and ref.pos_embed.shape[1] == 49
    ours = vit("vit_pico", depth=2, patch_size=4, img_size=28, readout="cls", num_registers=4).eval()
    load_pretrained_backbone(ours, ref.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_tokens(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
    # a backbone with another number of registers is refused, naming the key to set
    with pytest.raises(KeyError, match="model.num_registers: 4"):
        load_pretrained_backbone(vit("vit_pico", depth=2, patch_size=4, img_size=28, readout="cls"), ref.state_dict())
    # DINOv2's own name for them loads too
    state = {("register_tokens" if k == "reg_token" else k): v for k, v in ref.state_dict().items()}
    again = vit("vit_pico", depth=2, patch_size=4, img_size=28, readout="cls", num_registers=4).eval()
    load_pretrained_backbone(again, state)
    assert torch.equal(again.reg_token, ref.reg_token)


def test_layer_scale_loads_dinov2_style_weights_and_computes_timms_features():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # DINOv2's layout in timm (vit_*_reg4_dinov2): registers and LayerScale on both branches of each block
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=4, embed_dim=96, depth=2, num_heads=3, num_classes=0, reg_tokens=4,
        no_embed_class=True, class_token=True, init_values=1e-5).eval()
    with torch.no_grad():  # trained-looking scales, so a LayerScale left out or misplaced shows
        for name, param in ref.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.2, 1.5)
    ours = vit("vit_pico", depth=2, patch_size=4, img_size=28, readout="cls", num_registers=4,
               layer_scale_init=1e-5).eval()
    assert torch.equal(ours.blocks[0].ls1.gamma, torch.full((96,), 1e-5))
    load_pretrained_backbone(ours, ref.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_tokens(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
    # weights and backbone that disagree about LayerScale are refused, naming the key to set
    plain = vit("vit_pico", depth=2, patch_size=4, img_size=28, readout="cls", num_registers=4)
    with pytest.raises(UsageError, match="set model.layer_scale_init"):
        load_pretrained_backbone(plain, ref.state_dict())
    state = {k: v for k, v in ref.state_dict().items() if "gamma" not in k}
    with pytest.raises(UsageError, match="model.layer_scale_init: null"):
        load_pretrained_backbone(ours, state)


def test_layer_scale_is_a_config_key_that_reaches_the_blocks():
    cfg = load_config(None, ["model.arch=vit_pico", "model.depth=3", "model.layer_scale_init=1e-4"])
    model = build_backbone(cfg.model)
    assert all(torch.equal(b.ls2.gamma, torch.full((96,), 1e-4)) for b in model.blocks)
    assert not any(isinstance(b.ls1, torch.nn.Identity) for b in model.blocks)
    assert all(isinstance(b.ls1, torch.nn.Identity) for b in build_backbone(load_config(None, ["model.arch=vit_pico"]).model).blocks)
    with pytest.raises(ConfigError, match="model.layer_scale_init"):
        load_config(None, ["model.layer_scale_init=0"])


def test_rgb_weights_in_a_one_channel_backbone_see_grey_as_the_rgb_network_sees_r_equal_g_equal_b():
    torch.manual_seed(0)
    rgb = vit("vit_pico", depth=2, patch_size=4, img_size=28, readout="cls").eval()
    grey = vit("vit_pico", depth=2, patch_size=4, img_size=28, readout="cls", in_chans=1).eval()
    load_pretrained_backbone(grey, rgb.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    # the other way round there is no one answer: refused, naming the key
    with pytest.raises(UsageError, match="model.in_chans: 1"):
        load_pretrained_backbone(vit("vit_pico", depth=2, patch_size=4, img_size=28, readout="cls"), grey.state_dict())
