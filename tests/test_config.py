"""Configs: defaults, YAML with _base_, overrides, and errors that name the key."""

import pytest

from dino_sparo.config import ConfigError, load_config, save_config, to_dict, from_dict


def test_yaml_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.001\n  epochs: 5\nmodel:\n  arch: vit_tiny\n")
    (tmp_path / "exp.yaml").write_text("_base_: base.yaml\noptim:\n  epochs: 7\n")
    cfg = load_config(tmp_path / "exp.yaml", ["model.readout=cls", "optim.min_lr=1e-5",
                                              "crops.local_crops_scale=[0.1,0.3]"])
    assert cfg.optim.lr == 0.001 and cfg.optim.epochs == 7
    assert cfg.model.arch == "vit_tiny" and cfg.model.readout == "cls"
    assert cfg.optim.min_lr == 1e-5
    assert cfg.crops.local_crops_scale == (0.1, 0.3)
    assert cfg.dino.out_dim == 65536  # untouched default


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'.*optim.lr"),
    ("optim.lr=abc", "'optim.lr' must be a float"),
    ("optim.epochs=2.5", "'optim.epochs' must be an integer"),
    ("model.readout=avg", "'model.readout' must be one of"),
    ("compile=yes please", "'compile' must be true or false"),
    ("crops.global_crops_scale=[0.1]", "'crops.global_crops_scale' must have 2 items"),
    ("model=3", "'model' must be a mapping"),
    ("lr", "must look like key.sub=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_file_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  batch_size: 32\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.batch_size'"):
        load_config(tmp_path / "c.yaml")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.sparo.num_slots=16", "data.path=/x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(to_dict(cfg)) == cfg


def test_every_shipped_config_loads():
    from pathlib import Path
    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        load_config(path)


@pytest.mark.parametrize("name,global_batch,peak", [
    ("dino/vit_small16_vanilla_sparo.yaml", 1024, 5e-4 * 1024 / 256),  # DINO: lr at 256, scaled linearly
    ("clip/vit_b32_sparo.yaml", 2048, 5e-4),  # the SPARO CLIP reference's 5e-4, as given
    ("clip/vit_b16_cls.yaml", 4096, 5e-4),  # also with another global batch
])
def test_peak_learning_rate_of_shipped_recipes(name, global_batch, peak):
    from pathlib import Path

    from dino_sparo.schedules import lr_schedule as build_lr_schedule

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    schedule = build_lr_schedule(cfg.optim, global_batch, iters_per_epoch=5000)
    assert schedule.max() == pytest.approx(peak)
    warmup = cfg.optim.warmup_steps or cfg.optim.warmup_epochs * 5000
    assert schedule.argmax() in (warmup - 1, warmup)  # the warm-up ends at the peak


def test_warmup_longer_than_the_run_is_refused_naming_the_key():
    from dino_sparo.schedules import lr_schedule as build_lr_schedule

    cfg = load_config(None, ["optim.epochs=2", "optim.warmup_steps=50"])
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        build_lr_schedule(cfg.optim, 256, iters_per_epoch=10)
    cfg = load_config(None, ["optim.epochs=2", "optim.warmup_epochs=3"])
    with pytest.raises(ValueError, match="optim.warmup_epochs"):
        build_lr_schedule(cfg.optim, 256, iters_per_epoch=10)


# value refused at load -> the key named in the message, and what is allowed
BAD_VALUES = [
    ("data.batch_size_per_gpu=0", "'data.batch_size_per_gpu' must be an integer >= 1, got 0"),
    ("data.batch_size_per_gpu=-4", "'data.batch_size_per_gpu' must be an integer >= 1, got -4"),
    ("data.num_workers=-1", "'data.num_workers' must be an integer >= 0"),
    ("model.patch_size=5", r"'model.img_size' must be a multiple of model.patch_size \(5\), got 224"),
    ("crops.global_crops_size=200", r"'crops.global_crops_size' must be a multiple of model.patch_size \(16\)"),
    ("crops.local_crops_size=100", r"'crops.local_crops_size' must be a multiple of model.patch_size \(16\)"),
    ("crops.global_crops_number=3", r"'crops.global_crops_number' must be 2 \(DINO's loss"),
    ("model.arch=vit_huge", r"'model.arch' must be one of \['vit_base', 'vit_large', 'vit_pico'"),
    ("model.num_heads=5", r"'model.num_heads' must be a divisor of vit_small's width \(384\)"),
    ("model.depth=1", "'model.depth' must be > 1 for model.readout sparo"),
    ("model.reduce_depth=12", r"'model.reduce_depth' must be in \[0, 11\]"),
    ("model.sparo.norm=cont", "'model.sparo.norm' must be one of"),
    ("model.sparo.num_slots=0", "'model.sparo.num_slots' must be an integer >= 1"),
    ("crops.local_crops_scale=[0.5,0.1]", "'crops.local_crops_scale' must be \\[low, high\\] with 0 < low <= high <= 1"),
    ("optim.epochs=0", "'optim.epochs' must be an integer >= 1"),
    ("optim.lr=0", "'optim.lr' must be > 0"),
    ("optim.warmup_epochs=-1", "'optim.warmup_epochs' must be an integer >= 0"),
    ("dino.teacher_temp=0", "'dino.teacher_temp' must be > 0"),
    ("dino.momentum_teacher=1.5", r"'dino.momentum_teacher' must be in \[0, 1\]"),
    ("log_every=0", "'log_every' must be an integer >= 1"),
    ("eval.knn_k=0", "'eval.knn_k' must be an integer >= 1"),
    ("model.in_chans=2", r"'model.in_chans' must be 1 \(grey images\) or 3 \(RGB\), got 2"),
    ("data.mean=[0.5]", r"'data.mean' must be null or a list of model.in_chans \(3\) values"),
    ("data.std=[0.5,0.5,0]", "'data.std' must be null or values > 0"),
    ("data.alpha_background=[0,0,300]", "'data.alpha_background' must be an RGB triple in 0..255"),
    ("crops.color_jitter_strength=-1", r"'crops.color_jitter_strength' must be in \[0, 5\]"),
    ("crops.grayscale_prob=1.5", r"'crops.grayscale_prob' must be a probability in \[0, 1\]"),
]


def test_one_channel_input_is_refused_in_clip_mode_at_load():
    with pytest.raises(ConfigError, match=r"'model.in_chans' must be 3 in CLIP mode"):
        load_config(None, ["mode=clip", "model.in_chans=1"])
    load_config(None, ["model.in_chans=1", "data.mean=[0.5]", "data.std=[0.2]"])  # DINO mode takes it


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_unusable_values_are_refused_at_load_naming_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    load_config(None, [override], validate=False)  # the type is right: only the value is refused


@pytest.mark.parametrize("overrides", [
    ["data.batch_size_per_gpu=1", "data.num_workers=0"],
    ["model.patch_size=8", "crops.global_crops_size=96", "crops.local_crops_size=32"],
    ["model.patch_size=7", "model.img_size=28", "crops.global_crops_size=28", "crops.local_crops_number=0",
     "crops.local_crops_size=3"],  # no local crops: their size is not used
    ["model.depth=1", "model.readout=cls"],
    ["model.depth=2", "model.reduce_depth=1"],
    ["mode=clip", "crops.global_crops_number=3"],  # CLIP has no multi-crop
])
def test_values_at_the_limits_are_accepted(overrides):
    load_config(None, overrides)


def test_clip_accumulation_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"'clip.accum_steps' must be .* divides data.batch_size_per_gpu \(64\)"):
        load_config(None, ["mode=clip", "clip.accum_steps=3"])
    load_config(None, ["mode=clip", "clip.accum_steps=4"])


def _leaf_keys(values, prefix=""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def test_help_config_lists_every_key_with_type_default_and_meaning(capsys):
    from dino_sparo.config import TrainConfig, config_reference
    from dino_sparo.cli.train import main
    main(["--help-config"])
    text = capsys.readouterr().out
    listed = {line.split(" = ", 1)[0].strip(): line for line in text.splitlines() if line.startswith("  ")}
    rows = {key: (tp, default, meaning) for key, tp, default, meaning in config_reference() if tp}
    defaults = dict(_leaf_keys(to_dict(TrainConfig())))
    assert set(listed) == set(rows) == set(defaults)  # every key, and only keys
    for key, value in defaults.items():
        tp, default, meaning = rows[key]
        assert meaning and tp, key  # a field added without option(meaning=...) fails here
        assert load_config(None, [f"{key}={default}"]) == TrainConfig(), key  # the default, as a user would write it
        assert listed[key] == f"  {key} = {default}  ({tp})  {meaning}"
