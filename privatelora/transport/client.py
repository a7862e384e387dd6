"""The device side of the transport: ``Client`` (one connection) and its ``Session``s.

A client opens sessions on one connection (``Client.open``), each with a fresh HMAC key and
the session's ``Geometry``; frames for a session arrive on its own queue. ``link=`` shapes
both directions like a real network (``transport/link.py``). TLS: see ``transport/tls.py``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections import Counter

from privatelora import wire
from privatelora.transport.link import LinkProfile, Shaper, get_profile
from privatelora.transport.stats import ByteStats
from privatelora.transport.streams import CLOSED, READ_LIMIT, Redirected, RemoteError, nodelay, read_frame
from privatelora.transport.tls import TLSRequiredError, client_ssl_context, is_loopback

log = logging.getLogger(__name__)
KIND_AT = wire.PREFIX.size + 1      # a frame's kind byte: after the length prefix and the version


class Session:
    """A client-side session: its id, geometry and incoming queue. The key stays hidden."""

    def __init__(self, client: "Client", sid: int, key: bytes, geometry: wire.Geometry):
        self.client, self.id, self._key, self.geometry = client, sid, key, geometry
        self._queue: asyncio.Queue = asyncio.Queue()
        # set by a caller that answers some of this session's frames itself (``Client`` module
        # docstring: bursts); ``last_heard``: when the last of those came in
        self.burst = None
        self.last_heard = 0.0

    def __repr__(self) -> str:
        return f"Session(id={self.id}, geometry={self.geometry!r})"

    def deliver(self, msg: wire.Message) -> None:
        """Queue ``msg`` for ``recv`` (a burst handler passing on what it does not answer)."""
        self._queue.put_nowait(msg)

    async def send(self, msg: wire.Message, *, dtype: str | None = None) -> wire.FrameInfo:
        if msg.session != self.id:
            raise ValueError(f"message for session {msg.session} sent on session {self.id}")
        return await self.client.send(msg, dtype=dtype)

    async def recv(self, timeout: float | None = None) -> wire.Message:
        """Next message for this session (Error frames included). ConnectionError if closed.
        ``timeout``: the longest the cloud may stay silent on this session; frames a
        ``burst`` handler answered count as heard."""
        try:                    # fast path: the answer is often in already
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout is None:
                item = await self._queue.get()
            else:               # asyncio.timeout, not wait_for: no extra task per message
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            item = await self._queue.get()
                        break
                    except TimeoutError:      # silent that long, unless a burst handler heard it
                        deadline = self.last_heard + timeout
                        if deadline <= loop.time():
                            raise
        if item is CLOSED:
            self._queue.put_nowait(CLOSED)  # every later recv fails the same way
            raise ConnectionError("connection closed")
        return item

    async def close(self) -> None:
        """Tell the cloud to free the session; forget its key."""
        try:
            await self.client.send(wire.Close(self.id))
        finally:
            self.client._sessions.pop(self.id, None)


class Client:
    """Device side of one connection; create with ``await Client.connect(...)``.

    Writes are coalesced: frames sent during one pass of the event loop (an edge host's
    sessions answering the activations that arrived together) leave in ONE transport write
    at the end of that pass, in the order sent (``coalesce = False``: one write per frame).

    Bursts: frames for a session whose ``burst`` is set skip its queue; once the read loop
    has taken every frame the socket had (one read burst: a stage's answers for all of an
    edge host's sessions), ``burst(client, [(session, message), ...])`` is called once
    with them, and answers what it can at once (``answer``) and passes the rest on
    (``Session.deliver``). An edge host so answers a stage for all its users in one
    batched computation, without waking one coroutine per user, and sends the answers in
    one bundle frame (``answer_many``; ``wire/bundle.py``); bundles the cloud sends are read
    entry by entry, each entry as the frame it stands for.
    """

    coalesce = True
    bundle_replies = True   # ``answer_many`` sends one bundle (False: one frame each)

    def __init__(self, reader, writer, *, max_frame: int, compress: str,
                 link: LinkProfile | None, seed: int | None):
        self._reader, self._writer = reader, writer
        self.max_frame, self.compress = max_frame, compress
        self._sessions: dict[int, Session] = {}
        self.stats = ByteStats()
        self.refusals: Counter[str] = Counter()  # incoming frames we refused
        self.errors: asyncio.Queue = asyncio.Queue()  # Error frames on session 0
        self.closed = False
        self._out: list[bytes] = []  # frames of this loop pass, written together by _flush
        self._burst: list = []       # (session, message) of this read burst, for burst handlers
        self._shaper = (Shaper(link, send=self._write_now, deliver=self._on_frame, seed=seed)
                        if link is not None and link.shaped else None)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str = "127.0.0.1", port: int = 0, *, ca: str | None = None,
                      cert: str | None = None, key: str | None = None,
                      ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                      link: LinkProfile | str | None = None, seed: int | None = None,
                      max_frame: int = wire.DEFAULT_MAX_FRAME, compress: str = "auto",
                      timeout: float = 10.0) -> "Client":
        if ssl_context is None and (ca or cert):
            ssl_context = client_ssl_context(ca, cert, key)
        if ssl_context is None and not is_loopback(host):
            raise TLSRequiredError(f"refusing plain TCP to {host!r}: off loopback the stream must "
                                   "be encrypted; pass ca= (or ssl_context=)")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ssl_context, server_hostname=server_hostname if ssl_context else None,
            limit=READ_LIMIT), timeout)
        nodelay(writer)
        profile = get_profile(link) if isinstance(link, str) else link
        return cls(reader, writer, max_frame=max_frame, compress=compress, link=profile, seed=seed)

    async def open(self, geometry: wire.Geometry, *, timeout: float | None = 10.0) -> Session:
        """Open a session with a fresh random id and key; ``RemoteError`` if refused,
        ``Redirected`` if this address is a front door that places sessions elsewhere."""
        geometry.validate()
        sid = 0
        while sid == 0 or sid in self._sessions:
            sid = secrets.randbits(63)
        sess = Session(self, sid, secrets.token_bytes(wire.KEY_LEN), geometry)
        self._sessions[sid] = sess
        try:
            await self._send(wire.Open(sid, sess._key, geometry), None, None)
            reply = await sess.recv(timeout)
        except BaseException:
            self._sessions.pop(sid, None)
            raise
        if isinstance(reply, wire.Opened):
            return sess
        self._sessions.pop(sid, None)
        if isinstance(reply, wire.Redirect):
            raise Redirected(reply.host, reply.port, reply.cert)
        if isinstance(reply, wire.Error):
            raise RemoteError(reply.code, reply.reason)
        raise RemoteError("protocol", f"expected Opened, got {type(reply).__name__}")

    async def send(self, msg: wire.Message, *, dtype: str | None = None) -> wire.FrameInfo:
        """Send a device -> cloud message on one of this client's sessions."""
        sess = self._sessions.get(msg.session)
        if sess is None and msg.session != 0:
            raise wire.AuthError("unknown_session", f"session {msg.session} is not open here")
        return await self._send(msg, sess, dtype)

    async def _send(self, msg, sess: Session | None, dtype) -> wire.FrameInfo:
        info = self._queue_frame(msg, sess, dtype)
        if self._shaper is None:
            await self._writer.drain()
        return info

    def answer(self, msg: wire.Message, *, dtype: str | None = None) -> wire.FrameInfo:
        """Send a device -> cloud message without awaiting (a burst handler answering the
        frames of one read burst): it leaves with the others sent in this loop pass."""
        sess = self._sessions.get(msg.session)
        if sess is None:
            raise wire.AuthError("unknown_session", f"session {msg.session} is not open here")
        return self._queue_frame(msg, sess, dtype)

    def answer_many(self, msgs: list) -> list:
        """``answer`` for several ``Reply`` messages of this connection's sessions (a burst
        handler's answers): one bundle frame for them all (``wire/bundle.py``). Returns,
        per message, its ``FrameInfo`` or the exception ``answer`` would have raised for
        it alone (that message is then not sent)."""
        if len(msgs) < 2 or not self.bundle_replies:
            return self._answer_each(msgs)
        if self.closed:
            return [ConnectionError("connection closed")] * len(msgs)
        out: list = [None] * len(msgs)
        jobs, where = [], []
        for i, msg in enumerate(msgs):
            sess = self._sessions.get(msg.session)
            if sess is None:
                out[i] = wire.AuthError("unknown_session", f"session {msg.session} is not open here")
            else:
                jobs.append((msg, sess._key, sess.geometry))
                where.append(i)
        frame, results = wire.encode_bundle(jobs, direction=wire.UP, max_frame=self.max_frame)
        if frame is None:               # none went in (over the frame limit, say): one frame each
            return self._answer_each(msgs)
        for i, info in zip(where, results):
            out[i] = info
        self.stats.add_all(wire.UP, [info for info in results if not isinstance(info, BaseException)])
        self._queue_bytes(frame)
        return out

    def _answer_each(self, msgs: list) -> list:
        out = []
        for msg in msgs:
            try:
                out.append(self.answer(msg))
            except Exception as e:
                out.append(e)
        return out

    def _queue_frame(self, msg, sess: Session | None, dtype) -> wire.FrameInfo:
        if self.closed:
            raise ConnectionError("connection closed")
        frame, info = wire.encode_frame(
            msg, key=sess._key if sess else None, direction=wire.UP, dtype=dtype,
            geometry=sess.geometry if sess else None, compress=self.compress,
            max_frame=self.max_frame)
        self.stats.add(wire.UP, info)
        self._queue_bytes(frame)
        return info

    def _queue_bytes(self, frame: bytes) -> None:
        if self._shaper is not None:
            self._shaper.up(frame)
        elif self.coalesce:
            if not self._out:
                asyncio.get_running_loop().call_soon(self._flush)
            self._out.append(frame)
        else:
            self._write_now(frame)

    def _flush(self) -> None:
        """Write the frames queued during this loop pass, in one write."""
        if self._out:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            self._write_now(data)

    def send_raw(self, frame: bytes) -> None:
        """Write bytes as they are (relays and tests), after any queued frame; not counted
        in ``stats``."""
        if self._shaper is not None:
            self._shaper.up(frame)
        else:
            self._flush()
            self._write_now(frame)

    async def recv(self, session: int, timeout: float | None = None) -> wire.Message:
        return await self._sessions[session].recv(timeout)

    def _write_now(self, frame: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(frame)

    def _key_for(self, s: int) -> bytes | None:
        sess = self._sessions.get(s)
        return sess._key if sess else None

    def _geometry_for(self, s: int) -> wire.Geometry | None:
        sess = self._sessions.get(s)
        return sess.geometry if sess else None

    def _on_frame(self, frame: bytes) -> None:
        if len(frame) > KIND_AT and frame[KIND_AT] == wire.BUNDLE_CODE:      # a bundle
            self._on_bundle(frame)
            return
        try:
            msg, info = wire.decode_frame(frame, direction=wire.DOWN, key_for=self._key_for,
                                          geometry_for=self._geometry_for, max_frame=self.max_frame)
        except wire.WireError as e:
            self.refusals[e.code] += 1
            return
        self.stats.add(wire.DOWN, info)
        self._route(msg)

    def _on_bundle(self, frame: bytes) -> None:
        """A bundle of activations: each entry as the frame it stands for."""
        try:
            entries = wire.decode_bundle(frame, direction=wire.DOWN, key_for=self._key_for,
                                         geometry_for=self._geometry_for, max_frame=self.max_frame)
        except wire.WireError as e:
            self.refusals[e.code] += 1
            return
        self.stats.add_all(wire.DOWN, [info for _, msg, info in entries if not isinstance(msg, wire.WireError)])
        for _, msg, info in entries:
            if isinstance(msg, wire.WireError):
                self.refusals[msg.code] += 1
            else:
                self._route(msg)

    def _route(self, msg: wire.Message) -> None:
        sess = self._sessions.get(msg.session)
        if sess is None:
            self.errors.put_nowait(msg)  # session 0: about the connection
        elif sess.burst is not None:
            if not self._burst:
                asyncio.get_running_loop().call_soon(self._end_burst)
            self._burst.append((sess, msg))
        else:
            sess._queue.put_nowait(msg)

    def _end_burst(self) -> None:
        """Hand the frames of one read burst to their sessions' ``burst`` handlers, one call
        per handler; a handler that fails leaves its frames to the sessions' own queues, and
        so does a session whose handler let it go meanwhile."""
        items, self._burst = self._burst, []
        by_handler: dict = {}
        for sess, msg in items:
            if sess.burst is None:
                sess._queue.put_nowait(msg)
            else:
                by_handler.setdefault(sess.burst, []).append((sess, msg))
        for handler, mine in by_handler.items():
            try:
                handler(self, mine)
            except Exception:
                log.exception("burst handler failed; its frames go to their sessions")
                for sess, msg in mine:
                    sess._queue.put_nowait(msg)

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await read_frame(self._reader, self.max_frame)
                if isinstance(frame, str):
                    if frame != "eof":
                        self.refusals[frame] += 1
                    break
                if self._shaper is not None:
                    self._shaper.down(frame)
                else:
                    self._on_frame(frame)
        except (ConnectionError, ssl.SSLError):
            pass
        except Exception:
            log.exception("client read loop failed")
        finally:
            if self._shaper is not None:  # frames still on the emulated link arrive first
                await self._shaper.flush_down()
            self._fail_all()

    def _fail_all(self) -> None:
        self.closed = True
        for sess in list(self._sessions.values()):
            sess._queue.put_nowait(CLOSED)
        self.errors.put_nowait(CLOSED)

    async def close(self) -> None:
        """Flush the emulated link, close the connection (the server closes its sessions)."""
        if self._shaper is not None:
            await self._shaper.flush_up()
            self._shaper.close()
        self._flush()
        self.closed = True
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except (Exception, asyncio.CancelledError):
            pass
        self._reader_task.cancel()
        try:
            await self._reader_task
        except (Exception, asyncio.CancelledError):
            pass

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

