"""One real 2x2 sweep for the tune integration tests: ``python -m cascadelab.jobs.sweep`` on a real local Ray
(its own process group, never the test session's) and a real SQLite MLflow store, SIGKILLed once a trial has
finished and another is past its first day, then finished by ``--resume`` in a fresh process.

A tiny Ray Train run takes about a minute on a loaded 2-core machine, so the resume test and the report test
read the same sweep (the ``resumed_sweep`` fixture in this folder's conftest.py) instead of running two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[3]
NAME = "it-sweep"
EXPERIMENT = "it-sweep"
BUDGET_S = 560  # the whole kill-and-resume, inside the tests' 600 s timeout


@dataclass
class ResumedSweep:
    """What the first (killed) process left behind and what ``--resume`` printed."""

    uri: str
    dataset: Path
    root: Path  # the sweep's working directory (results/, the report's output)
    parent_id: str
    finished_before: dict  # run_id -> the MLflow run of each trial that had finished before the kill
    running_before: list  # MLflow runs in flight, past a committed checkpoint, at the kill
    resumed: subprocess.CompletedProcess


def env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def children(client, parent_id: str) -> list:
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


def _committed_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has committed for a run (its snapshot lags the checkpoint_* directories: a
    run killed between the two restarts from the last committed one)."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def run_killed_and_resumed_sweep(root: Path, dataset: Path) -> ResumedSweep:
    """bce / dftopk x seeds 0, 1 with streaming evaluation on ``dataset`` (3 days: two trained, one held out),
    two trials side by side; killed mid-way and resumed as a user would (``cascadelab sweep ... --resume``)."""
    from mlflow import MlflowClient

    from cascadelab.platform.tune.sweep import find_parent

    t0 = time.monotonic()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": NAME,
        "base": {"data": {"path": str(dataset), "batch_size": 64},
                 "train": {"num_workers": 1, "cpus_per_worker": 0.5, "storage_path": str(root / "results"),
                           "checkpoints_to_keep": 1, "streaming_eval": True},
                 "tracking": {"uri": uri, "experiment": EXPERIMENT}},
        "grid": {"objective.name": ["bce", "dftopk"], "train.seed": [0, 1]},
        "max_concurrent_trials": 2,
    }))
    cmd = [sys.executable, "-m", "cascadelab.jobs.sweep", str(config)]
    log = root / "sweep.log"
    client = MlflowClient(uri)

    # start the sweep; kill its whole process group once one trial has finished (in MLflow and in Tune)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        parent = _wait(lambda: find_parent(uri, EXPERIMENT, NAME), 120, proc, log, "the parent run")
        done = _wait(lambda: [r for r in children(client, parent.info.run_id) if r.info.status == "FINISHED"],
                     420, proc, log, "the first finished trial")
        trial_id = done[0].data.tags["cascadelab.trial_id"]
        sweep_dir = root / "results" / "sweeps" / NAME
        _wait(lambda: _tune_statuses(sweep_dir).get(trial_id) == "TERMINATED", 60, proc, log,
              "Tune to record the finished trial")

        def in_flight():  # a trial past its first day: it must continue from that day's checkpoint
            return [r for r in children(client, parent.info.run_id) if r.info.status == "RUNNING"
                    and _committed_checkpoints(sweep_dir / "train" / r.info.run_name) >= 1]

        running = _wait(in_flight, 300, proc, log, "a trial with a checkpoint", poll=0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    before = {r.info.run_id: r for r in children(client, parent.info.run_id) if r.info.status == "FINISHED"}

    # --resume in a fresh process (and a fresh local Ray) completes it
    remaining = BUDGET_S - (time.monotonic() - t0)
    resumed = subprocess.run([*cmd, "--resume"], cwd=root, env=env(), capture_output=True, text=True,
                             timeout=max(remaining, 60))
    return ResumedSweep(uri, dataset, root, parent.info.run_id, before, running, resumed)
