"""Integration: a node lost mid-run on a multi-node ``ray.cluster_utils.Cluster`` (every node a process
tree on this machine, so the storage path is shared by construction).

The head holds no CPU (the driver, Ray Train's controller and Ray Data's coordinator are pinned to it
and need none); the Train worker runs on one of two 2-CPU nodes, which is removed while the worker is
paused mid-day. Ray Train restarts the worker group on the other node from the last checkpoint.
"""

from __future__ import annotations

import json

import pytest

from tests.platform.train.test_faults import (
    DAY_KEYS,
    Hooks,
    cfg_for,
    expected_progress,
    in_background,
    metric_steps,
    wait_committed,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NODE = {"num_cpus": 2, "object_store_memory": 96 * 2**20}


@pytest.fixture
def cluster(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from cascadelab.platform.train.loop import HOOKS_ENV

    if ray.is_initialized():
        ray.shutdown()
    hooks = Hooks(tmp_path)
    hooks.set()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 96 * 2**20,
                                                      "include_dashboard": False})
    for _ in range(2):
        c.add_node(**NODE)
    ray.init(address=c.address, log_to_driver=False, runtime_env={"env_vars": {HOOKS_ENV: str(hooks.path)}})
    c.wait_for_nodes()
    yield c, hooks
    ray.shutdown()
    c.shutdown()


def _controller_error() -> type:
    import ray.train

    return ray.train.ControllerError


# run.py's DriverProgress queue actor is not pinned to the driver's node: when it lands on the removed
# node the Train controller dies with it (ControllerError: "_QueueActor ... its node has died").
@pytest.mark.xfail(raises=_controller_error(), strict=False,
                   reason="seen once before the progress queue was pinned to the driver's node (run.py): "
                          "a ControllerError when the removed node held it; passes since, kept until seen "
                          "green repeatedly in CI")
def test_a_lost_node_is_replaced_from_the_checkpoint(cluster, tiny_dataset, tmp_path):
    from cascadelab.platform.train.run import run_training

    c, hooks = cluster
    pause, starts = tmp_path / "paused.json", tmp_path / "starts.jsonl"
    hooks.set(pause_at_step=4, pause_file=str(pause), starts_file=str(starts))  # mid day 1
    cfg = cfg_for(tiny_dataset, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "results",
                  "train.max_failures=1", "train.shared_storage=true")
    lost: list[str] = []

    def remove_node():
        paused = hooks.wait_paused(pause, timeout=200)
        wait_committed(tmp_path / "results", 4)
        node = next(n for n in c.worker_nodes if n.node_id == paused["node_id"])
        lost.append(node.node_id)
        c.remove_node(node, allow_graceful=False)

    join = in_background(remove_node)
    result = run_training(cfg)
    join()
    started = [json.loads(line) for line in starts.read_text().splitlines()]
    assert [s["global_step"] for s in started] == [0, 4]  # resumed mid-day, not rerun
    assert started[0]["node_id"] == lost[0] != started[1]["node_id"]  # on the node that is left
    assert lost[0] not in _alive_nodes()
    assert (result.metrics["train_rows"], result.metrics["global_steps"]) == expected_progress(cfg)
    assert metric_steps(result.tracking_uri, result.run_id) == {k: [0, 1] for k in DAY_KEYS}


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}
