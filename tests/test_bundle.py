"""Bundle frames (``wire/bundle.py``): many sessions' Activations or Replies in one frame.

- Each entry decodes to exactly what its own frame decodes to, for every wire dtype, mixed
  row counts and both directions; the entries' byte shares add up to the frame, and their
  raw bytes are the frames'.
- A refusal is its entry's alone: encoding (NaN, a private tensor or private values, a
  wrong layer) and decoding (a forged entry, an unknown session, a wrong shape).
- Whatever the bytes, reading a bundle raises nothing but ``WireError``.
- Over TCP: the client's ``answer_many`` sends one bundle, the server hands each reply to
  the application, refuses a forged entry alone, and then bundles its activations for that
  connection (and only for a connection that has sent one).
"""

from __future__ import annotations

import asyncio
import random
import struct

import pytest
import torch

from privatelora import transport as tp
from privatelora import wire
from privatelora.privacy import mark_private, register_private_matrix
from privatelora.wire import Activations, Error, Geometry, Reply
from privatelora.wire.bundle import ENTRY, FIXED, bundle_records

G = Geometry(hidden=64, rank=8, targets=("q", "k", "v"), shared_a=False, layers=(0, 2, 5), dtype="fp32",
             max_tokens=32)


def keys(n):
    return {s: bytes([s]) * 32 for s in range(1, n + 1)}


def msgs(cls, n, rows=(1,), g=G, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [cls(s, g.layers[s % len(g.layers)], tuple(torch.randn(rows[s % len(rows)], g.rank, generator=gen) + 0.01
                                                    for _ in range(3)))
            for s in range(1, n + 1)]


def with_dtype(dtype):
    return Geometry(G.hidden, G.rank, G.targets, G.shared_a, G.layers, dtype, G.max_tokens)


def resign(frame: bytes) -> bytes:
    """Re-sign the frame's own tag (the connection key): only entries' tags can then object."""
    signed = frame[4:-wire.TAG_LEN]
    return frame[:4] + signed + wire.frames.mac_tag(wire.CONNECTION_KEY, signed)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_entries_decode_to_what_their_frames_decode_to(dtype, direction):
    g, ks = with_dtype(dtype), keys(5)
    cls = Reply if direction == "up" else Activations
    ms = msgs(cls, 5, rows=(1, 4, 1), g=g)                         # decode rows and a prefill's
    frame, infos = wire.encode_bundle([(m, ks[m.session], g) for m in ms], direction=direction)
    assert frame is not None and sum(i.wire_bytes for i in infos) == len(frame)
    entries = wire.decode_bundle(frame, direction=direction, key_for=ks.get, geometry_for=lambda s: g)
    assert [s for s, _, _ in entries] == [m.session for m in ms]
    for (s, got, info), m, sent in zip(entries, ms, infos):
        alone, alone_info = wire.encode_frame(m, key=ks[s], direction=direction, geometry=g)
        want, _ = wire.decode_frame(alone, direction=direction, key_for=ks.get, geometry_for=lambda s: g)
        assert type(got) is cls and got.layer == m.layer
        field = "m" if direction == "up" else "a"
        assert all(torch.equal(a, b) for a, b in zip(getattr(got, field), getattr(want, field)))
        assert info.kind == sent.kind == alone_info.kind and info.raw_bytes == sent.raw_bytes == alone_info.raw_bytes
        assert info.wire_bytes == sent.wire_bytes
    assert wire.frame_info(frame).raw_bytes == sum(i.raw_bytes for i in infos)
    payloads = [sum(len(x) for x in rec[4:]) for _, _, rec in bundle_records(frame)]
    shares = [wire.BUNDLE_ENTRY_LEN + p for p in payloads]
    shares[0] += FIXED                                            # the bundle's own bytes, on its first entry
    assert [i.wire_bytes for i in infos] == shares


def test_replies_that_are_views_of_one_buffer_are_checked_for_private_values_each_alone():
    # an edge host answers a stage in one product: its replies are views of one tensor,
    # whose rows the encoder checks for private values at once, and entry by entry only
    # when one of them carries some
    ks = keys(4)
    secret = torch.randn(8, 8)
    register_private_matrix(secret, "M")
    out = torch.randn(12, 1, 8) + 0.01
    views = out.unbind(0)
    ms = [Reply(s, 2, views[3 * (s - 1):3 * s]) for s in range(1, 5)]
    frame, infos = wire.encode_bundle([(m, ks[m.session], G) for m in ms], direction="up")
    assert all(isinstance(i, wire.FrameInfo) for i in infos)
    out[7, 0] = secret[:, 5]                       # session 3's second reply: a column of M
    frame, infos = wire.encode_bundle([(m, ks[m.session], G) for m in ms], direction="up")
    assert [getattr(i, "code", None) for i in infos] == [None, None, "private_value", None]
    got = wire.decode_bundle(frame, direction="up", key_for=ks.get, geometry_for=lambda s: G)
    assert [s for s, m, _ in got] == [1, 2, 4]
    for s, m, _ in got:
        assert all(torch.equal(a, b) for a, b in zip(m.m, ms[s - 1].m))


def test_an_encoder_refusal_is_its_entrys_alone():
    ks = keys(6)
    ms = msgs(Reply, 6)
    secret = torch.randn(8, 8)
    register_private_matrix(secret, "M")
    ms[1] = Reply(2, ms[1].layer, (ms[1].m[0], torch.full((1, 8), float("nan")), ms[1].m[2]))
    ms[2] = Reply(3, ms[2].layer, (mark_private(torch.randn(1, 8)),) + ms[2].m[1:])
    ms[3] = Reply(4, ms[3].layer, (secret[1:2].clone(),) + ms[3].m[1:])       # M's row, another object
    ms[4] = Reply(5, 3, ms[4].m)                                                # not a declared layer
    frame, infos = wire.encode_bundle([(m, ks[m.session], G) for m in ms], direction="up")
    codes = [getattr(i, "code", None) for i in infos]
    assert codes == [None, "non_finite", "private_tensor", "private_value", "bad_layer", None]
    assert all(isinstance(i, wire.PrivacyError) for i in infos[2:5])
    for m in ms[1:5]:                     # each refused alone by the ordinary encoder as well
        with pytest.raises(wire.WireError):
            wire.encode_frame(m, key=ks[m.session], direction="up", geometry=G)
    got = wire.decode_bundle(frame, direction="up", key_for=ks.get, geometry_for=lambda s: G)
    assert [s for s, m, _ in got if not isinstance(m, wire.WireError)] == [1, 6]
    assert len(frame) == sum(i.wire_bytes for i in infos if isinstance(i, wire.FrameInfo))
    nothing, infos = wire.encode_bundle([(ms[1], ks[2], G)], direction="up")
    assert nothing is None and infos[0].code == "non_finite"


def test_a_decoder_refusal_is_its_entrys_alone():
    ks = keys(4)
    ms = msgs(Activations, 4)
    frame, _ = wire.encode_bundle([(m, ks[m.session], G) for m in ms], direction="down")
    recs = bundle_records(frame)
    # flip one payload byte of entry 2 (its tag now fails), re-sign the frame itself
    start = 4 + wire.HEADER.size + 4 + 4 * wire.BUNDLE_ENTRY_LEN + sum(len(r[2][4]) for r in recs[:1])
    forged = bytearray(frame)
    forged[start + 3] ^= 0x40
    got = wire.decode_bundle(resign(bytes(forged)), direction="down", key_for=ks.get, geometry_for=lambda s: G)
    assert [getattr(m, "code", "ok") for _, m, _ in got] == ["ok", "bad_mac", "ok", "ok"]
    assert got[1][2].kind == "refused"
    # without re-signing, the frame's own tag refuses it whole
    with pytest.raises(wire.AuthError):
        wire.decode_bundle(bytes(forged), direction="down", key_for=ks.get, geometry_for=lambda s: G)
    # a session this side has no key for, and one whose geometry differs
    narrow = Geometry(G.hidden, 4, G.targets, G.shared_a, G.layers, G.dtype, G.max_tokens)
    got = wire.decode_bundle(frame, direction="down", key_for=lambda s: None if s == 1 else ks[s],
                             geometry_for=lambda s: narrow if s == 3 else G)
    assert [getattr(m, "code", "ok") for _, m, _ in got] == ["unknown_session", "ok", "bad_shape", "ok"]
    # the wrong direction, and kinds that are not bundles, are refused whole
    with pytest.raises(wire.FrameError):
        wire.decode_bundle(frame, direction="up", key_for=ks.get, geometry_for=lambda s: G)
    alone = wire.encode(ms[0], key=ks[1], direction="down", geometry=G)
    with pytest.raises(wire.FrameError, match="not a bundle"):
        wire.decode_bundle(alone, direction="down", key_for=ks.get, geometry_for=lambda s: G)
    with pytest.raises(wire.FrameError, match="decode_bundle"):
        wire.decode_frame(frame, direction="down", key_for=ks.get, geometry_for=lambda s: G)


def test_any_bytes_raise_only_wire_errors():
    ks = keys(3)
    rng = random.Random(7)
    frame, _ = wire.encode_bundle([(m, ks[m.session], G) for m in msgs(Reply, 3, rows=(1, 2))], direction="up")
    head = 4 + wire.HEADER.size
    for i in range(600):
        b = bytearray(frame)
        how = i % 4
        if how == 0:                        # flip bytes of the table and payloads
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(head, len(b) - wire.TAG_LEN)] ^= 1 << rng.randrange(8)
        elif how == 1:                      # a table entry's numbers set to anything
            e = head + 4 + rng.randrange(3) * wire.BUNDLE_ENTRY_LEN
            b[e:e + ENTRY.size] = ENTRY.pack(rng.getrandbits(64), rng.randrange(256), rng.randrange(256),
                                            rng.randrange(256), rng.randrange(2), rng.randrange(65536),
                                            rng.getrandbits(32), rng.randrange(65536))
        elif how == 2:                      # the count set to anything
            b[head:head + 4] = struct.pack(">HH", rng.randrange(65536), rng.randrange(2))
        else:                               # cut or extended
            b = b[:rng.randrange(len(b))] if rng.random() < 0.5 else b[:-wire.TAG_LEN] + bytes(rng.randrange(1, 90)) \
                + b[-wire.TAG_LEN:]
            b[:4] = struct.pack(">I", len(b) - 4)
        data = resign(bytes(b)) if rng.random() < 0.9 else bytes(b)
        for read in (lambda: wire.decode_bundle(data, direction="up", key_for=ks.get, geometry_for=lambda s: G),
                     lambda: bundle_records(data), lambda: wire.frame_info(data)):
            try:
                out = read()
            except wire.WireError as e:
                assert e.code != "internal", e
                continue
            if isinstance(out, list) and out and len(out[0]) == 3 and isinstance(out[0][2], wire.FrameInfo):
                for _, m, _ in out:              # what was accepted is well-formed
                    assert isinstance(m, wire.WireError) or (type(m) is Reply and all(
                        t.shape[1] == G.rank and torch.isfinite(t).all() for t in m.m))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_non_finite_entry_inside_a_run_of_one_shape_is_refused_alone(dtype):
    """Entries of one dtype and shape are read in one conversion: a NaN in one of them
    (signed by its own key, as a device could send) refuses that entry only."""
    from privatelora.wire.bundle import _entry_mac
    g, ks = with_dtype(dtype), keys(5)
    ms = msgs(Reply, 5, g=g)
    frame, _ = wire.encode_bundle([(m, ks[m.session], g) for m in ms], direction="up")
    table = 4 + wire.HEADER.size + 4
    size = len(bundle_records(frame)[0][2][4])
    at = table + 5 * wire.BUNDLE_ENTRY_LEN + 2 * size               # entry 2's payload
    forged = bytearray(frame)
    nan = b"\xc0\x7f" if dtype == "bf16" else struct.pack("<f", float("nan"))
    forged[at + 4:at + 4 + len(nan)] = nan                          # one value of entry 2
    fixed = bytes(forged[table + 2 * wire.BUNDLE_ENTRY_LEN:table + 2 * wire.BUNDLE_ENTRY_LEN + ENTRY.size])
    tag = _entry_mac(ks[3], 0, fixed, bytes(forged[at:at + size]))
    forged[table + 2 * wire.BUNDLE_ENTRY_LEN + ENTRY.size:table + 3 * wire.BUNDLE_ENTRY_LEN] = tag
    got = wire.decode_bundle(resign(bytes(forged)), direction="up", key_for=ks.get, geometry_for=lambda s: g)
    assert [getattr(m, "code", "ok") for _, m, _ in got] == ["ok", "ok", "non_finite", "ok", "ok"]
    assert got[2][2].kind == "refused"
    for (s, m, info), sent in zip(got, ms):
        if s == 3:
            continue
        alone = wire.encode(sent, key=ks[s], direction="up", geometry=g)
        want, want_info = wire.decode_frame(alone, direction="up", key_for=ks.get, geometry_for=lambda s: g)
        assert all(torch.equal(a, b) for a, b in zip(m.m, want.m)) and info.raw_bytes == want_info.raw_bytes


def test_audits_read_bundles_entry_by_entry():
    from placement.checks import audit_frames
    ks = keys(3)
    secret = torch.randn(8, 8) + 0.5
    ms = msgs(Reply, 3)
    frame, _ = wire.encode_bundle([(m, ks[m.session], G) for m in ms], direction="up")
    assert audit_frames([frame], hidden=G.hidden, rank=G.rank, private=[secret]) == []
    # bytes the encoder would have refused (M's row in entry 1), built as a forger would
    leaky = bytearray(frame)
    start = 4 + wire.HEADER.size + 4 + 3 * wire.BUNDLE_ENTRY_LEN + 96
    leaky[start:start + 32] = secret[2].numpy().astype("<f4").tobytes()
    bad = audit_frames([resign(bytes(leaky))], hidden=G.hidden, rank=G.rank, private=[secret])
    assert len(bad) == 1 and "entry 1" in bad[0] and "equals" in bad[0], bad
    down, _ = wire.encode_bundle([(m, ks[m.session], G) for m in msgs(Activations, 2)], direction="down")
    assert any("not allowed up" in b for b in audit_frames([down], hidden=G.hidden, rank=G.rank))


# ---------------------------------------------------------------- over TCP
class Echo:
    """Answers every Reply with Activations (sum of m), in one send_many per burst of replies."""

    def __init__(self):
        self.seen, self.server = [], None

    async def __call__(self, conn, msg):
        self.seen.append(msg)
        if isinstance(msg, Reply):
            self.server.send_many([(Activations(msg.session, msg.layer, (sum(msg.m),) * 3), None)])


def test_bundles_over_tcp_both_ways_and_a_forged_entry_refused_alone(monkeypatch):
    down = []
    real = tp.Client._on_bundle

    def counting(self, frame):
        down.append(len(frame))
        return real(self, frame)
    monkeypatch.setattr(tp.Client, "_on_bundle", counting)

    async def main():
        app = Echo()
        srv = await tp.Server(app).start()
        app.server = srv
        c = await tp.Client.connect(*srv.address)
        ss = [await c.open(G) for _ in range(3)]
        conn = next(iter(srv.connections))
        # until the peer sends a bundle, activations go as frames
        srv.send_many([(m, None) for m in (Activations(s.id, 0, (torch.ones(1, 8),) * 3) for s in ss)])
        assert [type(await s.recv(5)) for s in ss] == [Activations] * 3 and not down and not conn.bundles
        reps = [Reply(s.id, 2, tuple(torch.full((1, 8), 0.25 * (i + 1)) for _ in range(3))) for i, s in enumerate(ss)]
        assert all(isinstance(r, wire.FrameInfo) for r in c.answer_many(reps))
        for i, s in enumerate(ss):
            got = await s.recv(5)
            assert isinstance(got, Activations) and torch.allclose(got.a[0], torch.full((1, 8), 0.75 * (i + 1)))
        assert conn.bundles and [type(m) for m in app.seen if isinstance(m, Reply)] == [Reply] * 3
        # a stage's activations for this connection now travel in one bundle
        srv.send_many([(Activations(s.id, 5, (torch.ones(1, 8),) * 3), None) for s in ss])
        assert [type(await s.recv(5)) for s in ss] == [Activations] * 3 and len(down) == 1
        # an entry forged for session 2: refused on that session, the others handled
        frame, _ = wire.encode_bundle([(r, s._key, G) for r, s in zip(reps, ss)], direction="up")
        forged = bytearray(frame)
        forged[4 + wire.HEADER.size + 4 + 3 * wire.BUNDLE_ENTRY_LEN + 96 + 5] ^= 1   # the second entry's payload
        c.send_raw(resign(bytes(forged)))
        first, third = await ss[0].recv(5), await ss[2].recv(5)
        assert isinstance(first, Activations) and isinstance(third, Activations)
        err = await ss[1].recv(5)
        assert isinstance(err, Error) and err.code == "bad_mac" and srv.refusals["bad_mac"] == 1
        # an unknown client answer: refused before anything is sent
        out = c.answer_many([reps[0], Reply(12345, 2, reps[0].m)])
        assert isinstance(out[0], wire.FrameInfo) and out[1].code == "unknown_session"
        assert isinstance(await ss[0].recv(5), Activations)
        await c.close()
        await srv.stop()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_bundle_over_the_frame_limit_goes_as_frames():
    async def main():
        app = Echo()
        srv = await tp.Server(app).start()
        app.server = srv
        c = await tp.Client.connect(*srv.address, max_frame=300)    # one reply fits, three in one frame do not
        ss = [await c.open(G) for _ in range(3)]
        reps = [Reply(s.id, 2, tuple(torch.full((1, 8), 0.25 * (i + 1)) for _ in range(3))) for i, s in enumerate(ss)]
        assert all(isinstance(r, wire.FrameInfo) for r in c.answer_many(reps))
        assert [type(await s.recv(5)) for s in ss] == [Activations] * 3
        assert not next(iter(srv.connections)).bundles          # it never received one
        assert c.stats.up["reply"].frames == 3
        await c.close()
        await srv.stop()
    asyncio.run(asyncio.wait_for(main(), 30))



def test_a_bundles_accounting_summed_by_kind_equals_adding_each_entry():
    from privatelora.transport.stats import ByteStats
    infos = [wire.FrameInfo("reply", 96, 132 + i, False) for i in range(5)] + \
        [wire.FrameInfo("refused", 0, 140, False), wire.FrameInfo("reply", 48, 90, True)]
    each, summed = ByteStats(), ByteStats()
    for info in infos:
        each.add("up", info)
    summed.add_all("up", infos)
    summed.add_all("down", [])
    assert summed.as_dict() == each.as_dict() and summed.up["reply"].frames == 6
