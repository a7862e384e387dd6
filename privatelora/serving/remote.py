"""The device driver over TCP, and how a device's sessions survive the cloud losing them.

``run_remote(target, part, prompt, params)`` drives one device session through exactly
the ``Generation`` state machine the in-process runner uses. ``target`` is a
``transport.Client`` or a ``Connector`` (where to open sessions: one address, which may
be a front door that redirects, or a router).

With ``resume=Resume(...)`` a session the cloud loses is not the generation's end: on a
dropped connection, an answer that says the cloud let the session go (``busy``,
``silent_device``, ``draining``, ...) or no answer within ``timeout``, the device opens a
new session (elsewhere if it can), replays the tokens it holds and carries on
(``Generation.resume``); the output is the one an uninterrupted run gives. Attempts are
bounded, with exponential backoff and jitter; when they run out the generation ends with
the last error, as it would have without ``resume``.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from dataclasses import dataclass

from privatelora import wire
from privatelora.model.sampling import SamplingParams
from privatelora.runtime.device import logits_many, replies_many
from privatelora.runtime.generation import Generation
from privatelora.transport import ByteStats, Client, Redirected, RemoteError

# Error codes after which the same tokens can be served again by a new session. The others
# (bad_position, geometry_mismatch, too_many_tokens, ...) would fail the same way again.
RESUMABLE = frozenset({"busy", "too_many_sessions", "session_closed", "idle_timeout", "silent_device",
                       "stage_failed", "draining", "replica_lost", "handler_error", "session_in_use"})


@dataclass(frozen=True)
class Resume:
    """How hard a device tries to keep its generation going: up to ``attempts`` new
    sessions per generation, the n-th after ``min(max_backoff_s, backoff_s * 2**(n-1))``
    seconds, scaled by a random factor in [0.5, 1] so that devices that lost the same
    replica do not all come back at once."""

    attempts: int = 8
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def __post_init__(self):
        if self.attempts < 0 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("Resume needs attempts >= 0 and 0 <= backoff_s <= max_backoff_s")

    def delay(self, n: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (n - 1)) * random.uniform(0.5, 1.0)


class ResumeFailed(ConnectionError):
    """Every attempt to (re)open a session failed; ``last`` is the last failure;
    ``started``: whether any session had opened before (else the cloud was never reached)."""

    def __init__(self, attempts: int, last: BaseException, started: bool = True):
        super().__init__(f"gave up after {attempts} attempts to reach a replica: {type(last).__name__}: {last}")
        self.attempts, self.last, self.started = attempts, last, started


class _Lost(Exception):
    """The cloud ended the session with a resumable ``Error`` (the message)."""

    def __init__(self, msg: wire.Error):
        super().__init__(f"{msg.code}: {msg.reason}")
        self.msg = msg


class Connector:
    """Where a device opens its sessions. ``open(geometry, avoid)`` returns a new
    ``transport.Session``; ``where(session)`` names the replica it is on, and
    ``last_place`` the one the last ``open`` tried, so that a retry can ``avoid`` it.
    Connections are made on demand, one per address, and made again when they drop;
    ``made`` keeps every one (``stats()`` sums their bytes); ``close()`` closes them."""

    last_place = None

    def __init__(self, *, link=None, seed: int | None = None, timeout: float = 10.0, compress: str = "auto"):
        self._link, self._seed, self._timeout, self._compress = link, seed, timeout, compress
        self._clients: dict[tuple, Client] = {}
        self.made: list[Client] = []

    async def open(self, geometry: wire.Geometry, avoid=frozenset()):
        raise NotImplementedError

    async def _connect(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                       server_hostname: str | None = None) -> Client:
        """The live connection to ``host:port``, made now if there is none."""
        c = self._clients.get((host, port))
        if c is None or c.closed:
            c = await Client.connect(host, port, ssl_context=ssl_context,
                                     server_hostname=server_hostname if ssl_context else None,
                                     link=self._link, seed=self._seed, timeout=self._timeout,
                                     compress=self._compress)
            self._clients[(host, port)] = c
            self.made.append(c)
        return c

    async def _connect_pinned(self, host: str, port: int, cert: str = "") -> Client:
        """A connection to a replica whose PEM certificate we were handed (none on loopback)."""
        ctx = ssl.create_default_context(cadata=cert) if cert else None
        return await self._connect(host, port, ctx, host)

    def where(self, session):
        for key, c in self._clients.items():
            if c is session.client:
                return key
        return None

    def stats(self) -> ByteStats:
        """Bytes over every connection this connector made, summed."""
        total = ByteStats()
        for c in self.made:
            total.merge(c.stats)
        return total

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()


class ClientConnector(Connector):
    """One connection, made elsewhere: sessions re-open on it while it lives."""

    def __init__(self, client: Client):
        super().__init__()
        self.client = client
        self.made.append(client)

    async def open(self, geometry, avoid=frozenset()):
        if self.client.closed:
            raise ConnectionError("connection closed")
        return await self.client.open(geometry)

    def where(self, session):
        return id(session.client)

    async def close(self) -> None:    # the connection is its maker's to close
        pass


class AddressConnector(Connector):
    """Sessions at ``host:port``: a ``cloud`` endpoint, a replica, or the front door of a
    ``serve`` (which answers ``Open`` with the replica to use: the device follows it,
    trusting the certificate the front door vouched for). ``ssl_context`` (or ``ca``) is
    the trust for ``host`` itself."""

    def __init__(self, host: str, port: int, *, ca: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, link=None, seed: int | None = None, timeout: float = 10.0,
                 compress: str = "auto"):
        super().__init__(link=link, seed=seed, timeout=timeout, compress=compress)
        self.host, self.port = host, port
        self._ca, self._ctx, self._name = ca, ssl_context, server_hostname
        self.redirects = 0

    async def open(self, geometry, avoid=frozenset()):
        self.last_place = (self.host, self.port)
        if self._ctx is None and self._ca:
            from privatelora.transport import client_ssl_context
            self._ctx = client_ssl_context(self._ca)
        c = await self._connect(self.host, self.port, self._ctx, self._name)
        try:
            return await c.open(geometry, timeout=self._timeout)
        except Redirected as r:
            self.redirects += 1
            self.last_place = (r.host, r.port)
            replica = await self._connect_pinned(r.host, r.port, r.cert)
            try:
                return await replica.open(geometry, timeout=self._timeout)
            except Redirected:
                raise RemoteError("protocol", f"{r.host}:{r.port} redirected again: a replica must not redirect")


class DeviceBatch:
    """One device process's sessions (an edge host's users) answered together.

    Pass the same ``DeviceBatch`` to every ``run_remote`` of the process (``batch=``). Each
    read burst of a connection (a stage's activations for all of its sessions, arriving in
    one write) is answered right there, in the read loop's turn: every session's ``M a`` at
    one layer in one batched product (``runtime.device.replies_many``), the replies in one
    write, no coroutine woken per user. The final hand-offs that arrive
    together get their LM heads in one product (``runtime.device.logits_many``: one read of
    the head's weights for all users) before their sessions sample. Values, accounting and
    round-trip counts are those of the per-session path; everything else (errors,
    hand-offs) goes to the session's own loop as before, and so does an activation whose
    answer fails (that loop then meets the failure the way it would have alone)."""

    def __init__(self):
        self._runs: dict = {}        # transport Session -> (Generation, observe)
        self._stacks: dict = {}      # stacked M^T of a layer's sessions (``replies_many``)

    def attach(self, sess, gen: Generation, observe) -> None:
        self._runs[sess] = (gen, observe)
        sess.burst = self

    def detach(self, sess) -> None:
        self._runs.pop(sess, None)
        sess.burst = None

    def __call__(self, client, items: list) -> None:
        # the client hands over only sessions whose ``burst`` is this batch: attached ones
        acts = [(sess, self._runs[sess], msg) for sess, msg in items if isinstance(msg, wire.Activations)]
        backs = [(self._runs[sess][0].device, msg) for sess, msg in items if isinstance(msg, wire.Handoff)]
        if backs:
            logits_many(backs)
        now = asyncio.get_running_loop().time()
        answered, replies = [], []
        reps = replies_many([(run[0].device, msg) for _, run, msg in acts], self._stacks)
        for (sess, run, msg), rep in zip(acts, reps):
            if isinstance(rep, BaseException):    # the session's own loop meets the failure again
                sess.deliver(msg)
                continue
            replies.append(rep)
            answered.append((sess, run, msg))
        # one bundle frame for all the replies (a failure is its session's alone)
        for (sess, (gen, observe), msg), res in zip(answered, client.answer_many(replies)):
            if isinstance(res, BaseException):
                sess.deliver(msg)
                continue
            if observe is not None:
                observe(msg)
            gen.round_trips += 1
            sess.last_heard = now
        for sess, msg in items:
            if not isinstance(msg, wire.Activations):
                sess.deliver(msg)


def _resumable(e: BaseException) -> bool:
    if isinstance(e, _Lost):
        return True
    if isinstance(e, Redirected):
        return False
    if isinstance(e, RemoteError):
        return e.code in RESUMABLE
    return isinstance(e, (ConnectionError, OSError, TimeoutError, asyncio.TimeoutError))


async def run_remote(target, part, prompt, params: SamplingParams | None = None, *,
                     dtype: str = "fp32", keep_logits: bool = False, timeout: float = 60.0,
                     observe=None, draft=None, draft_tokens: int = 4, on_tokens=None, on_new=None,
                     resume: Resume | None = None, batch: DeviceBatch | None = None) -> Generation:
    """Generate for one user through ``target`` (a ``Client`` or a ``Connector``); returns
    the finished ``Generation``.

    ``observe(msg)``, if given, sees every message the cloud sent (benchmarks use it to
    tell prefill from decode traffic). ``draft``: speculative decoding drafted on the
    device (``runtime/draft.py``). ``on_tokens(n)``: called when the session has produced
    ``n`` tokens in all (benchmarks time the arrivals). ``on_new(gen, tokens)``: called
    with the generation and its new tokens as they arrive (the HTTP API streams them);
    ``gen.finish()`` there ends the generation. ``resume``: keep going when the
    cloud loses the session (module docstring); the generation's ``resumes`` and
    ``recoveries`` (seconds from each loss to the lost chain's answer) say what it cost.
    ``batch``: this process's ``DeviceBatch``, shared by its sessions (an edge host)."""
    params = params or SamplingParams()
    conn = target if isinstance(target, Connector) else ClientConnector(target)
    geometry = wire.session_geometry(part.exchange_ids, part.model_config.hidden_size, part.cfg, dtype)
    handoff_dtype = wire.HANDOFF_DTYPE[dtype]
    gen: Generation | None = None
    avoid: set = set()
    failures, lost_at = 0, None
    while True:
        sess = None
        try:
            sess = await conn.open(geometry, frozenset(avoid))
            dev = part.session(sess.id, bytes_per_number=wire.DTYPES[dtype])
            if gen is None:
                gen = Generation(dev, list(prompt), params, keep_logits=keep_logits, draft=draft,
                                 draft_tokens=draft_tokens)
                if draft is not None:
                    draft.reset()
                msg = gen.start()
            else:
                msg = gen.resume(dev, geometry.max_tokens)
            if batch is not None:
                batch.attach(sess, gen, observe)
            try:
                while msg is not None:
                    await sess.send(msg, dtype=handoff_dtype if isinstance(msg, wire.Handoff) else None)
                    ans = await sess.recv(timeout)
                    if resume is not None and isinstance(ans, wire.Error) and ans.code in RESUMABLE \
                            and failures < resume.attempts:
                        raise _Lost(ans)
                    if observe is not None:
                        observe(ans)
                    if lost_at is not None and isinstance(ans, wire.Handoff) and not gen.replaying:
                        gen.recoveries.append(time.monotonic() - lost_at)    # back where it was lost
                        lost_at = None
                    have = len(gen.tokens)
                    msg = gen.on(ans)
                    if len(gen.tokens) > have:
                        if on_tokens is not None:
                            on_tokens(len(gen.tokens))
                        if on_new is not None:
                            on_new(gen, gen.tokens[have:])
                            if gen.done:        # the caller finished it (``Generation.finish``)
                                msg = None
            finally:
                if batch is not None:
                    batch.detach(sess)
                if not sess.client.closed:
                    try:
                        await sess.close()
                    except ConnectionError:
                        pass
            return gen
        except (RemoteError, ConnectionError, OSError, TimeoutError, asyncio.TimeoutError, _Lost) as e:
            if resume is None or not _resumable(e) or failures >= resume.attempts:
                if resume is not None and failures and not isinstance(e, _Lost) and _resumable(e):
                    raise ResumeFailed(failures + 1, e, started=gen is not None) from e
                raise
            failures += 1
            if gen is not None and lost_at is None:    # a recovery is of a started generation only
                lost_at = time.monotonic()
            place = conn.where(sess) if sess is not None else conn.last_place    # where it failed
            if place is not None:
                avoid.add(place)
            await asyncio.sleep(resume.delay(failures))
