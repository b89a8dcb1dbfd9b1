"""MLflow tracking: where runs go, and :class:`Tracker`, one open run that the driver and rank 0 log to.

Default store: ``sqlite:///<cwd>/mlflow.db`` (absolute; MLflow 3's ./mlruns file store refuses to run).
``MLFLOW_TRACKING_URI`` or ``tracking.uri`` override it (e.g. ``http://head:5000`` on a cluster).

A :class:`Tracker` is the run's whole interface (params, metrics per step, artifacts, tags, status), in
the shape of torchtune's ``MetricLogger`` (``log_dict(payload, step)``, ``close()``; pytorch/torchtune,
``torchtune/training/metric_logging.py``). It pickles as ``(uri, run_id)``, so a Ray Train worker gets
the driver's run. The module-level functions below are one-line forms of the same calls for callers
that hold a run id. mlflow is imported lazily (inside functions): importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cascadelab.platform.cluster.credentials import scrub_params
from cascadelab.platform.config import ConfigError

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
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
    except (OSError, urllib.error.URLError) as exc:
        raise ConfigError(f"MLflow tracking server '{uri}' is not reachable ({exc}); start it "
                          f"(`mlflow server ...`) or set tracking.uri / MLFLOW_TRACKING_URI") from None


def client(uri: str):
    """The ``MlflowClient`` of the store at ``uri`` (the one place this package builds one)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def search_runs(uri: str, experiment: str, filter_string: str, order_by: list[str] | None = None) -> list:
    """Runs of ``experiment`` matching ``filter_string`` (none when the experiment does not exist)."""
    store = client(uri)
    exp = store.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return store.search_runs([exp.experiment_id], filter_string=filter_string, order_by=order_by,
                             max_results=50000)


def runs_named(uri: str, experiment: str, run_name: str) -> list:
    """The MLflow runs called ``run_name`` in ``experiment`` (none when the experiment does not exist)."""
    return search_runs(uri, experiment, f"attributes.run_name = '{run_name}'")


def _clean_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]


class Tracker:
    """One MLflow run: its store's client and its id. Metrics at ``step`` (the day index for training)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = None

    def __getstate__(self) -> dict[str, str]:  # the client stays behind; it is rebuilt where used
        return {"uri": self.uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["uri"], state["run_id"])

    def __repr__(self) -> str:
        return f"Tracker({self.uri!r}, {self.run_id!r})"

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, params: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None) -> Tracker:
        """Create a run (and its experiment if needed) with ``params`` and ``tags``; it stays RUNNING."""
        store = client(uri)
        exp = store.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else store.create_experiment(experiment)
        tracker = cls(uri, store.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id)
        tracker._client = store
        tracker.log_params(params or {})
        return tracker

    def log_params(self, params: dict[str, Any]) -> None:
        """Params as text (None as ``null``, cut at 6000 characters; credentials redacted), in batches of 100."""
        from mlflow.entities import Param

        items = [Param(k, _clean_value(v)) for k, v in sorted(scrub_params(params).items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_dict(self, metrics: dict[str, float], step: int = 0) -> None:
        """Finite scalar metrics at ``step``, in one batch (None and NaN values are skipped)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and float(v) == float(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log(self, name: str, value: float, step: int = 0) -> None:
        self.log_dict({name: value}, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents, under ``artifact_path`` (the root when None)."""
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def history(self, metric: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every logged point of ``metric``, by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, metric))

    def download(self, artifact: str, dst: str | Path) -> Path:
        return Path(self.client.download_artifacts(self.run_id, artifact, str(dst)))

    def children(self) -> list:
        """The runs whose ``mlflow.parentRunId`` is this run, in its experiment."""
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        return self.client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'",
                                       max_results=50000)

    def reopen(self) -> None:
        """Mark a finished or failed run as running again (``--resume``)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def delete(self) -> None:
        self.client.delete_run(self.run_id)

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status``: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any],
              tags: dict[str, str] | None = None) -> str:
    """Create an MLflow run with ``params`` (flattened config) and return its id; the run stays open."""
    return Tracker.start(uri, experiment, run_name, params, tags).run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log finite scalar metrics in one batch (NaN values are skipped)."""
    Tracker(uri, run_id).log_dict(metrics, step or 0)


def log_artifacts(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    Tracker(uri, run_id).log_artifact(path, artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    Tracker(uri, run_id).log_text(text, artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    Tracker(uri, run_id).close(status)


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a finished or failed run as running again (``--resume``)."""
    Tracker(uri, run_id).reopen()
