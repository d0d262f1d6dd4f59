"""Slot attention pictures (image grid, text strip), slot ranking, training-curve plots."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dino_sparo.models.vit import VisionTransformer
from dino_sparo.plots import metrics_in, plot_training_logs, read_log
from dino_sparo.visualize import most_attended_slots, plot_slot_attention, slot_attention


def _tiny_sparo_vit(num_slots: int = 6) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, readout="sparo",
                             sparo={"num_slots": num_slots, "slot_dim": 4}).eval()


def test_slot_attention_rows_are_distributions_over_class_token_and_patches():
    vit = _tiny_sparo_vit()
    attn = slot_attention(vit, torch.randn(3, 3, 16, 16))
    assert attn.shape == (3, 6, 1 + 16)  # B × L × (1 + 4·4 patches)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 6))


@pytest.mark.parametrize("attend", [False, True])
def test_slot_attention_leaves_registers_out_and_gives_their_share_apart(tmp_path, attend):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, readout="sparo",
                            sparo={"num_slots": 6, "slot_dim": 4}, num_registers=3,
                            sparo_attend_registers=attend).eval()
    images = torch.randn(2, 3, 16, 16)
    attn, registers = slot_attention(vit, images, with_registers=True)
    assert attn.shape == (2, 6, 1 + 16)  # class token and patches: the pictures' and slot measures' columns
    if attend:
        assert registers.shape == (2, 6) and (registers > 0).all()
        torch.testing.assert_close(attn.sum(-1) + registers, torch.ones(2, 6))
    else:
        assert registers is None
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 6))
    plot_slot_attention(vit, images, np.random.rand(2, 16, 16).astype(np.float32), tmp_path / "r.png", slots=[0, 1])
    assert (tmp_path / "r.png").is_file()


def test_attention_grid_png_has_one_panel_per_image_and_slot(tmp_path):
    vit = _tiny_sparo_vit()
    images, display = torch.randn(2, 3, 16, 16), np.random.rand(2, 16, 16).astype(np.float32)
    path = tmp_path / "grid.png"
    shown = plot_slot_attention(vit, images, display, path, slots=[4, 1, 3])
    assert shown == [4, 1, 3]
    width, height = Image.open(path).size
    # figure size is 1.3 in per column (image + 3 slots) by 1.4 in per row (2 images), at 110 dpi
    assert (width, height) == (round(1.3 * 4 * 110), round(1.4 * 2 * 110))
    chosen = plot_slot_attention(vit, images, display, tmp_path / "top.png", num_slots=5)
    assert len(chosen) == 5 and len(set(chosen)) == 5
    assert Image.open(tmp_path / "top.png").size == (round(1.3 * 6 * 110), round(1.4 * 2 * 110))


def test_most_attended_slots_ranks_by_patches_won_then_mass():
    attn = torch.zeros(1, 4, 1 + 5)  # B × L × (cls + 5 patches)
    attn[0, :, 0] = 0.5  # class-token weight must not count
    attn[0, 2, 1:4] = 0.9  # slot 2 wins patches 1, 2, 3
    attn[0, 0, 4] = 0.9  # slot 0 wins patch 4
    attn[0, 3, 5] = 0.9  # slot 3 wins patch 5 ...
    attn[0, 3, 1] = 0.1  # ... and has more total mass than slot 0
    attn[0, 1, 0] = 1.0  # slot 1 only looks at the class token
    assert most_attended_slots(attn, 4) == [2, 3, 0, 1]
    assert most_attended_slots(attn, 2) == [2, 3]


def test_text_attention_strip_has_a_row_per_slot(tmp_path):
    pytest.importorskip("open_clip")
    from dino_sparo.models.text import Tokenizer, TextTransformer
    from dino_sparo.visualize import plot_text_attention, text_slot_attention, token_strings

    tokenizer = Tokenizer(context_length=16)
    torch.manual_seed(0)
    text = TextTransformer(vocab_size=tokenizer.vocab_size, context_length=16, width=16, depth=2, num_heads=2,
                           sparo={"num_slots": 5, "slot_dim": 4}, eot_token_id=tokenizer.eot_token_id).eval()
    tokens = tokenizer(["a photo of a shoe"])
    names = token_strings(tokenizer, tokens[0])
    assert names[0] == "<start>" and names[-1] == "<end>" and len(names) == 7
    attn = text_slot_attention(text, tokens)
    assert torch.all(attn[..., len(names):] == 0)  # nothing after the end of text
    shown = plot_text_attention(text, tokenizer, "a photo of a shoe", tmp_path / "text.png", num_slots=3)
    assert len(shown) == 3 and (tmp_path / "text.png").stat().st_size > 0


def _write_log(path, steps, with_knn=False):
    rows = [{"step": s, "epoch": 0, "loss": 8.0 - s / 10, "lr": 1e-3 * s, "teacher_entropy": 7.0,
             **({"knn_top1": 0.5 + s / 100} if with_knn else {})} for s in steps]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")


def test_plot_log_reads_logs_and_writes_one_png(tmp_path):
    (tmp_path / "a").mkdir()
    _write_log(tmp_path / "a" / "log.jsonl", [5, 10, 15])
    _write_log(tmp_path / "b.jsonl", [5, 10], with_knn=True)
    assert [r["step"] for r in read_log(tmp_path / "a")] == [5, 10, 15]
    out = tmp_path / "curves.png"
    drawn = plot_training_logs([tmp_path / "a", tmp_path / "b.jsonl"], out, labels=["cls", "sparo"])
    assert drawn == ["loss", "lr", "teacher_entropy", "knn_top1"]
    assert Image.open(out).size[0] > 0
    assert metrics_in([read_log(tmp_path / "a")], ["loss", "missing"]) == ["loss"]


def test_plot_log_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_log(tmp_path / "nowhere" / "log.jsonl")


class _Figures:
    """Captures the figures the drawing functions save, for inspection."""

    def __init__(self, monkeypatch):
        import dino_sparo.visualize as visualize

        self.saved = []
        monkeypatch.setattr(visualize, "_save", lambda fig, path, dpi=110: self.saved.append(fig))


def test_colour_images_get_maps_beside_them_and_every_picture_a_colour_scale(monkeypatch, tmp_path):
    figures = _Figures(monkeypatch)
    vit = _tiny_sparo_vit()
    images = torch.randn(2, 3, 16, 16)
    plot_slot_attention(vit, images, np.random.rand(2, 16, 16, 3).astype(np.float32), tmp_path / "c.png", slots=[0, 1])
    plot_slot_attention(vit, images, np.random.rand(2, 16, 16).astype(np.float32), tmp_path / "g.png", slots=[0, 1])
    colour, grey = figures.saved
    for fig, layers in ((colour, 1), (grey, 2)):  # a colour photo is never under a map; a grey one is
        panels, scale = fig.axes[:-1], fig.axes[-1]
        assert len(panels) == 2 * 3 and scale.get_ylabel() == "attention on the patch"
        assert [len(ax.images) for ax in panels] == [1, layers, layers] * 2
        maps = [ax.images[-1] for ax in panels if ax.get_title().startswith("slot")]
        assert len({m.get_clim() for m in maps}) == 1  # one scale for every map


def test_an_image_folder_run_is_drawn_on_its_own_images(monkeypatch, tmp_path):
    from conftest import TINY_MODEL
    from dino_sparo.config import load_config
    from dino_sparo.train import train
    from dino_sparo.visualize import visualize_checkpoint

    colours = {"a": (250, 0, 0), "b": (0, 250, 0), "c": (0, 0, 250)}
    for name, colour in colours.items():
        (tmp_path / "images" / "val" / name).mkdir(parents=True)
        (tmp_path / "images" / "train" / name).mkdir(parents=True)
        for i in range(4):
            for split in ("train", "val"):
                Image.fromarray(np.full((28, 28, 3), colour, dtype=np.uint8)).save(
                    tmp_path / "images" / split / name / f"{i}.png")
    out = tmp_path / "run"
    train(load_config(None, [*TINY_MODEL, f"data.path={tmp_path / 'images'}", "data.batch_size_per_gpu=4",
                             "data.num_workers=0", "max_steps=1", f"output_dir={out}"]))
    figures = _Figures(monkeypatch)
    result = visualize_checkpoint(out / "checkpoint.pth", None, tmp_path / "slots.png", num_slots=2)
    assert str(tmp_path / "images" / "val") in result["indices_into"] and len(result["images"]) == 8
    shown = [ax.images[0].get_array() for ax in figures.saved[0].axes[:-1] if ax.get_title() == "image"]
    seen = {tuple(np.round(np.asarray(image)[0, 0] * 255).astype(int)) for image in shown}
    assert seen == set(colours.values())  # the run's own images, every class
    import shutil

    shutil.rmtree(tmp_path / "images")
    with pytest.raises(ValueError, match="cannot read the run's images .*pass image files with --images"):
        visualize_checkpoint(out / "checkpoint.pth", None, tmp_path / "again.png")
