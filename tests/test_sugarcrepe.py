"""SugarCrepe: accuracies against the official rule recomputed here item by item (one image and one
caption per forward pass), ties counted wrong, one-line errors for missing data, per-slot accuracy
and slot selection against the same rule on slot sub-vectors, and the command line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_sparo.checkpoint import load_checkpoint
from dino_sparo.cli import sugarcrepe as sugarcrepe_cli
from dino_sparo.data.datasets import DEFAULT_FASHION_MNIST_ROOT
from dino_sparo.data.transforms import clip_eval_transform
from dino_sparo.evaluation import sugarcrepe
from dino_sparo.evaluation.sugarcrepe import CATEGORIES, GROUPS, SugarCrepeItem, correct_items
from dino_sparo.models.clip import baseline_config, build_clip_model, load_clip_model

# the tiny CLIP checkpoint is trained on Fashion-MNIST
needs_checkpoint = pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).exists(),
                                      reason="Fashion-MNIST not installed (make data)")

PRESENT = ("add_att", "replace_rel", "swap_obj")  # three of the seven files, one per group
KEYS = {"add_att": ["0", "2", "5", "6", "9", "11", "12"], "replace_rel": ["1", "3", "4", "8", "10", "13"],
        "swap_obj": ["0", "7", "14", "15", "20", "21"]}  # keys with gaps, as the real files have
TIE = ("replace_rel", "4")  # its negative is its caption: a tie, which must count as wrong
WORDS = ("red", "blue", "small", "striped", "cat", "dog", "table", "horse", "on", "under", "beside", "holding")
NUM_IMAGES = 8


def _caption(rng: random.Random) -> str:
    return f"a {rng.choice(WORDS[:4])} {rng.choice(WORDS[4:8])} {rng.choice(WORDS[8:])} a {rng.choice(WORDS[4:8])}"


def write_benchmark(root: Path, seed: int = 0) -> tuple[Path, Path, dict[str, list[tuple[str, str, str, str]]]]:
    """Random PNGs (some not square, so the transform resizes and crops) and three category files
    that share the images; returns the folders and, per category, (key, filename, caption, negative)."""
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    images, data = root / "images", root / "data"
    (images / "sub").mkdir(parents=True)
    data.mkdir()
    names = []
    for i in range(NUM_IMAGES):
        size = (28, 28) if i % 3 else (34, 40)
        name = f"sub/img{i}.png" if i % 2 else f"img{i}.png"
        Image.fromarray(pixels.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / name)
        names.append(name)
    spec = {}
    for category in PRESENT:
        rows = []
        for key in KEYS[category]:
            caption = _caption(rng)
            negative = caption if (category, key) == TIE else _caption(rng)
            rows.append((key, rng.choice(names), caption, negative))
        spec[category] = rows
        entries = {key: {"filename": f, "caption": c, "negative_caption": n, "id": int(key)} for key, f, c, n in rows}
        (data / f"{category}.json").write_text(json.dumps(entries))
    return data, images, spec


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("sugarcrepe"))


@pytest.fixture(scope="module")
def loaded(clip_checkpoint):
    model, cfg, tokenizer = load_clip_model(clip_checkpoint, "cpu")
    return model, tokenizer, clip_eval_transform(cfg.model.img_size, cfg.clip.image_mean, cfg.clip.image_std)


@pytest.fixture(scope="module")
def one_by_one(bench, loaded):
    """Per category, N × 3 × E: each item's image, caption and negative embedded alone, as the
    official main_eval.py does (no batching, no reuse)."""
    data, images, spec = bench
    model, tokenizer, transform = loaded
    out = {}
    with torch.no_grad():
        for category, rows in spec.items():
            vectors = []
            for _, filename, caption, negative in rows:
                image = model.encode_image(transform(Image.open(images / filename))[None])[0]
                vectors.append(torch.stack([image, model.encode_text(tokenizer([caption]))[0],
                                            model.encode_text(tokenizer([negative]))[0]]))
            out[category] = torch.stack(vectors)
    return out


def rule(vectors: torch.Tensor, slots=None, num_slots: int = 4, slot_dim: int = 8) -> list[bool]:
    """The official rule item by item, on whole embeddings or on the renormalised sub-vectors of
    ``slots``; refuses items too close to call (then batching could flip them, and the test would
    say nothing)."""
    if slots is not None:
        vectors = F.normalize(F.normalize(vectors.view(*vectors.shape[:2], num_slots, slot_dim), dim=-1)[:, :, slots]
                              .flatten(2), dim=-1)
    out = []
    for image, positive, negative in vectors:
        margin = float(image @ positive) - float(image @ negative)
        assert positive.equal(negative) or abs(margin) > 1e-5, f"margin {margin} too small to test"
        out.append(float(image @ positive) > float(image @ negative))
    return out


def expected_summary(correct: dict[str, list[bool]]) -> tuple[dict[str, float], float, dict[str, float]]:
    accuracy = {c: sum(ok) / len(ok) for c, ok in correct.items()}
    micro = sum(sum(ok) for ok in correct.values()) / sum(len(ok) for ok in correct.values())
    groups = {g: sum(accuracy[c] for c in members if c in accuracy) / sum(c in accuracy for c in members)
              for g, members in GROUPS.items() if any(c in accuracy for c in members)}
    return accuracy, micro, groups


# --------------------------------------------------------------------------- the rule


def test_correct_items_counts_strict_wins_only():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)
    positive = torch.tensor([[0.6, 0.8], [0.8, 0.6], [0.6, 0.8], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    negative = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    # an exact tie (same caption), a win, a loss, a win, a tie of different captions (both cosines 0)
    got = correct_items(image, positive, negative)
    assert got.dtype == torch.bool and got.tolist() == [False, True, False, True, False]
    assert correct_items(image.half(), positive.half(), negative.half()).tolist() == got.tolist()
    with pytest.raises(ValueError, match="one shape"):
        correct_items(image, positive[:3], negative)


@needs_checkpoint
def test_accuracies_equal_the_official_rule_item_by_item(bench, loaded, one_by_one, clip_checkpoint):
    data, images, spec = bench
    correct = {c: rule(one_by_one[c]) for c in PRESENT}
    assert correct[TIE[0]][[row[0] for row in spec[TIE[0]]].index(TIE[1])] is False
    accuracy, micro, groups = expected_summary(correct)
    assert 0 < micro < 1  # both outcomes occur: the comparison below can tell right from wrong

    result = sugarcrepe.sugarcrepe_from_checkpoint(clip_checkpoint, data, images, batch_size=3, num_workers=0,
                                                   device="cpu", progress=False)
    assert result["categories_found"] == list(PRESENT)
    assert result["categories_missing"] == [c for c in CATEGORIES if c not in PRESENT]
    assert {c: v["accuracy"] for c, v in result["per_category"].items()} == accuracy
    assert {c: v["num_items"] for c, v in result["per_category"].items()} == {c: len(KEYS[c]) for c in PRESENT}
    assert result["micro_average"] == micro and result["groups"] == groups
    assert result["num_items"] == sum(len(k) for k in KEYS.values()) and result["slot_layout"] == [4, 8]
    json.dumps(result)  # JSON-ready


@needs_checkpoint
def test_each_distinct_image_and_caption_is_encoded_once_and_images_in_memory_score_alike(bench, loaded, one_by_one):
    data, images, spec = bench
    model, tokenizer, transform = loaded
    seen = {"images": 0, "texts": []}
    encode_image = model.encode_image

    def counting_image(x, *args, **kwargs):
        seen["images"] += x.shape[0]
        return encode_image(x, *args, **kwargs)

    def counting_tokenizer(texts):
        seen["texts"] += list(texts)
        return tokenizer(texts)

    used = {row[1] for rows in spec.values() for row in rows}
    in_memory = {name: Image.open(images / name).convert("RGB") for name in used}  # each image object used again
    benchmark = {c: [SugarCrepeItem(in_memory[f], cap, neg, key) for key, f, cap, neg in rows]
                 for c, rows in spec.items()}
    model.encode_image = counting_image
    try:
        result = sugarcrepe.evaluate(model, counting_tokenizer, benchmark, transform, batch_size=4)
    finally:
        del model.encode_image
    captions = {text for rows in spec.values() for r in rows for text in r[2:]}
    assert seen["images"] == len(in_memory) and sorted(seen["texts"]) == sorted(captions)
    accuracy, _, _ = expected_summary({c: rule(one_by_one[c]) for c in PRESENT})
    assert {c: v["accuracy"] for c, v in result["per_category"].items()} == accuracy


# --------------------------------------------------------------------------- the data and its errors


def test_load_benchmark_reads_the_files_in_order_with_gaps_in_the_keys(bench):
    data, images, spec = bench
    benchmark = sugarcrepe.load_benchmark(data, images, ("swap_obj", "add_att", "add_obj"))
    assert list(benchmark) == ["swap_obj", "add_att"]  # add_obj.json is absent: skipped
    for category, items in benchmark.items():
        assert [(i.key, i.image, i.caption, i.negative) for i in items] == [
            (key, str(images / f), c, n) for key, f, c, n in spec[category]]
    with pytest.raises(ValueError, match="unknown SugarCrepe categories.*'add_objects'"):
        sugarcrepe.load_benchmark(data, images, ("add_objects",))


def test_missing_image_or_files_or_fields_are_one_line_errors_naming_them(bench, tmp_path):
    data, images, _ = bench
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "replace_obj.json").write_text(json.dumps({
        "0": {"filename": "img0.png", "caption": "a", "negative_caption": "b"},
        "7": {"filename": "gone.png", "caption": "a", "negative_caption": "b"},
        "9": {"filename": "gone_too.png", "caption": "a", "negative_caption": "b"}}))
    with pytest.raises(FileNotFoundError) as error:
        sugarcrepe.load_benchmark(broken, images)
    message = str(error.value)
    assert "\n" not in message and str(broken / "replace_obj.json") in message and "'7'" in message
    assert str(images / "gone.png") in message and "1 other" in message

    (broken / "replace_obj.json").write_text(json.dumps({"3": {"filename": "img0.png", "caption": "a"}}))
    with pytest.raises(ValueError, match=r"replace_obj\.json, item '3': no text field 'negative_caption'"):
        sugarcrepe.load_benchmark(broken, images)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no SugarCrepe JSON file in {empty}.*add_att.json.*swap_obj.json"):
        sugarcrepe.load_benchmark(empty, images)
    with pytest.raises(FileNotFoundError, match=f"image folder not found: {tmp_path / 'nowhere'}"):
        sugarcrepe.load_benchmark(data, tmp_path / "nowhere")


@needs_checkpoint
def test_cli_mistakes_exit_with_one_line(bench, clip_checkpoint, tmp_path, capsys):
    data, images, _ = bench
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "swap_att.json").write_text(json.dumps({"5": {"filename": "gone.png", "caption": "a",
                                                            "negative_caption": "b"}}))
    dino_like = tmp_path / "dino.pth"  # the CLIP run's checkpoint relabelled as a DINO run
    state = load_checkpoint(clip_checkpoint)
    state["config"]["mode"] = "dino"
    torch.save(state, dino_like)
    base = ["--num-workers", "0", "--device", "cpu"]
    cases = [
        (["--checkpoint", str(clip_checkpoint), "--data", str(tmp_path / "nowhere"), "--images", str(images)],
         ["nowhere"]),
        (["--checkpoint", str(clip_checkpoint), "--data", str(tmp_path), "--images", str(images)],
         ["no SugarCrepe JSON file", str(tmp_path)]),
        (["--checkpoint", str(clip_checkpoint), "--data", str(broken), "--images", str(images)],
         ["swap_att.json", "'5'", str(images / "gone.png")]),
        (["--checkpoint", str(dino_like), "--data", str(data), "--images", str(images)], ["dino.pth", "'clip'"]),
        (["--checkpoint", str(clip_checkpoint), "--data", str(data), "--images", str(images), "--select-slots",
          "--max-slots", "5"], ["max_slots"]),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as stop:
            sugarcrepe_cli.main(argv + base)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        last = err[-1]
        assert stop.value.code == 2 and last.startswith("dino-sparo-sugarcrepe: error: "), err
        assert "Traceback" not in "\n".join(err) and all(word in last for word in words), (last, words)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- slots


@needs_checkpoint
def test_per_slot_and_selected_slots_follow_the_rule_on_slot_sub_vectors(bench, loaded, one_by_one):
    data, images, _ = bench
    model, tokenizer, transform = loaded
    benchmark = sugarcrepe.load_benchmark(data, images)
    result = sugarcrepe.evaluate(model, tokenizer, benchmark, transform, per_slot=True, select_slots=True,
                                 selection_fraction=0.5, seed=3, batch_size=5)
    for slot in range(4):
        correct = {c: rule(one_by_one[c], [slot]) for c in PRESENT}
        accuracy, micro, _ = expected_summary(correct)
        assert {c: result["per_slot"][c][slot] for c in PRESENT} == accuracy
        assert result["per_slot"]["micro"][slot] == micro

    selection = result["slot_selection"]
    assert (selection["scope"], selection["fraction"], selection["seed"]) == ("category", 0.5, 3)
    on_evaluation_all, on_evaluation_selected = {}, {}
    for category in PRESENT:
        s = selection["per_category"][category]
        chosen, measured, n = s["selection_items"], s["evaluation_items"], len(KEYS[category])
        assert not set(chosen) & set(measured) and sorted(chosen + measured) == list(range(n))
        assert (s["num_selection"], s["num_evaluation"]) == (len(chosen), len(measured)) and len(chosen) == round(n / 2)
        vectors = one_by_one[category]
        # the selection's score is the rule counted on the selection items, with the chosen slots
        assert s["curve"][-1] == sum(rule(vectors[chosen], s["selected"])) / len(chosen)
        on_evaluation_all[category] = rule(vectors[measured])
        on_evaluation_selected[category] = rule(vectors[measured], s["selected"])
        assert s["accuracy_all"] == sum(on_evaluation_all[category]) / len(measured)
        assert s["accuracy_selected"] == sum(on_evaluation_selected[category]) / len(measured)
    _, micro_all, groups_all = expected_summary(on_evaluation_all)
    _, micro_selected, groups_selected = expected_summary(on_evaluation_selected)
    assert (selection["micro_all"], selection["groups_all"]) == (micro_all, groups_all)
    assert (selection["micro_selected"], selection["groups_selected"]) == (micro_selected, groups_selected)

    # the evaluation items' negatives do not enter the choice: made ties (all wrong), the choice stays
    spoiled = {c: list(items) for c, items in benchmark.items()}
    for category, items in spoiled.items():
        for i in selection["per_category"][category]["evaluation_items"]:
            items[i] = SugarCrepeItem(items[i].image, items[i].caption, items[i].caption, items[i].key)
    again = sugarcrepe.evaluate(model, tokenizer, spoiled, transform, select_slots=True, seed=3)["slot_selection"]
    for category in PRESENT:
        before, after = selection["per_category"][category], again["per_category"][category]
        assert (after["selected"], after["curve"]) == (before["selected"], before["curve"])
        assert after["accuracy_all"] == after["accuracy_selected"] == 0.0


@needs_checkpoint
def test_pooled_selection_chooses_one_subset_on_all_selection_items(bench, loaded, one_by_one):
    data, images, _ = bench
    model, tokenizer, transform = loaded
    benchmark = sugarcrepe.load_benchmark(data, images)
    result = sugarcrepe.evaluate(model, tokenizer, benchmark, transform, select_slots=True, selection_scope="all",
                                 selection_fraction=0.4, max_slots=2, seed=1)
    per_category = result["slot_selection"]["per_category"]
    selected = per_category[PRESENT[0]]["selected"]
    assert 1 <= len(selected) <= 2 and all(v["selected"] == selected for v in per_category.values())
    pooled = [ok for c in PRESENT for ok in rule(one_by_one[c][per_category[c]["selection_items"]], selected)]
    assert per_category[PRESENT[0]]["curve"][-1] == sum(pooled) / len(pooled)
    assert [len(v["selection_items"]) for v in per_category.values()] == [round(0.4 * len(KEYS[c])) for c in PRESENT]


@needs_checkpoint
def test_slot_options_are_refused_where_they_cannot_work(bench, loaded, clip_checkpoint):
    data, images, _ = bench
    model, tokenizer, transform = loaded
    benchmark = sugarcrepe.load_benchmark(data, images)
    cfg = load_clip_model(clip_checkpoint, "cpu")[1]
    plain = build_clip_model(baseline_config(cfg)).eval()  # class / end-of-text tokens: no slots
    with pytest.raises(ValueError, match="need a model with SPARO read-outs"):
        sugarcrepe.evaluate(plain, tokenizer, benchmark, transform, per_slot=True)
    assert "slot_layout" not in sugarcrepe.evaluate(plain, tokenizer, benchmark, transform)
    lonely = {"add_att": benchmark["add_att"][:1], "swap_obj": benchmark["swap_obj"]}
    with pytest.raises(ValueError, match="category 'add_att' has 1 item"):
        sugarcrepe.evaluate(model, tokenizer, lonely, transform, select_slots=True)
    with pytest.raises(ValueError, match="selection_fraction"):
        sugarcrepe.evaluate(model, tokenizer, benchmark, transform, select_slots=True, selection_fraction=1.0)


# --------------------------------------------------------------------------- the command line


@needs_checkpoint
def test_cli_prints_the_table_and_writes_the_json(bench, clip_checkpoint, tmp_path, capsys):
    data, images, _ = bench
    output = tmp_path / "new" / "folder" / "sugarcrepe.json"
    sugarcrepe_cli.main(["--checkpoint", str(clip_checkpoint), "--data", str(data), "--images", str(images),
                         "--categories", "swap_obj,add_att,replace_rel", "--per-slot", "--select-slots",
                         "--num-workers", "1", "--batch-size", "4", "--device", "cpu", "--output-json", str(output)])
    table = capsys.readouterr().out
    saved = json.loads(output.read_text())
    assert {"categories_found", "categories_missing", "per_category", "micro_average", "groups", "num_items",
            "slot_layout", "per_slot", "slot_selection"} <= set(saved)
    assert saved["categories_found"] == ["swap_obj", "add_att", "replace_rel"] and set(saved["groups"]) == set(GROUPS)
    reference = sugarcrepe.sugarcrepe_from_checkpoint(clip_checkpoint, data, images, num_workers=0, device="cpu",
                                                      progress=False)
    assert saved["per_category"] == reference["per_category"] and saved["micro_average"] == reference["micro_average"]
    assert {"selected", "accuracy_selected", "accuracy_all", "num_selection", "num_evaluation"} <= set(
        saved["slot_selection"]["per_category"]["add_att"])
    lines = table.splitlines()
    for category in PRESENT:
        row = next(line for line in lines if line.startswith(category))
        value = saved["per_category"][category]
        assert row.split()[1:3] == [str(value["num_items"]), f"{100 * value['accuracy']:.2f}%"]
    assert any(line.split()[:2] == ["micro-average", str(saved["num_items"])] for line in lines)
    assert all(any(line.startswith(g) for line in lines) for g in GROUPS)
    assert "one slot alone" in table and "slot selection" in table


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as stop:
        sugarcrepe_cli.main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "main_eval.py" in text
    for option in ("--checkpoint", "--data", "--images", "--categories", "--per-slot", "--select-slots",
                   "--selection-fraction", "--selection-scope", "--max-slots", "--seed", "--batch-size",
                   "--num-workers", "--device", "--output-json"):
        assert option in text, option
    for default in ("(default: 0.5)", "(default: category)", "(default: 0)", "(default: 256)", "(default: 2)",
                    "(default: auto)", "(default: none, only the table on stdout)", "(default: no limit",
                    "(default: all seven)"):
        assert default in text, default
