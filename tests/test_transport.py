"""Transport: multiplexed sessions, authentication, refusal accounting, garbage, TLS, bytes."""

from __future__ import annotations

import asyncio
import random
import ssl

import pytest
import torch

from privatelora import transport as tp
from privatelora import wire
from privatelora.wire import Activations, Close, Error, Geometry, Handoff, Open, Reply

G = Geometry(hidden=32, rank=4, targets=("q", "k", "v"), shared_a=True, layers=(0, 1, 2),
             dtype="fp16", max_tokens=16)


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Cloud:
    """A toy cloud: answers Reply with Activations(sum of m), Handoff with its last row(s)."""

    def __init__(self):
        self.seen: list[wire.Message] = []
        self.reject_next_open = False

    async def __call__(self, conn, msg):
        self.seen.append(msg)
        if isinstance(msg, Open) and self.reject_next_open:
            self.reject_next_open = False
            raise RuntimeError("full")
        if isinstance(msg, Reply):
            if msg.layer == 2 and msg.m[0][0, 0] == 999.5:
                raise ValueError("boom")
            await conn.send(Activations(msg.session, msg.layer, (sum(msg.m),)))
        elif isinstance(msg, Handoff):
            h = msg.hidden if msg.want_all else msg.hidden[-1:]
            await conn.send(Handoff(msg.session, msg.start, h * 2, msg.want_all), dtype="fp32")


def reply(sess, value=1.0, n=1, layer=1):
    # activations are never all integers (an all-integer row is refused as token ids by value)
    return Reply(sess.id, layer, tuple(torch.full((n, 4), (value + 0.125) * (i + 1)) for i in range(3)))


async def exchange(sess, value=1.0):
    """One layer round trip; check the cloud's answer."""
    await sess.send(reply(sess, value))
    out = await sess.recv(timeout=5)
    assert isinstance(out, Activations), out
    assert torch.allclose(out.a[0], torch.full((1, 4), 6.0 * (value + 0.125)))
    return out


async def started(handler=None, **kw):
    return await tp.Server(handler or Cloud(), **kw).start()


def test_round_trips_and_close_on_disconnect():
    async def main():
        cloud = Cloud()
        srv = await started(cloud)
        c = await tp.Client.connect(*srv.address)
        s1, s2 = await c.open(G), await c.open(G)  # two sessions, one connection
        assert len(srv.connections) == 1 and len(next(iter(srv.connections)).sessions) == 2
        await exchange(s1, 1.0)
        await exchange(s2, 2.0)
        await s1.send(Handoff(s1.id, 0, torch.randn(5, 32), False))
        h = await s1.recv(5)
        assert isinstance(h, Handoff) and h.hidden.shape == (1, 32)
        await s1.close()
        await c.close()
        for _ in range(100):
            if not srv.connections:
                break
            await asyncio.sleep(0.01)
        closes = [m.session for m in cloud.seen if isinstance(m, Close)]
        assert sorted(closes) == sorted([s1.id, s2.id])  # s2's Close was synthesised
        assert not srv._owner and not srv.refusals and not srv.disconnects
        await srv.stop()
    run(main())


def test_bad_mac_is_refused_counted_and_answered_on_the_session():
    async def main():
        srv = await started()
        c = await tp.Client.connect(*srv.address)
        s = await c.open(G)
        bad = wire.encode(reply(s), key=bytes(32), direction="up", geometry=G)
        c.send_raw(bad)
        err = await s.recv(5)
        assert isinstance(err, Error) and err.code == "bad_mac"
        assert srv.refusals["bad_mac"] == 1
        await exchange(s)  # the session still works
        # correctly signed, but not the declared [n, rank]: the schema check refuses it
        other = Geometry(32, 5, ("q", "k", "v"), True, (0, 1, 2), "fp16", 16)
        c.send_raw(wire.encode(Reply(s.id, 1, (torch.zeros(1, 5),) * 3), key=s._key,
                               direction="up", geometry=other))
        assert (await s.recv(5)).code == "bad_shape" and srv.refusals["bad_shape"] == 1
        # the cloud may also address a session by id alone
        await srv.send(Activations(s.id, 0, (torch.ones(2, 4),)))
        assert (await s.recv(5)).a[0].shape == (2, 4)
        await exchange(s)
        await c.close()
        await srv.stop()
    run(main())


def test_foreign_and_unknown_sessions_are_refused_even_with_the_key():
    async def main():
        srv = await started()
        good = await tp.Client.connect(*srv.address)
        s = await good.open(G)
        thief = await tp.Client.connect(*srv.address)
        thief.send_raw(wire.encode(reply(s), key=s._key, direction="up", geometry=G))
        err = await asyncio.wait_for(thief.errors.get(), 5)
        assert err.session == 0 and err.code == "foreign_session"
        thief.send_raw(wire.encode(Close(12345), key=bytes(32), direction="up"))
        assert (await asyncio.wait_for(thief.errors.get(), 5)).code == "unknown_session"
        # re-opening an id in use elsewhere is refused, answered under the new Open's key
        ts = tp.Session(thief, s.id, bytes(range(32)), G)
        thief._sessions[s.id] = ts
        await thief._send(Open(s.id, ts._key, G), None, None)
        assert (await ts.recv(5)).code == "session_in_use"
        assert srv.refusals == {"foreign_session": 1, "unknown_session": 1, "session_in_use": 1}
        await exchange(s)
        await good.close()
        await thief.close()
        await srv.stop()
    run(main())


def test_garbage_on_one_connection_does_not_disturb_other_sessions():
    async def main():
        srv = await started()
        good = await tp.Client.connect(*srv.address)
        s1, s2 = await good.open(G), await good.open(G)
        rng = random.Random(0)
        valid = wire.encode(reply(s1), key=s1._key, direction="up", geometry=G)
        # same connection, another session: a forged frame for s2 and a mutated one
        good.send_raw(wire.encode(reply(s2), key=bytes(32), direction="up", geometry=G))
        mutated = bytearray(wire.encode(reply(s2), key=s2._key, direction="up", geometry=G))
        mutated[30] ^= 0xFF
        good.send_raw(bytes(mutated))
        assert (await s2.recv(5)).code == "bad_mac"
        assert (await s2.recv(5)).code == "bad_mac"
        await exchange(s1)
        # other connections: random garbage, mutations, then an oversized length prefix
        for i in range(6):
            bad = await tp.Client.connect(*srv.address)
            if i % 3 == 0:
                junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            elif i % 3 == 1:
                b = bytearray(valid)
                for _ in range(3):
                    b[rng.randrange(len(b))] = rng.randrange(256)
                junk = bytes(b)
            else:
                junk = b"\xff\xff\xff\xff" + bytes(64)
            bad.send_raw(junk)
            await exchange(s1, 1.0 + i)
            await exchange(s2, 2.0 + i)
            await bad.close()
        # a stream of refused frames closes that connection only
        noisy = await tp.Client.connect(*srv.address)
        for _ in range(tp.MAX_REFUSALS_IN_A_ROW):
            noisy.send_raw(wire.encode(Close(1), key=bytes(32), direction="up"))
        for _ in range(200):
            if srv.disconnects["garbage"]:
                break
            await asyncio.sleep(0.01)
        assert srv.disconnects["garbage"] == 1
        await exchange(s1)
        assert srv.refusals["bad_mac"] == 2 and srv.disconnects["too_large"] >= 2
        assert srv.refusals["unknown_session"] == tp.MAX_REFUSALS_IN_A_ROW
        await good.close()
        await noisy.close()
        await srv.stop()
    run(main())


def test_handler_errors_and_rejections_do_not_kill_the_server():
    async def main():
        cloud = Cloud()
        srv = await started(cloud)
        c = await tp.Client.connect(*srv.address)
        cloud.reject_next_open = True
        with pytest.raises(tp.RemoteError) as e:
            await c.open(G)
        assert e.value.code == "rejected"
        s = await c.open(G)
        await s.send(Reply(s.id, 2, tuple(torch.full((1, 4), 999.5) for _ in range(3))))
        err = await s.recv(5)
        assert err.code == "handler_error" and srv.handler_errors["ValueError"] == 1
        await exchange(s)
        await c.close()
        await srv.stop()
    run(main())


def test_byte_accounting_agrees_on_both_ends():
    async def main():
        srv = await started()
        c = await tp.Client.connect(*srv.address)
        s = await c.open(G)
        for i in range(5):
            await exchange(s, float(i + 1))
        zeros = Reply(s.id, 0, tuple(torch.zeros(16, 4) for _ in range(3)))
        await s.send(zeros, dtype="fp16")  # compressible, but below the size worth trying
        await s.recv(5)
        await s.send(Handoff(s.id, 0, torch.zeros(16, 32), True), dtype="fp32")  # lz4 pays
        assert (await s.recv(5)).hidden.shape == (16, 32)
        conn = next(iter(srv.connections))
        assert c.stats.as_dict() == conn.stats.as_dict() == srv.stats.as_dict()
        d = c.stats.as_dict()
        assert d["up"]["reply"]["frames"] == 6 and d["down"]["activations"]["frames"] == 6
        assert d["up"]["reply"]["raw"] == 5 * 3 * 4 * 2 + 3 * 16 * 4 * 2  # fp16 elements
        assert d["up"]["handoff"]["compressed"] == 1 == d["down"]["handoff"]["compressed"]
        assert d["up"]["handoff"]["wire"] < d["up"]["handoff"]["raw"]
        assert d["up"]["open"]["frames"] == 1 and d["down"]["opened"]["frames"] == 1
        await c.close()
        await srv.stop()
    run(main())


def test_tls_on_loopback_with_a_self_signed_certificate(tmp_path):
    cert, key = tp.make_self_signed(tmp_path)

    async def main():
        srv = await started(cert=cert, key=key)
        c = await tp.Client.connect("127.0.0.1", srv.port, ca=cert)
        await exchange(await c.open(G))
        await c.close()
        with pytest.raises(ssl.SSLError):  # a client that does not trust the cert cannot connect
            await tp.Client.connect("127.0.0.1", srv.port, ssl_context=tp.client_ssl_context())
        await srv.stop()
    run(main())


def test_tls_is_required_off_loopback(tmp_path):
    for host in ("0.0.0.0", "", "::", "10.1.2.3", "example.org"):
        with pytest.raises(tp.TLSRequiredError):
            tp.Server(Cloud(), host, 0)
    assert tp.is_loopback("127.0.0.1") and tp.is_loopback("::1") and tp.is_loopback("localhost")
    cert, key = tp.make_self_signed(tmp_path)
    tp.Server(Cloud(), "0.0.0.0", 0, cert=cert, key=key)  # with a certificate it may

    async def main():
        with pytest.raises(tp.TLSRequiredError):
            await tp.Client.connect("10.1.2.3", 9)
    run(main())
