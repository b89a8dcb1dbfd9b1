"""Driver side of a training run: validate inputs, open the MLflow run, fit a TorchTrainer, log results."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from cascadelab.platform.cluster.storage import check_storage_path
from cascadelab.platform.config import CascadeConfig, ConfigError, flatten
from cascadelab.platform.data.ingest import day_files, read_day
from cascadelab.platform.data.schema import DataError, DatasetMeta, groups_for
from cascadelab.platform.data.validate import find_bad_file, validate_days
from cascadelab.platform.runtime import decide_use_gpu, ensure_ray
from cascadelab.platform.tracking import (
    check_tracking_uri,
    end_run,
    log_artifacts,
    log_metrics,
    log_text,
    reopen_run,
    resolve_tracking_uri,
    runs_named,
    start_run,
)
from cascadelab.platform.train.loop import train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    run_name: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint_path: str | None
    wall_s: float


def unique_run_name(prefix: str) -> str:
    """``<prefix>-<UTC timestamp>-<random>``: Ray Train V2 silently resumes a reused name."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def resolve_storage_path(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def plan_days(meta: DatasetMeta, cfg: CascadeConfig) -> tuple[list[str], str]:
    """(train days in date order, eval day). Unknown days are an error naming the config key."""
    if len(meta.days) < 2 and cfg.data.train_days is None:
        raise DataError(f"dataset '{cfg.data.path}' has {len(meta.days)} day(s); need at least 2 "
                        "(training days plus a held-out evaluation day)")
    eval_day = cfg.data.eval_day or sorted(meta.days)[-1]
    if eval_day not in meta.days:
        raise ConfigError(f"config key 'data.eval_day': day '{eval_day}' is not in the dataset "
                          f"(days: {', '.join(meta.days)})")
    train = cfg.data.train_days if cfg.data.train_days is not None else [d for d in meta.days if d != eval_day]
    unknown = [d for d in train if d not in meta.days]
    if unknown:
        raise ConfigError(f"config key 'data.train_days': {unknown} not in the dataset "
                          f"(days: {', '.join(meta.days)})")
    if not train:
        raise ConfigError("config key 'data.train_days': no training days left")
    return sorted(train), eval_day


def cascade_groups(meta: DatasetMeta, num_stages: int) -> tuple[str, ...]:
    if num_stages >= 3:
        if meta.mode != "three_stage":
            raise ConfigError(f"config key 'stages': {num_stages} stages need three-stage data "
                              f"(rerank groups), but '{meta.mode}' data was given")
        return groups_for("three_stage")
    return groups_for("two_stage")


def torch_threads(cfg: CascadeConfig) -> int:
    """Intra-op threads of a Train worker: its CPU reservation, as Ray's OMP_NUM_THREADS (measured: on 2
    cores two threads in one process ran the DIN cascade 2.3x slower than one)."""
    return max(1, int(cfg.train.cpus_per_worker))


def check_cpu_budget(cfg: CascadeConfig, cluster_cpus: float) -> None:
    """Train workers holding every CPU starve Ray Data's read tasks and the run hangs; refuse that."""
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    if need > cluster_cpus - 0.5:
        raise ConfigError(
            f"config keys 'train.num_workers' x 'train.cpus_per_worker' = {need:g} CPUs leaves no CPU for Ray "
            f"Data on a cluster with {cluster_cpus:g} CPUs; use at most {max(cluster_cpus - 1, 0.5):g} CPUs "
            f"in total (e.g. train.cpus_per_worker={max((cluster_cpus - 1) / cfg.train.num_workers, 0.25):g})")


def find_run(uri: str, experiment: str, run_name: str) -> str:
    """The MLflow run id of ``run_name`` in ``experiment`` (for ``--resume``)."""
    runs = runs_named(uri, experiment, run_name)
    if len(runs) != 1:
        raise ConfigError(f"--resume {run_name}: expected one MLflow run of that name in experiment "
                          f"'{experiment}' at {uri}, found {len(runs)}")
    return runs[0].info.run_id


def load_run_config(uri: str, experiment: str, run_name: str) -> CascadeConfig:
    """The resolved config a run logged as ``config.yaml`` (what ``--resume`` continues with)."""
    from mlflow import MlflowClient

    from cascadelab.platform.config import from_dict

    run_id = find_run(uri, experiment, run_name)
    with tempfile.TemporaryDirectory() as tmp:
        path = MlflowClient(uri).download_artifacts(run_id, "config.yaml", tmp)
        return from_dict(yaml.safe_load(Path(path).read_text()))


def run_training(cfg: CascadeConfig, resume: str | None = None, tags: dict[str, str] | None = None,
                 callbacks: list | None = None, run_name: str | None = None) -> TrainResult:
    """Train ``cfg`` on Ray (the local embedded cluster unless RAY_ADDRESS is set), tracked in MLflow.

    ``resume``: the name of an interrupted run to continue from its last checkpoint (same config,
    same MLflow run). Without it every run gets a fresh unique name and never resumes an old one.
    ``tags``: extra MLflow tags (e.g. ``mlflow.parentRunId``). ``callbacks``: Ray Train ``UserCallback``s
    (e.g. Tune's ``TuneReportCallback`` inside a trial). ``run_name``: an exact name chosen by the caller
    (a Tune trial uses its trial id, stable across trial restarts): when a run of that name already has
    a checkpoint under ``train.storage_path`` it is resumed (with its MLflow run), otherwise created.
    """
    if run_name is not None and resume is None:
        storage_dir = Path(resolve_storage_path(cfg.train.storage_path)) / run_name
        if "://" not in str(cfg.train.storage_path) and storage_dir.is_dir():
            resume = run_name
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    meta = DatasetMeta.read(cfg.data.path)
    train_days, eval_day = plan_days(meta, cfg)
    groups = cascade_groups(meta, len(cfg.stages))
    if not cfg.data.skip_bad_files:
        for day in [*train_days, eval_day]:  # fail before any Ray work, naming the file and column
            day_files(cfg.data.path, day, meta.mode, groups)
    storage = resolve_storage_path(cfg.train.storage_path)
    uri = resolve_tracking_uri(cfg.tracking.uri)
    check_tracking_uri(uri)
    if resume is not None and "://" not in storage and not (Path(storage) / resume).is_dir():
        raise ConfigError(f"--resume {resume}: no Ray Train run of that name under train.storage_path '{storage}'")

    ensure_ray()
    try:
        check_storage_path(cfg.train.storage_path, shared=cfg.train.shared_storage)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_cpu_budget(cfg, ray.cluster_resources().get("CPU", 0.0))
    checked = None
    if cfg.data.skip_bad_files:  # every file decoded and checked once, as Ray tasks; bad ones dropped
        checked = validate_days(cfg.data.path, [*train_days, eval_day], meta, groups)
        if checked.skipped:
            log.warning("skipping %d bad file(s) of %s: %s", checked.skipped, cfg.data.path,
                        "; ".join(checked.bad.values()))
    use_gpu = decide_use_gpu(cfg.train.use_gpu)
    run_name = resume or run_name or unique_run_name(cfg.tracking.run_name or cfg.objective.name)
    cfg.tracking.uri = uri
    cfg.tracking.run_name = run_name
    resolved = cfg.to_dict()
    if resume is not None:
        run_id = find_run(uri, cfg.tracking.experiment, resume)
        reopen_run(uri, run_id)
    else:
        run_id = start_run(uri, cfg.tracking.experiment, run_name, flatten(resolved),
                           tags={"cascadelab.objective": cfg.objective.name,
                                 "cascadelab.stages": "->".join(f"{s.model}@{s.k}" for s in cfg.stages),
                                 "cascadelab.dataset": str(Path(cfg.data.path).resolve()), **(tags or {})})
        log_text(uri, run_id, yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
    log.info("MLflow run %s (%s) in %s", run_name, run_id, uri)
    if checked is not None:
        log_metrics(uri, run_id, {"data_skipped_files": float(checked.skipped)})
        if checked.skipped:
            log_text(uri, run_id, json.dumps(checked.bad, indent=2), "skipped_files.json")

    def files(day: str) -> list[str] | None:
        return None if checked is None else checked.good[day]

    def dataset(day: str):
        return read_day(cfg.data.path, day, meta, groups, cfg.data.max_rows_per_day, files(day),
                        reader=cfg.data.parquet_reader)

    t0 = time.perf_counter()
    try:  # planning the datasets reads files too (footers; v1 samples rows)
        datasets = {f"train-{d}": dataset(d) for d in train_days}
        datasets["eval"] = dataset(eval_day)
        resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        threads = torch_threads(cfg)
        ordered = ExecutionOptions(preserve_order=True)  # deterministic batches: exact mid-day resume
        marker = None if "://" in storage else str(Path(storage) / run_name / ".injected_failure")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": resolved, "train_days": train_days, "groups": list(groups), "vocab": meta.vocab,
                "tracking_uri": uri, "run_id": run_id, "torch_threads": threads,
                "rows_per_day": meta.rows_per_day, "progress": sys.stderr.isatty(), "failure_marker": marker,
                "eval_day": eval_day,
            },
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            datasets=datasets,
            dataset_config=DataConfig(execution_options={name: ordered for name in datasets}),
            run_config=RunConfig(name=run_name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                                 callbacks=list(callbacks or []),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep)),
        )
        result = trainer.fit()
    except BaseException as exc:
        end_run(uri, run_id, "FAILED")
        message = worker_data_error(exc)
        if message or _is_read_error(exc):  # bad data met by a worker: one line naming the file
            culprit = find_bad_file(cfg.data.path, _days_first(message, [*train_days, eval_day]), meta, groups,
                                    ignore=set(checked.bad) if checked is not None else frozenset())
            if culprit or message:
                raise DataError(culprit or message) from None
        raise
    wall = time.perf_counter() - t0
    metrics = dict(result.return_value or {})
    metrics["wall_time_s"] = wall
    log_metrics(uri, run_id, metrics, step=len(train_days))
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt_path and "://" not in storage:
        log_artifacts(uri, run_id, ckpt_path, "checkpoint")
    if cfg.train.streaming_eval:
        log_streaming_plot(uri, run_id, train_days)
    end_run(uri, run_id, "FINISHED")
    return TrainResult(run_id, run_name, uri, metrics, ckpt_path, wall)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the per-worker errors of a Ray Train failure."""
    seen, out, stack = set(), [], [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        stack += [x for x in (e.__cause__, e.__context__) if x is not None]
        stack += [x for x in getattr(e, "worker_failures", {}).values() if isinstance(x, BaseException)]
    return out


def worker_data_error(exc: BaseException) -> str | None:
    """The message of a DataError raised inside a Ray worker, found in a wrapped training failure."""
    for e in _exception_chain(exc):
        if isinstance(e, DataError):
            return str(e)
        for line in str(e).splitlines():
            if "DataError: " in line:
                return line.split("DataError: ", 1)[1].strip()
    return None


_READ_ERROR_MARKERS = ("ArrowInvalid", "ArrowIOError", "ArrowException", "OSError", "Parquet", "parquet",
                       "ReadFiles", "ray.data", "ray/data")


def _is_read_error(exc: BaseException) -> bool:
    """Whether a training failure may come from Ray Data failing to read a file (then the files are
    checked to name the bad one; nothing is reported when they are all good)."""
    for e in _exception_chain(exc):
        text = "".join(traceback.format_exception(e))
        if any(m in text for m in _READ_ERROR_MARKERS):
            return True
    return False


def _days_first(message: str | None, days: list[str]) -> list[str]:
    """``days`` with the ones named in ``message`` first (the worker's error names the day)."""
    named = [d for d in days if message and f"'{d}'" in message]
    return named + [d for d in days if d not in named]


def log_streaming_plot(uri: str, run_id: str, train_days: list[str]) -> None:
    """Plot ``stream_joint_recall`` against the evaluated day and attach it to the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    history = sorted(MlflowClient(uri).get_metric_history(run_id, "stream_joint_recall"), key=lambda m: m.step)
    if not history:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([m.step + 1 for m in history], [m.value for m in history], marker="o")
    ax.set_xlabel("evaluated day index (model trained on all earlier days)")
    ax.set_ylabel("joint Recall@10@20")
    ax.set_title("streaming evaluation")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "streaming_joint_recall.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        log_artifacts(uri, run_id, path)


def config_summary(cfg: CascadeConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
