"""Ray Tune sweeps over cascade configs: one Tune function trial per grid point, each one Ray Train run.

A sweep config is a YAML file::

    name: tau-sensitivity              # optional; default: the file's stem (or --name)
    base:                              # CascadeConfig overrides shared by every trial (nested or dotted keys)
      data: {path: data/demo, max_rows_per_day: 512}
      tracking: {experiment: tau-sensitivity}
    grid:                              # dotted config key -> list of values; the Cartesian product is swept
      objective.tau: [5, 50, 500]
      train.seed: [0, 1, 2]
    asha: {metric: train_loss, mode: min, max_t: 100, grace_period: 1}   # optional early stopping
    max_concurrent_trials: 2           # optional; default: derived from the cluster's CPUs

Everything is validated by building every grid point's config with ``load_config`` before Ray starts.
Each trial is a Tune function that reserves no CPU and calls ``run_training`` with a stable run name
``<sweep>-<trial id>``, the MLflow parent run's id as ``mlflow.parentRunId`` and ``TuneReportCallback``.
The Tune experiment and the trials' Ray Train runs live under ``train.storage_path/sweeps/<name>``;
``resume=True`` restores it there (finished trials are not run again, including one whose MLflow run
finished just before the kill although Tune had not saved it as terminated; unfinished ones continue
from their last Ray Train checkpoint). The parent MLflow run holds the sweep config as params, the best
trial (``best_joint_recall`` + ``best.*`` tags) and ``trials.csv``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cascadelab.platform.config import CascadeConfig, ConfigError, flatten, load_config

log = logging.getLogger(__name__)

TOP_KEYS = ("name", "description", "base", "grid", "asha", "max_concurrent_trials")
ASHA_KEYS = ("metric", "mode", "max_t", "grace_period", "reduction_factor")
# Reported once, at the end of a trial: ASHA would never see them before the trial is over.
FINAL_METRICS = ("joint_recall", "retrieval_recall", "retrieval_ndcg", "prerank_recall", "prerank_ndcg",
                 "ranking_recall", "ranking_ndcg", "train_rows", "global_steps", "wall_time_s")
SUMMARY_METRICS = ("joint_recall", "ranking_recall", "ranking_ndcg", "prerank_recall", "prerank_ndcg",
                   "retrieval_recall", "retrieval_ndcg", "samples_per_s", "wall_time_s")
SWEEP_TAG = "cascadelab.sweep"
SPEC_ARTIFACT = "sweep_spec.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass
class AshaSpec:
    """Early stopping. ``time_attr`` is Tune's ``training_iteration``: one per training day (plus one
    per mid-day checkpoint when ``train.checkpoint_every_steps`` > 0, plus the final evaluation)."""

    metric: str = "train_loss"  # must be reported every day: train_loss, stream_joint_recall, samples_per_s
    mode: str = "min"
    max_t: int = 100
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class SweepSpec:
    name: str
    source: str  # the YAML file (or "<stored>"), for error messages
    base: dict[str, Any]  # dotted config key -> value, applied to every trial
    grid: dict[str, list[Any]]  # dotted config key -> values (Cartesian product)
    asha: AshaSpec | None = None
    max_concurrent_trials: int | None = None
    configs: list[CascadeConfig] = field(default_factory=list, repr=False)  # one per grid point

    def points(self) -> list[dict[str, Any]]:
        return expand_grid(self.grid)

    def base_overrides(self) -> list[str]:
        return [override(k, v) for k, v in self.base.items()]

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
    """A value as one line of YAML that ``yaml.safe_load`` reads back unchanged (for ``key=value``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text  # scalars end with a document marker


def override(key: str, value: Any) -> str:
    return f"{key}={yaml_value(value)}"


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product, first key slowest: ``{a: [1, 2], b: [x, y]}`` -> (1,x), (1,y), (2,x), (2,y)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def trial_cpus(cfg: CascadeConfig) -> float:
    return cfg.train.num_workers * cfg.train.cpus_per_worker


def derive_max_concurrent(cluster_cpus: float, cpus_per_trial: float, num_trials: int) -> int:
    """Trials that fit at once: one CPU stays free for Ray Data's read tasks, the trial drivers take none.

    2 CPUs with one 0.5-CPU worker per trial -> 2; 2 CPUs with one 1-CPU worker -> 1; never below 1.
    """
    fit = math.floor((cluster_cpus - 1.0) / cpus_per_trial + 1e-9) if cpus_per_trial > 0 else num_trials
    return max(1, min(num_trials, fit))


def _flatten_base(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested and dotted keys alike -> ``{"data.path": ..., "stages": [...]}`` (lists stay whole)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flatten_base(value, full))
        else:
            out[full] = value
    return out


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set '{item}': expected key=value, e.g. --set data.path=/data/recflow")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


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
        spec.metric = raw["metric"]
        spec.mode = "min" if "loss" in spec.metric or spec.metric.endswith("_s") else "max"
    if "mode" in raw:
        if raw["mode"] not in ("min", "max"):
            raise _error(src, "asha.mode", f"expected min or max, got {raw['mode']!r}")
        spec.mode = raw["mode"]
    if spec.metric in FINAL_METRICS:
        raise _error(src, "asha.metric", f"'{spec.metric}' is only reported when a trial ends, so ASHA could "
                     "never stop one early; use a per-day metric such as train_loss, or stream_joint_recall "
                     "with train.streaming_eval: true")
    spec.max_t = _int(raw.get("max_t", spec.max_t), src, "asha.max_t", 1)
    spec.grace_period = _int(raw.get("grace_period", spec.grace_period), src, "asha.grace_period", 1)
    spec.reduction_factor = _int(raw.get("reduction_factor", spec.reduction_factor), src, "asha.reduction_factor", 2)
    if spec.grace_period > spec.max_t:
        raise _error(src, "asha.grace_period", f"{spec.grace_period} exceeds asha.max_t = {spec.max_t}")
    return spec


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


def parse_sweep(raw: Any, source: str = "<dict>", overrides: list[str] | None = None,
                name: str | None = None) -> SweepSpec:
    """Validate a sweep config mapping and build every grid point's CascadeConfig (raises ConfigError).

    ``overrides`` (``key=value``, e.g. from ``--set``) are applied on top of ``base``; ``name`` wins over
    the config's own ``name``.
    """
    src = source
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep config '{src}': expected a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise _error(src, unknown[0], f"unknown key; valid keys: {', '.join(TOP_KEYS)}")
    name = name or raw.get("name") or Path(source).stem
    if not isinstance(name, str) or not _NAME.match(name):
        raise _error(src, "name", f"{name!r} is not a valid sweep name (letters, digits, '.', '_', '-'; "
                     "it names a directory and MLflow runs)")
    base_raw = raw.get("base") or {}
    if not isinstance(base_raw, dict):
        raise _error(src, "base", "expected a mapping of config overrides, e.g. base: {data: {path: data/demo}}")
    base = {**_flatten_base(base_raw), **_parse_set(overrides or [])}
    grid = _check_grid(raw.get("grid"), src)
    mct = raw.get("max_concurrent_trials")
    if mct is not None:
        _int(mct, src, "max_concurrent_trials", 1)
    spec = SweepSpec(name=name, source=src, base=base, grid=grid, asha=_parse_asha(raw.get("asha"), src),
                     max_concurrent_trials=mct)
    # [1] base alone, then each grid value alone (errors name the grid key), then every full grid point
    base_ov = spec.base_overrides()
    try:
        load_config(None, base_ov)
    except ConfigError as exc:
        raise _error(src, "base", str(exc)) from None
    for key, values in grid.items():
        for value in values:
            try:
                load_config(None, [*base_ov, override(key, value)])
            except ConfigError as exc:
                raise _error(src, f"grid.{key}", f"value {yaml_value(value)}: {exc}") from None
    for point in spec.points():
        try:
            spec.configs.append(load_config(None, [*base_ov, *(override(k, v) for k, v in point.items())]))
        except ConfigError as exc:
            raise ConfigError(f"sweep config '{src}' grid point {_point_str(point)}: {exc}") from None
    if spec.asha and spec.asha.metric.startswith("stream_") and not all(c.train.streaming_eval for c in spec.configs):
        raise _error(src, "asha.metric", f"'{spec.asha.metric}' needs train.streaming_eval: true in base "
                     "(streaming metrics are only reported with it)")
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


# ----------------------------------------------------------------------------------------------------------
# the trial: a Tune function that launches one Ray Train run


def _absolute(path: str, cwd: str) -> str:
    return path if "://" in path or os.path.isabs(path) else os.path.normpath(os.path.join(cwd, path))


def trial_config(plan: dict[str, Any], point: dict[str, Any]) -> CascadeConfig:
    """The config of one trial: the sweep's resolved base, the grid point, paths made absolute.

    Tune runs trials with the working directory set to the trial's folder, so relative paths are
    resolved against the directory the sweep was started from.
    """
    cfg = load_config(None, [*plan["base"], *(override(k, point[k]) for k in plan["keys"])])
    cfg.data.path = _absolute(cfg.data.path, plan["cwd"])
    return cfg


def _drop_orphan_run(cfg: CascadeConfig, run_name: str) -> None:
    """A trial restarted before its Ray Train run wrote anything: delete the MLflow run it had opened,
    so that ``run_training`` opens a fresh one instead of leaving two runs for one trial."""
    from mlflow import MlflowClient

    storage = cfg.train.storage_path
    if "://" in storage or (Path(storage) / run_name).is_dir():
        return  # run_training resumes the run of that name (with its MLflow run)
    from cascadelab.platform.tracking import runs_named

    client = MlflowClient(cfg.tracking.uri)
    for run in runs_named(cfg.tracking.uri, cfg.tracking.experiment, run_name):
        log.warning("trial %s: deleting MLflow run %s left by an interrupted start", run_name, run.info.run_id)
        client.delete_run(run.info.run_id)


def _finished_run_metrics(cfg: CascadeConfig, run_name: str) -> dict[str, float] | None:
    """The final metrics of ``run_name`` when its MLflow run already FINISHED (with its final evaluation).

    A sweep killed after a trial's run finished but before Tune saved that trial as terminated restores
    the trial as unfinished; it must not train (and end its MLflow run) a second time."""
    from cascadelab.platform.tracking import runs_named

    runs = runs_named(cfg.tracking.uri, cfg.tracking.experiment, run_name)
    if len(runs) == 1 and runs[0].info.status == "FINISHED" and "joint_recall" in runs[0].data.metrics:
        return dict(runs[0].data.metrics)
    return None


def run_trial(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """Tune function trainable: build this grid point's config and train it with Ray Train."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cascadelab.platform.train.run import run_training

    trial_id = tune.get_context().get_trial_id()
    run_name = f"{plan['name']}-{trial_id}"  # no timestamp: a restarted trial finds its run again
    cfg = trial_config(plan, config)
    done = _finished_run_metrics(cfg, run_name)
    if done is not None:
        log.info("trial %s: MLflow run %s already finished; reporting its final metrics", trial_id, run_name)
        tune.report(done)
        return
    _drop_orphan_run(cfg, run_name)
    run_training(cfg, tags={"mlflow.parentRunId": plan["parent_run_id"], "cascadelab.trial_id": trial_id,
                            "cascadelab.sweep_trial": plan["name"]},
                 callbacks=[TuneReportCallback()], run_name=run_name)


# ----------------------------------------------------------------------------------------------------------
# the driver


def sweep_path(spec: SweepSpec) -> str:
    from cascadelab.platform.train.run import resolve_storage_path

    root = resolve_storage_path(spec.configs[0].train.storage_path).rstrip("/")
    return f"{root}/sweeps/{spec.name}"


def find_parent(uri: str, experiment: str, name: str):
    """The MLflow parent run of sweep ``name`` in ``experiment`` (newest if several), or None."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'",
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def preflight(spec: SweepSpec) -> None:
    """Check every distinct dataset and day plan before Ray starts (a missing day fails here, once)."""
    from cascadelab.platform.data.ingest import day_files
    from cascadelab.platform.data.schema import DatasetMeta, day_dir_files
    from cascadelab.platform.train.run import cascade_groups, plan_days

    seen = set()
    for cfg in spec.configs:
        key = (cfg.data.path, tuple(cfg.data.train_days or ()), cfg.data.eval_day, len(cfg.stages))
        if key in seen:
            continue
        seen.add(key)
        meta = DatasetMeta.read(cfg.data.path)
        train_days, eval_day = plan_days(meta, cfg)
        groups = cascade_groups(meta, len(cfg.stages))
        for day in [*train_days, eval_day]:
            if cfg.data.skip_bad_files:  # each trial validates the files and skips bad ones
                day_dir_files(cfg.data.path, day)
            else:
                day_files(cfg.data.path, day, meta.mode, groups)


def _progress_callback(name: str):
    """A Tune callback that logs one line per trial start and end (in place of Tune's status tables)."""
    from ray.tune import Callback

    class ProgressLog(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            log.info("sweep %s: trial %s started (%s)", name, trial.trial_id, _point_str(trial.config))

        def on_trial_complete(self, iteration, trials, trial, **info):
            score = (trial.last_result or {}).get("joint_recall")
            log.info("sweep %s: trial %s %s", name, trial.trial_id,
                     "stopped early" if score is None else f"finished, joint_recall {score:.4f}")

        def on_trial_error(self, iteration, trials, trial, **info):
            log.error("sweep %s: trial %s failed; see %s", name, trial.trial_id, trial.path)

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


def _trial_rows(grid, keys: list[str], runs: dict[str, tuple[str, str]], name: str) -> list[dict[str, Any]]:
    """One row per trial: id, status, grid values, final metrics, MLflow run (``runs``: name -> id, status)."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id", "")  # absent only for a trial that never reported
        run_id, run_status = runs.get(f"{name}-{trial_id}", ("", ""))
        rows.append({"trial_id": trial_id, "status": _status(result),
                     **{k: (result.config or {}).get(k) for k in keys},
                     **{m: metrics[m] for m in SUMMARY_METRICS if m in metrics},
                     "run_name": f"{name}-{trial_id}", "run_id": run_id, "mlflow_status": run_status})
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


def _children(uri: str, parent_run_id: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=50000)


def run_sweep(spec: SweepSpec, resume: bool = False) -> SweepResult:
    """Run (or with ``resume`` continue) a validated sweep on Ray; returns the per-trial table and the best.

    Raises ConfigError, before Ray starts, when ``resume`` finds no sweep of that name or when a new
    sweep's name is already taken (in MLflow or under the storage path).
    """
    from ray import tune

    from cascadelab.platform.tracking import end_run, reopen_run, resolve_tracking_uri

    uri = resolve_tracking_uri(spec.configs[0].tracking.uri)
    experiment = spec.configs[0].tracking.experiment
    path = sweep_path(spec)
    parent = find_parent(uri, experiment, spec.name)
    # [1] a new sweep or the continuation of one
    if resume:
        if parent is None:
            raise ConfigError(f"--resume: no sweep named '{spec.name}' in MLflow experiment '{experiment}' at {uri}")
        stored = _stored_plan(uri, parent.info.run_id)
        if stored["spec"] != json.loads(json.dumps(spec.to_dict())):
            log.warning("sweep %s: the config differs from the one the sweep started with; continuing with "
                        "the stored one", spec.name)
        spec = parse_sweep(stored["spec"], "<stored>", name=spec.name)
        plan, parent_id = stored["plan"], parent.info.run_id
        path = parent.data.tags.get("cascadelab.sweep_path", path)
    elif parent is not None or tune.Tuner.can_restore(path):
        raise ConfigError(f"sweep '{spec.name}' already exists ({path}); continue it with --resume or start "
                          "a new one with --name")
    # [2] Ray, the CPU budget, how many trials run at once
    mct = _start_ray(spec, path)
    # [3] the MLflow parent run (the trials' runs are its children)
    if resume:
        reopen_run(uri, parent_id)
    else:
        plan, parent_id = _open_parent(spec, uri, experiment, path)
    _set_tag(uri, parent_id, "cascadelab.max_concurrent_trials", str(mct))
    log.info("sweep %s: MLflow parent run %s in %s", spec.name, parent_id, uri)
    # [4] Tune: trial drivers that take no CPU (their Train workers do), the grid, optional ASHA
    if spec.asha:
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # the final report has no train_loss
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": 0, "memory": 1})
    try:
        if resume and tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space={k: tune.grid_search(v) for k, v in spec.grid.items()},
                               tune_config=_tune_config(spec, mct),
                               run_config=tune.RunConfig(name=spec.name, storage_path=path.rsplit("/", 1)[0],
                                                         verbose=0, callbacks=[_progress_callback(spec.name)]))
        grid = tuner.fit()
    except BaseException as exc:
        end_run(uri, parent_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    # [5] the trials table and the best trial, on the parent
    return _summarise(grid, spec, uri, parent_id, path)


def _start_ray(spec: SweepSpec, path: str) -> int:
    """Start or join Ray, check the CPU budget, return max_concurrent_trials (given or derived)."""
    from cascadelab.platform.runtime import ensure_ray
    from cascadelab.platform.train.run import check_cpu_budget

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


def _open_parent(spec: SweepSpec, uri: str, experiment: str, path: str) -> tuple[dict[str, Any], str]:
    """Create the parent run (params: the sweep config) and store the trials' plan on it for --resume."""
    from cascadelab.platform.tracking import log_text, start_run

    plan = {"name": spec.name, "cwd": os.getcwd(), "keys": list(spec.grid),
            "base": [*spec.base_overrides(), override("tracking.uri", uri),
                     override("train.storage_path", f"{path}/train")]}
    params = flatten({"base": spec.base, "grid": spec.grid, "asha": asdict(spec.asha) if spec.asha else None,
                      "max_concurrent_trials": spec.max_concurrent_trials})
    parent_id = start_run(uri, experiment, f"sweep-{spec.name}", {**params, "trials": len(spec.configs)},
                          tags={SWEEP_TAG: spec.name, "cascadelab.sweep_path": path})
    plan["parent_run_id"] = parent_id
    log_text(uri, parent_id, json.dumps({"spec": spec.to_dict(), "plan": plan}, indent=2), SPEC_ARTIFACT)
    return plan, parent_id


def _summarise(grid, spec: SweepSpec, uri: str, parent_id: str, path: str) -> SweepResult:
    from mlflow import MlflowClient

    from cascadelab.platform.tracking import end_run, log_metrics, log_text

    client = MlflowClient(uri)
    runs = {r.info.run_name: (r.info.run_id, r.info.status) for r in _children(uri, parent_id)}
    rows = _trial_rows(grid, list(spec.grid), runs, spec.name)
    for row in rows:  # stopped by ASHA: Tune ended the trial before (or while) its run could end
        if row["status"] == "STOPPED" and row["run_id"] and row["mlflow_status"] != "KILLED":
            client.set_terminated(row["run_id"], "KILLED")
            client.set_tag(row["run_id"], "cascadelab.stopped_early", "true")
            row["mlflow_status"] = "KILLED"
    finished = [r for r in rows if r["status"] == "FINISHED"]
    best = max(finished, key=lambda r: r["joint_recall"]) if finished else None
    errors = sum(r["status"] == "ERROR" for r in rows)
    log_text(uri, parent_id, _csv(rows), "trials.csv")
    log_metrics(uri, parent_id, {"trials_finished": len(finished), "trials_errored": errors})
    if best is not None:
        log_metrics(uri, parent_id, {f"best_{m}": best[m] for m in SUMMARY_METRICS if m in best})
        for key, value in {"best.trial_id": best["trial_id"], "best.run_id": best["run_id"],
                           **{f"best.{k}": yaml_value(best[k]) for k in spec.grid}}.items():
            client.set_tag(parent_id, key, value)
    incomplete = any(r["status"] in ("UNFINISHED", "NOT_STARTED") for r in rows)
    end_run(uri, parent_id, "FAILED" if errors else "KILLED" if incomplete else "FINISHED")
    return SweepResult(spec.name, path, parent_id, uri, rows, best, errors)


def start_local_ray() -> None:
    """The sweep driver's local cluster: ``runtime.start_local`` keeping ``RAY_API_SERVER_ADDRESS`` set
    (Ray Train's placement-group cleaner needs it to find this cluster's State API); no-op when Ray is
    up or ``RAY_ADDRESS`` names a cluster."""
    import ray

    from cascadelab.platform.runtime import start_local

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


def _set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(uri).set_tag(run_id, key, value)


def _stored_plan(uri: str, parent_run_id: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = MlflowClient(uri).download_artifacts(parent_run_id, SPEC_ARTIFACT, tmp)
        except Exception as exc:  # noqa: BLE001 - any store error means the same thing here
            raise ConfigError(f"--resume: the sweep's parent run {parent_run_id} has no {SPEC_ARTIFACT} "
                              f"({type(exc).__name__})") from None
        return json.loads(Path(local).read_text())
