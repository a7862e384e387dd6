"""Prometheus metrics of a cloud endpoint (no Ray; one ``CollectorRegistry`` per process).

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

Privacy: no label carries a user or session identifier. Labels are ``direction``,
``kind`` (frame kind), ``reason`` (refusal / error / close code) and, from service
discovery, ``replica`` (an index). Session ids are used only as keys of the per-session
timestamps, never exported.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from privatelora.serving.endpoint import EndpointEvents

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
LABELS = frozenset({"direction", "kind", "reason", "le"})


class MetricsEvents(EndpointEvents):
    """Histograms and counters fed by a ``CloudEndpoint``'s events (its event-loop thread)."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.prompt_tokens = Counter("privatelora_prompt_tokens", "Prompt tokens handed in (first hand-off of each "
                                     "session)", registry=r)
        self.generation_tokens = Counter("privatelora_generation_tokens", "Tokens generated: one per hand-off sent "
                                         "back to a device, which samples one token from it", registry=r)
        self.opened_sessions = Counter("privatelora_sessions_opened", "Sessions opened", registry=r)
        self.closed_sessions = Counter("privatelora_sessions_closed", "Sessions closed, by reason (closed by the "
                                       "device or its connection, idle_timeout, or the error code that ended it)",
                                       ["reason"], registry=r)
        self.ttft = Histogram("privatelora_time_to_first_token_seconds", "From a prompt's arrival at the cloud to "
                              "its first hand-off sent back", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("privatelora_inter_token_latency_seconds", "Between two successive hand-offs of one "
                             "session (one generated token)", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("privatelora_e2e_request_latency_seconds", "From a prompt's arrival to the session's "
                             "last hand-off, observed when the session closes", buckets=E2E_BUCKETS, registry=r)
        self.rtt = Histogram("privatelora_device_round_trip_seconds", "From an Activations frame sent to the "
                             "device's Reply received (network both ways plus the device's M a)",
                             buckets=FAST_BUCKETS, registry=r)
        self.batch = Histogram("privatelora_stage_batch_size", "Sessions in one batched backbone stage",
                               buckets=BATCH_BUCKETS, registry=r)
        self.stage_tokens = Histogram("privatelora_stage_tokens", "Tokens in one batched backbone stage (flat "
                                      "token batch)", buckets=TOKEN_BUCKETS, registry=r)
        self.stage_s = Histogram("privatelora_stage_duration_seconds", "Backbone compute time of one batched stage",
                                 buckets=FAST_BUCKETS, registry=r)
        self.queue_s = Histogram("privatelora_stage_queue_time_seconds", "Mean time a stage's items waited in the "
                                 "scheduler (arrival to batch), one observation per stage", buckets=FAST_BUCKETS,
                                 registry=r)
        self.accepted = Histogram("privatelora_accepted_tokens_per_verify", "Drafted tokens the device accepted "
                                  "in one speculative verify chain (read off its next hand-off's start)",
                                  buckets=ACCEPT_BUCKETS, registry=r)
        self.round_trips = Histogram("privatelora_round_trips_per_token", "Device round trips (adapted cloud "
                                     "layers + 1) per token a chain generated", buckets=RT_BUCKETS, registry=r)
        self._first_in: dict[int, float] = {}   # session -> its prompt's arrival
        self._last_out: dict[int, float] = {}   # session -> its last hand-off sent
        self._sent: dict[int, float] = {}       # session -> its outstanding Activations sent

    def opened(self, session, now):
        self.opened_sessions.inc()

    def hand_in(self, session, tokens, first, now):
        if first:
            self._first_in[session] = now
            self.prompt_tokens.inc(tokens)

    def chain(self, session, generated, drafted, accepted, round_trips, now):
        if drafted:
            self.accepted.observe(accepted)
        self.round_trips.observe(round_trips / generated)

    def hand_out(self, session, now):
        self.generation_tokens.inc()
        last = self._last_out.get(session)
        if last is not None:
            self.itl.observe(now - last)
        elif session in self._first_in:
            self.ttft.observe(now - self._first_in[session])
        self._last_out[session] = now

    def activations(self, session, layer, now):
        self._sent[session] = now

    def reply(self, session, layer, now):
        t = self._sent.pop(session, None)
        if t is not None:
            self.rtt.observe(now - t)

    def stage(self, sessions, tokens, seconds, queue_s):
        self.batch.observe(sessions)
        self.stage_tokens.observe(tokens)
        self.stage_s.observe(seconds)
        self.queue_s.observe(queue_s)

    def closed(self, session, reason, now):
        t0, last = self._first_in.pop(session, None), self._last_out.pop(session, None)
        self._sent.pop(session, None)
        if t0 is not None and last is not None:
            self.e2e.observe(last - t0)
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
                  "encode, close, train)", "reason", s["faults"])
        yield _gauge("privatelora_sessions_running", "Sessions holding a KV cache on the backbone", s["running"])
        yield _gauge("privatelora_sessions_waiting", "Sessions whose first hand-off waits for admission",
                     s["waiting"])
        yield _gauge("privatelora_sessions_open", "Open sessions (running, waiting or not yet handed in)",
                     s["sessions"])
        yield _gauge("privatelora_kv_cache_usage_bytes", "Bytes held by all sessions' KV caches", s["kv_bytes"])
        yield _counter("privatelora_backbone_busy_seconds", "Time the backbone spent computing (stages, "
                       "precomputed frozen paths, training)", s["busy_s"])
        yield _counter("privatelora_stages_total", "Batched layer executions", s["stages"])
        yield _counter("privatelora_scheduler_fairness_picks", "Batches chosen because an item waited too long",
                       s["fairness_picks"])
        yield _counter("privatelora_scheduler_gather_waits", "Times a stage group waited for owed members",
                       s["gather_waits"])
        yield _counter("privatelora_sessions_reclaimed", "Sessions closed for silence (KV cache reclaimed)",
                       s["reclaimed"])
        yield _by("privatelora_frames_refused", "Incoming frames refused by the transport, by reason", "reason",
                  s["refusals"])
        yield _by("privatelora_disconnects", "Connections closed for cause, by reason", "reason", s["disconnects"])
        yield _by("privatelora_errors", "Error answers sent on a session, by code", "reason", s["errors"])
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


def _by(name, doc, label, counts: dict):
    m = CounterMetricFamily(name, doc, labels=[label])
    for key, n in sorted(counts.items()):
        m.add_metric([str(key)], n)
    return m


class Metrics:
    """One process's metrics: a dedicated registry, the endpoint events and collector, and
    optionally the ``/metrics`` HTTP server."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.events = MetricsEvents(self.registry)
        self._httpd = None

    def watch(self, endpoint) -> "Metrics":
        self.registry.register(EndpointCollector(endpoint))
        return self

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """Expose ``/metrics`` on ``host:port`` (port 0: any free port); returns the address."""
        self._httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        return host, self._httpd.server_port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def instrument(endpoint, registry: CollectorRegistry | None = None) -> Metrics:
    """Metrics for ``endpoint`` (a ``CloudEndpoint``): its events feed them from now on."""
    if type(endpoint.events) is not EndpointEvents:
        raise ValueError("this endpoint already has an events subscriber")
    m = Metrics(registry)
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
