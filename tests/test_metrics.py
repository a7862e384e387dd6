"""Prometheus metrics of a cloud endpoint against the truth (no Prometheus server here;
tests/test_prometheus.py runs a real one).

The relations tested, from what the cloud can observe:
- one hand-off goes down per token a device samples, so generation tokens counted ==
  sum of len(gen.tokens) over the sessions (all of whose hand-offs arrived);
- a session's first hand-in is its prompt: prompt tokens == sum of prompt lengths over
  sessions that generate at all;
- a session with n >= 1 tokens hands in its prompt and n - 1 tokens, each through all L
  cloud layers: one TTFT, n - 1 inter-token gaps, one e2e latency, one device round trip
  per Reply frame;
- bytes are the transport's own counts; the naive-split baseline is d (down) and the
  adapted projections' widths (up) per token and layer, in each session's wire dtype.
"""

import asyncio
import json
import subprocess
import sys
import urllib.request

import pytest

from privatelora import wire
from privatelora.runtime.accounting import naive_numbers_per_token_per_layer
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.projections import out_features
from privatelora.api import build_split
from privatelora.config import PrivateLoRAConfig
from privatelora.runtime.device import DevicePart
from privatelora.model.sampling import SamplingParams
from privatelora.serving.metrics import LABELS, instrument, write_sd_file
from privatelora.model.loading import load_backbone
from privatelora.serving.endpoint import CloudEndpoint
from privatelora.serving.remote import run_remote
from privatelora.transport import Client

# (prompt length, max new tokens, wire dtype, connection, start delay s)
USERS = [(7, 10, "fp32", 0, 0.0), (3, 6, "fp16", 0, 0.02), (12, 8, "int8", 1, 0.01), (5, 12, "bf16", 1, 0.05),
         (4, 0, "fp32", 1, 0.03)]        # the last one opens and closes without generating


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def load():
    bb = load_backbone("tiny")
    cfg = PrivateLoRAConfig(rank=8)
    split = build_split(cfg=cfg, backbone=bb)
    mid = {}

    async def main():
        ep = CloudEndpoint(split.cloud)
        m = instrument(ep)
        async with ep:
            clients = [await Client.connect(*ep.address) for _ in range(2)]
            sids = []

            def peek(msg):           # mid-load, from the event loop: what a scrape would see
                if isinstance(msg, wire.Handoff) and not mid:
                    mid.update(blocks_used=m.registry.get_sample_value("privatelora_kv_cache_blocks",
                                                                        {"state": "used"}),
                               running=m.registry.get_sample_value("privatelora_sessions_running"),
                               kv=m.registry.get_sample_value("privatelora_kv_cache_usage_bytes"),
                               up=m.registry.get_sample_value("privatelora_replica_up"))

            async def user(u, plen, new, dtype, conn, delay):
                await asyncio.sleep(delay)
                dev = DevicePart(bb, cfg, PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(u, scale=0.5))
                prompt = [(7 * u + 3 * i) % 500 + 2 for i in range(plen)]
                g = await run_remote(clients[conn], dev, prompt, SamplingParams(max_new_tokens=new, seed=u),
                                     dtype=dtype, observe=peek)
                sids.append(g.session)
                return g

            gens = await asyncio.gather(*[user(u, *spec) for u, spec in enumerate(USERS)])
            # a peer that does not speak the protocol: one refused frame (then cut off)
            r, w = await asyncio.open_connection(*ep.address)
            w.write(b"\x00\x00\x00\x05hello")
            await w.drain()
            await r.read()
            w.close()
            for _ in range(500):     # Close frames are handled by the stage loop
                if ep.closed_sessions == len(USERS):
                    break
                await asyncio.sleep(0.01)
            client_stats = [c.stats.as_dict() for c in clients]
            for c in clients:
                await c.close()
            after = {k: m.registry.get_sample_value(k) for k in
                     ("privatelora_sessions_running", "privatelora_sessions_open", "privatelora_kv_cache_usage_bytes",
                      "privatelora_replica_up")}
        stopped_up = m.registry.get_sample_value("privatelora_replica_up")
        return dict(m=m, ep=ep, gens=gens, sids=sids, clients=client_stats, after=after, stopped_up=stopped_up)

    out = asyncio.run(main())
    out.update(bb=bb, cfg=cfg, mid=mid)
    return out


def _v(load, name, **labels):
    return load["m"].registry.get_sample_value(name, labels)


def test_token_counters_equal_what_devices_received(load):
    gens = load["gens"]
    assert all(g.error is None for g in gens) and load["ep"].closed_sessions == len(USERS)
    tokens = [len(g.tokens) for g in gens]
    assert tokens[-1] == 0 and all(t > 0 for t in tokens[:-1])
    assert _v(load, "privatelora_generation_tokens_total") == sum(tokens)
    assert _v(load, "privatelora_prompt_tokens_total") == sum(len(g.prompt) for g in gens if g.tokens)
    generating = sum(1 for t in tokens if t)
    assert _v(load, "privatelora_time_to_first_token_seconds_count") == generating
    assert _v(load, "privatelora_inter_token_latency_seconds_count") == sum(t - 1 for t in tokens if t)
    assert _v(load, "privatelora_e2e_request_latency_seconds_count") == generating
    assert _v(load, "privatelora_sessions_opened_total") == len(USERS)
    assert _v(load, "privatelora_sessions_closed_total", reason="closed") == len(USERS)
    for name in ("privatelora_time_to_first_token_seconds_sum", "privatelora_inter_token_latency_seconds_sum",
                 "privatelora_e2e_request_latency_seconds_sum", "privatelora_device_round_trip_seconds_sum"):
        assert _v(load, name) > 0


def test_stage_and_round_trip_histograms_count_every_item(load):
    ep, L = load["ep"], len(load["ep"].cloud.layer_ids)
    srv = ep.server.stats.as_dict()
    replies = srv["up"]["reply"]["frames"]
    # one Reply per layer for every hand-in: the prompt and every token but the last
    pairs = sum(len(g.prompt) + len(g.tokens) - 1 for g in load["gens"] if g.tokens)
    assert replies == sum(c["up"]["reply"]["frames"] for c in load["clients"])
    assert srv["up"]["handoff"]["frames"] == sum(len(g.tokens) for g in load["gens"])
    assert _v(load, "privatelora_device_round_trip_seconds_count") == replies
    assert _v(load, "privatelora_stage_batch_size_count") == ep.scheduler.stats.batches
    assert _v(load, "privatelora_stage_batch_size_sum") == srv["up"]["handoff"]["frames"] + replies
    assert _v(load, "privatelora_stage_tokens_sum") == pairs * (1 + L) == ep.scheduler.stats.tokens
    assert _v(load, "privatelora_stage_batch_size_sum") / _v(load, "privatelora_stage_batch_size_count") > 1
    assert _v(load, "privatelora_stages_total") == ep.cloud.stats.stages
    assert _v(load, "privatelora_backbone_busy_seconds_total") == pytest.approx(ep.busy_s)


def test_bytes_equal_the_transport_counts_and_the_naive_baseline(load):
    ep, bb, cfg = load["ep"], load["bb"], load["cfg"]
    srv = ep.server.stats.as_dict()
    for direction in ("up", "down"):
        for kind, k in srv[direction].items():
            if kind == "total":
                continue
            assert _v(load, "privatelora_frames_total", direction=direction, kind=kind) == k["frames"]
            assert _v(load, "privatelora_raw_bytes_total", direction=direction, kind=kind) == k["raw"]
            assert _v(load, "privatelora_wire_bytes_total", direction=direction, kind=kind) == k["wire"]
        for kind in ("handoff", "activations", "reply"):      # what the devices counted, both ends agree
            if kind in srv[direction]:
                for field in ("frames", "raw", "wire"):
                    assert srv[direction][kind][field] == sum(c[direction][kind][field] for c in load["clients"])
    assert srv["down"]["activations"]["raw"] > 0 and srv["up"]["reply"]["wire"] > srv["up"]["reply"]["raw"]
    # naive split: h down, one delta per adapted projection up, per token and layer, same dtype
    L = len(ep.cloud.layer_ids)
    d, up = bb.config.hidden_size, sum(out_features(bb.config, t) for t in cfg.targets)
    assert d + up == naive_numbers_per_token_per_layer(bb.config, cfg.targets)
    width = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
    pairs = [(len(g.prompt) + len(g.tokens) - 1) * L * width[spec[2]] for g, spec in zip(load["gens"], USERS)
             if g.tokens]
    assert _v(load, "privatelora_naive_split_bytes_total", direction="down") == sum(pairs) * d
    assert _v(load, "privatelora_naive_split_bytes_total", direction="up") == sum(pairs) * up


def test_refusals_gauges_and_lifecycle(load):
    ep = load["ep"]
    assert dict(ep.server.refusals) == {"bad_length": 1}
    assert _v(load, "privatelora_frames_refused_total", reason="bad_length") == 1
    assert _v(load, "privatelora_disconnects_total", reason="bad_length") == 1
    assert load["mid"]["running"] >= 1 and load["mid"]["kv"] > 0 and load["mid"]["up"] == 1
    assert load["after"] == {"privatelora_sessions_running": 0, "privatelora_sessions_open": 0,
                             "privatelora_kv_cache_usage_bytes": 0, "privatelora_replica_up": 1}
    assert load["stopped_up"] == 0


def test_kv_gauges_equal_the_pools_real_allocation(load):
    pool = load["ep"].cloud.kv
    assert load["mid"]["blocks_used"] >= 1
    real = sum(t.numel() * t.element_size() for d in (pool.k, pool.v) for t in d.values())
    assert _v(load, "privatelora_kv_cache_allocated_bytes") == real == pool.allocated * pool.block_bytes
    allocated, used, free = (_v(load, "privatelora_kv_cache_blocks", state=s) for s in ("allocated", "used", "free"))
    assert allocated == pool.allocated and used == 0 and free == pool.allocated - 1     # block 0: the zero block
    assert _v(load, "privatelora_kv_cache_blocks", state="capacity") == pool.capacity >= pool.allocated


def test_no_series_identifies_a_user_or_session(load):
    from prometheus_client import generate_latest
    sids = {str(s) for s in load["sids"]} | {hex(s) for s in load["sids"]}
    assert len(load["sids"]) == len(USERS)
    n = 0
    for family in load["m"].registry.collect():
        assert family.name.startswith("privatelora_")
        for sample in family.samples:
            n += 1
            assert set(sample.labels) <= LABELS, sample
            for value in sample.labels.values():
                assert not any(s in value for s in sids), sample
    assert n > 50
    text = generate_latest(load["m"].registry).decode()
    assert not any(s in text for s in sids)


def test_http_endpoint_and_discovery_file(load, tmp_path):
    m = load["m"]
    host, port = m.serve(0)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
    finally:
        m.close()
    assert "privatelora_generation_tokens_total " in body and "privatelora_stage_batch_size_bucket" in body
    sd = tmp_path / "targets" / "privatelora.json"
    write_sd_file(sd, [("127.0.0.1", 9431, 0), ("127.0.0.1", 9432, 1)])
    assert json.loads(sd.read_text()) == [{"targets": ["127.0.0.1:9431"], "labels": {"replica": "0"}},
                                          {"targets": ["127.0.0.1:9432"], "labels": {"replica": "1"}}]
    write_sd_file(sd, [])
    assert json.loads(sd.read_text()) == [] and [p.name for p in sd.parent.iterdir()] == ["privatelora.json"]


def test_instrument_refuses_a_second_subscriber_and_metrics_import_no_ray():
    bb = load_backbone("tiny")
    ep = CloudEndpoint(build_split(cfg=PrivateLoRAConfig(rank=8), backbone=bb).cloud)
    instrument(ep)
    with pytest.raises(ValueError):
        instrument(ep)
    r = subprocess.run([sys.executable, "-c", "import sys, privatelora.serving.metrics; print('ray' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


# ---- every known label value at 0, and the sources' codes are all known ---------------------
def test_a_fresh_endpoint_exports_every_known_reason_at_0():
    from privatelora.serving.metrics import KNOWN
    ep = CloudEndpoint(build_split(cfg=PrivateLoRAConfig(rank=8), backbone=load_backbone("tiny")).cloud)
    m = instrument(ep)
    assert set(KNOWN) == {"privatelora_frames_refused", "privatelora_disconnects", "privatelora_errors",
                          "privatelora_sessions_closed", "privatelora_faults"}
    for family, (label, values) in KNOWN.items():
        assert len(values) == len(set(values)) >= 6, family
        for value in values:
            assert m.registry.get_sample_value(f"{family}_total", {label: value}) == 0, (family, value)
    # ... and a reason outside the known list still counts (appears with its first event)
    ep.server.refusals["something_new"] += 2
    assert m.registry.get_sample_value("privatelora_frames_refused_total", {"reason": "something_new"}) == 2


def test_the_known_reasons_cover_every_code_the_sources_count():
    """Scan the sources for the codes each counter can be given: a new code must be added to
    serving.metrics' lists (or it would appear only with its first event)."""
    import re
    from pathlib import Path

    from privatelora.serving import metrics as mm
    root = Path(mm.__file__).resolve().parents[1]

    def codes(path, *patterns):
        text = (root / path).read_text()
        found = [c for p in patterns for c in re.findall(p, text)]
        return {c for f in found for c in ((f,) if isinstance(f, str) else f)}
    raised = r'(?:Error|err|\bg)\(\s*(?:[\w.]+,\s*)?"([a-z0-9_]+)"'
    wire_codes = set().union(*(codes(f"wire/{f.name}", raised) for f in (root / "wire").glob("*.py")))
    server = codes("transport/server.py", raised, r'"(\w+)" if s in self._owner else "(\w+)"') | codes(
        "transport/connection.py", raised)
    stream_ends = codes("transport/streams.py", r'return "([a-z_]+)"') - {"eof"}
    fatal = set(re.search(r"_FATAL = frozenset\(\{(.*?)\}\)", (root / "transport/server.py").read_text())
                .group(1).replace('"', "").replace(" ", "").split(","))
    declines = codes("serving/endpoint.py", r'raise wire\.WireError\("([a-z_]+)"') | codes(
        "serving/frontdoor.py", raised) | {"rejected"}
    refusals = wire_codes | (server - {"handler_error"}) | stream_ends | declines
    disconnects = codes("transport/server.py", r'abort\("([a-z_]+)"\)', r'disconnects\["([a-z_]+)"\]',
                        r'fatal or "([a-z_]+)"') | codes("transport/connection.py", r'abort\("([a-z_]+)"\)') \
        | fatal | stream_ends
    errors = codes("serving/endpoint.py", r'_refuse\([\w.]+, "([a-z_]+)"', r'wire\.Error\([\w.]+, "([a-z_]+)"') | \
        codes("runtime/cloud.py", raised) | codes("training/cloud.py", raised)
    faults = codes("serving/endpoint.py", r'faults\["([a-z_]+)"\]')
    assert len(refusals) > 35 and len(disconnects) > 10 and len(errors) > 12 and len(faults) == 6
    assert refusals <= set(mm.REFUSAL_REASONS), refusals - set(mm.REFUSAL_REASONS)
    assert disconnects <= set(mm.DISCONNECT_REASONS), disconnects - set(mm.DISCONNECT_REASONS)
    assert errors <= set(mm.ERROR_REASONS), errors - set(mm.ERROR_REASONS)
    assert faults == set(mm.FAULT_REASONS)
    assert set(mm.CLOSE_REASONS) == {"closed"} | set(mm.ERROR_REASONS)


# ---- the same metrics through Ray (a stand-in for ray.util.metrics) -------------------------
class _FakeRay:
    """ray.util.metrics' three classes, recording what they are given (Ray's own checks:
    Counter.inc takes only positive values, Histogram boundaries must be > 0)."""

    def __init__(self, fail: str | None = None):
        self.made, self.points, self.fail = {}, [], fail
        fake = self

        class Metric:
            def __init__(self, name, description="", tag_keys=None, boundaries=None):
                assert name not in fake.made and isinstance(tag_keys, tuple)
                if boundaries is not None:
                    assert all(b > 0 for b in boundaries)
                self.name, self.tag_keys, self.boundaries = name, tag_keys, boundaries
                fake.made[name] = self

            def _record(self, value, tags=None):
                assert set(tags) == set(self.tag_keys), (self.name, tags)
                if fake.fail == self.name:
                    raise RuntimeError("the metrics agent is gone")
                fake.points.append((type(self).__name__, self.name, value, tuple(sorted(tags.items()))))

        class Counter(Metric):
            def inc(self, value=1.0, tags=None):
                assert value > 0
                self._record(value, tags)

        class Gauge(Metric):
            def set(self, value, tags=None):
                self._record(value, tags)

        class Histogram(Metric):
            def observe(self, value, tags=None):
                self._record(value, tags)
        self.Counter, self.Gauge, self.Histogram = Counter, Gauge, Histogram

    def total(self, name, **labels):
        want = {"replica": "3", **labels}
        return sum(v for kind, n, v, tags in self.points if n == name and kind == "Counter" and dict(tags) == want)

    def observations(self, name):
        return [v for kind, n, v, _ in self.points if n == name and kind == "Histogram"]


def test_ray_export_mirrors_the_registry_with_one_replica_tag(load):
    from privatelora.actors.ray_metrics import RayExport
    from privatelora.serving.metrics import KNOWN, Metrics
    fake = _FakeRay()
    m = Metrics()
    ep = load["ep"]       # stopped, with its load's counts
    m.watch(ep)
    exp = RayExport(m, {"replica": 3}, module=fake)
    # every counter series exists from the first sync, at 0 for every known reason
    for family, (label, values) in KNOWN.items():
        if family != "privatelora_sessions_closed":        # this registry's events saw no session
            for value in values:
                assert ("Counter", family, 0, (("reason", value), ("replica", "3"))) in fake.points, value
    assert fake.total("privatelora_frames_refused", reason="bad_length") == 1
    assert fake.total("privatelora_stages") == ep.cloud.stats.stages
    assert fake.total("privatelora_wire_bytes", direction="up", kind="reply") == \
        ep.server.stats.as_dict()["up"]["reply"]["wire"]
    # events after: histograms get each real observation, counters their increase at the next sync
    m.events.opened(1, 0.0)
    m.events.hand_in(1, 5, True, 0.0)
    m.events.hand_out(1, 0.25)
    m.events.hand_out(1, 0.75)
    m.events.closed(1, "idle_timeout", 1.0)
    assert fake.observations("privatelora_time_to_first_token_seconds") == [0.25]
    assert fake.observations("privatelora_inter_token_latency_seconds") == [0.5]
    assert fake.observations("privatelora_e2e_request_latency_seconds") == [0.75]
    exp.sync()
    exp.sync()                # nothing new: no second increase
    assert fake.total("privatelora_generation_tokens") == 2 and fake.total("privatelora_prompt_tokens") == 5
    assert fake.total("privatelora_sessions_closed", reason="idle_timeout") == 1
    gauges = {n: v for kind, n, v, _ in fake.points if kind == "Gauge"}
    assert gauges["privatelora_replica_up"] == 0 and gauges["privatelora_sessions_open"] == 0
    # names: Ray adds ray_ and (to counters) _total; tags: replica and the family's own labels only
    for metric in fake.made.values():
        assert metric.name.startswith("privatelora_") and not metric.name.endswith("_total")
        assert set(metric.tag_keys) <= (LABELS - {"le"}) | {"replica"} and metric.tag_keys[0] == "replica"
    assert fake.made["privatelora_stage_batch_size"].boundaries[0] == 1
    assert fake.made["privatelora_accepted_tokens_per_verify"].boundaries[0] == 1     # Ray refuses a 0 bound
    assert exp.failures == 0
    exp.close()
    assert m.events.ray is None


def test_a_failing_ray_metric_never_reaches_the_endpoint(caplog):
    from privatelora.actors.ray_metrics import RayExport
    from privatelora.serving.metrics import Metrics
    fake = _FakeRay(fail="privatelora_inter_token_latency_seconds")
    m = Metrics()
    exp = RayExport(m, {"replica": "3"}, module=fake)
    m.events.hand_in(1, 3, True, 0.0)
    for t in (0.1, 0.2, 0.3):
        m.events.hand_out(1, t)         # the Ray twin of the ITL histogram fails each time
    assert m.registry.get_sample_value("privatelora_inter_token_latency_seconds_count") == 2
    assert m.registry.get_sample_value("privatelora_generation_tokens_total") == 3
    assert exp.failures == 2 and fake.observations("privatelora_time_to_first_token_seconds") == [
        pytest.approx(0.1)]
    assert sum("privatelora_inter_token_latency_seconds" in r.getMessage() for r in caplog.records) == 1


def test_a_metrics_port_in_use_is_one_clear_error():
    import socket

    from privatelora.serving.metrics import DEFAULT_PORT, Metrics, MetricsPortError
    from privatelora.cli.main import build_parser
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MetricsPortError) as e:
            Metrics().serve(port)
    assert f"127.0.0.1:{port}" in str(e.value) and "--metrics-port 0" in str(e.value) and "\n" not in str(e.value)
    parser = build_parser()
    for cmd in (["cloud"], ["serve"]):       # on by default, on the documented port
        args = parser.parse_args(cmd)
        assert args.metrics_port == DEFAULT_PORT == 9431 and args.no_metrics is False
        assert parser.parse_args([*cmd, "--no-metrics"]).no_metrics is True


def test_cloud_with_its_metrics_port_taken_exits_with_one_line():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "privatelora.cli", "cloud", "--model", "tiny", "--port", "0",
                            "--metrics-port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"privatelora: error: cannot serve /metrics on 127.0.0.1:{port}") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr
