"""Integration: a 2x2 sweep on a real local Ray (own process) and a real SQLite MLflow store, killed mid-way
and resumed (``resumed_sweep``, shared with the report test: see real_sweep.py); then ``compare`` on its final
state."""

from __future__ import annotations

import argparse

import pytest

from cascadelab.platform.metric_names import internal_metrics, logged_as
from tests.platform.tune.real_sweep import NAME
from tests.platform.tune.real_sweep import children as children_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _history(client, run, key: str) -> list:
    """``key``'s history under the name ``run`` logged it (its MLflow name, or the key itself)."""
    return client.get_metric_history(run.info.run_id, logged_as(client.get_run(run.info.run_id).data.metrics, key))


def test_killed_sweep_resumes_without_rerunning_finished_trials(resumed_sweep, capsys):
    from mlflow import MlflowClient

    from cascadelab.jobs import compare as compare_job
    from cascadelab.jobs.common import run_main

    uri, before, running, resumed = (resumed_sweep.uri, resumed_sweep.finished_before,
                                     resumed_sweep.running_before, resumed_sweep.resumed)
    client = MlflowClient(uri)
    parent = client.get_run(resumed_sweep.parent_id)
    assert len(before) < 4, "the sweep finished before it could be interrupted"

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "4 trials" in resumed.stdout and resumed.stdout.count("| FINISHED |") == 4, (
        resumed.stdout[-3000:] + resumed.stderr[-3000:])

    # [3] one parent, four children, each trial exactly once; finished trials were not run again
    parents = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`cascadelab.sweep` = '{NAME}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = children_of(client, parent.info.run_id)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["cascadelab.trial_id"] for r in children}) == 4
    points = {(r.data.params["objective.name"], r.data.params["train.seed"]) for r in children}
    assert points == {("bce", "0"), ("bce", "1"), ("dftopk", "0"), ("dftopk", "1")}
    for run_id, run in before.items():
        again = client.get_run(run_id)
        assert again.info.end_time == run.info.end_time
        assert len(_history(client, run, "joint_recall")) == 1
        same = [r for r in children if r.data.tags["cascadelab.trial_id"] == run.data.tags["cascadelab.trial_id"]]
        assert len(same) == 1
    for run in running:  # resumed in place: same MLflow run, day 0 (committed before the kill) not trained again
        again = client.get_run(run.info.run_id)
        assert again.info.status == "FINISHED"
        steps = sorted(m.step for m in _history(client, run, "train_loss"))
        # day 1 may be logged twice: killed after its loss was logged but before Train committed its checkpoint
        assert steps.count(0) == 1 and set(steps) == {0, 1}, steps
    first_two = sorted(children, key=lambda r: r.info.start_time)[:2]
    assert first_two[1].info.start_time < min(r.info.end_time for r in first_two)  # two trials at once

    # [4] the best trial and the trials table on the parent
    parent = client.get_run(parent.info.run_id)
    best = max(children, key=lambda r: internal_metrics(r.data.metrics)["joint_recall"])
    assert parent.data.metrics["best/joint_recall_at_10_20"] == pytest.approx(
        internal_metrics(best.data.metrics)["joint_recall"])
    assert parent.data.tags["best.run_id"] == best.info.run_id
    assert parent.data.tags["best.objective.name"] == best.data.params["objective.name"]
    assert parent.data.params["grid.objective.name"] == "['bce', 'dftopk']"
    assert {"trials.csv", "sweep_spec.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # [5] compare reads the children back: one row per method, mean ± std over the two seeds
    parser = argparse.ArgumentParser()
    compare_job.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--sweep", NAME, "--tracking-uri", uri,
                              "--out", str(resumed_sweep.root / "cmp")])
    capsys.readouterr()
    assert run_main(args.func, args) == 0
    out = capsys.readouterr().out
    assert f"sweep {NAME}: 4 finished runs" in out
    header = next(line for line in out.splitlines() if line.startswith("| Method | Joint R@10@20 |"))
    assert header.startswith("| Method | Joint R@10@20 | Δ vs bce (95% CI) | Oracle R@10@20 | of oracle |")
    assert header.endswith("| Ranking R@10@20 | Ranking NDCG@10 | Retrieval R@10@30 | Retrieval NDCG@10 | runs |")
    for method in ("bce", "dftopk"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {method} |"))
        assert row.endswith("| 2 |") and row.count("±") == 5
    assert "compare/methods.csv" in {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}

