"""Connecting to Ray: the embedded local cluster by default, a real cluster when RAY_ADDRESS is set.

This module is the one place that sets or removes ``RAY_API_SERVER_ADDRESS`` (:func:`start_local`,
:func:`scoped_env`), and the one place that decides how much of Ray's own logging reaches the console
(:func:`set_verbose`): by default the workers' and actors' output stays in Ray's session logs
(``/tmp/ray/session_*/logs``) and Ray's driver-side loggers print warnings only; the driver prints
progress and results itself. Ray is imported lazily, inside the functions that need a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator, Mapping

log = logging.getLogger(__name__)

#: How Ray's own processes and clients find the dashboard's HTTP (State / Jobs) API of a cluster.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
#: Ray's driver-side loggers that print start-up and planning details (Ray Data's own logger does not
#: inherit the level of ``ray``).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
_console = {"verbose": False}
#: Ray Train settings this package runs with unless the environment sets them: the controller checks on
#: its workers every 0.25 s instead of every 2 s, so a worker group whose function has returned is shut
#: down (and ``fit()`` returns) that much sooner. A missed check is not a failure (Ray Train waits on a
#: hanging check up to ``RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S``). Set in the driver before the local
#: cluster starts: its processes inherit them and Ray Train passes them on to its controller and workers.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def set_verbose(verbose: bool) -> None:
    """``--verbose``: Ray's internal logging (workers' output, execution plans, Ray Data planning) shown."""
    _console["verbose"] = bool(verbose)
    quiet_ray_logging()


def is_verbose() -> bool:
    return _console["verbose"]


def quiet_ray_logging() -> None:
    """Ray's (and MLflow's) driver-side loggers at WARNING, or INFO with ``--verbose``; Ray Data prints no
    execution plan at the start of each dataset and no progress bars unless verbose on a terminal."""
    level = logging.INFO if is_verbose() else logging.WARNING
    for name in (*RAY_LOGGERS, "mlflow"):
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))  # mlflow sets it on import
    if "ray.data" in sys.modules:
        _quiet_ray_data()


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.print_on_execution_start = is_verbose()
    ctx.enable_progress_bars = is_verbose() and sys.stderr.isatty()


def _init_kwargs() -> dict:
    """``ray.init`` keywords of the console mode: workers' output forwarded to the driver only when
    verbose; Ray's start-up messages (the token notice, the dashboard URL) at ERROR otherwise."""
    verbose = is_verbose()
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}


def _put_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str | None]) -> Iterator[None]:
    """Inside the block each variable of ``values`` is set (a string) or removed (None); afterwards
    every one of them is as it was before, whatever the block did to it."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _put_env(name, value)
        yield
    finally:
        for name, value in saved.items():
            _put_env(name, value)


def apply_ray_train_env() -> None:
    """:data:`RAY_TRAIN_ENV` into this process's environment, except where a variable is already set."""
    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set inside Ray jobs), or start a local one; either way
    with :data:`RAY_TRAIN_ENV` in the environment (values already set win)."""
    import ray

    apply_ray_train_env()
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **_init_kwargs())
        else:
            start_local(num_cpus)
        log.info("Ray cluster resources: %s", ray.cluster_resources())
    quiet_ray_logging()
    _quiet_ray_data()


def start_local(num_cpus: int | None = None, keep_env: bool = False) -> None:
    """Start the embedded cluster with its dashboard on a free port, advertised to the cluster's own
    processes through ``RAY_API_SERVER_ADDRESS``, with :data:`RAY_TRAIN_ENV` in its environment.

    Ray Train's placement-group cleaner finds the State API by auto-detection, which fails ("Found
    multiple active Ray instances") whenever another local Ray runs on the machine (a test session, a
    colleague's job); the placement groups of trials that Tune ends then leak and later trials wait
    forever. Unless ``keep_env`` (a sweep driver, whose trials run in this cluster), the variable is set
    only while the cluster starts (its processes inherit it) and removed afterwards, so that child
    processes of this one do not mistake it for their cluster's address.
    """
    import ray

    apply_ray_train_env()  # before the cluster starts: its processes inherit it
    if os.environ.get(API_SERVER_ENV):
        ray.init(num_cpus=num_cpus, include_dashboard=True, **_init_kwargs())
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with contextlib.nullcontext() if keep_env else scoped_env({API_SERVER_ENV: None}):
        os.environ[API_SERVER_ENV] = url  # inherited by the cluster's processes
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 **_init_kwargs())


def decide_use_gpu(requested: str) -> bool:
    """``auto``: use GPUs when the cluster has any. ``true`` on a cluster without GPUs fails at once
    (Ray Train would otherwise wait for a GPU worker forever)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if requested == "true" and gpus < 1:
        raise RuntimeError("train.use_gpu=true but the Ray cluster has no GPU; "
                           "use train.use_gpu=auto or false, or add GPU nodes")
    return requested == "true" or (requested == "auto" and gpus >= 1)


def one_line_error(exc: BaseException) -> str:
    """What a failed run prints and tags: ``Type: first line`` of the failure itself, looking through
    Ray Train's ``WorkerGroupError`` (``worker_failures``: rank -> the exception that rank raised) and
    Ray's task errors (their ``cause``)."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, Mapping) and failures:
        exc = failures[sorted(failures)[0]]
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
