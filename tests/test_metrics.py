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
                    mid.update(running=m.registry.get_sample_value("privatelora_sessions_running"),
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
