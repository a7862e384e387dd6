"""The protocol over TCP: a cloud endpoint and a remote device driver (no Ray).

``CloudEndpoint`` puts a ``CloudPart`` behind a ``transport.Server``. Messages from all
connections go to one ``Scheduler`` (admission, stage grouping, fairness, token budget,
idle reclaim); a single loop takes its next batch, runs it in one worker thread so the
event loop keeps reading sockets meanwhile, and sends each answer to the connection that
owns the session. While no reply is in, it precomputes the frozen ``W h`` of the sessions it waits
on (``docs/design.md``). All cloud state is touched from that one worker thread only.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from privatelora import wire
from privatelora.serving.scheduler import Busy, Scheduler, UnknownSession
from privatelora.training.cloud import CloudTrainer
from privatelora.training.device import wire_dtype
from privatelora.transport import Server


class EndpointEvents:
    """What a ``CloudEndpoint`` reports as it works (metrics subscribe; default: nothing).

    Times are ``time.monotonic()`` seconds. No method receives tokens or tensors, and
    session ids are for correlating events only: exporters must not put them in labels.
    """

    def opened(self, session: int, now: float) -> None: ...
    def hand_in(self, session: int, tokens: int, first: bool, now: float) -> None: ...
    def chain(self, session: int, generated: int, drafted: int, accepted: int, round_trips: int,
              now: float) -> None: ...
    def hand_out(self, session: int, now: float) -> None: ...
    def activations(self, session: int, layer: int, now: float) -> None: ...
    def reply(self, session: int, layer: int, now: float) -> None: ...
    def stage(self, sessions: int, tokens: int, seconds: float, queue_s: float) -> None: ...
    def closed(self, session: int, reason: str, now: float) -> None: ...


class CloudEndpoint:
    """A ``CloudPart`` behind a TCP server, scheduled by ``Scheduler``.

    ``max_sessions`` sessions hold KV caches at once; further sessions' first hand-offs
    wait (``max_waiting``), and beyond that get ``Error("busy")``. A session silent for
    ``idle_timeout_s`` is closed and its cache freed; so is every session of a connection
    that drops. A peer whose frame is refused gets an ``Error`` and is disconnected
    (``disconnect_on_refusal``); a request the cloud refuses (out of order, bad position)
    gets an ``Error`` and closes that session only.
    """

    def __init__(self, cloud, host: str = "127.0.0.1", port: int = 0, *, max_sessions: int = 256,
                 max_waiting: int | None = None, token_budget: int = 4096, max_wait_s: float = 0.05,
                 idle_timeout_s: float = 120.0, gather_s: float = 0.01, merge: bool = False,
                 overlap: bool = True,
                 disconnect_on_refusal: bool = True, training: bool = True,
                 events: EndpointEvents | None = None, **server_kw):
        self.cloud = cloud
        self.events = events or EndpointEvents()
        self._last_handoff: dict[int, tuple] = {}    # session -> (start, rows, first) of its last hand-off
        self._close_reason: dict[int, str] = {}
        self.scheduler = Scheduler(max_running=max_sessions,
                                   max_waiting=max_sessions if max_waiting is None else max_waiting,
                                   token_budget=token_budget, max_wait_s=max_wait_s, idle_timeout_s=idle_timeout_s,
                                   gather_s=gather_s, merge=merge)
        self.overlap = overlap
        self.server = Server(self._handle, host, port, disconnect_on_refusal=disconnect_on_refusal, **server_kw)
        self._dtype: dict[int, str] = {}             # open session -> wire dtype it declared
        self._closing: set[int] = set()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="privatelora-cloud")
        self._task: asyncio.Task | None = None
        self._need_prepare = False
        self.busy_s = 0.0                            # time the backbone spent computing
        self.errors: Counter = Counter()             # Error answers by code
        self.closed_sessions = 0
        # split training (privatelora.training): its messages bypass the serving scheduler
        self.trainer = CloudTrainer(cloud) if training else None
        self._train_tasks: set[asyncio.Task] = set()

    @property
    def address(self):
        return self.server.address

    async def start(self) -> "CloudEndpoint":
        await self.server.start()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def stop(self) -> None:
        for t in list(self._train_tasks):
            t.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.server.stop()
        self._pool.shutdown(wait=True)

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.stop()

    def set_policy(self, *, gather_s: float | None = None, merge: bool | None = None,
                   max_batch: int | None = None) -> None:
        """Change how stages are batched from now on (benchmarks compare policies on one
        warm backbone). ``max_batch=1`` serves each session's stage alone."""
        if gather_s is not None:
            if gather_s < 0:
                raise ValueError("gather_s must be >= 0")
            self.scheduler.gather_s = gather_s
        if merge is not None:
            self.scheduler.merge = bool(merge)
        if max_batch is not None:
            if max_batch < 0:
                raise ValueError("max_batch must be >= 0")
            self.scheduler.max_batch = max_batch

    def stats(self) -> dict:
        sch = self.scheduler
        return {"sessions": len(self._dtype), "running": sch.running, "waiting": sch.waiting,
                "stages": self.cloud.stats.stages, "stage_tokens": self.cloud.stats.tokens,
                "stage_sessions": self.cloud.stats.sessions,
                "mean_batch_size": self.cloud.stats.mean_batch_sessions, "busy_s": self.busy_s,
                "kv_bytes": self.cloud.kv_bytes(), "refusals": dict(self.server.refusals),
                "disconnects": dict(self.server.disconnects), "errors": dict(self.errors),
                "fairness_picks": sch.stats.fairness_picks, "reclaimed": sch.stats.reclaimed,
                "gather_waits": sch.stats.gather_waits, "batch_sizes": dict(sch.stats.sizes),
                "closed_sessions": self.closed_sessions, "bytes": self.server.stats.as_dict()}

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- messages from the transport (runs on the connection's read loop) -------------
    async def _handle(self, conn, msg) -> None:
        now = time.monotonic()
        if isinstance(msg, wire.Open):
            g = msg.geometry
            want = wire.session_geometry(self.cloud.exchange_ids, self.cloud.hidden, self.cloud.cfg, g.dtype, g.max_tokens)
            if g.layers != want.layers:
                raise wire.WireError("geometry_mismatch", f"this backbone adapts cloud layers {list(want.layers)}, the "
                                     f"session declared {list(g.layers)}: the adapter's placement must match the "
                                     "endpoint's --adapted-layers")
            if g != want:
                raise wire.WireError("geometry_mismatch", f"this backbone serves {want}, session declared {g}")
            if g.max_tokens > self.cloud.max_tokens_per_request:
                raise wire.WireError("geometry_mismatch", f"max_tokens above {self.cloud.max_tokens_per_request}")
            await self._in_worker(self.cloud.open, msg.session)
            self.scheduler.open(msg.session, now)
            self._dtype[msg.session] = g.dtype
            self.events.opened(msg.session, now)
        elif isinstance(msg, wire.Close):
            if msg.session in self._dtype:
                self._closing.add(msg.session)
                self._wake.set()
        elif self.trainer is not None and self.trainer.accepts(msg):
            self.scheduler.touch(msg.session, now)
            task = asyncio.get_running_loop().create_task(self._train(msg))
            self._train_tasks.add(task)
            task.add_done_callback(self._train_tasks.discard)
        elif isinstance(msg, (wire.Handoff, wire.Reply)):
            stage = msg.layer if isinstance(msg, wire.Reply) else -1
            tokens = msg.hidden.shape[0] if isinstance(msg, wire.Handoff) else msg.m[0].shape[0]
            try:
                self.scheduler.submit(msg.session, stage, tokens, msg, now)
            except Busy as e:
                await self._refuse(msg.session, "busy", str(e))
                return
            except UnknownSession:
                return
            if isinstance(msg, wire.Handoff):
                first = msg.session not in self._last_handoff
                self._chain_done(msg.session, msg.start, tokens, first, now)
                self.events.hand_in(msg.session, tokens, first, now)
            else:
                self.events.reply(msg.session, msg.layer, now)
            self._wake.set()

    def _chain_done(self, sid: int, start: int, rows: int, first: bool, now: float) -> None:
        """What the session's previous chain yielded, read off hand-off positions: after its
        first hand-off (the prompt) a device hands in its last sampled token plus any drafts,
        and its next hand-off starts right after the positions it kept (a rewind drops the
        rejected drafts). So the previous chain generated ``start - previous start`` tokens
        (one, for the prompt's chain) and accepted one fewer of its drafts."""
        prev = self._last_handoff.get(sid)
        self._last_handoff[sid] = (start, rows, first)
        if prev is None:
            return
        p_start, p_rows, p_first = prev
        kept = start - p_start
        if p_first:
            generated, drafted, accepted = 1, 0, 0
        elif 1 <= kept <= p_rows:
            generated, drafted, accepted = kept, p_rows - 1, kept - 1
        else:                      # not the pattern of a generating device (a rewind past its chain)
            return
        self.events.chain(sid, generated, drafted, accepted, len(self.cloud.exchange_ids) + 1, now)

    async def _refuse(self, sid: int, code: str, reason: str) -> None:
        """Answer ``Error`` on the session and close it (its cache is freed)."""
        self.errors[code] += 1
        await self._send(wire.Error(sid, code, reason[: wire.MAX_REASON]))
        self._closing.add(sid)
        self._close_reason[sid] = code
        self._wake.set()

    # ---- the stage loop ------------------------------------------------------------------
    async def _close_pending(self, now: float) -> None:
        for sid in self.scheduler.idle(now):
            self.errors["idle_timeout"] += 1
            self._closing.add(sid)
            self._close_reason[sid] = "idle_timeout"
        if self._closing:
            gone, self._closing = self._closing, set()
            for sid in gone:
                if self._dtype.pop(sid, None) is not None:
                    self.scheduler.close(sid)
                    await self._in_worker(self.cloud.close, sid)
                    if self.trainer is not None:
                        await self._in_worker(self.trainer.close, sid)
                    self.closed_sessions += 1
                    self._last_handoff.pop(sid, None)
                    self.events.closed(sid, self._close_reason.pop(sid, "closed"), now)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        idle_check = min(1.0, self.scheduler.idle_timeout_s / 4)
        while True:
            await self._close_pending(time.monotonic())
            batch = self.scheduler.next_batch(time.monotonic())
            if not batch:
                if self.overlap and self._need_prepare:
                    self._need_prepare = False
                    t0 = loop.time()
                    await self._in_worker(self.cloud.prepare)
                    self.busy_s += loop.time() - t0
                    continue
                self._wake.clear()
                wake_at = self.scheduler.wake_at     # a group is gathering its stragglers
                delay = idle_check if wake_at is None else max(0.0, wake_at - time.monotonic())
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the
                # cancellation that stop() sends, leaving this loop (and stop) hanging
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            t0 = loop.time()
            queue_s = self.scheduler.last_queue_s
            answers = await self._in_worker(self.cloud.run, batch)
            dt = loop.time() - t0
            self.busy_s += dt
            self.events.stage(len(batch), self.scheduler.last_tokens, dt, queue_s)
            self._need_prepare = True
            for ans in answers:
                if isinstance(ans, wire.Error):
                    await self._refuse(ans.session, ans.code, ans.reason)
                else:
                    await self._send(ans)

    async def _train(self, msg) -> None:
        """One training message of one session (its device sends the next one only after
        this answer), computed on the same worker thread as the serving stages."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ans = await self._in_worker(self.trainer.handle, msg)
        self.busy_s += loop.time() - t0
        if isinstance(ans, wire.Error):
            await self._refuse(ans.session, ans.code, ans.reason)
        elif ans.session in self._dtype:
            try:
                await self.server.send(ans, dtype=wire_dtype(ans, self._dtype[ans.session]))
            except Exception:      # the device went away: its connection's Close frees the session
                pass

    async def _send(self, ans) -> None:
        dtype = self._dtype.get(ans.session)
        if dtype is None:          # closed meanwhile
            return
        try:
            if isinstance(ans, wire.Handoff):
                self.scheduler.expect(ans.session, -1)        # the device's next token comes next
                self.events.hand_out(ans.session, time.monotonic())
                await self.server.send(ans, dtype=wire.HANDOFF_DTYPE[dtype])
            else:
                if isinstance(ans, wire.Activations):
                    self.scheduler.expect(ans.session, ans.layer)
                    self.events.activations(ans.session, ans.layer, time.monotonic())
                await self.server.send(ans)
        except Exception:          # the device went away: its connection's Close frees the session
            pass
