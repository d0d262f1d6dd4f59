"""Linear probes: multi-head SGD against torch's SGD on separate layers, accuracy on separable
features, selection on held-out train rows only, DINO's feature widths, and dino-sparo-linear end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino_sparo.checkpoint import load_checkpoint
from dino_sparo.cli import linear as linear_cli
from dino_sparo.evaluation.api import linear_from_checkpoint
from dino_sparo.evaluation.feature_store import FeatureStore
from dino_sparo.evaluation.feature_kinds import dino_linear_spec, feature_fn, last_blocks_features, resolve_spec
from dino_sparo.evaluation.linear import HeadsSGD, LinearHeads, cosine_factor, linear_probe, slot_block_fn
from dino_sparo.models.vit import vit

from tiny_checkpoint import NUM_SLOTS, SLOT_DIM

C, D = 5, 24


def separable(n, seed, noise=0.0):
    """Features whose labels are the argmax of a fixed linear map (with a margin), scaled small
    like a unit-norm embedding; ``noise`` flips that fraction of labels at random."""
    g = np.random.default_rng(seed)
    w = np.random.default_rng(123).normal(size=(D, C))
    x = g.normal(size=(4 * n, D))
    logits = x @ w
    top2 = np.sort(logits, axis=1)[:, -2:]
    x = x[top2[:, 1] - top2[:, 0] > 0.5][:n]  # keep points with a margin
    y = (x @ w).argmax(1)
    flip = g.random(n) < noise
    y[flip] = g.integers(0, C, flip.sum())
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


# --------------------------------------------------------------------------- the heads


def test_heads_follow_torch_sgd_on_separate_layers():
    lrs, wds = [0.5, 0.05, 0.005], [0.0, 1e-3, 0.1]
    heads = LinearHeads(3, D, C, seed=0)
    optimizer = HeadsSGD(heads, torch.tensor(lrs), torch.tensor(wds), momentum=0.9)
    layers = [heads.head(h) for h in range(3)]
    torch_opts = [torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
                  for layer, lr, wd in zip(layers, lrs, wds)]
    x, y = separable(64, 0)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    for step in range(6):
        factor = cosine_factor(step, 6)
        loss = F.cross_entropy(heads(x).flatten(0, 1), y.repeat(3), reduction="none").view(3, -1).mean(1).sum()
        loss.backward()
        optimizer.step(factor)
        for layer, opt, lr in zip(layers, torch_opts, lrs):
            opt.param_groups[0]["lr"] = lr * factor
            opt.zero_grad()
            F.cross_entropy(layer(x), y).backward()
            opt.step()
    for h, layer in enumerate(layers):
        torch.testing.assert_close(heads.weight[h].detach(), layer.weight.detach().T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads.bias[h].detach(), layer.bias.detach(), rtol=1e-5, atol=1e-6)
    # DINO's initialisation: N(0, 0.01) weights, zero bias
    fresh = LinearHeads(1, 2000, 10)
    assert fresh.weight.std().item() == pytest.approx(0.01, rel=0.05) and not fresh.bias.any()


def test_probe_on_separable_features_reaches_high_accuracy():
    x_train, y_train = separable(1500, 1)
    x_test, y_test = separable(400, 2)
    result = linear_probe(x_train, y_train, x_test, y_test, C, lrs=[0.1], epochs=15, batch_size=128, progress=False)
    assert result.test_top1 > 0.95 and result.test_top5 == 1.0
    assert result.num_val == 0 and result.num_fit == 1500 and result.selected_epoch == 15  # one head: the last epoch
    logits = result.classifier(torch.from_numpy(x_test) * result.feature_scale)  # the saved head reproduces it
    assert (logits.argmax(1).numpy() == y_test).mean() == pytest.approx(result.test_top1)


def test_lr_sweep_chooses_on_held_out_train_never_on_test():
    x_train, y_train = separable(1200, 3, noise=0.1)
    x_test, y_test = separable(300, 4)
    lrs = [1e-6, 0.01, 1.0]
    options = dict(lrs=lrs, epochs=8, batch_size=128, progress=False)
    result = linear_probe(x_train, y_train, x_test, y_test, C, **options)
    val = [h["val_top1"] for h in result.heads]
    assert result.selected == int(np.argmax(val)) and result.val_top1 == max(val)
    assert lrs[result.selected] != 1e-6 and result.test_top1 > 0.8
    assert result.num_val == 120 and result.num_fit == 1080  # 10 % of train held out, stratified
    # test labels cannot move the choice: scrambled, the same head, epoch and held-out curve
    scrambled = linear_probe(x_train, y_train, x_test, np.random.default_rng(0).permutation(y_test), C, **options)
    assert (scrambled.selected, scrambled.selected_epoch) == (result.selected, result.selected_epoch)
    assert [h["val_top1"] for h in scrambled.heads] == val
    with pytest.raises(ValueError, match="held-out"):
        linear_probe(x_train, y_train, x_test, y_test, C, lrs=lrs, val_fraction=0.0, epochs=1, progress=False)


def test_slot_subset_features_are_the_renormalised_kept_slots():
    emb = F.normalize(torch.randn(7, NUM_SLOTS, SLOT_DIM), dim=-1).flatten(1) * NUM_SLOTS ** -0.5
    fn = slot_block_fn([3, 1], (NUM_SLOTS, SLOT_DIM, "cont:const"))
    expected = emb.view(7, NUM_SLOTS, SLOT_DIM)[:, [3, 1]].flatten(1) * (NUM_SLOTS / 2) ** 0.5
    torch.testing.assert_close(fn(emb), expected)
    with pytest.raises(ValueError, match="SPARO"):
        slot_block_fn([0], None)


# --------------------------------------------------------------------------- DINO's features


@pytest.mark.parametrize("arch, width, n_blocks, avgpool", [("vit_pico", 96, 4, False), ("vit_base", 768, 1, True)])
def test_dino_last_blocks_class_tokens_have_the_protocol_width(arch, width, n_blocks, avgpool):
    model = vit(arch, depth=5, embed_dim=width, num_heads=width // 32, img_size=16, patch_size=8, readout="cls").eval()
    spec = dino_linear_spec(model)
    assert (spec.kind, spec.n_last_blocks, spec.avgpool) == ("last_blocks", n_blocks, avgpool)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = feature_fn(model, spec)(x)
        assert feats.shape == (2, width * (n_blocks + int(avgpool)))
        # the last class token through the final norm is the model's own class-token embedding
        torch.testing.assert_close(feats[:, (n_blocks - 1) * width:n_blocks * width], model(x))
        tokens, per_block = model.prepare_tokens(x), []
        for block in model.blocks:
            tokens = block(tokens)
            per_block.append(model.norm(tokens))
        expected = torch.cat([per_block[-2][:, 0], per_block[-1][:, 0], per_block[-1][:, 1:].mean(1)], 1)
        torch.testing.assert_close(last_blocks_features(model, x, 2, True), expected)
    sparo = vit("vit_pico", depth=5, img_size=16, patch_size=8, sparo={"num_slots": 2, "slot_dim": 4})
    assert dino_linear_spec(sparo).kind == "embedding" and resolve_spec("auto", sparo).kind == "embedding"
    named = resolve_spec("last_blocks", sparo)  # by name: DINO's ViT-S setting, also on a SPARO model
    assert (named.n_last_blocks, named.avgpool) == (4, False)
    with pytest.raises(ValueError, match="n-last-blocks"):
        resolve_spec("last_blocks", sparo, n_last_blocks=5)


# --------------------------------------------------------------------------- the program


def test_linear_cli_end_to_end_with_saved_head(checkpoint, tmp_path, capsys):
    out, head = tmp_path / "linear.json", tmp_path / "head.pth"
    cache = tmp_path / "cache"
    linear_cli.main(["--checkpoint", str(checkpoint), "--train-limit", "200", "--test-limit", "60",
                     "--num-workers", "0",
                     "--lrs", "0.01,1.0", "--epochs", "3", "--probe-batch-size", "64", "--quiet", "--cache-dir",
                     str(cache), "--output-json", str(out), "--save-head", str(head)])
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["features"] == "embedding" and result["feature_dim"] == NUM_SLOTS * SLOT_DIM
    assert result["num_fit"] + result["num_val"] == 200 and result["num_test"] == 60 and result["num_val"] == 20
    assert [h["lr"] for h in result["heads"]] == [0.01, 1.0] and result["lr_scaling"] == "lr × 64/256"
    assert "chosen on held-out train" in table and f"{100 * result['test_top1']:.2f}" in table
    # the saved head, applied to the cached test features, gives the reported accuracy
    saved = load_checkpoint(head)
    layer = torch.nn.Linear(NUM_SLOTS * SLOT_DIM, 10)
    layer.load_state_dict(saved["state_dict"])
    stores = [FeatureStore.open(p) for p in cache.iterdir() if FeatureStore.exists(p)]
    test = next(s for s in stores if len(s) == 60)
    with torch.no_grad():
        pred = layer(torch.from_numpy(np.array(test.features)) * saved["feature_scale"]).argmax(1).numpy()
    assert (pred == test.labels).mean() == pytest.approx(result["test_top1"])
    assert saved["lr"] == result["selected"]["lr"]

    slots = linear_from_checkpoint(checkpoint, train_limit=200, test_limit=60, cache_dir=cache, lrs=(0.1,),
                                              epochs=1, batch_size=64, slots=[0, 3], progress=False)
    assert slots["slots"] == [0, 3] and slots["cache_hit"] == {"train": True, "test": True}
    aug = linear_from_checkpoint(checkpoint, train_limit=100, test_limit=30, cache_dir=None, lrs=(0.1,),
                                            epochs=1, batch_size=50, augment=True, progress=False)
    assert aug["mode"] == "augment" and aug["num_fit"] == 100 and 0.0 <= aug["test_top1"] <= 1.0
