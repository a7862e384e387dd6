"""Prometheus metrics of a cloud endpoint (one ``CollectorRegistry`` per process; Ray optional).

Names follow vLLM's conventions with our prefix (``vllm:num_requests_running`` becomes
``privatelora_sessions_running``; counters end in ``_total``, durations in ``_seconds``,
sizes in ``_bytes``). Two sources, chosen by cost:

- ``MetricsEvents`` (an ``EndpointEvents``) turns what the endpoint reports as it works
  into histograms and counters: time to first token, inter-token latency, end-to-end
  latency, device round trip, stage batch size / tokens / duration / queue time, prompt
  and generation tokens, sessions opened and closed. It keeps a few timestamps per open
  session (for the latencies) and drops them when the session closes.
- ``EndpointCollector`` reads ``endpoint.stats()`` (and through it the transport's
  ``ByteStats`` and refusal counters) when Prometheus scrapes: gauges and counters that
  the endpoint already keeps cost nothing on the hot path.

What the cloud can observe, exactly: it sends one hand-off down per token the device
samples, so ``privatelora_generation_tokens_total`` counts the tokens devices received
(the sum of ``len(gen.tokens)`` over sessions whose hand-offs all arrived); the first
hand-in of a session carries its prompt (``privatelora_prompt_tokens_total``). Latencies
are measured at the cloud: time to first token runs from the prompt's arrival to the
first hand-off sent back (device-side embedding/sampling and the network are outside it).

Every labelled counter exports each label value it can take at 0 from the start
(``KNOWN``: Prometheus practice, so ``rate()`` sees the first event and a panel has data
on a fresh endpoint).

On Ray, ``privatelora.actors.ray_metrics.RayExport`` also sends the same metrics through Ray's own pipeline
(``ray.util.metrics``: Ray's metrics agent serves them as ``ray_privatelora_*`` and
Prometheus finds the agents through the discovery file Ray writes), tagged with one
bounded ``replica`` tag (the replica's index). Histograms get every observation twice
(the prometheus_client one and its Ray twin, as vLLM's ``RayPrometheusStatLogger`` does);
counters and gauges are mirrored periodically (counters by their increase, gauges by
their value). A Ray failure is logged and counted, never raised into serving.

Privacy: no label carries a user or session identifier. Labels are ``direction``,
``kind`` (frame kind), ``reason`` (refusal / error / close code) and ``replica`` (an
index: a target label from service discovery, or the Ray tag). Session ids are used only
as keys of the per-session timestamps, never exported.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from privatelora.serving.endpoint import EndpointEvents

log = logging.getLogger(__name__)

# `cloud` serves /metrics here by default; `serve`'s replica i on DEFAULT_PORT + i
DEFAULT_PORT = 9431

# vLLM's buckets where they fit; ours start lower: a loopback stage or round trip is ~0.1 ms
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ACCEPT_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16)
RT_BUCKETS = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 6, 8, 12, 17, 24, 33, 48, 65)

# every label name any privatelora_* series may carry (tests check the registry against it)
LABELS = frozenset({"direction", "kind", "reason", "state", "le"})

# ---- every label value, known up front (exported at 0 from the start) ------------------
# The codes the sources raise; tests/test_metrics.py scans the sources for codes missing
# here. A code not listed still counts: its series just appears with its first event.
# The codec's refusals of a frame (docs/wire.md, "What the decoder refuses") ...
WIRE_CODES = ("bad_type", "truncated", "bad_length", "too_large", "bad_version", "bad_header", "unknown_kind",
              "bad_direction", "bad_session", "bad_compression", "malformed", "internal", "unknown_session",
              "bad_mac", "no_key", "bad_fields", "bad_field", "bad_key", "bad_tensor", "non_finite", "not_float",
              "private_tensor", "private_value", "bad_geometry", "no_geometry", "bad_layer", "bad_count", "bad_shape",
              "bad_dtype", "bad_lengths")
# ... the transport's own (a frame for another connection's session, one in flight for a
# session the cloud ended, a stream that stalls), and the codes a declined Open gets
SERVER_REFUSALS = ("foreign_session", "session_in_use", "session_closed", "slow_frame", "idle")
OPEN_DECLINES = ("draining", "geometry_mismatch", "too_many_sessions", "not_a_replica", "busy", "rejected")
REFUSAL_REASONS = tuple(dict.fromkeys(WIRE_CODES + SERVER_REFUSALS + OPEN_DECLINES))
# connections the transport closed for cause (privatelora.transport.server)
DISCONNECT_REASONS = ("bad_version", "bad_header", "truncated", "too_large", "bad_length", "slow_frame", "idle",
                      "garbage", "refused", "connection_error", "internal", "slow_reader", "send_timeout")
# a request the cloud refuses ends its session alone (runtime.cloud, training.cloud)
REQUEST_ERRORS = ("bad_request", "unknown_session", "duplicate", "out_of_order", "bad_position", "bad_shape",
                  "too_many_tokens", "too_long", "not_finite", "bad_lengths")
# Error answers the endpoint sends on a session (which then closes)
ERROR_REASONS = ("busy", "draining", "idle_timeout", "silent_device", "stage_failed", "encode_failed") + REQUEST_ERRORS
CLOSE_REASONS = ("closed",) + ERROR_REASONS
FAULT_REASONS = ("stage", "loop", "events", "encode", "close", "train")
# labelled family -> (its label, every value it is exported with from the start)
KNOWN = {"privatelora_frames_refused": ("reason", REFUSAL_REASONS),
         "privatelora_disconnects": ("reason", DISCONNECT_REASONS),
         "privatelora_errors": ("reason", ERROR_REASONS),
         "privatelora_sessions_closed": ("reason", CLOSE_REASONS),
         "privatelora_faults": ("reason", FAULT_REASONS)}


class MetricsEvents(EndpointEvents):
    """Histograms and counters fed by a ``CloudEndpoint``'s events (its event-loop thread)."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.ray = None     # actors.ray_metrics.RayExport: every observation goes to Ray too
        self.histograms: dict[Histogram, tuple[str, str, tuple]] = {}     # -> (name, doc, buckets)
        hist = self._histogram                      # every histogram known by name (RayExport)
        self.prompt_tokens = Counter("privatelora_prompt_tokens", "Prompt tokens handed in (first hand-off of each "
                                     "session)", registry=r)
        self.generation_tokens = Counter("privatelora_generation_tokens", "Tokens generated: one per hand-off sent "
                                         "back to a device, which samples one token from it", registry=r)
        self.opened_sessions = Counter("privatelora_sessions_opened", "Sessions opened", registry=r)
        self.closed_sessions = Counter("privatelora_sessions_closed", "Sessions closed, by reason (closed by the "
                                       "device or its connection, idle_timeout, or the error code that ended it)",
                                       ["reason"], registry=r)
        self.ttft = hist("privatelora_time_to_first_token_seconds", "From a prompt's arrival at the cloud to "
                         "its first hand-off sent back", buckets=TTFT_BUCKETS, registry=r)
        self.itl = hist("privatelora_inter_token_latency_seconds", "Between two successive hand-offs of one "
                        "session (one generated token)", buckets=ITL_BUCKETS, registry=r)
        self.e2e = hist("privatelora_e2e_request_latency_seconds", "From a prompt's arrival to the session's "
                        "last hand-off, observed when the session closes", buckets=E2E_BUCKETS, registry=r)
        self.rtt = hist("privatelora_device_round_trip_seconds", "From an Activations frame sent to the "
                        "device's Reply received (network both ways plus the device's M a)",
                        buckets=FAST_BUCKETS, registry=r)
        self.batch = hist("privatelora_stage_batch_size", "Sessions in one batched backbone stage",
                          buckets=BATCH_BUCKETS, registry=r)
        self.stage_tokens = hist("privatelora_stage_tokens", "Tokens in one batched backbone stage (flat "
                                 "token batch)", buckets=TOKEN_BUCKETS, registry=r)
        self.stage_s = hist("privatelora_stage_duration_seconds", "Backbone compute time of one batched stage",
                            buckets=FAST_BUCKETS, registry=r)
        self.queue_s = hist("privatelora_stage_queue_time_seconds", "Mean time a stage's items waited in the "
                            "scheduler (arrival to batch), one observation per stage", buckets=FAST_BUCKETS,
                            registry=r)
        self.accepted = hist("privatelora_accepted_tokens_per_verify", "Drafted tokens the device accepted "
                             "in one speculative verify chain (read off its next hand-off's start)",
                             buckets=ACCEPT_BUCKETS, registry=r)
        self.round_trips = hist("privatelora_round_trips_per_token", "Device round trips (adapted cloud "
                                "layers + 1) per token a chain generated", buckets=RT_BUCKETS, registry=r)
        for reason in CLOSE_REASONS:                # every known reason, at 0 from the start
            self.closed_sessions.labels(reason=reason)
        self._first_in: dict[int, float] = {}   # session -> its prompt's arrival
        self._last_out: dict[int, float] = {}   # session -> its last hand-off sent
        self._sent: dict[int, float] = {}       # session -> its outstanding Activations sent

    def _histogram(self, name: str, doc: str, *, buckets: tuple, registry) -> Histogram:
        h = Histogram(name, doc, buckets=buckets, registry=registry)
        self.histograms[h] = (name, doc, buckets)
        return h

    def _observe(self, h: Histogram, value: float) -> None:
        h.observe(value)
        if self.ray is not None:
            self.ray.observe(h, value)

    def opened(self, session, now):
        self.opened_sessions.inc()

    def hand_in(self, session, tokens, first, now):
        if first:
            self._first_in[session] = now
            self.prompt_tokens.inc(tokens)

    def chain(self, session, generated, drafted, accepted, round_trips, now):
        if drafted:
            self._observe(self.accepted, accepted)
        self._observe(self.round_trips, round_trips / generated)

    def hand_out(self, session, now):
        self.generation_tokens.inc()
        last = self._last_out.get(session)
        if last is not None:
            self._observe(self.itl, now - last)
        elif session in self._first_in:
            self._observe(self.ttft, now - self._first_in[session])
        self._last_out[session] = now

    def activations(self, session, layer, now):
        self._sent[session] = now

    def reply(self, session, layer, now):
        t = self._sent.pop(session, None)
        if t is not None:
            self._observe(self.rtt, now - t)

    def stage(self, sessions, tokens, seconds, queue_s):
        self._observe(self.batch, sessions)
        self._observe(self.stage_tokens, tokens)
        self._observe(self.stage_s, seconds)
        self._observe(self.queue_s, queue_s)

    def closed(self, session, reason, now):
        t0, last = self._first_in.pop(session, None), self._last_out.pop(session, None)
        self._sent.pop(session, None)
        if t0 is not None and last is not None:
            self._observe(self.e2e, last - t0)
        self.closed_sessions.labels(reason=reason).inc()


def _retry(fn, tries: int = 5):
    """Read state the endpoint's threads are changing: a dict resized under an iteration
    raises RuntimeError; reading again is cheaper than any lock on the hot path."""
    for i in range(tries):
        try:
            return fn()
        except RuntimeError:
            if i == tries - 1:
                raise


class EndpointCollector(Collector):
    """Gauges and counters read from ``endpoint.stats()`` at scrape time."""

    def __init__(self, endpoint):
        from privatelora.model.projections import out_features
        self.endpoint = endpoint
        cloud = endpoint.cloud
        cfg, mc = cloud.cfg, cloud.model_config
        # a naive split sends h (d numbers) down and one delta per target up for every token
        # and layer where we send r per A down and r per target up, in the same wire dtype:
        # naive bytes = our raw activation bytes x these exact ratios (no per-frame work)
        n_a = 1 if cfg.shared_a else len(cfg.targets)
        self._naive = {"down": ("activations", mc.hidden_size, cfg.rank * n_a),
                       "up": ("reply", sum(out_features(mc, t) for t in cfg.targets), cfg.rank * len(cfg.targets))}

    def describe(self):
        return []

    def collect(self) -> Iterable:
        ep = self.endpoint
        s = _retry(ep.stats)
        task = getattr(ep, "_task", None)
        yield _gauge("privatelora_replica_up", "1 while this endpoint's stage loop runs",
                     int(task is not None and not task.done() and s["healthy"]))
        yield _gauge("privatelora_sessions_excused", "Sessions the cloud waits on mid-step that missed a stage's "
                     "gathering window (a silent device): no stage waits for them until they answer", s["excused"])
        yield _by("privatelora_faults", "Internal failures the endpoint survived, by where (stage, loop, events, "
                  "encode, close, train)", s["faults"])
        yield _gauge("privatelora_sessions_running", "Sessions holding a KV cache on the backbone", s["running"])
        yield _gauge("privatelora_sessions_waiting", "Sessions whose first hand-off waits for admission",
                     s["waiting"])
        yield _gauge("privatelora_sessions_open", "Open sessions (running, waiting or not yet handed in)",
                     s["sessions"])
        yield _gauge("privatelora_kv_cache_usage_bytes", "Bytes of the KV pool held by sessions' blocks", s["kv_bytes"])
        kv = s["kv"]
        yield _gauge("privatelora_kv_cache_allocated_bytes", "Bytes the KV pool holds now: its storage (it grows "
                     "as sessions need it, up to the byte budget) and its decode mirrors", kv["allocated_bytes"])
        blocks = GaugeMetricFamily("privatelora_kv_cache_blocks", "KV pool blocks (block_size positions in every "
                                   "cloud layer), by state: allocated (the storage now), used (held by sessions), free "
                                   "(allocated, not used), capacity (what the byte budget allows)",
                                   labels=["state"])
        for state, key in (("allocated", "blocks"), ("used", "used"), ("free", "free"), ("capacity", "capacity")):
            blocks.add_metric([state], kv[key])
        yield blocks
        yield _counter("privatelora_backbone_busy_seconds", "Time the backbone spent computing (stages, "
                       "precomputed frozen paths, training)", s["busy_s"])
        yield _counter("privatelora_stages_total", "Batched layer executions", s["stages"])
        yield _counter("privatelora_scheduler_fairness_picks", "Batches chosen because an item waited too long",
                       s["fairness_picks"])
        yield _counter("privatelora_scheduler_gather_waits", "Times a stage group waited for owed members",
                       s["gather_waits"])
        yield _counter("privatelora_sessions_reclaimed", "Sessions closed for silence (KV cache reclaimed)",
                       s["reclaimed"])
        yield _by("privatelora_frames_refused", "Incoming frames refused by the transport, by reason",
                  s["refusals"])
        yield _by("privatelora_disconnects", "Connections closed for cause, by reason", s["disconnects"])
        yield _by("privatelora_errors", "Error answers sent on a session, by code", s["errors"])
        frames = CounterMetricFamily("privatelora_frames", "Frames, by direction (up: device to cloud) and kind",
                                     labels=["direction", "kind"])
        raw = CounterMetricFamily("privatelora_raw_bytes", "Tensor payload bytes (elements x wire dtype size, no "
                                  "framing), by direction and frame kind", labels=["direction", "kind"])
        wired = CounterMetricFamily("privatelora_wire_bytes", "Whole frames on the wire (framing included, TLS "
                                    "records not), by direction and frame kind", labels=["direction", "kind"])
        naive = CounterMetricFamily("privatelora_naive_split_bytes", "Payload bytes a naive LoRA split would have "
                                    "sent for the same tokens and layers in the same wire dtype (hand-offs, equal "
                                    "in both, excluded)", labels=["direction"])
        for direction, kinds in s["bytes"].items():
            for kind, k in kinds.items():
                if kind == "total":
                    continue
                frames.add_metric([direction, kind], k["frames"])
                raw.add_metric([direction, kind], k["raw"])
                wired.add_metric([direction, kind], k["wire"])
            kind, num, den = self._naive[direction]
            naive.add_metric([direction], kinds.get(kind, {}).get("raw", 0) * num // den)
        yield from (frames, raw, wired, naive)


def _gauge(name, doc, value):
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name, doc, value):
    return CounterMetricFamily(name, doc, value=value)


def _by(name, doc, counts: dict):
    """A counter by reason: every known reason (``KNOWN``) from the start, at 0 until it
    happens, and any other reason once it does."""
    label, known = KNOWN[name]
    m = CounterMetricFamily(name, doc, labels=[label])
    for key, n in sorted((dict.fromkeys(known, 0) | {str(k): v for k, v in counts.items()}).items()):
        m.add_metric([key], n)
    return m


class MetricsPortError(OSError):
    """``/metrics`` cannot listen where it was asked to (the port is taken, say)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class Metrics:
    """One process's metrics: a dedicated registry, the endpoint events and collector, and
    optionally the ``/metrics`` HTTP server."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.events = MetricsEvents(self.registry)
        self._httpd = None
        self.address: tuple[str, int] | None = None       # where /metrics listens, once it does

    def watch(self, endpoint) -> "Metrics":
        self.registry.register(EndpointCollector(endpoint))
        return self

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """Expose ``/metrics`` on ``host:port`` (port 0: any free port); returns the address.
        Raises ``MetricsPortError`` (one line, saying what to do) when it cannot listen."""
        try:
            self._httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise MetricsPortError(e.errno, f"cannot serve /metrics on {host}:{port}: {e.strerror or e}; pass --metrics"
                                   "-port 0 (any free port), another --metrics-port, or --no-metrics") from None
        self.address = (host, self._httpd.server_port)
        return self.address

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
            self.address = None


def instrument(endpoint, registry: CollectorRegistry | None = None, metrics: Metrics | None = None) -> Metrics:
    """Metrics for ``endpoint`` (a ``CloudEndpoint``): its events feed them from now on.
    ``metrics``: a ``Metrics`` made (and maybe serving) before the endpoint existed."""
    if type(endpoint.events) is not EndpointEvents:
        raise ValueError("this endpoint already has an events subscriber")
    m = metrics or Metrics(registry)
    endpoint.events = m.events
    return m.watch(endpoint)


# ---- discovery ------------------------------------------------------------------------
def advertised_host(host: str) -> str:
    """The address Prometheus should scrape for a server bound to ``host``."""
    return socket.getfqdn() if host in ("", "0.0.0.0", "::") else host


def sd_target(host: str, port: int) -> str:
    host = advertised_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_sd_file(path, targets: Iterable[tuple[str, int, int]]) -> None:
    """Write a Prometheus file_sd JSON file: one group per (host, port, replica index),
    labelled ``replica``. Written atomically (Prometheus watches the file)."""
    groups = [{"targets": [sd_target(h, p)], "labels": {"replica": str(i)}} for h, p, i in targets]
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".privatelora-sd-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(groups, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
