"""Integration: a 2x2 sweep on a real local Ray (own process) and a real SQLite MLflow store, killed mid-way
and resumed; then ``compare`` on its final state.

One test on purpose: a tiny Ray Train run takes about a minute on a loaded 2-core machine. The sweep driver
runs as ``python -m cascadelab.jobs.sweep`` in its own process group (it starts its own local Ray, never
the test session's), is killed with SIGKILL once the first trial has finished, and ``--resume`` finishes it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cascadelab.platform.metric_names import internal_metrics, logged_as

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).parents[3]
NAME = "it-sweep"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def _history(client, run, key: str) -> list:
    """``key``'s history under the name ``run`` logged it (its MLflow name, or the key itself)."""
    return client.get_metric_history(run.info.run_id, logged_as(client.get_run(run.info.run_id).data.metrics, key))


def _children(client, parent_id: str) -> list:
    exp_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _tune_statuses(path: Path) -> dict[str, str]:
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(path)).trials}
    except Exception:  # noqa: BLE001 - the state file is not written yet, or is being replaced
        return {}


def _tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-40:]) if path.exists() else ""


def _wait(predicate, timeout: float, proc: subprocess.Popen, log: Path, what: str, poll: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"sweep exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}:\n{_tail(log)}")


@pytest.fixture(autouse=True)
def _no_session_ray():
    """Free the CPUs of the session's Ray (if a previous module started it); ``ray_local`` restarts it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _committed_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has committed for a run (its snapshot lags the checkpoint_* directories: a
    run killed between the two restarts from the last committed one)."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, tiny_dataset, capsys):
    from mlflow import MlflowClient

    from cascadelab.jobs import compare as compare_job
    from cascadelab.jobs.common import run_main
    from cascadelab.platform.tune.sweep import find_parent

    t0 = time.monotonic()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": NAME,
        "base": {"data": {"path": str(tiny_dataset), "batch_size": 64},
                 "train": {"num_workers": 1, "cpus_per_worker": 0.5, "storage_path": str(tmp_path / "results"),
                           "checkpoints_to_keep": 1},
                 "tracking": {"uri": uri, "experiment": "it-sweep"}},
        "grid": {"objective.name": ["bce", "dftopk"], "train.seed": [0, 1]},
        "max_concurrent_trials": 2,
    }))
    cmd = [sys.executable, "-m", "cascadelab.jobs.sweep", str(config)]
    log = tmp_path / "sweep.log"
    client = MlflowClient(uri)

    # [1] start the sweep; kill its whole process group once one trial has finished (in MLflow and in Tune)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        parent = _wait(lambda: find_parent(uri, "it-sweep", NAME), 120, proc, log, "the parent run")
        done = _wait(lambda: [r for r in _children(client, parent.info.run_id) if r.info.status == "FINISHED"],
                     420, proc, log, "the first finished trial")
        trial_id = done[0].data.tags["cascadelab.trial_id"]
        sweep_dir = tmp_path / "results" / "sweeps" / NAME
        _wait(lambda: _tune_statuses(sweep_dir).get(trial_id) == "TERMINATED", 60, proc, log,
              "Tune to record the finished trial")

        def in_flight():  # a trial past its first day: it must continue from that day's checkpoint
            return [r for r in _children(client, parent.info.run_id) if r.info.status == "RUNNING"
                    and _committed_checkpoints(sweep_dir / "train" / r.info.run_name) >= 1]

        running = _wait(in_flight, 300, proc, log, "a trial with a checkpoint", poll=0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    before = {r.info.run_id: r for r in _children(client, parent.info.run_id) if r.info.status == "FINISHED"}
    assert len(before) < 4, "the sweep finished before it could be interrupted"

    # [2] --resume in a fresh process (and a fresh local Ray) completes it
    remaining = 560 - (time.monotonic() - t0)
    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=max(remaining, 60))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "4 trials" in resumed.stdout and resumed.stdout.count("| FINISHED |") == 4, (
        resumed.stdout[-3000:] + resumed.stderr[-3000:])

    # [3] one parent, four children, each trial exactly once; finished trials were not run again
    parents = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`cascadelab.sweep` = '{NAME}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = _children(client, parent.info.run_id)
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
    args = parser.parse_args(["compare", "--sweep", NAME, "--tracking-uri", uri, "--out", str(tmp_path / "cmp")])
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

