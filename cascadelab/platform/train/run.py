"""Driver side of a training run: validate inputs, open the MLflow run, fit a TorchTrainer, log results."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from cascadelab.platform.config import CascadeConfig, ConfigError, flatten
from cascadelab.platform.data.ingest import day_files, read_day
from cascadelab.platform.data.schema import DataError, DatasetMeta, groups_for
from cascadelab.platform.runtime import decide_use_gpu, ensure_ray
from cascadelab.platform.tracking import (
    end_run,
    log_artifacts,
    log_metrics,
    log_text,
    resolve_tracking_uri,
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


def run_training(cfg: CascadeConfig) -> TrainResult:
    """Train ``cfg`` on Ray (the local embedded cluster unless RAY_ADDRESS is set), tracked in MLflow."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    meta = DatasetMeta.read(cfg.data.path)
    train_days, eval_day = plan_days(meta, cfg)
    groups = cascade_groups(meta, len(cfg.stages))
    for day in [*train_days, eval_day]:  # fail before any Ray work, naming the file and column
        day_files(cfg.data.path, day, meta.mode, groups)

    ensure_ray()
    use_gpu = decide_use_gpu(cfg.train.use_gpu)
    run_name = unique_run_name(cfg.tracking.run_name or cfg.objective.name)
    uri = resolve_tracking_uri(cfg.tracking.uri)
    cfg.tracking.uri = uri
    cfg.tracking.run_name = run_name
    resolved = cfg.to_dict()
    run_id = start_run(uri, cfg.tracking.experiment, run_name, flatten(resolved),
                       tags={"cascadelab.objective": cfg.objective.name,
                             "cascadelab.stages": "->".join(f"{s.model}@{s.k}" for s in cfg.stages),
                             "cascadelab.dataset": str(Path(cfg.data.path).resolve())})
    log_text(uri, run_id, yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
    log.info("MLflow run %s (%s) in %s", run_name, run_id, uri)

    datasets = {f"train-{d}": read_day(cfg.data.path, d, meta, groups, cfg.data.max_rows_per_day)
                for d in train_days}
    datasets["eval"] = read_day(cfg.data.path, eval_day, meta, groups, cfg.data.max_rows_per_day)
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    threads = max(1, (os.cpu_count() or 1) // cfg.train.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": resolved, "train_days": train_days, "groups": list(groups), "vocab": meta.vocab,
            "tracking_uri": uri, "run_id": run_id, "torch_threads": threads,
            "rows_per_day": meta.rows_per_day, "progress": sys.stderr.isatty(),
        },
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        datasets=datasets,
        run_config=RunConfig(name=run_name, storage_path=resolve_storage_path(cfg.train.storage_path),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep)),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except BaseException:
        end_run(uri, run_id, "FAILED")
        raise
    wall = time.perf_counter() - t0
    metrics = dict(result.return_value or {})
    metrics["wall_time_s"] = wall
    log_metrics(uri, run_id, metrics, step=len(train_days))
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt_path and "://" not in resolve_storage_path(cfg.train.storage_path):
        log_artifacts(uri, run_id, ckpt_path, "checkpoint")
    end_run(uri, run_id, "FINISHED")
    return TrainResult(run_id, run_name, uri, metrics, ckpt_path, wall)


def config_summary(cfg: CascadeConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
