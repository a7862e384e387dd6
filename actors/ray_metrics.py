"""Export a replica's metrics through Ray's own pipeline (``ray.util.metrics``).

The metrics themselves live in ``privatelora.serving.metrics`` (no Ray there); this
module mirrors them into Ray, so that Ray's metrics agent serves them next to Ray's own
(``ray_privatelora_*``) and a Prometheus reading Ray's discovery file finds them.
"""

from __future__ import annotations

import asyncio
import logging
import math

from prometheus_client import Histogram

from privatelora.serving.metrics import Metrics

log = logging.getLogger(__name__)


class RayExport:
    """The same metrics through ``ray.util.metrics``, for a process that runs inside Ray (a
    ``BackboneReplica``). Ray's metrics agent on the node serves them, prefixed ``ray_``
    (``ray_privatelora_generation_tokens_total``: a Ray counter gets ``_total``, so counters
    are made under their family's name without it); Prometheus finds the agents through
    the discovery file Ray writes (``prom_metrics_service_discovery.json``).

    ``tags``: the one bounded tag every series carries (``{"replica": "0"}``), never a user
    or session. Histograms: every real observation goes to the Ray twin as well
    (``MetricsEvents.ray``); Ray's boundaries must be > 0, so a 0 bucket merges into the
    next. Counters and gauges: ``sync`` mirrors the registry (counters by their increase
    since the last sync, from 0 for every known label value; gauges by value). Ray drops a
    gauge that is not set again within two report intervals, so ``run`` syncs every
    ``period_s``. Every Ray call is guarded: a failure is logged (the first of each
    metric) and counted in ``failures``, never raised.

    ``module``: ``ray.util.metrics`` or a stand-in with the same three classes (tests)."""

    def __init__(self, metrics: Metrics, tags: dict[str, str], module=None):
        if module is None:
            from ray.util import metrics as module
        self.module, self.registry, self.tags = module, metrics.registry, {k: str(v) for k, v in tags.items()}
        self.failures = 0
        self._failed: set[str] = set()
        self._counters: dict[str, object] = {}
        self._gauges: dict[str, object] = {}
        self._last: dict[tuple, float] = {}       # (family, labels) -> the total Ray has
        self._hists: dict[Histogram, object] = {}
        self._events = metrics.events
        for h, (name, doc, buckets) in self._events.histograms.items():
            twin = self._guard(name, lambda: module.Histogram(
                name, doc, boundaries=[float(b) for b in buckets if 0 < b < math.inf], tag_keys=tuple(self.tags)))
            if twin is not None:
                self._hists[h] = twin
        self._events.ray = self
        self.sync()

    def _guard(self, name: str, fn):
        try:
            return fn()
        except Exception:
            self.failures += 1
            if name not in self._failed:
                self._failed.add(name)
                log.exception("Ray metric %s failed (serving goes on; later failures of it are only counted)", name)
            return None

    def observe(self, h: Histogram, value: float) -> None:
        twin = self._hists.get(h)
        if twin is not None:
            self._guard(self._events.histograms[h][0], lambda: twin.observe(value, tags=self.tags))

    def _metric(self, family, sample, kind: str):
        made = self._counters if kind == "counter" else self._gauges
        if family.name not in made:
            cls = self.module.Counter if kind == "counter" else self.module.Gauge
            made[family.name] = self._guard(family.name, lambda: cls(
                family.name, family.documentation, tag_keys=tuple(self.tags) + tuple(sorted(sample.labels))))
        return made[family.name]

    def sync(self) -> None:
        """Mirror every counter and gauge of the registry to Ray now."""
        families = self._guard("registry", lambda: list(self.registry.collect()))
        if families is None:
            return
        for family in families:
            if family.type not in ("counter", "gauge"):
                continue                  # histograms are fed observation by observation
            for sample in family.samples:
                if family.type == "counter" and not sample.name.endswith("_total"):
                    continue              # prometheus_client's _created timestamps
                metric = self._metric(family, sample, family.type)
                if metric is None:
                    continue
                tags = {**self.tags, **sample.labels}
                if family.type == "gauge":
                    self._guard(family.name, lambda: metric.set(sample.value, tags=tags))
                    continue
                key = (family.name, tuple(sorted(sample.labels.items())))
                last = self._last.get(key)
                if last is None:          # a new series: present from now on, at 0 until it counts
                    self._guard(family.name, lambda: _record_zero(metric, tags))
                    last = 0.0
                if sample.value > last and self._guard(family.name, lambda: metric.inc(sample.value - last, tags=tags)
                                                       or True):
                    last = sample.value   # (a failed increase is tried again at the next sync)
                self._last[key] = last

    async def run(self, period_s: float = 1.0) -> None:
        """Sync every ``period_s`` until cancelled (then once more: the final values)."""
        try:
            while True:
                await asyncio.sleep(period_s)
                self.sync()
        finally:
            self.sync()

    def close(self) -> None:
        if self._events.ray is self:
            self._events.ray = None


def _record_zero(counter, tags: dict) -> None:
    """A Ray counter series at 0: ``Counter.inc`` takes only positive values, but the
    exporter (OpenTelemetry) takes a 0 and then exports the series from the start."""
    record = getattr(counter, "_record", None)
    if record is not None:
        record(0, tags=tags)


def ray_counter_at_zero(counter, tags: dict | None = None) -> None:
    """``_record_zero`` for code that holds a ``ray.util.metrics.Counter`` itself (the
    router); never raises."""
    try:
        _record_zero(counter, tags or {})
    except Exception:
        log.debug("could not export %r at 0", counter, exc_info=True)
