"""The protocol over TCP: a cloud endpoint and a remote device driver (no Ray).

``CloudEndpoint`` puts a ``CloudPart`` behind a ``transport.Server``. Messages from all
connections go to one ``Scheduler`` (admission, stage grouping, fairness, token budget,
idle reclaim); a single loop takes its next batch, runs it in one worker thread so the
event loop keeps reading sockets meanwhile, and sends each answer to the connection that
owns the session. While no reply is in, it precomputes the frozen ``W h`` of the sessions it waits
on (``docs/design.md``). Stage work and cache frees run on that one worker thread;
``CloudPart.open`` (one dict insert) runs on the event loop, so an ``Open`` never waits
for a stage.

Fault isolation: a stage that fails ends only the sessions it concerns (the cloud retries
each alone; ``Error("stage_failed")``); answers are queued on each connection and never
awaited (``transport.Server``), so a peer that stops reading costs nobody else anything;
an answer the encoder refuses becomes an ``Error`` for its session. A failure of the loop
itself is retried; after ``max_loop_failures`` in a row it stops and ``check_health``
reports the replica unhealthy (Ray restarts it: ``actors.pool``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from privatelora import wire
from privatelora.serving.scheduler import TRAIN, Busy, Scheduler, UnknownSession
from privatelora.serving.timeline import Timeline
from privatelora.training.cloud import CloudTrainer
from privatelora.training.device import wire_dtype
from privatelora.transport import Server

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 1e-4     # the GIL's switch interval when compute and IO run on their own cores


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
    wait (``max_waiting``), and beyond that get ``Error("busy")``. At most
    ``max_open_per_connection`` sessions may be open on one connection and ``max_open`` in
    all; a further ``Open`` is refused (``too_many_sessions``). A session silent for
    ``idle_timeout_s`` is closed and its cache freed (``idle_timeout``; ``silent_device``
    when the cloud was waiting on it mid-step); so is every session of a connection that
    drops. A peer whose frame is refused gets an ``Error`` and is disconnected
    (``disconnect_on_refusal``); a request the cloud refuses (out of order, bad position)
    gets an ``Error`` and closes that session only. A peer that leaves more than
    ``max_pending_write`` bytes unread, or whose socket does not drain for
    ``send_timeout_s``, is disconnected.
    """

    def __init__(self, cloud, host: str = "127.0.0.1", port: int = 0, *, max_sessions: int = 256,
                 max_waiting: int | None = None, max_open: int | None = None, max_open_per_connection: int = 256,
                 token_budget: int = 4096, max_wait_s: float = 0.05,
                 idle_timeout_s: float = 120.0, gather_s: float = 0.01, merge: bool = True,
                 overlap: bool = True, max_loop_failures: int = 8,
                 disconnect_on_refusal: bool = True, training: bool = True,
                 events: EndpointEvents | None = None, compute_cores: list[int] | None = None,
                 io_cores: list[int] | None = None, **server_kw):
        self.cloud = cloud
        self.events = events or EndpointEvents()
        self._last_handoff: dict[int, tuple] = {}    # session -> (start, rows, first) of its last hand-off
        self._close_reason: dict[int, str] = {}
        waiting = max_sessions if max_waiting is None else max_waiting
        self.max_open = 2 * (max_sessions + waiting) if max_open is None else max_open
        self.max_open_per_connection = max_open_per_connection
        if self.max_open < 1 or max_open_per_connection < 1 or max_loop_failures < 1:
            raise ValueError("max_open, max_open_per_connection and max_loop_failures must be >= 1")
        self.scheduler = Scheduler(max_running=max_sessions, max_waiting=waiting,
                                   token_budget=token_budget, max_wait_s=max_wait_s, idle_timeout_s=idle_timeout_s,
                                   gather_s=gather_s, merge=merge)
        self.overlap = overlap
        self.server = Server(self._handle, host, port, disconnect_on_refusal=disconnect_on_refusal, **server_kw)
        self._dtype: dict[int, str] = {}             # open session -> wire dtype it declared
        self._closing: set[int] = set()
        self._wake = asyncio.Event()
        # the stages' thread runs on compute_cores, the event loop (sockets, frame codec) on
        # io_cores, which may be the same cores (actors.pool.split_cores; Linux only)
        self.compute_cores, self.io_cores = compute_cores, io_cores
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="privatelora-cloud",
                                        initializer=_pin_thread, initargs=(compute_cores,))
        self._task: asyncio.Task | None = None
        self.timeline: Timeline | None = None       # a benchmark's record of the stage loop's time
        self._need_prepare = False
        self.max_loop_failures = max_loop_failures
        self.failure: str | None = None              # why the stage loop stopped, once it has
        self.busy_s = 0.0                            # time the backbone spent computing
        self.errors: Counter = Counter()             # Error answers by code
        self.faults: Counter = Counter()             # internal failures survived, by where
        self.closed_sessions = 0
        self.queue_s_total = 0.0                     # time stages' requests waited, summed (autoscaling)
        self.draining = False                        # leaving: no new session (``drain``)
        # split training (privatelora.training): admitted and scheduled like serving (TRAIN)
        self.trainer = CloudTrainer(cloud) if training else None

    @property
    def address(self):
        return self.server.address

    async def start(self) -> "CloudEndpoint":
        if self.io_cores:
            # the stage thread and the event loop now run at once on different cores, but
            # share the GIL: each torch op the stage thread finishes waits for the loop's
            # Python code to let go of it, up to the switch interval (5 ms by default, about
            # a layer's time). A short interval bounds that wait.
            import sys
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        _pin_thread(self.io_cores)
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

    def check_health(self) -> None:
        """Raise ``RuntimeError`` if the stage loop is not running (the replica must restart)."""
        if self.failure is not None:
            raise RuntimeError(f"stage loop stopped: {self.failure}")
        if self._task is None or self._task.done():
            raise RuntimeError("stage loop is not running")

    def drain(self, evict: bool = False) -> int:
        """Take no new session from now on (``Open`` gets ``draining``); with ``evict``, also
        end every open session with ``Error("draining")`` (its device resumes it elsewhere).
        Returns how many sessions were ended."""
        self.draining = True
        if not evict:
            return 0
        sids = [sid for sid in self._dtype if sid not in self._closing]
        for sid in sids:
            self._refuse(sid, "draining", "this replica is leaving: open the session again elsewhere")
        return len(sids)

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
                "kv_bytes": self.cloud.kv_bytes(), "kv": self.cloud.kv.gauges(),
                "refusals": dict(self.server.refusals),
                "disconnects": dict(self.server.disconnects), "errors": dict(self.errors),
                "faults": dict(self.faults), "healthy": self.failure is None, "excused": sch.excused,
                "fairness_picks": sch.stats.fairness_picks, "reclaimed": sch.stats.reclaimed,
                "gather_waits": sch.stats.gather_waits, "batch_sizes": dict(sch.stats.sizes),
                "closed_sessions": self.closed_sessions, "queue_s_total": self.queue_s_total,
                "draining": self.draining, "bytes": self.server.stats.as_dict()}

    async def _in_worker(self, fn, *args):
        loop = asyncio.get_running_loop()
        tl, kind = self.timeline, getattr(fn, "__name__", "")
        if tl is None or kind not in ("run", "prepare"):
            return await loop.run_in_executor(self._pool, fn, *args)
        clock = [time.monotonic(), 0.0, 0.0]     # submitted, started, ended: ``Timeline``

        def timed(*a):
            clock[1] = time.monotonic()
            try:
                return fn(*a)
            finally:
                clock[2] = time.monotonic()
        try:
            return await loop.run_in_executor(self._pool, timed, *args)
        finally:
            tl.call(kind, *clock, time.monotonic())

    def _event(self, name: str, *args) -> None:
        """Report to ``events``; an exporter's bug is counted, never fatal."""
        try:
            getattr(self.events, name)(*args)
        except Exception:
            if not self.faults["events"]:
                log.exception("endpoint event %s failed", name)
            self.faults["events"] += 1

    # ---- messages from the transport (runs on the connection's read loop) -------------
    async def _handle(self, conn, msg) -> None:
        now = time.monotonic()
        if isinstance(msg, wire.Open):
            self._open(conn, msg, now)
            return
        if isinstance(msg, wire.Close):
            if msg.session in self._dtype:
                self._closing.add(msg.session)
                self._wake.set()
            return
        train = self.trainer is not None and self.trainer.accepts(msg)
        if train:
            stage, tokens = TRAIN, 1
        elif isinstance(msg, (wire.Handoff, wire.Reply)):
            stage = msg.layer if isinstance(msg, wire.Reply) else -1
            tokens = msg.hidden.shape[0] if isinstance(msg, wire.Handoff) else msg.m[0].shape[0]
        else:                      # an Error frame from the device: nothing to schedule
            return
        try:
            self.scheduler.submit(msg.session, stage, tokens, msg, now)
        except Busy as e:
            self._refuse(msg.session, "busy", str(e))
            return
        except UnknownSession:
            return
        if isinstance(msg, wire.Handoff):
            first = msg.session not in self._last_handoff
            self._chain_done(msg.session, msg.start, tokens, first, now)
            if self.timeline is not None:
                self.timeline.hand_in(now)
            self._event("hand_in", msg.session, tokens, first, now)
        elif not train:
            self._event("reply", msg.session, msg.layer, now)
            if self.timeline is not None:
                self.timeline.reply(now)
        self._wake.set()

    def _open(self, conn, msg: wire.Open, now: float) -> None:
        if self.draining:
            raise wire.WireError("draining", "this replica is leaving: open the session elsewhere")
        g = msg.geometry
        want = wire.session_geometry(self.cloud.exchange_ids, self.cloud.hidden, self.cloud.cfg, g.dtype, g.max_tokens)
        if g.layers != want.layers:
            raise wire.WireError("geometry_mismatch", f"this backbone adapts cloud layers {list(want.layers)}, the "
                                 f"session declared {list(g.layers)}: the adapter's placement must match the "
                                 "endpoint's --adapted-layers")
        if g.projections != want.projections:
            raise wire.WireError("geometry_mismatch", f"this endpoint's public A and B are {self.cloud.cfg.projection} "
                                 f"projections with fingerprint {want.projections!r}, the session declared "
                                 f"{g.projections!r}: the adapter must be trained against the endpoint's "
                                 "--projection (and seed)")
        if g != want:
            raise wire.WireError("geometry_mismatch", f"this backbone serves {want}, session declared {g}")
        if g.max_tokens > self.cloud.max_tokens_per_request:
            raise wire.WireError("geometry_mismatch", f"max_tokens above {self.cloud.max_tokens_per_request}")
        if len(conn.sessions) > self.max_open_per_connection:     # conn.sessions holds this one already
            raise wire.WireError("too_many_sessions", f"a connection may hold {self.max_open_per_connection} open "
                                 "sessions: close one first")
        if msg.session in self._dtype or msg.session in self.cloud.sessions:
            raise wire.WireError("session_in_use", f"session {msg.session} is still closing: open another id")
        if len(self._dtype) - len(self._closing) >= self.max_open:
            raise wire.WireError("too_many_sessions", f"this replica holds {self.max_open} open sessions: try "
                                 "again later or another replica")
        self.cloud.open(msg.session)        # a dict insert: safe beside the worker thread, no wait
        self.scheduler.open(msg.session, now)
        self._dtype[msg.session] = g.dtype
        self._event("opened", msg.session, now)

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
        self._event("chain", sid, generated, drafted, accepted, len(self.cloud.exchange_ids) + 1, now)

    def _refuse(self, sid: int, code: str, reason: str) -> None:
        """Answer ``Error`` on the session and close it (its cache is freed; the server
        forgets its key, so the device's ``Close`` for it is simply ignored)."""
        self.errors[code] += 1
        try:
            self.server.send_nowait(wire.Error(sid, code, reason[: wire.MAX_REASON]))
        except Exception:          # the device is gone: the session closes all the same
            pass
        self.server.forget(sid)
        if sid in self._dtype:
            self._closing.add(sid)
            self._close_reason.setdefault(sid, code)
            self._wake.set()

    # ---- the stage loop ------------------------------------------------------------------
    async def _close_pending(self, now: float) -> None:
        for sid in self.scheduler.idle(now):
            if self.scheduler.owes(sid):
                self._refuse(sid, "silent_device", f"no answer for {self.scheduler.idle_timeout_s:g} s in mid-step: "
                             "the session is closed")
            else:
                self._refuse(sid, "idle_timeout", f"idle for {self.scheduler.idle_timeout_s:g} s: the session is closed")
        if not self._closing:
            return
        gone, self._closing = [sid for sid in self._closing if sid in self._dtype], set()
        for sid in gone:
            del self._dtype[sid]
            self.scheduler.close(sid)
            self._last_handoff.pop(sid, None)
        self.closed_sessions += len(gone)
        try:                       # one worker call frees them all: a mass disconnect is one pause
            await self._in_worker(self._free, gone)
        except Exception:
            self.faults["close"] += 1
            log.exception("freeing %d sessions failed", len(gone))
        for sid in gone:
            self._event("closed", sid, self._close_reason.pop(sid, "closed"), now)

    def _free(self, sids: list[int]) -> None:
        for sid in sids:
            self.cloud.close(sid)
            if self.trainer is not None:
                self.trainer.close(sid)

    async def _loop(self) -> None:
        """Run stages until stopped. A failed step is counted and retried after a pause;
        ``max_loop_failures`` failures in a row stop the loop and mark the endpoint
        unhealthy (``check_health``)."""
        failures = 0
        while True:
            try:
                await self._step()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                self.faults["loop"] += 1
                log.exception("stage loop step failed (%d in a row)", failures)
                if failures >= self.max_loop_failures:
                    self.failure = f"{failures} failures in a row, the last {type(e).__name__}: {e}"
                    log.error("stage loop stopped: %s", self.failure)
                    return
                await asyncio.sleep(min(1.0, 0.01 * 2 ** failures))

    async def _step(self) -> None:
        loop = asyncio.get_running_loop()
        await self._close_pending(time.monotonic())
        batch = self.scheduler.next_batch(time.monotonic())
        if not batch:
            if self.overlap and self._need_prepare:
                self._need_prepare = False
                t0 = loop.time()
                await self._in_worker(self.cloud.prepare)
                self.busy_s += loop.time() - t0
                return
            self._wake.clear()
            wake_at = self.scheduler.wake_at     # a group is gathering its stragglers
            idle_check = min(1.0, self.scheduler.idle_timeout_s / 4)
            delay = idle_check if wake_at is None else max(0.0, wake_at - time.monotonic())
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the
            # cancellation that stop() sends, leaving this loop (and stop) hanging
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            return
        if self.scheduler.last_stage == TRAIN:
            await self._train(batch[0])
            return
        t0 = loop.time()
        queue_s = self.scheduler.last_queue_s
        try:
            answers = await self._in_worker(self.cloud.run, batch)
        except Exception as e:     # beyond the cloud's own per-session isolation: end this batch only
            self.faults["stage"] += 1
            log.exception("stage failed for %d sessions", len(batch))
            answers = [wire.Error(req.session, "stage_failed", f"the stage failed: {type(e).__name__}")
                       for req in batch]
        dt = loop.time() - t0
        self.busy_s += dt
        self.queue_s_total += queue_s
        self._event("stage", len(batch), self.scheduler.last_tokens, dt, queue_s)
        self._need_prepare = True
        sends = []
        for ans in answers:
            if isinstance(ans, wire.Error):
                self._refuse(ans.session, ans.code, ans.reason)
            else:
                sends.append(ans)
        self._send(*sends)       # one coalesced write per connection (Server.send_many)

    async def _train(self, msg) -> None:
        """One training message of one session (its device sends the next one only after
        this answer), computed on the same worker thread as the serving stages."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            ans = await self._in_worker(self.trainer.handle, msg)
        except Exception as e:
            self.faults["train"] += 1
            log.exception("training step failed")
            ans = wire.Error(msg.session, "stage_failed", f"the training step failed: {type(e).__name__}")
        self.busy_s += loop.time() - t0
        if isinstance(ans, wire.Error):
            self._refuse(ans.session, ans.code, ans.reason)
        elif ans.session in self._dtype:
            self._deliver(ans, wire_dtype(ans, self._dtype[ans.session]))

    def _send(self, *answers) -> None:
        """Queue a stage's answers with one ``Server.send_many``: one write per connection,
        views of one stage buffer converted once. Per answer as before: a closed session's
        is dropped, a queued one is expected back (``scheduler.expect``) and reported, an
        encoder refusal ends its session alone (``_delivered``)."""
        items = []
        for ans in answers:
            dtype = self._dtype.get(ans.session)
            if dtype is None:      # closed meanwhile
                continue
            items.append((ans, wire.HANDOFF_DTYPE[dtype] if isinstance(ans, wire.Handoff) else None))
        if not items:
            return
        if self.timeline is not None and any(d is not None for _, d in items):
            self.timeline.hand_out(time.monotonic())
        for (ans, _), failure in zip(items, self.server.send_many(items)):
            if not self._delivered(ans, failure):
                continue
            if isinstance(ans, wire.Handoff):
                self.scheduler.expect(ans.session, -1)        # the device's next token comes next
                self._event("hand_out", ans.session, time.monotonic())
            elif isinstance(ans, wire.Activations):
                self.scheduler.expect(ans.session, ans.layer)
                self._event("activations", ans.session, ans.layer, time.monotonic())

    def _deliver(self, ans, dtype: str | None) -> bool:
        """Queue ``ans`` on its connection (True if queued); an answer the encoder refuses
        (an fp16 overflow, say) ends its session with an ``Error`` instead of leaving the
        device waiting."""
        try:
            self.server.send_nowait(ans, dtype=dtype)
        except Exception as e:
            return self._delivered(ans, e)
        return True

    def _delivered(self, ans, failure: BaseException | None) -> bool:
        """True if ``ans`` was queued (``failure`` None); ``ConnectionError``: the device went
        away (its connection's Close frees the session); any other failure is the encoder's
        refusal: ``encode_failed`` ends that session."""
        if failure is None:
            return True
        if isinstance(failure, ConnectionError):
            return False
        self.faults["encode"] += 1
        e = failure
        code, reason = (e.code, e.reason) if isinstance(e, wire.WireError) else ("encode_failed", repr(e))
        self._refuse(ans.session, "encode_failed", f"the cloud could not send its answer ({code}: {reason})")
        return False


def _pin_thread(cores) -> None:
    """Restrict the calling thread to ``cores`` (Linux; None or elsewhere: unchanged)."""
    import os
    if not cores or not hasattr(os, "sched_setaffinity"):
        return
    want = {c for c in cores if c in os.sched_getaffinity(0)} or None
    if want:
        os.sched_setaffinity(0, want)       # pid 0: this thread only
