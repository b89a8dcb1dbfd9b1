"""Ray Tune sweeps over cascade configs: one Tune function trial per grid point, each one Ray Train run.

A sweep config is a YAML file::

    name: tau-sensitivity              # optional; default: the file's stem (or --name)
    base:                              # CascadeConfig overrides shared by every trial (nested or dotted keys)
      data: {path: data/demo, max_rows_per_day: 512}
      tracking: {experiment: tau-sensitivity}
    grid:                              # dotted config key -> list of values; the Cartesian product is swept
      objective.tau: [5, 50, 500]
      train.seed: [0, 1, 2]
    asha: {metric: loss/total, mode: min, max_t: 100, grace_period: 1}   # optional early stopping
    max_concurrent_trials: 2           # optional; default: derived from the cluster's CPUs

Everything is validated by building every grid point's config with ``load_config`` before Ray starts.
Each trial is a Tune function that reserves no CPU and calls ``run_training`` with a stable run name
``<sweep>-<trial id>``, the MLflow parent run's id as ``mlflow.parentRunId`` and ``TuneReportCallback``.
The Tune experiment and the trials' Ray Train runs live under ``train.storage_path/sweeps/<name>``;
``resume=True`` restores it there (finished trials are not run again, including one whose MLflow run
finished just before the kill although Tune had not saved it as terminated; unfinished ones continue
from their last Ray Train checkpoint). One driver runs a sweep at a time: a second start or ``--resume``
while it runs is refused (:mod:`~cascadelab.platform.tune.lock`). The parent MLflow run holds the sweep
config as params, the best trial's final metrics (``best/joint_recall_at_10_20``, ... and ``best.*`` tags)
and ``trials.csv``.
Tune and the trials table use the loop's metric keys, which follow the stage list
(:func:`cascadelab.cascade.metrics.metric_names`); ``asha.metric`` takes a key (``train_loss``) or its
MLflow name (``loss/total``; :mod:`cascadelab.platform.metric_names`). ray and mlflow are imported
lazily (inside functions).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cascadelab.cascade.metrics import metric_names, stage_names
from cascadelab.platform.cluster.storage import uri_scheme
from cascadelab.platform.config import CascadeConfig, ConfigError, flatten, load_config, parse_override, unflatten
from cascadelab.platform.metric_names import RUN_RATE, MetricNames, final_report, internal_name
from cascadelab.platform.runtime import ensure_ray, start_local
from cascadelab.platform.tracking import Tracker, resolve_tracking_uri, runs_named, search_runs
from cascadelab.platform.train.plan import (
    check_cpu_budget,
    known_cpus,
    local_dir,
    plan_run,
    resolve_storage_path,
)
from cascadelab.platform.tune.lock import sweep_lock

log = logging.getLogger(__name__)

TOP_KEYS = ("name", "description", "base", "grid", "asha", "max_concurrent_trials")
ASHA_KEYS = ("metric", "mode", "max_t", "grace_period", "reduction_factor")
# Besides the evaluation metrics, reported once at the end of a trial (ASHA never sees them before).
FINAL_EXTRA = ("train_rows", "global_steps", "wall_time_s")
SUMMARY_EXTRA = ("samples_per_s", "wall_time_s")  # in the trials table beside the evaluation metrics
SWEEP_TAG = "cascadelab.sweep"
SPEC_ARTIFACT = "sweep_spec.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def summary_metrics(num_stages: int, ndcg: bool = True) -> list[str]:
    """Evaluation keys in table order: joint recall, then each stage's from the last (the one that ranks)
    back to retrieval. ``2 -> joint_recall, ranking_recall, ranking_ndcg, retrieval_recall, retrieval_ndcg``."""
    stages = stage_names(num_stages)
    keys = metric_names(num_stages, ndcg)
    return [keys[0], *sorted(keys[1:], key=lambda k: -stages.index(k.rsplit("_", 1)[0]))]


@dataclass
class AshaSpec:
    """Early stopping. ``time_attr`` is Tune's ``training_iteration``: one per training day (plus one
    per mid-day checkpoint when ``train.checkpoint_every_steps`` > 0, plus the final evaluation)."""

    metric: str = "train_loss"  # reported every day: train_loss, stream_joint_recall, samples_per_s (the keys)
    mode: str = "min"
    max_t: int = 100
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class SweepSpec:
    name: str
    source: str  # the YAML file (or "<stored>"), for error messages
    base: dict[str, Any]  # nested config overrides applied to every trial
    grid: dict[str, list[Any]]  # dotted config key -> values (Cartesian product)
    asha: AshaSpec | None = None
    max_concurrent_trials: int | None = None
    configs: list[CascadeConfig] = field(default_factory=list, repr=False)  # one per grid point

    def points(self) -> list[dict[str, Any]]:
        return expand_grid(self.grid)

    def metric_names(self, ndcg: bool = True) -> list[str]:
        """The evaluation keys of every trial's cascade (trials may differ in their number of stages)."""
        names: dict[str, None] = {}
        for n in sorted({len(c.stages) for c in self.configs}):
            names.update(dict.fromkeys(summary_metrics(n, ndcg)))
        return list(names)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "grid": self.grid,
                "asha": asdict(self.asha) if self.asha else None,
                "max_concurrent_trials": self.max_concurrent_trials}


@dataclass
class SweepResult:
    name: str
    path: str
    parent_run_id: str
    tracking_uri: str
    trials: list[dict[str, Any]]  # one row per trial: trial_id, status, grid values, final metrics, run_id
    best: dict[str, Any] | None
    errors: int


# ----------------------------------------------------------------------------------------------------------
# config parsing and validation (no Ray)


def yaml_value(value: Any) -> str:
    """A value as one line of YAML that ``yaml.safe_load`` reads back unchanged (messages, MLflow tags)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text  # scalars end with a document marker


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product, first key slowest: ``{a: [1, 2], b: [x, y]}`` -> (1,x), (1,y), (2,x), (2,y)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def layered(*layers: dict[str, Any]) -> dict[str, Any]:
    """Nested override mappings merged in order: a later value wins, mappings merge key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = layered(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def nested(mapping: dict[str, Any]) -> dict[str, Any]:
    """Dotted and nested keys alike as one nested mapping: ``{"train.lr": 1, "data": {"path": "x"}}`` ->
    ``{"train": {"lr": 1}, "data": {"path": "x"}}`` (lists, such as ``stages``, stay whole)."""
    return layered(*(unflatten({str(k): nested(v) if isinstance(v, dict) else v}) for k, v in mapping.items()))


def set_overrides(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` items as a nested mapping (``config.parse_override`` reads each one)."""
    layers = []
    for item in items:
        try:
            layers.append(unflatten(dict([parse_override(item)])))
        except ConfigError:
            raise ConfigError(f"--set '{item}': expected key=value, e.g. --set data.path=/data/recflow") from None
    return layered(*layers)


def trial_cpus(cfg: CascadeConfig) -> float:
    return cfg.train.num_workers * cfg.train.cpus_per_worker


def derive_max_concurrent(cluster_cpus: float, cpus_per_trial: float, num_trials: int) -> int:
    """Trials that fit at once: one CPU stays free for Ray Data's read tasks, the trial drivers take none.

    2 CPUs with one 0.5-CPU worker per trial -> 2; 2 CPUs with one 1-CPU worker -> 1; never below 1.
    """
    fit = math.floor((cluster_cpus - 1.0) / cpus_per_trial + 1e-9) if cpus_per_trial > 0 else num_trials
    return max(1, min(num_trials, fit))


def _error(src: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"sweep config '{src}' key '{key}': {message}")


def _int(value: Any, src: str, key: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _error(src, key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _parse_asha(raw: Any, src: str) -> AshaSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _error(src, "asha", f"expected a mapping with keys {', '.join(ASHA_KEYS)}")
    unknown = [k for k in raw if k not in ASHA_KEYS]
    if unknown:
        raise _error(src, f"asha.{unknown[0]}", f"unknown key; valid keys under 'asha': {', '.join(ASHA_KEYS)}")
    spec = AshaSpec()
    if "metric" in raw:
        if not isinstance(raw["metric"], str) or not raw["metric"]:
            raise _error(src, "asha.metric", f"expected a metric name, got {raw['metric']!r}")
        spec.metric = raw["metric"]  # a key or an MLflow name; _check_asha_metric makes it the key
        spec.mode = default_mode(spec.metric)
    if "mode" in raw:
        if raw["mode"] not in ("min", "max"):
            raise _error(src, "asha.mode", f"expected min or max, got {raw['mode']!r}")
        spec.mode = raw["mode"]
    spec.max_t = _int(raw.get("max_t", spec.max_t), src, "asha.max_t", 1)
    spec.grace_period = _int(raw.get("grace_period", spec.grace_period), src, "asha.grace_period", 1)
    spec.reduction_factor = _int(raw.get("reduction_factor", spec.reduction_factor), src, "asha.reduction_factor", 2)
    if spec.grace_period > spec.max_t:
        raise _error(src, "asha.grace_period", f"{spec.grace_period} exceeds asha.max_t = {spec.max_t}")
    return spec


def default_mode(metric: str) -> str:
    """ASHA's mode for a metric key or MLflow name: ``min`` for losses (``train_loss``, ``loss/...``) and
    times (``..._s``), ``max`` otherwise (recall, rates such as ``samples_per_s``)."""
    key = internal_name(metric)
    return "min" if "loss" in metric or (key.endswith("_s") and not key.endswith("_per_s")) else "max"


def _check_asha_metric(spec: SweepSpec) -> None:
    """ASHA's metric must be reported every day by every trial's cascade; an MLflow name must be the one
    every trial logs (its cut-offs), and becomes the key Tune sees."""
    if spec.asha is None:
        return
    metric, src = spec.asha.metric, spec.source
    key = internal_name(metric)
    if key in {*spec.metric_names(), *FINAL_EXTRA, RUN_RATE}:
        raise _error(src, "asha.metric", f"'{metric}' is only reported when a trial ends, so ASHA could "
                     "never stop one early; use a per-day metric such as train_loss, or stream_joint_recall "
                     "with train.streaming_eval: true")
    if key != metric:
        logged = sorted({MetricNames.of(c).day_name(key) for c in spec.configs})
        if logged != [metric]:
            raise _error(src, "asha.metric", f"the trials log '{key}' as {' and '.join(map(repr, logged))}, "
                         f"not '{metric}'")
    if key.startswith("stream_") and not all(c.train.streaming_eval for c in spec.configs):
        raise _error(src, "asha.metric", f"'{metric}' needs train.streaming_eval: true in base "
                     "(streaming metrics are only reported with it)")
    spec.asha.metric = key


def _check_grid(grid: Any, src: str) -> dict[str, list[Any]]:
    if not isinstance(grid, dict) or not grid:
        raise _error(src, "grid", "expected a non-empty mapping of dotted config keys to lists of values, "
                     "e.g. grid: {objective.tau: [50, 500]}")
    for key, values in grid.items():
        if not isinstance(key, str) or not key:
            raise _error(src, "grid", f"expected dotted config keys, got {key!r}")
        if key.startswith("tracking.") or key == "train.storage_path":
            raise _error(src, f"grid.{key}", "tracking and storage are the same for every trial of a sweep; "
                         "set them under 'base'")
        if not isinstance(values, list) or not values:
            raise _error(src, f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
        seen = [yaml_value(v) for v in values]
        dup = next((v for i, v in enumerate(seen) if v in seen[:i]), None)
        if dup is not None:
            raise _error(src, f"grid.{key}", f"value {dup} is listed twice")
    return dict(grid)


def _check_top(raw: Any, src: str, name: str | None) -> str:
    """The top level's keys; returns the sweep's name (``name`` wins over the config's, then the stem)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep config '{src}': expected a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise _error(src, unknown[0], f"unknown key; valid keys: {', '.join(TOP_KEYS)}")
    name = name or raw.get("name") or Path(src).stem
    if not isinstance(name, str) or not _NAME.match(name):
        raise _error(src, "name", f"{name!r} is not a valid sweep name (letters, digits, '.', '_', '-'; "
                     "it names a directory and MLflow runs)")
    if raw.get("max_concurrent_trials") is not None:
        _int(raw["max_concurrent_trials"], src, "max_concurrent_trials", 1)
    return name


def _grid_configs(spec: SweepSpec) -> list[CascadeConfig]:
    """Base alone, then each grid value alone (errors name the grid key), then every full grid point."""
    src = spec.source
    try:
        load_config(None, spec.base)
    except ConfigError as exc:
        raise _error(src, "base", str(exc)) from None
    for key, values in spec.grid.items():
        for value in values:
            try:
                load_config(None, layered(spec.base, unflatten({key: value})))
            except ConfigError as exc:
                raise _error(src, f"grid.{key}", f"value {yaml_value(value)}: {exc}") from None
    configs = []
    for point in spec.points():
        try:
            configs.append(load_config(None, layered(spec.base, unflatten(point))))
        except ConfigError as exc:
            raise ConfigError(f"sweep config '{src}' grid point {_point_str(point)}: {exc}") from None
    return configs


def parse_sweep(raw: Any, source: str = "<dict>", overrides: list[str] | None = None,
                name: str | None = None) -> SweepSpec:
    """Validate a sweep config mapping and build every grid point's CascadeConfig (raises ConfigError).

    ``overrides`` (``key=value``, e.g. from ``--set``) are applied on top of ``base``; ``name`` wins over
    the config's own ``name``.
    """
    name = _check_top(raw, source, name)
    base_raw = raw.get("base") or {}
    if not isinstance(base_raw, dict):
        raise _error(source, "base", "expected a mapping of config overrides, e.g. base: {data: {path: data/demo}}")
    spec = SweepSpec(name=name, source=source, base=layered(nested(base_raw), set_overrides(overrides or [])),
                     grid=_check_grid(raw.get("grid"), source), asha=_parse_asha(raw.get("asha"), source),
                     max_concurrent_trials=raw.get("max_concurrent_trials"))
    spec.configs = _grid_configs(spec)
    _check_asha_metric(spec)
    return spec


def load_sweep(path: str | Path, overrides: list[str] | None = None, name: str | None = None) -> SweepSpec:
    """Read and validate a sweep config YAML file (no Ray is started or imported)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep config '{p}' does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep config '{p}': not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_sweep(raw, str(p), overrides, name)


def _point_str(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={yaml_value(v)}" for k, v in point.items())


def preflight(spec: SweepSpec) -> None:
    """Plan every distinct trial before Ray starts: a missing day, a stage that keeps more candidates than
    the data has, or workers that leave Ray Data no CPU fail here, once, in one line."""
    cpus = known_cpus()
    if cpus is not None:
        check_cpu_budget(max(spec.configs, key=trial_cpus), cpus)
    seen = set()
    for point, cfg in zip(spec.points(), spec.configs, strict=True):
        key = json.dumps([asdict(cfg.data), [asdict(s) for s in cfg.stages]], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            plan_run(cfg)
        except ConfigError as exc:
            raise ConfigError(f"sweep config '{spec.source}' grid point {_point_str(point)}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# the trial: a Tune function that launches one Ray Train run


def _absolute(path: str, cwd: str) -> str:
    return path if uri_scheme(path) or os.path.isabs(path) else os.path.normpath(os.path.join(cwd, path))


def trial_config(plan: dict[str, Any], point: dict[str, Any]) -> CascadeConfig:
    """The config of one trial: the sweep's resolved base, the grid point, paths made absolute.

    Tune runs trials with the working directory set to the trial's folder, so relative paths are
    resolved against the directory the sweep was started from. ``plan["base"]`` is a nested mapping
    (a list of ``key=value`` strings in sweeps stored before it was one).
    """
    base = plan["base"]
    if isinstance(base, list):
        base = layered(*(unflatten(dict([parse_override(item)])) for item in base))
    cfg = load_config(None, layered(base, unflatten({k: point[k] for k in plan["keys"]})))
    cfg.data.path = _absolute(cfg.data.path, plan["cwd"])
    return cfg


def _drop_orphan_run(cfg: CascadeConfig, run_name: str) -> None:
    """A trial restarted before its Ray Train run wrote anything: delete the MLflow run it had opened,
    so that ``run_training`` opens a fresh one instead of leaving two runs for one trial."""
    local = local_dir(resolve_storage_path(cfg.train.storage_path))
    if local is None or (local / run_name).is_dir():
        return  # run_training resumes the run of that name (with its MLflow run)
    for run in runs_named(cfg.tracking.uri, cfg.tracking.experiment, run_name):
        log.warning("trial %s: deleting MLflow run %s left by an interrupted start", run_name, run.info.run_id)
        Tracker(cfg.tracking.uri, run.info.run_id).delete()


def _finished_run_metrics(cfg: CascadeConfig, run_name: str) -> dict[str, float] | None:
    """The final metrics of ``run_name`` when its MLflow run already FINISHED (with its final evaluation).

    A sweep killed after a trial's run finished but before Tune saved that trial as terminated restores
    the trial as unfinished; it must not train (and end its MLflow run) a second time."""
    runs = runs_named(cfg.tracking.uri, cfg.tracking.experiment, run_name)
    if len(runs) != 1 or runs[0].info.status != "FINISHED":
        return None
    report = final_report(runs[0].data.metrics)  # the keys Tune saw, from MLflow names or old ones
    return report if "joint_recall" in report else None


_UNSAFE = re.compile(r"[^A-Za-z0-9_.=,+-]+")


def trial_run_name(plan: dict[str, Any], cfg: CascadeConfig, point: dict[str, Any], trial_id: str) -> str:
    """The name of a trial's run (MLflow and Ray Train), stable across restarts of the trial: what
    differs, then the trial id (unique across sweeps), e.g. ``dftopk-tau=5-seed=0-1a2b3_00004``
    (each grid key by its last part). Sweeps stored before names said what differs keep
    ``<sweep>-<trial id>``."""
    if plan.get("run_names") != "point":
        return f"{plan['name']}-{trial_id}"
    parts = [f"{k.rsplit('.', 1)[-1]}={yaml_value(point[k])}" for k in plan["keys"] if k != "objective.name"]
    text = _UNSAFE.sub("", "-".join([cfg.objective.name, *parts]))[:80]
    return f"{text}-{trial_id}"


def run_trial(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """Tune function trainable: build this grid point's config and train it with Ray Train."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cascadelab.platform.train.run import run_training  # lazily, as Ray: the worker loop imports Ray Data

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(plan, config)
    run_name = trial_run_name(plan, cfg, config, trial_id)  # no timestamp: a restarted trial finds its run again
    done = _finished_run_metrics(cfg, run_name)
    if done is not None:
        log.info("trial %s: MLflow run %s already finished; reporting its final metrics", trial_id, run_name)
        tune.report(done)
        return
    _drop_orphan_run(cfg, run_name)
    run_training(cfg, tags={"mlflow.parentRunId": plan["parent_run_id"], "cascadelab.trial_id": trial_id,
                            "cascadelab.sweep_trial": plan["name"]},
                 callbacks=[TuneReportCallback()], run_name=run_name, progress=False)


# ----------------------------------------------------------------------------------------------------------
# the driver


def sweep_path(spec: SweepSpec) -> str:
    root = resolve_storage_path(spec.configs[0].train.storage_path).rstrip("/")
    return f"{root}/sweeps/{spec.name}"


def find_parent(uri: str, experiment: str, name: str):
    """The MLflow parent run of sweep ``name`` in ``experiment`` (newest if several), or None."""
    runs = search_runs(uri, experiment, f"tags.`{SWEEP_TAG}` = '{name}'", order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def run_sweep(spec: SweepSpec, resume: bool = False) -> SweepResult:
    """Run (or with ``resume`` continue) a validated sweep on Ray; returns the per-trial table and the best.

    Raises ConfigError, before Ray starts, when ``resume`` finds no sweep of that name, when a new
    sweep's name is already taken (in MLflow or under the storage path) or when another driver is
    running the sweep (:func:`~cascadelab.platform.tune.lock.sweep_lock`, local storage).
    """
    path = sweep_path(spec)
    held = contextlib.nullcontext() if uri_scheme(path) else sweep_lock(Path(path).parent, spec.name)
    with held:
        return _run_sweep(spec, resume)


def _run_sweep(spec: SweepSpec, resume: bool) -> SweepResult:
    uri = resolve_tracking_uri(spec.configs[0].tracking.uri)
    experiment = spec.configs[0].tracking.experiment
    # [1] a new sweep or the continuation of one
    if resume:
        spec, plan, parent, path = _resumed(spec, uri, experiment)
    else:
        path = _check_new(spec, uri, experiment)
    # [2] Ray, the CPU budget, how many trials run at once
    mct = _start_ray(spec, path)
    # [3] the MLflow parent run (the trials' runs are its children)
    if resume:
        parent.reopen()
    else:
        plan, parent = _open_parent(spec, uri, experiment, path)
    parent.set_tags({"cascadelab.max_concurrent_trials": str(mct)})
    log.info("sweep %s: MLflow parent run %s in %s", spec.name, parent.run_id, uri)
    # [4] Tune: trial drivers that take no CPU (their Train workers do), the grid, optional ASHA
    try:
        grid = _tuner(spec, plan, path, mct, resume).fit()
    except BaseException as exc:
        parent.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    # [5] the trials table and the best trial, on the parent
    return _summarise(grid, spec, parent, path)


def _check_new(spec: SweepSpec, uri: str, experiment: str) -> str:
    """The new sweep's directory, after checking that its name is not taken."""
    from ray import tune

    path = sweep_path(spec)
    if find_parent(uri, experiment, spec.name) is not None or tune.Tuner.can_restore(path):
        raise ConfigError(f"sweep '{spec.name}' already exists ({path}); continue it with --resume or start "
                          "a new one with --name")
    return path


def _resumed(spec: SweepSpec, uri: str, experiment: str) -> tuple[SweepSpec, dict[str, Any], Tracker, str]:
    """The stored sweep of ``spec.name``: its spec, its trials' plan, its parent run and its directory."""
    parent = find_parent(uri, experiment, spec.name)
    if parent is None:
        raise ConfigError(f"--resume: no sweep named '{spec.name}' in MLflow experiment '{experiment}' at {uri}")
    tracker = Tracker(uri, parent.info.run_id)
    stored = _stored_plan(tracker)
    resumed = parse_sweep(stored["spec"], "<stored>", name=spec.name)
    if json.loads(json.dumps(resumed.to_dict())) != json.loads(json.dumps(spec.to_dict())):
        log.warning("sweep %s: the config differs from the one the sweep started with; continuing with "
                    "the stored one", spec.name)
    return resumed, stored["plan"], tracker, parent.data.tags.get("cascadelab.sweep_path", sweep_path(spec))


def _tuner(spec: SweepSpec, plan: dict[str, Any], path: str, mct: int, resume: bool):
    """The Tuner of the grid (restored from ``path`` when resuming a sweep Tune saved)."""
    from ray import tune

    if spec.asha:
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # the final report has no train_loss
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": 0, "memory": 1})
    if resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(trainable, param_space={k: tune.grid_search(v) for k, v in spec.grid.items()},
                      tune_config=_tune_config(spec, mct),
                      run_config=tune.RunConfig(name=spec.name, storage_path=path.rsplit("/", 1)[0],
                                                verbose=0,
                                                callbacks=[_progress_callback(spec.name, len(spec.configs))]))


def _progress_callback(name: str, total: int):
    """A Tune callback that logs one line per trial end, ``n/N trials done, ETA`` (in place of Tune's
    status tables; the ETA is the mean time per ended trial times the trials left)."""
    from ray.tune import Callback

    class ProgressLog(Callback):
        def __init__(self):
            self.t0, self.done = time.perf_counter(), 0

        def on_trial_start(self, iteration, trials, trial, **info):
            log.debug("sweep %s: trial %s started (%s)", name, trial.trial_id, _point_str(trial.config))

        def _ended(self, trial, how: str) -> None:
            self.done += 1
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / self.done * (total - self.done)
            log.info("sweep %s: %d/%d trials done, ETA %s (trial %s %s)", name, self.done, total,
                     time.strftime("%H:%M:%S", time.gmtime(eta)), trial.trial_id, how)

        def on_trial_complete(self, iteration, trials, trial, **info):
            score = (trial.last_result or {}).get("joint_recall")
            self._ended(trial, "stopped early" if score is None else f"finished, joint_recall {score:.4f}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, f"failed; see {trial.path}")

    return ProgressLog()


def _status(result) -> str:
    """FINISHED once the trial's final evaluation was reported (only the last report carries
    ``joint_recall``). Tune's ``done`` flag is not relied on for that: a trial restored by ``--resume``
    can finish without it."""
    metrics = result.metrics or {}
    if result.error is not None:
        return "ERROR"
    if "joint_recall" in metrics:
        return "FINISHED"
    if metrics.get("done"):
        return "STOPPED"  # ended early by ASHA
    return "UNFINISHED" if metrics else "NOT_STARTED"


def _trial_rows(grid, keys: list[str], runs: dict[str, tuple[str, str, str]],
                metrics_shown: list[str]) -> list[dict[str, Any]]:
    """One row per trial: id, status, grid values, the final ``metrics_shown``, MLflow run (``runs``:
    trial id -> run name, id, status)."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id", "")  # absent only for a trial that never reported
        run_name, run_id, run_status = runs.get(trial_id, ("", "", ""))
        rows.append({"trial_id": trial_id, "status": _status(result),
                     **{k: (result.config or {}).get(k) for k in keys},
                     **{m: metrics[m] for m in metrics_shown if m in metrics},
                     "run_name": run_name, "run_id": run_id, "mlflow_status": run_status})
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _start_ray(spec: SweepSpec, path: str) -> int:
    """Start or join Ray, check the CPU budget, return max_concurrent_trials (given or derived)."""
    start_local_ray()
    ensure_ray()
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    heaviest = max(spec.configs, key=trial_cpus)
    check_cpu_budget(heaviest, cpus)
    mct = spec.max_concurrent_trials or derive_max_concurrent(cpus, trial_cpus(heaviest), len(spec.configs))
    log.info("sweep %s: %d trials, %g CPU each, up to %d at once on %g CPUs; storage %s", spec.name,
             len(spec.configs), trial_cpus(heaviest), mct, cpus, path)
    return mct


def _open_parent(spec: SweepSpec, uri: str, experiment: str, path: str) -> tuple[dict[str, Any], Tracker]:
    """Create the parent run (params: the sweep config) and store the trials' plan on it for --resume."""
    plan = {"name": spec.name, "cwd": os.getcwd(), "keys": list(spec.grid), "run_names": "point",
            "base": layered(spec.base, {"tracking": {"uri": uri}, "train": {"storage_path": f"{path}/train"}})}
    params = flatten({"base": spec.base, "grid": spec.grid, "asha": asdict(spec.asha) if spec.asha else None,
                      "max_concurrent_trials": spec.max_concurrent_trials})
    parent = Tracker.start(uri, experiment, f"sweep-{spec.name}", {**params, "trials": len(spec.configs)},
                           tags={SWEEP_TAG: spec.name, "cascadelab.sweep_path": path})
    plan["parent_run_id"] = parent.run_id
    parent.log_text(json.dumps({"spec": spec.to_dict(), "plan": plan}, indent=2), SPEC_ARTIFACT)
    return plan, parent


def _summarise(grid, spec: SweepSpec, parent: Tracker, path: str) -> SweepResult:
    shown = [*spec.metric_names(), *SUMMARY_EXTRA]
    runs = {r.data.tags.get("cascadelab.trial_id", ""): (r.info.run_name, r.info.run_id, r.info.status)
            for r in parent.children()}
    rows = _trial_rows(grid, list(spec.grid), runs, shown)
    for row in rows:  # stopped by ASHA: Tune ended the trial before (or while) its run could end
        if row["status"] == "STOPPED" and row["run_id"] and row["mlflow_status"] != "KILLED":
            child = Tracker(parent.uri, row["run_id"])
            child.close("KILLED")
            child.set_tags({"cascadelab.stopped_early": "true"})
            row["mlflow_status"] = "KILLED"
    finished = [r for r in rows if r["status"] == "FINISHED"]
    best = max(finished, key=lambda r: r["joint_recall"]) if finished else None
    errors = sum(r["status"] == "ERROR" for r in rows)
    parent.log_text(_csv(rows), "trials.csv")
    parent.log_dict({"trials_finished": len(finished), "trials_errored": errors})
    if best is not None:
        names = MetricNames.of(_config_of(spec, best))
        parent.log_dict({names.summary_name(m, "best"): best[m] for m in shown if m in best})
        parent.set_tags({"best.trial_id": best["trial_id"], "best.run_id": best["run_id"],
                         **{f"best.{k}": yaml_value(best[k]) for k in spec.grid}})
    incomplete = any(r["status"] in ("UNFINISHED", "NOT_STARTED") for r in rows)
    parent.close("FAILED" if errors else "KILLED" if incomplete else "FINISHED")
    return SweepResult(spec.name, path, parent.run_id, parent.uri, rows, best, errors)


def _config_of(spec: SweepSpec, row: dict[str, Any]) -> CascadeConfig:
    """The config of the grid point in trials-table ``row`` (its grid values)."""
    for point, cfg in zip(spec.points(), spec.configs, strict=True):
        if all(yaml_value(point[k]) == yaml_value(row.get(k)) for k in spec.grid):
            return cfg
    return spec.configs[0]


def start_local_ray() -> None:
    """The sweep driver's local cluster: ``runtime.start_local`` keeping ``RAY_API_SERVER_ADDRESS`` set
    (Ray Train's placement-group cleaner needs it to find this cluster's State API); no-op when Ray is
    up or ``RAY_ADDRESS`` names a cluster."""
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS"):
        return
    start_local(keep_env=True)


def _tune_config(spec: SweepSpec, mct: int):
    from ray import tune

    scheduler = None
    if spec.asha:
        from ray.tune.schedulers import ASHAScheduler

        a = spec.asha
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=a.metric, mode=a.mode, max_t=a.max_t,
                                  grace_period=a.grace_period, reduction_factor=a.reduction_factor)
    return tune.TuneConfig(num_samples=1, max_concurrent_trials=mct, scheduler=scheduler, reuse_actors=False)


def _stored_plan(parent: Tracker) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = parent.download(SPEC_ARTIFACT, tmp)
        except Exception as exc:  # noqa: BLE001 - any store error means the same thing here
            raise ConfigError(f"--resume: the sweep's parent run {parent.run_id} has no {SPEC_ARTIFACT} "
                              f"({type(exc).__name__})") from None
        return json.loads(local.read_text())
