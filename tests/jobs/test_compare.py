"""``cascadelab compare``: tables from hand-made MLflow runs in a real SQLite store (no Ray, no training).

Runs are logged under their MLflow names (``eval/joint_recall_at_10_20``, ...) or, as runs logged before
those names, under the loop's keys (``joint_recall``): the ``naming`` fixture runs a test with each."""

from __future__ import annotations

import argparse

import mlflow
import pandas as pd
import pytest

from cascadelab.cascade.metrics import metric_names
from cascadelab.jobs import compare as compare_job
from cascadelab.jobs.common import run_main
from cascadelab.platform.config import flatten, load_config
from cascadelab.platform.data.synthetic import SyntheticConfig, generate
from cascadelab.platform.metric_names import MetricNames
from cascadelab.platform.tracking import end_run, log_metrics, start_run
from cascadelab.platform.tune.compare import t_quantile


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cascadelab")
    sub = parser.add_subparsers(dest="command", required=True)
    compare_job.add_parser(sub)
    args = parser.parse_args(["compare", *argv])
    return run_main(args.func, args)


@pytest.fixture(params=["current", "old"])
def naming(request) -> str:
    """How the runs name their metrics: MLflow names (``current``) or the loop's keys (``old``)."""
    return request.param


def _named(cfg, metrics: dict[str, float], naming: str) -> dict[str, float]:
    """``metrics`` (internal keys) as a run of ``cfg`` logs them: evaluation keys under their end-of-run
    names, the others (``step_time_s``, ``stream_*``) under their per-day names; unchanged when ``old``."""
    if naming == "old":
        return dict(metrics)
    names = MetricNames.of(cfg)
    evaluation = metric_names(len(cfg.stages))
    return {names.final_name(k) if k in evaluation else names.day_name(k): v for k, v in metrics.items()}


def _run(uri, experiment, overrides, metrics, parent=None, status="FINISHED", history=None, naming="current"):
    cfg = load_config(None, overrides)
    tags = {"mlflow.parentRunId": parent} if parent else {}
    run_id = start_run(uri, experiment, f"r-{len(overrides)}-{hash(tuple(overrides)) % 10**6}",
                       flatten(cfg.to_dict()), tags=tags)
    for key, points in (history or {}).items():
        for step, value in enumerate(points):
            log_metrics(uri, run_id, _named(cfg, {key: value}, naming), step=step)
    log_metrics(uri, run_id, _named(cfg, metrics, naming), step=2)
    end_run(uri, run_id, status)
    return run_id


def _metrics(joint, **extra):
    return {"joint_recall": joint, "ranking_recall": joint + 0.01, "ranking_ndcg": 0.7,
            "retrieval_recall": 0.95, "retrieval_ndcg": 0.6, **extra}


@pytest.fixture
def sweep_store(tmp_path, naming):
    """A sweep 'grid' with objective.name x train.seed: one parent, five children (+ one failed child)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_run(uri, "exp", "sweep-grid", {"grid.objective.name": "[bce, dftopk]"},
                       tags={"cascadelab.sweep": "grid"})
    joint = {("bce", 0): 0.80, ("bce", 1): 0.82, ("dftopk", 0): 0.86, ("dftopk", 1): 0.88, ("lcron", 0): 0.9}
    for (name, seed), value in joint.items():
        _run(uri, "exp", [f"objective.name={name}", f"train.seed={seed}"], _metrics(value), parent=parent,
             naming=naming)
    _run(uri, "exp", ["objective.name=icc", "train.seed=0"], {"train_loss": 1.0}, parent=parent, status="FAILED",
         naming=naming)
    end_run(uri, parent)
    return uri, parent, tmp_path


def test_sweep_method_table_mean_std_over_seeds(sweep_store, capsys):
    uri, parent, tmp = sweep_store
    assert _cli("--sweep", "grid", "--tracking-uri", uri, "--out", str(tmp / "out")) == 0
    out = capsys.readouterr().out
    assert "sweep grid: 5 finished runs" in out
    assert ("| Method | Joint R@10@20 | Δ vs bce (95% CI) | Ranking R@10@20 | Ranking NDCG@10 | Retrieval R@10@30 "
            "| Retrieval NDCG@10 | runs |") in out
    assert ("| bce | 0.8100 ± 0.0141 | reference | 0.8200 ± 0.0141 | 0.7000 ± 0.0000 | 0.9500 ± 0.0000 "
            "| 0.6000 ± 0.0000 | 2 |") in out
    assert "| dftopk | 0.8700 ± 0.0141 | +0.0600 [+0.0600, +0.0600] paired |" in out  # the same gap on each seed
    assert "| lcron | 0.9000 (n=1) | +0.0900 (n=1) | 0.9100 (n=1) |" in out  # one seed: no spread, no interval
    assert "icc" not in out  # the failed run is left out
    table = pd.read_csv(tmp / "out" / "methods.csv")
    assert list(table["objective.name"]) == ["bce", "lcron", "dftopk"]  # the papers' (registry) order
    assert table["joint_recall_mean"].tolist() == pytest.approx([0.81, 0.90, 0.87])
    assert table["runs"].tolist() == [2, 1, 2]
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent, "compare")}
    assert {"compare/methods.csv", "compare/tables.md"} <= artifacts


def test_tau_sample_num_and_step_time_tables_with_plots(tmp_path, capsys, naming):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_run(uri, "exp", "sweep-t", {}, tags={"cascadelab.sweep": "t"})
    for tau in (5, 500):
        for n in (0, 40):
            for seed in (0, 1):
                joint = 0.8 + tau / 10000 + n / 1000 + seed / 100
                _run(uri, "exp", ["objective.name=dftopk", f"objective.tau={tau}", f"data.sample_num={n}",
                                  f"train.seed={seed}"], _metrics(joint, step_time_s=0.01 + n / 10000), parent=parent,
                     naming=naming)
    end_run(uri, parent)
    assert _cli("--sweep", "t", "--tracking-uri", uri, "--out", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "| dftopk (data.sample_num=0, objective.tau=5.0) | 0.8055 ± 0.0071 |" in out
    assert "### Joint recall vs objective.tau" in out
    assert "| Method | tau=5.0 | tau=500.0 |" in out
    assert "| dftopk (data.sample_num=0) | 0.8055 ± 0.0071 | 0.8550 ± 0.0071 |" in out
    assert "| Method | sample_num=0 | sample_num=40 |" in out
    assert "| dftopk (objective.tau=5.0) | 10.00 ± 0.00 | 14.00 ± 0.00 |" in out  # step time in ms
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"methods.csv", "tau.csv", "tau.png", "sample_num.csv", "sample_num.png", "step_time.csv",
                     "step_time.png", "tables.md"}
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent, "compare")}
    assert {"compare/tau.png", "compare/sample_num.png", "compare/step_time.png"} <= artifacts


def test_experiment_mode_reads_plain_runs_and_streaming_history(tmp_path, capsys, naming):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name, base in (("bce", 0.80), ("dftopk", 0.85)):
        for seed in (0, 1):
            _run(uri, "plain", [f"objective.name={name}", f"train.seed={seed}", "train.streaming_eval=true"],
                 _metrics(base + seed / 100), history={"stream_joint_recall": [base - 0.1 + seed / 100,
                                                                              base + seed / 100]}, naming=naming)
    # a `train --seeds` parent (only *_mean metrics) and a failed run are not table rows
    seeds_parent = start_run(uri, "plain", "x3", {"objective.name": "lcron"})
    log_metrics(uri, seeds_parent, {"eval/joint_recall_at_10_20_mean": 0.9, "joint_recall_mean": 0.9})
    _run(uri, "plain", ["objective.name=lcron"], {"joint_recall": 0.9}, status="FAILED", naming=naming)
    assert _cli("--experiment", "plain", "--tracking-uri", uri, "--out", str(tmp_path / "o")) == 0
    out = capsys.readouterr().out
    assert "experiment plain: 4 finished runs" in out
    assert "| bce | 0.8050 ± 0.0071 |" in out and "lcron" not in out
    assert "### Streaming evaluation: joint recall on the next day" in out
    assert "| Method | stream_day=1 | stream_day=2 |" in out  # per-day history, steps 0 and 1
    assert "| dftopk | 0.7550 ± 0.0071 | 0.8550 ± 0.0071 |" in out
    assert (tmp_path / "o" / "streaming.png").is_file()


def test_unknown_sweep_or_experiment_is_one_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert _cli("--sweep", "nope", "--tracking-uri", uri, "--out", str(tmp_path)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cascadelab:")]
    assert errors == [f"cascadelab: error: --sweep nope: no sweep of that name at {uri}"]
    assert _cli("--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path)) == 2
    assert "--experiment nope: no MLflow experiment of that name" in capsys.readouterr().err


def test_sweep_without_finished_runs_is_one_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start_run(uri, "exp", "sweep-empty", {}, tags={"cascadelab.sweep": "empty"})
    assert _cli("--sweep", "empty", "--tracking-uri", uri, "--out", str(tmp_path)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cascadelab:")]
    assert len(errors) == 1 and "--sweep empty: no finished runs with joint_recall yet (0 runs found" in errors[0]


@pytest.mark.parametrize("argv", [[], ["--sweep", "a", "--experiment", "b"]])
def test_exactly_one_of_sweep_or_experiment(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli(*argv)
    assert exc.value.code == 2
    assert "--sweep" in capsys.readouterr().err


def _client_run(client, experiment_id: str, overrides: list[str], metrics: dict[str, float],
                naming: str = "current") -> str:
    """One finished training run logged through MLflow's own client (params as `cascadelab train` logs them)."""
    run = client.create_run(experiment_id, run_name="-".join(overrides))
    cfg = load_config(None, overrides)
    params = flatten(cfg.to_dict())
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()],
                     metrics=[mlflow.entities.Metric(k, v, 0, 2) for k, v in _named(cfg, metrics, naming).items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_a_four_stage_cascade_is_compared_on_every_stage(tmp_path, capsys, naming):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("deep")
    four = "stages=[{model: dssm, k: 40}, {model: mlp, k: 30}, {model: mlp, k: 25}, {model: din, k: 20}]"
    names = metric_names(4)
    assert names == ["joint_recall", "retrieval_recall", "retrieval_ndcg", "prerank1_recall", "prerank1_ndcg",
                     "prerank2_recall", "prerank2_ndcg", "ranking_recall", "ranking_ndcg"]
    for name, base in (("bce", 0.5), ("dftopk", 0.6)):
        _client_run(client, exp, [four, f"objective.name={name}"],
                    {m: base + i / 100 for i, m in enumerate(names)}, naming)
    _client_run(client, exp, ["objective.name=lcron"], _metrics(0.7), naming)  # a two-stage run beside them
    assert _cli("--experiment", "deep", "--tracking-uri", uri, "--out", str(tmp_path / "o")) == 0
    out = capsys.readouterr().out
    assert ("| Method | Joint R@10@20 | Δ vs bce (95% CI) | Ranking R@10@20 | Ranking NDCG@10 | Prerank2 R@10@25 "
            "| Prerank2 NDCG@10 | Prerank1 R@10@30 | Prerank1 NDCG@10 | Retrieval R@10@40 | Retrieval NDCG@10 "
            "| runs |") in out
    rows = {line.split(" ")[1]: [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()
            if line.startswith("| ") and "(n=1)" in line}
    assert rows["bce"][:-1] == ["0.5000 (n=1)", "reference",
                                *(f"0.{v}00 (n=1)" for v in (57, 58, 55, 56, 53, 54, 51, 52))]
    assert rows["lcron"][4:8] == ["-"] * 4  # the two-stage run beside them has no prerank stages
    table = pd.read_csv(tmp_path / "o" / "methods.csv")
    assert {"prerank1_recall_mean", "prerank2_ndcg_mean", "retrieval_recall_mean"} <= set(table.columns)


def test_runs_logged_under_old_and_current_names_share_one_table(tmp_path, capsys):
    """bce logged by hand under the loop's keys (as runs were before the MLflow names), dftopk under the
    MLflow names, lcron under both (a run resumed across versions: the current names win)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("mixed")
    old = _client_run(client, exp, ["objective.name=bce"], _metrics(0.80), naming="old")
    assert "joint_recall" in client.get_run(old).data.metrics
    current = _client_run(client, exp, ["objective.name=dftopk"], _metrics(0.86))
    assert "eval/joint_recall_at_10_20" in client.get_run(current).data.metrics
    both = _client_run(client, exp, ["objective.name=lcron"], _metrics(0.90))
    client.log_metric(both, "joint_recall", 0.10, step=1)  # the old name's stale value
    assert _cli("--experiment", "mixed", "--tracking-uri", uri, "--out", str(tmp_path / "o")) == 0
    out = capsys.readouterr().out
    assert "experiment mixed: 3 finished runs" in out
    assert _md_row(out, "bce")[1:4] == ["0.8000 (n=1)", "reference", "0.8100 (n=1)"]
    assert _md_row(out, "dftopk")[1:4] == ["0.8600 (n=1)", "+0.0600 (n=1)", "0.8700 (n=1)"]
    assert _md_row(out, "lcron")[1] == "0.9000 (n=1)"


# ---------------------------------------------------------------------------------------------- significance

T975 = {1: 12.706205, 2: 4.302653, 4: 2.776445, 9: 2.262157, 29: 2.045230}  # Student t, 0.975 quantile


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-5)


def _md_row(out: str, method: str) -> list[str]:
    rows = [line for line in out.splitlines() if line.startswith((f"| {method} |", f"| {method} ("))]
    assert len(rows) == 1, rows
    return [c.strip() for c in rows[0].split("|")[1:-1]]


def test_differences_to_bce_with_paired_and_welch_intervals(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("sig")
    runs = {"bce": {0: 0.80, 1: 0.82, 2: 0.81},
            "dftopk": {0: 0.83, 1: 0.86, 2: 0.84},  # paired d = .03 .04 .03
            "lcron": {0: 0.80, 1: 0.84, 2: 0.79},  # paired d = 0 .02 -.02: not significant
            "arf": {3: 0.85, 4: 0.85 + (8 / 3) ** 0.5 * 0.01},  # other seeds: Welch (see below)
            "lapsum": {0: 0.95}}  # one run
    for name, by_seed in runs.items():
        for seed, joint in by_seed.items():
            _client_run(client, exp, [f"objective.name={name}", f"train.seed={seed}"], _metrics(joint))
    assert _cli("--experiment", "sig", "--tracking-uri", uri, "--out", str(tmp_path / "o")) == 0
    out = capsys.readouterr().out

    sd_d = (((0.03 - 0.1 / 3) ** 2 * 2 + (0.04 - 0.1 / 3) ** 2) / 2) ** 0.5
    half = T975[2] * sd_d / 3 ** 0.5  # 0.014342
    assert _md_row(out, "dftopk")[2] == f"+0.0333 [{0.1 / 3 - half:+.4f}, {0.1 / 3 + half:+.4f}] paired"
    assert _md_row(out, "dftopk")[2] == "+0.0333 [+0.0190, +0.0477] paired"
    half = T975[2] * 0.02 / 3 ** 0.5  # sd of (0, .02, -.02) = .02
    assert _md_row(out, "lcron")[2] == f"+0.0000 [{-half:+.4f}, {half:+.4f}] paired n.s."
    # Welch: s_x²/2 = (8/3e4)/2/2 = 2/3e4, s_y²/3 = 1/3e4, se = .01; df = (1e-4)² / ((2/3e4)² + (1/3e4)²/2) = 2
    d = 0.85 + (8 / 3) ** 0.5 * 0.005 - 0.81
    half = T975[2] * 0.01
    assert _md_row(out, "arf")[2] == f"{d:+.4f} [{d - half:+.4f}, {d + half:+.4f}] welch"
    assert _md_row(out, "arf")[2] == "+0.0482 [+0.0051, +0.0912] welch"
    assert _md_row(out, "lapsum")[1:3] == ["0.9500 (n=1)", "+0.1400 (n=1)"]
    assert _md_row(out, "bce")[1:3] == ["0.8100 ± 0.0100", "reference"]
    table = pd.read_csv(tmp_path / "o" / "methods.csv").set_index("objective.name")
    assert table.loc["dftopk", "joint_recall_vs_bce_lo"] == pytest.approx(0.1 / 3 - T975[2] * sd_d / 3 ** 0.5)
    assert table.loc["arf", "joint_recall_vs_bce_hi"] == pytest.approx(d + half)
    assert table["joint_recall_vs_bce_test"].fillna("").to_dict() == {
        "bce": "", "dftopk": "paired", "lcron": "paired", "arf": "welch", "lapsum": "n=1"}
    assert table["joint_recall_vs_bce_significant"].to_dict() == pytest.approx(
        {"bce": float("nan"), "dftopk": True, "lcron": False, "arf": True, "lapsum": float("nan")}, nan_ok=True)


def test_a_table_without_bce_has_no_difference_column(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("nobce")
    for name in ("dftopk", "lcron"):
        _client_run(client, exp, [f"objective.name={name}"], _metrics(0.8))
    assert _cli("--experiment", "nobce", "--tracking-uri", uri, "--out", str(tmp_path / "o")) == 0
    out = capsys.readouterr().out
    assert "Δ vs bce" not in out and "| Method | Joint R@10@20 | Ranking R@10@20 |" in out


# ---------------------------------------------------------------------------------------------- oracle


def test_the_oracle_column_reads_the_runs_dataset(tmp_path, capsys, caplog):
    data = tmp_path / "data"
    meta = generate(SyntheticConfig(days=2, requests_per_day=64, seed=1), data)
    oracle = meta.extra["oracle"]["two_stage"]["per_day"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("o")
    for name, joint in (("bce", 0.70), ("dftopk", 0.80)):
        _client_run(client, exp, [f"objective.name={name}", f"data.path={data}"], _metrics(joint))
    _client_run(client, exp, ["objective.name=lcron", f"data.path={data}", f"data.eval_day='{meta.days[0]}'"],
                _metrics(0.9))  # another evaluation day: its own oracle
    assert _cli("--experiment", "o", "--tracking-uri", uri, "--out", str(tmp_path / "o")) == 0
    out = capsys.readouterr().out
    assert "| Method | Joint R@10@20 | Δ vs bce (95% CI) | Oracle R@10@20 | of oracle | Ranking R@10@20 |" in out
    last, first = oracle[meta.days[1]]["oracle"], oracle[meta.days[0]]["oracle"]
    assert _md_row(out, "dftopk")[3:5] == [f"{last:.4f}", f"{0.80 / last:.3f}"]
    assert _md_row(out, "lcron")[3:5] == [f"{first:.4f}", f"{0.90 / first:.3f}"]
    assert (f"Oracle ({data}, {meta.days[1]}): the logged candidates ranked by the generator's noise-free utility, "
            f"{last:.4f}; popularity only {oracle[meta.days[1]]['popularity']:.4f}; random "
            f"{oracle[meta.days[1]]['random']:.4f}.") in out
    table = pd.read_csv(tmp_path / "o" / "methods.csv").set_index("objective.name")
    assert table.loc["bce", "of_oracle"] == pytest.approx(0.70 / last)

    moved = tmp_path / "moved"
    data.rename(moved)  # the data moved away: no oracle column, one log line, the rest of the table as before
    caplog.clear()
    with caplog.at_level("WARNING", logger="cascadelab.platform.tune.compare"):
        assert _cli("--experiment", "o", "--tracking-uri", uri, "--out", str(tmp_path / "o2")) == 0
    out = capsys.readouterr().out
    assert "Oracle" not in out and "| Method | Joint R@10@20 | Δ vs bce (95% CI) | Ranking R@10@20 |" in out
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"no oracle column for data.path '{data}' (data directory '{data}' does not exist)"]


def test_a_sweep_over_training_size_gets_a_learning_curve_per_method(tmp_path, capsys, naming):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_run(uri, "exp", "sweep-lc", {}, tags={"cascadelab.sweep": "lc"})
    for name, gain in (("bce", 0.01), ("dftopk", 0.02)):
        for rows in (512, 2048):
            for seed in (0, 1):
                joint = 0.7 + gain * rows / 512 + seed / 100
                _run(uri, "exp", [f"objective.name={name}", f"data.max_rows_per_day={rows}", f"train.seed={seed}"],
                     _metrics(joint), parent=parent, naming=naming)
    end_run(uri, parent)
    assert _cli("--sweep", "lc", "--tracking-uri", uri, "--out", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "### Learning curve: joint recall vs training requests per day" in out
    assert "| Method | max_rows_per_day=512 | max_rows_per_day=2048 |" in out
    assert "| bce | 0.7150 ± 0.0071 | 0.7450 ± 0.0071 |" in out
    assert "| dftopk | 0.7250 ± 0.0071 | 0.7850 ± 0.0071 |" in out
    assert {"learning_curve.csv", "learning_curve.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
