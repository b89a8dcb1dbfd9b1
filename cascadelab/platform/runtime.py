"""Connecting to Ray: the embedded local cluster by default, a real cluster when RAY_ADDRESS is set.

This module is the one place that sets or removes ``RAY_API_SERVER_ADDRESS`` (:func:`start_local`,
:func:`scoped_env`). Ray is imported lazily, inside the functions that need a cluster.
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


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set inside Ray jobs), or start a local one."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            start_local(num_cpus)
        log.info("Ray cluster resources: %s", ray.cluster_resources())
    if not sys.stderr.isatty():
        DataContext.get_current().enable_progress_bars = False


def start_local(num_cpus: int | None = None, keep_env: bool = False) -> None:
    """Start the embedded cluster with its dashboard on a free port, advertised to the cluster's own
    processes through ``RAY_API_SERVER_ADDRESS``.

    Ray Train's placement-group cleaner finds the State API by auto-detection, which fails ("Found
    multiple active Ray instances") whenever another local Ray runs on the machine (a test session, a
    colleague's job); the placement groups of trials that Tune ends then leak and later trials wait
    forever. Unless ``keep_env`` (a sweep driver, whose trials run in this cluster), the variable is set
    only while the cluster starts (its processes inherit it) and removed afterwards, so that child
    processes of this one do not mistake it for their cluster's address.
    """
    import ray

    if os.environ.get(API_SERVER_ENV):
        ray.init(num_cpus=num_cpus, include_dashboard=True, log_to_driver=True)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with contextlib.nullcontext() if keep_env else scoped_env({API_SERVER_ENV: None}):
        os.environ[API_SERVER_ENV] = url  # inherited by the cluster's processes
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 log_to_driver=True)


def decide_use_gpu(requested: str) -> bool:
    """``auto``: use GPUs when the cluster has any. ``true`` on a cluster without GPUs fails at once
    (Ray Train would otherwise wait for a GPU worker forever)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if requested == "true" and gpus < 1:
        raise RuntimeError("train.use_gpu=true but the Ray cluster has no GPU; "
                           "use train.use_gpu=auto or false, or add GPU nodes")
    return requested == "true" or (requested == "auto" and gpus >= 1)
