"""The batched frame path: ``wire.encode_many`` (views of one stage buffer converted once),
``Server.send_many`` (one write per connection, per-message failures) and the read side's
whole-frame fast path (``streams.read_frame``)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from privatelora import transport as tp
from privatelora import wire
from privatelora.transport.streams import read_frame
from privatelora.wire import Activations, Geometry, Reply

KEY = bytes(range(32))
DTYPES = ("fp32", "fp16", "bf16", "int8")
RANGES = [(0, 1), (1, 3), (4, 1), (5, 5), (10, 2)]     # (offset, rows) of each session in the stage
T = 12


def geometry(dtype, rank=4):
    return Geometry(hidden=32, rank=rank, targets=("q", "k", "v"), shared_a=False, layers=(0, 2, 5),
                    dtype=dtype, max_tokens=16)


def stage(buf, layer=2, cls=Activations, order=(0, 1, 2)):
    return [cls(s + 1, layer, tuple(buf[i, off:off + n] for i in order)) for s, (off, n) in enumerate(RANGES)]


def one_by_one(msgs, g, direction="down"):
    return [wire.encode_frame(m, key=KEY, direction=direction, geometry=g) for m in msgs]


def many(msgs, g, direction="down", shared=None):
    return wire.encode_many([(m, KEY, g, None) for m in msgs], direction=direction, shared=shared)


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_many_is_byte_identical_and_converts_the_buffer_once(dtype):
    g = geometry(dtype)
    buf = torch.randn(3, T, 4, generator=torch.Generator().manual_seed(0))
    buf[0, 0] = 0                                             # an all-zero row (int8 scale 0)
    msgs = stage(buf)
    shared: dict = {}
    got = many(msgs, g, shared=shared)
    assert got == one_by_one(msgs, g)                         # frames and FrameInfo alike
    assert len(shared) == 1                                   # one conversion for the stage
    for m, (frame, _) in zip(msgs, got):
        back = wire.decode(frame, direction="down", geometry_for=lambda s: g, key_for=lambda s: KEY)
        assert back.layer == 2 and len(back.a) == 3
        tol = {"fp32": 0, "fp16": 1e-2, "bf16": 2e-2, "int8": 3e-2}[dtype]
        for a, b in zip(m.a, back.a):
            assert torch.allclose(a, b, atol=tol * 4, rtol=tol)
    # other target orders, and up frames (by-value privacy check on the stack) are identical too
    perm = stage(buf, order=(2, 0, 1))
    assert many(perm, g) == one_by_one(perm, g)
    replies = stage(buf, cls=Reply)
    assert many(replies, g, "up") == one_by_one(replies, g, "up")


def test_encode_many_mixes_shared_and_lone_tensors():
    g = geometry("fp16")
    gen = torch.Generator().manual_seed(1)
    buf = torch.randn(3, T, 4, generator=gen)
    other = torch.randn(T, 3, 4, generator=gen)               # views that are not whole-row runs
    big = torch.randn(3, T, 8, generator=gen)[:, :, :4]       # a view of a view: base is not [k, T, r]
    msgs = stage(buf)
    msgs += [Activations(40, 0, tuple(torch.randn(2, 4, generator=gen) for _ in range(3))),
             Activations(41, 0, tuple(other[3:4, i] for i in range(3))),
             Activations(42, 5, tuple(other[3:6, i] for i in range(3))),
             Activations(43, 5, tuple(big[i, 2:4] for i in range(3))),
             Activations(44, 5, (buf[0, 1:3], torch.randn(2, 4, generator=gen), buf[2, 1:3]))]
    assert many(msgs, g) == one_by_one(msgs, g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_many_failures_are_each_message_s_own(dtype):
    g = geometry(dtype)
    buf = torch.randn(3, T, 4, generator=torch.Generator().manual_seed(2))
    buf[1, 4, 2] = math.nan                                   # session 3's rows only (offset 4)
    msgs = stage(buf)
    msgs[1] = Activations(2, 3, msgs[1].a)                    # layer 3 is not declared
    got = many(msgs, g)
    assert isinstance(got[1], wire.GeometryError) and got[1].code == "bad_layer"
    assert isinstance(got[2], wire.SchemaError) and got[2].code == "non_finite"
    for i in (0, 3, 4):
        assert got[i] == wire.encode_frame(msgs[i], key=KEY, direction="down", geometry=g)
    if dtype == "fp16":                                       # overflowing the wire dtype, too
        buf2 = torch.randn(3, T, 4)
        buf2[0, 0, 0] = 1e6
        out = many(stage(buf2), g)
        assert isinstance(out[0], wire.SchemaError) and out[0].code == "non_finite"
        assert all(isinstance(o, tuple) for o in out[1:])


def test_encode_many_keeps_the_up_privacy_checks():
    from privatelora.privacy import mark_private
    g = geometry("fp32")
    buf = mark_private(torch.randn(3, T, 4))
    got = many(stage(buf, cls=Reply), g, "up")
    assert all(isinstance(e, wire.PrivacyError) and e.code == "private_tensor" for e in got)


class _Counting:
    """Counts the writes of a connection's transport writer."""

    def __init__(self, writer):
        self.writer, self.writes = writer, 0
        self._write = writer.write

    def __call__(self, data):
        self.writes += 1
        return self._write(data)


def test_send_many_one_write_per_connection_and_per_message_failures():
    async def main():
        async def handler(conn, msg):
            return None
        srv = await tp.Server(handler).start()
        g = geometry("fp16")
        clients = [await tp.Client.connect(*srv.address) for _ in range(2)]
        sessions = [await clients[i % 2].open(g) for i in range(len(RANGES))]
        counters = []
        for conn in srv.connections:
            counters.append(_Counting(conn._writer))
            conn._writer.write = counters[-1]
        buf = torch.randn(3, T, 4)
        items = [(Activations(sess.id, 2, tuple(buf[i, off:off + n] for i in range(3))), None)
                 for sess, (off, n) in zip(sessions, RANGES)]
        bad = Activations(sessions[1].id, 3, items[1][0].a)          # an undeclared layer
        items[1] = (bad, None)
        items.append((Activations(12345, 2, items[0][0].a), None))   # no such session
        out = srv.send_many(items)
        assert out[0] is None and out[2] is None and out[3] is None and out[4] is None
        assert isinstance(out[1], wire.GeometryError) and out[1].code == "bad_layer"
        assert isinstance(out[5], ConnectionResetError)
        assert [c.writes for c in counters] == [1, 1]                 # coalesced: one write each
        for i, sess in enumerate(sessions):
            if i == 1:
                continue
            msg = await sess.recv(timeout=5)
            off, n = RANGES[i]
            assert isinstance(msg, Activations) and msg.layer == 2
            assert torch.allclose(msg.a[1], buf[1, off:off + n], atol=1e-2, rtol=1e-2)
        assert srv.stats.as_dict()["down"]["activations"]["frames"] == 4
        assert sum(c.stats.as_dict()["down"]["activations"]["frames"] for c in clients) == 4
        for c in clients:
            await c.close()
        await srv.stop()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_read_frame_fast_path_keeps_the_stream_guards():
    async def main():
        g = geometry("fp32")
        frames = [f for f, _ in one_by_one(stage(torch.randn(3, T, 4)), g)]
        r = asyncio.StreamReader()
        r.feed_data(b"".join(frames) + frames[0][:10])               # several frames and a partial one
        for f in frames:
            assert await read_frame(r, 1 << 20, idle_s=1, frame_s=1) == f
        assert await read_frame(r, 1 << 20, idle_s=1, frame_s=0.05) == "slow_frame"
        r = asyncio.StreamReader()
        r.feed_data(b"".join(frames))
        assert await read_frame(r, 64, frame_s=1) == "too_large"     # whole, but over the limit
        r = asyncio.StreamReader()
        r.feed_data(wire.PREFIX.pack(3) + bytes(40))
        assert await read_frame(r, 1 << 20, frame_s=1) == "bad_length"
        r = asyncio.StreamReader()
        assert await read_frame(r, 1 << 20, idle_s=0.05) == "idle"
    asyncio.run(main())


def test_endpoint_sends_a_stage_from_one_buffer_and_generates_the_same_tokens(monkeypatch):
    """Several users on one connection: each stage's activations go out through
    ``send_many`` from the stage's one [k, T, r] buffer, converted once; tokens equal the
    in-process run's."""
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
    from privatelora.wire import tensors as wire_tensors

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bb = load_backbone("tiny-llama")
        cfg = PrivateLoRAConfig(rank=4)
        adapters = [PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(u, scale=1.0) for u in range(3)]
        prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
        params = SamplingParams(max_new_tokens=6)
        want = []
        for a, p in zip(adapters, prompts):
            g = Generation(DevicePart(bb, cfg, a).session(1), p, params)
            InProcessRunner(build_split(cfg=cfg, backbone=bb).cloud).run([g])
            want.append(g.tokens)
        built = []
        real = wire_tensors.SharedBuffer.__init__

        def counting(self, *args):
            built.append(args[1])
            real(self, *args)
        monkeypatch.setattr(wire_tensors.SharedBuffer, "__init__", counting)
        batches = []

        async def main():
            async with CloudEndpoint(build_split(cfg=cfg, backbone=bb).cloud, gather_s=0.05) as ep:
                real_many = ep.server.send_many

                def spy(items):
                    batches.append(len(items))
                    return real_many(items)
                ep.server.send_many = spy
                client = await tp.Client.connect(*ep.address)
                gens = await asyncio.gather(*(run_remote(client, DevicePart(bb, cfg, a), p, params, dtype="fp32")
                                              for a, p in zip(adapters, prompts)))
                await client.close()
                return [g.tokens for g in gens]
        got = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        torch.set_num_threads(threads)
    assert got == want
    assert built and set(built) == {"fp32"}          # stage buffers were converted once each
    assert max(batches) > 1                          # some stage answered several sessions at once


def test_encode_many_converts_no_hand_off_buffer():
    """A hand-off's tensor is often the last row of a much larger one: it is encoded alone,
    never by converting its whole base."""
    g = geometry("fp16")
    big = torch.randn(64, 32)
    shared: dict = {}
    msgs = [wire.Handoff(1, 0, big[-1:], False), wire.Handoff(2, 0, big[-2:], False)]
    got = wire.encode_many([(m, KEY, g, None) for m in msgs], direction="down", shared=shared)
    assert got == [wire.encode_frame(m, key=KEY, direction="down", geometry=g) for m in msgs]
    assert not shared


def test_cached_mac_states_give_hmac_sha256_and_stay_bounded(monkeypatch):
    import hmac
    import os

    from privatelora.wire import frames
    for n in (1, 16, 32, 38, 64, 65, 200):
        k, data = os.urandom(n), os.urandom(333)
        want = hmac.digest(k, data, "sha256")[: wire.TAG_LEN]
        assert frames._tag(k, data) == want == frames._tag(k, data)       # cold and cached
        assert frames._tag(bytearray(k), memoryview(data)) == want
    monkeypatch.setattr(frames, "MAC_CACHE_KEYS", 8)
    for _ in range(20):
        frames._tag(os.urandom(32), b"x")
    assert len(frames._MAC_STATES) <= 8
