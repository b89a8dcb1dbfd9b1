"""Driver side of a training run, in the three layers of Ray Train's examples: a plan (the config,
checked), a ``TorchTrainer`` (worker function, scaling and run config, datasets), ``fit()`` and its result.

Every check that needs no cluster runs before Ray starts (:func:`cascadelab.platform.train.plan.plan_run`,
the tracking server, the CPU budget where the cluster's size is known, the run to resume). The MLflow
run is a :class:`~cascadelab.platform.tracking.Tracker` shared with rank 0 of the workers. ray, mlflow
and matplotlib are imported lazily (inside functions).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cascadelab.platform.cluster.storage import check_storage_path
from cascadelab.platform.config import CascadeConfig, ConfigError, flatten, from_dict
from cascadelab.platform.data.ingest import read_day
from cascadelab.platform.data.schema import DataError
from cascadelab.platform.data.validate import DayFiles, find_bad_file, validate_days
from cascadelab.platform.runtime import decide_use_gpu, ensure_ray
from cascadelab.platform.tracking import Tracker, check_tracking_uri, runs_named
from cascadelab.platform.train.loop import ShardError, train_loop_per_worker
from cascadelab.platform.train.plan import RunPlan, check_cpu_budget, known_cpus, on_cluster, plan_run

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    run_name: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint_path: str | None
    wall_s: float


def find_run(uri: str, experiment: str, run_name: str) -> Tracker:
    """The MLflow run called ``run_name`` in ``experiment`` (for ``--resume``)."""
    runs = runs_named(uri, experiment, run_name)
    if len(runs) != 1:
        raise ConfigError(f"--resume {run_name}: expected one MLflow run of that name in experiment "
                          f"'{experiment}' at {uri}, found {len(runs)}")
    return Tracker(uri, runs[0].info.run_id)


def load_run_config(uri: str, experiment: str, run_name: str) -> CascadeConfig:
    """The resolved config a run logged as ``config.yaml`` (what ``--resume`` continues with)."""
    tracker = find_run(uri, experiment, run_name)
    with tempfile.TemporaryDirectory() as tmp:
        return from_dict(yaml.safe_load(tracker.download("config.yaml", tmp).read_text()))


def run_training(cfg: CascadeConfig, resume: str | None = None, tags: dict[str, str] | None = None,
                 callbacks: list | None = None, run_name: str | None = None) -> TrainResult:
    """Train ``cfg`` on Ray (the local embedded cluster unless RAY_ADDRESS is set), tracked in MLflow.

    ``resume``: the name of an interrupted run to continue from its last checkpoint (same config,
    same MLflow run). Without it every run gets a fresh unique name and never resumes an old one.
    ``tags``: extra MLflow tags (e.g. ``mlflow.parentRunId``). ``callbacks``: Ray Train ``UserCallback``s
    (e.g. Tune's ``TuneReportCallback`` inside a trial). ``run_name``: an exact name chosen by the caller
    (a Tune trial uses its trial id, stable across trial restarts): when a run of that name already has
    a checkpoint under ``train.storage_path`` it is resumed (with its MLflow run), otherwise created.
    Raises ConfigError / DataError (one line) for bad configs and bad data, before Ray starts where
    the check needs no cluster.
    """
    plan = plan_run(cfg, resume=resume, run_name=run_name)
    check_tracking_uri(plan.tracking_uri)
    cpus = known_cpus()
    if cpus is not None:
        check_cpu_budget(plan.config, cpus)
    resumed = find_run(plan.tracking_uri, plan.config.tracking.experiment, plan.run_name) if plan.resume else None

    plan, files = _on_cluster(plan)
    tracker = _open_run(plan, resumed, tags, files)
    t0 = time.perf_counter()
    try:
        result = _trainer(plan, tracker, files, callbacks).fit()
    except BaseException as exc:
        tracker.close("FAILED")
        bad = data_failure(exc, plan, files)
        if bad is not None:  # bad data met by a worker: one line naming the file
            raise bad from None
        raise
    return _finish(plan, tracker, result, time.perf_counter() - t0)


def _on_cluster(plan: RunPlan) -> tuple[RunPlan, DayFiles | None]:
    """Start or join Ray; the checks that need the cluster; with ``data.skip_bad_files`` every file
    decoded and checked once, as Ray tasks (the bad ones are dropped)."""
    import ray

    ensure_ray()
    try:
        check_storage_path(plan.config.train.storage_path, shared=plan.config.train.shared_storage)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    plan = on_cluster(plan, ray.cluster_resources().get("CPU", 0.0), decide_use_gpu(plan.config.train.use_gpu))
    if not plan.config.data.skip_bad_files:
        return plan, None
    files = validate_days(plan.config.data.path, plan.days, plan.meta, plan.groups)
    if files.skipped:
        log.warning("skipping %d bad file(s) of %s: %s", files.skipped, plan.config.data.path,
                    "; ".join(files.bad.values()))
    return plan, files


def _open_run(plan: RunPlan, resumed: Tracker | None, tags: dict[str, str] | None,
              files: DayFiles | None) -> Tracker:
    """The run's MLflow run: the resumed one reopened, or a new one with the config as params."""
    cfg = plan.config
    if resumed is not None:
        tracker = resumed
        tracker.reopen()
    else:
        tracker = Tracker.start(plan.tracking_uri, cfg.tracking.experiment, plan.run_name, flatten(cfg.to_dict()),
                                tags={"cascadelab.objective": cfg.objective.name,
                                      "cascadelab.stages": "->".join(f"{s.model}@{s.k}" for s in cfg.stages),
                                      "cascadelab.dataset": str(Path(cfg.data.path).resolve()), **(tags or {})})
        tracker.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    log.info("MLflow run %s (%s) in %s", plan.run_name, tracker.run_id, plan.tracking_uri)
    if files is not None:
        tracker.log_dict({"data_skipped_files": float(files.skipped)})
        if files.skipped:
            tracker.log_text(json.dumps(files.bad, indent=2), "skipped_files.json")
    return tracker


def build_datasets(plan: RunPlan, files: DayFiles | None = None) -> dict:
    """One Ray Dataset per training day (``train-<day>``, capped at ``data.max_rows_per_day``) and the
    held-out day (``eval``, capped at ``data.max_eval_rows``). Planning a dataset reads footers (and
    samples rows); a failure there is a ShardError of that day."""
    data = plan.config.data

    def dataset(day: str, max_rows: int | None):
        try:
            return read_day(data.path, day, plan.meta, plan.groups, max_rows,
                            None if files is None else files.good[day], reader=data.parquet_reader)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to plan a day's read is that day's
            raise ShardError.from_failure(day, exc) from exc

    datasets = {f"train-{d}": dataset(d, data.max_rows_per_day) for d in plan.train_days}
    datasets["eval"] = dataset(plan.eval_day, data.max_eval_rows)
    return datasets


def _trainer(plan: RunPlan, tracker: Tracker, files: DayFiles | None, callbacks: list | None):
    """The TorchTrainer of the plan: the worker loop, its scaling and run configs, the datasets."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = plan.config.train
    datasets = build_datasets(plan, files)
    ordered = ExecutionOptions(preserve_order=True)  # deterministic batches: exact mid-day resume
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan, "tracker": tracker},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker,
                                                           **({"GPU": 1} if plan.use_gpu else {})}),
        datasets=datasets,
        dataset_config=DataConfig(execution_options={name: ordered for name in datasets}),
        run_config=RunConfig(name=plan.run_name, storage_path=plan.storage_path,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             callbacks=list(callbacks or []),
                             checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep)),
    )


def _finish(plan: RunPlan, tracker: Tracker, result, wall: float) -> TrainResult:
    """Log the final metrics (step = number of training days), the checkpoint and the streaming plot."""
    metrics = dict(result.return_value or {})
    metrics["wall_time_s"] = wall
    tracker.log_dict(metrics, step=len(plan.train_days))
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt_path and plan.run_dir is not None:
        tracker.log_artifact(ckpt_path, "checkpoint")
    if plan.config.train.streaming_eval:
        log_streaming_plot(tracker)
    tracker.close("FINISHED")
    return TrainResult(tracker.run_id, plan.run_name, plan.tracking_uri, metrics, ckpt_path, wall)


def worker_failure(exc: BaseException) -> ShardError | None:
    """The ShardError a Train worker raised, from Ray Train's failure (``WorkerGroupError.worker_failures``
    maps each failed rank to the exception it raised) or raised on the driver while planning datasets."""
    import ray.train

    if isinstance(exc, ShardError):
        return exc
    if isinstance(exc, ray.train.WorkerGroupError):
        for _, failure in sorted(exc.worker_failures.items()):
            if isinstance(failure, ShardError):
                return failure
    return None


def data_failure(exc: BaseException, plan: RunPlan, files: DayFiles | None) -> DataError | None:
    """The one-line DataError of a training failure that bad data caused, or None for other failures.

    The files of the days are checked (the failing day first) to name the bad file; a data check's own
    message stands when no file is found bad, a read failure without a bad file is not a data error.
    """
    failure = worker_failure(exc)
    if failure is None:
        return None
    days = [failure.day, *(d for d in plan.days if d != failure.day)]
    culprit = find_bad_file(plan.config.data.path, days, plan.meta, plan.groups,
                            ignore=set(files.bad) if files is not None else frozenset())
    if culprit:
        return DataError(culprit)
    return DataError(failure.message) if failure.checked else None


def log_streaming_plot(tracker: Tracker) -> None:
    """Plot ``stream_joint_recall`` against the evaluated day and attach it to the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = tracker.history("stream_joint_recall")
    if not history:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([step + 1 for step, _ in history], [value for _, value in history], marker="o")
    ax.set_xlabel("evaluated day index (model trained on all earlier days)")
    ax.set_ylabel("joint Recall@10@20")
    ax.set_title("streaming evaluation")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "streaming_joint_recall.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        tracker.log_artifact(path)
