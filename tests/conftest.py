"""Shared fixtures. Unit tests need no Ray; integration tests share one local Ray session (2 CPUs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One auth mode for the whole process tree (ray.init would otherwise enable token auth), quiet Ray.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 3-day two-stage synthetic dataset, small enough for one CPU training run in seconds."""
    from cascadelab.platform.data.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("data") / "tiny"
    generate(SyntheticConfig(days=3, requests_per_day=192, seed=7), root)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster with 2 CPUs for the whole session (started once, ~5 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """Ray for one test; re-initialises if another module shut the session cluster down."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    return ray


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
