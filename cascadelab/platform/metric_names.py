"""What a training run's metrics are called in MLflow: the one home of the mapping, both ways.

The worker loop, Ray Train, Tune and the console use short internal keys (``train_loss``, ``dftopk_joint``,
``joint_recall``, ``samples_per_s``, ...). MLflow gets them under names that say what they are, in
sections (the part before the ``/``; MLflow's UI groups a run's charts by it):

=====================  ==================================================  ==========================================
when logged            internal key                                        MLflow name
=====================  ==================================================  ==========================================
each day (step d)      ``train_loss``                                      ``loss/total``
each day               any other training key (an objective's terms,       ``loss/<key>``, e.g. ``loss/dftopk_joint``
                       e.g. ``dftopk_joint``, ``bce_ranking``,
                       ``dftopk_weight_retrieval``)
each day               ``samples_per_s``, ``samples_per_s_worker<r>``,     ``throughput/<key>``
                       ``step_time_s``, ``data_wait_share``,
                       ``first_batch_s``
each day               ``stream_<eval key>`` (``train.streaming_eval``)    ``stream/<eval name>``
end (step = days)      ``joint_recall``                                    ``eval/joint_recall_at_<gt_k>_<k last>``
end                    ``<stage>_recall``                                  ``eval/<stage>_recall_at_<gt_k>_<k stage>``
end                    ``<stage>_ndcg``                                    ``eval/<stage>_ndcg_at_10``
end                    ``samples_per_s`` (rows / training seconds of the   ``throughput/samples_per_s_total``
                       whole run)
end                    ``train_rows``, ``global_steps``, ``world_size``,   ``run/<key>``
                       ``wall_time_s``
before training        ``data_skipped_files``                              ``data/skipped_files``
=====================  ==================================================  ==========================================

A parent run (a sweep's, ``train --seeds``') summarises its children's final metrics under
``best/``, ``mean/`` and ``std/`` and the name without its section (:meth:`MetricNames.summary_name`).

``<eval name>`` is the eval key with its cut-offs, as the CLI prints them (``joint R@10@20`` is
``joint_recall_at_10_20``): ``gt_k`` is ``objective.gt_k``, ``k`` the stages' ``k``, NDCG is at
:data:`NDCG_K`. A day's series and the run's end never share a name, so each per-day series holds
per-day values only. Everything in a day's metrics that is neither throughput nor streaming evaluation
is a loss term, so a new objective's terms need no entry here.

Reading back, :func:`internal_name` inverts the mapping without the run's config, and passes names of
runs logged before these names (``joint_recall``, ``samples_per_s_total``) through unchanged, so readers
work on old and new runs alike; where a run has both, the new name wins (:func:`internal_metrics`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cascadelab.cascade.metrics import metric_names, stage_names
from cascadelab.platform.config import CascadeConfig

NDCG_K = 10  # the cut-off of the evaluation's NDCG (``cascade.metrics.metric_sums``' ``ndcg_k``)
LOSS_TOTAL = "loss/total"  # every training day's metrics have it
SKIPPED_FILES = "data/skipped_files"
DAY_THROUGHPUT = ("samples_per_s", "step_time_s", "data_wait_share", "first_batch_s")
WORKER_RATE = "samples_per_s_worker"  # + the worker's rank
RUN_RATE = "samples_per_s_total"  # the whole run's rate, beside the per-day ``samples_per_s``
SECTIONS = ("loss", "throughput", "stream", "eval", "run", "data")
_SPECIAL = {"train_loss": LOSS_TOTAL, "data_skipped_files": SKIPPED_FILES}
_CUTOFFS = re.compile(r"_at_\d+(?:_\d+)?$")


@dataclass(frozen=True)
class MetricNames:
    """The MLflow names of one cascade's metrics: ``gt_k`` ground-truth items, ``ks[s]`` kept by stage s."""

    gt_k: int
    ks: tuple[int, ...]

    @classmethod
    def of(cls, cfg: CascadeConfig) -> MetricNames:
        return cls(cfg.objective.gt_k, tuple(stage.k for stage in cfg.stages))

    def eval_name(self, key: str) -> str:
        """An evaluation key with its cut-offs: ``joint_recall`` -> ``joint_recall_at_10_20``,
        ``retrieval_recall`` -> ``retrieval_recall_at_10_30``, ``ranking_ndcg`` -> ``ranking_ndcg_at_10``
        (any other key unchanged)."""
        if key == "joint_recall":
            return f"{key}_at_{self.gt_k}_{self.ks[-1]}"
        for stage, k in zip(stage_names(len(self.ks)), self.ks, strict=True):
            if key == f"{stage}_recall":
                return f"{key}_at_{self.gt_k}_{k}"
            if key == f"{stage}_ndcg":
                return f"{key}_at_{NDCG_K}"
        return key

    def day_name(self, key: str) -> str:
        """The MLflow name of a key of a training day's metrics (see the module's table)."""
        if key in _SPECIAL:
            return _SPECIAL[key]
        if key.startswith("stream_"):
            return f"stream/{self.eval_name(key.removeprefix('stream_'))}"
        if key in DAY_THROUGHPUT or key.startswith(WORKER_RATE):
            return f"throughput/{key}"
        return f"loss/{key}"

    def final_name(self, key: str) -> str:
        """The MLflow name of a key of the run's final metrics (the workers' final report, wall time)."""
        if key in metric_names(len(self.ks)):
            return f"eval/{self.eval_name(key)}"
        if key == "samples_per_s":
            return f"throughput/{RUN_RATE}"
        return f"run/{key}"

    def summary_name(self, key: str, summary: str) -> str:
        """A parent run's ``summary`` (``best``: a sweep's best trial; ``mean`` / ``std``: over the seeds
        of ``train --seeds``) of its children's final ``key``: ``best/joint_recall_at_10_20``,
        ``mean/samples_per_s_total`` (the section says what it summarises; readers of training runs
        skip these names)."""
        return f"{summary}/{self.final_name(key).partition('/')[2]}"

    def day(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """A training day's metrics (``{internal key: value}``) under their MLflow names."""
        return {self.day_name(k): v for k, v in metrics.items()}

    def final(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The run's final metrics (``{internal key: value}``) under their MLflow names."""
        return {self.final_name(k): v for k, v in metrics.items()}


def internal_name(name: str) -> str:
    """The internal key of an MLflow metric name, for a run logged with any version of the names:
    ``eval/joint_recall_at_10_20`` -> ``joint_recall``, ``loss/total`` -> ``train_loss``,
    ``stream/joint_recall_at_10_20`` -> ``stream_joint_recall``, ``throughput/samples_per_s_total`` ->
    ``samples_per_s_total``. Names outside these sections (``system/...``, a parent run's
    ``best/...`` or ``..._mean``) and names without a section (a run logged before them) are returned
    unchanged."""
    section, _, leaf = name.partition("/")
    if not leaf or section not in SECTIONS:
        return name
    special = {v: k for k, v in _SPECIAL.items()}
    if name in special:
        return special[name]
    if section in ("eval", "stream"):
        if not _CUTOFFS.search(leaf):
            return name
        key = _CUTOFFS.sub("", leaf)
        return f"stream_{key}" if section == "stream" else key
    return leaf


def is_current(name: str) -> bool:
    """Whether ``name`` is one of this module's MLflow names (not a name a run logged before them)."""
    return internal_name(name) != name


def internal_metrics(logged: Mapping[str, float]) -> dict[str, float]:
    """A run's logged metrics (``run.data.metrics``) by internal key; where a run has a key under both
    its name and its name from before (a run resumed across versions), the current name's value wins."""
    out: dict[str, float] = {}
    for name in sorted(logged, key=is_current):  # names from before first: the current ones overwrite
        out[internal_name(name)] = logged[name]
    return out


def logged_as(names: Iterable[str], key: str) -> str | None:
    """Which of a run's metric ``names`` holds internal ``key`` (the current name before an old one),
    e.g. to read its history; None when the run has none."""
    found = sorted((n for n in names if internal_name(n) == key), key=is_current, reverse=True)
    return found[0] if found else None


def final_report(logged: Mapping[str, float]) -> dict[str, float]:
    """The workers' final report as a finished run logged it: internal keys, ``samples_per_s`` being
    the whole run's rate (logged as ``throughput/samples_per_s_total``)."""
    out = internal_metrics(logged)
    if RUN_RATE in out:
        out["samples_per_s"] = out.pop(RUN_RATE)
    return out
