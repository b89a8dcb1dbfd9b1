"""The storage check and cross-node placement on a fake two-node Ray cluster (``ray.cluster_utils``).

Both "nodes" run on this machine and share its file system, so this cannot show a checkpoint going
missing; it shows that the check sees two alive nodes and refuses a node-local ``storage_path``, and
that a STRICT_SPREAD placement really puts work on two different nodes. ~10 s on 2 cores.
"""

from __future__ import annotations

import os
import time

import pytest

from cascadelab.platform.cluster.storage import SHARED_STORAGE_ENV, alive_node_count, check_storage_path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # one auth mode for this process and its Ray processes
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # e.g. the session-wide ray.init of tests/conftest.py; it re-inits on demand
        ray.shutdown()
    # Cluster() records its address in /tmp/ray/ray_current_cluster (and deletes that file on shutdown),
    # where any plain ray.init() on this machine would find it. Keep it private to this module.
    patch = pytest.MonkeyPatch()
    patch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    patch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        worker = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        patch.undo()


@pytest.mark.timeout(120)
def test_two_alive_nodes_refuse_a_local_storage_path(two_nodes, tmp_path, monkeypatch):
    monkeypatch.delenv(SHARED_STORAGE_ENV, raising=False)
    assert alive_node_count() == 2
    for path in (str(tmp_path / "results"), "results"):
        with pytest.raises(ValueError) as exc:
            check_storage_path(path)
        msg = str(exc.value)
        assert "\n" not in msg and f"train.storage_path '{path}'" in msg and "2 alive nodes" in msg
    check_storage_path("s3://bucket/cascadelab/results")
    check_storage_path("gs://bucket/cascadelab/results")
    check_storage_path(str(tmp_path / "nfs"), shared=True)
    monkeypatch.setenv(SHARED_STORAGE_ENV, "true")
    check_storage_path(str(tmp_path / "nfs"))


@pytest.mark.timeout(120)
def test_strict_spread_places_work_on_two_nodes(two_nodes):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=1)
    def node_id() -> str:
        return ray.get_runtime_context().get_node_id()

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    try:
        ray.get(pg.ready(), timeout=60)
        ids = ray.get([node_id.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=i)).remote() for i in range(2)], timeout=60)
    finally:
        remove_placement_group(pg)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(set(ids)) == 2 and set(ids) == alive


@pytest.mark.timeout(120)
def test_back_to_one_node_accepts_a_local_path(two_nodes, tmp_path, monkeypatch):
    """Runs last in this module: removes the worker node."""
    monkeypatch.delenv(SHARED_STORAGE_ENV, raising=False)
    cluster, worker = two_nodes
    cluster.remove_node(worker)
    deadline = time.monotonic() + 60
    while alive_node_count() != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive_node_count() == 1
    check_storage_path(str(tmp_path / "results"))
