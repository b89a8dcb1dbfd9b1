"""The HTML report: its pieces from pandas frames (no Ray, no MLflow), and one page rendered from a small
real sweep (real local Ray in its own process, real SQLite MLflow; killed and resumed: real_sweep.py) whose
tables are checked against the runs' metrics as MlflowClient reads them."""

from __future__ import annotations

import base64
import html.parser
import json
import statistics
from pathlib import Path

import pandas as pd
import pytest

from cascadelab.platform.tune.compare import build_tables, difference, streaming_frame
from cascadelab.platform.tune.report import (
    Link,
    SweepData,
    html_table,
    markdown_frame,
    render,
    run_link,
    throughput_frame,
    trials_frame,
)
from tests.platform.tune.real_sweep import NAME
from tests.platform.tune.real_sweep import children as children_of


class PageParser(html.parser.HTMLParser):
    """What a browser would fetch and show: every table by id (header, cell texts, cell links), every
    ``src`` / ``href``, the tags used, the section ids and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, dict[str, list]] = {}
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: set[str] = set()
        self.sections: list[str] = []
        self.text: list[str] = []
        self._table: dict | None = None
        self._cell: list[str] | None = None
        self._href: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.refs += [(tag, a, attrs[a]) for a in ("src", "href") if a in attrs]
        if tag == "table":
            self._table = self.tables.setdefault(attrs["id"], {"header": [], "rows": [], "links": []})
        elif tag == "tr" and self._table is not None:
            self._row, self._links = [], []
        elif tag in ("td", "th"):
            self._cell, self._href = [], None
        elif tag == "a" and self._cell is not None:
            self._href = attrs.get("href")
        elif tag == "h2":
            self.sections.append(attrs.get("id", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._links.append(self._href)
            self._cell = None
        elif tag == "tr" and self._table is not None:
            if self._table["header"]:
                self._table["rows"].append(self._row)
                self._table["links"].append(self._links)
            else:
                self._table["header"] = self._row
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def frame(self, table_id: str) -> pd.DataFrame:
        table = self.tables[table_id]
        return pd.DataFrame(table["rows"], columns=table["header"])


def assert_self_contained(page: PageParser, allowed_href_prefix: str | None = None) -> None:
    """No fetch leaves the page: images are data URIs (valid PNGs), links are in-page anchors or run pages."""
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    for tag, attr, value in page.refs:
        if attr == "src":
            assert tag == "img" and value.startswith("data:image/png;base64,"), value[:60]
            assert base64.b64decode(value.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert value.startswith("#") or (allowed_href_prefix and value.startswith(allowed_href_prefix)), value


# ---------------------------------------------------------------------------------------------- pieces


def test_html_table_escapes_cells_links_runs_and_marks_not_significant():
    frame = pd.DataFrame({"Method": ["<b>bce</b>", "dftopk"], "Δ": ["reference", "+0.0100 [-0.0200, +0.0400] "
                                                                      "paired n.s."],
                          "run": ["abc", Link("d&f", "http://h:5000/#/experiments/1/runs/d&f")]})
    out = html_table(frame, "s/methods")
    assert "<td>&lt;b&gt;bce&lt;/b&gt;</td>" in out and "<b>" not in out
    assert '<td class="ns">+0.0100 [-0.0200, +0.0400] paired n.s.</td>' in out
    assert '<a href="http://h:5000/#/experiments/1/runs/d&amp;f">d&amp;f</a>' in out
    page = PageParser(out)
    assert page.tables["s/methods"]["header"] == ["Method", "Δ", "run"]
    assert page.frame("s/methods")["Method"].tolist() == ["<b>bce</b>", "dftopk"]
    assert page.tables["s/methods"]["links"][1] == [None, None, "http://h:5000/#/experiments/1/runs/d&f"]


@pytest.mark.parametrize("uri, expected", [
    ("http://head:5000", "http://head:5000/#/experiments/7/runs/r1"),
    ("https://mlflow.example.org/", "https://mlflow.example.org/#/experiments/7/runs/r1"),
    ("sqlite:////tmp/mlflow.db", None),
    ("file:///tmp/mlruns", None),
])
def test_run_links_only_for_a_tracking_server(uri, expected):
    assert run_link(uri, "7", "r1") == expected


def _runs(rows: list[dict]) -> pd.DataFrame:
    """Runs as compare.load_runs reads them back (params as strings, metrics as floats)."""
    frame = []
    for i, row in enumerate(rows):
        frame.append({"run_id": f"run{i}", "run_name": f"trial-{i}", "status": row.get("status", "FINISHED"),
                      "start_time": i, "end_time": i + 1,
                      **{f"params.{k}": str(v) for k, v in row["params"].items()},
                      **{f"metrics.{k}": float(v) for k, v in row["metrics"].items()}})
    return pd.DataFrame(frame)


def _grid() -> pd.DataFrame:
    rows = []
    for name, base, rate in (("bce", 0.80, 1000.0), ("dftopk", 0.85, 800.0)):
        for seed in (0, 1):
            rows.append({"params": {"objective.name": name, "train.seed": seed, "stages.0.k": 30, "stages.1.k": 20},
                         "metrics": {"joint_recall": base + seed / 100, "ranking_recall": 0.9,
                                     "samples_per_s_total": rate + 100 * seed}})
    rows.append({"params": {"objective.name": "lcron", "train.seed": 0}, "metrics": {"train_loss": 1.0},
                 "status": "FAILED"})
    return _runs(rows)


def test_markdown_frame_reads_compares_method_table_cell_for_cell():
    methods = build_tables(_grid())[0]
    frame, notes = markdown_frame(methods.markdown)
    assert frame.columns.tolist() == ["Method", "Joint R@10@20", "Δ vs bce (95% CI)", "Ranking R@10@20", "runs"]
    assert frame.loc[0].tolist() == ["bce", "0.8050 ± 0.0071", "reference", "0.9000 ± 0.0000", "2"]
    assert frame.loc[1, "Δ vs bce (95% CI)"] == "+0.0500 [+0.0500, +0.0500] paired"
    assert len(notes) == 1 and notes[0].startswith("Δ vs bce: difference of mean joint recall")
    with pytest.raises(ValueError, match="not a markdown table"):
        markdown_frame("no table here")


def test_a_streaming_day_logged_twice_counts_once_with_its_last_value():
    """A trial resumed from the checkpoint before day 1 logs day 1 again: one row per (run, day)."""
    runs = _runs([{"params": {"objective.name": "bce", "train.seed": 0}, "metrics": {"stream_joint_recall": 0.7}}])
    logged = {"run0": [(0, 0.5), (1, 0.9), (1, 0.7)]}  # logging order: day 1 again after the resume
    frame = streaming_frame(runs, lambda run_id, key: logged[run_id])
    assert frame["params.stream_day"].tolist() == ["1", "2"]
    assert frame["metrics.stream_joint_recall"].tolist() == [0.5, 0.7]


def test_throughput_per_method_follows_the_method_order():
    frame = throughput_frame(_grid(), methods=["dftopk", "bce"])
    assert frame["Method"].tolist() == ["dftopk", "bce"]
    assert frame["samples/s"].tolist() == [f"850 ± {statistics.stdev([800, 900]):.0f}", "1050 ± 71"]
    assert frame["runs"].tolist() == [2, 2]  # the failed lcron run has no rate
    assert throughput_frame(_grid().drop(columns=["metrics.samples_per_s_total"])) is None


def test_trials_table_has_every_run_and_its_mlflow_run():
    frame = trials_frame(_grid(), "sqlite:///x.db", "3")
    assert frame["Trial"].tolist() == [f"trial-{i}" for i in range(5)]
    assert frame["status"].tolist() == ["FINISHED"] * 4 + ["FAILED"]
    assert frame["MLflow run"].tolist() == [f"run{i}" for i in range(5)]  # text: no UI for sqlite
    assert frame["Joint R@10@20"].tolist()[:2] == ["0.8000", "0.8100"]
    linked = trials_frame(_grid(), "http://head:5000", "3")["MLflow run"].tolist()
    assert linked[0] == Link("run0", "http://head:5000/#/experiments/3/runs/run0")


def test_a_page_shows_only_the_sections_it_has_data_for():
    runs = _grid()
    html, sections, left_out = render("sqlite:///x.db", [SweepData("grid", "p1", "3", runs, build_tables(runs))])
    page = PageParser(html)
    assert page.sections == ["methods", "throughput", "trials", "left-out"]
    assert [s.key for s in sections] == ["methods", "throughput", "trials"]
    assert left_out == {
        "Recall against temperature": "no sweep varies a temperature (objective.tau, objective.lcron_tau, "
                                      "objective.arf_tau)",
        "Recall against negative samples": "no sweep varies data.sample_num",
        "Streaming recall per day": "no finished run was trained with train.streaming_eval=true",
        "Oracle column (sweep grid)": "the dataset records no oracle for the runs' evaluation (Joint R@gt_k@k of "
                                      "the last stage on the logged candidates, data.eval_sample_num=0)"}
    text = " ".join(" ".join(page.text).split())
    for title, why in left_out.items():
        assert f"{title}: {why}" in text
    assert page.frame("grid/throughput")["Method"].tolist() == ["bce", "dftopk"]
    assert page.frame("grid/methods").equals(markdown_frame(build_tables(runs)[0].markdown)[0])
    assert_self_contained(page)
    assert sum(tag == "img" for tag, _, _ in page.refs) == 1  # the throughput bars


# ---------------------------------------------------------------------------------------------- a real sweep


def _metric(run, name: str) -> float:
    """The run's final ``name`` (``joint_recall``, ``ranking_ndcg``...) under its logged name, old or new
    (``eval/joint_recall_at_10_20``)."""
    keys = [k for k in run.data.metrics if k.rsplit("/", 1)[-1].startswith(name) and not k.startswith("stream")]
    assert keys, (name, sorted(run.data.metrics))
    return run.data.metrics[min(keys, key=len)]


def _stage_metric(label: str) -> str:
    """A method-table column as the metric it shows: ``Ranking R@10@20`` -> ``ranking_recall``."""
    stage, kind = label.split(" ")[:2]
    return f"{stage.lower()}_{'ndcg' if kind.startswith('NDCG') else 'recall'}"


def _cell(values: list[float], digits: int = 4) -> str:
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _check_methods(page: PageParser, name: str, by_method: dict[str, list], dataset: Path) -> None:
    """Every mean ± std is the children's, the difference is paired by seed, the oracle is the dataset's
    record for the evaluation (last) day."""
    methods = page.frame(f"{name}/methods").set_index("Method")
    assert methods.index.tolist() == ["bce", "dftopk"]
    stage_columns = [c for c in methods.columns if c.split(" ")[0] in ("Ranking", "Retrieval")]
    assert len(stage_columns) == 4
    for method, runs in by_method.items():
        assert methods.loc[method, "Joint R@10@20"] == _cell([_metric(r, "joint_recall") for r in runs])
        for column in stage_columns:
            assert methods.loc[method, column] == _cell([_metric(r, _stage_metric(column)) for r in runs])
        assert methods.loc[method, "runs"] == "2"
    seeds = {m: [(r.data.params["train.seed"], _metric(r, "joint_recall")) for r in runs]
             for m, runs in by_method.items()}
    diff = difference(seeds["dftopk"], seeds["bce"])
    assert methods.loc["bce", "Δ vs bce (95% CI)"] == "reference"
    assert methods.loc["dftopk", "Δ vs bce (95% CI)"].startswith(
        f"{diff.mean:+.4f} [{diff.lo:+.4f}, {diff.hi:+.4f}] paired")
    per_day = json.loads((dataset / "dataset.json").read_text())["extra"]["oracle"]["two_stage"]["per_day"]
    oracle = per_day[max(per_day)]["oracle"]
    for method, runs in by_method.items():
        mean = statistics.fmean(_metric(r, "joint_recall") for r in runs)
        assert methods.loc[method, "Oracle R@10@20"] == f"{oracle:.4f}"
        assert methods.loc[method, "of oracle"] == f"{mean / oracle:.3f}"


def _check_streaming_and_throughput(page: PageParser, name: str, by_method: dict[str, list], client) -> None:
    """Streaming cells are the children's stream joint recall history (step d: trained through day d,
    scored on day d + 1); throughput cells their samples_per_s_total."""
    streaming = page.frame(f"{name}/streaming").set_index("Method")
    throughput = page.frame(f"{name}/throughput").set_index("Method")
    for method, runs in by_method.items():
        logged = [sorted(client.get_metric_history(r.info.run_id, _stream_key(r)), key=lambda m: (m.step, m.timestamp))
                  for r in runs]  # a day logged again after the resume: its last value counts
        histories = [{m.step: m.value for m in history} for history in logged]
        days = sorted(histories[0])
        assert len(days) == 2 and streaming.columns.tolist() == [f"stream_day={d + 1}" for d in days]
        for d in days:
            assert streaming.loc[method, f"stream_day={d + 1}"] == _cell([h[d] for h in histories])
        assert throughput.loc[method, "samples/s"] == _cell([_metric(r, "samples_per_s_total") for r in runs], 0)


def _check_trials(page: PageParser, name: str, children: list, client) -> None:
    """One row per child run, with its run id (a sqlite store has no UI address: no links)."""
    trials = page.frame(f"{name}/trials")
    assert sorted(trials["MLflow run"]) == sorted(r.info.run_id for r in children)
    assert all(href is None for row in page.tables[f"{name}/trials"]["links"] for href in row)
    for _, row in trials.iterrows():
        run = client.get_run(row["MLflow run"])
        assert row["Trial"] == run.info.run_name and row["status"] == "FINISHED"
        assert row["Joint R@10@20"] == f"{_metric(run, 'joint_recall'):.4f}"


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_report_of_a_real_sweep_matches_mlflow(resumed_sweep):
    from mlflow import MlflowClient

    from cascadelab.cli import main

    assert resumed_sweep.resumed.returncode == 0, resumed_sweep.resumed.stderr[-3000:]
    uri, dataset, name = resumed_sweep.uri, resumed_sweep.dataset, NAME
    out = resumed_sweep.root / "report" / f"{name}.html"
    assert main(["report", "--sweep", name, "--out", str(out), "--tracking-uri", uri]) == 0
    page = PageParser(out.read_text(encoding="utf-8"))
    client = MlflowClient(uri)
    parent = client.get_run(resumed_sweep.parent_id)
    children = children_of(client, parent.info.run_id)
    by_method = {m: sorted((r for r in children if r.data.params["objective.name"] == m),
                           key=lambda r: r.data.params["train.seed"]) for m in ("bce", "dftopk")}
    assert [len(v) for v in by_method.values()] == [2, 2]
    assert page.sections == ["methods", "streaming", "throughput", "trials", "left-out"]
    _check_methods(page, name, by_method, dataset)
    _check_streaming_and_throughput(page, name, by_method, client)
    _check_trials(page, name, children, client)
    text = " ".join(" ".join(page.text).split())
    assert "Recall against temperature: no sweep varies a temperature" in text
    assert "Recall against negative samples: no sweep varies data.sample_num" in text
    assert "Oracle column" not in text
    assert_self_contained(page)
    assert sum(tag == "img" for tag, _, _ in page.refs) == 2  # the streaming curve, the throughput bars

    # logged to the sweep's parent run, byte for byte
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {f"report/{name}.html"}
    logged = Path(client.download_artifacts(parent.info.run_id, f"report/{name}.html",
                                            str(resumed_sweep.root / "dl")))
    assert logged.read_bytes() == out.read_bytes()


def _stream_key(run) -> str:
    """The run's streaming joint recall series under its logged name, old or new."""
    return next(k for k in sorted(run.data.metrics, key=len) if k.startswith("stream") and "joint_recall" in k)
