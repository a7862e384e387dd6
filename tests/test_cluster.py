"""A Ray cluster of several nodes on one machine (``ray.cluster_utils.Cluster``): a head
that only runs the router, two cloud nodes, two edge nodes. Load rising past the
autoscaler's bound adds a replica on the other cloud node; removing the cloud node under
a replica in mid-generation costs no session (each resumes on the other replica and
finishes with the monolithic model's tokens); Ray restarts the lost replica on a new
node and it rejoins; load falling removes a replica; and nothing is lost."""

import os
import time

import pytest

import privatelora.actors  # noqa: F401  (Ray's auth mode, before Ray is imported)
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from privatelora.actors.pool import Pool
from privatelora.config import PrivateLoRAConfig
from privatelora.model import reference
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.loading import load_backbone
from privatelora.model.sampling import SamplingParams
from privatelora.placement import CLOUD, EDGE
from privatelora.placement.cluster import auth_env
from privatelora.serving.autoscale import Autoscaler, AutoscalePolicy

CFG = PrivateLoRAConfig(rank=16)
USERS = 4
PROMPTS = ["ROMEO:\nBut soft", "KING:\nNow is the winter of our", "HAMLET:\nTo be", "LEAR:\nBlow, winds"]
NEW = 120


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    os.environ.update(auth_env())
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {CLOUD: 1},
                                                      "include_dashboard": False})
    cloud = [c.add_node(num_cpus=1, resources={CLOUD: 4}) for _ in range(2)]
    edge = [c.add_node(num_cpus=1, resources={EDGE: 64}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
    yield c, cloud, edge
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def _node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)


def _want(bb, u):
    adapter = PrivateAdapter(CFG, bb.n_layers, bb.fingerprint).randomize_(700 + u, scale=0.3)
    ids = bb.tokenizer.encode(PROMPTS[u], add_special_tokens=False)
    eos = bb.tokenizer.eos_token_id
    return reference.generate(reference.merged_model(bb, adapter), ids, SamplingParams(max_new_tokens=NEW,
                                                                                      stop_ids=(eos,)))[0]


def test_scale_up_lose_a_cloud_node_heal_and_scale_down_without_losing_a_session(cluster, tiny):
    c, cloud_nodes, edge_nodes = cluster
    node_ids = {n.node_id: n for n in cloud_nodes}
    pool = Pool("tiny", CFG, replicas=1, idle_timeout_s=30.0)
    try:
        scaler = Autoscaler(AutoscalePolicy(min_replicas=1, max_replicas=2, up_sessions=2, down_sessions=1,
                                            up_after_s=0, down_after_s=0, cooldown_s=0))
        first = _node_of(pool.replicas[0])
        assert first in node_ids
        edges = [pool.edge(u, adapter_seed=700 + u, scheduling_strategy=NodeAffinitySchedulingStrategy(
            edge_nodes[u % 2].node_id, soft=False)) for u in range(USERS)]
        assert {_node_of(e) for e in edges} == {n.node_id for n in edge_nodes}     # users on both edge nodes
        want = [_want(tiny, u) for u in range(USERS)]

        # load rises: four long generations over an emulated 5G link (20 ms round trips: long
        # enough that they are still running when the node goes, however fast the replica starts)
        futs = [e.generate.remote(PROMPTS[u], max_new_tokens=NEW, link="5g") for u, e in enumerate(edges)]
        deadline = time.time() + 60
        while ray.get(pool.router.snapshot.remote())["load"].get(0, 0) < USERS:
            assert time.time() < deadline, ray.get(pool.router.snapshot.remote())
            time.sleep(0.1)
        up = pool.autoscale(scaler)
        assert up["action"] == "up" and up["sessions"] >= 3, up
        second = _node_of(pool.replicas[up["replica"]])
        assert second in node_ids and second != first          # the other cloud node: the only one with room

        # the cloud node under replica 0 goes away in mid-generation
        c.remove_node(node_ids[first], allow_graceful=False)
        results = ray.get(futs, timeout=300)
        for u, r in enumerate(results):
            assert r["error"] is None and r["tokens"] == want[u], (u, r["error"])
        assert sum(r["resumes"] for r in results) >= 1           # sessions on the lost node came back
        assert all(r["replica"] == up["replica"] for r in results if r["resumes"])
        recoveries = ray.get(pool.router.snapshot.remote())["recoveries"]
        assert len(recoveries) == sum(len(r["recovery_s"]) for r in results) >= 1

        # a new cloud node joins; Ray restarts the lost replica there and it rejoins the rotation
        fresh = c.add_node(num_cpus=1, resources={CLOUD: 4})
        c.wait_for_nodes()
        assert pool.heal() == [0]
        assert _node_of(pool.replicas[0]) == fresh.node_id
        snap = ray.get(pool.router.snapshot.remote())
        assert snap["healthy"] == {0: True, up["replica"]: True}

        # load falls: one replica is drained and removed; new sessions are served by the one left
        down = pool.autoscale(scaler)
        assert down["action"] == "down" and down["drained"]["evicted"] == 0, down
        assert len(pool.replicas) == 1
        again = ray.get(edges[0].generate.remote(PROMPTS[0], max_new_tokens=NEW), timeout=120)
        assert again["error"] is None and again["tokens"] == want[0] and again["resumes"] == 0
        decisions = ray.get(pool.router.snapshot.remote())["decisions"]
        assert [d["action"] for d in decisions] == ["up", "down"]
        # the decisions, their inputs and the recoveries went to Ray's metrics (ray.util.metrics)
        assert ray.get(pool.router.__ray_call__.remote(lambda router: router.metrics is not None))
    finally:
        pool.shutdown()
