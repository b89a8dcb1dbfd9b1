"""Is ``train.storage_path`` usable by every node of the running Ray cluster?

Ray Train writes checkpoints from the worker processes into ``<storage_path>/<run name>/``. On a
multi-node cluster a plain local path (``/home/ray/results``, ``results``) names a *different* directory on
every node: the controller's marker file is missing on the workers and checkpoints scatter across
machines (Ray fails late with "A local path on the head node is not accessible by worker nodes").
:func:`check_storage_path` refuses such a path up front, in one line.

Accepted:

* URIs of remote filesystems: ``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ... (anything with a
  scheme other than ``file``);
* any path when the cluster has a single alive node (local development, ``ray start --head`` alone);
* a local path (or ``file://`` URI) on a shared filesystem mounted at the same place on every node
  (NFS, EFS, Lustre): say so with ``shared=True`` (the lead's config key ``train.shared_storage``) or the
  environment variable ``CASCADELAB_SHARED_STORAGE=1``. Nothing here can verify such a mount: from the
  head, a node-local directory and an NFS directory look the same.

Call it on the driver after ``ray.init()``; without a running Ray session there is nothing to check.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: Escape hatch for shared POSIX mounts: set to 1/true/yes to accept local paths on multi-node clusters.
SHARED_STORAGE_ENV = "CASCADELAB_SHARED_STORAGE"

_TRUE = frozenset({"1", "true", "yes", "on"})


def uri_scheme(path: str) -> str:
    """The scheme of a ``scheme://...`` URI, lower case; ``""`` for a plain path.

    ``s3://b/x`` -> ``s3``; ``file:///x`` -> ``file``; ``/abs/x``, ``rel/x``, ``head:8265`` -> ``""``
    (a scheme counts only when ``://`` follows it, so ``host:port`` and ``C:\\x`` are not URIs).
    """
    scheme = urlsplit(path).scheme
    return scheme if scheme and path[len(scheme):].startswith("://") else ""


def is_remote_uri(storage_path: str) -> bool:
    """``s3://bucket/x`` -> True; ``/abs/path``, ``rel/path``, ``file:///x`` -> False.

    The one test of "is this a remote filesystem" for storage and data paths: a URI whose scheme is
    not ``file`` (the filesystem is then resolved by pyarrow / fsspec, never by :mod:`pathlib`).
    """
    return uri_scheme(storage_path) not in ("", "file")


def shared_storage_from_env(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(SHARED_STORAGE_ENV, "").strip().lower() in _TRUE


def alive_node_count() -> int | None:
    """Alive nodes of the connected Ray cluster, or None when this process is not connected to Ray."""
    import ray

    if not ray.is_initialized():
        return None
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_storage_path(storage_path: str, shared: bool = False) -> None:
    """Raise ``ValueError`` (one line, naming the path) when ``storage_path`` is a node-local path and
    the running Ray cluster has more than one alive node. See the module docstring for what passes."""
    if not isinstance(storage_path, str) or not storage_path.strip():
        raise ValueError(f"train.storage_path {storage_path!r}: expected a directory path or a URI "
                         "such as s3://bucket/prefix")
    if is_remote_uri(storage_path):
        return
    if shared or shared_storage_from_env():
        log.debug("train.storage_path %s accepted as shared storage", storage_path)
        return
    nodes = alive_node_count()
    if nodes is None:
        log.debug("Ray is not initialised; not checking train.storage_path %s", storage_path)
        return
    if nodes > 1:
        raise ValueError(
            f"train.storage_path '{storage_path}' is a node-local path, but the Ray cluster has {nodes} "
            "alive nodes that must all write checkpoints there; expected shared storage: a URI such as "
            f"s3://bucket/prefix or gs://bucket/prefix, or, for a shared mount at the same path on every "
            f"node (NFS/EFS), set train.shared_storage=true or {SHARED_STORAGE_ENV}=1")
