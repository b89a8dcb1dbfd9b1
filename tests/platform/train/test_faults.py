"""Integration: faults from outside the training code, on a real local Ray, a real MLflow server or
store, the real training loop; nothing trained twice or skipped, no metric logged twice or lost.

- the tracking server killed mid-run: a short outage is ridden out while training goes on; a longer
  one fails the run with one line naming the server, and ``--resume`` completes it;
- a Train worker SIGKILLed mid-day: Ray Train restarts it from the last checkpoint;
- a full disk while a checkpoint is written: the error names the file, the last committed checkpoint
  loads and ``--resume`` completes the run.

The workers read their fault hooks (``loop.FaultHooks``) from a JSON file named by
``CASCADELAB_TEST_HOOKS``, set in this module's own Ray session; each test writes the file it needs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cascadelab.platform.config import load_config
from tests.helpers import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DAY_KEYS = ("loss/total", "throughput/step_time_s", "throughput/data_wait_share",
            "throughput/first_batch_s")  # MLflow names of per-day metrics only (not final)


def cfg_for(dataset, uri, storage, *extra):
    return load_config(None, [f"data.path={dataset}", f"tracking.uri={uri}", "tracking.experiment=faults",
                              f"train.storage_path={storage}", "data.batch_size=64", "objective.name=dftopk",
                              "train.checkpoint_every_steps=1", *extra])


def expected_progress(cfg) -> tuple[float, float]:
    """(train_rows, global_steps) of a clean one-worker run of ``cfg``, from the dataset's row counts."""
    from cascadelab.platform.train.plan import plan_run

    plan = plan_run(cfg)
    rows = [plan.rows_per_day[d] for d in plan.train_days]
    return float(sum(rows)), float(sum(math.ceil(r / cfg.data.batch_size) for r in rows))


def find_error(exc: BaseException | None, cls: type) -> BaseException | None:
    """``cls`` in ``exc``, what it was raised from or during, or a Ray Train worker's failure."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, cls):
            return e
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return None


class Hooks:
    """The fault-hooks file the workers read; ``pause_file`` is where a paused worker says so."""

    def __init__(self, root: Path):
        self.path, self.root = root / "hooks.json", root

    def set(self, **hooks) -> None:
        self.path.write_text(json.dumps(hooks))

    def wait_paused(self, pause_file: Path, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pause_file.exists() and pause_file.read_text():
                return json.loads(pause_file.read_text())
            time.sleep(0.1)
        raise TimeoutError(f"no worker paused ({pause_file})")


@pytest.fixture(scope="module")
def hooks(tmp_path_factory):
    """This module's Ray session, whose workers read the hooks file (the session Ray is shut down first)."""
    import ray

    from cascadelab.platform.train.loop import HOOKS_ENV

    h = Hooks(tmp_path_factory.mktemp("hooks"))
    h.set()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {HOOKS_ENV: str(h.path)}})
    yield h
    ray.shutdown()


def wait_committed(results: Path, global_step: int, timeout: float = 120.0) -> None:
    """Until Ray Train has committed the checkpoint of ``global_step`` (its snapshot file lags the worker's
    report: a worker killed before that restarts from the checkpoint before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snapshot in results.glob("*/checkpoint_manager_snapshot.json"):
            try:
                latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
            except (OSError, ValueError, KeyError):  # being replaced
                continue
            if latest and latest["metrics"].get("global_step") == global_step:
                return
        time.sleep(0.1)
    raise TimeoutError(f"Ray Train did not commit the checkpoint of global step {global_step} under {results}")


@pytest.fixture
def server(tmp_path):
    """A real ``mlflow server`` (SQLite store), killed and restarted by the tests."""
    with MlflowServer(tmp_path, artifact_root=tmp_path / "artifacts") as srv:
        yield srv


def metric_steps(uri: str, run_id: str) -> dict[str, list[int]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in DAY_KEYS}


def day_logged(uri: str, experiment: str, step: int) -> bool:
    """Whether some run of ``experiment`` has day ``step``'s loss/total (False while unreachable)."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp is not None else []
        return any(m.step == step for r in runs for m in client.get_metric_history(r.info.run_id, "loss/total"))
    except Exception:  # noqa: BLE001 - the server is starting or stopping
        return False


def in_background(fn):
    """Run ``fn`` in a thread; returns ``join()``, which re-raises what ``fn`` raised."""
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout: float = 60.0):
        thread.join(timeout)
        assert not thread.is_alive(), "the fault thread did not finish"
        if errors:
            raise errors[0]

    return join


def retries(max_retries: int, factor: int) -> dict[str, str]:
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(factor),
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}


def outage_after_day_0(server: MlflowServer, hooks: Hooks, pause: Path, outage_s: float | None,
                       times: dict[str, float]):
    """Once the worker paused before day 1 and day 0 is logged: kill the server, let training go on,
    and (unless ``outage_s`` is None) restart the server ``outage_s`` later."""
    def fault():
        hooks.wait_paused(pause)
        deadline = time.monotonic() + 60
        while not day_logged(server.uri, "faults", 0):
            assert time.monotonic() < deadline, "day 0 was never logged"
            time.sleep(0.1)
        server.kill()
        times["down"] = time.time()
        Path(str(pause) + ".release").write_text("")
        if outage_s is not None:
            time.sleep(outage_s)
            times["restart"] = time.time()
            server.start()
            times["up"] = time.time()

    return in_background(fault)


def test_a_short_tracking_outage_is_ridden_out_while_training_goes_on(server, hooks, tiny_dataset, tmp_path):
    from cascadelab.platform.train.run import run_training

    pause = tmp_path / "paused.json"
    hooks.set(pause_at_step=3, pause_file=str(pause), env=retries(6, 1))  # 62 s of retries per call
    cfg = cfg_for(tiny_dataset, server.uri, tmp_path / "results")
    times: dict[str, float] = {}
    join = outage_after_day_0(server, hooks, pause, 8.0, times)
    result = run_training(cfg)
    join()
    assert metric_steps(server.uri, result.run_id) == {k: [0, 1] for k in DAY_KEYS}  # every day exactly once
    assert (result.metrics["train_rows"], result.metrics["global_steps"]) == expected_progress(cfg)
    checkpoints = list((tmp_path / "results" / result.run_name).glob("checkpoint_*/cascade.pt"))
    assert any(times["down"] < p.stat().st_mtime < times["restart"] for p in checkpoints), \
        "no checkpoint was committed while the tracking server was down: training waited for it"
    from mlflow import MlflowClient

    day1 = MlflowClient(server.uri).get_metric_history(result.run_id, "loss/total")[-1]
    assert times["down"] < day1.timestamp / 1000 < times["up"]  # day 1 was first sent during the outage


def test_a_long_tracking_outage_fails_in_one_line_and_resume_completes(server, hooks, tiny_dataset, tmp_path,
                                                                       monkeypatch):
    from cascadelab.platform.train.loop import TrackingUnavailable
    from cascadelab.platform.train.run import load_run_config, run_training

    pause = tmp_path / "paused.json"
    hooks.set(pause_at_step=3, pause_file=str(pause), env=retries(2, 1))  # 2 s of retries per call
    for key, value in retries(2, 1).items():  # the driver's own client, too
        monkeypatch.setenv(key, value)
    cfg = cfg_for(tiny_dataset, server.uri, tmp_path / "results", "train.max_failures=0",
                  "tracking.run_name=outage")
    join = outage_after_day_0(server, hooks, pause, None, {})
    with pytest.raises(Exception) as info:
        run_training(cfg)
    join()
    failure = find_error(info.value, TrackingUnavailable)
    assert failure is info.value, f"not raised as the tracking failure itself: {info.value!r}"  # one line
    line = str(failure)
    assert "\n" not in line and line.startswith(f"MLflow tracking server {server.uri} unreachable for ")
    assert line.endswith("while logging the metrics of day 2024-01-14 (step 1); checkpoints kept; "
                         f"rerun with --resume {failure.run_name}")
    run_dir = tmp_path / "results" / failure.run_name
    assert len(list(run_dir.glob("checkpoint_*/cascade.pt"))) >= 1

    server.start()
    resumed = run_training(load_run_config(server.uri, "faults", failure.run_name), resume=failure.run_name)
    assert metric_steps(server.uri, resumed.run_id) == {k: [0, 1] for k in DAY_KEYS}
    assert (resumed.metrics["train_rows"], resumed.metrics["global_steps"]) == expected_progress(cfg)


def _ray_train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def test_a_sigkilled_worker_is_replaced_from_its_checkpoint(hooks, tiny_dataset, tmp_path):
    import psutil

    from cascadelab.platform.train.run import run_training

    pause, starts = tmp_path / "paused.json", tmp_path / "starts.jsonl"
    hooks.set(pause_at_step=4, pause_file=str(pause), starts_file=str(starts))  # mid day 1 (steps 3, 4, 5)
    cfg = cfg_for(tiny_dataset, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "results", "train.max_failures=1")

    def kill():
        paused = hooks.wait_paused(pause)
        wait_committed(tmp_path / "results", 4)
        assert _ray_train_worker_pids() == [paused["pid"]]  # found from outside, as an operator would
        os.kill(paused["pid"], signal.SIGKILL)

    join = in_background(kill)
    result = run_training(cfg)
    join()
    killed = json.loads(pause.read_text())["pid"]
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    started = [json.loads(line) for line in starts.read_text().splitlines()]
    assert [s["global_step"] for s in started] == [0, 4] and started[0]["pid"] == killed  # resumed, not rerun
    assert (result.metrics["train_rows"], result.metrics["global_steps"]) == expected_progress(cfg)
    assert metric_steps(result.tracking_uri, result.run_id) == {k: [0, 1] for k in DAY_KEYS}


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(hooks, tiny_dataset, tmp_path):
    from cascadelab.platform.train.checkpoint import CheckpointWriteError, read_checkpoint
    from cascadelab.platform.train.run import load_run_config, run_training

    hooks.set(enospc_at_step=4, enospc_file=str(tmp_path / "enospc"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = cfg_for(tiny_dataset, uri, tmp_path / "results", "train.max_failures=0", "tracking.run_name=disk")
    with pytest.raises(Exception) as info:
        run_training(cfg)
    failure = find_error(info.value, CheckpointWriteError)
    assert failure is info.value, f"not raised as the checkpoint failure itself: {info.value!r}"  # one line
    assert str(failure).startswith(f"writing checkpoint file {failure.path} failed: [Errno 28] No space left "
                                   "on device; nothing was handed to Ray Train")
    assert failure.path.endswith("/cascade.pt") and not os.path.exists(failure.path + ".partial")
    run_dir = next((tmp_path / "results").iterdir())
    assert not list(run_dir.rglob("*.partial"))
    saved = [read_checkpoint(p.parent) for p in sorted(run_dir.glob("checkpoint_*/cascade.pt"))]
    assert saved and max(s["state"]["global_step"] for s in saved) == 3  # the last good one loads

    resumed = run_training(load_run_config(uri, "faults", run_dir.name), resume=run_dir.name)
    assert (resumed.metrics["train_rows"], resumed.metrics["global_steps"]) == expected_progress(cfg)
    assert metric_steps(uri, resumed.run_id) == {k: [0, 1] for k in DAY_KEYS}
