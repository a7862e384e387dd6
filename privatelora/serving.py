"""The protocol over TCP: a cloud endpoint and a remote device driver (no Ray).

``CloudEndpoint`` puts a ``CloudPart`` behind a ``transport.Server``. Messages from all
connections land in one ready list; a single loop takes a batch (the trailing stage
first, as the in-process runner does), runs it in one worker thread so the event loop
keeps reading sockets meanwhile, and sends each answer to the connection that owns the
session. While no reply is in, it precomputes the frozen ``W h`` of the sessions it waits
on (DESIGN.md 2.9). All cloud state is touched from that one worker thread only.

``run_remote(client, part, prompt, params)`` drives one device session over a
``transport.Client``: exactly the ``Generation`` state machine the in-process runner uses.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from . import wire
from .generation import Generation, SamplingParams
from .runner import pick_stage
from .transport import Client, Server

# hidden states carry outliers that int8 row scales would crush: hand them off in fp16
HANDOFF_DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "fp16"}


def session_geometry(layer_ids, hidden: int, cfg, dtype: str = "fp32", max_tokens: int = 2048) -> wire.Geometry:
    return wire.Geometry(hidden=hidden, rank=cfg.rank, targets=tuple(cfg.targets), shared_a=cfg.shared_a,
                         layers=tuple(layer_ids), dtype=dtype, max_tokens=max_tokens).validate()


class CloudEndpoint:
    def __init__(self, cloud, host: str = "127.0.0.1", port: int = 0, *, policy: str = "trailing",
                 max_sessions: int = 256, overlap: bool = True, **server_kw):
        self.cloud = cloud
        self.policy = policy
        self.max_sessions = max_sessions
        self.overlap = overlap
        self.server = Server(self._handle, host, port, **server_kw)
        self._ready: list = []                       # protocol messages waiting for a stage
        self._dtype: dict[int, str] = {}             # session -> wire dtype it declared
        self._closing: set[int] = set()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="privatelora-cloud")
        self._task: asyncio.Task | None = None
        self._need_prepare = False
        self.busy_s = 0.0                            # time the backbone spent computing
        self.answers = 0

    @property
    def address(self):
        return self.server.address

    async def start(self) -> "CloudEndpoint":
        await self.server.start()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.server.stop()
        self._pool.shutdown(wait=True)

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.stop()

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- messages from the transport (runs on the connection's read loop) -------------
    async def _handle(self, conn, msg) -> None:
        if isinstance(msg, wire.Open):
            g = msg.geometry
            want = session_geometry(self.cloud.layer_ids, self.cloud.hidden, self.cloud.cfg, g.dtype, g.max_tokens)
            if g != want:
                raise wire.WireError("geometry_mismatch", f"this backbone serves {want}, session declared {g}")
            if g.max_tokens > self.cloud.max_tokens_per_request:
                raise wire.WireError("geometry_mismatch", f"max_tokens above {self.cloud.max_tokens_per_request}")
            if len(self._dtype) >= self.max_sessions:
                raise wire.WireError("busy", f"the backbone serves {self.max_sessions} sessions; try again later")
            await self._in_worker(self.cloud.open, msg.session)
            self._dtype[msg.session] = g.dtype
        elif isinstance(msg, wire.Close):
            if msg.session in self._dtype:
                self._closing.add(msg.session)
                self._wake.set()
        elif isinstance(msg, (wire.Handoff, wire.Reply)):
            self._ready.append(msg)
            self._wake.set()

    # ---- the stage loop ------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._closing:
                gone, self._closing = self._closing, set()
                self._ready = [m for m in self._ready if m.session not in gone]
                for sid in gone:
                    self._dtype.pop(sid, None)
                    await self._in_worker(self.cloud.close, sid)
            if not self._ready:
                if self.overlap and self._need_prepare:
                    self._need_prepare = False
                    t0 = loop.time()
                    await self._in_worker(self.cloud.prepare)
                    self.busy_s += loop.time() - t0
                    continue
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._ready = pick_stage(self._ready, self.policy)
            t0 = loop.time()
            answers = await self._in_worker(self.cloud.run, batch)
            self.busy_s += loop.time() - t0
            self._need_prepare = True
            for ans in answers:
                await self._send(ans)

    async def _send(self, ans) -> None:
        dtype = self._dtype.get(ans.session)
        if dtype is None:          # closed meanwhile
            return
        try:
            if isinstance(ans, wire.Handoff):
                await self.server.send(ans, dtype=HANDOFF_DTYPE[dtype])
            else:
                await self.server.send(ans)
            self.answers += 1
        except Exception:          # the device went away: its Close frees the session
            pass


async def run_remote(client: Client, part, prompt, params: SamplingParams | None = None, *,
                     dtype: str = "fp32", keep_logits: bool = False, timeout: float = 60.0,
                     observe=None) -> Generation:
    """Generate for one user over ``client``; returns the finished ``Generation``.

    ``observe(msg)``, if given, sees every message the cloud sent (benchmarks use it to
    tell prefill from decode traffic)."""
    params = params or SamplingParams()
    geometry = session_geometry(part.cloud_layer_ids, part.model_config.hidden_size, part.cfg, dtype)
    sess = await client.open(geometry)
    dev = part.session(sess.id, bytes_per_number=wire.DTYPES[dtype])
    gen = Generation(dev, list(prompt), params, keep_logits=keep_logits)
    try:
        msg = gen.start()
        while msg is not None:
            if isinstance(msg, wire.Handoff):
                await sess.send(msg, dtype=HANDOFF_DTYPE[dtype])
            else:
                await sess.send(msg)
            ans = await sess.recv(timeout)
            if observe is not None:
                observe(ans)
            msg = gen.on(ans)
    finally:
        if not client.closed:
            await sess.close()
    return gen
