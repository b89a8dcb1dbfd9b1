"""The Ray Train worker loop: one loop for every objective and any number of stages.

Each worker receives its ``train_loop_config`` (see :func:`train_loop_per_worker`). It trains day by
day in date order from one Ray Data pipeline for the whole run: the ``train`` dataset holds every
training day, each worker streams all of it once and :class:`DayBatcher` cuts it into its share of
each day, in batches that never hold rows of two days (collated one or two batches ahead by a thread,
:func:`prefetched`). Checkpoints after each day and, if ``train.checkpoint_every_steps > 0``, every N
steps; the checkpoint records the day and the number of batches of that day already trained, so a
replaced worker group resumes exactly there (earlier days are read and dropped, earlier batches of the
day are read, collated and skipped, never trained twice; the order is deterministic because the
datasets are read with ``preserve_order``). With ``train.streaming_eval`` the model trained on the days
before ``t`` is evaluated on day ``t`` (the papers' Figure 2 protocol). Every rank calls
``ray.train.report`` the same number of times (it is a barrier). A failure of the data pipeline leaves
the worker as a :class:`ShardError` naming the day in progress (a failed data check names its own day);
a checkpoint that cannot be written (a full disk) as a
:class:`~cascadelab.platform.train.checkpoint.CheckpointWriteError` naming the file. Rank 0 records a
:class:`Timeline` of the run's fixed costs and sends its in-day progress to the driver
(:class:`LiveProgress`).

Tracking: rank 0 logs each day's metrics to MLflow (step = day index) through a :class:`DayMetricsWriter`,
a background thread, so training goes on while the tracking server is away. The days' metrics travel
in every checkpoint and the writer skips days the run already has, so a resumed or restarted run logs
each day exactly once. Each log call rides out an outage with MLflow's own HTTP retries: ``1 +
MLFLOW_HTTP_REQUEST_MAX_RETRIES`` attempts (default 7 retries) with sleeps of ``BACKOFF_FACTOR *
2**(i-1)`` seconds (``i >= 2``, each capped at 120 s, plus up to ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER``
random seconds; the first retry is immediate): with the defaults (factor 2) 4 + 8 + ... + 64 + 120 =
244 s for a server that refuses connections, and when the host does not answer at all each attempt
also waits up to ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (120 s) for its connection. An outage longer than that
makes the worker raise :class:`TrackingUnavailable` (one line naming the server, the day and
``--resume RUN``) at the next day boundary or at the end of training, after that day's checkpoint
was committed; Ray Train counts it as a worker failure (``train.max_failures``), and a restarted group
or ``--resume`` logs the missing days.

Test hooks: ``CASCADELAB_TEST_HOOKS`` names a JSON file read by each worker at start
(:class:`FaultHooks`): pause once at a global step (to kill a worker or a node at a known point), make
one checkpoint write fail with ENOSPC, set environment variables in the worker (e.g. MLflow's retry
settings). Unset, nothing changes.

ray is imported lazily (inside functions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from cascadelab.cascade.batch import CascadeBatch
from cascadelab.cascade.cascade import Cascade
from cascadelab.cascade.metrics import finalize, metric_sums
from cascadelab.cascade.models.compiled import compile_stages
from cascadelab.platform.data.ingest import ArrowToTorch, split_by_day
from cascadelab.platform.data.schema import DataError
from cascadelab.platform.metric_names import LOSS_TOTAL, MetricNames
from cascadelab.platform.tracking import Tracker
from cascadelab.platform.train.checkpoint import read_checkpoint, write_checkpoint
from cascadelab.platform.train.plan import RunPlan

log = logging.getLogger(__name__)
HOOKS_ENV = "CASCADELAB_TEST_HOOKS"


class InjectedFailure(RuntimeError):
    """Raised once by ``train.fail_at_step`` to test fault tolerance."""


class ShardError(DataError):
    """Reading or collating day ``day``'s shard failed in a Train worker.

    ``checked``: the failure is one of the data checks (a ``DataError``: an id outside the vocabulary,
    a bad label), whose message names the day and the field; otherwise the read itself failed (Ray Data,
    Arrow) and the message is that error's first line. It pickles with its fields, so the driver gets
    it back from Ray Train's ``WorkerGroupError.worker_failures``.
    """

    def __init__(self, day: str, message: str, checked: bool):
        super().__init__(message)
        self.day, self.message, self.checked = day, message, checked

    def __reduce__(self):
        return type(self), (self.day, self.message, self.checked)

    @classmethod
    def from_failure(cls, day: str, exc: BaseException) -> ShardError:
        seen, todo = set(), [exc]
        while todo:  # the exception and what it was raised from: a check's DataError may be wrapped
            e = todo.pop()
            if id(e) in seen:
                continue
            seen.add(id(e))
            if isinstance(e, DataError):
                return cls(day, str(e), checked=True)
            todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        first = (str(exc).strip().splitlines() or [""])[0]
        return cls(day, f"reading day '{day}' failed: {type(exc).__name__}: {first}", checked=False)


def read_shard(batches: Iterable, day: str | Callable[[], str]) -> Iterator:
    """``batches`` as they come, with any failure of the data pipeline raised as a ShardError of ``day``
    (a callable: the day in progress when the failure came)."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - every failure of the pipeline is a failure of this day
            raise ShardError.from_failure(day() if callable(day) else day, exc) from exc
        yield item


class DayBatcher:
    """One worker's batches of the run's training stream (every training day in date order, as
    :func:`~cascadelab.platform.data.ingest.split_by_day` runs), day by day: ``batches(runs)`` yields
    ``(day index, pa.Table)`` with ``batch_size`` rows each, the last batch of a day shorter, never a
    row of two days in one batch.

    Each worker sees the whole stream and keeps its share of day ``d``: the rows ``i`` (in the day's
    order) with ``i % world == rank`` and ``i < limit[d]``, where ``limit[d]`` is the day's row count
    (capped by ``data.max_rows_per_day``), rounded down to a multiple of ``world``; so every worker
    trains the same number of batches of each day (DDP and the per-day reports stay in step), as an
    equal split of each day would give. With ``shuffle_rows > 0`` a day's rows are permuted in windows
    of that many rows (a generator seeded by ``seed`` and the day), so the order is deterministic.
    """

    def __init__(self, limit: list[int], batch_size: int, rank: int = 0, world: int = 1, shuffle_rows: int = 0,
                 seed: int = 0):
        self.limit = [n // world * world for n in limit]
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.window, self.shuffle, self.seed = max(shuffle_rows, batch_size), shuffle_rows > 0, seed
        self._day, self._seen, self._buf, self._rng = -1, 0, [], None

    def batches(self, runs: Iterable[tuple[int, pa.Table]]) -> Iterator[tuple[int, pa.Table]]:
        for day, rows in runs:
            if day != self._day:
                yield from self._emit(final=True)
                self._day, self._seen, self._buf = day, 0, []
                self._rng = np.random.default_rng([self.seed, day])
            first, self._seen = self._seen, self._seen + rows.num_rows
            index = np.arange(first, self._seen)
            mine = index[(index % self.world == self.rank) & (index < self.limit[day])] - first
            if len(mine):
                self._buf.append(rows.take(mine))
            yield from self._emit(final=False)
        yield from self._emit(final=True)

    def _emit(self, final: bool) -> Iterator[tuple[int, pa.Table]]:
        """Full batches of the buffered rows once a window is buffered (every row at the end of a day)."""
        held = sum(t.num_rows for t in self._buf)
        if held == 0 or (held < self.window and not final):
            return
        table = pa.concat_tables(self._buf)
        if self.shuffle:
            table = table.take(self._rng.permutation(held))
        ready = held if final else held // self.batch_size * self.batch_size
        for start in range(0, ready, self.batch_size):
            yield self._day, table.slice(start, min(self.batch_size, ready - start))
        self._buf = [table.slice(ready)] if ready < held else []


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """``items`` produced by a daemon thread up to ``depth`` ahead (collating while the model trains);
    an exception of the producer is raised here, in order."""
    done, ahead = object(), queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in items:
                ahead.put((item, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ahead.put((done, exc))
            return
        ahead.put((done, None))

    threading.Thread(target=produce, name="train-batches", daemon=True).start()
    while True:
        item, exc = ahead.get()
        if item is done:
            if exc is not None:
                raise exc
            return
        yield item


class TrackingUnavailable(RuntimeError):
    """The tracking server did not take day ``day``'s metrics (step ``step``) within MLflow's retries.

    ``seconds``: how long the failed log call kept retrying; ``reason``: the client's error when the
    server answered with one (empty when it could not be reached). Pickles with its fields.
    """

    def __init__(self, uri: str, day: str, step: int, seconds: float, reason: str, run_name: str):
        what = f"refused ({reason})" if reason else "unreachable"
        super().__init__(f"MLflow tracking server {uri} {what} for {seconds:.0f} s while logging the metrics "
                         f"of day {day} (step {step}); checkpoints kept; rerun with --resume {run_name}")
        self.uri, self.day, self.step, self.seconds = uri, day, step, seconds
        self.reason, self.run_name = reason, run_name

    def __reduce__(self):
        return type(self), (self.uri, self.day, self.step, self.seconds, self.reason, self.run_name)


def _client_error(exc: BaseException) -> str:
    """The server's answer in an MLflow client error; empty when the server was not reached at all."""
    text = str(exc)
    if "Max retries exceeded" in text or isinstance(exc, ConnectionError):
        return ""
    return (text.strip().splitlines() or [type(exc).__name__])[0][:300]


class DayMetricsWriter:
    """Rank 0's per-day metrics, logged in day order by a background thread (off the training path).

    ``put(step, metrics)`` queues a day, logged under its MLflow names (``names.day``); a day the MLflow
    run already has (its ``loss/total`` at that step, fetched once) is skipped, so re-queueing the days a
    checkpoint carries logs nothing twice. After a failed log call (MLflow's retries exhausted) nothing
    more is sent and :meth:`check` raises :class:`TrackingUnavailable`; :meth:`flush` waits for the
    queue first.
    """

    SENTINEL = LOSS_TOTAL  # every day's metrics have it; one batch per day is all-or-nothing

    def __init__(self, tracker: Tracker, days: tuple[str, ...], run_name: str, names: MetricNames):
        self.tracker, self.days, self.run_name, self.names = tracker, days, run_name, names
        self.failure: TrackingUnavailable | None = None
        self._logged: set[int] | None = None
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, name="day-metrics-writer", daemon=True).start()

    def put(self, step: int, metrics: dict[str, float]) -> None:
        self._queue.put((step, dict(metrics)))

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def flush(self) -> None:
        """Wait until every queued day is logged (or the writer failed); raise its failure if any."""
        self._queue.join()
        self.check()

    def _drain(self) -> None:
        while True:
            step, metrics = self._queue.get()
            try:
                if self.failure is None:
                    self._log(step, metrics)
            finally:
                self._queue.task_done()

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        t0 = time.monotonic()
        try:
            if self._logged is None:
                history = self.tracker.client.get_metric_history(self.tracker.run_id, self.SENTINEL)
                self._logged = {m.step for m in history}
            if step not in self._logged:
                self.tracker.log_dict(self.names.day(metrics), step=step)
                self._logged.add(step)
        except Exception as exc:  # noqa: BLE001 - any failure to log is reported once, by the loop
            self.failure = TrackingUnavailable(self.tracker.uri, self.days[step], step, time.monotonic() - t0,
                                               _client_error(exc), self.run_name)
            log.error("%s", self.failure)


@dataclass
class FaultHooks:
    """Fault injection for tests, from the JSON file named by ``CASCADELAB_TEST_HOOKS`` (absent: none).

    ``pause_at_step``: before training global step N the worker of rank ``pause_rank`` writes
    ``{"pid", "node_id", "step"}`` to ``pause_file`` and sleeps until ``pause_file + ".release"`` exists
    (at most ``pause_s``); once per run (the file stays). ``enospc_at_step``: the checkpoint taken at
    global step N fails part-way with ENOSPC, once (``enospc_file`` records it). ``starts_file``: each
    worker appends ``{"pid", "node_id", "rank", "global_step"}`` when it starts (0, or the step it resumed at).
    ``env``: set in the worker's environment at start (MLflow reads its retry settings from there).
    """

    pause_at_step: int = -1
    pause_rank: int = 0
    pause_file: str = ""
    pause_s: float = 120.0
    enospc_at_step: int = -1
    enospc_file: str = ""
    starts_file: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> FaultHooks:
        path = os.environ.get(HOOKS_ENV)
        hooks = cls(**json.loads(Path(path).read_text())) if path and os.path.exists(path) else cls()
        os.environ.update(hooks.env)
        return hooks

    @staticmethod
    def _where(**fields) -> str:
        import ray

        return json.dumps({"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), **fields})

    def started(self, rank: int, step: int) -> None:
        if self.starts_file:
            with open(self.starts_file, "a") as f:
                f.write(self._where(rank=rank, global_step=step) + "\n")

    def pause(self, step: int, rank: int) -> None:
        if step != self.pause_at_step or rank != self.pause_rank or os.path.exists(self.pause_file):
            return
        Path(self.pause_file).write_text(self._where(step=step))
        deadline = time.monotonic() + self.pause_s
        while time.monotonic() < deadline and not os.path.exists(self.pause_file + ".release"):
            time.sleep(0.05)

    def full_disk_at(self, step: int) -> int | None:
        """Bytes after which the checkpoint of ``step`` fails with ENOSPC (None: it does not)."""
        if step != self.enospc_at_step or not self.enospc_file or os.path.exists(self.enospc_file):
            return None
        Path(self.enospc_file).write_text(f"ENOSPC injected at global step {step}\n")
        return 4096


@dataclass
class LoopState:
    """Progress a checkpoint carries besides the weights."""

    day: int = 0  # index of the day in progress
    step_in_day: int = 0  # batches of that day already trained
    global_step: int = 0
    train_rows: float = 0.0  # rows trained by all workers in committed steps
    train_s: float = 0.0  # steady-state training time of committed steps


@dataclass
class Timeline:
    """Rank 0's wall-clock marks (``time.time()``, comparable with the driver's on the same node) of the
    run's fixed costs: the worker function's start, the trainer ready (model built and wrapped), and per
    day the start of its first step and the end of its last; then the final evaluation's start and end
    and the worker function's return. The attempt that finished the run only."""

    worker_start: float = field(default_factory=time.time)
    ready: float = 0.0
    day_first_step: dict[int, float] = field(default_factory=dict)
    day_last_step: dict[int, float] = field(default_factory=dict)
    final_eval_start: float = 0.0
    final_eval_end: float = 0.0
    returned: float = 0.0

    def stepping(self, day_index: int) -> None:
        """A step of ``day_index`` is about to run (the first one of the day is recorded)."""
        self.day_first_step.setdefault(day_index, time.time())

    def stepped(self, day_index: int) -> None:
        self.day_last_step[day_index] = time.time()


class LiveProgress:
    """Rank 0's in-day progress for the driver's bar. ``update`` (after every step) only stores the global
    step, the day and the rows trained so far; a daemon thread sends ``{"global_step", "day",
    "samples_per_s", "live": True}`` with ``sink.put_nowait`` at most once every ``interval_s`` and only
    when a step was taken since. ``samples_per_s`` is the rows between the last two updates sent over the
    time between them (absent from the first). A failing or hanging sink holds that thread only: a lost
    update never fails or slows training.
    """

    def __init__(self, sink, interval_s: float = 1.0):
        self.sink, self.interval_s = sink, interval_s
        self._latest: tuple[int, str, float, float] | None = None  # (global step, day, rows, time)
        self._stop = threading.Event()
        threading.Thread(target=self._send_loop, name="live-progress", daemon=True).start()

    def update(self, global_step: int, day: str, rows: float) -> None:
        self._latest = (global_step, day, rows, time.perf_counter())

    def close(self) -> None:
        self._stop.set()

    def _send_loop(self) -> None:
        sent: tuple[int, str, float, float] | None = None
        while not self._stop.wait(self.interval_s):
            latest = self._latest
            if latest is None or latest == sent:
                continue
            update = {"global_step": latest[0], "day": latest[1], "live": True}
            if sent is not None and latest[3] > sent[3]:
                update["samples_per_s"] = (latest[2] - sent[2]) / (latest[3] - sent[3])
            try:
                self.sink.put_nowait(update)
            except Exception:  # noqa: BLE001 - a full queue or a gone driver: the update is dropped
                log.debug("live progress update dropped", exc_info=True)
            sent = latest


@dataclass
class DayClock:
    """Steady-state time of one day's steps: the waits for batches are counted apart, and the first one
    (the day's pipeline start-up) is left out of both."""

    busy_s: float = 0.0
    wait_s: float = 0.0
    first_wait: float = 0.0
    steps: int = 0
    t_seg: float = field(default_factory=time.perf_counter)  # start of the current timed segment
    t_wait: float = field(default_factory=time.perf_counter)  # when the loop asked for the next batch

    def restart(self) -> None:
        """A batch skipped on resume: time starts again after it."""
        self.t_seg = self.t_wait = time.perf_counter()

    def got_batch(self) -> None:
        waited = time.perf_counter() - self.t_wait
        if self.steps == 0:
            self.first_wait = waited
        else:
            self.wait_s += waited
        self.steps += 1

    def waiting(self) -> None:
        self.t_wait = time.perf_counter()

    def segment(self) -> float:
        """Close the current segment; returns its steady-state seconds."""
        seg = time.perf_counter() - self.t_seg - self.first_wait
        self.busy_s += seg
        self.first_wait = 0.0
        return seg


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over workers (identity with one worker)."""
    if not _distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def _per_worker(value: float, rank: int, world: int, device: torch.device) -> list[float]:
    """Every worker's ``value``, indexed by rank."""
    t = torch.zeros(world, dtype=torch.float64, device=device)
    t[rank] = value
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def _unwrap(model: torch.nn.Module) -> Cascade:
    return model.module if hasattr(model, "module") else model


def evaluate(model: torch.nn.Module, shard, collate: ArrowToTorch, batch_size: int, device: torch.device,
             day: str, gt_k: int) -> dict[str, float]:
    """Metric means over the evaluation data of ``day`` (each worker scores its shard; sums are all-reduced);
    recalls count the ``gt_k`` ground-truth items (``objective.gt_k``)."""
    cascade = _unwrap(model)
    cascade.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        batches = shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, device=device)
        for tensors in read_shard(batches, day):
            batch = CascadeBatch.from_dict(tensors)
            for key, value in metric_sums(cascade.scores(batch), cascade.ks, batch, gt_k=gt_k).items():
                sums[key] = sums.get(key, 0.0) + value
    cascade.train()
    return finalize(_all_reduce(sums, device))


def _maybe_fail(plan: RunPlan, state: LoopState, rank: int) -> None:
    """Fault injection for tests: rank ``train.fail_rank`` raises once when it reaches the chosen step."""
    train, marker = plan.config.train, plan.failure_marker
    if train.fail_at_step < 0 or state.global_step != train.fail_at_step or rank != train.fail_rank:
        return
    if marker is None or os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(f"failed once at step {state.global_step}\n")
    raise InjectedFailure(f"injected failure at global step {state.global_step} on rank {rank}")


class _Trainer:
    """The per-worker training state and the steps of the loop (kept small so the loop reads top-down)."""

    def __init__(self, plan: RunPlan, tracker: Tracker, day_rows: list[int], progress_sink=None,
                 timeline: Timeline | None = None):
        import ray.train
        from ray.train.torch import get_device, prepare_model

        self.plan, self.tracker, self.cfg = plan, tracker, plan.config
        self.day_rows = day_rows  # rows of each training day the run trains (all workers)
        self.timeline = timeline or Timeline()
        self._stream: Iterator | None = None  # the run's one training pipeline, opened by the first day
        self._held: tuple[int, dict[str, torch.Tensor]] | None = None  # a later day's first batch, read ahead
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(plan.torch_threads)
        torch.manual_seed(self.cfg.train.seed)
        self.device = get_device()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.cfg.train.bf16 and self.device.type == "cuda" else contextlib.nullcontext())
        self.hooks = FaultHooks.from_env()
        model = plan.build_cascade()
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.cfg.train.lr)
        self.day_metrics: dict[int, dict[str, float]] = {}  # each finished day's metrics, by day index
        self.state = self._restore(model, ray.train.get_checkpoint())
        self.hooks.started(self.rank, self.state.global_step)
        if self.cfg.train.compile:  # in place: state_dict keys and checkpoints stay those of the eager model
            compile_stages(model)
        self.model = prepare_model(model)
        self.eval_collate = self.collate_for(plan.eval_day, evaluation=True)
        self._pending = {"rows": 0.0, "busy_s": 0.0}  # local progress since the last report
        names = MetricNames.of(plan.config)
        self.writer = DayMetricsWriter(tracker, plan.train_days, plan.run_name, names) if self.rank == 0 else None
        for step, metrics in sorted(self.day_metrics.items()) if self.writer is not None else []:
            self.writer.put(step, metrics)  # days a failure may have kept from the run; logged ones skipped
        self.live = LiveProgress(progress_sink) if self.rank == 0 and progress_sink is not None else None
        self.rows_seen = 0.0  # rows of every worker trained in this attempt (rank 0's times the world size)
        self.timeline.ready = time.time()

    def _restore(self, model: Cascade, checkpoint) -> LoopState:
        """Weights, optimizer, progress and the finished days' metrics from Ray Train's checkpoint to
        resume from, if any."""
        if checkpoint is None:
            return LoopState()
        with checkpoint.as_directory() as d:
            saved = read_checkpoint(d)
        model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.day_metrics = dict(saved.get("day_metrics", {}))
        state = LoopState(**saved["state"])
        log.info("rank %d resumed at day %d, batch %d (global step %d)", self.rank, state.day,
                 state.step_in_day, state.global_step)
        return state

    def collate_for(self, day: str, evaluation: bool = False) -> ArrowToTorch:
        """The collate of one day's data: id/label checks naming the day, in-batch negatives."""
        data = self.cfg.data
        source = f"day '{day}' ({Path(data.path) / f'day={day}'})"
        if evaluation:
            return ArrowToTorch(self.plan.groups, data.eval_sample_num, seed=1024 + self.rank,
                                vocab=self.plan.vocab, source=source)
        return ArrowToTorch(self.plan.groups, data.sample_num, seed=self.cfg.train.seed * 1000 + self.rank,
                            vocab=self.plan.vocab, source=source)

    def step(self, batch: CascadeBatch) -> dict[str, torch.Tensor]:
        with self.autocast:
            _, out = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        return {"loss": out.loss.detach(), **out.components}

    def report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        """Commit progress counters, then report (with a rank-0 checkpoint if asked) on every rank."""
        import ray.train

        tot = _all_reduce(self._pending, self.device)
        self.state.train_rows += tot["rows"]
        self.state.train_s += self._pending["busy_s"]
        self._pending = {"rows": 0.0, "busy_s": 0.0}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if checkpoint and self.rank == 0:  # complete on disk before Ray Train sees the directory
                write_checkpoint({"model": _unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                                  "state": asdict(self.state), "config": self.cfg.to_dict(), "vocab": self.plan.vocab,
                                  "days": list(self.plan.train_days), "day_metrics": self.day_metrics}, tmp,
                                 kept=f"under {self.plan.run_dir or self.plan.storage_path}",
                                 fail_after_bytes=self.hooks.full_disk_at(self.state.global_step))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "global_step": self.state.global_step}, checkpoint=ckpt)

    def _train_stream(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """The run's one training pipeline: ``(day index, collated batch)`` of this worker's share of every
        training day from the day in progress on (earlier days are read and dropped, never collated)."""
        import ray.train

        cfg, days, start = self.cfg, self.plan.train_days, self.state.day
        tables = ray.train.get_dataset_shard("train").iter_batches(batch_size=cfg.data.batch_size,
                                                                    batch_format="pyarrow")
        day_index = {d: i for i, d in enumerate(days)}
        batcher = DayBatcher(self.day_rows, cfg.data.batch_size, self.rank, self.world, cfg.data.shuffle_buffer,
                             cfg.train.seed)
        collate, collate_day = None, -1
        for day, table in batcher.batches(run for t in tables for run in split_by_day(t, day_index)):
            if day < start:
                continue
            if day != collate_day:  # a day's own collate: its checks name the day, its negatives restart
                collate, collate_day = self.collate_for(days[day]), day
            yield day, collate(table)

    def _day_batches(self, day_index: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of training day ``day_index`` from the run's pipeline (collated ahead in a thread);
        a failure there is a ShardError of the day in progress."""
        if self._stream is None:
            days = self.plan.train_days
            in_progress = lambda: days[min(self.state.day, len(days) - 1)]  # noqa: E731
            self._stream = read_shard(prefetched(self._train_stream()), in_progress)
        while True:
            if self._held is None:
                self._held = next(self._stream, None)
            if self._held is None or self._held[0] != day_index:
                return
            tensors, self._held = self._held[1], None
            yield tensors

    def train_day(self, day_index: int) -> dict[str, float]:
        """Train one day (from the checkpointed batch when resuming it); returns the day's metrics."""
        cfg, st, days = self.cfg, self.state, self.plan.train_days
        skip = st.step_in_day if day_index == st.day else 0
        st.day, st.step_in_day = day_index, skip
        rows, sums, clock = 0, {}, DayClock()
        for i, tensors in enumerate(self._day_batches(day_index)):
            if i < skip:  # trained before a failure; the checkpoint already holds its update
                clock.restart()
                continue
            clock.got_batch()
            self.timeline.stepping(day_index)
            self.hooks.pause(st.global_step, self.rank)
            _maybe_fail(self.plan, st, self.rank)
            batch = CascadeBatch.from_dict(tensors).to(self.device, non_blocking=True)
            for key, value in self.step(batch).items():  # stays on device: no per-step host sync
                sums[key] = sums.get(key, 0.0) + value
            rows += batch.size
            st.global_step += 1
            st.step_in_day = i + 1
            self._pending["rows"] += batch.size
            self._stepped(day_index, batch.size)
            every = cfg.train.checkpoint_every_steps
            if every > 0 and st.global_step % every == 0:
                self._pending["busy_s"] += clock.segment()
                self.report({"day": days[day_index], "mid_day": True}, checkpoint=True)
                clock.restart()  # the report and checkpoint are not training time
            clock.waiting()
        self._pending["busy_s"] += clock.segment()
        return self._day_metrics(rows, sums, clock)

    def _stepped(self, day_index: int, rows: int) -> None:
        """After a step: the timeline and the driver's live progress (rank 0)."""
        self.timeline.stepped(day_index)
        if self.live is not None:
            self.rows_seen += rows * self.world
            self.live.update(self.state.global_step, self.plan.train_days[day_index], self.rows_seen)

    def _day_metrics(self, rows: int, sums: dict[str, torch.Tensor], clock: DayClock) -> dict[str, float]:
        """Loss terms averaged over every worker's steps; throughput per worker and in total."""
        busy_s = max(clock.busy_s, 1e-9)
        local = {"rows": float(rows), "steps": float(clock.steps), "wait_s": clock.wait_s, "busy_s": busy_s,
                 **{k: float(v) for k, v in sums.items()}}
        tot = _all_reduce(local, self.device)
        n_steps = max(tot["steps"], 1.0)
        per_worker = _per_worker(rows / busy_s, self.rank, self.world, self.device)
        return {
            "train_loss": tot["loss"] / n_steps,
            **{k: tot[k] / n_steps for k in sums if k != "loss"},
            "samples_per_s": sum(per_worker),  # global: sum of the workers' steady-state rates
            **{f"samples_per_s_worker{r}": v for r, v in enumerate(per_worker)},
            "step_time_s": busy_s / max(clock.steps, 1),
            "data_wait_share": clock.wait_s / busy_s,
            "first_batch_s": clock.first_wait,
        }

    def evaluate_on(self, day_index: int | None) -> dict[str, float]:
        """Metrics of the current model on training day ``day_index``, or on the evaluation day (None)."""
        import ray.train

        plan = self.plan
        if day_index is None:
            name, day, collate = "eval", plan.eval_day, self.eval_collate
        else:
            day = plan.train_days[day_index]
            name, collate = f"train-{day}", self.collate_for(day, evaluation=True)
        return evaluate(self.model, ray.train.get_dataset_shard(name), collate, self.cfg.data.eval_batch_size,
                        self.device, day, self.cfg.objective.gt_k)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's worker function: ``config = {"plan": RunPlan, "tracker": Tracker, "day_rows": [rows of
    each training day to train], "progress": sink}`` (``progress``: optional, a queue with ``put_nowait``
    for rank 0's in-day progress, see :class:`LiveProgress`). Returns ``{"metrics": final evaluation and
    throughput, "timeline": the :class:`Timeline` as a dict}``; rank 0's value reaches the driver as
    ``Result.return_value``."""
    import ray.train

    timeline = Timeline()
    if not logging.getLogger().handlers:  # worker processes start without logging configured
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    plan: RunPlan = config["plan"]
    t = _Trainer(plan, config["tracker"], config["day_rows"], config.get("progress"), timeline)
    days = plan.train_days
    stream_final: dict[str, float] | None = None
    for day_index in range(t.state.day, len(days)):
        metrics = t.train_day(day_index)
        t.state.day, t.state.step_in_day = day_index + 1, 0
        if plan.config.train.streaming_eval:  # the model trained on days <= d, scored on the next day
            is_last = day_index + 1 == len(days)
            stream = t.evaluate_on(None if is_last else day_index + 1)
            metrics.update({f"stream_{k}": v for k, v in stream.items()})
            stream_final = stream if is_last else None
        t.day_metrics[day_index] = metrics
        if t.writer is not None:
            t.writer.put(day_index, metrics)
            log.info("day %d/%d %s: loss %.4f, %.0f samples/s, data wait %.1f%%", day_index + 1, len(days),
                     days[day_index], metrics["train_loss"], metrics["samples_per_s"],
                     100 * metrics["data_wait_share"])
        t.report({**metrics, "day": days[day_index]}, checkpoint=True)
        if t.writer is not None:  # after the day's checkpoint: a tracking failure loses no training
            t.writer.check()
    if t.writer is not None:  # every day logged before the driver logs the final metrics
        t.writer.flush()
    timeline.final_eval_start = time.time()
    final = stream_final or t.evaluate_on(None)
    timeline.final_eval_end = time.time()
    final = {**final, "samples_per_s": t.state.train_rows / max(t.state.train_s, 1e-9),
             "train_rows": t.state.train_rows, "global_steps": float(t.state.global_step),
             "world_size": float(t.world)}
    if t.live is not None:
        t.live.close()
    ray.train.report(final)
    timeline.returned = time.time()
    return {"metrics": final, "timeline": asdict(timeline)}
