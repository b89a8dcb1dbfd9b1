"""Typed run configuration: dataclass defaults that run, one YAML file + ``--set key=value`` override layer.

Every field has a default that works on the embedded setup (local Ray, SQLite MLflow, synthetic data).
``load_config`` merges a YAML file and then ``--set`` overrides on top of the defaults; an unknown key is
rejected with the list of valid keys at that level.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cascadelab.cascade.models import MODELS
from cascadelab.cascade.objectives import OBJECTIVES
from cascadelab.operators import operator_default

PARQUET_READERS = ("auto", "v1", "v2")
#: Keys that exist for the tests (fault injection): in the config, never among a run's MLflow params.
TEST_ONLY_KEYS = ("train.fail_at_step", "train.fail_rank")


class ConfigError(ValueError):
    """A one-line configuration error naming the key (or file) and what was expected."""


@dataclass
class DataConfig:
    path: str = "data/demo"  # day-partitioned Parquet dataset written by `cascadelab generate` or `convert`
    train_days: list[str] | None = None  # None: every day except eval_day, in date order
    eval_day: str | None = None  # None: the last day of the dataset
    batch_size: int = 1024
    eval_batch_size: int = 1024
    shuffle_buffer: int = 0  # rows per shuffle window of a training day (loop.DayBatcher); 0 disables shuffling
    sample_num: int = 0  # in-batch negatives appended per request for training (DFTopK's --sample_num)
    eval_sample_num: int = 0  # ... for evaluation: 0 = LCRON protocol (40 logged), 160 = DFTopK (200 pool)
    max_rows_per_day: int | None = None  # cap rows read per training day (quick runs); None: all rows
    max_eval_rows: int | None = None  # cap rows of the held-out day; None: the whole day (never the training cap)
    skip_bad_files: bool = False  # validate every file first; skip (log, count) bad ones instead of stopping
    # Ray Data's Parquet reader per day: "v2" (Ray 2.60's default: a listing task and footer readers start
    # before each day's first batch, then it streams faster), "v1", or "auto": v1 for days under
    # ingest.V2_MIN_BYTES of Parquet, where that start-up dominates, else v2 (cascadelab.platform.data.ingest)
    parquet_reader: str = "auto"


@dataclass
class StageConfig:
    model: str = "dssm"  # dssm | din | mlp
    k: int = 30  # how many candidates this stage passes on


def _two_stage() -> list[StageConfig]:
    return [StageConfig("dssm", 30), StageConfig("din", 20)]


@dataclass
class ModelConfig:
    emb_dim: int = 8
    hidden: int = 128


@dataclass
class ObjectiveConfig:
    """Every objective's hyperparameters; each objective takes the fields named like its constructor keywords."""

    name: str = "dftopk"  # see cascadelab.cascade.objectives.OBJECTIVES
    gt_k: int = 10  # ground-truth items per request (Recall@10@m); the quota of LCRON and the top-k masks
    # DFTopK temperature on raw logits: the best measured on the embedded default (logits of sd ~1 under
    # bce); the DFTopK paper's 500 (the operator's default) fits its models' logits, not these (README)
    tau: float = 5.0
    # BCE trains the last stage on the first N candidate groups; 4 (all of them) measured fairer than the
    # reference code's 2, which never shows the ranking stage the deeper negatives it must drop (README)
    bce_last_stage_groups: int = 4
    icc_temperature: float = 0.5  # ICC gate sigmoid((s - kappa) / T); paper grid {.05,.1,.5,1}; reference code 1e-3
    icc_stage_scale: float | None = None  # ICC fused-score multiplier c_j = scale**j; None: 1 (2 stages), 2 (3+)
    rankflow_alpha: float | None = None  # RankFlow: (1 - a) distillation + a rank; None: a = 0 (2 st.), all 1 (3+)
    lambdaloss_topn: int = 30  # FS-LambdaLoss top-n of the NDCG discounts
    lambdaloss_smoothing: float = 0.8  # FS-LambdaLoss mixture f of NDCG-Loss2 and LambdaRank discounts
    arf_tau: float = 200.0  # ARF / ARF-v2 NeuralSort temperature
    lcron_tau: float = operator_default("neuralsort", "tau")  # LCRON NeuralSort / SoftSort temperature
    lcron_sort: str = "neuralsort"  # LCRON sort operator: neuralsort | softsort | diffsort
    lcron_stage_quotas: bool = False  # LCRON quotas = the stages' k (paper App. E.1) instead of gt_k
    # DiffSort (LCRON with lcron_sort=diffsort) comparator steepness
    diffsort_steepness: float = operator_default("diffsort", "steepness")
    diffsort_network: str = "odd_even"  # DiffSort sorting network: odd_even | bitonic
    lapsum_alpha: float = operator_default("lapsum", "alpha")  # LapSum scale on raw logits (the DFTopK repo's value)
    # sparse soft top-k regularisation strength l (the DFTopK repo's value)
    sparse_topk_l: float = operator_default("sparse-topk", "l")


@dataclass
class TrainConfig:
    num_workers: int = 1
    cpus_per_worker: float = 1.0  # leave CPUs for Ray Data's read tasks on small machines
    use_gpu: str = "auto"  # auto | true | false; auto = use a GPU when the cluster has one
    lr: float = 1e-2
    seed: int = 42
    storage_path: str = "results"  # Ray Train results and checkpoints (absolute, s3://, gs://)
    shared_storage: bool = False  # storage_path is a shared mount (NFS) visible to every node
    checkpoints_to_keep: int = 2
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0: only after each day)
    max_failures: int = 1  # worker-group failures Ray Train recovers from (resuming from the last checkpoint)
    streaming_eval: bool = False  # after each day d, evaluate on day d+1 (papers' Figure 2 protocol)
    bf16: bool = False  # bf16 autocast on GPU (ignored on CPU)
    compile: bool = False  # torch.compile (inductor) each stage model; a failing compile: one warning, then eager
    fail_at_step: int = -1  # fault injection for tests: raise once at this global step (-1: off)
    fail_rank: int = 0  # the worker rank that raises


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "cascadelab"
    run_name: str | None = None  # None: <objective>-<timestamp>-<random>; always unique
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU where present) on training runs


@dataclass
class CascadeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=_two_stage)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_scalar(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_scalar(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key '{key}': unexpected value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_scalar(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, bool):
        return "true" if value else "false"
    if tp is str and isinstance(value, (int, float)):
        return str(value)
    if tp is str and isinstance(value, datetime.date):  # YAML reads an unquoted 2024-01-13 as a date
        return value.isoformat()
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    obj = cls()
    _merge(obj, values, prefix)
    return obj


def _merge(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            where = f"under '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{full}'; valid keys {where}: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _merge(current, value, full)
        else:
            setattr(obj, key, _check_scalar(value, hints[key], full))


def parse_override(item: str) -> tuple[str, Any]:
    """``"objective.tau=100"`` -> ``("objective.tau", 100)``: the value parsed as YAML (empty -> None)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. objective.tau=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}': empty key before '='")
    return key, (yaml.safe_load(raw) if raw.strip() else None)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "a.c=x"]`` -> ``{"a": {"b": 1, "c": "x"}}``: the one parser of ``--set key=value``."""
    return unflatten(dict(parse_override(item) for item in items or []))


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}`` (dotted keys to nested dicts; later keys win)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(cursor.get(part), dict):
                cursor[part] = {}
            cursor = cursor[part]
        cursor[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> CascadeConfig:
    """Defaults, then the YAML file at ``path`` (if any), then overrides; validated.

    ``overrides``: ``key=value`` strings (``--set``) or a nested dict (:func:`parse_overrides`'s output).
    """
    cfg = CascadeConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}': not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}': expected a mapping at the top level")
        _merge(cfg, loaded)
    if isinstance(overrides, dict):
        _merge(cfg, overrides)
    else:
        for item in overrides or []:  # one at a time: a later override of a key wins
            _merge(cfg, parse_overrides([item]))
    validate(cfg)
    return cfg


def validate(cfg: CascadeConfig) -> None:
    """Checks that need more than a type: positive sizes, known names, stage sizes that shrink."""
    if not cfg.stages:
        raise ConfigError("config key 'stages': expected at least one stage")
    prev = None
    for i, stage in enumerate(cfg.stages):
        if stage.model not in MODELS:
            raise ConfigError(f"config key 'stages[{i}].model': unknown model '{stage.model}'; "
                              f"valid: {', '.join(sorted(MODELS))}")
        if stage.k <= 0 or (prev is not None and stage.k > prev):
            raise ConfigError(f"config key 'stages[{i}].k': expected 0 < k <= the previous stage's k, "
                              f"got {stage.k}")
        prev = stage.k
    if cfg.objective.name not in OBJECTIVES:
        raise ConfigError(f"config key 'objective.name': unknown objective '{cfg.objective.name}'; "
                          f"valid: {', '.join(sorted(OBJECTIVES))}")
    positive = {
        "objective.gt_k": cfg.objective.gt_k, "objective.tau": cfg.objective.tau,
        "objective.bce_last_stage_groups": cfg.objective.bce_last_stage_groups,
        "objective.icc_temperature": cfg.objective.icc_temperature,
        "objective.icc_stage_scale": 1.0 if cfg.objective.icc_stage_scale is None else cfg.objective.icc_stage_scale,
        "objective.lambdaloss_topn": cfg.objective.lambdaloss_topn, "objective.arf_tau": cfg.objective.arf_tau,
        "objective.lcron_tau": cfg.objective.lcron_tau,
        "objective.diffsort_steepness": cfg.objective.diffsort_steepness,
        "objective.lapsum_alpha": cfg.objective.lapsum_alpha,
        "objective.sparse_topk_l": cfg.objective.sparse_topk_l,
        "data.batch_size": cfg.data.batch_size, "data.eval_batch_size": cfg.data.eval_batch_size,
        "train.num_workers": cfg.train.num_workers, "train.cpus_per_worker": cfg.train.cpus_per_worker,
        "train.lr": cfg.train.lr, "train.checkpoints_to_keep": cfg.train.checkpoints_to_keep,
        "model.emb_dim": cfg.model.emb_dim, "model.hidden": cfg.model.hidden,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"config key '{key}': expected a positive value, got {value}")
    for key in ("checkpoint_every_steps", "max_failures"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"config key 'train.{key}': expected >= 0, got {getattr(cfg.train, key)}")
    for key in ("sample_num", "eval_sample_num"):
        if getattr(cfg.data, key) < 0:
            raise ConfigError(f"config key 'data.{key}': expected >= 0, got {getattr(cfg.data, key)}")
    for key in ("max_rows_per_day", "max_eval_rows"):
        value = getattr(cfg.data, key)
        if value is not None and value <= 0:
            raise ConfigError(f"config key 'data.{key}': expected a positive number of rows or null (no cap), "
                              f"got {value}")
    if cfg.data.parquet_reader not in PARQUET_READERS:
        raise ConfigError(f"config key 'data.parquet_reader': expected one of {', '.join(PARQUET_READERS)}, "
                          f"got {cfg.data.parquet_reader!r}")
    if cfg.data.shuffle_buffer < 0:
        raise ConfigError(f"config key 'data.shuffle_buffer': expected >= 0, got {cfg.data.shuffle_buffer}")
    if cfg.train.use_gpu not in ("auto", "true", "false"):
        raise ConfigError(f"config key 'train.use_gpu': expected auto, true or false, got {cfg.train.use_gpu!r}")


def flatten(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}, "s": [{"k": 2}]}`` -> ``{"a.b": 1, "s.0.k": 2}`` (for MLflow params); the inverse
    of :func:`unflatten` on nested mappings. ``sep`` joins the keys (``"/"`` for MLflow metric names)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, full, sep))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                out.update(flatten(v, f"{full}{sep}{i}", sep))
        else:
            out[full] = value
    return out


def run_params(cfg: CascadeConfig) -> dict[str, Any]:
    """The flattened config a run logs as MLflow params: every key but :data:`TEST_ONLY_KEYS`."""
    return {k: v for k, v in flatten(cfg.to_dict()).items() if k not in TEST_ONLY_KEYS}


def from_dict(d: dict[str, Any]) -> CascadeConfig:
    """Rebuild a config from ``to_dict()`` output (how workers receive it)."""
    cfg = CascadeConfig()
    _merge(cfg, d)
    return cfg
