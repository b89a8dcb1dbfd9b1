"""Read finished training runs back from MLflow and turn them into paper-style tables and plots.

Tables (each as markdown for the terminal, a CSV of means/stds/run counts, and a PNG where it is a curve):

* ``methods``: method x metric, mean ± std over seeds (LCRON Table 2 shape; a single run reads ``(n=1)``).
  A method is the objective plus every other setting that varies between the runs (train.seed excepted:
  seeds are what is averaged). Beside the joint recall: its difference to bce with a 95% interval (see
  :func:`difference`; ``n.s.`` where the interval covers 0) and, where the runs' dataset records it
  (``dataset.json`` ``extra.oracle``, written by ``cascadelab generate``), the oracle's joint recall on the
  evaluation day and the method's fraction of it.
* ``tau``, ``lcron_tau``, ``arf_tau``: joint recall against each temperature that varies.
* ``sample_num``: joint recall against data.sample_num (in-batch negatives per request), when it varies.
* ``step_time``: training step time against data.sample_num, when runs logged ``step_time_s``.
* ``learning_curve``: joint recall against data.max_rows_per_day (training requests per day), when it
  varies: where a method's curve levels off is the size at which its result is its converged one.
* ``streaming``: streaming joint recall per evaluated day, for runs trained with train.streaming_eval.

The metric columns come from the runs' own stage lists (their ``stages.<i>.k`` params, through
:func:`cascadelab.cascade.metrics.stage_names`), so a cascade of any depth shows every stage. Runs are
read by the loop's internal metric keys (``joint_recall``, ``step_time_s``, ...), whether they logged
them under their MLflow names (``eval/joint_recall_at_10_20``; :mod:`cascadelab.platform.metric_names`)
or, before those names, under the keys themselves.
MLflow and matplotlib are imported lazily, inside the functions that use them.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.objectives import OBJECTIVES
from cascadelab.platform.config import CascadeConfig, ConfigError
from cascadelab.platform.data.schema import DataError, DatasetMeta
from cascadelab.platform.metric_names import internal_metrics, logged_as
from cascadelab.platform.tracking import log_artifacts
from cascadelab.platform.tune.sweep import SWEEP_TAG

log = logging.getLogger(__name__)

JOINT = "joint_recall"
METHOD = "objective.name"
SEED = "train.seed"
SAMPLE_NUM = "data.sample_num"
ROWS_PER_DAY = "data.max_rows_per_day"
BASELINE = "bce"  # the method every other one is compared with
LEVEL = 0.95  # confidence level of the difference intervals
# params that differ between runs without being a setting of the experiment
_NOT_SETTINGS = ("tracking.", "train.storage_path", "train.fail_at_step", "train.fail_rank")


@dataclass
class Table:
    key: str  # file stem of the CSV / PNG
    title: str
    frame: Any  # pandas DataFrame, long form: setting columns, <metric>_mean / _std, runs
    markdown: str
    figure: Any = None  # matplotlib Figure, or None


@dataclass
class CompareResult:
    label: str  # "sweep NAME" or "experiment NAME"
    parent_run_id: str | None
    runs: int
    tables: list[Table]
    files: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# reading runs


def _search(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _frame(runs: list):
    """One row per run; metric columns by internal key (a run's current name wins over an old one)."""
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
               "start_time": run.info.start_time, "end_time": run.info.end_time}
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in internal_metrics(run.data.metrics).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def load_runs(uri: str, sweep: str | None = None, experiment: str | None = None):
    """``(runs DataFrame, parent run id or None)``: a sweep's child runs, or every training run of an
    experiment (columns ``run_id``, ``status``, ``params.<key>``, ``metrics.<internal key>``)."""
    from mlflow import MlflowClient

    if (sweep is None) == (experiment is None):
        raise ConfigError("compare: give exactly one of --sweep NAME or --experiment NAME")
    client = MlflowClient(uri)
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ConfigError(f"--experiment {experiment}: no MLflow experiment of that name at {uri}")
        return _frame(_search(client, [exp.experiment_id], "")), None
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    parents = _search(client, exp_ids, f"tags.`{SWEEP_TAG}` = '{sweep}'") if exp_ids else []
    if not parents:
        raise ConfigError(f"--sweep {sweep}: no sweep of that name at {uri}")
    parent = max(parents, key=lambda r: r.info.start_time)
    if len(parents) > 1:
        log.warning("%d sweeps named %s; using the newest (run %s)", len(parents), sweep, parent.info.run_id)
    children = _search(client, [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return _frame(children), parent.info.run_id


# ----------------------------------------------------------------------------------------------------------
# tables


def finished(runs):
    """Runs that finished and logged the final metrics."""
    if runs.empty or f"metrics.{JOINT}" not in runs:
        return runs.iloc[0:0]
    return runs[(runs["status"] == "FINISHED") & runs[f"metrics.{JOINT}"].notna()].copy()


def varying_settings(runs) -> list[str]:
    """Param keys (without ``params.``) with more than one value among ``runs``, seeds excluded."""
    keys = []
    for col in runs.columns:
        if not col.startswith("params."):
            continue
        key = col[len("params."):]
        if key == SEED or key.startswith(_NOT_SETTINGS):
            continue
        if runs[col].fillna("<none>").nunique() > 1:
            keys.append(key)
    return keys


def stage_count(run) -> int:
    """How many stages a run's cascade has: its ``params.stages.<i>.k`` (0 when it logged none)."""
    n = 0
    while isinstance(run.get(f"params.stages.{n}.k"), str):
        n += 1
    return n


def stage_counts(runs) -> list[int]:
    """The stage counts among ``runs``, deepest first; the default cascade's when no run logged its stages."""
    counts = {stage_count(run) for _, run in runs.iterrows()} - {0}
    return sorted(counts, reverse=True) or [len(CascadeConfig().stages)]


def compared_metrics(runs) -> list[str]:
    """The metric columns for ``runs``: ``joint_recall``, then ``<stage>_recall`` and ``<stage>_ndcg`` from
    the last stage back to the first (the papers' column order), over every stage list among the runs."""
    names = [JOINT]
    for n in stage_counts(runs):
        for stage in reversed(stage_names(n)):
            names += [m for m in (f"{stage}_recall", f"{stage}_ndcg") if m not in names]
    return names


def metric_labels(runs) -> dict[str, str]:
    """Paper-style column names from the runs' own config: ``Joint R@10@20``, ``Retrieval NDCG@10``...;
    a stage is labelled from the first run of the deepest cascade that has it."""
    labels: dict[str, str] = {}
    for run in sorted((run for _, run in runs.iterrows()), key=stage_count, reverse=True):
        n = stage_count(run)
        if n == 0:
            break
        gt = run.get("params.objective.gt_k", "10")
        ks = [run[f"params.stages.{i}.k"] for i in range(n)]
        labels.setdefault(JOINT, f"Joint R@{gt}@{ks[-1]}")
        for name, k in zip(stage_names(n), ks, strict=True):
            labels.setdefault(f"{name}_recall", f"{name.capitalize()} R@{gt}@{k}")
            labels.setdefault(f"{name}_ndcg", f"{name.capitalize()} NDCG@10")
    labels.setdefault(JOINT, "Joint R")
    return {m: labels.get(m, m) for m in compared_metrics(runs)}


def _sortable(values):
    """Sort key for a column of param strings: methods in the registry's (the papers') order, numbers
    numerically, anything else as text."""
    if values.name == METHOD:
        order = {name: i for i, name in enumerate(OBJECTIVES)}
        return values.map(lambda v: order.get(v, len(order)))
    numeric = pd.to_numeric(values, errors="coerce")
    return numeric if numeric.notna().all() else values


def _method_label(row, cols: list[str]) -> str:
    extra = [f"{c}={row[c]}" for c in cols if c != METHOD]
    name = str(row[METHOD]) if METHOD in cols else "all runs"
    return f"{name} ({', '.join(extra)})" if extra else name


def _fmt(mean: float, std: float, runs: int, scale: float = 1.0, digits: int = 4) -> str:
    """``mean ± std`` over ``runs`` runs; one run has no spread: ``mean (n=1)``."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if runs == 1:
        return f"{mean * scale:.{digits}f} (n=1)"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _aggregate(runs, group: list[str], metrics: list[str]):
    """Long form: one row per group with ``<m>_mean``, ``<m>_std`` (sample std, 0 for one run) and ``runs``."""
    frame = runs.rename(columns={f"params.{g}": g for g in group})
    for g in group:
        if g not in frame:
            frame[g] = None
    cols = {m: frame[f"metrics.{m}"] for m in metrics}
    data = pd.DataFrame({**{g: frame[g].fillna("null") for g in group}, **cols})
    grouped = data.groupby(group, sort=False, dropna=False) if group else data.groupby(lambda _: "all")
    out = grouped.agg(**{f"{m}_mean": (m, "mean") for m in metrics}, **{f"{m}_std": (m, "std") for m in metrics},
                      runs=(metrics[0], "size")).reset_index()
    if not group:
        out = out.drop(columns=["index"])
    for m in metrics:
        out[f"{m}_std"] = out[f"{m}_std"].fillna(0.0)
    if group:
        out = out.sort_values(group, key=_sortable, kind="stable").reset_index(drop=True)
    return out


def _key(value) -> str:
    """A param value as a group key, as :func:`_aggregate` groups it (missing -> ``"null"``)."""
    return value if isinstance(value, str) else "null"


def _by_group(runs, group: list[str], metric: str) -> dict[tuple, list[tuple[str, float]]]:
    """``{group key: [(seed, value), ...]}`` of ``metric`` over the runs that logged it."""
    out: dict[tuple, list[tuple[str, float]]] = {}
    for _, run in runs.iterrows():
        value = run.get(f"metrics.{metric}")
        if value is not None and not math.isnan(value):
            key = tuple(_key(run.get(f"params.{g}")) for g in group)
            out.setdefault(key, []).append((_key(run.get(f"params.{SEED}")), float(value)))
    return out


def _baseline_key(key: tuple, group: list[str], keys: list[tuple]) -> tuple | None:
    """The bce group to compare ``key`` with: bce with the same other settings, else the only bce group."""
    if METHOD not in group:
        return None
    i = group.index(METHOD)
    same = key[:i] + (BASELINE,) + key[i + 1:]
    if same in keys:
        return same
    bce = [k for k in keys if k[i] == BASELINE]
    return bce[0] if len(bce) == 1 else None


def method_table(runs, settings: list[str], references=None) -> Table:
    """The method x metric table; ``references(run) -> Reference | None`` supplies the oracle column."""
    metrics = [m for m in compared_metrics(runs) if f"metrics.{m}" in runs and runs[f"metrics.{m}"].notna().any()]
    group = [METHOD, *[s for s in settings if s != METHOD]] if f"params.{METHOD}" in runs else list(settings)
    agg = _aggregate(runs, group, metrics)
    keys = [tuple(r[g] for g in group) for _, r in agg.iterrows()]
    joint = _by_group(runs, group, JOINT)
    diffs = {}
    for key in keys:
        base = _baseline_key(key, group, keys)
        if base is not None and base != key and key in joint and base in joint:
            diffs[key] = difference(joint[key], joint[base])
    refs = _references(runs, group, references) if references is not None else {}
    _add_columns(agg, keys, diffs, refs)
    labels = metric_labels(runs)
    header = ["Method", labels[JOINT]]
    header += [f"Δ vs {BASELINE} (95% CI)"] if diffs else []
    header += [f"Oracle {labels[JOINT].removeprefix('Joint ')}", "of oracle"] if refs else []
    header += [labels[m] for m in metrics if m != JOINT] + ["runs"]
    rows = []
    for key, (_, r) in zip(keys, agg.iterrows(), strict=True):
        cells = [_method_label(r, group), _fmt(r[f"{JOINT}_mean"], r[f"{JOINT}_std"], r["runs"])]
        if diffs:
            cells.append(diffs[key].markdown() if key in diffs else ("reference" if key[0] == BASELINE else "-"))
        if refs:
            ref = refs.get(key)
            cells += [f"{ref.oracle:.4f}", f"{r[f'{JOINT}_mean'] / ref.oracle:.3f}"] if ref else ["-", "-"]
        cells += [_fmt(r[f"{m}_mean"], r[f"{m}_std"], r["runs"]) for m in metrics if m != JOINT]
        rows.append([*cells, str(r["runs"])])
    md = "\n\n".join([_markdown(header, rows), *_notes(diffs, refs)])
    return Table("methods", "Methods (mean ± std over seeds)", agg, md)


def _add_columns(agg, keys: list[tuple], diffs: dict, refs: dict) -> None:
    """The CSV's view of the difference and oracle columns (NaN / empty where a row has none)."""
    nan = float("nan")
    if diffs:
        agg[f"{JOINT}_vs_{BASELINE}"] = [diffs[k].mean if k in diffs else nan for k in keys]
        agg[f"{JOINT}_vs_{BASELINE}_lo"] = [diffs[k].lo if k in diffs and diffs[k].lo is not None else nan
                                           for k in keys]
        agg[f"{JOINT}_vs_{BASELINE}_hi"] = [diffs[k].hi if k in diffs and diffs[k].hi is not None else nan
                                           for k in keys]
        agg[f"{JOINT}_vs_{BASELINE}_test"] = [diffs[k].test if k in diffs else "" for k in keys]
        agg[f"{JOINT}_vs_{BASELINE}_significant"] = [diffs[k].significant if k in diffs else None for k in keys]
    if refs:
        agg["oracle"] = [refs[k].oracle if k in refs else nan for k in keys]
        agg["of_oracle"] = agg[f"{JOINT}_mean"] / agg["oracle"]
        agg["popularity"] = [refs[k].popularity if k in refs else nan for k in keys]
        agg["random"] = [refs[k].random if k in refs else nan for k in keys]


def _notes(diffs: dict, refs: dict) -> list[str]:
    """Lines under the method table saying what its extra columns are."""
    notes = []
    if diffs:
        notes.append(f"Δ vs {BASELINE}: difference of mean joint recall, {LEVEL:.0%} interval: paired t over "
                     f"matching seeds, else Welch; n.s.: the interval covers 0.")
    for where, ref in sorted({(r.where, r) for r in refs.values()}, key=lambda t: t[0]):
        notes.append(f"Oracle ({where}): the logged candidates ranked by the generator's noise-free utility, "
                     f"{ref.oracle:.4f}; popularity only {ref.popularity:.4f}; random {ref.random:.4f}.")
    return notes


def curve_table(runs, settings: list[str], x_key: str, metric: str, key: str, title: str, xlabel: str,
                ylabel: str, scale: float = 1.0, digits: int = 4) -> Table:
    """``metric`` against ``x_key``: one row per method (other settings), one column per value of x."""
    others = [s for s in settings if s not in (x_key, METHOD)]
    group = ([METHOD] if f"params.{METHOD}" in runs else []) + others
    agg = _aggregate(runs, [*group, x_key], [metric])
    agg["method"] = [_method_label(r, group) if group else "all runs" for _, r in agg.iterrows()]
    xs = list(dict.fromkeys(agg.sort_values(x_key, key=_sortable)[x_key]))
    header = ["Method", *(f"{x_key.split('.')[-1]}={x}" for x in xs)]
    rows, series = [], {}
    for method, part in agg.groupby("method", sort=False):
        cells = {r[x_key]: (r[f"{metric}_mean"], r[f"{metric}_std"], r["runs"]) for _, r in part.iterrows()}
        rows.append([method, *(_fmt(*cells[x], scale=scale, digits=digits) if x in cells else "-" for x in xs)])
        series[method] = sorted(((pd.to_numeric(x, errors="coerce"), m * scale, s * scale)
                                 for x, (m, s, _) in cells.items()), key=lambda t: t[0])
    fig = _plot(series, title, xlabel, ylabel)
    return Table(key, title, agg.drop(columns=["method"]), _markdown(header, rows), fig)


def _plot(series: dict[str, list[tuple[float, float, float]]], title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs_all = [x for pts in series.values() for x, _, _ in pts if x == x]
    for label, pts in series.items():
        pts = [p for p in pts if p[0] == p[0]]  # non-numeric x values cannot be drawn
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=label)
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:
        ax.set_xscale("log")
    elif xs_all and all(float(x).is_integer() for x in xs_all):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # days, sample counts
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_history(client) -> Callable[[str, str], list[tuple[int, float]]]:
    """``history(run_id, key) -> [(step, value), ...]`` of internal ``key`` in logging order (by step, then
    timestamp), under whichever name the run logged it."""

    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        name = logged_as(client.get_run(run_id).data.metrics, key) or key
        logged = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
        return [(m.step, m.value) for m in logged]

    return history


def streaming_frame(runs, history) -> Any:
    """One row per (run, evaluated day) from the ``stream_joint_recall`` history; ``history(run_id, key)``
    returns ``[(step, value), ...]`` in logging order (step d: the model trained through day d, scored on
    day d + 1). A day logged twice (a run resumed from the checkpoint before it) counts once, its last value."""
    rows = []
    for _, run in runs.iterrows():
        by_day = {int(step): value for step, value in history(run["run_id"], "stream_joint_recall")}
        for step, value in sorted(by_day.items()):
            rows.append({**run.to_dict(), "params.stream_day": str(step + 1),
                         "metrics.stream_joint_recall": value})
    return pd.DataFrame(rows)


def build_tables(runs, history=None, references=None) -> list[Table]:
    """Every table that the finished ``runs`` support (see the module docstring); ``history(run_id, key)``
    feeds the streaming table, ``references(run)`` the oracle column."""
    runs = finished(runs)
    if runs.empty:
        return []
    settings = varying_settings(runs)
    tables = [method_table(runs, settings, references)]
    for key in settings:
        leaf = key.rsplit(".", 1)[-1]
        if key.startswith("objective.") and leaf.endswith("tau"):
            tables.append(curve_table(runs, settings, key, "joint_recall", leaf,
                                      f"Joint recall vs {key}", key, "joint recall"))
    if SAMPLE_NUM in settings:
        tables.append(curve_table(runs, settings, SAMPLE_NUM, "joint_recall", "sample_num",
                                  "Joint recall vs sampled negatives", "in-batch negatives per request (sample_num)",
                                  "joint recall"))
        if "metrics.step_time_s" in runs and runs["metrics.step_time_s"].notna().any():
            tables.append(curve_table(runs, settings, SAMPLE_NUM, "step_time_s", "step_time",
                                      "Training step time vs sampled negatives (ms)",
                                      "in-batch negatives per request (sample_num)", "ms per step",
                                      scale=1000.0, digits=2))
    if ROWS_PER_DAY in settings:
        tables.append(curve_table(runs, settings, ROWS_PER_DAY, "joint_recall", "learning_curve",
                                  "Learning curve: joint recall vs training requests per day",
                                  "training requests per day (data.max_rows_per_day)", "joint recall"))
    streamed = runs["metrics.stream_joint_recall"].notna() if "metrics.stream_joint_recall" in runs else None
    if history is not None and streamed is not None and streamed.any():
        stream = streaming_frame(runs[streamed], history)
        if not stream.empty:
            tables.append(curve_table(stream, settings, "stream_day", "stream_joint_recall", "streaming",
                                      "Streaming evaluation: joint recall on the next day",
                                      "evaluated day (model trained on all earlier days)", "joint recall"))
    return tables


# ----------------------------------------------------------------------------------------------------------
# significance


_SIMPSON = 400  # intervals of the t density's integral


def _t_cdf(x: float, df: float) -> float:
    """P(T <= x) for x >= 0 and Student's t with ``df`` (real, > 0) degrees of freedom: 1/2 plus the
    density's integral over [0, x] by Simpson's rule (the density is smooth there)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    t = np.linspace(0.0, x, _SIMPSON + 1)
    weights = np.where(np.arange(_SIMPSON + 1) % 2 == 1, 4.0, 2.0)
    weights[[0, -1]] = 1.0
    density = c * (1 + t * t / df) ** (-(df + 1) / 2)
    return 0.5 + x / _SIMPSON / 3 * float(weights @ density)


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (p >= 1/2) of Student's t with ``df`` degrees of freedom, by bisection on
    :func:`_t_cdf`; e.g. ``t_quantile(0.975, 2) = 4.3027``."""
    lo, hi = 0.0, 2.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Difference:
    """``mean``: a method's mean minus the baseline's; ``[lo, hi]``: its interval (None without one);
    ``test``: ``paired``, ``welch`` or ``n=1`` (too few runs for an interval)."""

    mean: float
    lo: float | None = None
    hi: float | None = None
    test: str = "n=1"

    @property
    def significant(self) -> bool | None:
        """Whether the interval excludes 0; None without an interval."""
        return None if self.lo is None else not (self.lo <= 0.0 <= self.hi)

    def markdown(self) -> str:
        if self.lo is None:
            return f"{self.mean:+.4f} ({self.test})"
        return f"{self.mean:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}] {self.test}" + ("" if self.significant else " n.s.")


def difference(runs: list[tuple[str, float]], base: list[tuple[str, float]], level: float = LEVEL) -> Difference:
    """``runs`` minus ``base`` (each ``[(seed, value), ...]``) with a ``level`` interval.

    Paired when both ran the same seeds, each once (n >= 2): ``d_i = x_i - y_i`` per seed,
    ``mean(d) ± t_{(1+level)/2, n-1} * sd(d) / sqrt(n)``. Otherwise Welch (n >= 2 on each side):
    ``mean(x) - mean(y) ± t_{(1+level)/2, nu} * se`` with ``se² = s_x²/n_x + s_y²/n_y`` and
    Welch-Satterthwaite ``nu = se⁴ / ((s_x²/n_x)²/(n_x-1) + (s_y²/n_y)²/(n_y-1))``. Otherwise the
    difference of means alone. Sample standard deviations (n - 1).
    """
    x, y = [v for _, v in runs], [v for _, v in base]
    seeds_x, seeds_y = [s for s, _ in runs], [s for s, _ in base]
    mean = statistics.fmean(x) - statistics.fmean(y)
    q = (1 + level) / 2
    if len(x) >= 2 and len(set(seeds_x)) == len(x) and sorted(seeds_x) == sorted(seeds_y):
        by_seed = dict(base)
        d = [v - by_seed[s] for s, v in runs]
        half = t_quantile(q, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
        return Difference(mean, mean - half, mean + half, "paired")
    if len(x) >= 2 and len(y) >= 2:
        vx, vy = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
        if vx + vy == 0:
            return Difference(mean, mean, mean, "welch")
        nu = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
        half = t_quantile(q, nu) * math.sqrt(vx + vy)
        return Difference(mean, mean - half, mean + half, "welch")
    return Difference(mean)


# ----------------------------------------------------------------------------------------------------------
# the oracle: reference rankings recorded in the runs' dataset.json


@dataclass(frozen=True)
class Reference:
    """Joint recall of reference rankings on a run's evaluation day (``dataset.json`` ``extra.oracle``)."""

    oracle: float
    popularity: float
    random: float
    where: str  # "<data.path>, <day>"


class DatasetReferences:
    """``references(run) -> Reference | None`` from the dataset.json at the run's ``data.path`` (each read
    once). A run gets one when its dataset records the oracle for its cascade (two- or three-stage view),
    its ground-truth quota and last stage's k are the oracle's (Joint R@gt_k@k), and it evaluated on the
    logged candidates only (``data.eval_sample_num`` 0). The evaluation day is ``data.eval_day``, by
    default the dataset's last day (as the training plan picks it)."""

    def __init__(self) -> None:
        self._meta: dict[str, DatasetMeta | None] = {}
        self.unavailable: dict[str, str] = {}  # data.path -> why it has no oracle

    def _read(self, path: str) -> DatasetMeta | None:
        if path not in self._meta:
            try:
                self._meta[path] = DatasetMeta.read(path)
            except DataError as exc:
                self._meta[path] = None
                self.unavailable[path] = str(exc).split("; ")[0]
        return self._meta[path]

    def __call__(self, run) -> Reference | None:
        path = run.get("params.data.path")
        meta = self._read(path) if isinstance(path, str) else None
        recorded = meta.extra.get("oracle") if meta is not None else None
        if not recorded:
            if meta is not None:
                self.unavailable[path] = "its dataset.json records no oracle (not written by cascadelab generate)"
            return None
        default = CascadeConfig()
        n = stage_count(run) or len(default.stages)
        view = recorded.get("three_stage" if n >= 3 else "two_stage")
        gt_k = run.get("params.objective.gt_k", str(default.objective.gt_k))
        k = run.get(f"params.stages.{n - 1}.k", str(default.stages[-1].k))
        if (view is None or (gt_k, k) != (str(recorded["gt_k"]), str(recorded["k"]))
                or run.get("params.data.eval_sample_num", "0") != "0"):
            return None
        day = run.get("params.data.eval_day")
        day = day if isinstance(day, str) and day in view["per_day"] else max(view["per_day"])
        values = view["per_day"][day]
        return Reference(values["oracle"], values["popularity"], values["random"], f"{path}, {day}")

    def log_unavailable(self) -> None:
        """One log line for the datasets whose oracle could not be read."""
        if self.unavailable:
            log.warning("no oracle column for data.path %s", "; ".join(
                f"'{p}' ({why})" for p, why in sorted(self.unavailable.items())))


def _references(runs, group: list[str], references) -> dict[tuple, Reference]:
    """``{group key: Reference}`` for the groups whose runs all have the same reference."""
    found: dict[tuple, set] = {}
    for _, run in runs.iterrows():
        key = tuple(_key(run.get(f"params.{g}")) for g in group)
        found.setdefault(key, set()).add(references(run))
    return {key: next(iter(refs)) for key, refs in found.items() if len(refs) == 1 and None not in refs}


# ----------------------------------------------------------------------------------------------------------
# the job


def write_tables(tables: list[Table], out: Path) -> list[Path]:
    """``<key>.csv`` (+ ``<key>.png``) per table and ``tables.md`` with all of them."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for table in tables:
        path = out / f"{table.key}.csv"
        table.frame.to_csv(path, index=False)
        files.append(path)
        if table.figure is not None:
            path = out / f"{table.key}.png"
            table.figure.savefig(path, dpi=120)
            plt.close(table.figure)
            files.append(path)
    md = out / "tables.md"
    md.write_text("\n\n".join(f"### {t.title}\n\n{t.markdown}" for t in tables) + "\n")
    return [*files, md]


def compare(uri: str, sweep: str | None = None, experiment: str | None = None,
            out: str | Path | None = None) -> CompareResult:
    """Tables for a sweep (its child runs; files also logged to the parent run under ``compare/``) or for
    every finished training run of an experiment; files go to ``out`` (default ``compare_results/<name>``)."""
    from mlflow import MlflowClient

    runs, parent = load_runs(uri, sweep, experiment)
    label = f"sweep {sweep}" if sweep else f"experiment {experiment}"
    client = MlflowClient(uri)

    references = DatasetReferences()
    tables = build_tables(runs, run_history(client), references)
    references.log_unavailable()
    if not tables:
        raise ConfigError(f"{'--sweep' if sweep else '--experiment'} {sweep or experiment}: no finished runs with "
                          f"joint_recall yet ({len(runs)} runs found at {uri})")
    result = CompareResult(label, parent, len(finished(runs)), tables)
    result.files = write_tables(tables, Path(out) if out else Path("compare_results") / (sweep or experiment))
    if parent is not None:
        for path in result.files:
            log_artifacts(uri, parent, path, "compare")
    return result
