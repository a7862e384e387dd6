"""Starting or joining a Ray cluster with cloud and edge resources.

``connect(address)``: ``None`` or ``"local"`` starts a one-node local cluster carrying
both resources (demos); ``"auto"`` or ``HOST:PORT`` joins a running cluster.
``local_cluster(cloud_nodes, edge_nodes)`` starts separate local nodes (tests: a
cloud-only node next to an edge-only node). Both handle Ray's token authentication: when
``~/.ray/auth_token`` exists, clients must run with ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import os
from pathlib import Path

from privatelora.placement import CLOUD, EDGE


def auth_env() -> dict:
    """Environment a Ray client needs: token mode when a token file exists."""
    env = {}
    if (Path.home() / ".ray" / "auth_token").exists() or os.environ.get("RAY_AUTH_TOKEN"):
        env["RAY_AUTH_MODE"] = "token"
    return env


def _quiet_init(**kw):
    import ray
    os.environ.update(auth_env())
    kw.setdefault("include_dashboard", False)
    kw.setdefault("log_to_driver", False)
    kw.setdefault("logging_level", "ERROR")
    return ray.init(**kw)


def connect(address: str | None = None, *, num_cpus: int | None = None, edge_slots: int = 1024,
            dashboard: bool = False):
    """Join ``address`` ("auto", "HOST:PORT") or start a local one-node cluster (None/"local").
    ``dashboard``: the local cluster runs Ray's dashboard (127.0.0.1), whose head writes the
    Prometheus discovery file of the metrics agents (``serve`` wants it for its metrics)."""
    import ray
    if ray.is_initialized():
        return
    if address in (None, "", "local"):
        # "local": always a fresh instance, even when `ray start` left one on this machine
        _quiet_init(address="local", num_cpus=num_cpus or os.cpu_count(), resources={CLOUD: 64, EDGE: edge_slots},
                    include_dashboard=dashboard)
    else:
        _quiet_init(address=address)


def local_cluster(cloud_nodes: int = 1, edge_nodes: int = 1, cloud_cpus: int = 1, edge_cpus: int = 1,
                  edge_slots: int = 1024):
    """Separate local Ray nodes: cloud-only and edge-only. Returns the ``Cluster``; call
    ``ray.shutdown()`` then ``cluster.shutdown()`` when done."""
    import ray
    from ray.cluster_utils import Cluster
    os.environ.update(auth_env())
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": cloud_cpus, "resources": {CLOUD: 64},
                                      "include_dashboard": False})
    for _ in range(cloud_nodes - 1):
        cluster.add_node(num_cpus=cloud_cpus, resources={CLOUD: 64})
    for _ in range(edge_nodes):
        cluster.add_node(num_cpus=edge_cpus, resources={EDGE: edge_slots})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    return cluster


def nodes_with(resource: str) -> list[str]:
    import ray
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and resource in n.get("Resources", {})]
