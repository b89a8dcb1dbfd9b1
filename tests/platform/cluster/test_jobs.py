"""Unit tests for job submission and the storage check: no Ray cluster is started here."""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from cascadelab.jobs import COMMANDS, add_parser_of, submittable
from cascadelab.jobs import submit as submit_cli
from cascadelab.platform import runtime
from cascadelab.platform.cluster import jobs, storage
from cascadelab.platform.cluster.jobs import ClusterError

REPO = Path(__file__).resolve().parents[3]


def _closed_port() -> int:
    """A local port with nothing listening on it (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(argv: list[str]) -> int:
    """Run the submit/jobs subcommands the way the `cascadelab` CLI does."""
    parser = argparse.ArgumentParser(prog="cascadelab")
    sub = parser.add_subparsers(dest="command", required=True)
    submit_cli.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------------------------------
# entrypoint


def test_submittable_jobs_are_runnable_modules_of_the_registry():
    names = submittable()
    assert {"train", "generate", "sweep"} <= set(names)
    assert not {"common", "submit", "jobs", "__init__"} & set(names)
    for name in names:  # python -m cascadelab.jobs.<name> is the entrypoint: the module has that name
        assert COMMANDS[name].module == name and callable(add_parser_of(name))


def test_build_entrypoint_runs_the_job_module_with_quoted_args():
    name, rest = jobs.split_job_argv(["--", "train", "--set", "data.path=/shared/my data", "--set", "a=$HOME"],
                                     submittable())
    entry = jobs.build_entrypoint(name, rest)
    assert entry == "python -m cascadelab.jobs.train --set 'data.path=/shared/my data' --set 'a=$HOME'"
    assert shlex.split(entry)[4] == "data.path=/shared/my data"  # survives the shell unchanged
    assert jobs.build_entrypoint("generate", [], python="python3") == "python3 -m cascadelab.jobs.generate"


@pytest.mark.parametrize("argv, expected", [
    ([], "no job given"),
    (["--"], "no job given"),
    (["trian", "--set", "x=1"], "unknown job 'trian'"),
    (["submit"], "unknown job 'submit'"),
    (["python", "-c", "print(1)"], "unknown job 'python'"),
])
def test_build_entrypoint_rejects_unknown_jobs(argv, expected):
    with pytest.raises(ClusterError, match=expected) as exc:
        jobs.split_job_argv(argv, submittable())
    assert "\n" not in str(exc.value) and "train" in str(exc.value)  # lists the valid jobs


def _check(name: str, args: list[str]) -> argparse.Namespace:
    return jobs.check_job_args(name, args, add_parser_of(name))


def test_job_args_are_checked_with_the_jobs_own_parser():
    ns = _check("train", ["--set", "a=1", "--config", "x.yaml"])
    assert ns.overrides == ["a=1"] and ns.config == "x.yaml"
    with pytest.raises(ClusterError, match="arguments of job 'train': unrecognized arguments: --sett"):
        _check("train", ["--sett", "a=1"])


def test_lint_warns_about_paths_that_only_exist_locally(tmp_path):
    ns = _check("train", ["--set", "data.path=data/demo", "--set", "train.storage_path=results"])
    warnings = jobs.lint_job_args(ns, environ={})
    assert any(w.startswith("data.path='data/demo' is relative") for w in warnings)
    assert any(w.startswith("train.storage_path='results' is relative") for w in warnings)
    assert any("no tracking.uri" in w for w in warnings)

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {path: /shared/data}\ntracking: {uri: 'sqlite:///mlflow.db'}\n")
    ns = _check("train", ["--config", str(cfg), "--set", "train.storage_path=s3://b/r"])
    assert [w.split("=")[0] for w in jobs.lint_job_args(ns, environ={})] == ["tracking.uri"]  # relative sqlite

    ns = _check("train", ["--set", "data.path=/shared/data"])
    assert jobs.lint_job_args(ns, environ={"MLFLOW_TRACKING_URI": "http://head:5000"}) == []
    assert jobs.lint_job_args(_check("generate", ["--out", "x"]), environ={}) == []
    later = _check("train", ["--set", "data.path=/shared/data", "--set", "data.path=mine"])
    assert [w.split(" ")[0] for w in jobs.lint_job_args(later, environ={"MLFLOW_TRACKING_URI": "http://h:5000"})] \
        == ["data.path='mine'"]  # the later override wins, as in the job itself


def test_submission_ids_are_readable_and_unique():
    a, b = jobs.new_submission_id("train"), jobs.new_submission_id("train")
    assert a.startswith("cascadelab-train-") and a != b


# ---------------------------------------------------------------------------------------------------
# runtime_env and the working_dir exclude list


def test_runtime_env_uploads_the_project_and_passes_env_through(tmp_path):
    (tmp_path / "cascadelab").mkdir()
    env = jobs.build_runtime_env(tmp_path, env_vars={"EXTRA": "1", "MLFLOW_TRACKING_URI": "http://x:5000"},
                                 environ={"RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": "sqlite:////a.db",
                                          "RAY_AUTH_TOKEN": "secret", "HOME": "/root"})
    assert env["working_dir"] == str(tmp_path.resolve())
    assert env["excludes"] == list(jobs.WORKING_DIR_EXCLUDES)
    # pass-through vars, explicit ones win; the auth token itself is never put into the job's env
    assert env["env_vars"] == {"RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": "http://x:5000", "EXTRA": "1"}
    assert "env_vars" not in jobs.build_runtime_env(tmp_path, environ={})


def test_runtime_env_rejects_a_missing_working_dir(tmp_path):
    with pytest.raises(ClusterError, match=f"working dir '{tmp_path / 'nope'}' is not a directory"):
        jobs.build_runtime_env(tmp_path / "nope")


def test_exclude_list_keeps_code_and_drops_data_results_stores_and_envs(tmp_path):
    """Package a fake project with Ray's own packaging code and the module's exclude list."""
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "proj"
    kept = ["cascadelab/__init__.py", "cascadelab/platform/data/ingest.py", "cascadelab/jobs/train.py",
            "deploy/kuberay/rayjob.yaml", "cluster.yaml", "pyproject.toml", "tests/platform/data/test_x.py"]
    dropped = ["data/demo/day=2024-01-01/part-0.parquet", "data/demo/dataset.json", "results/run/ckpt.pt",
               "bench_results/a.json", "mlflow.db", "mlflow.db-journal", "mlruns/0/meta.yaml",
               "mlartifacts/1/a.bin", ".venv/bin/python", ".git/HEAD", "cascadelab/__pycache__/x.cpython-311.pyc",
               "elsewhere/x.parquet", "cascadelab.egg-info/PKG-INFO", ".pytest_cache/v/x"]
    for rel in kept + dropped:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")
    target = tmp_path / "pkg.zip"
    create_package(str(project), target, include_gitignore=False, excludes=list(jobs.WORKING_DIR_EXCLUDES))
    files = {n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/")}
    assert files == set(kept)


# ---------------------------------------------------------------------------------------------------
# address resolution


@pytest.mark.parametrize("address, environ, expected", [
    ("http://head:8265", {"RAY_API_SERVER_ADDRESS": "http://a:1", "RAY_ADDRESS": "http://b:2"}, "http://head:8265"),
    (None, {"RAY_API_SERVER_ADDRESS": "http://a:1", "RAY_ADDRESS": "http://b:2"}, "http://a:1"),
    (None, {"RAY_ADDRESS": "b:8265"}, "http://b:8265"),
    (None, {"RAY_ADDRESS": ""}, "http://127.0.0.1:8265"),
    (None, {}, "http://127.0.0.1:8265"),
    (None, {"RAY_ADDRESS": "auto"}, "http://127.0.0.1:8265"),
    ("https://ray.example.com/", {}, "https://ray.example.com"),
])
def test_address_resolution_order(address, environ, expected):
    assert jobs.resolve_address(address, environ=environ) == expected


@pytest.mark.parametrize("address", ["ray://head:10001", "http://:8265", "http://head:port"])
def test_bad_addresses_are_one_line_errors(address):
    with pytest.raises(ClusterError, match=r"--address '.*': expected the Ray dashboard / Jobs API URL"):
        jobs.resolve_address(address, environ={})


def test_unreachable_address_fails_fast_naming_it():
    url = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as exc:
        jobs.connect(url)
    assert time.monotonic() - t0 < 5
    msg = str(exc.value)
    assert "\n" not in msg and f"cannot reach the Ray Jobs API at {url} (from --address)" in msg


def test_environment_address_is_used_and_named(monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", url)
    with pytest.raises(ClusterError, match=f"at {url} \\(from RAY_ADDRESS\\)"):
        jobs.list_jobs()
    with pytest.raises(ClusterError, match="6379 is the GCS port"):
        jobs.connect("127.0.0.1:6379")


def test_scoped_env_hides_and_restores_address_variables(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://x:1")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with runtime.scoped_env(dict.fromkeys(jobs.ADDRESS_ENV)):
        assert "RAY_ADDRESS" not in os.environ
        os.environ["RAY_API_SERVER_ADDRESS"] = "http://set-inside:1"
    assert os.environ["RAY_ADDRESS"] == "http://x:1"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # unset before, unset after
    with pytest.raises(KeyError), runtime.scoped_env({"RAY_ADDRESS": "http://y:2"}):
        assert os.environ["RAY_ADDRESS"] == "http://y:2"
        raise KeyError
    assert os.environ["RAY_ADDRESS"] == "http://x:1"


def test_exit_codes():
    assert jobs.exit_code("SUCCEEDED") == 0
    assert jobs.exit_code("FAILED") == 1 and jobs.exit_code("STOPPED") == 1


# ---------------------------------------------------------------------------------------------------
# CLI (parsing and bad input only; real submissions are in test_submit.py)


def test_cli_parses_submit_and_jobs_commands():
    parser = argparse.ArgumentParser(prog="cascadelab")
    sub = parser.add_subparsers(dest="command", required=True)
    submit_cli.add_parser(sub)
    a = parser.parse_args(["submit", "--address", "http://h:8265", "--no-wait", "--env", "A=1", "--",
                           "train", "--set", "x=1"])
    assert (a.address, a.no_wait, a.env, a.job) == ("http://h:8265", True, ["A=1"], ["--", "train", "--set", "x=1"])
    assert parser.parse_args(["submit", "train"]).job == ["train"]
    b = parser.parse_args(["jobs", "logs", "ID1", "--follow"])
    assert (b.jobs_command, b.job_id, b.follow, b.address) == ("logs", "ID1", True, None)
    assert parser.parse_args(["jobs", "stop", "ID2", "--wait"]).wait


@pytest.mark.parametrize("argv, expected", [
    (["submit", "--", "trian"], "cascadelab: error: unknown job 'trian'"),
    (["submit", "--env", "NOVALUE", "--", "generate", "--out", "x"],
     "cascadelab: error: --env 'NOVALUE': expected KEY=VALUE"),
    (["submit", "--", "generate", "--outt", "x"], "cascadelab: error: arguments of job 'generate': "),
])
def test_cli_bad_input_is_one_line_exit_2(argv, expected, capsys):
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(expected)


def test_cli_unreachable_cluster_is_one_line_exit_2(capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert _cli(["jobs", "list", "--address", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach the Ray Jobs API at {url}" in err


def test_module_is_runnable_standalone():
    url = f"http://127.0.0.1:{_closed_port()}"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "cascadelab.jobs.submit", "--address", url, "--", "generate",
                           "--out", "/tmp/x"], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"cascadelab: error: cannot reach the Ray Jobs API at {url}")
    proc = subprocess.run([sys.executable, "-m", "cascadelab.jobs.submit", "jobs", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and "list" in proc.stdout and "stop" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# storage check, with the node count faked (the real two-node case is in test_storage.py)


@pytest.mark.parametrize("path, remote", [("s3://b/x", True), ("gs://b/x", True), ("abfs://c@a/x", True),
                                          ("/abs/x", False), ("rel/x", False), ("file:///mnt/x", False)])
def test_remote_uri_detection(path, remote):
    assert storage.is_remote_uri(path) is remote


@pytest.mark.parametrize("path, scheme", [("s3://b/x", "s3"), ("HTTP://h:1", "http"), ("file:///mnt/x", "file"),
                                          ("head:8265", ""), ("127.0.0.1:8265", ""), ("/abs/a://b", ""),
                                          ("rel/x", "")])
def test_uri_scheme_needs_the_double_slash(path, scheme):
    assert storage.uri_scheme(path) == scheme


def test_storage_check_uses_alive_node_count(monkeypatch):
    monkeypatch.delenv(storage.SHARED_STORAGE_ENV, raising=False)
    monkeypatch.setattr(storage, "alive_node_count", lambda: 1)
    storage.check_storage_path("/local/results")  # single node: fine
    monkeypatch.setattr(storage, "alive_node_count", lambda: None)
    storage.check_storage_path("results")  # Ray not initialised: nothing to check
    monkeypatch.setattr(storage, "alive_node_count", lambda: 3)
    for path in ("/local/results", "results", "file:///mnt/results"):
        with pytest.raises(ValueError) as exc:
            storage.check_storage_path(path)
        msg = str(exc.value)
        assert "\n" not in msg and f"'{path}'" in msg and "3 alive nodes" in msg and "s3://" in msg
    storage.check_storage_path("s3://bucket/results")
    storage.check_storage_path("/mnt/nfs/results", shared=True)
    monkeypatch.setenv(storage.SHARED_STORAGE_ENV, "1")
    storage.check_storage_path("/mnt/nfs/results")
    with pytest.raises(ValueError, match="expected a directory path or a URI"):
        storage.check_storage_path("  ")


def test_token_auth_rejection_is_one_line(monkeypatch):
    import ray.job_submission
    from ray.exceptions import AuthenticationError

    def refuse(*args, **kwargs):
        raise AuthenticationError("Authentication token is missing.\nSet RAY_AUTH_MODE=token ...")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)
    with socket.socket() as server:  # something listening, so the TCP check passes
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(ClusterError) as exc:
            jobs.connect(url)
    msg = str(exc.value)
    assert "\n" not in msg and f"the Ray cluster at {url} rejected the request" in msg
    assert "RAY_AUTH_MODE=token" in msg


def test_client_errors_become_one_line_cluster_errors():
    def missing(job_id):
        raise RuntimeError("Request failed with status code 404: Job x does not exist.\nmore")

    with pytest.raises(ClusterError, match=r"^job x: no such job on the cluster at http://h:8265$"):
        jobs._call("http://h:8265", "job x", missing, "x")
    with pytest.raises(ClusterError, match=r"^submitting the job failed on http://h:8265: Request failed"):
        jobs._call("http://h:8265", "submitting the job", missing, "x")


def test_a_credential_in_the_job_env_or_command_line_is_refused(tmp_path):
    from cascadelab.platform.config import ConfigError

    (tmp_path / "cascadelab").mkdir()
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD") as err:
        jobs.build_runtime_env(tmp_path, {"MLFLOW_TRACKING_PASSWORD": "hunter2"}, environ={})
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        jobs.submit("train", ["--set", "tracking.uri=http://me:hunter2@head:5000"], add_parser_of("train"),
                    address="http://127.0.0.1:1")
    assert "hunter2" not in str(err.value)
    assert jobs.build_runtime_env(tmp_path, {"SEED": "1"}, environ={})["env_vars"] == {"SEED": "1"}
