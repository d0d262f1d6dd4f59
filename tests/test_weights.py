"""Evaluating a released backbone directly (``--weights``: timm, DINO's release, DeiT-wrapped, ours),
``--baseline init`` with ``model.pretrained``, and ``dino-sparo-export``'s timm-compatible files,
checked against timm's own ViT built here (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer as TimmViT

from dino_sparo.cli import export as export_cli
from dino_sparo.cli import knn as knn_cli
from dino_sparo.evaluation.inputs import load_source
from dino_sparo.export import safetensors_available
from dino_sparo.models.build import load_backbone_from_checkpoint

EVAL = ["--dataset", "fashion_mnist", "--train-limit", "100", "--test-limit", "40", "--ks", "5", "--num-workers", "0",
        "--batch-size", "50", "--backend", "torch", "--quiet", "--no-cache", "--device", "cpu"]


def timm_vit(seed: int = 0) -> TimmViT:
    """A small timm ViT (width 96 = vit_pico, 2 blocks, 4-px patches) with a 10-class head, seeded."""
    torch.manual_seed(seed)
    return TimmViT(img_size=28, patch_size=4, embed_dim=96, depth=2, num_heads=3, num_classes=10).eval()


def timm_embedding(model: TimmViT, x: torch.Tensor) -> torch.Tensor:
    """What DINO's k-NN reads from a timm ViT: the class token after the final norm."""
    with torch.no_grad():
        return model.forward_features(x)[:, 0]


def layouts(model: TimmViT, folder: Path) -> dict[str, Path]:
    """The same weights in the four layouts users bring."""
    state = model.state_dict()
    files = {"timm.pth": state,
             "dino_release.pth": {k: v for k, v in state.items() if not k.startswith("head.")},
             "deit.pth": {"model": state}}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / name
        torch.save(content, paths[name])
    if safetensors_available():
        from safetensors.torch import save_file

        paths["timm.safetensors"] = folder / "timm.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(paths["timm.safetensors"]))
    return paths


def test_weights_of_every_layout_give_timm_s_features(tmp_path):
    model = timm_vit()
    x = torch.randn(3, 3, 28, 28)
    expected = timm_embedding(model, x)
    for name, path in layouts(model, tmp_path).items():
        source = load_source(weights=path)
        assert source.name == "weights" and source.backbone.readout_type == "cls", name
        assert len(source.backbone.blocks) == 2 and source.backbone.patch_size == 4, name  # read from the file
        with torch.no_grad():
            got = source.backbone(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_knn_on_weights_runs_end_to_end_and_names_the_file(tmp_path):
    path = layouts(timm_vit(), tmp_path)["dino_release.pth"]
    out = tmp_path / "knn.json"
    knn_cli.main(["--weights", str(path), "--arch", "vit_pico", "--patch-size", "4", *EVAL, "--output-json", str(out)])
    result = json.loads(out.read_text())
    assert result["source"] == "weights" and result["weights"] == str(path) and result["checkpoint"] is None
    assert 0.0 <= result["knn"]["5"]["top1"] <= 1.0 and result["num_train"] == 100


@pytest.mark.parametrize("extra,word", [(["--patch-size", "8"], "--patch-size 8"), (["--arch", "vit_small"], "--arch"),
                                        (["--checkpoint", "x.pth"], "--weights")])
def test_weights_that_do_not_fit_are_one_line_and_exit_2(tmp_path, capsys, extra, word):
    path = layouts(timm_vit(), tmp_path)["timm.pth"]
    with pytest.raises(SystemExit) as stop:
        knn_cli.main(["--weights", str(path), *EVAL, *extra])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and word in err[-1] and "error" in err[-1]


def run_config(checkpoint: Path) -> Path:
    return checkpoint.parent / "config.yaml"


def test_export_is_loaded_strictly_by_timm_and_gives_the_run_s_tokens(checkpoint, tmp_path):
    export_cli.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "teacher.pth")])
    info = json.loads((tmp_path / "teacher.json").read_text())
    assert info["format"] == "pth" and info["readout"] == "sparo" and not info["readout_included"]
    timm_model = TimmViT(**info["timm_kwargs"]).eval()
    timm_model.load_state_dict(torch.load(tmp_path / "teacher.pth"), strict=True)  # every key, nothing extra
    ours, _ = load_backbone_from_checkpoint(checkpoint, "teacher")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(x), ours.forward_tokens(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not safetensors_available(), reason="safetensors not installed")
def test_export_with_the_readout_evaluates_as_the_checkpoint_does(checkpoint, tmp_path):
    path = tmp_path / "whole.safetensors"
    export_cli.main(["--checkpoint", str(checkpoint), "--output", str(path), "--with-readout"])
    assert json.loads(path.with_suffix(".json").read_text())["format"] == "safetensors"
    outputs = {}
    for name, source in (("checkpoint", ["--checkpoint", str(checkpoint)]),
                         ("weights", ["--weights", str(path), "--config", str(run_config(checkpoint))])):
        outputs[name] = tmp_path / f"{name}.json"
        knn_cli.main([*source, *EVAL, "--output-json", str(outputs[name])])
    got, expected = (json.loads(outputs[n].read_text()) for n in ("weights", "checkpoint"))
    assert got["knn"] == expected["knn"]  # the same network: the same neighbours


def test_baseline_init_honours_model_pretrained(checkpoint, tmp_path):
    export_cli.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "trunk.pth")])
    trunk = torch.load(tmp_path / "trunk.pth")
    config = yaml.safe_load(run_config(checkpoint).read_text())
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(config))
    config["model"]["pretrained"] = str(tmp_path / "trunk.pth")
    pretrained = tmp_path / "pretrained.yaml"
    pretrained.write_text(yaml.safe_dump(config))
    with_weights = load_source(baseline="init", config=pretrained).backbone.state_dict()
    without = load_source(baseline="init", config=plain).backbone.state_dict()
    assert all(torch.equal(with_weights[k], v) for k, v in trunk.items())
    assert not torch.equal(without["blocks.0.attn.qkv.weight"], trunk["blocks.0.attn.qkv.weight"])
    # the read-out is the seeded initialisation in both: only the file's keys changed
    assert torch.equal(with_weights["sparo.queries"], without["sparo.queries"])


def test_exported_trunk_is_a_valid_model_pretrained_for_training(checkpoint, tmp_path):
    from dino_sparo.config import load_config
    from dino_sparo.train import TrainingRun

    export_cli.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "trunk.pth")])
    cfg = load_config(run_config(checkpoint), [f"output_dir={tmp_path / 'run'}",
                                               f"model.pretrained={tmp_path / 'trunk.pth'}"])
    run = TrainingRun(cfg)
    trunk = torch.load(tmp_path / "trunk.pth")
    for network in (run.method.student.backbone, run.method.teacher.backbone):
        state = network.state_dict()
        assert all(torch.equal(state[k], v) for k, v in trunk.items())


def test_linear_on_weights_reads_dino_s_last_blocks_of_the_released_network(tmp_path):
    from dino_sparo.cli import linear as linear_cli

    path = layouts(timm_vit(), tmp_path)["deit.pth"]
    out = tmp_path / "linear.json"
    linear_cli.main(["--weights", str(path), *[a for a in EVAL if a not in ("--ks", "5", "--backend", "torch")],
                     "--epochs", "1", "--lrs", "0.01", "--output-json", str(out)])
    result = json.loads(out.read_text())
    assert result["source"] == "weights" and result["weights"] == str(path)
    assert result["feature_spec"]["kind"] == "last_blocks" and result["feature_dim"] == 2 * 96  # both blocks' tokens


def dinov2_style_timm_vit(seed: int = 0) -> TimmViT:
    """timm's layout of DINOv2's register models (vit_*_reg4_dinov2): 4 registers, no position
    embedding before the patches, LayerScale on both branches (set away from its init, as trained)."""
    torch.manual_seed(seed)
    model = TimmViT(img_size=28, patch_size=4, embed_dim=96, depth=2, num_heads=3, num_classes=0, reg_tokens=4,
                    no_embed_class=True, init_values=1e-5).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.2, 1.5)
    return model


def test_weights_of_dinov2_s_register_layout_give_timm_s_features(tmp_path):
    model = dinov2_style_timm_vit()
    torch.save(model.state_dict(), tmp_path / "reg4.pth")
    source = load_source(weights=tmp_path / "reg4.pth")  # registers and LayerScale read from the file
    assert source.backbone.num_registers == 4 and hasattr(source.backbone.blocks[0].ls1, "gamma")
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(source.backbone(x), timm_embedding(model, x), atol=1e-5, rtol=1e-5)


def test_export_of_a_run_with_registers_and_layer_scale_is_timm_s_register_layout(tmp_path):
    from dino_sparo.config import from_dict, parse_overrides
    from dino_sparo.train import train
    from tiny_checkpoint import TINY_CONFIG

    extra = parse_overrides(["model.num_registers=2", "model.layer_scale_init=0.1", "model.readout=cls"])
    config = {**TINY_CONFIG, "model": {**TINY_CONFIG["model"], **extra["model"]}, "output_dir": str(tmp_path / "run")}
    train(from_dict(config))
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    export_cli.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "teacher.pth")])
    info = json.loads((tmp_path / "teacher.json").read_text())
    assert info["timm_kwargs"]["reg_tokens"] == 2 and info["timm_kwargs"]["init_values"] == 0.1
    timm_model = TimmViT(**info["timm_kwargs"]).eval()
    timm_model.load_state_dict(torch.load(tmp_path / "teacher.pth"), strict=True)
    ours, _ = load_backbone_from_checkpoint(checkpoint, "teacher")
    assert not torch.equal(ours.blocks[0].ls1.gamma, torch.full((96,), 0.1))  # trained, so the file's values count
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(x), ours.forward_tokens(x), atol=1e-5, rtol=1e-5)
        # and the file, read back by --weights, is the same network
        again = load_source(weights=tmp_path / "teacher.pth").backbone
        torch.testing.assert_close(again(x), ours(x), atol=1e-5, rtol=1e-5)
