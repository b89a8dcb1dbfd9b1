"""Integration: a real local Ray cluster, a real SQLite MLflow store, the real training job."""

import mlflow
import pytest

from cascadelab.platform.config import load_config
from cascadelab.platform.data.schema import DataError

pytestmark = pytest.mark.integration


@pytest.mark.timeout(400)
def test_training_run_is_tracked_in_mlflow(ray_local, tiny_dataset, sqlite_uri, tmp_path):
    from cascadelab.platform.train.run import run_training

    cfg = load_config(None, [f"data.path={tiny_dataset}", f"tracking.uri={sqlite_uri}",
                             "tracking.experiment=it", f"train.storage_path={tmp_path / 'results'}",
                             "data.batch_size=128", "objective.name=dftopk"])
    result = run_training(cfg)
    assert 0.0 <= result.metrics["joint_recall"] <= 1.0
    assert result.metrics["samples_per_s"] > 0

    mlflow.set_tracking_uri(sqlite_uri)
    runs = mlflow.search_runs(experiment_names=["it"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["run_id"] == result.run_id and run["status"] == "FINISHED"
    assert 0.0 <= run["metrics.joint_recall"] <= 1.0 and run["metrics.samples_per_s"] > 0
    assert run["params.objective.name"] == "dftopk" and run["params.stages.1.model"] == "din"
    client = mlflow.MlflowClient(sqlite_uri)
    history = client.get_metric_history(result.run_id, "train_loss")
    assert [m.step for m in history] == [0, 1]  # one point per training day
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "checkpoint"} <= artifacts

    # A second run with the same config gets its own name and trains from scratch (no silent resume).
    again = run_training(load_config(None, [f"data.path={tiny_dataset}", f"tracking.uri={sqlite_uri}",
                                            "tracking.experiment=it", "data.batch_size=128",
                                            f"train.storage_path={tmp_path / 'results'}"]))
    assert again.run_name != result.run_name
    assert len(mlflow.search_runs(experiment_names=["it"])) == 2


def test_missing_data_fails_before_any_ray_work(tmp_path, sqlite_uri):
    from cascadelab.platform.train.run import run_training

    cfg = load_config(None, [f"data.path={tmp_path / 'nothing'}", f"tracking.uri={sqlite_uri}"])
    with pytest.raises(DataError, match="data directory '.*nothing' does not exist"):
        run_training(cfg)
    assert not (tmp_path / "mlflow.db").exists()  # nothing was written
