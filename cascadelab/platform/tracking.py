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

import json
import logging
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cascadelab.platform.cluster.credentials import scrub_params
from cascadelab.platform.config import ConfigError

log = logging.getLogger(__name__)

#: The experiment tag that says what an experiment holds; ``custom_model_development``: model training
#: (runs, metrics, models), not GenAI traces. MLflow's API and search read it. MLflow 3.17.2's UI does
#: not pick its view from it: the sidebar's GenAI / "Model training" switch decides, from the page's
#: ``workflowType`` query parameter, else the browser's localStorage ``mlflow.workflowType_v1`` (set when
#: the user clicks the switch), else GenAI. So links this package prints carry :data:`UI_VIEW`.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
UI_VIEW = "workflowType=machine_learning"  # the UI's query parameter for the "Model training" view
ERROR_TAG = "cascadelab.error"  # a FAILED run's one-line reason
MODEL_NAME = "model"  # the trained cascade, logged with mlflow.pytorch


def experiment_id(store, experiment: str) -> str:
    """The id of ``experiment`` (created if needed), tagged as a model-training experiment."""
    exp = store.get_experiment_by_name(experiment)
    if exp is None:
        return store.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    if EXPERIMENT_KIND_TAG not in exp.tags:
        store.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


def ui_url(server: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (it opens on its runs) or of one of its runs, at the UI's
    ``server`` address (``http://127.0.0.1:5000``), in the "Model training" view whatever the browser
    last chose: ``<server>/#/experiments/<id>[/runs/<run_id>]?workflowType=machine_learning``."""
    page = f"{server.rstrip('/')}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{page}?{UI_VIEW}"


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_tags(argv: list[str] | None = None) -> dict[str, str]:
    """Where a run came from: the command line (``cascadelab.command``, ``mlflow.source.name``) and the
    git commit and dirty flag of the checkout cascadelab runs from (none outside a git checkout)."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else "cascadelab"
    tags = {"mlflow.source.name": program, "mlflow.source.type": "LOCAL",
            "cascadelab.command": shlex.join([program, *argv[1:]])[:5000]}
    commit = _git("rev-parse", "HEAD")
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        tags.update({"mlflow.source.git.commit": commit,
                     "cascadelab.git_dirty": "unknown" if status is None else str(bool(status)).lower()})
    return tags


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
        exp_id = experiment_id(store, experiment)
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

    def log_dataset(self, name: str, path: str, digest: str, schema: list[tuple[str, str]],
                    profile: dict[str, Any], context: str = "training") -> None:
        """The run's input dataset (MLflow's Dataset column): ``schema`` as ``(column, MLflow type)``
        pairs (``long``, ``double``, ``boolean``, ``string``, ``binary``; lists as ``array<type>``),
        ``profile`` (e.g. days, rows) shown beside it."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException
        from mlflow.types import ColSpec, Schema
        from mlflow.types.schema import Array, DataType

        def spec(column: str, kind: str) -> ColSpec:
            inner = kind.removeprefix("array<").removesuffix(">")
            return ColSpec(Array(DataType[inner]) if kind.startswith("array<") else DataType[kind], column)

        with warnings.catch_warnings():  # a local path matches every local source class MLflow registers
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(path)
        meta = MetaDataset(source, name=name, digest=digest,
                           schema=Schema([spec(c, k) for c, k in schema])).to_dict()
        entity = Dataset(name=meta["name"], digest=meta["digest"], source_type=meta["source_type"],
                         source=meta["source"], schema=meta["schema"], profile=json.dumps(profile))
        inputs = [DatasetInput(entity, [InputTag("mlflow.data.context", context)])]
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as exc:  # only the race below is retried
                # two runs of one experiment logging a new dataset at once (a sweep's first trials): the
                # SQL store's check-then-insert lets one of them fail on the dataset's unique key; the
                # dataset exists then, and logging again links it to this run
                if "UNIQUE constraint" not in str(exc) or attempt == 2:
                    raise

    def log_pytorch_model(self, module, example: dict[str, Any], output: dict[str, Any]) -> str:
        """``module`` (a ``torch.nn.Module`` taking a dict of tensors and returning a dict of tensors) as
        the run's MLflow model ``model``, with the signature of ``example`` -> ``output`` (name -> numpy
        array); returns the model URI ``mlflow.pytorch.load_model`` loads."""
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        signature = infer_signature(example, output)
        mlflow.set_tracking_uri(self.uri)  # Model.log resolves the store from the fluent URI ...
        mlflow.set_experiment(experiment_id=self.client.get_run(self.run_id).info.experiment_id)  # ... and
        # files the LoggedModel under the fluent experiment: the run's, or the UI lists no model for it
        flavor_log = logging.getLogger("mlflow.pytorch")
        level = flavor_log.level
        flavor_log.setLevel(logging.ERROR)  # its pickle notice: loading runs cascadelab's own module
        try:
            info = mlflow.pytorch.log_model(module, name=MODEL_NAME, signature=signature, run_id=self.run_id,
                                            serialization_format="pickle",  # the module itself; pt2 traces
                                            pip_requirements=[f"torch=={version('torch').split('+')[0]}"])
        finally:
            flavor_log.setLevel(level)
        self.set_tags({"cascadelab.model_uri": info.model_uri})
        return info.model_uri

    def system_metrics(self, interval_s: float = 5.0):
        """A started MLflow system-metrics monitor logging ``system/*`` (CPU, memory, disk, network; GPU
        with NVML) of this machine to the run every ``interval_s``; ``finish()`` it when the run ends."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, tracking_uri=self.uri,
                                       resume_logging=True)
        monitor.start()
        return monitor

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

    def close(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End the run with ``status``: FINISHED, FAILED or KILLED; ``error`` (one line) as ``cascadelab.error``."""
        if error:
            self.client.set_tag(self.run_id, ERROR_TAG, error[:5000])
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
