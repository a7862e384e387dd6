"""The backbone replica actor: one cloud part and its TCP endpoint.

A plain class, made remote by ``actors.pool``. It loads only the decoder layers the cloud
runs (``privatelora.api.load_cloud_backbone``: no embedding, final norm, LM head or device
layers; on the GPU when Ray gives it one or CUDA is available: ``replica_device``), starts
a ``CloudEndpoint`` inside the actor's own event loop and reports its address. Devices
talk to it over TCP, not through Ray calls (docs/design.md, "Where Ray sits"); Ray only
starts, places, watches and stops it. With ``cores`` and ``io_cores`` the endpoint's
stages and its I/O run on cores of their own (``replica_cores``); ``kv_cache_bytes`` is
the cloud part's KV budget.

Metrics (``privatelora.serving.metrics``, docs/metrics.md): with ``metrics_port`` set (0:
any free port) the replica serves its own ``/metrics`` on its endpoint's host; with
``ray_metrics`` it also exports the same metrics through Ray's metrics agent
(``ray_privatelora_*``, tagged ``replica``). Both off unless asked (``serve`` asks).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile

log = logging.getLogger(__name__)


NOT_STARTED = "is not started"    # check_health's reason for a fresh (or restarted) actor


def replica_device() -> str:
    """Where a replica runs its cloud part: "cuda" when Ray gave the actor a GPU or CUDA is
    available to the process, else "cpu". Outside Ray (a replica built in-process) only
    CUDA counts: asking Ray there would start a cluster."""
    import ray
    import torch
    ray_gpus = ray.is_initialized() and ray.get_gpu_ids()
    return "cuda" if ray_gpus or torch.cuda.is_available() else "cpu"


def replica_cores(cores: list[int] | None, io_cores: list[int] | None) -> list[int] | None:
    """The cores a replica's process is pinned to: its compute ``cores`` and its endpoint's
    ``io_cores`` together (the endpoint then pins its stage thread to the first and its
    event loop to the second); ``cores`` alone when there are no I/O cores; None (not
    pinned) without compute cores."""
    if not cores or not io_cores:
        return cores
    return sorted(set(cores) | set(io_cores))


class BackboneReplica:
    def __init__(self, replica_id: int, model: str, cfg: dict, *, max_sessions: int = 256,
                 idle_timeout_s: float = 120.0, host: str = "127.0.0.1", port: int = 0, threads: int = 1,
                 cores: list[int] | None = None, gather_s: float = 0.01, record_frames: bool = False,
                 metrics_port: int | None = None, ray_metrics: bool = False, ray_metrics_period_s: float = 1.0,
                 endpoint_options: dict | None = None, full_model: bool = False, kv_cache_bytes: int | None = None,
                 io_cores: list[int] | None = None):
        """``full_model``: benchmarks only (``bench throughput``'s HF comparison runs the whole
        HF model, LM head included): load the full backbone instead of the cloud's layers.
        ``cores``: the stages' cores; ``io_cores``: the endpoint's event loop's (None: not
        pinned apart; ``replica_cores``). ``kv_cache_bytes``: the cloud part's KV budget
        (None: its default, from the device's memory)."""
        import torch

        from privatelora.placement.checks import pin_to_cores
        pin_to_cores(replica_cores(cores, io_cores))
        self.cores, self.io_cores = cores, io_cores

        from privatelora.config import PrivateLoRAConfig
        torch.set_num_threads(max(1, threads))
        self.replica_id = replica_id
        self.cfg = PrivateLoRAConfig(**cfg)
        from privatelora.runtime.cloud import CloudPart
        if full_model:
            from privatelora.model.loading import load_backbone
            backbone = load_backbone(model, dtype=self.cfg.torch_dtype)
        else:
            from privatelora.api import load_cloud_backbone
            backbone = load_cloud_backbone(model, self.cfg)
        if replica_device() == "cuda":
            backbone.model.to("cuda")     # the cloud-only model has no meta tensor: it moves as it is
        self.fingerprint = backbone.fingerprint
        self.full_model = full_model
        # the cloud's public layers (the whole model only with full_model); ``limit`` runs the
        # plain forward over these layers
        self.backbone = backbone
        kv = {} if kv_cache_bytes is None else {"kv_cache_bytes": kv_cache_bytes}    # None: CloudPart's default
        self.cloud = CloudPart(backbone, self.cfg, **kv)     # the replica builds no device part at all
        self.max_sessions, self.idle_timeout_s, self.gather_s = max_sessions, idle_timeout_s, gather_s
        self.host, self.port = host, port
        self.endpoint = None
        self.cert_pem = None
        self.tls_dir: str | None = None
        self.record_frames = record_frames
        self.frames: list[bytes] = []     # audits only: every frame received, verbatim
        self.metrics_port, self.metrics, self.metrics_address = metrics_port, None, None
        self.ray_metrics, self.ray_metrics_period_s = ray_metrics, ray_metrics_period_s
        self.ray_export, self._ray_task = None, None
        self.endpoint_options = dict(endpoint_options or {})    # CloudEndpoint bounds (send timeout, caps)

    async def start(self) -> dict:
        if self.endpoint is not None:
            raise RuntimeError(f"replica {self.replica_id} is already started")
        try:
            await self._start()
        except BaseException:     # a port in use, say: nothing of this start stays behind
            self.endpoint = None
            if self.tls_dir is not None:
                shutil.rmtree(self.tls_dir, ignore_errors=True)
                self.tls_dir = None
            await self._stop_metrics()
            raise
        return self.info()

    async def _start(self) -> None:
        from privatelora.serving.endpoint import CloudEndpoint
        from privatelora.transport import is_loopback, make_self_signed
        if self.metrics_port is not None or self.ray_metrics:
            from privatelora.serving.metrics import Metrics
            self.metrics = Metrics()
        if self.metrics_port is not None:    # first: a port in use fails the start before any other work
            self.metrics_address = self.metrics.serve(self.metrics_port, self.host)      # MetricsPortError
        tls = {}
        if not is_loopback(self.host):
            # off loopback the stream must be encrypted: a fresh self-signed certificate,
            # whose public half the router hands to edge actors (pinned trust, no CA needed)
            d = self.tls_dir = tempfile.mkdtemp(prefix="privatelora-tls-")
            cert, key = make_self_signed(d, hosts=(self.host, "localhost", "127.0.0.1"))
            tls = {"cert": cert, "key": key}
            with open(cert) as f:
                self.cert_pem = f.read()
        self.endpoint = CloudEndpoint(self.cloud, self.host, self.port, max_sessions=self.max_sessions,
                                      idle_timeout_s=self.idle_timeout_s, gather_s=self.gather_s,
                                      compute_cores=self.cores, io_cores=self.io_cores, **self.endpoint_options,
                                      **tls)
        if self.record_frames:
            self.endpoint.server.tap = lambda _conn, frame: self.frames.append(bytes(frame))
        if self.metrics is not None:   # this replica's own metrics (privatelora.serving.metrics)
            from privatelora.serving.metrics import instrument
            instrument(self.endpoint, metrics=self.metrics)
        if self.ray_metrics:
            self._export_to_ray()
        await self.endpoint.start()

    def _export_to_ray(self) -> None:
        """The same metrics through Ray's pipeline, tagged with this replica's index; a
        failure here is logged and the replica serves without it."""
        from privatelora.actors.ray_metrics import RayExport
        try:
            self.ray_export = RayExport(self.metrics, {"replica": str(self.replica_id)})
            self._ray_task = asyncio.get_running_loop().create_task(self.ray_export.run(self.ray_metrics_period_s))
        except Exception:
            log.exception("replica %s: no metrics through Ray", self.replica_id)
            self.ray_export = None

    async def recorded_frames(self, clear: bool = False) -> list[bytes]:
        out = list(self.frames)
        if clear:
            self.frames.clear()
        return out

    def info(self) -> dict:
        host, port = self.endpoint.address
        return {"replica": self.replica_id, "host": host, "port": port, "cert_pem": self.cert_pem,
                "pid": os.getpid(), "layers": self.cloud.layer_ids, "adapted_layers": self.cloud.exchange_ids, "device": str(self.cloud.device),
                "fingerprint": self.fingerprint,
                "metrics": list(self.metrics_address) if self.metrics_address else None,
                "ray_metrics": self.ray_export is not None}

    async def timeline(self, on: bool) -> dict | None:
        """Start recording the stage loop's timeline (``serving/timeline.py``), or stop
        and return its summary."""
        from privatelora.serving.timeline import Timeline
        tl, self.endpoint.timeline = self.endpoint.timeline, Timeline() if on else None
        if on or tl is None:
            return None
        tl.stop()                  # on the event loop's thread, as the endpoint's own calls
        return tl.summary()

    async def set_policy(self, **policy) -> None:
        """``CloudEndpoint.set_policy``: gather_s, merge, max_batch."""
        self.endpoint.set_policy(**policy)

    async def limit(self, users: int, prompt_tokens: int, new_tokens: int, hf: bool = False) -> dict:
        """The plain batched forward on this replica's cores (``bench throughput``'s limit).
        Runs on the endpoint's worker thread, so it never overlaps a serving stage."""
        from privatelora.bench.throughput import hf_decode, limit_decode
        model = self.backbone.model
        if hf:
            if not self.full_model:
                raise RuntimeError("the HF forward needs the whole model: start the replica with full_model=True")
            return await self.endpoint._in_worker(hf_decode, model, users, prompt_tokens, new_tokens)
        out = await self.endpoint._in_worker(limit_decode, model, users, prompt_tokens, new_tokens,
                                             self.cloud.layer_ids)
        out.pop("prefill_out")
        return out

    async def check_health(self) -> None:
        """Raise if this replica cannot serve (its stage loop stopped): ``Pool.heal`` then
        has Ray restart the actor."""
        if self.endpoint is None:
            raise RuntimeError(f"replica {self.replica_id} {NOT_STARTED}")
        self.endpoint.check_health()

    async def status(self) -> dict:
        """What the router and the autoscaler watch, twice a second: raises like
        ``check_health`` when this replica cannot serve, else its load."""
        await self.check_health()
        ep = self.endpoint
        return {"replica": self.replica_id, "pid": os.getpid(), "sessions": len(ep._dtype) - len(ep._closing),
                "running": ep.scheduler.running, "waiting": ep.scheduler.waiting, "stages": ep.cloud.stats.stages,
                "queue_s_total": ep.queue_s_total, "draining": ep.draining}

    async def drain(self, grace_s: float = 10.0) -> dict:
        """Leave gracefully: take no new session, give open ones ``grace_s`` to finish, then
        end the rest with ``draining`` (their devices resume them on another replica)."""
        import asyncio
        import time
        if self.endpoint is None:
            return {"evicted": 0, "finished": 0}
        self.endpoint.drain()
        open_at_start = len(self.endpoint._dtype)
        deadline = time.monotonic() + grace_s
        while self.endpoint._dtype and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        evicted = self.endpoint.drain(evict=True)
        return {"evicted": evicted, "finished": max(0, open_at_start - evicted)}

    async def stats(self) -> dict:
        return {"replica": self.replica_id, **self.endpoint.stats()}

    async def private_report(self) -> dict:
        """Walk this actor's whole state: every tensor it holds, and which are private."""
        from privatelora.placement.checks import private_paths
        bad, n = private_paths(self, "replica")
        return {"tensors": n, "private": bad, "sessions": len(self.cloud.sessions)}

    async def public_tensor_report(self, forbidden: dict | None = None) -> dict:
        """Walk this actor's whole state: every tensor it holds (path, shape, dtype, device)
        and which ``forbidden`` tensors it equals by value (``placement.checks.tensor_report``),
        for the check that a replica holds only the cloud's decoder layers."""
        from privatelora.placement.checks import tensor_report
        return tensor_report(self, "replica", forbidden)

    async def stop(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.stop()
            self.endpoint = None
        if self.tls_dir is not None:      # the private key must not outlive the replica
            shutil.rmtree(self.tls_dir, ignore_errors=True)
            self.tls_dir = None
        await self._stop_metrics()

    async def _stop_metrics(self) -> None:
        if self._ray_task is not None:    # its last sync exports the stopped state
            self._ray_task.cancel()
            await asyncio.gather(self._ray_task, return_exceptions=True)
            self._ray_task = None
        if self.ray_export is not None:
            self.ray_export.close()
            self.ray_export = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.metrics_address = None
