"""Tracker: one MLflow run, on a real SQLite store; what it logs is read back with MLflow's own client."""

from __future__ import annotations

import math
import pickle

from mlflow import MlflowClient

from cascadelab.platform.tracking import Tracker, end_run, log_metrics, runs_named, start_run


def test_a_run_logs_params_metrics_artifacts_and_tags(sqlite_uri, tmp_path):
    tracker = Tracker.start(sqlite_uri, "exp", "r1", {"a.b": 1, "none": None, "long": "x" * 7000},
                            tags={"t": "v"})
    tracker.log_dict({"loss": 0.5, "nan": math.nan, "missing": None}, step=0)
    tracker.log_dict({"loss": 0.25}, step=1)
    tracker.log("samples_per_s", 10.0, step=1)
    tracker.log_text("hello", "notes/hello.txt")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "f.txt").write_text("f")
    tracker.log_artifact(tmp_path / "dir", "checkpoint")
    tracker.set_tags({"k": "v2"})
    tracker.close("FAILED")
    run = MlflowClient(sqlite_uri).get_run(tracker.run_id)
    assert run.info.run_name == "r1" and run.info.status == "FAILED"
    assert run.data.params["a.b"] == "1" and run.data.params["none"] == "null"
    assert len(run.data.params["long"]) == 6000
    assert set(run.data.metrics) == {"loss", "samples_per_s"}  # NaN and None are not logged
    assert tracker.history("loss") == [(0, 0.5), (1, 0.25)]
    assert run.data.tags["t"] == "v" and run.data.tags["k"] == "v2"
    assert tracker.download("notes/hello.txt", tmp_path / "dl").read_text() == "hello"
    assert [a.path for a in MlflowClient(sqlite_uri).list_artifacts(tracker.run_id, "checkpoint")] == [
        "checkpoint/f.txt"]
    tracker.reopen()
    assert MlflowClient(sqlite_uri).get_run(tracker.run_id).info.status == "RUNNING"


def test_a_tracker_pickles_as_its_run_and_finds_its_children(sqlite_uri):
    parent = Tracker.start(sqlite_uri, "exp", "parent")
    copy = pickle.loads(pickle.dumps(parent))
    assert (copy.uri, copy.run_id, copy._client) == (parent.uri, parent.run_id, None)
    child = Tracker.start(sqlite_uri, "exp", "child", tags={"mlflow.parentRunId": copy.run_id})
    copy.log_dict({"m": 1.0})
    assert [r.info.run_id for r in parent.children()] == [child.run_id]
    assert MlflowClient(sqlite_uri).get_run(parent.run_id).data.metrics == {"m": 1.0}
    child.delete()
    assert parent.children() == []


def test_the_run_id_functions_are_the_same_calls(sqlite_uri):
    run_id = start_run(sqlite_uri, "exp", "fn", {"p": 2})
    log_metrics(sqlite_uri, run_id, {"x": 3.0}, step=None)
    end_run(sqlite_uri, run_id)
    (run,) = runs_named(sqlite_uri, "exp", "fn")
    assert (run.info.run_id, run.info.status, run.data.metrics, run.data.params) == (run_id, "FINISHED", {"x": 3.0},
                                                                                    {"p": "2"})
    assert runs_named(sqlite_uri, "no-such-experiment", "fn") == []


def test_a_password_in_a_param_is_redacted_before_it_is_logged(sqlite_uri):
    tracker = Tracker.start(sqlite_uri, "exp", "r2", {"tracking.uri": "http://jobs:hunter2@head:5000",
                                                      "train.lr": 0.01})
    tracker.close()
    params = MlflowClient(sqlite_uri).get_run(tracker.run_id).data.params
    assert "hunter2" not in params["tracking.uri"] and "head:5000" in params["tracking.uri"]
    assert params["train.lr"] == "0.01"


def test_experiments_open_on_the_model_training_view(sqlite_uri):
    from cascadelab.platform.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING

    client = MlflowClient(sqlite_uri)
    old = client.create_experiment("old")  # created before the tag existed: tagged on the next run
    Tracker.start(sqlite_uri, "new", "r")
    Tracker.start(sqlite_uri, "old", "r")
    assert MODEL_TRAINING == "custom_model_development"  # the value MLflow's UI maps to "Model training"
    assert client.get_experiment_by_name("new").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING


def test_source_tags_name_the_command_and_the_commit():
    import subprocess

    from cascadelab.platform.tracking import source_tags

    tags = source_tags(["/usr/bin/cascadelab", "train", "--set", "objective.tau=5 0"])
    assert tags["cascadelab.command"] == "cascadelab train --set 'objective.tau=5 0'"
    assert tags["mlflow.source.name"] == "cascadelab"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head:  # the tests run from the repository's checkout
        assert tags["mlflow.source.git.commit"] == head
        assert tags["cascadelab.git_dirty"] in ("true", "false")


def test_a_dataset_input_and_a_failure_reason_are_logged(sqlite_uri, tmp_path):
    tracker = Tracker.start(sqlite_uri, "exp", "r")
    tracker.log_dataset("tiny", str(tmp_path), "abcd1234", [("user_id", "long"), ("items", "array<long>")],
                        {"days": ["d1", "d2"], "rows": 10})
    tracker.close("FAILED", error="DataError: 'x.parquet': not a readable Parquet file")
    run = MlflowClient(sqlite_uri).get_run(tracker.run_id)
    (ds,) = run.inputs.dataset_inputs
    assert (ds.dataset.name, ds.dataset.digest) == ("tiny", "abcd1234")
    assert str(tmp_path) in ds.dataset.source and '"rows": 10' in ds.dataset.profile
    assert '"user_id"' in ds.dataset.schema and '"array"' in ds.dataset.schema
    assert [t.value for t in ds.tags if t.key == "mlflow.data.context"] == ["training"]
    assert run.data.tags["cascadelab.error"].startswith("DataError: 'x.parquet'")


def test_ui_links_ask_for_the_model_training_view():
    from cascadelab.platform.tracking import ui_url

    assert ui_url("http://127.0.0.1:5000/", "3") == (
        "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning")
    assert ui_url("http://head:5000", "3", "abc") == (
        "http://head:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
