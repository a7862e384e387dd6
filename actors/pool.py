"""Driver-side helpers: the backbone pool, its router, and per-user edge actors.

``Pool`` starts N backbone replicas, each in a placement group of its own pinned to cloud
nodes, plus a router, and creates edge actors pinned to edge nodes. It is what ``serve``,
``demo`` and the ``ray job submit`` example use.

Metrics are off unless asked: ``metrics_port`` (an int; 0: any free port) has replica i
serve ``/metrics`` on ``metrics_port + i``; ``ray_metrics`` exports them through Ray's
metrics agent too. ``serve`` turns both on by default (docs/metrics.md).

Replicas load only the cloud's decoder layers; ``full_model=True`` (``bench throughput``'s
HF comparison only) has them load the whole backbone. ``gpus_per_replica`` G > 0 has each
replica's placement group and actor ask Ray for G GPUs (``replica_resources``); the replica
then runs its cloud part on the GPU. ``kv_cache_bytes`` bounds each replica's KV cache
(None: the cloud part sizes it from its device's memory).
"""

from __future__ import annotations

import os
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from privatelora.config import PrivateLoRAConfig
from privatelora.placement import CLOUD, EDGE

from privatelora.actors.backbone import NOT_STARTED, BackboneReplica
from privatelora.actors.edge import EdgeActor, EdgeHost
from privatelora.actors.router import Router


def replica_host() -> str:
    """Loopback when every node is this machine (local clusters), else the node's address."""
    ips = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
    return "127.0.0.1" if len(ips) <= 1 else ray.util.get_node_ip_address()


def split_cores(ncpu: int, replica_cpus: float = 1) -> tuple[list[int] | None, list[int] | None, list[int] | None]:
    """Cores for one machine playing cloud and devices (``pin_cores``): the backbone's
    stages, its endpoint's event loop (sockets, frame codec), and the simulated devices.

    The replica never shares a core with the devices: when a device process preempts the
    event loop's thread while that thread holds the GIL, the stage thread waits on the GIL
    until the device yields the core (measured: ~1.2 ms at every stage boundary of an
    11 ms 16-user decode cycle). So the event loop gets a core of its own when there are at
    least two beyond the stages', and otherwise shares the stages' cores. With no core to
    spare for the devices nothing is pinned: ``(None, None, None)``."""
    split = max(1, int(replica_cpus))
    if ncpu <= split:
        return None, None, None
    cloud = list(range(split))
    if ncpu >= split + 2:
        return cloud, [split], list(range(split + 1, ncpu))
    return cloud, cloud, list(range(split, ncpu))


def replica_resources(cpus: float, gpus: float = 0) -> tuple[dict, dict]:
    """What one replica asks Ray for: its placement group's bundle and the resource part of
    its actor options. ``gpus`` > 0 adds ``{"GPU": gpus}`` to the bundle and ``num_gpus`` to
    the actor; 0 asks for no GPU at all (no key)."""
    if cpus < 0 or gpus < 0:
        raise ValueError(f"a replica's CPUs and GPUs must be >= 0, not {cpus} and {gpus}")
    bundle = {"CPU": cpus, CLOUD: 1}
    options = {"num_cpus": cpus, "resources": {CLOUD: 1}}
    if gpus:
        bundle["GPU"] = gpus
        options["num_gpus"] = gpus
    return bundle, options


class Pool:
    """Backbone replicas (each in its own placement group on a cloud node), their router,
    and edge actors. Replicas are kept by id (``replicas``, ``infos``, ``groups``: dicts);
    ids are never reused, so a replica added later gets a new one."""

    def __init__(self, model: str = "tiny", cfg: PrivateLoRAConfig | None = None, replicas: int = 1, *,
                 max_sessions: int = 256, idle_timeout_s: float = 120.0, port: int = 0, replica_cpus: float = 1,
                 host: str | None = None, timeout_s: float = 300, pin_cores: bool = False,
                 gather_s: float = 0.01, record_frames: bool = False, metrics_port: int | None = None,
                 ray_metrics: bool = False, max_restarts: int = 3, endpoint_options: dict | None = None,
                 watch_period_s: float = 0.5, full_model: bool = False, gpus_per_replica: float = 0,
                 kv_cache_bytes: int | None = None):
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.bundle, self.replica_options = replica_resources(replica_cpus, gpus_per_replica)
        self.model = model
        self.cfg = cfg or PrivateLoRAConfig()
        # one machine playing cloud and devices: the backbone's stages get the first cores,
        # its event loop the next one, devices the rest (``split_cores``)
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.cloud_cores, self.io_cores, self.edge_cores = split_cores(ncpu, replica_cpus) if pin_cores \
            else (None, None, None)
        here = ray.get_runtime_context().get_node_id()      # the router stays with the driver when it can
        self.router = ray.remote(Router).options(
            num_cpus=0, resources={CLOUD: 0.001}, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote(watch_period_s=watch_period_s)
        self._replica_kw = dict(max_sessions=max_sessions, idle_timeout_s=idle_timeout_s, gather_s=gather_s,
                                record_frames=record_frames, endpoint_options=endpoint_options,
                                ray_metrics=ray_metrics, full_model=full_model, kv_cache_bytes=kv_cache_bytes,
                                io_cores=self.io_cores)
        self.replica_cpus, self.max_restarts, self.host, self.timeout_s = replica_cpus, max_restarts, host, timeout_s
        self.port, self.metrics_port = port, metrics_port
        self.groups: dict[int, object] = {}
        self.replicas: dict[int, object] = {}
        self.infos: dict[int, dict] = {}
        self.door: dict | None = None
        self._next_id = 0
        created = [self._create() for _ in range(replicas)]
        for (rid, _), info in zip(created, ray.get([ref for _, ref in created], timeout=timeout_s)):
            self.infos[rid] = info
        ray.get([self.router.register.remote(self.infos[r], self.replicas[r]) for r in self.replicas])

    def _create(self, timeout_s: float | None = None):
        """A new replica in its own placement group; returns its id and the ref of its ``start``."""
        rid = self._next_id
        pg = placement_group([dict(self.bundle)], strategy="STRICT_PACK")
        try:
            ray.get(pg.ready(), timeout=timeout_s or self.timeout_s)
        except Exception:
            remove_placement_group(pg)
            raise
        self._next_id += 1
        self.groups[rid] = pg
        self.replicas[rid] = ray.remote(BackboneReplica).options(
            **self.replica_options, max_concurrency=64, max_restarts=self.max_restarts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg)).remote(
            rid, self.model, self.cfg.to_dict(), host=self.host or replica_host(),
            port=self.port + rid if self.port else 0, threads=max(1, int(self.replica_cpus)),
            cores=self.cloud_cores, metrics_port=self._metrics_port(rid), **self._replica_kw)
        return rid, self.replicas[rid].start.remote()

    def _metrics_port(self, rid: int) -> int | None:
        """Replica ``rid``'s /metrics port: METRICS_PORT + rid (0: any free port; None: off)."""
        if self.metrics_port is None:
            return None
        return self.metrics_port + rid if self.metrics_port else 0

    def listen(self, host: str | None = None, port: int = 0) -> dict:
        """Open the router's front door: one address where outside devices open sessions
        (``serving.frontdoor``). Returns ``{"host", "port", "cert_pem"}``."""
        self.door = ray.get(self.router.listen.remote(host, port), timeout=self.timeout_s)
        return self.door

    def add_replica(self, timeout_s: float = 60.0) -> int:
        """Start one more replica where a cloud node has room (``TimeoutError``-like Ray
        error if none has) and put it in the rotation. Returns its id."""
        rid, ref = self._create(timeout_s)
        self.infos[rid] = ray.get(ref, timeout=self.timeout_s)
        ray.get(self.router.register.remote(self.infos[rid], self.replicas[rid]))
        return rid

    def remove_replica(self, rid: int, grace_s: float = 10.0) -> dict:
        """Take ``rid`` out: the router stops placing sessions on it, open sessions get
        ``grace_s`` to finish and the rest are told ``draining`` (devices resume them on
        another replica); then the replica stops and its placement group is freed."""
        ray.get(self.router.drain.remote(rid))
        try:
            out = ray.get(self.replicas[rid].drain.remote(grace_s), timeout=grace_s + 30)
        except Exception as e:        # a dead replica has nothing to drain
            out = {"evicted": 0, "finished": 0, "error": type(e).__name__}
        ray.get(self.router.unregister.remote(rid))
        self._discard(rid)
        return {"replica": rid, **out}

    def _discard(self, rid: int) -> None:
        r = self.replicas.pop(rid)
        self.infos.pop(rid, None)
        try:
            ray.get(r.stop.remote(), timeout=30)
        except Exception:             # a dead replica has nothing left to stop
            pass
        ray.kill(r)
        pg = self.groups.pop(rid, None)
        if pg is not None:
            remove_placement_group(pg)

    def autoscale(self, scaler, now: float | None = None, grace_s: float = 10.0, room_wait_s: float = 15.0) -> dict:
        """One autoscaler step: read every replica's status, decide, act, report the
        decision to the router (metrics). ``scaler``: a ``serving.autoscale.Autoscaler``;
        ``room_wait_s``: how long an added replica may wait for a cloud node with room
        (then the step holds, and a later one tries again)."""
        now = time.monotonic() if now is None else now
        refs = {rid: r.status.remote() for rid, r in self.replicas.items()}
        status = {}
        for rid, ref in refs.items():
            try:
                status[rid] = ray.get(ref, timeout=10)
            except Exception:         # unhealthy: heal's business, not load
                pass
        decision = scaler.decide(now, status)
        if decision["action"] == "up":
            try:
                decision["replica"] = self.add_replica(room_wait_s)
            except Exception as e:
                decision.update(action="hold", replicas_after=decision["replicas_before"],
                                reason=f"{decision['reason']}; no cloud node has room: {type(e).__name__}")
        elif decision["action"] == "down":
            decision["drained"] = self.remove_replica(decision["replica"], grace_s)
        if decision["action"] != "hold":
            scaler.changed(time.monotonic())
        ray.get(self.router.note_autoscale.remote(decision))
        return decision

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
        """Each replica's ``check_health``: ``{"replica", "ok", "reason", "error"}`` (``error``:
        the exception's type, e.g. ``ActorUnavailableError`` while Ray restarts the actor)."""
        refs = {rid: r.check_health.remote() for rid, r in self.replicas.items()}
        out = []
        for rid, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout_s)
                out.append({"replica": rid, "ok": True, "reason": None, "error": None})
            except Exception as e:     # unhealthy (RuntimeError), dead or restarting (RayActorError), hung
                cause = getattr(e, "cause", None) or e          # a RayTaskError wraps the actor's own error
                out.append({"replica": rid, "ok": False, "reason": f"{type(cause).__name__}: {cause}"[:300],
                            "error": type(e).__name__})
        return out

    def heal(self, timeout_s: float = 120.0) -> list[int]:
        """Take every unhealthy replica out of the rotation, have Ray restart it (within
        ``max_restarts``; its devices resume their sessions elsewhere meanwhile), start its
        endpoint again and put it back; one Ray cannot restart is replaced by a new replica.
        Returns the replicas restarted or replaced."""
        bad = [h for h in self.health() if not h["ok"]]
        for h in bad:
            i = h["replica"]
            r = self.replicas[i]
            ray.get(self.router.unregister.remote(i))
            if h["error"] == "ActorDiedError":     # dead for good (out of restarts): a new replica instead
                self._discard(i)
                self.add_replica(timeout_s)
                continue
            # alive but not serving (stage loop stopped, hung): have Ray restart it. A process Ray is
            # restarting already (ActorUnavailableError), or restarted (not started), only needs starting.
            if NOT_STARTED not in h["reason"] and h["error"] != "ActorUnavailableError":
                ray.kill(r, no_restart=False)
            deadline = time.monotonic() + timeout_s
            while True:                # calls fail while the actor is down: retry until it is back
                try:
                    self.infos[i] = ray.get(r.start.remote(), timeout=timeout_s)
                    break
                except Exception:     # down, restarting, or the old process still answering
                    if time.monotonic() > deadline:
                        self.infos[i] = None
                        break
                    time.sleep(0.5)
            if self.infos[i] is None:     # it never came back (its node is gone for good): a new replica
                self._discard(i)
                self.add_replica(timeout_s)
                continue
            ray.get(self.router.register.remote(self.infos[i], r))
        return [h["replica"] for h in bad]

    def stats(self) -> list[dict]:
        return ray.get([r.stats.remote() for r in self.replicas.values()])

    def shutdown(self) -> None:
        try:
            ray.get(self.router.stop.remote(), timeout=10)
        except Exception:
            pass
        for rid in list(self.replicas):
            self._discard(rid)
        ray.kill(self.router)
