"""The procedural scene world: pure, true captions, false hard negatives (checked by an independent
reading of the caption text), balanced lengths, no text shortcut, honest splits, and its files."""

from __future__ import annotations

import csv
import itertools
import json
import re

import numpy as np
import pytest
import torch

from dino_sparo.config import ConfigError, load_config
from dino_sparo.data.samplers import SeededSamples
from dino_sparo.data.scenes import (BACKGROUND, COLOURS, KINDS, SHAPES, SIZE_WORDS, SceneCaptions, SceneImages,
                                    SceneWorld, WorldSettings, benchmark, zeroshot_prompts)

WORLD = SceneWorld(WorldSettings(heldout_pairs=4, distractors=(0, 1), train_size=5000, test_size=3000))

# An independent reader of the caption grammar: "[prefix] a [size] colour shape [relation a ...][, and a ...]."
_PHRASE = rf"an? (?:({'|'.join(SIZE_WORDS)}) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"^(?:there is |a picture of )?{_PHRASE}(?: (left of|right of|above|below) {_PHRASE})?"
                      rf"((?:, and {_PHRASE})*)\.$")


def read_caption(text: str) -> tuple[list[tuple], str | None]:
    """``([(size word or None, colour, shape), ...], relation)`` from a caption's text."""
    match = _CAPTION.match(text)
    assert match, f"caption outside the grammar: {text!r}"
    g = match.groups()
    objects = [g[0:3]] + ([g[4:7]] if g[3] else [])
    objects += re.findall(_PHRASE, g[7] or "")
    return [(o[0] or None, o[1], o[2]) for o in objects], g[3]


def true_of(scene, text: str, margin: float) -> bool:
    """Whether some assignment of distinct objects makes the caption true (relations on centres)."""
    objects, relation = read_caption(text)
    offset = {"left of": lambda a, b: b.x - a.x, "right of": lambda a, b: a.x - b.x,
              "above": lambda a, b: b.y - a.y, "below": lambda a, b: a.y - b.y}
    for chosen in itertools.permutations(scene.objects, len(objects)):
        if all(COLOURS[o.colour] == c and SHAPES[o.shape] == s and (z is None or SIZE_WORDS[o.size] == z)
               for o, (z, c, s) in zip(chosen, objects)):
            if relation is None or offset[relation](chosen[0], chosen[1]) >= margin:
                return True
    return False


def test_scenes_are_pure_functions_of_seed_split_and_index():
    again = SceneWorld(WORLD.settings)
    for index in (0, 7, 4999):
        a, b = WORLD.scene("train", index), again.scene("train", index)
        assert a.objects == b.objects and WORLD.caption(a) == again.caption(b)
        assert np.array_equal(WORLD.render(a)[0], again.render(b)[0])
    other_seed = SceneWorld(WorldSettings(seed=1, heldout_pairs=4))
    assert WORLD.scene("train", 3).objects != other_seed.scene("train", 3).objects
    assert WORLD.scene("train", 3).objects != WORLD.scene("test", 3).objects
    # as the training loop reads them: the same (epoch, index) gives the same pair, another epoch a paraphrase
    seeded = SeededSamples(SceneCaptions(WORLD, "train"), seed=0)
    assert seeded[(0, 5)][1] == seeded[(0, 5)][1]
    captions = {seeded[(epoch, 5)][1] for epoch in range(12)}
    assert len(captions) > 1 and all(true_of(WORLD.scene("train", 5), c, WORLD.margin_px) for c in captions)


def test_captions_are_true_and_hard_negatives_false_under_every_reading():
    made = benchmark(WORLD, "test", 150)
    for kind in KINDS:
        assert len(made[kind]) == 150, kind
        for index, positive, negative in made[kind]:
            scene = WORLD.scene("test", index)
            assert true_of(scene, positive, WORLD.margin_px), (kind, positive)
            assert not true_of(scene, negative, 0.0), (kind, negative)  # not even a lenient reading
            assert len(positive.split()) == len(negative.split()), (kind, positive, negative)
            assert positive != negative


def test_the_canonical_caption_names_every_described_object_and_no_distractor():
    for index in range(300):
        scene = WORLD.scene("train", index)
        objects, relation = read_caption(WORLD.caption(scene))
        assert len(objects) == scene.described
        assert (relation is not None) == (scene.described >= 2)


def test_word_order_does_not_give_position_away():
    """For horizontal relations, the first-named object is the left one about half of the time."""
    first_is_left = []
    for index in range(3000):
        scene = WORLD.scene("train", index)
        objects, relation = read_caption(WORLD.caption(scene))
        if relation in ("left of", "right of"):
            first_is_left.append(relation == "left of")
    assert len(first_is_left) > 500
    assert abs(np.mean(first_is_left) - 0.5) < 0.05


@pytest.mark.parametrize("settings", [dict(heldout_pairs=4),
                                      dict(shapes=8, colours=8, distractors=(1, 1), hard_replacements=True, margin=0.2)])
def test_a_bag_of_words_model_finds_no_text_shortcut(settings):
    from dino_sparo.evaluation.scene_eval import bag_of_words_baseline

    world = SceneWorld(WorldSettings(**settings, train_size=20000, test_size=20000))
    fit, score = benchmark(world, "train", 2000), benchmark(world, "test", 2000)
    accuracy = bag_of_words_baseline(fit, score)
    assert set(accuracy) == set(KINDS)
    for kind, value in accuracy.items():
        assert abs(value - 0.5) <= 0.03, (kind, value)
    # the same model does find a planted shortcut: negatives that always say "large"
    planted = {"replace_att": [(i, p.replace("large ", ""), n if "large" in n else n.replace(" a ", " a large ", 1))
                               for i, p, n in fit["replace_att"]]}
    planted_score = {"replace_att": [(i, p.replace("large ", ""), n if "large" in n else n.replace(" a ", " a large ", 1))
                                     for i, p, n in score["replace_att"]]}
    assert bag_of_words_baseline(planted, planted_score)["replace_att"] > 0.9


def test_withheld_pairs_appear_only_in_the_heldout_split():
    withheld = WORLD.heldout
    assert len(withheld) == 4
    assert len({c for c, _ in withheld}) == 4 and len({s for _, s in withheld}) == 4  # each colour, shape once
    for split in ("train", "test"):
        for index in range(500):
            assert not any((o.colour, o.shape) in withheld for o in WORLD.scene(split, index).objects)
    for index in range(300):
        scene = WORLD.scene("heldout", index)
        assert any((o.colour, o.shape) in withheld for o in scene.objects[:scene.described])
        assert not any((o.colour, o.shape) in withheld for o in scene.objects[scene.described:])


def test_masks_cover_each_object_in_its_colour_and_the_rest_is_background():
    for index in range(50):
        scene = WORLD.scene("test", index)
        image, masks = WORLD.render(scene)
        assert masks.shape == (len(scene.objects), 32, 32) and masks.any(axis=(1, 2)).all()
        assert not (masks.sum(axis=0) > 1).any()  # objects never overlap
        assert (image[~masks.any(axis=0)] == BACKGROUND).mean() > 0.95  # anti-aliased edges aside
        for k, obj in enumerate(scene.objects):
            inside = image[masks[k]].astype(float)
            colour = np.array({0: (225, 30, 30), 1: (30, 175, 50), 2: (45, 80, 235), 3: (240, 220, 35),
                               4: (155, 55, 205), 5: (250, 140, 20)}[obj.colour])
            values, counts = np.unique(inside, axis=0, return_counts=True)  # fully covered pixels share one value
            assert np.abs(values[counts.argmax()] - colour).max() <= 12.5  # the object's colour, shaded by ±12


def test_zeroshot_label_sets_label_one_object_scenes():
    for task, count in (("shape", 6), ("colour", 6), ("colour_shape", 36)):
        data = SceneImages(WORLD, "test", label=task, single=True, limit=200)
        assert data.num_classes == count and len(data) == 200
        names, templates = zeroshot_prompts(task, 6, 6)
        assert len(names) == count
        for index in range(20):
            scene = data.world.scene("test", index)
            assert len(scene.objects) == 1
            obj = scene.objects[0]
            name = {"shape": SHAPES[obj.shape], "colour": COLOURS[obj.colour],
                    "colour_shape": f"{COLOURS[obj.colour]} {SHAPES[obj.shape]}"}[task]
            assert data.classes[data.targets[index]] == name
            # the prompts read as captions: one of the true class' is true of the scene (all of them for
            # colour + shape, which names everything), and none of another class'
            truth = [true_of(scene, t.format(names[data.targets[index]]), 0.0) for t in templates]
            assert (all(truth) if task == "colour_shape" else sum(truth) == 1)
            other = (data.targets[index] + 1) % count
            assert not any(true_of(scene, t.format(names[other]), 0.0) for t in templates)


def test_world_settings_are_checked_at_config_load():
    cfg = load_config(None, ["data.dataset=scenes", "data.scenes.objects=[2,2]"])
    assert tuple(cfg.data.scenes.objects) == (2, 2)
    for override, key in (("data.scenes.shapes=9", "data.scenes.shapes"),
                          ("data.scenes.objects=[3,1]", "data.scenes.objects"),
                          ("data.scenes.heldout_pairs=7", "data.scenes.heldout_pairs")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, ["data.dataset=scenes", override])


def test_export_writes_what_the_training_program_and_the_sugarcrepe_evaluator_read(tmp_path):
    from dino_sparo.data.captions import CaptionTable
    from dino_sparo.data.scenes_export import export_scenes
    from dino_sparo.evaluation.sugarcrepe import load_benchmark

    summary = export_scenes(WORLD, tmp_path, 40, "test", progress=False)
    table = CaptionTable(tmp_path / "captions.csv")
    assert len(table) == 40
    for index in (0, 13, 39):
        scene = WORLD.scene("test", index)
        assert table.captions[index] == WORLD.caption(scene)
        assert np.array_equal(np.asarray(table.load_image(index)), WORLD.render(scene)[0])  # PNG is lossless
    loaded = load_benchmark(tmp_path / "sugarcrepe", tmp_path / "images")
    assert set(loaded) == set(KINDS)
    expected = benchmark(WORLD, "test", 40, limit=40)
    for kind in KINDS:
        assert summary["items"][kind] == len(loaded[kind]) == len(expected[kind]) > 0
        assert [(i.caption, i.negative) for i in loaded[kind]] == [(p, n) for _, p, n in expected[kind]]
    with (tmp_path / "captions.csv").open() as handle:
        assert next(csv.reader(handle)) == ["path", "caption"]
    graphs = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert len(graphs) == 40 and graphs[0]["caption"] == table.captions[0]


def test_scene_images_train_dino_and_feed_clip_mode(tmp_path):
    """Both modes take the world from the config: a DINO step on scene images, a CLIP step on pairs."""
    from conftest import TINY_CLIP_TRAINING, TINY_TRAINING
    from dino_sparo.train import train

    scenes = ["data.dataset=scenes", "data.scenes.train_size=64", "data.scenes.test_size=64", "model.img_size=32"]
    dino = train(load_config(None, [*TINY_TRAINING, *scenes, "crops.global_crops_size=32", "crops.local_crops_size=16",
                                    "max_steps=2", f"output_dir={tmp_path / 'dino'}"]))
    assert dino["step"] == 2 and np.isfinite(dino["loss"])
    clip = train(load_config(None, [*TINY_CLIP_TRAINING, *scenes, "clip.dataset=scenes", "model.patch_size=8",
                                    "clip.context_length=32", "clip.crop_scale=[1.0,1.0]", "clip.crop_ratio=[1.0,1.0]",
                                    "max_steps=2", f"output_dir={tmp_path / 'clip'}"]))
    assert clip["step"] == 2 and np.isfinite(clip["loss"])


def test_retrieval_counts_pairs_with_the_same_caption_as_hits():
    from dino_sparo.evaluation.zeroshot import retrieval_recall

    torch.manual_seed(0)
    n = 40
    groups = torch.randint(0, 12, (n,))
    image = torch.nn.functional.normalize(torch.randn(n, 8), dim=-1)
    text = torch.nn.functional.normalize(image + 0.9 * torch.randn(n, 8), dim=-1)
    result = retrieval_recall(image, text, groups=groups)
    sims = image @ text.T
    for k in (1, 5):
        for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
            hits = []
            for q in range(n):
                order = sorted(range(n), key=lambda c: -float(s[q, c]))
                top = order[:k]
                best_same = max(float(s[q, c]) for c in range(n) if groups[c] == groups[q])
                ties = [c for c in range(n) if groups[c] != groups[q] and float(s[q, c]) >= best_same]
                hits.append(len(ties) < k and any(groups[c] == groups[q] for c in top))
            assert result[f"{name}_R@{k}"] == pytest.approx(np.mean(hits))
    assert retrieval_recall(image, text) == retrieval_recall(image, text, groups=torch.arange(n))


def test_clip_demo_and_scene_evaluation_run_end_to_end(tmp_path, capsys):
    """The CLIP demo's path on a tiny run: train, measure trained and initial models, draw the slots;
    then ``dino-sparo-scenes evaluate`` on the same checkpoint."""
    from conftest import TINY_CLIP_TRAINING
    from dino_sparo.cli import scenes as scenes_cli
    from dino_sparo.demo import format_demo, run_clip_demo

    cfg = load_config(None, [*TINY_CLIP_TRAINING, "clip.dataset=scenes", "data.dataset=scenes", "model.img_size=32",
                             "model.patch_size=8", "clip.context_length=32", "data.scenes.train_size=64",
                             "data.scenes.test_size=40", "data.scenes.heldout_pairs=2", "max_steps=2",
                             f"output_dir={tmp_path}"])
    summary = run_clip_demo(cfg, "tiny", count=20)
    trained, initial = summary["results"]["trained"], summary["results"]["at init"]
    assert set(trained["sugarcrepe"]) == {"test", "heldout"}
    assert trained["sugarcrepe"]["test"]["per_category"].keys() == set(KINDS)
    assert "slot_selection" in trained["sugarcrepe"]["test"] and "slot_selection" not in initial["sugarcrepe"]["test"]
    assert 0 <= trained["slot_objects"]["ari"] <= 1 and (tmp_path / "slot_attention.png").stat().st_size > 0
    assert set(summary["text_only"]) == {"test", "heldout"}
    table = format_demo(summary)
    assert "replace_obj" in table and "at init" in table and "text-only, heldout" in table
    scenes_cli.main(["evaluate", "--checkpoint", str(tmp_path / "checkpoint.pth"), "--count", "20",
                     "--device", "cpu", "--output-json", str(tmp_path / "e.json")])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["zeroshot"]["colour_shape"]["num_classes"] == 36 and "swap_att" in capsys.readouterr().out


def test_hard_replacements_take_a_distractor_s_colour_or_shape_when_one_makes_the_caption_false():
    world = SceneWorld(WorldSettings(distractors=(1, 1), hard_replacements=True, test_size=400))
    plain = SceneWorld(WorldSettings(distractors=(1, 1), test_size=400))
    shares = {}
    for name, w in (("hard", world), ("plain", plain)):
        from_distractor = []
        for kind, attribute, words in (("replace_att", "colour", COLOURS), ("replace_obj", "shape", SHAPES)):
            for index, positive, negative in benchmark(w, "test", 200, kinds=(kind,))[kind]:
                scene = w.scene("test", index)
                assert not true_of(scene, negative, 0.0)
                new = set(negative.rstrip(".").replace(",", "").split()) - set(positive.rstrip(".").replace(",", "").split())
                hidden = {words[getattr(o, attribute)] for o in scene.objects[scene.described:]}
                if new & set(words):
                    from_distractor.append(bool(new & hidden))
        shares[name] = np.mean(from_distractor)
    assert shares["hard"] > 0.7 and shares["plain"] < 0.3, shares
