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

    from dino_sparo.train import build_lr_schedule

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    schedule = build_lr_schedule(cfg.optim, global_batch, iters_per_epoch=5000)
    assert schedule.max() == pytest.approx(peak)
    warmup = cfg.optim.warmup_steps or cfg.optim.warmup_epochs * 5000
    assert schedule.argmax() in (warmup - 1, warmup)  # the warm-up ends at the peak


def test_warmup_longer_than_the_run_is_refused_naming_the_key():
    from dino_sparo.train import build_lr_schedule

    cfg = load_config(None, ["optim.epochs=2", "optim.warmup_steps=50"])
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        build_lr_schedule(cfg.optim, 256, iters_per_epoch=10)
    cfg = load_config(None, ["optim.epochs=2", "optim.warmup_epochs=3"])
    with pytest.raises(ValueError, match="optim.warmup_epochs"):
        build_lr_schedule(cfg.optim, 256, iters_per_epoch=10)
