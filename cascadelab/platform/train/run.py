"""Driver side of a training run, in the three layers of Ray Train's examples: a plan (the config,
checked), a ``TorchTrainer`` (worker function, scaling and run config, datasets), ``fit()`` and its result.

Every check that needs no cluster runs before Ray starts (:func:`cascadelab.platform.train.plan.plan_run`,
the tracking server, the CPU budget where the cluster's size is known, the run to resume). The MLflow
run is a :class:`~cascadelab.platform.tracking.Tracker` shared with rank 0 of the workers; it gets the
resolved config as params (without the test-only keys), its dataset as an MLflow input, source tags,
system metrics, and at the end the trained cascade as an MLflow (``mlflow.pytorch``) model. A failed run
ends FAILED with its one-line reason as the ``cascadelab.error`` tag. Progress reaches the driver as Ray
Train reports and rank 0's in-day updates (see :class:`DriverProgress`); the workers' own output stays
in Ray's logs unless ``--verbose``. ray, mlflow and matplotlib are imported lazily (inside functions).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import queue as queue_module
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from tqdm import tqdm

from cascadelab.cascade.cascade import SCORER_INPUTS, CascadeScorer
from cascadelab.platform.cluster.storage import check_storage_path, uri_scheme
from cascadelab.platform.config import CascadeConfig, ConfigError, from_dict, run_params
from cascadelab.platform.data.ingest import arrow_to_tensors, read_day, read_days
from cascadelab.platform.data.schema import METADATA_FILE, DataError, day_dir_files
from cascadelab.platform.data.validate import DayFiles, find_bad_file, validate_days
from cascadelab.platform.metric_names import SKIPPED_FILES, MetricNames
from cascadelab.platform.runtime import decide_use_gpu, ensure_ray, one_line_error
from cascadelab.platform.tracking import Tracker, check_tracking_uri, runs_named, source_tags
from cascadelab.platform.train.checkpoint import CheckpointWriteError, read_checkpoint
from cascadelab.platform.train.loop import ShardError, TrackingUnavailable, train_loop_per_worker
from cascadelab.platform.train.plan import RunPlan, check_cpu_budget, known_cpus, on_cluster, plan_run

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """``metrics``: the final evaluation and throughput as the workers returned them (``samples_per_s``
    is the run's total rate, logged to MLflow as ``samples_per_s_total``), plus ``wall_time_s`` (from
    ``fit()`` to its end). ``timeline``: wall-clock marks (``time.time()``) of the run's fixed costs:
    ``start`` (``run_training`` called), ``fit_start`` (Ray up, the MLflow run open), ``fit_call``
    (the progress queue up, the datasets planned: ``fit()`` called), ``fit_end`` and rank 0's
    :class:`~cascadelab.platform.train.loop.Timeline` (``worker_start``, ``ready``, ``day_first_step``,
    ``day_last_step``)."""

    run_id: str
    run_name: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint_path: str | None
    wall_s: float
    timeline: dict = dataclasses.field(default_factory=dict)


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
                 callbacks: list | None = None, run_name: str | None = None,
                 progress: bool = True) -> TrainResult:
    """Train ``cfg`` on Ray (the local embedded cluster unless RAY_ADDRESS is set), tracked in MLflow.

    ``resume``: the name of an interrupted run to continue from its last checkpoint (same config,
    same MLflow run). Without it every run gets a fresh unique name and never resumes an old one.
    ``tags``: extra MLflow tags (e.g. ``mlflow.parentRunId``). ``callbacks``: Ray Train ``UserCallback``s
    (e.g. Tune's ``TuneReportCallback`` inside a trial). ``run_name``: an exact name chosen by the caller
    (a Tune trial uses its trial id, stable across trial restarts): when a run of that name already has
    a checkpoint under ``train.storage_path`` it is resumed (with its MLflow run), otherwise created.
    Raises ConfigError / DataError (one line) for bad configs and bad data, before Ray starts where
    the check needs no cluster. ``progress``: the driver shows the run's progress (a bar on a terminal,
    a line per day otherwise); a Tune trial, which is no driver, passes False.
    """
    started = time.time()
    plan = plan_run(cfg, resume=resume, run_name=run_name)
    check_tracking_uri(plan.tracking_uri)
    cpus = known_cpus()
    if cpus is not None:
        check_cpu_budget(plan.config, cpus)
    resumed = find_run(plan.tracking_uri, plan.config.tracking.experiment, plan.run_name) if plan.resume else None

    plan, files = _on_cluster(plan)
    tracker = _open_run(plan, resumed, tags, files)
    monitor = tracker.system_metrics() if plan.config.tracking.system_metrics else None
    t0, marks = time.perf_counter(), {"start": started, "fit_start": time.time()}
    try:
        with DriverProgress(plan, enabled=progress) as shown:
            trainer = _trainer(plan, tracker, files, [*(callbacks or []), *shown.callbacks()], shown.queue)
            marks["fit_call"] = time.time()
            result = trainer.fit()
        marks["fit_end"] = time.time()
        return _finish(plan, tracker, result, time.perf_counter() - t0, marks)
    except BaseException as exc:
        fatal = worker_failure(exc, (TrackingUnavailable, CheckpointWriteError))
        if isinstance(fatal, TrackingUnavailable):  # closing the run would wait out the retries again
            raise fatal from None
        bad = fatal if fatal is not None else data_failure(exc, plan, files)
        tracker.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                      error=str(bad) if bad is not None else one_line_error(exc))
        if bad is not None:  # bad data or a full disk met by a worker: one line naming the file
            raise bad from None
        raise
    finally:
        if monitor is not None:
            monitor.finish()


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
    plan = dataclasses.replace(plan, config=resolved_config(plan))
    if not plan.config.data.skip_bad_files:
        return plan, None
    files = validate_days(plan.config.data.path, plan.days, plan.meta, plan.groups)
    if files.skipped:
        log.warning("skipping %d bad file(s) of %s: %s", files.skipped, plan.config.data.path,
                    "; ".join(files.bad.values()))
    return plan, files


def resolved_config(plan: RunPlan) -> CascadeConfig:
    """The config as the run uses it: training and evaluation days filled in, ``use_gpu`` decided,
    a local ``data.path`` absolute (what is logged as params and ``config.yaml``)."""
    cfg = copy.deepcopy(plan.config)
    cfg.data.train_days, cfg.data.eval_day = list(plan.train_days), plan.eval_day
    if not uri_scheme(cfg.data.path):
        cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    if plan.use_gpu is not None:
        cfg.train.use_gpu = "true" if plan.use_gpu else "false"
    return cfg


def _open_run(plan: RunPlan, resumed: Tracker | None, tags: dict[str, str] | None,
              files: DayFiles | None) -> Tracker:
    """The run's MLflow run: the resumed one reopened, or a new one with the resolved config as params,
    the source tags and the dataset as its input."""
    cfg = plan.config
    if resumed is not None:
        tracker = resumed
        tracker.reopen()
    else:
        tracker = Tracker.start(plan.tracking_uri, cfg.tracking.experiment, plan.run_name, run_params(cfg),
                                tags={"cascadelab.objective": cfg.objective.name,
                                      "cascadelab.stages": "->".join(f"{s.model}@{s.k}" for s in cfg.stages),
                                      "cascadelab.dataset": cfg.data.path, **source_tags(), **(tags or {})})
        tracker.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
        log_training_data(tracker, plan)
    log.info("MLflow run %s (%s) in %s", plan.run_name, tracker.run_id, plan.tracking_uri)
    if files is not None:
        tracker.log_dict({SKIPPED_FILES: float(files.skipped)})
        if files.skipped:
            tracker.log_text(json.dumps(files.bad, indent=2), "skipped_files.json")
    return tracker


def build_datasets(plan: RunPlan, files: DayFiles | None = None) -> dict:
    """The run's Ray Datasets: ``train``, every training day in date order as one dataset (one pipeline
    for the whole run; each row carries its file's path and the loop splits the stream into days, see
    :class:`~cascadelab.platform.train.loop.DayBatcher`), ``eval``, the held-out day (capped at
    ``data.max_eval_rows``), and with ``train.streaming_eval`` ``train-<day>`` for each training day after
    the first (scored by the model of the days before it, capped at ``data.max_rows_per_day``). Planning
    a dataset reads footers (and samples rows); a failure there is a ShardError of its (first) day."""
    data = plan.config.data
    good = None if files is None else files.good

    def planned(day: str, read):
        try:
            return read()
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to plan a read is its days'
            raise ShardError.from_failure(day, exc) from exc

    def one_day(day: str, max_rows: int | None):
        return planned(day, lambda: read_day(data.path, day, plan.meta, plan.groups, max_rows,
                                             None if good is None else good[day], reader=data.parquet_reader))

    days = list(plan.train_days)
    datasets = {"train": planned(days[0], lambda: read_days(data.path, days, plan.meta, plan.groups, good,
                                                            reader=data.parquet_reader))}
    if plan.config.train.streaming_eval:
        datasets.update({f"train-{d}": one_day(d, data.max_rows_per_day) for d in days[1:]})
    datasets["eval"] = one_day(plan.eval_day, data.max_eval_rows)
    return datasets


def training_rows(plan: RunPlan, files: DayFiles | None = None) -> list[int]:
    """Rows the run trains of each training day, all workers together: the rows of the day's files
    (the good ones with ``data.skip_bad_files``, from their footers), capped at ``data.max_rows_per_day``."""
    cap = plan.config.data.max_rows_per_day
    rows = []
    for day in plan.train_days:
        paths = files.good[day] if files is not None else day_dir_files(plan.config.data.path, day)
        total = sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
        rows.append(total if cap is None else min(total, cap))
    return rows


def _trainer(plan: RunPlan, tracker: Tracker, files: DayFiles | None, callbacks: list | None,
             progress_sink=None):
    """The TorchTrainer of the plan: the worker loop, its scaling and run configs, the datasets.
    ``progress_sink``: the queue rank 0 sends its in-day progress to (None: none sent)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = plan.config.train
    datasets = build_datasets(plan, files)
    ordered = ExecutionOptions(preserve_order=True)  # deterministic batches: exact mid-day resume
    config = {"plan": plan, "tracker": tracker, "day_rows": training_rows(plan, files), "progress": progress_sink}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker,
                                                           **({"GPU": 1} if plan.use_gpu else {})}),
        datasets=datasets,
        # every worker streams the whole of "train" and keeps its share of each day (loop.DayBatcher); the
        # others are split between workers, and a lone worker reads them itself (a split of one would put
        # a coordinator actor, started at the first read, in front of the pipeline)
        dataset_config=DataConfig(datasets_to_split=[name for name in datasets
                                                     if name != "train" and train.num_workers > 1],
                                  execution_options={name: ordered for name in datasets}),
        run_config=RunConfig(name=plan.run_name, storage_path=plan.storage_path,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             callbacks=list(callbacks or []),
                             checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep)),
    )


def _finish(plan: RunPlan, tracker: Tracker, result, wall: float, marks: dict[str, float]) -> TrainResult:
    """Log the final metrics under their MLflow names (step = number of training days; see
    :mod:`~cascadelab.platform.metric_names`), the checkpoint, the
    trained cascade as an MLflow model and the streaming plot."""
    returned = result.return_value or {}
    metrics = dict(returned.get("metrics", {}))
    metrics["wall_time_s"] = wall
    names = MetricNames.of(plan.config)
    tracker.log_dict(names.final(metrics), step=len(plan.train_days))
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt_path and plan.run_dir is not None:
        tracker.log_artifact(ckpt_path, "checkpoint")
        log_cascade_model(tracker, plan, ckpt_path)
    if plan.config.train.streaming_eval:
        log_streaming_plot(tracker, names)
    tracker.close("FINISHED")
    return TrainResult(tracker.run_id, plan.run_name, plan.tracking_uri, metrics, ckpt_path, wall,
                       {**marks, **returned.get("timeline", {})})


# ----------------------------------------------------------------------------------------------------------
# what the MLflow run shows besides metrics: the dataset, the model


def _mlflow_type(tp: pa.DataType) -> str:
    """An Arrow column type as an MLflow column type (``array<...>`` for lists)."""
    if pa.types.is_list(tp) or pa.types.is_fixed_size_list(tp) or pa.types.is_large_list(tp):
        return f"array<{_mlflow_type(tp.value_type)}>"
    if pa.types.is_boolean(tp):
        return "boolean"
    if pa.types.is_integer(tp):
        return "long"
    if pa.types.is_floating(tp):
        return "double"
    return "binary" if pa.types.is_binary(tp) else "string"


def dataset_digest(root: str | Path, days: list[str]) -> str:
    """16 hex digits of sha256 over ``dataset.json`` and the name and size of every Parquet file of
    ``days``: another dataset, another day or a rewritten file changes it; re-reading does not."""
    h = hashlib.sha256((Path(root) / METADATA_FILE).read_bytes())
    for day in sorted(days):
        for path in sorted(day_dir_files(root, day)):
            h.update(f"{Path(path).relative_to(root)}:{Path(path).stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def log_training_data(tracker: Tracker, plan: RunPlan) -> None:
    """The run's dataset as its MLflow input: name, source path, digest, days, rows and schema (of the
    first training day's first file). Remote datasets are logged by path and schema only."""
    data = plan.config.data
    profile = {"days": plan.days, "train_days": list(plan.train_days), "eval_day": plan.eval_day,
               "rows": sum(plan.rows_per_day.get(d, 0) for d in plan.days),
               "rows_per_day": {d: plan.rows_per_day.get(d, 0) for d in plan.days}, "mode": plan.meta.mode}
    files = day_dir_files(data.path, plan.train_days[0])
    schema = [(f.name, _mlflow_type(f.type)) for f in pq.read_schema(files[0])]
    digest = dataset_digest(data.path, plan.days) if not uri_scheme(data.path) else "remote"
    tracker.log_dataset(Path(data.path).name, data.path, digest, schema, profile)


def example_batch(plan: RunPlan, rows: int = 4) -> dict[str, torch.Tensor]:
    """``rows`` requests of the evaluation day as the flat tensor dict a :class:`CascadeScorer` reads."""
    table = pq.ParquetFile(day_dir_files(plan.config.data.path, plan.eval_day)[0]).read_row_group(0)
    tensors = arrow_to_tensors(table.slice(0, rows), plan.groups)
    return {k: tensors[k] for k in SCORER_INPUTS}


def log_cascade_model(tracker: Tracker, plan: RunPlan, checkpoint_dir: str | Path) -> str:
    """The checkpoint's cascade as the run's MLflow model (``mlflow.pytorch``; a :class:`CascadeScorer`
    with the signature of an evaluation-day batch); returns its model URI."""
    cascade = plan.build_cascade()
    cascade.load_state_dict(read_checkpoint(checkpoint_dir)["model"])
    scorer, example = CascadeScorer(cascade).eval(), example_batch(plan)
    with torch.no_grad():
        output = scorer(example)
    return tracker.log_pytorch_model(scorer, {k: v.numpy() for k, v in example.items()},
                                     {k: v.numpy() for k, v in output.items()})


# ----------------------------------------------------------------------------------------------------------
# progress on the driver


class DriverProgress:
    """The run's progress on the driver, from Ray Train's reports and rank 0's live updates.

    A ``ray.util.queue.Queue`` on the driver's node takes two kinds of message: rank 0's Ray Train
    reports (global step, day, loss, samples/s), put by a ``UserCallback`` in the Train controller at
    each day and mid-day checkpoint, and rank 0's in-day updates (``"live": True``: global step and the
    samples/s of the last second, at most one a second, see :class:`~cascadelab.platform.train.loop.
    LiveProgress`). A driver thread takes them off and draws one tqdm bar (steps of all workers, shown as
    samples, with ETA, the last day's and the live samples/s) on a terminal, or logs one line per
    training day elsewhere (live updates print nothing there).
    """

    def __init__(self, plan: RunPlan, enabled: bool = True):
        self.plan, self.enabled = plan, enabled
        train = plan.config.train
        self.per_step = plan.config.data.batch_size * train.num_workers
        cap = plan.config.data.max_rows_per_day
        rows = [min(plan.rows_per_day.get(d, 0), cap or sys.maxsize) for d in plan.train_days]
        self.total = sum(-(-r // self.per_step) for r in rows)
        self.queue = self.thread = self.bar = None
        self.postfix: dict[str, str] = {}
        self.t0 = time.perf_counter()

    def callbacks(self) -> list:
        if not self.enabled:
            return []
        from ray.train import UserCallback

        sink = self.queue

        class ReportToDriver(UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                try:
                    if metrics:
                        sink.put_nowait(dict(metrics[0]))
                except Exception:  # the bar is a view: a lost report must never fail the run
                    log.debug("progress report dropped", exc_info=True)

        return [ReportToDriver()]

    def __enter__(self) -> DriverProgress:
        if self.enabled:
            import ray
            from ray.util.queue import Queue
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # on the driver's node: a queue on a worker node would die with it, and the controller with it
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
            if sys.stderr.isatty():
                self.bar = tqdm(total=self.total * self.per_step, unit="sample", unit_scale=True,
                                desc=self.plan.run_name, dynamic_ncols=True, leave=True)
            self._stop = threading.Event()
            self.thread = threading.Thread(target=self._drain, name="cascadelab-progress", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self.thread.join(timeout=10)
        if self.bar is not None:
            self.bar.close()
        self.queue.shutdown()

    def _drain(self) -> None:
        while True:
            try:
                self.show(self.queue.get(timeout=0.5))
            except queue_module.Empty:
                if self._stop.is_set():
                    return
            except Exception:  # noqa: BLE001 - the queue actor is gone: the run ended
                return

    def show(self, report: dict) -> None:
        """One report: the bar moved to its global step (a live update only ever forward), or a line for
        a finished training day."""
        step = int(report.get("global_step", 0))
        done = min(step, self.total)
        elapsed = time.perf_counter() - self.t0
        if self.bar is not None:
            moved = done * self.per_step - self.bar.n
            if moved > 0 or not report.get("live"):
                self.bar.update(moved)
            if report.get("live") and "samples_per_s" in report:
                self.postfix.update(day=str(report.get("day")), now=f"{report['samples_per_s']:.0f}/s")
            elif "samples_per_s" in report and "train_loss" in report:
                self.postfix.update(day=str(report.get("day")), loss=f"{report['train_loss']:.4f}",
                                    day_rate=f"{report['samples_per_s']:.0f}/s")
            self.bar.set_postfix(self.postfix, refresh=False)
            return
        if "train_loss" not in report or "joint_recall" in report:
            return
        eta = elapsed / done * (self.total - done) if done else float("nan")
        log.info("%s: day %s done (%d/%d steps): loss %.4f, %.0f samples/s, ETA %s", self.plan.run_name,
                 report.get("day"), done, self.total, report["train_loss"], report.get("samples_per_s", 0.0),
                 _clock(eta))


def _clock(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    return time.strftime("%M:%S" if seconds < 3600 else "%H:%M:%S", time.gmtime(max(seconds, 0.0)))


def worker_failure(exc: BaseException, kinds: tuple[type[BaseException], ...] = (ShardError,)):
    """The exception of one of ``kinds`` a Train worker raised, from Ray Train's failure
    (``WorkerGroupError.worker_failures`` maps each failed rank to the exception it raised), from the
    exception's chain, or raised on the driver itself (e.g. while planning datasets); else None."""
    import ray.train

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds):
            return seen
        if isinstance(seen, ray.train.WorkerGroupError):
            for _, failure in sorted(seen.worker_failures.items()):
                if isinstance(failure, kinds):
                    return failure
        seen = seen.__cause__ or seen.__context__
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


def log_streaming_plot(tracker: Tracker, names: MetricNames) -> None:
    """Plot the streaming joint recall (``stream/joint_recall_at_...``) against the evaluated day and
    attach it to the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = tracker.history(names.day_name("stream_joint_recall"))
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
