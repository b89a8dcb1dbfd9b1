"""Read finished training runs back from MLflow and turn them into paper-style tables and plots.

Tables (each as markdown for the terminal, a CSV of means/stds/run counts, and a PNG where it is a curve):

* ``methods``: method x metric, mean ± std over seeds (LCRON Table 2 shape). A method is the objective
  plus every other setting that varies between the runs (train.seed excepted: seeds are what is averaged).
* ``tau_<key>``: joint recall against each temperature that varies (objective.tau, lcron_tau, arf_tau).
* ``sample_num``: joint recall against data.sample_num (in-batch negatives per request), when it varies.
* ``step_time``: training step time against data.sample_num, when runs logged ``step_time_s``.
* ``streaming``: streaming joint recall per evaluated day, for runs trained with train.streaming_eval.

The metric columns come from the runs' own stage lists (their ``stages.<i>.k`` params, through
:func:`cascadelab.cascade.metrics.stage_names`), so a cascade of any depth shows every stage.
MLflow and matplotlib are imported lazily, inside the functions that use them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cascadelab.cascade.metrics import stage_names
from cascadelab.cascade.objectives import OBJECTIVES
from cascadelab.platform.config import CascadeConfig, ConfigError
from cascadelab.platform.tracking import log_artifacts
from cascadelab.platform.tune.sweep import SWEEP_TAG

log = logging.getLogger(__name__)

JOINT = "joint_recall"
METHOD = "objective.name"
SEED = "train.seed"
SAMPLE_NUM = "data.sample_num"
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
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
               "start_time": run.info.start_time, "end_time": run.info.end_time}
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def load_runs(uri: str, sweep: str | None = None, experiment: str | None = None):
    """``(runs DataFrame, parent run id or None)``: a sweep's child runs, or every training run of an
    experiment (columns ``run_id``, ``status``, ``params.<key>``, ``metrics.<key>``)."""
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


def _fmt(mean: float, std: float, scale: float = 1.0, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
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


def method_table(runs, settings: list[str]) -> Table:
    metrics = [m for m in compared_metrics(runs) if f"metrics.{m}" in runs and runs[f"metrics.{m}"].notna().any()]
    group = [METHOD, *[s for s in settings if s != METHOD]] if f"params.{METHOD}" in runs else list(settings)
    agg = _aggregate(runs, group, metrics)
    labels = metric_labels(runs)
    rows = [[_method_label(r, group), *(_fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics), str(r["runs"])]
            for _, r in agg.iterrows()]
    md = _markdown(["Method", *(labels[m] for m in metrics), "runs"], rows)
    return Table("methods", "Methods (mean ± std over seeds)", agg, md)


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
        cells = {r[x_key]: (r[f"{metric}_mean"], r[f"{metric}_std"]) for _, r in part.iterrows()}
        rows.append([method, *(_fmt(*cells[x], scale=scale, digits=digits) if x in cells else "-" for x in xs)])
        series[method] = sorted(((pd.to_numeric(x, errors="coerce"), m * scale, s * scale)
                                 for x, (m, s) in cells.items()), key=lambda t: t[0])
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


def streaming_frame(runs, history) -> Any:
    """One row per (run, evaluated day) from the ``stream_joint_recall`` history; ``history(run_id, key)``
    returns ``[(step, value), ...]`` (step d: the model trained through day d, scored on day d + 1)."""
    rows = []
    for _, run in runs.iterrows():
        for step, value in history(run["run_id"], "stream_joint_recall"):
            rows.append({**run.to_dict(), "params.stream_day": str(int(step) + 1),
                         "metrics.stream_joint_recall": value})
    return pd.DataFrame(rows)


def build_tables(runs, history=None) -> list[Table]:
    """Every table that the finished ``runs`` support (see the module docstring)."""
    runs = finished(runs)
    if runs.empty:
        return []
    settings = varying_settings(runs)
    tables = [method_table(runs, settings)]
    for key in settings:
        leaf = key.rsplit(".", 1)[-1]
        if key.startswith("objective.") and leaf.endswith("tau"):
            tables.append(curve_table(runs, settings, key, "joint_recall", f"tau_{leaf}",
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
    streamed = runs["metrics.stream_joint_recall"].notna() if "metrics.stream_joint_recall" in runs else None
    if history is not None and streamed is not None and streamed.any():
        stream = streaming_frame(runs[streamed], history)
        if not stream.empty:
            tables.append(curve_table(stream, settings, "stream_day", "stream_joint_recall", "streaming",
                                      "Streaming evaluation: joint recall on the next day",
                                      "evaluated day (model trained on all earlier days)", "joint recall"))
    return tables


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

    def history(run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    tables = build_tables(runs, history)
    if not tables:
        raise ConfigError(f"{'--sweep' if sweep else '--experiment'} {sweep or experiment}: no finished runs with "
                          f"joint_recall yet ({len(runs)} runs found at {uri})")
    result = CompareResult(label, parent, len(finished(runs)), tables)
    result.files = write_tables(tables, Path(out) if out else Path("compare_results") / (sweep or experiment))
    if parent is not None:
        for path in result.files:
            log_artifacts(uri, parent, path, "compare")
    return result
