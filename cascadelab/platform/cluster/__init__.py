"""Running on a real Ray cluster: job submission through the Ray Jobs API, and storage checks.

* :mod:`cascadelab.platform.cluster.jobs` submits ``cascadelab.jobs.<name>`` entry points to a cluster
  (``cascadelab submit``), lists, tails and stops jobs (``cascadelab jobs``).
* :mod:`cascadelab.platform.cluster.storage` refuses a node-local ``train.storage_path`` on a
  multi-node cluster.

Cluster definitions live outside the package: ``cluster.yaml`` (AWS, Ray cluster launcher) and
``deploy/`` (on-prem, KubeRay); see ``deploy/README.md``.
"""

from cascadelab.platform.cluster.jobs import (
    DEFAULT_ADDRESS,
    PASSTHROUGH_ENV,
    WORKING_DIR_EXCLUDES,
    ClusterError,
    build_entrypoint,
    build_runtime_env,
    job_logs,
    job_status,
    list_jobs,
    resolve_address,
    stop_job,
    submit,
    submit_entrypoint,
)
from cascadelab.platform.cluster.storage import SHARED_STORAGE_ENV, check_storage_path

__all__ = [
    "DEFAULT_ADDRESS",
    "PASSTHROUGH_ENV",
    "SHARED_STORAGE_ENV",
    "WORKING_DIR_EXCLUDES",
    "ClusterError",
    "build_entrypoint",
    "build_runtime_env",
    "check_storage_path",
    "job_logs",
    "job_status",
    "list_jobs",
    "resolve_address",
    "stop_job",
    "submit",
    "submit_entrypoint",
]
