"""MLflow tracking: where runs go, and the calls the driver and rank 0 make.

Default store: ``sqlite:///<cwd>/mlflow.db`` (absolute; MLflow 3's ./mlruns file store refuses to run).
``MLFLOW_TRACKING_URI`` or ``tracking.uri`` override it (e.g. ``http://head:5000`` on a cluster).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_tracking_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an unreachable tracking server (MLflow's client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
    except (OSError, urllib.error.URLError) as exc:
        from cascadelab.platform.config import ConfigError

        raise ConfigError(f"MLflow tracking server '{uri}' is not reachable ({exc}); start it "
                          f"(`mlflow server ...`) or set tracking.uri / MLFLOW_TRACKING_URI") from None


def runs_named(uri: str, experiment: str, run_name: str) -> list:
    """The MLflow runs called ``run_name`` in ``experiment`` (none when the experiment does not exist)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")


def _clean_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any],
              tags: dict[str, str] | None = None) -> str:
    """Create an MLflow run with ``params`` (flattened config) and return its id; the run stays open."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
    items = [Param(k, _clean_value(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log finite scalar metrics in one batch (NaN values are skipped)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
             if v is not None and float(v) == float(v)]
    if items:
        MlflowClient(uri).log_batch(run_id, metrics=items)


def log_artifacts(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    from mlflow import MlflowClient

    p = Path(path)
    client = MlflowClient(uri)
    if p.is_dir():
        client.log_artifacts(run_id, str(p), artifact_path)
    else:
        client.log_artifact(run_id, str(p), artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(uri).log_text(run_id, text, artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status=status)


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a finished or failed run as running again (``--resume``)."""
    from mlflow import MlflowClient

    MlflowClient(uri).update_run(run_id, status="RUNNING")
