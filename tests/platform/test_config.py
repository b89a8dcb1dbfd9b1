from pathlib import Path

import pytest

from cascadelab.platform.config import (
    ConfigError,
    flatten,
    from_dict,
    load_config,
    parse_override,
    parse_overrides,
    unflatten,
)


def test_defaults_are_a_two_stage_dftopk_cascade():
    cfg = load_config()
    assert [(s.model, s.k) for s in cfg.stages] == [("dssm", 30), ("din", 20)]
    assert cfg.objective.name == "dftopk" and cfg.objective.tau == 5.0  # measured on the embedded default
    assert cfg.objective.bce_last_stage_groups == 4


def test_yaml_then_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("objective:\n  name: bce\ntrain:\n  lr: 0.001\n")
    cfg = load_config(f, ["train.lr=0.02", "stages=[{model: dssm, k: 40}, {model: mlp, k: 30}, "
                                            "{model: din, k: 20}]"])
    assert cfg.objective.name == "bce"
    assert cfg.train.lr == 0.02
    assert [s.model for s in cfg.stages] == ["dssm", "mlp", "din"]


def test_days_typed_as_dates_are_kept_as_iso_strings(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  eval_day: 2024-01-24\n")  # YAML reads an unquoted day as a date
    cfg = load_config(f, ["data.train_days=[2024-01-13, 2024-01-14]"])
    assert cfg.data.eval_day == "2024-01-24"
    assert cfg.data.train_days == ["2024-01-13", "2024-01-14"]


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
    ("=1", "empty key before '='"),
    ("data.max_eval_rows=0", "config key 'data.max_eval_rows': expected a positive number of rows or null"),
    ("data.max_rows_per_day=-5", "config key 'data.max_rows_per_day': expected a positive number of rows"),
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
    assert flat["data.max_eval_rows"] is None and "data" not in flat  # leaves only, dotted


def test_row_caps_accept_null_and_positive_counts():
    cfg = load_config(None, ["data.max_eval_rows=", "data.max_rows_per_day=512"])
    assert cfg.data.max_eval_rows is None and cfg.data.max_rows_per_day == 512


def test_overrides_parse_as_yaml_into_one_nested_dict():
    assert parse_override("objective.tau= 100") == ("objective.tau", 100)
    assert parse_override("tracking.run_name=") == ("tracking.run_name", None)
    assert parse_override("data.path=s3://b/x=y") == ("data.path", "s3://b/x=y")  # split at the first '='
    nested = parse_overrides(["train.lr=0.5", "train.seed=3", "objective.name=bce", "train.lr=0.25"])
    assert nested == {"train": {"lr": 0.25, "seed": 3}, "objective": {"name": "bce"}}
    cfg = load_config(None, nested)  # a dict travels as is
    assert (cfg.train.lr, cfg.train.seed, cfg.objective.name) == (0.25, 3, "bce")
    assert load_config(None, ["train.lr=0.5", "train.lr=0.25"]).train.lr == 0.25  # the later string wins


def test_unflatten_inverts_flatten_on_nested_mappings():
    nested = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}
    assert flatten(nested) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert unflatten(flatten(nested)) == nested
    assert unflatten({"a": 1, "a.b": 2}) == {"a": {"b": 2}}  # a deeper key replaces a leaf
