"""Submitting ``cascadelab`` jobs to a Ray cluster through the Ray Jobs API (a thin layer over
``ray.job_submission.JobSubmissionClient``).

A job is one of the entry points ``cascadelab.jobs.<name>`` (``train``, ``sweep``, ...); the caller
(``cascadelab.jobs.submit``) names the valid jobs and hands over the job's argparse definition, so this
layer imports nothing from ``cascadelab.jobs``. ``submit`` turns ``("train", ["--set", "k=v"])`` into the
entrypoint ``python -m cascadelab.jobs.train --set k=v``, uploads
the project directory as the job's ``working_dir`` (without data, results, local MLflow stores and
virtualenvs: :data:`WORKING_DIR_EXCLUDES`), passes a few environment variables through
(:data:`PASSTHROUGH_ENV`), prints the job id and, unless told otherwise, follows the job's logs until it
ends. Inside the job, ``ray.init()`` joins the cluster through the ``RAY_ADDRESS`` the job supervisor sets.

Address resolution (first that is set): the ``address`` argument (``--address``), then the
``RAY_API_SERVER_ADDRESS`` and ``RAY_ADDRESS`` environment variables, then :data:`DEFAULT_ADDRESS`.
The address is the dashboard / Jobs API URL of the head node (``http://HEAD:8265``), not the GCS
address (``HEAD:6379``). An address without a scheme gets ``http://``; ``auto`` means the local head.
An unreachable address fails within a few seconds with a :class:`ClusterError` naming it.

Ray itself lets ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` override an explicit address; here the
explicit one wins (the variables are hidden from Ray while the client is created).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import yaml

from cascadelab.platform.cluster.credentials import check_job_argv, check_job_env
from cascadelab.platform.cluster.storage import uri_scheme
from cascadelab.platform.config import flatten, parse_overrides
from cascadelab.platform.runtime import scoped_env

# Ray's job client is imported lazily (in connect), so that building a submission needs no Ray.

log = logging.getLogger(__name__)

#: Where ``cascadelab submit`` looks when neither ``--address`` nor the environment names a cluster:
#: the dashboard of a head started on this machine (``ray start --head``).
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

#: Environment variables naming the Jobs API address, in order of precedence (after ``--address``).
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")

#: Variables copied from the submitting shell into the job's ``runtime_env.env_vars`` when set: the
#: job's driver must use the cluster's auth mode, and a tracking URI set in the shell should reach it.
#: ``RAY_AUTH_TOKEN`` is deliberately *not* copied: job env vars are visible in the dashboard; put the
#: token file on every node instead (deploy/README.md).
PASSTHROUGH_ENV = ("RAY_AUTH_MODE", "MLFLOW_TRACKING_URI")

#: ``runtime_env["excludes"]`` for the uploaded working directory (gitignore syntax, relative to it).
#: The upload is capped at 512 MiB and re-sent whenever its content changes, so nothing big or
#: node-local goes in: datasets and run outputs live on shared storage and are passed by path.
#: Top-level ``/data`` and ``/results`` are anchored: an unanchored ``data`` would also drop the
#: ``cascadelab/platform/data`` package.
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    # datasets and outputs (pass them as shared paths / URIs instead)
    "/data",
    "/results",
    "/bench_results",
    "*.parquet",
    # local MLflow stores (the job logs to tracking.uri)
    "mlflow.db*",
    "mlruns",
    "mlartifacts",
    # environments, version control, caches, build metadata
    ".venv",
    "venv",
    ".git",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
)

#: Job states after which a job never changes again.
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})

# Seconds to wait for a TCP connection to the Jobs API before giving up.
CONNECT_TIMEOUT_S = 5.0

# Ray's client-side loggers and the level they are held at unless cascadelab logs at DEBUG: packaging
# INFO lines for every upload, and working_dir's notice that .git/.venv are excluded by default
# (they are in WORKING_DIR_EXCLUDES anyway). Packaging warnings (e.g. a package near the size cap) stay.
_RAY_CLIENT_LOG_LEVELS = {
    "ray.dashboard.modules.dashboard_sdk": logging.WARNING,
    "ray.dashboard.modules.job.sdk": logging.WARNING,
    "ray._private.runtime_env.packaging": logging.WARNING,
    "ray._private.runtime_env.working_dir": logging.ERROR,
}


class ClusterError(RuntimeError):
    """A one-line, user-facing problem with the cluster, the address or the submitted job."""


# ----------------------------------------------------------------------------------------------------
# Building the submission
# ----------------------------------------------------------------------------------------------------


#: A job's argparse definition: adds its subcommand to a subparsers action (``cascadelab.jobs.<name>.add_parser``).
AddParser = Callable[[argparse._SubParsersAction], None]


def split_job_argv(argv: Sequence[str], names: Sequence[str]) -> tuple[str, list[str]]:
    """``["--", "train", "--set", "a=1"]`` -> ``("train", ["--set", "a=1"])``; the job must be one of ``names``."""
    args = list(argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise ClusterError(f"no job given; expected one of {', '.join(names)} after '--', "
                           "e.g. cascadelab submit -- train --set data.path=/shared/data")
    name, rest = args[0], args[1:]
    if name not in names:
        raise ClusterError(f"unknown job '{name}'; expected one of {', '.join(names)} "
                           f"(the modules cascadelab.jobs.<name>)")
    return name, rest


def build_entrypoint(name: str, args: Sequence[str], python: str = "python") -> str:
    """The shell command the cluster runs: ``python -m cascadelab.jobs.<name> <args...>`` (quoted)."""
    return shlex.join([python, "-m", f"cascadelab.jobs.{name}", *args])


def build_runtime_env(working_dir: str | os.PathLike[str] = ".", env_vars: Mapping[str, str] | None = None,
                      environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``runtime_env`` for a job: the project as ``working_dir`` (minus :data:`WORKING_DIR_EXCLUDES`)
    and ``env_vars`` = the set ones of :data:`PASSTHROUGH_ENV` from ``environ``, then ``env_vars``."""
    env_source = os.environ if environ is None else environ
    wd = Path(working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise ClusterError(f"working dir '{working_dir}' is not a directory; expected the project root "
                           "(the directory that holds the cascadelab package)")
    if not (wd / "cascadelab").is_dir():
        log.warning("working dir %s has no cascadelab/ package; the cluster must have cascadelab "
                    "installed already", wd)
    env = {k: env_source[k] for k in PASSTHROUGH_ENV if env_source.get(k)}
    for key, value in (env_vars or {}).items():
        if not key or not isinstance(value, str):
            raise ClusterError(f"env var {key!r}: expected a non-empty name and a string value")
        env[key] = value
    check_job_env(env)  # a job's env vars are shown in the dashboard: credentials come from the nodes
    runtime_env: dict[str, Any] = {"working_dir": str(wd), "excludes": list(WORKING_DIR_EXCLUDES)}
    if env:
        runtime_env["env_vars"] = env
    return runtime_env


class _RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ClusterError(message)


def check_job_args(name: str, args: Sequence[str], add_parser: AddParser) -> argparse.Namespace:
    """Parse ``args`` with the job's own argparse definition ``add_parser``, so that a typo fails here
    rather than minutes later on the cluster. Returns the parsed namespace."""
    parser = _RaisingParser(prog="cascadelab")
    sub = parser.add_subparsers(dest="command")  # sub-parsers inherit _RaisingParser
    add_parser(sub)
    try:
        return parser.parse_args([name, *args])
    except ClusterError as exc:
        raise ClusterError(f"arguments of job '{name}': {exc}") from None


def _relative_path(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and not uri_scheme(value) and not Path(value).is_absolute()


def job_settings(ns: argparse.Namespace) -> dict[str, Any]:
    """The dotted config keys a job's ``--config`` file and ``--set`` overrides name, overrides last.

    A config file that does not parse is left to the job itself to report (it may be a sweep spec or a
    file only the cluster has); a malformed override raises ``ConfigError`` here.
    """
    settings: dict[str, Any] = {}
    config_file = getattr(ns, "config", None)
    if config_file and Path(config_file).is_file():
        try:
            loaded = yaml.safe_load(Path(config_file).read_text())
        except (OSError, yaml.YAMLError):
            loaded = None
        if isinstance(loaded, dict):
            settings.update(flatten(loaded))
    settings.update(flatten(parse_overrides(getattr(ns, "overrides", None))))
    return settings


def lint_job_args(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for settings that work locally but not inside a submitted job, whose working directory
    is a temporary copy of the project on the head (without data/ or results/)."""
    env_source = os.environ if environ is None else environ
    settings = job_settings(ns)

    warnings = []
    for key in ("data.path", "train.storage_path"):
        if key in settings and _relative_path(settings[key]):
            warnings.append(f"{key}={settings[key]!r} is relative: in the job it resolves inside a "
                            "temporary copy of the project on the cluster; pass an absolute path on "
                            "storage every node can reach (or s3://... for train.storage_path)")
    uri = settings.get("tracking.uri") or env_source.get("MLFLOW_TRACKING_URI")
    if hasattr(ns, "overrides") and not uri:
        warnings.append("no tracking.uri: the job would log to mlflow.db inside its temporary working "
                        "dir on the head; pass --set tracking.uri=http://HEAD:5000 (or sqlite:////abs/path)")
    elif isinstance(uri, str) and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        warnings.append(f"tracking.uri={uri!r} is a relative SQLite path; use sqlite:////absolute/path "
                        "or the cluster's MLflow server (http://HEAD:5000)")
    return warnings


def new_submission_id(name: str) -> str:
    """Readable and unique: ``cascadelab-<job>-<UTC time>-<random>``."""
    return f"cascadelab-{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


# ----------------------------------------------------------------------------------------------------
# Talking to the cluster
# ----------------------------------------------------------------------------------------------------


def _resolve(address: str | None, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    env_source = os.environ if environ is None else environ
    source, value = "default", DEFAULT_ADDRESS
    if address:
        source, value = "--address", address
    else:
        for name in ADDRESS_ENV:
            if env_source.get(name):
                source, value = name, env_source[name]
                break
    value = value.strip().rstrip("/")
    if value == "auto":
        value = DEFAULT_ADDRESS
    if not uri_scheme(value):
        value = f"http://{value}"
    parts = urlsplit(value)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise ClusterError(f"{source} '{value}': expected the Ray dashboard / Jobs API URL of the head "
                           "node, e.g. http://HEAD:8265")
    return value, source


def resolve_address(address: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The Jobs API URL: ``address``, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else
    :data:`DEFAULT_ADDRESS`; ``http://`` is added when there is no scheme."""
    return _resolve(address, environ)[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _check_reachable(url: str, source: str, timeout: float) -> None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        hint = (" (6379 is the GCS port; the Jobs API is the dashboard port, usually 8265)"
                if port == 6379 else "")
        raise ClusterError(f"cannot reach the Ray Jobs API at {url} (from {source}): {reason}{hint}; "
                           "start a head (`ray start --head` / `ray up cluster.yaml`) or forward its "
                           "dashboard (`ray dashboard cluster.yaml`) and pass --address") from None


def connect(address: str | None = None, timeout: float = CONNECT_TIMEOUT_S):
    """A connected ``JobSubmissionClient`` for the resolved address; fails fast with ClusterError."""
    url, source = _resolve(address)
    _check_reachable(url, source, timeout)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not log.isEnabledFor(logging.DEBUG):
        for name, level in _RAY_CLIENT_LOG_LEVELS.items():
            logging.getLogger(name).setLevel(level)
    with scoped_env(dict.fromkeys(ADDRESS_ENV)):  # hidden, so that Ray cannot override ``url``
        try:
            return JobSubmissionClient(url)
        except AuthenticationError as exc:
            raise ClusterError(f"the Ray cluster at {url} rejected the request ({_first_line(exc)}); it uses "
                               "token auth: set RAY_AUTH_MODE=token and provide the cluster's token "
                               "(RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
        except Exception as exc:  # connection reset, not a Ray dashboard, version mismatch, ...
            raise ClusterError(f"no usable Ray Jobs API at {url} (from {source}): {_first_line(exc)}") from None


def _call(url: str, what: str, fn, *args, **kwargs):
    """Run a client call, turning Ray's multi-line HTTP errors into one-line ClusterErrors."""
    try:
        return fn(*args, **kwargs)
    except ClusterError:
        raise
    except Exception as exc:
        text = _first_line(exc)
        if what.startswith("job ") and ("404" in text or "does not exist" in text):
            raise ClusterError(f"{what}: no such job on the cluster at {url}") from None
        raise ClusterError(f"{what} failed on {url}: {text}") from None


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def _out(out: IO[str] | None) -> IO[str]:
    return sys.stdout if out is None else out


def _follow_logs(client, job_id: str, out: IO[str]) -> None:
    async def pump() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(pump())


def wait_for_job(client, job_id: str, tail: bool = True, out: IO[str] | None = None,
                 poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Block until the job reaches a terminal state (following its logs when ``tail``); return it."""
    stream = _out(out)
    url = client.get_address()
    if tail:
        try:
            _follow_logs(client, job_id, stream)
        except Exception as exc:  # websocket closed early, proxy without websockets, ...
            log.warning("following the logs of %s stopped (%s); waiting for the job to end",
                        job_id, _first_line(exc))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = _status_name(_call(url, f"job {job_id}", client.get_job_status, job_id))
        if status in TERMINAL_STATUSES:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    if status != "SUCCEEDED":
        info = _call(url, f"job {job_id}", client.get_job_info, job_id)
        message = (info.message or "").strip().splitlines()
        reason = message[0].split(", last available logs")[0] if message else "no message"
        log.log(logging.ERROR if status == "FAILED" else logging.WARNING,
                "job %s %s: %s (logs: cascadelab jobs logs %s --address %s)", job_id, status, reason, job_id, url)
    else:
        log.info("job %s SUCCEEDED", job_id)
    return status


def submit_entrypoint(entrypoint: str, address: str | None = None, working_dir: str | os.PathLike[str] = ".",
                      env_vars: Mapping[str, str] | None = None, wait: bool = True, tail: bool = True,
                      submission_id: str | None = None, metadata: Mapping[str, str] | None = None,
                      out: IO[str] | None = None) -> str:
    """Submit any shell ``entrypoint`` with the project as working_dir; print the job id (stdout);
    with ``wait``, follow it to a terminal state. Returns the job (submission) id."""
    runtime_env = build_runtime_env(working_dir, env_vars)
    client = connect(address)
    url = client.get_address()
    log.info("submitting to %s: %s (working_dir %s)", url, entrypoint, runtime_env["working_dir"])
    job_id = _call(url, "submitting the job", client.submit_job, entrypoint=entrypoint,
                   runtime_env=runtime_env, submission_id=submission_id, metadata=dict(metadata or {}))
    stream = _out(out)
    stream.write(f"{job_id}\n")
    stream.flush()
    if wait:
        wait_for_job(client, job_id, tail=tail, out=stream)
    else:
        log.info("not waiting; follow it with: cascadelab jobs logs %s --follow --address %s", job_id, url)
    return job_id


def submit(name: str, args: Sequence[str], add_parser: AddParser, address: str | None = None,
           working_dir: str | os.PathLike[str] = ".", env_vars: Mapping[str, str] | None = None,
           wait: bool = True, tail: bool = True, out: IO[str] | None = None) -> str:
    """Submit ``cascadelab.jobs.<name>`` with ``args`` to the cluster; see the module docstring.

    ``args`` are parsed locally first with the job's argparse definition ``add_parser``, and settings
    that would land in the job's temporary directory (relative data/storage paths, no tracking URI) are
    warned about. Returns the job id; with ``wait`` it returns once the job has ended (see
    :func:`job_status`).
    """
    check_job_argv(args)  # the entrypoint is shown like the env
    ns = check_job_args(name, args, add_parser)
    for warning in lint_job_args(ns):
        log.warning("%s", warning)
    return submit_entrypoint(build_entrypoint(name, args), address=address, working_dir=working_dir,
                             env_vars=env_vars, wait=wait, tail=tail, submission_id=new_submission_id(name),
                             metadata={"cascadelab.job": name}, out=out)


def job_status(job_id: str, address: str | None = None) -> str:
    """``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or ``STOPPED``."""
    client = connect(address)
    return _status_name(_call(client.get_address(), f"job {job_id}", client.get_job_status, job_id))


def list_jobs(address: str | None = None) -> list[Any]:
    """All jobs the cluster knows (``JobDetails``), oldest first."""
    client = connect(address)
    jobs = _call(client.get_address(), "listing jobs", client.list_jobs)
    return sorted(jobs, key=lambda j: j.start_time or 0)


def job_logs(job_id: str, address: str | None = None, follow: bool = False, out: IO[str] | None = None) -> str:
    """The job's logs so far; with ``follow``, stream them to ``out`` until the job ends (returns '')."""
    client = connect(address)
    url = client.get_address()
    if follow:
        _call(url, f"job {job_id}", client.get_job_status, job_id)  # unknown id: one-line error
        _follow_logs(client, job_id, _out(out))
        return ""
    return _call(url, f"job {job_id}", client.get_job_logs, job_id)


def stop_job(job_id: str, address: str | None = None, wait: bool = False, timeout_s: float = 60.0) -> str:
    """Ask the cluster to stop a job; with ``wait``, wait until it is terminal. Returns its status."""
    client = connect(address)
    url = client.get_address()
    stopped = _call(url, f"job {job_id}", client.stop_job, job_id)
    if not stopped:
        log.info("job %s was not running", job_id)
    if wait:
        return wait_for_job(client, job_id, tail=False, timeout_s=timeout_s, poll_s=0.5)
    return _status_name(_call(url, f"job {job_id}", client.get_job_status, job_id))


def exit_code(status: str) -> int:
    """Process exit code for a final job status: 0 only for SUCCEEDED."""
    return 0 if status == "SUCCEEDED" else 1
