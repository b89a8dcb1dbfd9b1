"""Integration: a real local Ray cluster, a real SQLite MLflow store, the real training loop.

One clean reference run is shared by the tests of this module (Ray Train start-up dominates the cost).
"""

from __future__ import annotations

import math

import mlflow
import pytest

from cascadelab.platform.config import ConfigError, load_config
from cascadelab.platform.data.schema import DataError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _cfg(dataset, uri, storage, *extra):
    return load_config(None, [f"data.path={dataset}", f"tracking.uri={uri}", "tracking.experiment=it",
                              f"train.storage_path={storage}", "data.batch_size=64", "objective.name=dftopk",
                              *extra])


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dataset):
    root = tmp_path_factory.mktemp("train")
    return {"data": tiny_dataset, "uri": f"sqlite:///{root / 'mlflow.db'}", "storage": root / "results"}


@pytest.fixture(scope="module")
def clean_run(env, ray_session):
    from cascadelab.platform.train.run import run_training

    return run_training(_cfg(env["data"], env["uri"], env["storage"]))


def test_training_run_is_tracked_in_mlflow(clean_run, env):
    assert 0.0 <= clean_run.metrics["joint_recall"] <= 1.0
    assert clean_run.metrics["samples_per_s"] > 0
    mlflow.set_tracking_uri(env["uri"])
    runs = mlflow.search_runs(experiment_names=["it"], filter_string=f"attributes.run_id = '{clean_run.run_id}'")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["metrics.eval/joint_recall_at_10_20"] == pytest.approx(clean_run.metrics["joint_recall"])
    assert run["metrics.throughput/samples_per_s_total"] > 0
    assert "metrics.joint_recall" not in runs.columns  # only the MLflow names are logged
    assert run["params.objective.name"] == "dftopk" and run["params.stages.1.model"] == "din"
    client = mlflow.MlflowClient(env["uri"])
    history = client.get_metric_history(clean_run.run_id, "loss/total")
    assert [m.step for m in history] == [0, 1]  # one point per training day
    assert client.get_metric_history(clean_run.run_id, "loss/dftopk_joint")  # objective components logged
    artifacts = {a.path for a in client.list_artifacts(clean_run.run_id)}
    assert {"config.yaml", "checkpoint"} <= artifacts


def test_the_run_shows_its_dataset_source_resolved_config_and_system_metrics(clean_run, env):
    client = mlflow.MlflowClient(env["uri"])
    run = client.get_run(clean_run.run_id)
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == env["data"].name and str(env["data"]) in ds.dataset.source
    assert '"rows": 576' in ds.dataset.profile and '"rank_pos_items"' in ds.dataset.schema  # 3 days x 192
    assert len(ds.dataset.digest) == 16
    tags, params = run.data.tags, run.data.params
    assert tags["cascadelab.command"] and "mlflow.source.name" in tags
    assert params["data.eval_day"] == "2024-01-15" and params["train.use_gpu"] == "false"
    assert params["data.path"] == str(env["data"].resolve()) and "train.fail_at_step" not in params
    # per-day series hold per-day values; the run's rate has its own name
    assert [m.step for m in client.get_metric_history(clean_run.run_id, "throughput/samples_per_s")] == [0, 1]
    assert [m.step for m in client.get_metric_history(clean_run.run_id, "eval/ranking_ndcg_at_10")] == [2]
    assert run.data.metrics["throughput/samples_per_s_total"] == pytest.approx(clean_run.metrics["samples_per_s"])
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_logged_model_scores_a_batch_and_cascadelab_score_writes_top_k(clean_run, env, tmp_path):
    import json

    import mlflow.pytorch

    from cascadelab.cli import main

    run = mlflow.MlflowClient(env["uri"]).get_run(clean_run.run_id)
    assert run.outputs.model_outputs  # the Models column ...
    logged = mlflow.MlflowClient(env["uri"]).get_logged_model(run.outputs.model_outputs[0].model_id)
    assert logged.experiment_id == run.info.experiment_id  # ... lists the run's experiment's models only
    mlflow.set_tracking_uri(env["uri"])
    scorer = mlflow.pytorch.load_model(run.data.tags["cascadelab.model_uri"])
    from cascadelab.platform.train.plan import plan_run
    from cascadelab.platform.train.run import example_batch

    batch = example_batch(plan_run(_cfg(env["data"], env["uri"], env["storage"])))
    scores = scorer(batch)
    assert set(scores) == {"retrieval", "ranking"} and scores["ranking"].shape == batch["mask"].shape
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--run", clean_run.run_name, "--experiment", "it", "--tracking-uri", env["uri"],
                 "--data", str(env["data"]), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 192 and lines[0]["day"] == "2024-01-15"
    assert len(lines[0]["retrieval"]) == 30 and len(lines[0]["ranking"]) == 20
    assert set(lines[0]["ranking"]) <= set(lines[0]["retrieval"])  # ranking re-ranks what retrieval kept


def test_worker_failure_is_recovered_without_skipping_or_repeating_data(clean_run, env, ray_local):
    from cascadelab.platform.train.run import run_training

    faulty = run_training(_cfg(env["data"], env["uri"], env["storage"], "train.fail_at_step=3",
                               "train.checkpoint_every_steps=1", "train.max_failures=1"))
    assert faulty.run_name != clean_run.run_name  # every run has its own name: no silent resume
    assert faulty.metrics["train_rows"] == clean_run.metrics["train_rows"]
    assert faulty.metrics["global_steps"] == clean_run.metrics["global_steps"]
    for key in ("joint_recall", "retrieval_recall", "ranking_recall"):
        assert math.isclose(faulty.metrics[key], clean_run.metrics[key], abs_tol=0.02), key
    marker = env["storage"] / faulty.run_name / ".injected_failure"
    assert marker.read_text().startswith("failed once at step 3")


def test_interrupted_run_resumes_by_name(env, ray_local):
    from cascadelab.platform.train.run import load_run_config, run_training

    with pytest.raises(Exception, match="injected failure"):
        run_training(_cfg(env["data"], env["uri"], env["storage"], "train.fail_at_step=2", "train.max_failures=0",
                          "tracking.run_name=interrupted"))
    runs = mlflow.search_runs(experiment_names=["it"], filter_string="attributes.status = 'FAILED'",
                              output_format="list")
    name = runs[0].info.run_name
    assert "injected failure" in runs[0].data.tags["cascadelab.error"]  # the FAILED run says why
    cfg = load_run_config(env["uri"], "it", name)
    resumed = run_training(cfg, resume=name)
    assert resumed.run_name == name and resumed.run_id == runs[0].info.run_id
    assert mlflow.get_run(resumed.run_id).info.status == "FINISHED"
    assert resumed.metrics["global_steps"] > 0


def test_two_workers_with_streaming_evaluation(env, ray_local):
    from cascadelab.platform.train.run import run_training

    result = run_training(_cfg(env["data"], env["uri"], env["storage"], "train.num_workers=2",
                               "train.cpus_per_worker=0.5", "train.streaming_eval=true"))
    assert result.metrics["world_size"] == 2.0
    client = mlflow.MlflowClient(env["uri"])
    stream = client.get_metric_history(result.run_id, "stream/joint_recall_at_10_20")
    assert [m.step for m in stream] == [0, 1]  # day 1 scored by the day-0 model, eval day by the final one
    assert client.get_metric_history(result.run_id, "throughput/samples_per_s_worker1")
    assert "streaming_joint_recall.png" in {a.path for a in client.list_artifacts(result.run_id)}


def test_gpu_request_on_cpu_cluster_fails_fast(env, ray_local):
    import time

    from cascadelab.platform.train.run import run_training

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="train.use_gpu=true but the Ray cluster has no GPU"):
        run_training(_cfg(env["data"], env["uri"], env["storage"], "train.use_gpu=true"))
    assert time.perf_counter() - t0 < 30


def test_workers_holding_every_cpu_are_refused(env, ray_local):
    from cascadelab.platform.train.run import run_training

    with pytest.raises(ConfigError, match="leaves no CPU for Ray Data"):
        run_training(_cfg(env["data"], env["uri"], env["storage"], "train.num_workers=2"))


def test_missing_data_fails_before_any_ray_work(tmp_path):
    from cascadelab.platform.train.run import run_training

    cfg = load_config(None, [f"data.path={tmp_path / 'nothing'}", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    with pytest.raises(DataError, match="data directory '.*nothing' does not exist"):
        run_training(cfg)
    assert not (tmp_path / "m.db").exists()  # nothing was written


def test_unreachable_tracking_server_fails_fast(tiny_dataset, tmp_path):
    import time

    from cascadelab.platform.train.run import run_training

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="MLflow tracking server 'http://127.0.0.1:9' is not reachable"):
        run_training(load_config(None, [f"data.path={tiny_dataset}", "tracking.uri=http://127.0.0.1:9"]))
    assert time.perf_counter() - t0 < 10


@pytest.fixture(scope="module")
def two_file_dataset(tmp_path_factory):
    from cascadelab.platform.data.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("twofile") / "ds"
    generate(SyntheticConfig(days=3, requests_per_day=192, rows_per_file=96, seed=7), root)
    return root


def _with_bad_ids(src, dst):
    """A copy of ``src`` whose second file of the first day has an author_id outside the vocabulary."""
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    path = sorted((dst / "day=2024-01-13").glob("*.parquet"))[1]
    table = pq.read_table(path)
    items = np.stack(table.column("rank_neg_items").to_numpy(zero_copy_only=False)).reshape(-1, 80)
    items[5, 1] = 10**6
    col = pa.FixedSizeListArray.from_arrays(pa.array(items.reshape(-1)), 80)
    pq.write_table(table.set_column(table.schema.get_field_index("rank_neg_items"), "rank_neg_items", col), path)
    return path


def _with_corrupt_page(src, dst):
    """A copy of ``src`` whose second file of the second day has zeroed data pages (footer intact)."""
    import shutil

    shutil.copytree(src, dst)
    path = sorted((dst / "day=2024-01-14").glob("*.parquet"))[1]
    data = bytearray(path.read_bytes())
    data[300:5000] = bytes(4700)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage, message", [
    (_with_bad_ids, "field 'author_id' has id 1000000 outside the vocabulary"),  # seen by the collate
    (_with_corrupt_page, "not a readable Parquet file"),  # seen by a Ray Data read task
])
def test_bad_file_met_by_a_worker_is_named(env, two_file_dataset, tmp_path, ray_local, damage, message):
    from cascadelab.platform.train.run import run_training

    bad = damage(two_file_dataset, tmp_path / "ds")
    with pytest.raises(DataError) as info:
        run_training(_cfg(tmp_path / "ds", env["uri"], env["storage"], "train.max_failures=0"))
    assert str(info.value).startswith(f"'{bad}': {message}")


def test_skip_bad_files_trains_on_the_rest_and_logs_the_count(env, two_file_dataset, tmp_path, ray_local):
    from cascadelab.platform.train.run import run_training

    bad = _with_bad_ids(two_file_dataset, tmp_path / "ds")
    truncated = sorted((tmp_path / "ds" / "day=2024-01-14").glob("*.parquet"))[0]
    truncated.write_bytes(truncated.read_bytes()[:500])
    result = run_training(_cfg(tmp_path / "ds", env["uri"], env["storage"], "data.skip_bad_files=true"))
    assert result.metrics["train_rows"] == 192 + 192 - 96 - 96  # two of four training files skipped
    client = mlflow.MlflowClient(env["uri"])
    run = client.get_run(result.run_id)
    assert run.data.metrics["data/skipped_files"] == 2 and run.info.status == "FINISHED"
    local = client.download_artifacts(result.run_id, "skipped_files.json", str(tmp_path))
    import json

    reasons = json.loads(open(local).read())
    assert set(reasons) == {str(bad), str(truncated)}
    assert "field 'author_id'" in reasons[str(bad)] and "not a readable Parquet file" in reasons[str(truncated)]


def test_the_eval_day_is_capped_by_max_eval_rows_never_by_the_training_cap(env, ray_local):
    from cascadelab.platform.train.plan import plan_run
    from cascadelab.platform.train.run import build_datasets, training_rows

    def counts(*extra):
        plan = plan_run(_cfg(env["data"], env["uri"], env["storage"], *extra))
        return {name: ds.count() for name, ds in build_datasets(plan).items()}, training_rows(plan)

    # one dataset over both training days (the loop trains the capped rows of each), the eval day apart
    assert counts("data.max_rows_per_day=32") == ({"train": 384, "eval": 192}, [32, 32])
    assert counts("data.max_rows_per_day=32", "data.max_eval_rows=50")[0]["eval"] == 50
    streamed, _ = counts("data.max_rows_per_day=32", "train.streaming_eval=true")
    assert streamed == {"train": 384, "train-2024-01-14": 32, "eval": 192}  # day 2 scored by the day-1 model


def test_a_capped_run_trains_the_capped_rows_of_each_day(env, ray_local):
    from cascadelab.platform.train.run import run_training

    result = run_training(_cfg(env["data"], env["uri"], env["storage"], "data.max_rows_per_day=100"))
    assert result.metrics["train_rows"] == 200 and result.metrics["global_steps"] == 4  # 64 + 36 per day
    timeline = result.timeline
    assert sorted(timeline["day_first_step"]) == [0, 1]
    assert timeline["start"] < timeline["fit_start"] < timeline["fit_call"] < timeline["worker_start"]
    assert timeline["worker_start"] < timeline["ready"] <= timeline["day_first_step"][0]
    assert timeline["day_last_step"][0] < timeline["day_first_step"][1] <= timeline["day_last_step"][1]


@pytest.fixture(scope="module")
def three_stage_dataset(tmp_path_factory):
    from cascadelab.platform.data.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("three") / "ds"
    generate(SyntheticConfig(days=2, requests_per_day=128, seed=3, mode="three_stage"), root)
    return root


def test_a_four_stage_cascade_logs_every_stage(env, three_stage_dataset, ray_local):
    from cascadelab.cascade.metrics import metric_names
    from cascadelab.platform.metric_names import MetricNames
    from cascadelab.platform.train.run import run_training

    stages = "stages=[{model: dssm, k: 40}, {model: mlp, k: 30}, {model: din, k: 25}, {model: din, k: 20}]"
    result = run_training(_cfg(three_stage_dataset, env["uri"], env["storage"], stages))
    names = metric_names(4)
    assert {"prerank1_recall", "prerank2_ndcg"} <= set(names) and set(names) <= set(result.metrics)
    logged = mlflow.MlflowClient(env["uri"]).get_run(result.run_id).data.metrics
    mlflow_names = MetricNames(10, (40, 30, 25, 20))
    assert all(0.0 <= logged[mlflow_names.final_name(name)] <= 1.0 for name in names)
    assert logged["eval/prerank1_recall_at_10_30"] == pytest.approx(result.metrics["prerank1_recall"])
    assert logged["eval/prerank2_ndcg_at_10"] == pytest.approx(result.metrics["prerank2_ndcg"])
