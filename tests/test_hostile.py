"""Hostile-input campaign against a live ``CloudEndpoint`` while honest users generate.

Seeded and bounded (> 10,000 hostile frames in a few seconds), from concurrent raw TCP
attackers: random bytes, with and without a plausible length prefix; honest up-frames
recorded with ``Server.tap``, re-signed for an attacker's own session and mutated (bit
flips, truncation, extension, forged length prefixes, authenticated garbage bodies); a
closed session's frames; live honest frames on another connection (``foreign_session``);
Opens hijacking live honest session ids; whole-session replays; Error/Open spam; a session
flood; slow-loris, silent and half-open peers held through the campaign. Meanwhile three
honest sessions on two ``Client`` connections generate greedily, over and over, each
generation equal to the in-process one. Afterwards: the endpoint is alive and serving, the
server closed every attacker, only honest state is left, RSS stayed bounded, and the
refusals and disconnects we provoked were counted. Prints a one-line JSON summary.
"""

import asyncio
import contextlib
import gc
import hmac
import json
import random
import time
from collections import Counter, deque

import pytest

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

SEED, WORKERS, CLOSE_TIMEOUT_S, RSS_BOUND_MIB = 20240611, 12, 5.0, 64
P, H, T = wire.PREFIX.size, wire.HEADER.size, wire.TAG_LEN
# attack kind -> connections (each single-frame kind costs one connection per frame)
PLAN = {"random": 2400, "random_framed": 1400, "bitflip": 1500, "signed_garbage": 800,
        "truncate": 700, "extend": 600, "forged_length": 700, "foreign": 800,
        "holder_foreign": 200, "hijack": 200, "replay": 40, "spam": 30, "sessions": 4}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def sign(kind: int, flags: int, sid: int, body: bytes, key: bytes) -> bytes:
    signed = wire.HEADER.pack(wire.VERSION, kind, flags, 0, sid) + body
    return wire.PREFIX.pack(len(signed) + T) + signed + hmac.digest(key, signed, "sha256")[:T]


def resign(frame: bytes, sid: int, key: bytes) -> bytes:
    """A recorded frame, authentic again for another session and key."""
    return sign(frame[P + 1], frame[P + 2], sid, frame[P + H:-T], key)


def incomplete(data: bytes) -> bool:
    """Whether the first frame of ``data`` leaves the server waiting for more bytes."""
    n = wire.PREFIX.unpack_from(data)[0] if len(data) >= P else 0
    return len(data) < P or (wire.MIN_LENGTH <= n <= wire.DEFAULT_MAX_FRAME and len(data) < P + n)


def flip(data: bytes, rng, bits: int, lo: int = 0) -> bytes:
    b = bytearray(data)
    for i in [rng.randrange(lo * 8, len(b) * 8) for _ in range(bits)]:
        b[i // 8] ^= 1 << (i % 8)
    return bytes(b)


def opening(sid: int, key: bytes, geometry) -> bytes:
    return wire.encode(wire.Open(sid, key, geometry), key=None, direction=wire.UP)


class Campaign:
    """Attack kinds: ``rng -> (valid prelude, hostile bytes, hostile frames, send EOF?)``;
    EOF None: send it only if the server would otherwise wait for the rest of a frame."""

    def __init__(self, geometry, recorded, live, holder):
        self.g, self.rec, self.live, self.holder = geometry, recorded, live, holder
        self.tmpl = [f for f in recorded if f[P + 1] in (3, 5)]           # Handoff, Reply
        self.frames, self.answered, self.outcomes = 0, 0, Counter()

    def own(self, rng):                                 # an Open of a fresh attacker session
        sid, key = rng.getrandbits(63) | 1, rng.randbytes(wire.KEY_LEN)
        return sid, key, opening(sid, key, self.g)

    def mine(self, rng):                                # ... and a recorded frame signed for it
        sid, key, op = self.own(rng)
        return op, resign(rng.choice(self.tmpl), sid, key)

    def random(self, rng):
        return b"", rng.randbytes(rng.randint(1, 300)), 1, None

    def random_framed(self, rng):
        body = bytearray(rng.randbytes(rng.randint(wire.MIN_LENGTH, 600)))
        if rng.random() < 0.6:                          # a plausible header: version 1, kind 1-9
            body[:4] = bytes([1, rng.randint(1, 9), rng.choice((0, 0, 1, 2, 4)), 0])
        if rng.random() < 0.3:
            body[4:12] = bytes(8)                       # the connection channel
        return b"", wire.PREFIX.pack(len(body)) + bytes(body), 1, None

    def bitflip(self, rng):
        op, f = self.mine(rng)
        return op, flip(f, rng, rng.randint(1, 4)), 1, None

    def signed_garbage(self, rng):                      # passes the MAC, must fail the schema
        sid, key, op, f = *self.own(rng), rng.choice(self.tmpl)
        body = flip(f[P + H:-T], rng, rng.randint(1, 8)) if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 200))
        return op, sign(f[P + 1], rng.choice((0, 0, 1)), sid, body, key), 1, True   # may even parse

    def truncate(self, rng):
        op, f = self.mine(rng)
        cut = f[:rng.randrange(1, len(f))]
        if len(cut) > P and rng.random() < 0.5:         # a prefix consistent with the cut
            cut = wire.PREFIX.pack(len(cut) - P) + cut[P:]
        return op, cut, 1, None

    def extend(self, rng):
        (op, f), extra = self.mine(rng), rng.randbytes(rng.randint(1, 64))
        if rng.random() < 0.5:                          # inside the frame: the MAC breaks
            return op, wire.PREFIX.pack(len(f) - P + len(extra)) + f[P:] + extra, 1, None
        return op + f, extra, 1, None                   # after a valid frame: a garbage frame

    def forged_length(self, rng):
        (op, f), m = self.mine(rng), wire.DEFAULT_MAX_FRAME
        n = len(f) - P
        length = rng.choice([0, rng.randint(1, wire.MIN_LENGTH - 1), m + 1, rng.randint(m + 2, 2**32 - 1),
                             n - rng.randint(1, n - wire.MIN_LENGTH), n + rng.randint(1, 4096)])
        return op, wire.PREFIX.pack(length) + f[P:], 1, None

    def foreign(self, rng):             # a live honest frame on another connection, or a closed session's
        f = rng.choice(self.live if rng.random() < 0.6 else self.rec[1:])   # (some with a body bit flipped)
        return b"", flip(f, rng, 1, P + H) if rng.random() < 0.3 else f, 1, None

    def holder_foreign(self, rng):                      # right key, wrong connection
        return b"", resign(rng.choice(self.tmpl), *self.holder), 1, None

    def hijack(self, rng):                              # Open a live honest id with our key, Close it
        sid, key = int.from_bytes(rng.choice(self.live)[P + 4:P + H], "big"), rng.randbytes(wire.KEY_LEN)
        return b"", opening(sid, key, self.g) + sign(6, 0, sid, b"\x80", key), 2, True

    def replay(self, rng):                              # a whole session replayed twice, re-Opened
        sid, key, op = self.own(rng)
        seq = b"".join(resign(f, sid, key) for f in self.rec[1:-1])
        return op, seq + seq + op, 2 * (len(self.rec) - 2) + 1, True

    def spam(self, rng):                                # refused or ignored, never disconnected
        sid, key, op = self.own(rng)
        bad = wire.Geometry(**{**self.g.to_wire(), "rank": self.g.rank // 2})
        make = [lambda c: wire.encode(wire.Error(0, c, "spam"), key=None, direction=wire.UP),
                lambda c: wire.encode(wire.Error(sid, c, "spam"), key=key, direction=wire.UP),
                lambda c: op,                           # session_in_use
                lambda c: opening(rng.getrandbits(63) | 1, key, bad)]       # geometry_mismatch
        return op, b"".join(make[i % 4](f"x{rng.getrandbits(32)}") for i in range(100)), 100, True

    def sessions(self, rng):                            # 300 Opens, then a refused frame
        return b"", b"".join(self.own(rng)[2] for _ in range(300)) + bytes(4), 301, None

    async def attack(self, kind: str, rng, address) -> None:
        prelude, hostile, n, eof = getattr(self, kind)(rng)
        reader, writer = await asyncio.open_connection(*address)
        self.frames, answered = self.frames + n, False
        try:
            writer.write(prelude + hostile)
            if incomplete(hostile) if eof is None else eof:
                writer.write_eof()
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                while await reader.read(1 << 16):
                    answered = True
            self.outcomes["closed"] += 1
        except TimeoutError:
            self.outcomes["hung"] += 1
        except ConnectionError:
            self.outcomes["reset"] += 1                 # closed by the server too
        finally:
            writer.transport.abort()
        self.answered += answered


def _inprocess(bb, cfg, adapter, prompt, params):
    g = Generation(DevicePart(bb, cfg, adapter).session(1), prompt, params)
    InProcessRunner(build_split(cfg=cfg, backbone=bb).cloud).run([g])
    return g.tokens


async def until(pred, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


def test_hostile_campaign_leaves_honest_users_and_endpoint_intact():
    bb, cfg, params = load_backbone("tiny-mistral"), PrivateLoRAConfig(rank=8), SamplingParams(max_new_tokens=8)
    adapters = [PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(30 + i, scale=2.0) for i in range(3)]
    prompts = [[3, 4, 5, 6, 7], list(range(10, 22)), [42, 7, 42, 7]]
    want = [_inprocess(bb, cfg, a, p, params) for a, p in zip(adapters, prompts)]
    parts = [DevicePart(bb, cfg, a) for a in adapters]
    geometry = wire.session_geometry(parts[0].exchange_ids, bb.config.hidden_size, cfg)
    res, shed = Counter(), Counter()

    async def generate(client, part, prompt):
        while True:
            try:
                return await run_remote(client, part, prompt, params, timeout=20)
            except RemoteError as e:        # load shedding ("try again later") is counted, retried
                if e.code not in ("too_many_sessions", "busy"):
                    raise
                shed[e.code] += 1
                await asyncio.sleep(0.05)

    async def main():
        ep = await CloudEndpoint(build_split(cfg=cfg, backbone=bb).cloud, frame_timeout_s=1.0,
                                 idle_connection_s=1.0).start()
        server, recorded = ep.server, []
        server.tap = lambda cid, frame: recorded.append(bytes(frame))
        async with await Client.connect(*ep.address) as rec_client:      # the session we record
            assert (await run_remote(rec_client, parts[0], prompts[0], params)).tokens == want[0]
        await until(lambda: not server.connections)
        clients = [await Client.connect(*ep.address) for _ in range(2)]
        await until(lambda: len(server.connections) == 2)
        honest_ids, live, stop = {c.id for c in server.connections}, deque(maxlen=64), asyncio.Event()
        server.tap = lambda cid, frame: ((frame[P + 1] != 1 and live.append(bytes(frame))) if cid in honest_ids
                                         else res.update(frames_seen_by_server=1))     # no Opens in live
        users = list(zip((clients[0], clients[0], clients[1]), parts, prompts))

        async def honest():
            while not stop.is_set() or not res["honest_rounds"]:
                t = time.monotonic()
                gens = await asyncio.gather(*[generate(c, d, p) for c, d, p in users])
                assert [g.tokens for g in gens] == want and not any(g.error for g in gens)
                res["honest_rounds"] += 1
                res["honest_max_round_ms"] = max(res["honest_max_round_ms"], int(1000 * (time.monotonic() - t)))

        honest_task = asyncio.create_task(honest())
        await until(lambda: res["honest_rounds"] and live)
        holder = (SEED | 1, random.Random(SEED).randbytes(wire.KEY_LEN))
        lingering = [await asyncio.open_connection(*ep.address) for _ in range(25)]
        for i, (_, w) in enumerate(lingering):  # 0 holds a session; 1-12 stall mid-frame; 13-18 send
            if not 13 <= i <= 18:               # nothing; 19-24 send part of a frame, half-close, never read
                w.write(opening(*holder, geometry) if i == 0 else wire.PREFIX.pack(500) + bytes([1, 3, 0, 0, i]))
            if i > 18:
                w.write_eof()
        await until(lambda: holder[0] in ep.cloud.sessions)
        gc.collect()
        rss0, t0 = rss_mib(), time.monotonic()
        camp, kinds = Campaign(geometry, recorded, live, holder), [k for k, n in PLAN.items() for _ in range(n)]
        random.Random(SEED).shuffle(kinds)
        todo = iter(enumerate(kinds))

        async def attacker():
            for i, kind in todo:
                await camp.attack(kind, random.Random(SEED * 100_003 + i), ep.address)

        async with asyncio.timeout(45):
            await asyncio.gather(*[attacker() for _ in range(WORKERS)])
        res["campaign_ms"] = int(1000 * (time.monotonic() - t0))
        res["stalled_closed_by_server"] = 0
        for r, _ in lingering[1:]:                       # the server drops stalled, silent, half-open peers
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.5):         # the frame and idle timeouts are 1 s here
                    while await r.read(1 << 16):         # ends at EOF only
                        pass
                    res["stalled_closed_by_server"] += 1
        assert not ep._task.done()
        for _, w in lingering:
            w.transport.abort()
        stop.set()
        await asyncio.wait_for(honest_task, 30)
        await until(lambda: {c.id for c in server.connections} == honest_ids)   # attackers all gone
        await until(lambda: not ep.cloud.sessions and ep.scheduler.open_sessions == 0, 15)
        gc.collect()
        res["rss_growth_kib"] = int(1024 * (rss_mib() - rss0))
        g = await run_remote(clients[1], parts[2], prompts[2], params, timeout=20)   # still serving
        assert g.error is None and g.tokens == want[2] and not ep._task.done()
        for c in clients:
            await c.close()
        await ep.stop()
        return camp, server

    camp, server = asyncio.run(main())
    print(json.dumps({"frames_sent": camp.frames, "connections": sum(camp.outcomes.values()), "outcomes": camp.outcomes,
                      "answered": camp.answered, **res, "honest_shed": shed, "refusals": server.refusals,
                      "disconnects": server.disconnects, "handler_errors": server.handler_errors}))
    assert camp.frames >= 10_000 and sum(camp.outcomes.values()) == sum(PLAN.values())
    assert camp.outcomes["hung"] == 0                    # the server closed every attacker connection
    assert res["stalled_closed_by_server"] == 24         # ... and every slow-loris, silent, half-open one
    assert not shed                                      # honest users were never turned away
    assert res["honest_rounds"] >= 2                     # each asserted exact, during the campaign too
    assert res["rss_growth_kib"] < RSS_BOUND_MIB * 1024
    single = sum(n for k, n in PLAN.items() if k not in ("replay", "spam", "sessions", "hijack"))
    assert sum(server.refusals.values()) >= single       # a refusal per single-frame attack at least
    assert {"too_large", "bad_length", "truncated", "bad_version", "unknown_kind", "bad_mac", "malformed",
            "unknown_session", "foreign_session", "session_in_use", "geometry_mismatch"} <= set(server.refusals)
    assert {"too_large", "bad_length", "truncated", "refused"} <= set(server.disconnects)
    assert not server.disconnects["internal"] and not server.handler_errors
