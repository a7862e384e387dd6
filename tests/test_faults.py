"""Fault isolation inside one endpoint: a failing stage, a loop that breaks, a device that
stops reading, a device process stopped mid-generation, an answer the encoder refuses,
and the bounds on open sessions. Every other user's tokens stay exactly the same."""

import asyncio
import os
import secrets
import signal
import statistics
import sys
import time

import pytest
import torch

from privatelora import wire
from privatelora.api import build_split
from privatelora.config import PrivateLoRAConfig
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.loading import load_backbone
from privatelora.model.sampling import SamplingParams
from privatelora.runtime.device import DevicePart
from privatelora.runtime.generation import Generation
from privatelora.runtime.runner import InProcessRunner
from privatelora.serving.endpoint import CloudEndpoint
from privatelora.serving.remote import run_remote
from privatelora.transport import Client, RemoteError

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = PrivateLoRAConfig()          # the defaults `privatelora edge` uses too


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def _device(bb, seed):
    return DevicePart(bb, CFG, PrivateAdapter(CFG, bb.n_layers, bb.fingerprint).randomize_(seed, scale=2.0))


def _inprocess(bb, seed, prompt, params):
    g = Generation(_device(bb, seed).session(1), prompt, params)
    InProcessRunner(build_split(cfg=CFG, backbone=bb).cloud).run([g])
    return g.tokens


def _prompt(u):
    return [3 + (7 * u + i) % 200 for i in range(5 + u)]


async def _raw_open(ep, geometry, rcvbuf=None):
    """A hand-rolled device connection with one open session (it reads only when told to)."""
    import socket
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ep.address)
    reader, writer = await asyncio.open_connection(sock=sock)
    sid, key = secrets.randbits(63), secrets.token_bytes(32)
    writer.write(wire.encode(wire.Open(sid, key, geometry), key=key, direction="up"))
    await writer.drain()
    return reader, writer, sid, key


async def _until(cond, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)


async def _read(reader, geometry, key):
    prefix = await reader.readexactly(4)
    frame = prefix + await reader.readexactly(int.from_bytes(prefix, "big"))
    return wire.decode(frame, direction="down", geometry_for=lambda s: geometry, key_for=lambda s: key)


def test_a_failing_stage_ends_only_its_session(tiny):
    """A fault injected into one session's stages: that session gets Error("stage_failed");
    the users batched with it get exactly their tokens; the loop serves new sessions."""
    params = SamplingParams(max_new_tokens=16)
    want = {u: _inprocess(tiny, u, _prompt(u), params) for u in range(3)}
    victim, mixed = set(), []

    def hook(layer, sids):
        if victim & set(sids):
            mixed.append(len(sids))
            raise RuntimeError("injected")

    async def main():
        split = build_split(cfg=CFG, backbone=tiny)
        split.cloud.fault_hook = hook
        async with CloudEndpoint(split.cloud, gather_s=0.02) as ep:
            client = await Client.connect(*ep.address)

            async def user(u):
                def mark(msg):     # user 9 turns faulty after its first answer: mid-generation
                    if u == 9:
                        victim.add(msg.session)
                return await run_remote(client, _device(tiny, u), _prompt(u), params, observe=mark)
            gens = await asyncio.gather(*[user(u) for u in (0, 1, 9, 2)])
            after = await run_remote(client, _device(tiny, 0), _prompt(0), params)
            await client.close()
            await _until(lambda: not split.cloud.sessions)
            return gens, after, ep.errors, ep.faults, split.cloud.sessions, ep.check_health()
    gens, after, errors, faults, sessions, healthy = asyncio.run(main())
    by_user = dict(zip((0, 1, 9, 2), gens))
    assert by_user[9].error is not None and by_user[9].error.code == "stage_failed"
    for u in range(3):
        assert by_user[u].error is None and by_user[u].tokens == want[u]
    assert after.tokens == want[0] and healthy is None
    assert max(mixed) > 1                  # the fault did hit a batch shared with others
    assert errors["stage_failed"] == 1 and not sessions


def test_a_broken_loop_is_retried_then_reported_unhealthy(tiny):
    async def main():
        split = build_split(cfg=CFG, backbone=tiny)
        async with CloudEndpoint(split.cloud, max_loop_failures=3) as ep:
            real, calls = ep.scheduler.next_batch, []

            def flaky(now):        # one failure: the loop goes on and serves
                calls.append(now)
                if len(calls) == 1:
                    raise RuntimeError("transient")
                return real(now)
            ep.scheduler.next_batch = flaky
            client = await Client.connect(*ep.address)
            gen = await run_remote(client, _device(tiny, 1), _prompt(1), SamplingParams(max_new_tokens=4))
            ep.check_health()
            assert gen.error is None and ep.faults["loop"] == 1

            def broken(now):
                raise RuntimeError("for good")
            ep.scheduler.next_batch = broken
            ep._wake.set()
            for _ in range(100):
                if ep.failure:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(RuntimeError, match="stage loop stopped: 3 failures in a row"):
                ep.check_health()
            await client.close()
    asyncio.run(main())


def test_a_device_that_stops_reading_is_cut_off_and_costs_others_nothing(tiny):
    """A raw device keeps asking for large hand-offs and never reads: it is disconnected
    once its socket does not drain for the send deadline, its cache is freed, and an honest
    user's 64 tokens take no longer than alone plus that deadline."""
    params = SamplingParams(max_new_tokens=64)
    want = _inprocess(tiny, 4, _prompt(4), params)
    deadline = 2.0

    async def main():
        split = build_split(cfg=CFG, backbone=tiny)
        async with CloudEndpoint(split.cloud, send_timeout_s=deadline, max_pending_write=64 << 20) as ep:
            client = await Client.connect(*ep.address)
            t0 = time.perf_counter()
            alone = await run_remote(client, _device(tiny, 4), _prompt(4), params)
            alone_s = time.perf_counter() - t0
            g = wire.session_geometry(split.cloud.exchange_ids, tiny.config.hidden_size, CFG, "fp32")
            reader, writer, sid, key = await _raw_open(ep, g, rcvbuf=4096)
            await _until(lambda: sid in split.cloud.sessions)
            n = 512                # each round: a 512 KiB hand-off comes back, never read

            def waits_on(layer):   # the device never reads its activations: it watches the cloud instead
                s = split.cloud.sessions.get(sid)
                return s is None or (s.pending is not None and s.pending.layer == layer and s.pending.normed is not None)

            async def flood():
                zero = tuple(torch.zeros(n, g.rank) for _ in g.targets)
                try:
                    for _ in range(400):
                        writer.write(wire.encode(wire.Handoff(sid, 0, torch.randn(n, g.hidden), True), key=key,
                                                 direction="up", geometry=g))
                        for layer in g.layers:
                            await _until(lambda: waits_on(layer))
                            writer.write(wire.encode(wire.Reply(sid, layer, zero), key=key, direction="up", geometry=g))
                        await _until(lambda: sid not in split.cloud.sessions or split.cloud.sessions[sid].pending is None)
                        await asyncio.wait_for(writer.drain(), 5)
                        conn = ep.server.owner(sid)
                        if conn is None or conn._writer.transport.get_write_buffer_size() > 1 << 20:
                            return         # the socket is full: the cloud's sends to it are stuck
                except (ConnectionError, asyncio.TimeoutError):
                    return
            await flood()
            stuck = ep.server.owner(sid) is not None
            t0 = time.perf_counter()
            during = await run_remote(client, _device(tiny, 4), _prompt(4), params)
            during_s = time.perf_counter() - t0
            for _ in range(200):
                if sid not in split.cloud.sessions:
                    break
                await asyncio.sleep(0.05)
            writer.close()
            await client.close()
            return alone, alone_s, during, during_s, dict(ep.server.disconnects), sid in split.cloud.sessions, stuck
    alone, alone_s, during, during_s, disconnects, still_held, stuck = asyncio.run(main())
    print({"alone_s": alone_s, "with_a_peer_that_stops_reading_s": during_s, "disconnects": disconnects})
    assert stuck                           # the honest user ran while the cloud could not send to the other
    assert alone.tokens == want and during.tokens == want
    assert disconnects.get("send_timeout", 0) == 1, disconnects
    assert not still_held
    assert during_s <= 1.5 * alone_s + deadline, (alone_s, during_s)


def test_a_stopped_device_process_costs_others_at_most_one_gathering_bound(tiny):
    """A device process (`privatelora edge`) stopped with SIGSTOP mid-generation: another
    user's 64 tokens on the same replica take at most 1.5x its time alone plus one
    gathering bound (medians of 3, measured in one run)."""
    params = SamplingParams(max_new_tokens=64)
    want = _inprocess(tiny, 5, _prompt(5), params)
    gather = 0.05

    async def timed(client):
        t0 = time.perf_counter()
        g = await run_remote(client, _device(tiny, 5), _prompt(5), params)
        assert g.tokens == want
        return time.perf_counter() - t0

    async def main():
        split = build_split(cfg=CFG, backbone=tiny)
        async with CloudEndpoint(split.cloud, gather_s=gather) as ep:
            client = await Client.connect(*ep.address)
            await timed(client)                                    # warm-up
            alone = [await timed(client) for _ in range(3)]
            await _until(lambda: not split.cloud.sessions)
            base = ep.scheduler.stats.batches
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "privatelora.cli", "edge", "--connect", "%s:%d" % ep.address,
                "--prompt-ids", "5,6,7,8", "--max-new-tokens", "500", "--json",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            try:
                for _ in range(3000):                              # until it is generating
                    if ep.scheduler.stats.batches > base + 50:      # 10 tokens in
                        break
                    await asyncio.sleep(0.01)
                os.kill(proc.pid, signal.SIGSTOP)
                await asyncio.sleep(0.2)
                assert proc.returncode is None and ep.scheduler.open_sessions == 1   # stopped mid-generation
                stopped = [await timed(client) for _ in range(3)]
                excused = ep.scheduler.excused
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
            await client.close()
            return alone, stopped, excused
    alone, stopped, excused = asyncio.run(main())
    assert excused == 1                    # the stopped device was left out, not waited for
    a, s = statistics.median(alone), statistics.median(stopped)
    print({"alone_s": alone, "with_stopped_device_s": stopped, "ratio": s / a})
    assert s <= 1.5 * a + gather, (alone, stopped)


def test_an_answer_the_encoder_refuses_reaches_the_device_as_an_error(tiny):
    """fp16 session whose replies blow the residual stream past fp16's range: the hand-off
    back cannot be encoded, and the device gets Error("encode_failed") within a second."""
    async def main():
        split = build_split(cfg=CFG, backbone=tiny)
        async with CloudEndpoint(split.cloud) as ep:
            g = wire.session_geometry(split.cloud.exchange_ids, tiny.config.hidden_size, CFG, "fp16")
            reader, writer, sid, key = await _raw_open(ep, g)
            assert isinstance(await _read(reader, g, key), wire.Opened)
            writer.write(wire.encode(wire.Handoff(sid, 0, torch.randn(2, g.hidden)), key=key, direction="up",
                                     geometry=g, dtype="fp16"))
            while True:
                msg = await asyncio.wait_for(_read(reader, g, key), 10)
                if not isinstance(msg, wire.Activations):
                    break
                huge = tuple(torch.full((2, g.rank), 6e4) for _ in g.targets)
                writer.write(wire.encode(wire.Reply(sid, msg.layer, huge), key=key, direction="up", geometry=g))
                sent = time.perf_counter()
            waited = time.perf_counter() - sent
            writer.close()
            for _ in range(40):
                if sid not in split.cloud.sessions:
                    break
                await asyncio.sleep(0.05)
            return msg, waited, ep.faults, sid in split.cloud.sessions
    msg, waited, faults, held = asyncio.run(main())
    assert isinstance(msg, wire.Error) and msg.code == "encode_failed", msg
    assert "non_finite" in msg.reason and waited < 1.0
    assert faults["encode"] == 1 and not held


def test_open_sessions_are_bounded_and_opening_never_waits_for_a_stage(tiny):
    async def main():
        split = build_split(cfg=CFG, backbone=tiny)
        slow = []

        def hook(layer, sids):      # every stage takes a second
            slow.append(layer)
            time.sleep(1.0)
        async with CloudEndpoint(split.cloud, max_open=3, max_open_per_connection=2) as ep:
            g = wire.session_geometry(split.cloud.exchange_ids, tiny.config.hidden_size, CFG, "fp32")
            a = await Client.connect(*ep.address)
            b = await Client.connect(*ep.address)
            s1, _ = await a.open(g), await a.open(g)
            with pytest.raises(RemoteError, match="too_many_sessions: a connection may hold 2"):
                await a.open(g)
            s3 = await b.open(g)
            with pytest.raises(RemoteError, match="too_many_sessions: this replica holds 3"):
                await b.open(g)
            await s3.close()
            split.cloud.fault_hook = hook
            await s1.send(wire.Handoff(s1.id, 0, torch.randn(3, g.hidden)))
            await _until(lambda: slow)
            t0 = time.perf_counter()
            for _ in range(50):    # the slot s3 freed comes back once the loop gets to it
                try:
                    await b.open(g)
                    break
                except RemoteError:
                    await asyncio.sleep(0.01)
            open_s = time.perf_counter() - t0
            stage_running = len(slow) == 1
            await a.close()
            await b.close()
            return open_s, stage_running
    open_s, stage_running = asyncio.run(main())
    assert open_s < 0.5 and stage_running


def test_idle_and_silent_sessions_are_reclaimed_under_separate_reasons(tiny):
    async def main():
        split = build_split(cfg=CFG, backbone=tiny)
        async with CloudEndpoint(split.cloud, idle_timeout_s=0.5) as ep:
            g = wire.session_geometry(split.cloud.exchange_ids, tiny.config.hidden_size, CFG, "fp32")
            c = await Client.connect(*ep.address)
            await c.open(g)                                 # opens, then thinks (owes nothing)
            silent = await c.open(g)                        # gets activations and never answers
            await silent.send(wire.Handoff(silent.id, 0, torch.randn(2, g.hidden)))
            assert isinstance(await silent.recv(5), wire.Activations)
            for _ in range(100):
                if not split.cloud.sessions:
                    break
                await asyncio.sleep(0.05)
            await c.close()
            return dict(ep.errors), dict(split.cloud.sessions)
    errors, sessions = asyncio.run(main())
    assert errors == {"idle_timeout": 1, "silent_device": 1} and not sessions


def test_a_replica_reports_its_health_and_removes_its_tls_key_on_stop():
    from privatelora.actors.backbone import NOT_STARTED, BackboneReplica

    async def main():
        r = BackboneReplica(0, "tiny", CFG.to_dict(), host="0.0.0.0")      # off loopback: TLS
        with pytest.raises(RuntimeError, match=NOT_STARTED):
            await r.check_health()
        info = await r.start()
        tls_dir = r.tls_dir
        assert info["cert_pem"] and os.path.exists(os.path.join(tls_dir, "key.pem"))
        await r.check_health()
        with pytest.raises(RuntimeError, match="already started"):
            await r.start()
        await r.stop()
        return tls_dir
    tls_dir = asyncio.run(main())
    assert not os.path.exists(tls_dir)
