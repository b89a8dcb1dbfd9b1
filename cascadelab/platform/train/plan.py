"""A training run as a typed plan: everything decided from the config and the dataset's metadata.

:func:`plan_run` reads ``dataset.json`` and the Parquet footers of the days a run uses, never starts
Ray and never writes anything; each problem it finds raises one ``ConfigError`` (naming the config key)
or ``DataError`` (naming the path or field). The resulting :class:`RunPlan` is what the driver builds
the Ray Train run from and what every Train worker receives (it pickles).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cascadelab.cascade.cascade import Cascade, build_cascade
from cascadelab.cascade.metrics import stage_names
from cascadelab.platform.cluster.storage import is_remote_uri, uri_scheme
from cascadelab.platform.config import CascadeConfig, ConfigError
from cascadelab.platform.data.schema import SLOTS, DataError, DatasetMeta, day_dir_files, day_files, groups_for
from cascadelab.platform.tracking import resolve_tracking_uri


@dataclass(frozen=True)
class RunPlan:
    """One training run, resolved. ``config`` is the run's own copy with ``tracking.uri`` and
    ``tracking.run_name`` filled in (what is logged as params and ``config.yaml``)."""

    config: CascadeConfig
    meta: DatasetMeta  # the dataset's metadata: mode, vocabulary sizes, rows per day
    train_days: tuple[str, ...]  # in date order
    eval_day: str
    groups: tuple[str, ...]  # candidate groups read, in cascade order (group 0 = ground truth)
    candidates: int  # candidates per request a stage chooses from (logged slots + in-batch negatives)
    storage_path: str  # absolute local path, or a remote URI
    run_name: str
    resume: bool  # continue the run of this name from its last checkpoint
    use_gpu: bool | None = None  # None until the cluster is known (see :func:`on_cluster`)

    @property
    def vocab(self) -> dict[str, int]:
        return self.meta.vocab

    @property
    def rows_per_day(self) -> dict[str, int]:
        return self.meta.rows_per_day

    @property
    def days(self) -> list[str]:
        """Every day the run reads: the training days, then the evaluation day."""
        return [*self.train_days, self.eval_day]

    @property
    def num_stages(self) -> int:
        return len(self.config.stages)

    @property
    def stage_names(self) -> list[str]:
        return stage_names(self.num_stages)

    @property
    def tracking_uri(self) -> str:
        return self.config.tracking.uri

    @property
    def run_dir(self) -> Path | None:
        """The run's local Ray Train directory; None on remote storage."""
        local = local_dir(self.storage_path)
        return None if local is None else local / self.run_name

    @property
    def failure_marker(self) -> str | None:
        """Where ``train.fail_at_step`` records that it failed once (local storage only)."""
        return None if self.run_dir is None else str(self.run_dir / ".injected_failure")

    @property
    def torch_threads(self) -> int:
        return torch_threads(self.config)

    def build_cascade(self) -> Cascade:
        """The cascade this run trains, freshly initialised (seed it first)."""
        cfg = self.config
        return build_cascade(cfg.stages, self.vocab, cfg.objective.name, dict(vars(cfg.objective)),
                             emb_dim=cfg.model.emb_dim, hidden=cfg.model.hidden)


def plan_run(cfg: CascadeConfig, resume: str | None = None, run_name: str | None = None) -> RunPlan:
    """Resolve and check ``cfg`` against its dataset, before any cluster work.

    ``resume``: the name of a run to continue (its Ray Train directory must exist on local storage).
    ``run_name``: an exact name chosen by the caller; a run of that name with a Ray Train directory is
    resumed, otherwise created. Without either, the run gets a fresh unique name.
    """
    storage = resolve_storage_path(cfg.train.storage_path)
    local = local_dir(storage)
    if run_name is not None and resume is None and local is not None and (local / run_name).is_dir():
        resume = run_name
    if resume is not None and local is not None and not (local / resume).is_dir():
        raise ConfigError(f"--resume {resume}: no Ray Train run of that name under train.storage_path '{storage}'")
    meta = DatasetMeta.read(cfg.data.path)
    train_days, eval_day = plan_days(meta, cfg)
    groups = cascade_groups(meta, len(cfg.stages))

    for day in [*train_days, eval_day]:  # a missing day or a bad schema fails here, naming the file
        if cfg.data.skip_bad_files:  # the files are decoded and checked on the cluster; bad ones skipped
            day_dir_files(cfg.data.path, day)
        else:
            day_files(cfg.data.path, day, meta.mode, groups)
    candidates = check_stage_sizes(cfg, len(groups) * SLOTS)
    resolved = copy.deepcopy(cfg)
    resolved.tracking.uri = resolve_tracking_uri(cfg.tracking.uri)
    resolved.tracking.run_name = resume or run_name or unique_run_name(cfg.tracking.run_name or cfg.objective.name)
    return RunPlan(config=resolved, meta=meta, train_days=tuple(train_days), eval_day=eval_day, groups=groups,
                   candidates=candidates, storage_path=storage, run_name=resolved.tracking.run_name,
                   resume=resume is not None)


def on_cluster(plan: RunPlan, cluster_cpus: float, use_gpu: bool) -> RunPlan:
    """The plan once the cluster is known: its CPU budget checked, ``use_gpu`` decided."""
    check_cpu_budget(plan.config, cluster_cpus)
    return dataclasses.replace(plan, use_gpu=use_gpu)


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
    """The candidate groups a cascade of ``num_stages`` reads: three-stage data for 3 stages or more."""
    if num_stages >= 3:
        if meta.mode != "three_stage":
            raise ConfigError(f"config key 'stages': {num_stages} stages need three-stage data "
                              f"(rerank groups), but '{meta.mode}' data was given")
        return groups_for("three_stage")
    return groups_for("two_stage")


def check_stage_sizes(cfg: CascadeConfig, logged: int) -> int:
    """Candidates per request (``logged`` slots plus the fewer of training's and evaluation's in-batch
    negatives); a stage that keeps more than that is a ConfigError naming ``stages[i].k``."""
    negatives = min(cfg.data.sample_num, cfg.data.eval_sample_num)
    candidates = logged + negatives
    for i, stage in enumerate(cfg.stages):
        if stage.k > candidates:
            parts = f" ({logged} logged + {negatives} in-batch negatives)" if negatives else ""
            raise ConfigError(f"config key 'stages[{i}].k': {stage.k} is more than the {candidates} candidates "
                              f"per request{parts} of {cfg.data.path}; expected k <= {candidates}")
    return candidates


def check_cpu_budget(cfg: CascadeConfig, cluster_cpus: float) -> None:
    """Train workers holding every CPU starve Ray Data's read tasks and the run hangs; refuse that."""
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    if need > cluster_cpus - 0.5:
        raise ConfigError(
            f"config keys 'train.num_workers' x 'train.cpus_per_worker' = {need:g} CPUs leaves no CPU for Ray "
            f"Data on a cluster with {cluster_cpus:g} CPUs; use at most {max(cluster_cpus - 1, 0.5):g} CPUs "
            f"in total (e.g. train.cpus_per_worker={max((cluster_cpus - 1) / cfg.train.num_workers, 0.25):g})")


def known_cpus() -> float | None:
    """The CPUs of the cluster this process trains on, when known without starting Ray: the connected
    cluster's, or for the embedded cluster this machine's count (at least what Ray will detect); None
    when ``RAY_ADDRESS`` names a cluster not yet joined."""
    ray = sys.modules.get("ray")  # only a Ray this process already imported
    if ray is not None and ray.is_initialized():
        return ray.cluster_resources().get("CPU", 0.0)
    if os.environ.get("RAY_ADDRESS"):
        return None
    return float(os.cpu_count() or 1)


def torch_threads(cfg: CascadeConfig) -> int:
    """Intra-op threads of a Train worker: its CPU reservation, as Ray's OMP_NUM_THREADS (on 2 cores
    two threads in one process run the DIN cascade slower than one)."""
    return max(1, int(cfg.train.cpus_per_worker))


def unique_run_name(prefix: str) -> str:
    """``<prefix>-<UTC timestamp>-<random>``: Ray Train V2 silently resumes a reused name."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def resolve_storage_path(path: str) -> str:
    """A URI as given; a local path made absolute (``~`` expanded)."""
    return path if uri_scheme(path) else str(Path(path).expanduser().resolve())


def local_dir(path: str) -> Path | None:
    """The local directory of a storage path (a plain path or a ``file://`` URI); None when remote."""
    if is_remote_uri(path):
        return None
    return Path(urlsplit(path).path) if uri_scheme(path) else Path(path)
