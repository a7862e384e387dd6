"""Link emulation: profiles, the pipe model, prediction, and real-time shaping."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time

import pytest
import torch

from privatelora.transport import link
from privatelora import transport as tp, wire
from privatelora.wire import Activations, Geometry, Handoff, Reply

G = Geometry(hidden=512, rank=8, targets=("q", "k", "v"), shared_a=True, layers=(0,),
             dtype="fp32", max_tokens=256)


def test_profiles():
    p = link.get_profile("5g")
    assert (p.up_bps, p.down_bps, p.latency_s) == (60e6, 100e6, 0.020)
    assert not link.get_profile("loopback").shaped and all(
        link.get_profile(n).shaped for n in ("lan", "wifi", "5g", "4g"))
    with pytest.raises(ValueError, match="known: loopback"):
        link.get_profile("6g")
    with pytest.raises(ValueError):
        link.LinkProfile(0, 1, 0)


def test_pipe_model_serializes_and_never_reorders():
    m = link.PipeModel(8e6, 0.010)  # 1 byte per microsecond
    assert m.schedule(0.0, 1000) == pytest.approx(0.011)
    assert m.schedule(0.0, 1000) == pytest.approx(0.012)  # waits for the first to leave
    assert m.schedule(0.0, 10, jitter=0.0) >= 0.012
    late = link.PipeModel(8e6, 0.0)
    a = late.schedule(0.0, 0, jitter=0.005)
    assert late.schedule(0.0, 0, jitter=0.0) == a  # a later frame never overtakes


def test_predict_time():
    p = link.get_profile("5g")
    frames = [("up", 1000), ("down", 1000)]
    want = 1000 * 8 / 60e6 + 1000 * 8 / 100e6 + 0.020 + p.jitter_s
    assert link.predict_time(p, frames) == pytest.approx(want)
    assert link.predict_time(p, frames, compute_s=0.003) == pytest.approx(want + 0.003)
    both = link.predict_time(p, [("up", 6000), ("up", 6000)], chained=False)
    assert both == pytest.approx(2 * 6000 * 8 / 60e6 + 0.010 + p.jitter_s / 2)
    assert link.predict_time("loopback", frames) == 0.0


async def _median_rtt(sess, msg, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await sess.send(msg)
        await sess.recv(10)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def _cloud(conn, msg):
    if isinstance(msg, Reply):
        await conn.send(Activations(msg.session, msg.layer, (msg.m[0],)))
    elif isinstance(msg, Handoff):
        await conn.send(Handoff(msg.session, msg.start, msg.hidden[-1:], False))


def test_5g_round_trip_and_bandwidth_in_real_time():
    async def main():
        srv = await tp.Server(_cloud).start()
        c = await tp.Client.connect(*srv.address, link="5g", seed=0)
        assert c._shaper is not None
        s = await c.open(G)
        small = Reply(s.id, 0, tuple(torch.randn(1, 8) for _ in range(3)))
        rtt = await _median_rtt(s, small, 7)
        assert 0.015 <= rtt <= 0.040, rtt
        big = Handoff(s.id, 0, torch.randn(256, 512), False)  # ~512 KiB: ~70 ms at 60 Mbit/s
        nbytes = len(wire.encode(big, key=s._key, direction="up", geometry=G))
        t_big = await _median_rtt(s, big, 3)
        transfer = t_big - rtt
        expected = nbytes * 8 / 60e6
        assert abs(transfer - expected) <= 0.2 * expected, (transfer, expected)
        await c.close()
        await srv.stop()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_loopback_profile_is_not_shaped():
    async def main():
        srv = await tp.Server(_cloud).start()
        c = await tp.Client.connect(*srv.address, link="loopback")
        assert c._shaper is None
        s = await c.open(G)
        rtt = await _median_rtt(s, Reply(s.id, 0, tuple(torch.randn(1, 8) for _ in range(3))), 5)
        assert rtt < 0.010
        await c.close()
        await srv.stop()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_live_pipe_delivers_in_order_at_the_modelled_times():
    async def main():
        loop = asyncio.get_running_loop()
        got = []
        pipe = link.Pipe(8e6, 0.005, 0.004, lambda f: got.append((loop.time(), f)),
                         random.Random(1))
        t0 = loop.time()
        for i in range(5):
            pipe.put(bytes([i]) * 2000)  # 2 ms each on the wire
        await pipe.flush()
        assert [f[0] for _, f in got] == [0, 1, 2, 3, 4]
        first, last = got[0][0] - t0, got[-1][0] - t0
        assert 0.007 - 0.001 <= first <= 0.007 + 0.004 + 0.005
        assert last >= 5 * 0.002 + 0.005 - 0.001
        pipe.close()
    asyncio.run(main())
    assert math.isinf(link.get_profile("loopback").up_bps)
