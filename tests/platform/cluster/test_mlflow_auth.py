"""The cluster's MLflow server runs with authentication, and jobs log with credentials from their nodes.

The server fixture runs cluster.yaml's own head commands for MLflow (deploy/mlflow_auth.py, then
``mlflow server --app-name basic-auth``) in a temporary HOME, with only the machine-specific parts
swapped (the store paths, the S3 bucket, the host and port), so a change to those commands is tested
here. The jobs user's credentials file comes from ``deploy/mlflow_auth.py client-env``, as on a laptop.
The deploy files themselves are checked for where credentials go: the environment of ``ray start``
(launcher clusters) and Kubernetes Secrets (KubeRay), never a job's env vars.

The basic-auth app needs Flask-WTF (MLflow's ``auth`` extra); without it the server tests are skipped.
mlflow is imported lazily, inside the tests that talk to the server.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cascadelab.platform.cluster.credentials import check_job_env, is_credential_name
from cascadelab.platform.tracking import check_tracking_uri, resolve_tracking_uri
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[3]
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180.0


def _deploy_script():
    spec = importlib.util.spec_from_file_location("mlflow_auth", REPO / "deploy" / "mlflow_auth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mlflow_auth = _deploy_script()


@dataclass
class AuthServer:
    uri: str
    home: Path
    jobs_username: str
    jobs_password: str
    admin_password: str


def _head_mlflow_commands(home: Path, port: int) -> list[str]:
    """cluster.yaml's head commands that set up and start MLflow, made to run on this machine."""
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    commands = [c for c in cfg["head_start_ray_commands"] if "ray start" not in c and "ray stop" not in c]
    local = {
        "sqlite:////home/ray/mlflow/mlflow.db": f"sqlite:///{home}/mlflow/mlflow.db",
        "s3://CHANGE-ME-bucket/cascadelab/mlflow-artifacts": str(home / "artifacts"),
        "--host 0.0.0.0 --port 5000 --workers 2": f"--host 127.0.0.1 --port {port} --workers 1",
        "~/cascadelab/deploy/mlflow_auth.py": str(REPO / "deploy" / "mlflow_auth.py"),
    }
    text = "\n".join(commands)
    for machine, here in local.items():
        assert machine in text, f"cluster.yaml's MLflow head commands no longer contain {machine!r}"
        commands = [c.replace(machine, here) for c in commands]
    return commands


def _request(url: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, str]:
    """HTTP status and body of a GET (or a JSON POST with ``body``), optionally with basic auth."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_until_up(uri: str, pid_file: Path, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with_pid = pid_file.is_file() and pid_file.read_text().strip()
        if with_pid and not Path(f"/proc/{int(with_pid)}").exists():
            break
        try:
            if _request(uri + "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log.is_file() else "(no server.log)"
    if "Flask-WTF" in tail:
        pytest.skip(f"mlflow server --app-name basic-auth cannot start: {tail.strip().splitlines()[-1]}")
    pytest.fail(f"mlflow server --app-name basic-auth did not come up within {START_TIMEOUT_S:.0f} s:\n{tail}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> AuthServer:
    if importlib.util.find_spec("flask_wtf") is None:
        pytest.skip("MLflow's basic-auth app needs Flask-WTF (pip install 'mlflow[auth]==3.17.2'), "
                    "which is not installed")
    home = tmp_path_factory.mktemp("head-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "_MLFLOW_"))}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    assert mlflow_auth.main(["client-env", str(home / ".cascadelab" / "mlflow.env")]) == 0
    *setup, start = _head_mlflow_commands(home, port)
    for command in setup:
        done = subprocess.run(["bash", "-c", command], env=env, timeout=120, capture_output=True, text=True)
        assert done.returncode == 0, f"cluster.yaml head command failed: {command}\n{done.stderr[-2000:]}"
    # its own session, so the finalizer can end the server and its uvicorn workers together
    launcher = subprocess.Popen(["bash", "-c", start], env=env, start_new_session=True)
    launcher.wait(timeout=30)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(uri, home / "mlflow" / "server.pid", home / "mlflow" / "server.log")
        jobs = mlflow_auth.read_env_file(home / ".cascadelab" / "mlflow.env")
        secrets = mlflow_auth.read_env_file(home / "mlflow" / "server.env")
        yield AuthServer(uri, home, jobs["MLFLOW_TRACKING_USERNAME"], jobs["MLFLOW_TRACKING_PASSWORD"],
                         secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        pid_file = home / "mlflow" / "server.pid"
        pid = int(pid_file.read_text() or 0) if pid_file.is_file() else 0
        for _ in range(100):
            if not pid or not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)


@pytest.fixture
def as_user(monkeypatch):
    """``as_user(name, password)`` sets the MLflow client credentials; ``as_user(None)`` clears them."""
    def switch(username: str | None, password: str | None = None) -> None:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            monkeypatch.delenv(key, raising=False)
        if username is not None:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    return switch


def _log_a_run(uri: str, experiment: str) -> str:
    """A run as a job logs it: create it, log params, a per-day metric and a text artifact, finish it."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    run_id = client.create_run(exp_id, run_name="auth-run").info.run_id
    client.log_batch(run_id, params=[Param("objective.name", "dftopk"), Param("tracking.uri", uri)])
    client.log_batch(run_id, metrics=[Metric("recall_day", 0.25, int(time.time() * 1000), 3)])
    client.log_text(run_id, "stage: dssm\n", "config.yaml")
    client.set_terminated(run_id)
    return run_id


# ---------------------------------------------------------------------------------------------------
# a real basic-auth server started by cluster.yaml's commands


def test_unauthenticated_requests_are_refused(server):
    search = server.uri + "/api/2.0/mlflow/experiments/search"
    assert _request(search, body={"max_results": 5})[0] == 401
    assert _request(search, auth=(server.jobs_username, "not-the-password"), body={"max_results": 5})[0] == 401
    assert _request(search, auth=("admin", server.jobs_password), body={"max_results": 5})[0] == 401
    assert _request(server.uri + "/")[0] == 401  # the UI too
    assert _request(search, auth=(server.jobs_username, server.jobs_password), body={"max_results": 5})[0] == 200
    assert _request(search, auth=("admin", server.admin_password), body={"max_results": 5})[0] == 200
    assert _request(server.uri + "/health")[0] == 200  # liveness stays open: check_tracking_uri uses it


def test_the_projects_runs_log_with_the_nodes_credentials(server, as_user, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    uri = resolve_tracking_uri(None)
    assert uri == server.uri == resolve_tracking_uri(server.uri)
    check_tracking_uri(uri)  # reachable without credentials: /health is not protected

    as_user(server.jobs_username, server.jobs_password)  # what `ray start` exported on every node
    run_id = _log_a_run(uri, "cascadelab-auth")
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics == {"recall_day": 0.25}
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "recall_day")] == [3]
    assert MlflowClient(uri).download_artifacts(run_id, "config.yaml", str(server.home))
    assert server.jobs_password not in json.dumps(run.to_dictionary())  # not in params, tags or info

    status, body = _request(f"{uri}/api/2.0/mlflow/runs/get?run_id={run_id}",
                            auth=(server.jobs_username, server.jobs_password))
    assert status == 200 and "recall_day" in body
    assert _request(f"{uri}/api/2.0/mlflow/runs/get?run_id={run_id}")[0] == 401

    as_user(None)
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(uri).get_run(run_id)


def test_the_jobs_user_is_no_admin_and_other_users_only_read(server, as_user):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    as_user(server.jobs_username, server.jobs_password)
    run_id = _log_a_run(server.uri, "cascadelab-auth-permissions")
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
        AuthServiceClient(server.uri).create_user("mallory-the-user", "mallory-password-123")

    as_user("admin", server.admin_password)  # the head's generated admin password
    AuthServiceClient(server.uri).create_user("alice-reader", "alice-password-123")

    as_user("alice-reader", "alice-password-123")  # default_permission READ
    assert MlflowClient(server.uri).get_run(run_id).data.metrics == {"recall_day": 0.25}
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
        MlflowClient(server.uri).delete_run(run_id)
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
        MlflowClient(server.uri).log_metric(run_id, "by_alice", 1.0)

    # deploy/README.md's recipe for more than READ on one experiment
    as_user("admin", server.admin_password)
    experiment_id = MlflowClient(server.uri).get_run(run_id).info.experiment_id
    AuthServiceClient(server.uri).grant_user_permission("alice-reader", "experiment", experiment_id, "EDIT")
    as_user("alice-reader", "alice-password-123")
    MlflowClient(server.uri).log_metric(run_id, "by_alice", 1.0)
    assert MlflowClient(server.uri).get_run(run_id).data.metrics["by_alice"] == 1.0


def test_head_setup_is_idempotent_and_keeps_secrets_private(server, as_user, monkeypatch, capsys):
    state = server.home / "mlflow"
    secrets_before = (state / "server.env").read_bytes()
    as_user(server.jobs_username, server.jobs_password)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", "unset-after-the-test")  # the script sets it
    # what `ray up` runs again on a restarted head
    assert mlflow_auth.main(["server", "--state-dir", str(state), "--generate-secrets"]) == 0
    out = capsys.readouterr()
    assert "(kept)" in out.out and f"jobs user {server.jobs_username}: unchanged" in out.out
    assert (state / "server.env").read_bytes() == secrets_before
    assert server.jobs_password not in out.out + out.err and server.admin_password not in out.out + out.err
    assert (state / "server.env").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert (server.home / ".cascadelab" / "mlflow.env").stat().st_mode & 0o777 == 0o600
    assert "password" not in (state / "basic_auth.ini").read_text().lower()


# ---------------------------------------------------------------------------------------------------
# where the deploy files put credentials (no server)


def _load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


@pytest.mark.parametrize("rel", ["cluster.yaml", "deploy/onprem.yaml"])
def test_launcher_nodes_start_ray_with_the_credentials_file(rel):
    cfg = _load(rel)
    assert cfg["file_mounts"]["~/.cascadelab/mlflow.env"] == "~/.cascadelab/mlflow.env"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if "ray start" in c]
        sourced = start.index(". ~/.cascadelab/mlflow.env || exit 1")
        assert start.startswith("set -a;") and sourced < start.index("ray start"), f"{rel}: {key}"
    (server,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert "--app-name basic-auth" in server and "MLFLOW_AUTH_CONFIG_PATH=$HOME/mlflow/basic_auth.ini" in server
    assert ". ~/mlflow/server.env || exit 1" in server
    assert any("mlflow_auth.py server --state-dir ~/mlflow --generate-secrets" in c
               for c in cfg["head_start_ray_commands"])
    assert any('"mlflow[auth]==' in c for c in cfg["head_setup_commands"])


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("rel", ["deploy/kuberay/raycluster.yaml", "deploy/kuberay/rayjob.yaml"])
def test_kuberay_credentials_come_from_the_secret(rel):
    (doc,) = [d for d in yaml.safe_load_all((REPO / rel).read_text()) if d and d["kind"] in ("RayCluster", "RayJob")]
    containers = _containers(doc)
    for c in containers:
        env = _env(c)
        for name, entry in env.items():
            if is_credential_name(name) and name != "MLFLOW_TRACKING_USERNAME":
                assert "value" not in entry, f"{rel}: {c['name']} sets {name} literally"
                assert entry["valueFrom"]["secretKeyRef"]["name"] == "cascadelab-mlflow-auth"
        if c["name"].startswith("ray-"):
            assert env["MLFLOW_TRACKING_USERNAME"]["value"] == mlflow_auth.JOBS_USERNAME
            assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "jobs-password"
            assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in env  # the admin password stays with the server
    if doc["kind"] == "RayJob":
        env_vars = (yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) or {}).get("env_vars", {})
        check_job_env(env_vars)  # the dashboard-visible job env holds no credential
        return
    (mlflow,) = [c for c in containers if c["name"] == "mlflow"]
    env = _env(mlflow)
    assert "--app-name basic-auth" in mlflow["args"][0] and "mlflow_auth.py server" in mlflow["args"][0]
    assert '"mlflow[auth]==' in mlflow["args"][0]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].endswith("/basic_auth.ini")
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "cascadelab-mlflow-auth"
