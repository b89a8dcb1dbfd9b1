"""One self-contained HTML page for one or more sweeps: compare's tables and figures, throughput, trials.

The page reads the runs the way ``cascadelab compare`` does (:func:`compare.load_runs`,
:func:`compare.build_tables` with the runs' dataset.json oracle), so every cell is compare's own
text. Its sections, each shown only when a sweep has its data (the page says which were left out and
why):

* methods: method x metric, mean ± std over seeds, difference to bce with a 95% interval (``n.s.``
  marked), oracle and fraction of it (LCRON Table 2 shape);
* temperature: joint recall against each temperature that varies (``objective.tau`` ...);
* negative samples: joint recall (and step time) against ``data.sample_num`` (DFTopK Fig. 4 shape);
* streaming: joint recall on the next day per training day (DFTopK Fig. 5 shape);
* throughput: training samples/s per method (``throughput/samples_per_s_total``, mean ± std over seeds);
* trials: every child run with its MLflow run, linked to the UI when the tracking URI is http(s).

A method table without the oracle column is listed among the left-out parts with the reason (the
dataset is gone, records no oracle, or the runs evaluate another cut-off or candidate set).

Self-contained: CSS inline, figures as base64 PNG data URIs, no script; the only links out of the page
are the runs' MLflow UI addresses. The page is logged to each sweep's parent run under ``report/``.
mlflow and matplotlib are imported lazily, inside the functions that use them.
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cascadelab.platform.config import ConfigError
from cascadelab.platform.metric_names import RUN_RATE, internal_name
from cascadelab.platform.tracking import log_artifacts
from cascadelab.platform.tune.compare import (
    JOINT,
    METHOD,
    SEED,
    DatasetReferences,
    Table,
    build_tables,
    finished,
    load_runs,
    metric_labels,
    run_history,
    varying_settings,
)

ARTIFACT_DIR = "report"  # where the page goes on each sweep's parent run


@dataclass(frozen=True)
class Link:
    """A table cell that links to ``href`` (a run's MLflow UI page)."""

    text: str
    href: str


@dataclass
class SweepData:
    """One sweep as the report reads it: its child runs (all statuses) and compare's tables of them."""

    name: str
    parent_run_id: str
    experiment_id: str
    runs: pd.DataFrame  # compare.load_runs's frame: run_id, status, params.<key>, metrics.<key>
    tables: list[Table] = field(default_factory=list)


@dataclass(frozen=True)
class SectionSpec:
    """A section built from compare's tables whose key ``matches``; ``missing`` says why it can be absent."""

    key: str
    title: str
    about: str
    matches: Callable[[str], bool]
    missing: str


SECTIONS = (
    SectionSpec("methods", "Methods", "LCRON Table 2 shape: methods as rows, mean ± std over seeds; the joint "
                "recall's difference to bce with a 95% interval (n.s.: not significant) and, where the dataset "
                "records it, the oracle's joint recall and the fraction of it reached.",
                lambda key: key == "methods", "no finished runs with joint recall"),
    SectionSpec("temperature", "Recall against temperature", "Joint recall against each temperature the "
                "sweep varies, mean ± std over seeds.", lambda key: key.endswith("tau"),
                "no sweep varies a temperature (objective.tau, objective.lcron_tau, objective.arf_tau)"),
    SectionSpec("negatives", "Recall against negative samples", "DFTopK Fig. 4 shape: joint recall (and "
                "training step time) against the in-batch negatives per request (data.sample_num).",
                lambda key: key in ("sample_num", "step_time"), "no sweep varies data.sample_num"),
    SectionSpec("streaming", "Streaming recall per day", "DFTopK Fig. 5 shape: the model trained on days "
                "1..d scored on day d + 1, for every training day.", lambda key: key == "streaming",
                "no finished run was trained with train.streaming_eval=true"),
)


# ----------------------------------------------------------------------------------------------------------
# HTML pieces


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI (``<uri>/#/experiments/<id>/runs/<run_id>``) when ``uri`` is an
    http(s) tracking server; None for a local store (sqlite, file), which has no UI address."""
    if not uri.lower().startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def run_cell(uri: str, experiment_id: str, run_id: str) -> Link | str:
    """A run as a table cell: a :class:`Link` to its UI page, else its run id as text."""
    href = run_link(uri, experiment_id, run_id)
    return Link(run_id, href) if href else run_id


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _content(value: Any) -> str:
    """A cell's inner HTML: a :class:`Link` as a link, anything else as escaped text (NaN / None empty)."""
    if isinstance(value, Link):
        return f'<a href="{html.escape(value.href)}">{html.escape(value.text)}</a>'
    return html.escape(_text(value))


def _cell(value: Any) -> str:
    marked = ' class="ns"' if _text(value).endswith(" n.s.") else ""
    return f"<td{marked}>{_content(value)}</td>"


def html_table(frame: pd.DataFrame, table_id: str) -> str:
    """``frame`` as an HTML table (header: its columns; cells escaped, :class:`Link` cells as links, a
    difference ending in ``n.s.`` marked with class ``ns``) with id ``table_id``."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>\n"
                   for row in frame.itertuples(index=False, name=None))
    return (f'<div class="wide"><table id="{html.escape(table_id)}">\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}</tbody>\n</table></div>")


def markdown_frame(markdown: str) -> tuple[pd.DataFrame, list[str]]:
    """A compare table's markdown as ``(frame of its cells as text, the paragraphs under it)``: the first
    ``|``-line is the header, the second the separator, the rest rows."""
    lines = [line.strip() for line in markdown.splitlines()]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    notes = [p.strip() for p in "\n".join(line for line in lines if not line.startswith("|")).split("\n\n")]
    if len(rows) < 2:
        raise ValueError(f"not a markdown table: {markdown[:80]!r}")
    return pd.DataFrame(rows[2:], columns=rows[0]), [n for n in notes if n]


def figure_img(fig, alt: str) -> str:
    """A matplotlib figure as an ``<img>`` with a base64 PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table_html(table: Table, sweep: str) -> str:
    """One compare table: title, cells, the notes under it, its figure inline."""
    frame, notes = markdown_frame(table.markdown)
    parts = [f"<h4>{html.escape(table.title)}</h4>", html_table(frame, f"{sweep}/{table.key}")]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    if table.figure is not None:
        parts.append(figure_img(table.figure, table.title))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------
# tables the report adds: throughput per method, the trials


def _method_group(runs: pd.DataFrame) -> list[str]:
    """The settings a method is made of, as in compare's method table: the objective, then every other
    setting that varies (seeds are what is averaged)."""
    settings = varying_settings(runs)
    return [METHOD, *[s for s in settings if s != METHOD]] if f"params.{METHOD}" in runs else settings


def method_label(run, group: list[str]) -> str:
    """A run's method as compare's method table names it: ``dftopk (objective.tau=5.0)``."""
    def value(key: str) -> str:  # a missing param reads "null", as compare groups it
        v = run.get(f"params.{key}")
        return v if isinstance(v, str) else "null"

    extra = [f"{g}={value(g)}" for g in group if g != METHOD]
    name = value(METHOD) if METHOD in group else "all runs"
    return f"{name} ({', '.join(extra)})" if extra else name


def throughput_column(runs: pd.DataFrame) -> str | None:
    """The runs' column of the whole run's training rate (internal key ``samples_per_s_total``, logged as
    ``throughput/samples_per_s_total``), or None when no run logged it."""
    cols = [c for c in runs.columns if c.startswith("metrics.") and runs[c].notna().any()
            and internal_name(c.removeprefix("metrics.")) == RUN_RATE]
    return min(cols, key=len) if cols else None


def mean_std(values: list[float], digits: int) -> str:
    """``mean ± std`` (sample std) of ``values``; one value has no spread: ``mean (n=1)``."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def throughput_frame(runs: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame | None:
    """Training samples/s per method over the finished ``runs``: columns ``Method``, ``samples/s`` (the
    cell text), ``runs``, ``mean``, ``std``; rows in ``methods`` order (e.g. the method table's), then any
    other. None when no run logged its rate."""
    runs = finished(runs)
    col = throughput_column(runs)
    if col is None:
        return None
    group = _method_group(runs)
    by_method: dict[str, list[float]] = {}
    for _, run in runs.iterrows():
        if not math.isnan(run[col]):
            by_method.setdefault(method_label(run, group), []).append(float(run[col]))
    order = [m for m in (methods or []) if m in by_method] + [m for m in by_method if m not in (methods or [])]
    rates = [by_method[m] for m in order]
    return pd.DataFrame({"Method": order, "samples/s": [mean_std(r, 0) for r in rates],
                         "runs": [len(r) for r in rates], "mean": [statistics.fmean(r) for r in rates],
                         "std": [statistics.stdev(r) if len(r) > 1 else 0.0 for r in rates]})


def throughput_figure(frame: pd.DataFrame):
    """Horizontal bars of samples/s per method with the seed std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(frame)))
    ax.barh(frame["Method"], frame["mean"], xerr=frame["std"], capsize=3)
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xlabel("training samples/s")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _number(value: Any, digits: int) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def trials_frame(runs: pd.DataFrame, uri: str, experiment_id: str) -> pd.DataFrame:
    """One row per child run (any status): name, method, seed, status, joint recall, samples/s, and the
    MLflow run (a link for an http(s) tracking server, else the run id)."""
    done = finished(runs)
    group = _method_group(done if not done.empty else runs)
    joint = metric_labels(done)[JOINT] if not done.empty else "Joint R"
    rate = throughput_column(runs)
    rows = []
    for _, run in runs.sort_values("start_time", kind="stable").iterrows():
        rows.append({"Trial": run.get("run_name"), "Method": method_label(run, group),
                     "seed": run.get(f"params.{SEED}"), "status": run.get("status"),
                     joint: _number(run.get(f"metrics.{JOINT}"), 4),
                     "samples/s": _number(run.get(rate), 0) if rate else "",
                     "MLflow run": run_cell(uri, experiment_id, run["run_id"])})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# reading the sweeps


def load_sweep(uri: str, name: str, references: DatasetReferences) -> SweepData:
    """Sweep ``name``'s child runs and compare's tables of them (ConfigError, one line naming the sweep and
    ``uri``, when there is no sweep of that name)."""
    from mlflow import MlflowClient

    runs, parent = load_runs(uri, sweep=name)
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent).info.experiment_id
    return SweepData(name, parent, experiment_id, runs, build_tables(runs, run_history(client), references))


# ----------------------------------------------------------------------------------------------------------
# the page


@dataclass
class Section:
    key: str  # the HTML anchor
    title: str
    about: str  # one paragraph: what the section shows
    body: str  # HTML


def _sweep_heading(sweep: SweepData, uri: str) -> str:
    parent = run_cell(uri, sweep.experiment_id, sweep.parent_run_id)
    done = len(finished(sweep.runs))
    return (f"<h3>sweep {html.escape(sweep.name)}</h3>\n<p>parent run {_content(parent)}; {done} finished of "
            f"{len(sweep.runs)} trials</p>")


def compare_sections(sweeps: list[SweepData], uri: str) -> tuple[list[Section], dict[str, str]]:
    """The sections made of compare's tables (:data:`SECTIONS`, then any other table compare builds) and
    ``{section title: why it is left out}`` for those no sweep has data for."""
    sections, left_out = [], {}
    specs = [*SECTIONS, SectionSpec("other", "Other tables", "Further tables compare builds for these runs.",
                                    lambda key: not any(s.matches(key) for s in SECTIONS), "")]
    for spec in specs:
        parts = []
        for sweep in sweeps:
            tables = [t for t in sweep.tables if spec.matches(t.key)]
            if tables:
                parts += [_sweep_heading(sweep, uri), *(table_html(t, sweep.name) for t in tables)]
        if parts:
            sections.append(Section(spec.key, spec.title, spec.about, "\n".join(parts)))
        elif spec.missing:
            left_out[spec.title] = spec.missing
    return sections, left_out


def throughput_section(sweeps: list[SweepData], uri: str) -> Section | None:
    """Training samples/s per method for each sweep whose runs logged it; None when none did."""
    parts = []
    for sweep in sweeps:
        methods = next((markdown_frame(t.markdown)[0]["Method"].tolist() for t in sweep.tables
                        if t.key == "methods"), None)
        frame = throughput_frame(sweep.runs, methods)
        if frame is not None:
            parts += [_sweep_heading(sweep, uri),
                      html_table(frame[["Method", "samples/s", "runs"]], f"{sweep.name}/throughput"),
                      figure_img(throughput_figure(frame), f"samples/s per method, sweep {sweep.name}")]
    if not parts:
        return None
    about = ("Training samples/s per method (rows trained over training seconds, all workers; "
             "throughput/samples_per_s_total), mean ± std over seeds.")
    return Section("throughput", "Training throughput", about, "\n".join(parts))


def trials_section(sweeps: list[SweepData], uri: str) -> Section:
    """Every trial of every sweep with its MLflow run."""
    how = ("each run id links to its page in the MLflow UI" if run_link(uri, "0", "0") else
           f"the tracking store {uri} has no web UI address; open it with `mlflow ui --backend-store-uri {uri}` "
           "and search for the run id")
    parts = []
    for sweep in sweeps:
        parts += [_sweep_heading(sweep, uri),
                  html_table(trials_frame(sweep.runs, uri, sweep.experiment_id), f"{sweep.name}/trials")]
    return Section("trials", "Trials", f"Every trial of the sweep and its MLflow run ({how}).", "\n".join(parts))


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
div.wide{overflow-x:auto}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
td.ns{color:#888}p.note{font-size:.85em;color:#555;margin:.2em 0}img{max-width:100%;display:block}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"""


def page(uri: str, sweeps: list[SweepData], sections: list[Section], left_out: dict[str, str]) -> str:
    """The whole HTML document: heading, contents, the sections, and what was left out and why."""
    names = ", ".join(s.name for s in sweeps)
    contents = "".join(f'<li><a href="#{s.key}">{html.escape(s.title)}</a></li>' for s in sections)
    body = [f'<h1>cascadelab report: sweep {html.escape(names)}</h1>',
            f"<p>tracking URI {html.escape(uri)}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>",
            f"<ul>{contents}</ul>"]
    for s in sections:
        body += [f'<h2 id="{s.key}">{html.escape(s.title)}</h2>', f"<p>{html.escape(s.about)}</p>", s.body]
    if left_out:
        items = "".join(f"<li>{html.escape(title)}: {html.escape(why)}</li>" for title, why in left_out.items())
        body += ['<h2 id="left-out">Left out</h2>', "<p>Sections without data in these sweeps:</p>",
                 f"<ul>{items}</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>cascadelab report: {html.escape(names)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n"
            "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _oracle_left_out(sweeps: list[SweepData], unavailable: dict[str, str]) -> dict[str, str]:
    """``{"Oracle column (sweep ...)": why}`` for the sweeps whose method table has no oracle column."""
    without = [s.name for s in sweeps for t in s.tables if t.key == "methods" and "oracle" not in t.frame]
    if not without:
        return {}
    why = "; ".join(f"data.path '{path}': {reason}" for path, reason in sorted(unavailable.items())) or (
        "the dataset records no oracle for the runs' evaluation (Joint R@gt_k@k of the last stage on the "
        "logged candidates, data.eval_sample_num=0)")
    return {f"Oracle column (sweep {', '.join(without)})": why}


def render(uri: str, sweeps: list[SweepData], unavailable: dict[str, str] | None = None,
           ) -> tuple[str, list[Section], dict[str, str]]:
    """``(HTML, its sections, {left-out section: why})`` for the loaded ``sweeps``; ``unavailable``: the
    datasets without an oracle and why (:attr:`DatasetReferences.unavailable`)."""
    sections, left_out = compare_sections(sweeps, uri)
    left_out.update(_oracle_left_out(sweeps, unavailable or {}))
    throughput = throughput_section(sweeps, uri)
    if throughput is not None:
        sections.append(throughput)
    else:
        left_out["Training throughput"] = f"no finished run logged {RUN_RATE}"
    sections.append(trials_section(sweeps, uri))
    for sweep in sweeps:
        if not sweep.tables:
            left_out[f"sweep {sweep.name}"] = f"no finished runs with {JOINT} yet ({len(sweep.runs)} runs found)"
    return page(uri, sweeps, sections, left_out), sections, left_out


# ----------------------------------------------------------------------------------------------------------
# the job


@dataclass
class ReportResult:
    path: Path
    sweeps: list[SweepData]
    sections: list[str]  # titles, in page order
    left_out: dict[str, str]  # section title -> why


def report(uri: str, sweeps: list[str], out: str | Path) -> ReportResult:
    """Write the report of ``sweeps`` (names; each read as ``compare --sweep NAME`` reads it) to ``out`` and
    log it to each sweep's parent run under ``report/``. Raises ConfigError for an unknown sweep or when
    no sweep has a finished run, before anything is written."""
    references = DatasetReferences()
    data = [load_sweep(uri, name, references) for name in dict.fromkeys(sweeps)]
    references.log_unavailable()
    if not any(s.tables for s in data):
        runs = sum(len(s.runs) for s in data)
        raise ConfigError(f"--sweep {', '.join(s.name for s in data)}: no finished runs with {JOINT} yet "
                          f"({runs} runs found at {uri})")
    text, sections, left_out = render(uri, data, references.unavailable)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    for sweep in data:
        log_artifacts(uri, sweep.parent_run_id, path, ARTIFACT_DIR)
    return ReportResult(path, data, [s.title for s in sections], left_out)
