"""``cascadelab report``: one page for two hand-made sweeps in a real SQLite MLflow store (no Ray, no
training), logged to both parent runs; unknown sweeps are one line."""

from __future__ import annotations

import mlflow
import pytest

from cascadelab.cli import main
from cascadelab.platform.config import flatten, load_config
from cascadelab.platform.data.synthetic import SyntheticConfig, generate
from cascadelab.platform.metric_names import MetricNames
from cascadelab.platform.tracking import end_run, log_metrics, start_run
from cascadelab.platform.tune.compare import DatasetReferences
from cascadelab.platform.tune.report import load_sweep, render
from tests.platform.tune.test_report import PageParser, assert_self_contained


def _child(uri: str, parent: str, overrides: list[str], metrics: dict[str, float],
           stream: list[float] | None = None) -> str:
    """One finished training run under ``parent``, its params as ``cascadelab train`` logs them."""
    run_id = start_run(uri, "exp", "-".join(overrides), flatten(load_config(None, overrides).to_dict()),
                       tags={"mlflow.parentRunId": parent})
    for step, value in enumerate(stream or []):
        log_metrics(uri, run_id, {"stream_joint_recall": value}, step=step)
    log_metrics(uri, run_id, metrics, step=2)
    end_run(uri, run_id)
    return run_id


def _metrics(joint: float, rate: float) -> dict[str, float]:
    return {"joint_recall": joint, "ranking_recall": joint + 0.01, "ranking_ndcg": 0.7, "retrieval_recall": 0.95,
            "retrieval_ndcg": 0.6, "samples_per_s_total": rate, "step_time_s": 0.01}


@pytest.fixture
def two_sweeps(tmp_path):
    """``grid``: bce / dftopk x 2 seeds with streaming history, on a generated dataset (it records the
    oracle); ``taus``: dftopk at tau 0.5 / 5 x 2 seeds, on a dataset that is gone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tmp_path / "data"
    oracle = generate(SyntheticConfig(days=2, requests_per_day=64, seed=1), data).extra["oracle"]
    grid = start_run(uri, "exp", "sweep-grid", {}, tags={"cascadelab.sweep": "grid"})
    for name, base in (("bce", 0.80), ("dftopk", 0.86)):
        for seed in (0, 1):
            _child(uri, grid, [f"objective.name={name}", f"train.seed={seed}", "train.streaming_eval=true",
                               f"data.path={data}"],
                   _metrics(base + seed / 100, 900 + 10 * seed), stream=[base - 0.1, base + seed / 100])
    end_run(uri, grid)
    taus = start_run(uri, "exp", "sweep-taus", {}, tags={"cascadelab.sweep": "taus"})
    for tau in (0.5, 5):
        for seed in (0, 1):
            _child(uri, taus, ["objective.name=dftopk", f"objective.tau={tau}", f"train.seed={seed}",
                               f"data.path={tmp_path / 'gone'}"], _metrics(0.8 + tau / 100 + seed / 100, 700))
    end_run(uri, taus)
    last = oracle["two_stage"]["per_day"][max(oracle["two_stage"]["per_day"])]["oracle"]
    return uri, {"grid": grid, "taus": taus}, last


def test_one_page_for_two_sweeps_logged_to_both_parents(two_sweeps, tmp_path, capsys):
    uri, parents, oracle = two_sweeps
    out = tmp_path / "page.html"
    assert main(["report", "--sweep", "grid", "--sweep", "taus", "--out", str(out), "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f"wrote {out}: Methods, Recall against temperature, Streaming recall per day, "
                          "Training throughput, Trials")
    assert printed[1:] == ["left out Recall against negative samples: no sweep varies data.sample_num",
                           f"left out Oracle column (sweep taus): data.path '{tmp_path / 'gone'}': data directory "
                           f"'{tmp_path / 'gone'}' does not exist",
                           f"logged to MLflow parent run {parents['grid']}, {parents['taus']} under report/"]
    page = PageParser(out.read_text(encoding="utf-8"))
    assert page.sections == ["methods", "temperature", "streaming", "throughput", "trials", "left-out"]
    assert {"grid/methods", "taus/methods", "taus/tau", "grid/streaming", "grid/throughput", "taus/throughput",
            "grid/trials", "taus/trials"} == set(page.tables)
    methods = page.frame("grid/methods").set_index("Method")
    assert methods.loc["dftopk", "Joint R@10@20"] == "0.8650 ± 0.0071"
    assert methods.loc["dftopk", "Oracle R@10@20"] == f"{oracle:.4f}"
    assert methods.loc["dftopk", "of oracle"] == f"{0.865 / oracle:.3f}"
    assert "of oracle" not in page.tables["taus/methods"]["header"]
    tau = page.frame("taus/tau").set_index("Method")
    assert tau.loc["dftopk", "tau=0.5"] == "0.8100 ± 0.0071" and tau.loc["dftopk", "tau=5.0"] == "0.8550 ± 0.0071"
    assert page.frame("grid/streaming").set_index("Method").loc["bce", "stream_day=1"] == "0.7000 ± 0.0000"
    assert page.frame("taus/throughput").set_index("Method").loc["dftopk (objective.tau=0.5)", "samples/s"] == (
        "700 ± 0")
    assert len(page.frame("taus/trials")) == 4
    assert_self_contained(page)
    client = mlflow.MlflowClient(uri)
    for parent in parents.values():
        assert {a.path for a in client.list_artifacts(parent, "report")} == {"report/page.html"}


def test_an_http_tracking_uri_links_every_trial(two_sweeps, tmp_path):
    uri, parents, _ = two_sweeps
    sweep = load_sweep(uri, "grid", DatasetReferences())
    server = "http://head:5000"
    html, _, _ = render(server, [sweep])  # the page as a server at `server` holding these runs shows it
    page = PageParser(html)
    links = [row[-1] for row in page.tables["grid/trials"]["links"]]
    ids = page.frame("grid/trials")["MLflow run"].tolist()
    assert links == [f"{server}/#/experiments/{sweep.experiment_id}/runs/{run_id}" for run_id in ids]
    assert f'<a href="{server}/#/experiments/{sweep.experiment_id}/runs/{parents["grid"]}">' in html
    assert_self_contained(page, allowed_href_prefix=f"{server}/#/experiments/{sweep.experiment_id}/runs/")


def test_runs_logged_under_their_mlflow_names(tmp_path, capsys):
    """The loop's keys under their MLflow names (eval/joint_recall_at_10_20, throughput/samples_per_s_total,
    stream/joint_recall_at_10_20): the same page as under the old names."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_run(uri, "exp", "sweep-named", {}, tags={"cascadelab.sweep": "named"})
    for name, base in (("bce", 0.80), ("dftopk", 0.86)):
        for seed in (0, 1):
            overrides = [f"objective.name={name}", f"train.seed={seed}", "train.streaming_eval=true"]
            names = MetricNames.of(load_config(None, overrides))
            run_id = start_run(uri, "exp", "-".join(overrides), flatten(load_config(None, overrides).to_dict()),
                               tags={"mlflow.parentRunId": parent})
            for step, value in enumerate([base - 0.1, base + seed / 100]):
                log_metrics(uri, run_id, names.day({"stream_joint_recall": value}), step=step)
            final = _metrics(base + seed / 100, 900 + 10 * seed)
            final["samples_per_s"] = final.pop("samples_per_s_total")  # the workers' key for the run's rate
            log_metrics(uri, run_id, names.final(final), step=2)
            end_run(uri, run_id)
    end_run(uri, parent)
    out = tmp_path / "p.html"
    assert main(["report", "--sweep", "named", "--out", str(out), "--tracking-uri", uri]) == 0
    page = PageParser(out.read_text(encoding="utf-8"))
    assert "throughput/samples_per_s_total" in mlflow.MlflowClient(uri).get_run(run_id).data.metrics
    assert page.frame("named/methods").set_index("Method").loc["dftopk", "Ranking R@10@20"] == "0.8750 ± 0.0071"
    assert page.frame("named/streaming").set_index("Method").loc["dftopk", "stream_day=2"] == "0.8650 ± 0.0071"
    assert page.frame("named/throughput").set_index("Method").loc["bce", "samples/s"] == "905 ± 7"
    assert page.frame("named/trials")["samples/s"].tolist() == ["900", "910"] * 2


def test_an_unknown_sweep_is_one_line_and_writes_nothing(two_sweeps, tmp_path, capsys):
    uri, _, _ = two_sweeps
    out = tmp_path / "page.html"
    assert main(["report", "--sweep", "grid", "--sweep", "nope", "--out", str(out), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cascadelab: error: --sweep nope: no sweep of that name at {uri}"]
    assert not out.exists()


def test_a_sweep_without_finished_runs_is_one_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start_run(uri, "exp", "sweep-empty", {}, tags={"cascadelab.sweep": "empty"})
    assert main(["report", "--sweep", "empty", "--out", str(tmp_path / "p.html"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cascadelab: error: --sweep empty: no finished runs with joint_recall yet (0 runs found at "
                   f"{uri})"]


def test_out_and_sweep_are_required(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--sweep", "grid"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
