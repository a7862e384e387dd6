"""The router actor: where new sessions go, which replicas can take them, and the front door.

It keeps the registry of backbone replicas and watches each one twice a second
(``BackboneReplica.status``, which fails when the replica's stage loop has stopped or
its process is gone): a replica that fails is out of the rotation at once, before
``Pool.heal`` has Ray restart it and registers it again. Load is what each replica last
reported (open sessions) plus the sessions placed on it since. ``route`` picks the least
loaded healthy replica that is not draining (edge actors call it through Ray);
``listen`` opens the front door (``serving.frontdoor``) that does the same for devices
outside Ray. Sessions stay where they were placed: a session lives on its TCP
connection to the replica that holds its KV cache, and moves only by being resumed.

Metrics (Ray's own pipeline, ``ray.util.metrics``: exported with a ``ray_`` prefix):
replicas by state, placements, device-reported resumes and their recovery times, and
the autoscaler's decisions and inputs (``Pool.autoscale`` reports them here). Counters
are exported at 0 from the start (every action of the decisions); a failing metric is
logged, never raised into routing.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class _Metrics:
    def __init__(self):
        from ray.util.metrics import Counter, Gauge, Histogram

        from privatelora.actors.ray_metrics import ray_counter_at_zero
        self.replicas = Gauge("privatelora_router_replicas", "backbone replicas known to the router, by state",
                              tag_keys=("state",))
        self.placements = Counter("privatelora_router_placements_total", "new sessions placed on a replica")
        self.resumes = Counter("privatelora_session_resumes_total",
                               "sessions a device resumed on a new cloud session after losing one")
        self.recovery = Histogram("privatelora_session_recovery_seconds",
                                  "from losing a session to being back where it was lost (device-measured)",
                                  boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
        self.decisions = Counter("privatelora_autoscaler_decisions_total", "autoscaler decisions by action",
                                 tag_keys=("action",))
        self.target = Gauge("privatelora_autoscaler_replicas", "replicas the autoscaler keeps")
        self.per_replica = Gauge("privatelora_autoscaler_sessions_per_replica", "open sessions per replica (input)")
        self.queue = Gauge("privatelora_autoscaler_queue_seconds", "mean stage queue time over the window (input)")
        for counter, tags in ((self.placements, None), (self.resumes, None), *((self.decisions, {"action": a})
                                                                              for a in ACTIONS)):
            ray_counter_at_zero(counter, tags)


ACTIONS = ("up", "down", "hold")      # the autoscaler's decisions (serving.autoscale)



class Router:
    def __init__(self, watch_period_s: float = 0.5, watch_timeout_s: float = 5.0):
        self.replicas: dict[int, dict] = {}
        self.handles: dict[int, object] = {}
        self.healthy: dict[int, bool] = {}
        self.reported: dict[int, int] = {}        # open sessions, as the replica last said
        self.placed: dict[int, int] = {}          # sessions placed since that report
        self.draining: set[int] = set()
        self.last_status: dict[int, dict] = {}
        self.watch_period_s, self.watch_timeout_s = watch_period_s, watch_timeout_s
        self.placements = 0
        self.recoveries: list[float] = []
        self.decisions: list[dict] = []
        self.door = None
        self._watch_task: asyncio.Task | None = None
        try:
            self.metrics = _Metrics()
        except Exception:          # metrics must never keep the router from routing
            log.exception("router metrics unavailable")
            self.metrics = None

    # ---- registry ----------------------------------------------------------------------
    async def register(self, info: dict, handle=None) -> None:
        """Add a replica, or replace a restarted one (its sessions died with it: load 0)."""
        rid = info["replica"]
        old = self.replicas.get(rid)
        self.replicas[rid] = info
        if handle is not None:
            self.handles[rid] = handle
        if old is None or old.get("pid") != info.get("pid") or old.get("port") != info.get("port"):
            self.reported[rid], self.placed[rid] = 0, 0
        self.healthy[rid] = True
        self.draining.discard(rid)
        if self.handles and self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())
        self._export()

    async def unregister(self, replica: int) -> None:
        for d in (self.replicas, self.handles, self.healthy, self.reported, self.placed, self.last_status):
            d.pop(replica, None)
        self.draining.discard(replica)
        self._export()

    async def drain(self, replica: int) -> None:
        """Place no new session on ``replica`` (it is leaving)."""
        self.draining.add(replica)
        self._export()

    def load(self) -> dict[int, int]:
        return {r: self.reported.get(r, 0) + self.placed.get(r, 0) for r in self.replicas}

    def _pick(self, avoid=()) -> dict:
        up = [r for r in self.replicas if self.healthy.get(r) and r not in self.draining]
        pick_from = [r for r in up if r not in avoid] or up      # avoid when we can, serve when we cannot
        if not pick_from:
            raise RuntimeError("no healthy backbone replica is up" if self.replicas else "no backbone replica is up")
        load = self.load()
        rid = min(pick_from, key=lambda r: (load[r], r))
        self.placed[rid] = self.placed.get(rid, 0) + 1
        self.placements += 1
        self._metric(lambda m: m.placements.inc())
        return self.replicas[rid]

    async def route(self, avoid=()) -> dict:
        """The replica a new session should open on (its info: host, port, cert_pem, ...)."""
        return self._pick(set(avoid))

    # ---- watching ----------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("router watch failed")
            await asyncio.sleep(self.watch_period_s)

    async def poll(self) -> dict[int, bool]:
        """Ask every replica for its status now; mark each healthy or not."""
        rids = list(self.handles)
        refs = [self.handles[r].status.remote() for r in rids]
        for rid, ref in zip(rids, refs):
            try:
                st = await asyncio.wait_for(ref, self.watch_timeout_s)
            except Exception as e:        # dead, restarting, unhealthy or hung
                if rid in self.replicas and self.healthy.get(rid):
                    log.warning("replica %s is out of the rotation: %s", rid, type(e).__name__)
                if rid in self.replicas:
                    self.healthy[rid] = False
                continue
            if rid not in self.replicas:
                continue
            info = self.replicas[rid]
            if st.get("pid") != info.get("pid"):     # restarted and not registered again yet
                self.healthy[rid] = False
                continue
            self.healthy[rid] = True
            self.reported[rid], self.placed[rid] = st["sessions"], 0
            self.last_status[rid] = st
        self._export()
        return dict(self.healthy)

    def _metric(self, fn) -> None:
        """Update Ray metrics with ``fn(self.metrics)``; a failure is logged, never raised."""
        if self.metrics is None:
            return
        try:
            fn(self.metrics)
        except Exception:
            log.exception("router metrics failed")

    def _export(self) -> None:
        def export(m):
            healthy = sum(1 for r in self.replicas if self.healthy.get(r) and r not in self.draining)
            m.replicas.set(healthy, tags={"state": "healthy"})
            m.replicas.set(sum(1 for r in self.replicas if not self.healthy.get(r)), tags={"state": "unhealthy"})
            m.replicas.set(len(self.draining & set(self.replicas)), tags={"state": "draining"})
        self._metric(export)

    # ---- reports ----------------------------------------------------------------------
    async def note_recovery(self, seconds: list[float]) -> None:
        """A device resumed sessions; ``seconds``: time each took to be back (no user data)."""
        for s in seconds:
            self.recoveries.append(float(s))
            self._metric(lambda m: (m.resumes.inc(), m.recovery.observe(float(s))))
        del self.recoveries[:-10000]

    async def note_autoscale(self, decision: dict) -> None:
        self.decisions.append(decision)
        del self.decisions[:-1000]

        def export(m):
            m.decisions.inc(tags={"action": decision["action"]})
            m.target.set(decision["replicas_after"])
            m.per_replica.set(decision["sessions_per_replica"])
            m.queue.set(decision["queue_s"])
        self._metric(export)

    # ---- the front door ------------------------------------------------------------------
    async def listen(self, host: str | None = None, port: int = 0) -> dict:
        """Open the front door on ``host:port`` (this actor's node; ``host`` None: loopback
        when the whole cluster is this machine, else this node's address). Off loopback it
        speaks TLS with a fresh self-signed certificate, returned as ``cert_pem`` for
        devices to trust."""
        import shutil
        import tempfile

        import ray
        if host is None:
            ips = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
            host = "127.0.0.1" if len(ips) <= 1 else ray.util.get_node_ip_address()

        from privatelora.serving.frontdoor import FrontDoor, NoReplica
        from privatelora.transport import is_loopback, make_self_signed

        async def place():
            try:
                info = self._pick()
            except RuntimeError as e:
                raise NoReplica(str(e))
            return info["host"], info["port"], info.get("cert_pem") or ""
        tls, cert_pem = {}, None
        if not is_loopback(host):
            d = tempfile.mkdtemp(prefix="privatelora-door-")
            try:
                cert, key = make_self_signed(d, hosts=(host, "localhost", "127.0.0.1"))
                with open(cert) as f:
                    cert_pem = f.read()
                from privatelora.transport import server_ssl_context
                tls = {"ssl_context": server_ssl_context(cert, key)}    # loaded: the files can go
            finally:
                shutil.rmtree(d, ignore_errors=True)
        self.door = await FrontDoor(place, host, port, **tls).start()
        h, p = self.door.address[:2]
        return {"host": h, "port": p, "cert_pem": cert_pem}

    async def snapshot(self) -> dict:
        return {"replicas": sorted(self.replicas), "load": self.load(),
                "healthy": {r: self.healthy.get(r, False) for r in self.replicas},
                "draining": sorted(self.draining & set(self.replicas)), "placements": self.placements,
                "door": self.door.stats() if self.door is not None else None,
                "recoveries": list(self.recoveries[-1000:]), "decisions": list(self.decisions[-100:])}

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self.door is not None:
            await self.door.stop()
            self.door = None
