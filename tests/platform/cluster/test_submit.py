"""Integration: a real `ray start --head` cluster, jobs submitted through the Jobs API.

The head runs in its own temp dir and on free ports, so it neither collides with the session-wide
``ray.init`` of tests/conftest.py nor becomes the cluster a plain ``ray.init()`` elsewhere on this
machine would join. It is stopped in teardown by signalling the ``ray start --block`` process this
module started (its shutdown hook stops all its Ray processes), then by killing anything left that
belongs to this cluster's temp dir. Not ``ray stop``: that kills every Ray process on the machine,
including other test sessions' clusters.

The training test needs the whole training stack (cascadelab.platform.train.run and what it imports);
it is skipped while that cannot be imported. The other tests need only this package and Ray.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from cascadelab.platform.cluster import jobs
from tests.helpers import free_ports, wait_http_ok

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the submitting process uses the cluster's mode
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


@dataclass
class Head:
    address: str  # Jobs API URL
    env: dict[str, str]  # environment for CLI subprocesses talking to this head
    ray: str  # the `ray` executable


def _ray_exe() -> str:
    exe = BIN / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or pytest.fail("no `ray` executable"))


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the `ray start --block` process (graceful: it stops its own Ray processes), then kill, by
    pid, whatever is left of this cluster: the processes it started (workers and job drivers included,
    collected before the signal), its process group, and processes naming its temp dir."""
    import psutil

    try:
        ours = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ours = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=4)  # a graceful stop takes 6-30+ s; what is left is killed below (CI time)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and temp_dir in " ".join(p.info["cmdline"] or []):
                ours.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    alive = []
    for p in ours:
        try:
            p.kill()
            alive.append(p)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import ray

    if ray.is_initialized():  # leave the 2 cores to this cluster; the session fixture re-inits on demand
        ray.shutdown()
    log_path = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    temp_dir = tempfile.mkdtemp(prefix="cl-ray-", dir="/tmp")  # short: Unix socket paths max 107 bytes
    gcs, dashboard, agent, client = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in jobs.ADDRESS_ENV}
    # One auth mode for the whole tree; jobs run `python -m ...`, so this venv's python comes first.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    cmd = [_ray_exe(), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
           "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}",
           f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
           f"--temp-dir={temp_dir}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(log_path.parent))
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_http_ok(f"{address}/api/version", 120, proc, log_path)  # the Jobs API is up
        yield Head(address=address, env=env, ray=_ray_exe())
    finally:
        _stop_head(proc, temp_dir)


def _cli() -> list[str]:
    """The `cascadelab` command, run from this interpreter."""
    return [sys.executable, "-m", "cascadelab.cli"]


def _run(cmd: list[str], head: Head, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=head.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_submit_trivial_job(head):
    """The Python API end to end: upload, env pass-through, log tail, status, list, logs."""
    script = ("import os, ray; ray.init(); "
              "print('cpus=%d' % ray.cluster_resources()['CPU']); "
              "print('auth=' + os.environ.get('RAY_AUTH_MODE', '')); "
              "print('marker=' + os.environ.get('CASCADELAB_MARKER', '')); "
              "print('has_pkg=%s has_venv=%s' % (os.path.isdir('cascadelab/platform/data'), os.path.exists('.venv')))")
    out = io.StringIO()
    job_id = jobs.submit_entrypoint(shlex.join(["python", "-c", script]), address=head.address, working_dir=REPO,
                                    env_vars={"CASCADELAB_MARKER": "m42"}, submission_id=jobs.new_submission_id("t"),
                                    out=out)
    text = out.getvalue()
    assert text.splitlines()[0] == job_id  # the job id is printed first
    assert "cpus=2" in text and "auth=disabled" in text and "marker=m42" in text
    assert "has_pkg=True has_venv=False" in text  # the package was uploaded, the virtualenv was not
    assert jobs.job_status(job_id, head.address) == "SUCCEEDED"
    assert job_id in {j.submission_id for j in jobs.list_jobs(head.address)}
    assert "marker=m42" in jobs.job_logs(job_id, head.address)


@pytest.mark.timeout(300)
def test_cli_submit_runs_a_cascadelab_job(head, tmp_path):
    """`cascadelab submit -- generate ...`: a real job module, exit code 0, output on the shared disk."""
    out_dir = tmp_path / "gen"
    proc = _run([*_cli(), "submit", "--address", head.address, "--working-dir", str(REPO), "--",
                 "generate", "--out", str(out_dir), "--days", "2", "--requests-per-day", "16", "--seed", "0"], head)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = proc.stdout.splitlines()[0]
    assert job_id.startswith("cascadelab-generate-")
    assert "wrote 32 requests over 2 days" in proc.stdout  # the job's own output, tailed
    assert (out_dir / "dataset.json").is_file()

    listing = _run([*_cli(), "jobs", "list", "--address", head.address], head, timeout=60)
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in row and "python -m cascadelab.jobs.generate" in row
    logs = _run([*_cli(), "jobs", "logs", job_id, "--address", head.address], head, timeout=60)
    assert logs.returncode == 0 and "wrote 32 requests" in logs.stdout


@pytest.mark.timeout(300)
def test_cli_failed_and_stopped_jobs_exit_nonzero(head, tmp_path):
    # A job that fails on the cluster: generate cannot create a directory under a file.
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    failed = _run([*_cli(), "submit", "--address", head.address, "--working-dir", str(REPO), "--",
                   "generate", "--out", str(blocker / "sub"), "--days", "1", "--requests-per-day", "4"], head)
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    assert "FAILED" in failed.stderr

    # A long job, submitted without waiting, then stopped.
    out = io.StringIO()
    job_id = jobs.submit_entrypoint("python -c 'import time; time.sleep(300)'", address=head.address,
                                    working_dir=REPO, wait=False, out=out)
    assert out.getvalue().strip() == job_id
    stop = _run([*_cli(), "jobs", "stop", job_id, "--wait", "--address", head.address], head, timeout=120)
    assert stop.returncode == 0 and stop.stdout.strip() == "STOPPED", stop.stdout + stop.stderr
    status = _run([*_cli(), "jobs", "status", job_id, "--address", head.address], head, timeout=60)
    assert status.stdout.strip() == "STOPPED"
    missing = _run([*_cli(), "jobs", "status", "no-such-job", "--address", head.address], head, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith(
        "cascadelab: error: job no-such-job: no such job")


@pytest.mark.timeout(480)  # two training jobs, each ~30-60 s on 2 idle cores
def test_train_job_via_cascadelab_submit_and_ray_job_submit(head, tmp_path):
    """The training contract: both submission paths run `cascadelab.jobs.train` and track in MLflow."""
    try:
        import cascadelab.platform.train.run  # noqa: F401  (the job imports it on the cluster)
    except ImportError as exc:
        pytest.skip(f"the training stack cannot be imported yet: {exc}")
    import mlflow

    from cascadelab.cli import main as cli_main

    data = tmp_path / "data"
    assert cli_main(["generate", "--out", str(data), "--days", "2", "--requests-per-day", "200", "--seed", "0"]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # tmp_path is absolute: sqlite:////...
    common = ["--set", f"data.path={data}", "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=cluster-e2e",
              "--set", f"train.storage_path={tmp_path / 'results'}", "--set", "train.num_workers=1"]

    via_cascadelab = _run([*_cli(), "submit", "--address", head.address, "--working-dir", str(REPO), "--",
                           "train", *common, "--set", "tracking.run_name=via-cascadelab"], head, timeout=230)
    assert via_cascadelab.returncode == 0, via_cascadelab.stdout[-4000:] + via_cascadelab.stderr[-4000:]

    via_ray = _run([head.ray, "job", "submit", "--address", head.address, "--working-dir", str(REPO), "--",
                    "python", "-m", "cascadelab.jobs.train", *common, "--set", "tracking.run_name=via-ray"],
                   head, timeout=230)
    assert via_ray.returncode == 0, via_ray.stdout[-4000:] + via_ray.stderr[-4000:]

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["cluster-e2e"])
    assert len(runs) == 2
    names = sorted(runs["tags.mlflow.runName"])
    assert names[0].startswith("via-cascadelab") and names[1].startswith("via-ray")
    assert set(runs["status"]) == {"FINISHED"}
