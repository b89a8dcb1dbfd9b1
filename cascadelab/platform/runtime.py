"""Connecting to Ray: the embedded local cluster by default, a real cluster when RAY_ADDRESS is set."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set inside Ray jobs), or start a local one."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=True, log_to_driver=True)
        log.info("Ray cluster resources: %s", ray.cluster_resources())
    if not sys.stderr.isatty():
        DataContext.get_current().enable_progress_bars = False


def decide_use_gpu(requested: str) -> bool:
    """``auto``: use GPUs when the cluster has any. ``true`` on a cluster without GPUs fails at once
    (Ray Train would otherwise wait for a GPU worker forever)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if requested == "true" and gpus < 1:
        raise RuntimeError("train.use_gpu=true but the Ray cluster has no GPU; "
                           "use train.use_gpu=auto or false, or add GPU nodes")
    return requested == "true" or (requested == "auto" and gpus >= 1)
