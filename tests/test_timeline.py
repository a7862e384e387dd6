"""The stage loop's timeline (``serving/timeline.py``): the split of a decode cycle from
known clock readings, and a real endpoint's record agreeing with its own counters."""

import asyncio
import functools

import pytest

from privatelora.api import build_split
from privatelora.config import PrivateLoRAConfig
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.loading import load_backbone
from privatelora.model.sampling import SamplingParams
from privatelora.runtime.device import DevicePart
from privatelora.serving.endpoint import CloudEndpoint
from privatelora.serving.remote import DeviceBatch, run_remote
from privatelora.serving.timeline import Timeline
from privatelora.transport import Client

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summary_splits_a_decode_cycle():
    tl = Timeline()
    # two decode cycles of 20 ms: stage 10 ms, prepare 3 ms (1 ms to reach the worker),
    # the last reply 6 ms after the stage's end, the next stage submitted 1 ms later
    for c in range(3):
        t = 0.020 * c
        tl.call("run", t, t + 0.0005, t + 0.0105, t + 0.011)
        if c < 2:
            tl.call("prepare", t + 0.0115, t + 0.0125, t + 0.0155, t + 0.016)
            tl.reply(t + 0.012)
            tl.reply(t + 0.0165)                     # the last reply of the stage
    tl.call("run", 0.07, 0.0701, 0.071, 0.0711)      # a hand-in: no reply before it, not a decode cycle
    s = tl.summary()
    assert s["stages"] == 4 and s["replies"] == 4 and s["decode_cycles"] == 2
    want = {"stage_ms": 10.0, "prepare_ms": 3.0, "to_worker_ms": 1.0, "round_trip_ms": 6.0,
            "after_reply_ms": 3.5, "cycle_ms": 20.0, "exposed_ms": 7.0}
    for k, v in want.items():
        assert s[k] == pytest.approx(v, abs=1e-6), k
    assert Timeline().summary()["cycle_ms"] is None       # nothing recorded: no figures, no error


def test_summary_splits_a_tokens_turn_through_the_devices():
    tl = Timeline()
    # three tokens of 100 ms: the stage that hands off ends at 10 ms, its hand-offs queued
    # then; the devices' hand-ins at 14 and 18 ms; the next stage submitted at 18.5 ms
    for k in range(3):
        t = 0.100 * k
        tl.call("run", t, t + 0.001, t + 0.010, t + 0.0101)
        tl.hand_out(t + 0.0101)
        tl.hand_in(t + 0.014)
        tl.hand_in(t + 0.018)
        tl.call("run", t + 0.0185, t + 0.019, t + 0.021, t + 0.0211)
    s = tl.summary()
    assert s["hand_outs"] == 3
    assert s["hand_off_ms"] == pytest.approx(7.9, abs=1e-6)
    assert s["after_hand_in_ms"] == pytest.approx(0.5, abs=1e-6)
    assert s["token_ms"] == pytest.approx(100.0, abs=1e-6)
    assert s["loop_cpu_ms"] is None                        # not stopped: no CPU figure
    tl.stop()
    assert tl.summary()["loop_cpu_ms"] >= 0


def test_endpoint_records_every_stage_and_reply():
    bb = load_backbone("tiny")
    cfg = PrivateLoRAConfig(rank=8)
    parts = [DevicePart(bb, cfg, PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(i)) for i in range(3)]

    async def main():
        async with CloudEndpoint(build_split(cfg=cfg, backbone=bb).cloud) as ep:
            ep.timeline = Timeline()
            real = ep.cloud.run

            @functools.wraps(real)
            def counted(batch):
                runs.append(len(batch))
                return real(batch)
            ep.cloud.run = counted
            client = await Client.connect(*ep.address)
            batch = DeviceBatch()
            gens = await asyncio.gather(*[run_remote(client, p, [3 + i, 9, 27, 5], SamplingParams(max_new_tokens=6),
                                                     batch=batch, timeout=30.0) for i, p in enumerate(parts)])
            await client.close()
            return gens, ep.stats(), ep.timeline.summary()
    runs = []
    gens, after, s = asyncio.run(main())
    assert all(g.error is None and len(g.tokens) == 6 for g in gens)
    assert s["stages"] == len(runs) and max(runs) >= 2      # every stage, batched ones among them
    assert s["replies"] == after["bytes"]["up"]["reply"]["frames"]
    assert s["decode_cycles"] >= 5
    for k in ("stage_ms", "prepare_ms", "to_worker_ms", "round_trip_ms", "after_reply_ms", "exposed_ms"):
        assert s[k] >= 0, k
    assert s["cycle_ms"] >= s["stage_ms"]
    # every generation handed its prompt's and 5 tokens' hand-offs in after the first hand-out
    assert s["hand_outs"] >= 6 and s["token_ms"] >= s["hand_off_ms"] > 0
