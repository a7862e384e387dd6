"""What one frame of the decode path costs: encode and decode of an ``Activations`` frame
(down, [1, 32] x 3) and of a ``Reply`` frame (up, [1, 32] x 3), fp32 and fp16, and per
frame of ``Server.send_many``'s batched path (16 sessions' activations of one layer, views
of one shared [3, 16, 32] buffer, encoded together).

    .venv/bin/python benchmarks/frame_cost.py [--number 2000] [--repeat 7] [--registered] [--loopback 300]

The bench geometry's exchange (hidden 1024, rank 32, q/k/v). Prints JSON: the median over
``repeat`` runs of microseconds per frame. ``--registered`` fills the privacy registry with
an edge host's private M's (16 users x 16 layers x q/k/v, rank 32) as the bench does, so
that a Reply's encode pays the by-value check at its realistic size. ``--loopback N``: N
layer round trips of 16 sessions over one loopback connection, with and without the
server's ``send_many`` and the client's coalesced writes (microseconds per round trip).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import timeit

import torch

from privatelora import wire

KEY = bytes(range(32))
RANK, SESSIONS, LAYERS = 32, 16, 16


def _us(fn, number: int, repeat: int, per: int = 1) -> float:
    return round(statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number / per * 1e6, 2)


def _geometry(dtype: str) -> wire.Geometry:
    return wire.Geometry(hidden=1024, rank=RANK, targets=("q", "k", "v"), shared_a=False,
                         layers=tuple(range(LAYERS)), dtype=dtype, max_tokens=2048)


def _register(users: int) -> list:
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model.adapters import PrivateAdapter
    cfg = PrivateLoRAConfig(rank=RANK)
    return [PrivateAdapter(cfg, LAYERS, "bench").randomize_(7 + u, scale=0.3) for u in range(users)]


def single(dtype: str, number: int, repeat: int) -> dict:
    g = _geometry(dtype)
    gen = torch.Generator().manual_seed(0)
    act = wire.Activations(5, 3, tuple(torch.randn(1, RANK, generator=gen) for _ in range(3)))
    rep = wire.Reply(5, 3, tuple(torch.randn(1, RANK, generator=gen) for _ in range(3)))
    af = wire.encode(act, key=KEY, direction="down", geometry=g)
    rf = wire.encode(rep, key=KEY, direction="up", geometry=g)
    kw = dict(geometry_for=lambda s: g, key_for=lambda s: KEY)
    # two equal frames, distinct objects, alternated: a decode never reuses the previous
    # call's header parse (which only the server's peek_header-then-decode sequence gets)
    af, rf = itertools.cycle([af, bytes(bytearray(af))]), itertools.cycle([rf, bytes(bytearray(rf))])
    sizes = {"activations": len(next(af)), "reply": len(next(rf))}
    return {
        "activations_encode_us": _us(lambda: wire.encode_frame(act, key=KEY, direction="down", geometry=g),
                                     number, repeat),
        "activations_decode_us": _us(lambda: wire.decode_frame(next(af), direction="down", **kw), number, repeat),
        "reply_encode_us": _us(lambda: wire.encode_frame(rep, key=KEY, direction="up", geometry=g), number, repeat),
        "reply_decode_us": _us(lambda: wire.decode_frame(next(rf), direction="up", **kw), number, repeat),
        "frame_bytes": sizes,
    }


def batched(dtype: str, number: int, repeat: int) -> dict | None:
    """Per-frame cost of the batched encode: 16 sessions, one [3, 16, 32] buffer."""
    encode_many = getattr(wire, "encode_many", None)
    if encode_many is None:   # the code before the batched path existed
        return None
    g = _geometry(dtype)
    buf = torch.randn(3, SESSIONS, RANK, generator=torch.Generator().manual_seed(1))
    msgs = [wire.Activations(s + 1, 3, tuple(buf[i, s:s + 1] for i in range(3))) for s in range(SESSIONS)]
    jobs = [(m, KEY, g, None) for m in msgs]
    out = encode_many(jobs, direction="down")
    assert all(not isinstance(o, Exception) for o in out)
    return {"activations_encode_many_us_per_frame": _us(lambda: encode_many(jobs, direction="down"),
                                                        max(1, number // SESSIONS), repeat, SESSIONS)}


async def _loopback(rounds: int, coalesce: bool, batched: bool) -> float:
    """Microseconds per layer round trip of 16 sessions on one connection over loopback:
    the server answers the 16 replies of a layer with 16 activations (``send_many`` from one
    [3, 16, 32] buffer, or one ``send_nowait`` each); the client writes coalesced or not."""
    import asyncio
    import time

    from privatelora import transport as tp
    g = _geometry("fp32")
    got: list = []
    buf = torch.randn(3, SESSIONS, RANK)

    async def handler(conn, msg):
        if isinstance(msg, wire.Reply):
            got.append(msg.session)
            if len(got) == SESSIONS:
                msgs = [wire.Activations(s, 3, tuple(buf[i, j:j + 1] for i in range(3))) for j, s in enumerate(got)]
                got.clear()
                if batched:
                    assert not any(srv.send_many([(m, None) for m in msgs]))
                else:
                    for m in msgs:
                        srv.send_nowait(m)

    srv = await tp.Server(handler).start()
    client = await tp.Client.connect(*srv.address)
    client.coalesce = coalesce
    sessions = [await client.open(g) for _ in range(SESSIONS)]
    m = tuple(torch.randn(1, RANK) + 0.1 for _ in range(3))

    async def device(sess):
        for _ in range(rounds):
            await sess.send(wire.Reply(sess.id, 3, m))
            await sess.recv(timeout=10)
    t0 = time.perf_counter()
    await asyncio.gather(*(device(s) for s in sessions))
    dt = time.perf_counter() - t0
    await client.close()
    await srv.stop()
    return round(dt / rounds * 1e6, 1)


def loopback(rounds: int, repeat: int) -> dict:
    import asyncio

    from privatelora import transport as tp
    out = {}
    for name, coalesce, batched in (("per_frame_writes", False, False), ("server_send_many", False, True),
                                    ("client_coalesced", True, False), ("both", True, True)):
        if (batched and not hasattr(tp.Server, "send_many")) or (coalesce and not hasattr(tp.Client, "coalesce")):
            continue     # the code before these existed
        out[name] = statistics.median(asyncio.run(_loopback(rounds, coalesce, batched)) for _ in range(repeat))
    return {"loopback_16_sessions_us_per_layer_round_trip": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--registered", action="store_true",
                    help="register an edge host's private M's (16 users) before measuring")
    ap.add_argument("--loopback", type=int, default=0, metavar="ROUNDS",
                    help="also time ROUNDS layer round trips of 16 sessions on one loopback connection")
    a = ap.parse_args()
    torch.set_num_threads(1)
    keep = _register(SESSIONS) if a.registered else []
    out = {"registered_M": sum(len(x.M) for x in keep), "number": a.number, "repeat": a.repeat}
    for dtype in ("fp32", "fp16"):
        out[dtype] = single(dtype, a.number, a.repeat)
        b = batched(dtype, a.number, a.repeat)
        if b is not None:
            out[dtype].update(b)
    if a.loopback:
        out.update(loopback(a.loopback, a.repeat))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
