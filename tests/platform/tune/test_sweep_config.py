"""Sweep configs without Ray: validation errors name the key, grid expansion, concurrency, the study presets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cascadelab.platform.config import ConfigError
from cascadelab.platform.tune.sweep import (
    derive_max_concurrent,
    expand_grid,
    load_sweep,
    parse_sweep,
    trial_config,
    yaml_value,
)

STUDIES = sorted((Path(__file__).parents[3] / "configs" / "studies").glob("*.yaml"))
GRID = {"objective.name": ["bce", "dftopk"], "train.seed": [0, 1]}


def _sweep(**raw):
    return parse_sweep({"grid": GRID, **raw}, "s.yaml")


def test_grid_is_the_cartesian_product_first_key_slowest():
    points = expand_grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(points) == 6
    assert points[:4] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}, {"a": 2, "b": "x"}]


def test_every_grid_point_gets_a_validated_config():
    spec = _sweep(base={"data": {"path": "data/demo", "max_rows_per_day": 256}, "train.lr": 0.02})
    assert spec.name == "s"
    assert [(c.objective.name, c.train.seed) for c in spec.configs] == [("bce", 0), ("bce", 1), ("dftopk", 0),
                                                                         ("dftopk", 1)]
    assert all(c.data.max_rows_per_day == 256 and c.train.lr == 0.02 for c in spec.configs)


def test_set_overrides_apply_to_base_and_name_wins():
    spec = parse_sweep({"name": "a", "base": {"data": {"path": "x"}}, "grid": GRID}, "s.yaml",
                       overrides=["data.path=/data/recflow", "data.max_rows_per_day=null"], name="b")
    assert spec.name == "b"
    assert spec.configs[0].data.path == "/data/recflow" and spec.configs[0].data.max_rows_per_day is None


@pytest.mark.parametrize("grid", [{"data.train_days": [["2024-01-13"], ["2024-01-13", "2024-01-14"]]},
                                  {"data.max_rows_per_day": [128, None]}, {"objective.lcron_tau": [1, 50.5]},
                                  {"data.sample_num": [0, 40]}, {"train.lr": [0.01, 0.02]}])
def test_grid_values_round_trip_through_overrides(grid):
    spec = parse_sweep({"grid": grid}, "s.yaml")
    (key, values), = grid.items()
    section, field = key.split(".")
    assert [getattr(getattr(c, section), field) for c in spec.configs] == values


@pytest.mark.parametrize("value", ["abc", "1", 1, 2.5, None, True, [1, 2], "a: b", "x=y", ["2024-01-13"]])
def test_yaml_value_reads_back_unchanged(value):
    assert yaml.safe_load(yaml_value(value)) == value


@pytest.mark.parametrize(("raw", "needle"), [
    ({"grid": {"objective.name": ["bce", "nope"]}}, "unknown objective 'nope'"),
    ({"grid": {"objective.tau": [50, 0]}}, "'objective.tau': expected a positive value"),
    ({"grid": {"objective.lcron_tau": [-1]}}, "'objective.lcron_tau': expected a positive value"),
    ({"grid": {}}, "key 'grid': expected a non-empty mapping"),
    ({"base": {"data": {"path": "x"}}}, "key 'grid': expected a non-empty mapping"),
    ({"grid": {"objective.tauu": [1]}}, "unknown config key 'objective.tauu'"),
    ({"grid": {"objective.tau": 50}}, "key 'grid.objective.tau': expected a non-empty list of values, got 50"),
    ({"grid": {"objective.tau": []}}, "key 'grid.objective.tau': expected a non-empty list"),
    ({"grid": {"train.seed": [0, 0]}}, "key 'grid.train.seed': value 0 is listed twice"),
    ({"grid": {"tracking.uri": ["a", "b"]}}, "key 'grid.tracking.uri'"),
    ({"grid": GRID, "grdi": {}}, "key 'grdi': unknown key"),
    ({"grid": GRID, "base": {"data": {"bath_size": 3}}}, "unknown config key 'data.bath_size'"),
    ({"grid": GRID, "base": ["data.path=x"]}, "key 'base': expected a mapping"),
    ({"grid": GRID, "max_concurrent_trials": 0}, "key 'max_concurrent_trials': expected an integer >= 1"),
    ({"grid": GRID, "name": "a b"}, "key 'name'"),
    ({"grid": GRID, "asha": {"metric": "joint_recall"}}, "key 'asha.metric': 'joint_recall' is only reported"),
    ({"grid": GRID, "asha": {"metric": "stream_joint_recall"}}, "needs train.streaming_eval: true"),
    ({"grid": GRID, "asha": {"metric": "eval/joint_recall_at_10_20"}},
     "'eval/joint_recall_at_10_20' is only reported when a trial ends"),
    ({"grid": GRID, "asha": {"metric": "throughput/samples_per_s_total"}}, "is only reported when a trial ends"),
    ({"grid": GRID, "base": {"train": {"streaming_eval": True}},
      "asha": {"metric": "stream/joint_recall_at_10_30"}},
     "the trials log 'stream_joint_recall' as 'stream/joint_recall_at_10_20', not 'stream/joint_recall_at_10_30'"),
    ({"grid": GRID, "asha": {"grace": 1}}, "key 'asha.grace'"),
    ({"grid": GRID, "asha": {"mode": "up"}}, "key 'asha.mode'"),
    ({"grid": GRID, "asha": {"max_t": 2, "grace_period": 3}}, "key 'asha.grace_period'"),
    ({"grid": {"stages": [[{"model": "dssm", "k": 30}, {"model": "din", "k": 40}]]}}, "'stages[1].k'"),
    ("not a mapping", "expected a mapping"),
])
def test_invalid_sweep_configs_are_one_line_errors_naming_the_key(raw, needle):
    with pytest.raises(ConfigError) as exc:
        parse_sweep(raw, "s.yaml")
    message = str(exc.value)
    assert needle in message and "\n" not in message
    assert message.startswith("sweep config 's.yaml'")


def test_asha_defaults_and_mode_inference():
    spec = _sweep(asha={"metric": "train_loss"})
    assert (spec.asha.metric, spec.asha.mode, spec.asha.grace_period, spec.asha.reduction_factor) == (
        "train_loss", "min", 1, 2)
    spec = _sweep(asha={"metric": "stream_joint_recall", "max_t": 8}, base={"train": {"streaming_eval": True}})
    assert spec.asha.mode == "max" and spec.asha.max_t == 8


@pytest.mark.parametrize(("metric", "key", "mode"), [
    ("loss/total", "train_loss", "min"), ("train_loss", "train_loss", "min"),
    ("loss/dftopk_joint", "dftopk_joint", "min"), ("throughput/step_time_s", "step_time_s", "min"),
    ("throughput/samples_per_s", "samples_per_s", "max"), ("samples_per_s", "samples_per_s", "max"),
    ("stream/joint_recall_at_10_20", "stream_joint_recall", "max"),
])
def test_asha_takes_the_key_or_the_mlflow_name_and_tune_sees_the_key(metric, key, mode):
    spec = _sweep(asha={"metric": metric}, base={"train": {"streaming_eval": True}})
    assert (spec.asha.metric, spec.asha.mode) == (key, mode)


@pytest.mark.parametrize(("cpus", "per_trial", "trials", "expected"), [
    (2, 0.5, 4, 2),  # one 0.5-CPU worker per trial on 2 CPUs: two trials, one CPU left for Ray Data
    (2, 1.0, 4, 1),
    (16, 2.0, 4, 4),  # capped by the number of trials
    (16, 2.0, 20, 7),
    (1, 0.5, 4, 1),  # never below one
    (8, 3 * 0.5, 10, 4),
])
def test_max_concurrent_trials_leaves_one_cpu_for_ray_data(cpus, per_trial, trials, expected):
    assert derive_max_concurrent(cpus, per_trial, trials) == expected


def test_trial_config_makes_paths_absolute_against_the_sweep_directory(tmp_path):
    plan = {"base": ["data.path=data/demo", "tracking.uri=sqlite:////x/m.db"], "keys": ["objective.name"],
            "cwd": str(tmp_path)}
    cfg = trial_config(plan, {"objective.name": "bce", "ignored": 1})
    assert cfg.data.path == str(tmp_path / "data" / "demo") and cfg.objective.name == "bce"
    assert cfg.tracking.uri == "sqlite:////x/m.db"


def test_validation_imports_no_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  objective.tau: [0]\n")
    code = ("import sys\nfrom cascadelab.platform.config import ConfigError\n"
            "from cascadelab.platform.tune.sweep import load_sweep\n"
            f"try:\n    load_sweep({str(bad)!r})\nexcept ConfigError as e:\n    print('ERR', e)\n"
            "print('ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[3]).stdout.splitlines()
    assert out[0].startswith("ERR sweep config") and "objective.tau" in out[0]
    assert out[-1] == "False"


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("grid: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(broken)


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_study_configs_validate(path):
    spec = load_sweep(path)
    assert spec.name == path.stem and len(spec.configs) >= 2
    assert "cascadelab generate --out data/learning-curve" in path.read_text()  # its header makes the data
    assert all(c.data.path == "data/learning-curve" and c.data.max_rows_per_day for c in spec.configs)
    if path.stem != "learning-curve":  # sized where methods separate: 11 training days x 4,096 requests
        assert all(c.data.max_rows_per_day == 4096 and c.data.batch_size == 512 for c in spec.configs)
    assert all(c.data.max_eval_rows is None for c in spec.configs)  # the whole held-out day
    assert all(c.tracking.experiment == path.stem for c in spec.configs)


def test_the_studies_exist():
    assert {p.stem for p in STUDIES} >= {"tau-sensitivity", "negative-sampling", "method-table", "streaming",
                                         "learning-curve"}


@pytest.mark.parametrize("metrics, error, status", [
    ({"joint_recall": 0.6, "done": True}, None, "FINISHED"),
    ({"joint_recall": 0.6}, None, "FINISHED"),  # a trial restored by --resume can finish without 'done'
    ({"train_loss": 1.0, "done": True}, None, "STOPPED"),  # ended early by ASHA
    ({"train_loss": 1.0}, None, "UNFINISHED"),
    ({}, None, "NOT_STARTED"),
    ({"joint_recall": 0.6}, RuntimeError("x"), "ERROR"),
])
def test_trial_status(metrics, error, status):
    from types import SimpleNamespace

    from cascadelab.platform.tune.sweep import _status

    assert _status(SimpleNamespace(metrics=metrics, error=error)) == status


def test_a_trial_whose_mlflow_run_finished_is_not_trained_again(sqlite_uri):
    from mlflow import MlflowClient

    from cascadelab.platform.config import load_config
    from cascadelab.platform.tune.sweep import _finished_run_metrics

    cfg = load_config(None, [f"tracking.uri={sqlite_uri}", "tracking.experiment=fin"])
    assert _finished_run_metrics(cfg, "s-t1") is None  # no experiment yet
    client = MlflowClient(sqlite_uri)
    exp = client.create_experiment("fin")
    running = client.create_run(exp, run_name="s-t1")
    client.log_metric(running.info.run_id, "joint_recall", 0.5)
    assert _finished_run_metrics(cfg, "s-t1") is None  # still running: resume it
    client.set_terminated(running.info.run_id, "FINISHED")
    assert _finished_run_metrics(cfg, "s-t1") == {"joint_recall": 0.5}
    partial = client.create_run(exp, run_name="s-t2")
    client.log_metric(partial.info.run_id, "train_loss", 1.0)
    client.set_terminated(partial.info.run_id, "FINISHED")
    assert _finished_run_metrics(cfg, "s-t2") is None  # no final evaluation
    named = client.create_run(exp, run_name="s-t3")  # logged under the MLflow names
    for name, value in (("eval/joint_recall_at_10_20", 0.75), ("throughput/samples_per_s_total", 900.0),
                        ("throughput/samples_per_s", 800.0), ("loss/total", 1.0)):
        client.log_metric(named.info.run_id, name, value)
    client.set_terminated(named.info.run_id, "FINISHED")
    assert _finished_run_metrics(cfg, "s-t3") == {"joint_recall": 0.75, "samples_per_s": 900.0, "train_loss": 1.0}


def test_table_metrics_follow_the_stage_list():
    from cascadelab.platform.tune.sweep import summary_metrics

    assert summary_metrics(2) == ["joint_recall", "ranking_recall", "ranking_ndcg", "retrieval_recall",
                                  "retrieval_ndcg"]
    assert summary_metrics(4, ndcg=False) == ["joint_recall", "ranking_recall", "prerank2_recall", "prerank1_recall",
                                              "retrieval_recall"]


FOUR = [{"model": "dssm", "k": 40}, {"model": "mlp", "k": 30}, {"model": "din", "k": 25}, {"model": "din", "k": 20}]


def test_a_four_stage_sweep_reports_and_guards_every_stage():
    from types import SimpleNamespace

    from cascadelab.platform.tune.sweep import _trial_rows

    spec = parse_sweep({"base": {"stages": FOUR}, "grid": {"train.seed": [0, 1]}}, "s.yaml")
    assert [len(c.stages) for c in spec.configs] == [4, 4]
    assert spec.metric_names(ndcg=False) == ["joint_recall", "ranking_recall", "prerank2_recall", "prerank1_recall",
                                             "retrieval_recall"]
    stages = ("retrieval", "prerank1", "prerank2", "ranking")
    final = {"trial_id": "t1", "joint_recall": 0.5, **{f"{s}_{m}": 0.1 for s in stages for m in ("recall", "ndcg")}}
    (row,) = _trial_rows([SimpleNamespace(metrics=final, config={"train.seed": 0}, error=None)], ["train.seed"],
                         {}, spec.metric_names())
    assert {"prerank1_recall", "prerank1_ndcg", "prerank2_recall", "prerank2_ndcg"} <= set(row)
    with pytest.raises(ConfigError, match="'prerank2_recall' is only reported when a trial ends"):
        parse_sweep({"base": {"stages": FOUR}, "grid": {"train.seed": [0, 1]}, "asha": {"metric": "prerank2_recall"}},
                    "s.yaml")


def test_a_sweep_with_two_and_four_stage_trials_shows_the_union():
    spec = parse_sweep({"grid": {"stages": [FOUR, [{"model": "dssm", "k": 30}, {"model": "din", "k": 20}]]}}, "s.yaml")
    assert spec.metric_names(ndcg=False) == ["joint_recall", "ranking_recall", "retrieval_recall", "prerank2_recall",
                                             "prerank1_recall"]


def test_base_mixes_nested_and_dotted_keys_and_set_wins():
    spec = parse_sweep({"base": {"data.max_rows_per_day": 64, "data": {"path": "x"}, "train": {"lr": 0.5}},
                        "grid": GRID}, "s.yaml", overrides=["train.lr=0.02", "data.path=y"])
    assert spec.base == {"data": {"max_rows_per_day": 64, "path": "y"}, "train": {"lr": 0.02}}
    assert all((c.data.path, c.data.max_rows_per_day, c.train.lr) == ("y", 64, 0.02) for c in spec.configs)


def test_trial_config_reads_the_stored_plan_of_either_form(tmp_path):
    point = {"objective.name": "bce"}
    nested_plan = {"base": {"data": {"path": "data/demo"}, "tracking": {"uri": "sqlite:////x/m.db"}},
                   "keys": ["objective.name"], "cwd": str(tmp_path)}
    listed_plan = {**nested_plan, "base": ["data.path=data/demo", "tracking.uri=sqlite:////x/m.db"]}
    assert trial_config(nested_plan, point) == trial_config(listed_plan, point)
    assert trial_config(nested_plan, point).objective.name == "bce"


def test_preflight_names_the_grid_point_whose_stage_is_too_large(tiny_dataset):
    from cascadelab.platform.tune.sweep import preflight

    spec = parse_sweep({"base": {"data": {"path": str(tiny_dataset)}},
                        "grid": {"stages": [[{"model": "dssm", "k": 30}, {"model": "din", "k": 20}],
                                            [{"model": "dssm", "k": 50}, {"model": "din", "k": 20}]]}}, "s.yaml")
    with pytest.raises(ConfigError) as exc:
        preflight(spec)
    assert str(exc.value).startswith("sweep config 's.yaml' grid point stages=")
    assert "config key 'stages[0].k': 50 is more than the 40 candidates per request" in str(exc.value)
