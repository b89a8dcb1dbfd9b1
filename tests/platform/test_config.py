from pathlib import Path

import pytest

from cascadelab.platform.config import CascadeConfig, ConfigError, flatten, from_dict, load_config


def test_defaults_are_a_two_stage_dftopk_cascade():
    cfg = load_config()
    assert [(s.model, s.k) for s in cfg.stages] == [("dssm", 30), ("din", 20)]
    assert cfg.objective.name == "dftopk" and cfg.objective.tau == 500.0


def test_yaml_then_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("objective:\n  name: bce\ntrain:\n  lr: 0.001\n")
    cfg = load_config(f, ["train.lr=0.02", "stages=[{model: dssm, k: 40}, {model: mlp, k: 30}, "
                                            "{model: din, k: 20}]"])
    assert cfg.objective.name == "bce"
    assert cfg.train.lr == 0.02
    assert [s.model for s in cfg.stages] == ["dssm", "mlp", "din"]


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'; valid keys under 'train': .*lr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'nope'; valid keys at the top level"):
        load_config(None, ["nope=1"])


@pytest.mark.parametrize("override, match", [
    ("train.lr=abc", "config key 'train.lr': expected float"),
    ("objective.tau=0", "config key 'objective.tau': expected a positive value"),
    ("objective.name=magic", "unknown objective 'magic'"),
    ("stages=[{model: dssm, k: 10}, {model: din, k: 20}]", r"stages\[1\].k"),
    ("train.use_gpu=maybe", "train.use_gpu"),
    ("data.parquet_reader=v3", "config key 'data.parquet_reader': expected one of auto, v1, v2, got 'v3'"),
    ("justakey", "expected key=value"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*missing.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_and_flatten():
    cfg = load_config(None, ["objective.tau=3"])
    assert from_dict(cfg.to_dict()) == cfg
    flat = flatten(cfg.to_dict())
    assert flat["objective.tau"] == 3.0 and flat["stages.1.model"] == "din"
    assert isinstance(CascadeConfig().to_dict(), dict)
