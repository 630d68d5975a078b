"""``check_cluster`` against verl's own placement on a multi-node Ray cluster (issue 22 §2).

verl's pools are placement groups of ``{"CPU": 3, "GPU": 1}`` bundles, one group per node entry
(``ResourcePoolManager`` -> ``RayResourcePool.get_placement_groups``, used here unchanged). The
task runner is plain ``ray.remote`` like verl's own (``runner_class``), and a vLLM rollout server is
created on its replica's node with hard node affinity and no resources named
(``vllm_async_server.py:1377-1384``, reproduced option for option below).

Measured here (Ray 2.60): an actor that names no resources holds no CPU once placed (its
"placement CPU" does not wait for a free one), so on two 2-GPU nodes with exactly 3 CPUs per GPU
both pools are placed with the runner alive. A CPU held by anything else (another job's actor,
or a runner declared with ``num_cpus=1`` as this recipe once did) leaves a node one CPU short and
verl's placement group waits forever: ``check_cluster`` (called from inside the task runner with
the cluster's free resources) must refuse exactly that cluster.
"""

from __future__ import annotations

import threading

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GPUS = 2
WAIT_S = 10  # a placement group not ready by then waits forever (nothing else runs on this cluster)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # another test's Ray in this process (conftest's ray_cpu) would be reused by connect=True
    # the driver's head node has no CPU and no GPU; two GPU nodes with exactly 3 CPUs per GPU
    c = Cluster(initialize_head=True, connect=True,
                head_node_args=dict(num_cpus=0, num_gpus=0, include_dashboard=False))
    try:
        for _ in range(2):
            c.add_node(num_cpus=3 * GPUS, num_gpus=GPUS)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


class _Actor:
    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _verl_pools_placed(pools) -> bool:
    """verl's own pool creation and placement (it blocks until every placement group is ready)."""
    from verl.single_controller.ray.base import ResourcePoolManager

    mgr = ResourcePoolManager(resource_pool_spec={"trainer": list(pools.trainer), "teacher": list(pools.teacher)},
                              mapping={})
    mgr.create_resource_pool()
    done = threading.Event()

    def place():
        for pool in mgr.resource_pool_dict.values():
            pool.get_placement_groups()
        done.set()

    threading.Thread(target=place, daemon=True).start()
    return done.wait(WAIT_S)


def _free_cpus_settle(expected: float) -> None:
    """Wait until Ray's resource view (synced from the raylets) shows ``expected`` free CPUs."""
    import time

    import ray

    deadline = time.monotonic() + WAIT_S
    while ray.available_resources().get("CPU", 0) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == expected


def _remove_placement_groups():
    import ray
    from ray.util.placement_group import PlacementGroup

    for pg_id, info in ray.util.placement_group_table().items():
        if info["state"] != "REMOVED":
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))


def test_check_cluster_agrees_with_verl_placement(cluster):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from recipe.ta_opd.verl_backend.validate import Pools, check_cluster
    from ta_opd.errors import TAConfigError

    pools = Pools((2, GPUS), [GPUS], [GPUS])  # trainer.nnodes=2 (ALL nodes), the teacher on 1 whole node
    actor = ray.remote(_Actor)

    def check() -> bool:
        try:
            check_cluster(pools, ray.nodes(), "GPU", available=ray._private.state.available_resources_per_node())
            return True
        except TAConfigError:
            return False

    # 1. exactly 3 CPUs per GPU, with a task runner declared as ours (plain ray.remote): both pools placed
    from recipe.ta_opd.verl_backend.runner import runner_class

    assert "num_cpus" not in runner_class(None)._default_options  # as verl's TaskRunner: holds no CPU
    runner = actor.remote()
    ray.get(runner.node.remote())
    _free_cpus_settle(2 * 3 * GPUS)
    check_cluster(pools, ray.nodes(), "GPU")
    assert check()
    assert _verl_pools_placed(pools)
    table = ray.util.placement_group_table().values()
    bundles = [b for t in table if t["state"] == "CREATED" for b in t["bundles"].values()]
    assert bundles == [{"CPU": 3.0, "GPU": 1.0}] * (2 * GPUS)  # verl's bundles; no CPU is free on a GPU node now
    _remove_placement_groups()

    # 2. one CPU held by something else on a GPU node: a pool cannot be placed, and the check says so
    other = actor.options(num_cpus=1).remote()
    ray.get(other.node.remote())
    _free_cpus_settle(2 * 3 * GPUS - 1)
    assert not check()
    with pytest.raises(TAConfigError, match="3 CPUs per GPU .*, but the Ray cluster has 4 GPU free on"):
        check_cluster(pools, ray.nodes(), "GPU", available=ray._private.state.available_resources_per_node())
    assert not _verl_pools_placed(pools)
    _remove_placement_groups()
    ray.kill(other)
    _free_cpus_settle(2 * 3 * GPUS)
    assert _verl_pools_placed(pools)  # the same cluster places both pools once the CPU is free again

    # 3. a vLLM-style server on a GPU node with no free CPU is still placed (it holds none)
    gpu_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))
    _free_cpus_settle(0)
    server = actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=gpu_node, soft=False)).remote()
    assert ray.get(server.node.remote(), timeout=WAIT_S) == gpu_node
