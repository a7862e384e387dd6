"""Driver-side helpers: the backbone pool, its router, and per-user edge actors.

``Pool`` starts N backbone replicas, each in a placement group of its own pinned to cloud
nodes, plus a router, and creates edge actors pinned to edge nodes. It is what ``serve``,
``demo`` and the ``ray job submit`` example use.
"""

from __future__ import annotations

import os
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from privatelora.config import PrivateLoRAConfig
from privatelora.placement import CLOUD, EDGE

from privatelora.actors.backbone import NOT_STARTED, BackboneReplica
from privatelora.actors.edge import EdgeActor, EdgeHost
from privatelora.actors.router import Router


def replica_host() -> str:
    """Loopback when every node is this machine (local clusters), else the node's address."""
    ips = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
    return "127.0.0.1" if len(ips) <= 1 else ray.util.get_node_ip_address()


class Pool:
    def __init__(self, model: str = "tiny", cfg: PrivateLoRAConfig | None = None, replicas: int = 1, *,
                 max_sessions: int = 256, idle_timeout_s: float = 120.0, port: int = 0, replica_cpus: float = 1,
                 host: str | None = None, timeout_s: float = 300, pin_cores: bool = False,
                 gather_s: float = 0.01, record_frames: bool = False, metrics_port: int = 0,
                 max_restarts: int = 3, endpoint_options: dict | None = None):
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.model = model
        self.cfg = cfg or PrivateLoRAConfig()
        # one machine playing cloud and devices: the backbone gets the first cores, devices the rest
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        split = max(1, int(replica_cpus))
        self.cloud_cores = list(range(split)) if pin_cores and ncpu > split else None
        self.edge_cores = list(range(split, ncpu)) if self.cloud_cores else None
        self.router = ray.remote(Router).options(num_cpus=0, resources={CLOUD: 0.001}).remote()
        self.groups, self.replicas = [], []
        for i in range(replicas):
            pg = placement_group([{"CPU": replica_cpus, CLOUD: 1}], strategy="STRICT_PACK")
            ray.get(pg.ready(), timeout=timeout_s)
            self.groups.append(pg)
            actor = ray.remote(BackboneReplica).options(
                num_cpus=replica_cpus, resources={CLOUD: 1}, max_concurrency=64, max_restarts=max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg)).remote(
                i, model, self.cfg.to_dict(), max_sessions=max_sessions, idle_timeout_s=idle_timeout_s,
                host=host or replica_host(), port=port + i if port else 0, threads=max(1, int(replica_cpus)),
                cores=self.cloud_cores, gather_s=gather_s, record_frames=record_frames,
                metrics_port=metrics_port + i if metrics_port else 0,     # replica i: /metrics on PORT+i
                endpoint_options=endpoint_options)
            self.replicas.append(actor)
        self.infos = ray.get([r.start.remote() for r in self.replicas], timeout=timeout_s)
        ray.get([self.router.register.remote(info) for info in self.infos])

    def edge(self, user: int, *, adapter_path: str | None = None, adapter_seed: int | None = None,
             adapter_scale: float = 0.3, wire_dtype: str = "fp32", **options):
        """A new edge actor for ``user`` (pinned to an edge node)."""
        opts = {"num_cpus": 0, "resources": {EDGE: 1}, "max_concurrency": 4, **options}
        return ray.remote(EdgeActor).options(**opts).remote(
            user, self.model, self.cfg.to_dict(), self.router, adapter_path=adapter_path,
            adapter_seed=adapter_seed, adapter_scale=adapter_scale, wire_dtype=wire_dtype, cores=self.edge_cores)

    def edge_host(self, users: list[int], *, adapter_seeds: list[int] | None = None, adapter_scale: float = 0.3,
                  wire_dtype: str = "fp32", **options):
        """A new edge host carrying ``users`` (pinned to an edge node)."""
        opts = {"num_cpus": 0, "resources": {EDGE: 1}, "max_concurrency": 4, **options}
        return ray.remote(EdgeHost).options(**opts).remote(
            users, self.model, self.cfg.to_dict(), self.router, adapter_seeds=adapter_seeds,
            adapter_scale=adapter_scale, wire_dtype=wire_dtype, cores=self.edge_cores)

    def health(self, timeout_s: float = 10.0) -> list[dict]:
        """Each replica's ``check_health``: ``{"replica", "ok", "reason"}``."""
        refs = [r.check_health.remote() for r in self.replicas]
        out = []
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=timeout_s)
                out.append({"replica": i, "ok": True, "reason": None})
            except Exception as e:     # unhealthy (RuntimeError), dead or restarting (RayActorError), hung
                cause = getattr(e, "cause", None) or e          # a RayTaskError wraps the actor's own error
                out.append({"replica": i, "ok": False, "reason": f"{type(cause).__name__}: {cause}"[:300]})
        return out

    def heal(self, timeout_s: float = 120.0) -> list[int]:
        """Restart every unhealthy replica (Ray restarts the actor within ``max_restarts``;
        its sessions are lost, devices reconnect), start its endpoint again and register it
        with the router. Returns the replicas restarted."""
        bad = [h for h in self.health() if not h["ok"]]
        for h in bad:
            i = h["replica"]
            r = self.replicas[i]
            if NOT_STARTED not in h["reason"]:     # a process Ray already restarted only needs starting
                ray.kill(r, no_restart=False)
            deadline = time.monotonic() + timeout_s
            while True:                # calls fail while the actor is down: retry until it is back
                try:
                    self.infos[i] = ray.get(r.start.remote(), timeout=timeout_s)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            ray.get(self.router.register.remote(self.infos[i]))
        return [h["replica"] for h in bad]

    def stats(self) -> list[dict]:
        return ray.get([r.stats.remote() for r in self.replicas])

    def shutdown(self) -> None:
        for r in self.replicas:
            try:
                ray.get(r.stop.remote(), timeout=30)
            except Exception:   # a dead replica has nothing left to stop
                pass
            ray.kill(r)
        ray.kill(self.router)
        for pg in self.groups:
            remove_placement_group(pg)
