"""The tune integration tests' shared real sweep (see real_sweep.py)."""

from __future__ import annotations

import sys

import pytest

from tests.platform.tune.real_sweep import ResumedSweep, run_killed_and_resumed_sweep


@pytest.fixture(scope="session")
def resumed_sweep(tmp_path_factory, tiny_dataset) -> ResumedSweep:
    """The killed-and-resumed 2x2 sweep, run once per session for every test that reads it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # free the session Ray's CPUs; ``ray_local`` restarts it
        ray.shutdown()
    return run_killed_and_resumed_sweep(tmp_path_factory.mktemp("sweep"), tiny_dataset)
