"""The cloud side of the transport: ``Server`` accepts connections and decodes frames.

Contract
- Many sessions per connection (multiplexed). An edge host or a Ray edge actor carries
  many users; one connection per host avoids a TCP (+TLS) handshake per session and keeps
  one socket per peer pair. Each session still has its own HMAC key, and the server
  binds a session to the connection that opened it: a frame naming a session opened on
  another connection is refused (``foreign_session``) even with the right key.
  an ``Error`` frame (on its session if this connection owns it and the server holds its
  key, else on session 0) and counted in ``Server.refusals`` by code; the connection and
  every other session keep working. Only a bad length prefix, an oversized or truncated
  frame, a header that is not ours (garbage stream), ``MAX_REFUSALS_IN_A_ROW`` refusals in
  a row or a peer that stops reading close that one connection (``Server.disconnects``).
  No exception from a frame, a handler or a connection reaches the server.
- Sending never waits on the peer. ``send_nowait`` encodes the frame (an encoder error is
  raised to the caller, who turns it into an ``Error`` for that session) and hands it whole
  to the connection's transport; one writer task per connection waits for the socket to
  drain. A peer whose unsent bytes pass ``max_pending_write`` (``slow_reader``) or whose
  socket does not drain within ``send_timeout_s`` (``send_timeout``) is disconnected: its
  read loop ends, and every session it opened gets a synthesised ``Close``.
  ``send_many([(msg, dtype), ...])`` sends a stage's answers: one write per connection,
  views of one stage buffer converted once (``wire.encode_many``); it returns, per message,
  None or the exception ``send_nowait`` would have raised for it alone. A connection whose
  peer has sent a bundle (``wire/bundle.py``) gets the stage's activations in one bundle
  (``bundles=False``: never); a bundle received is handled entry by entry, each entry as
  the frame it stands for (its refusal is its session's alone).
- Slow and idle peers: a frame, once begun, must be whole within ``frame_timeout_s``
  (``slow_frame``); a connection that holds no session must send within
  ``idle_connection_s`` (``idle``), and its frames may not exceed ``OPEN_MAX_FRAME`` (an
  unauthenticated peer cannot make the server buffer a large frame). A declined ``Open``
  (busy, geometry, session in use) is not a protocol breach, but ``MAX_REFUSALS_IN_A_ROW``
  of them, or of ignored frames, still close the connection. ``Server.forget(session)``:
  the application ended a session itself (and told the device why); the device's
  ``Close`` for it is then ignored, and a frame it had in flight is answered
  ``session_closed`` without cutting the connection's other sessions.
- Handlers: ``async def handle(conn, msg)``, called in frame order per connection. It
  sees ``Open`` (raise to reject; the server then answers ``Error``, else ``Opened``),
  ``Close`` (also synthesised for every session still open when its connection drops),
  ``Handoff``, ``Reply`` and ``Error``. Keep it short (put work on a queue): it runs on
  the connection's read loop. Reply with ``conn.send(msg)`` or ``server.send(msg)``.
- Byte accounting: ``ByteStats`` per direction ("up" = device -> cloud) and frame kind,
  raw (tensor elements x wire dtype size) and wire (whole frames), kept by both ends:
  ``Client.stats``, ``ServerConnection.stats``, ``Server.stats`` (all connections).
  Frames the server refuses are counted under kind ``"refused"``. TLS record overhead is
  not included (it is below the frame layer).
- TLS: required for any non-loopback address, on both ends (``TLSRequiredError``
  otherwise), optional on loopback. Server: ``cert=``/``key=`` PEM paths (the chain
  first), optional ``ca=`` to require client certificates (mutual TLS), or a ready
  ``ssl_context=``. Client: ``ca=`` to trust a private CA or a self-signed cert, or
  ``ssl_context=`` (e.g. ``ssl.create_default_context()`` for the system trust store),
  optional ``cert=``/``key=`` for mutual TLS. ``make_self_signed(dir)`` writes a cert
  and key for local tests.
- Link emulation (``link=`` on the client) shapes both directions in real time; see
  ``privatelora.transport.link``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from typing import Awaitable, Callable

from privatelora import wire
from privatelora.transport.connection import ServerConnection, SessionState
from privatelora.transport.stats import ByteStats
from privatelora.transport.streams import READ_LIMIT, nodelay, read_frame
from privatelora.transport.tls import TLSRequiredError, is_loopback, server_ssl_context

log = logging.getLogger(__name__)

MAX_REFUSALS_IN_A_ROW = 16  # a peer that only sends refused frames is not speaking our protocol
MAX_PENDING_WRITE = 4 << 20  # a peer that does not read its answers is dropped
SEND_TIMEOUT_S = 10.0  # ... and so is one whose socket does not drain for this long
_FATAL = frozenset({"bad_version", "bad_header", "truncated", "too_large", "bad_length"})
FRAME_TIMEOUT_S = 30.0  # a frame, once begun, must be whole within this long (slow-loris)
IDLE_CONNECTION_S = 60.0  # a connection holding no session must send within this long
MAX_RETIRED = 1024  # ended sessions remembered per connection, for their devices' Close
OPEN_MAX_FRAME = 64 << 10  # the largest frame a connection without a session may send (an Open)
_STREAM_END = {"slow_frame": "a frame was not whole within the frame timeout",
               "idle": "no session opened and nothing sent within the idle timeout",
               "too_large": "the frame's length is above this connection's limit"}



Handler = Callable[["ServerConnection", wire.Message], Awaitable[None]]


class Server:
    """Cloud side: accepts connections and feeds decoded messages to ``handler``."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0, *,
                 cert: str | None = None, key: str | None = None, ca: str | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 max_frame: int = wire.DEFAULT_MAX_FRAME, compress: str = "auto",
                 disconnect_on_refusal: bool = False, send_timeout_s: float = SEND_TIMEOUT_S,
                 max_pending_write: int = MAX_PENDING_WRITE, frame_timeout_s: float = FRAME_TIMEOUT_S,
                 idle_connection_s: float = IDLE_CONNECTION_S, bundles: bool = True):
        if min(send_timeout_s, frame_timeout_s, idle_connection_s) <= 0 or max_pending_write < 1:
            raise ValueError("send_timeout_s, frame_timeout_s and idle_connection_s must be > 0, "
                             "max_pending_write >= 1")
        self.frame_timeout_s, self.idle_connection_s = frame_timeout_s, idle_connection_s
        if ssl_context is None and cert:
            ssl_context = server_ssl_context(cert, key, ca)
        if ssl_context is None and not is_loopback(host):
            raise TLSRequiredError(
                f"refusing to listen on {host or 'all interfaces'!r} without TLS: off loopback "
                "the activations must be encrypted. Pass cert= and key= (PEM paths), or "
                "ssl_context=; for local tests see privatelora.transport.make_self_signed.")
        self.handler, self.host, self.port = handler, host, port
        self.bundles = bundles  # bundle a stage's activations for a peer that sends bundles
        self.ssl_context, self.max_frame, self.compress = ssl_context, max_frame, compress
        # serving sets this: a peer that breaks the protocol once gets its Error, then is cut off
        self.disconnect_on_refusal = disconnect_on_refusal
        self.send_timeout_s, self.max_pending_write = send_timeout_s, max_pending_write
        self.tap: Callable[[int, bytes], None] | None = None  # sees every incoming frame (audits)
        self.refusals: Counter[str] = Counter()  # refused frames, by code
        self.disconnects: Counter[str] = Counter()  # connections closed for cause, by code
        self.handler_errors: Counter[str] = Counter()  # handler exceptions, by type name
        self.ignored: Counter[str] = Counter()  # frames dropped as harmless (Close of a closed session)
        self.redirects = 0                      # Opens answered with a Redirect (a front door)
        self.stats = ByteStats()
        self.connections: set[ServerConnection] = set()
        self._owner: dict[int, ServerConnection] = {}  # session -> connection that opened it
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._next_id = 0

    async def start(self) -> "Server":
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  ssl=self.ssl_context, limit=READ_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> "Server":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def send_nowait(self, msg: wire.Message, *, dtype: str | None = None) -> wire.FrameInfo:
        """Send to whichever connection opened ``msg.session``, without waiting for it
        (``ServerConnection.send_nowait``)."""
        conn = self._owner.get(msg.session)
        if conn is None:
            raise ConnectionResetError(f"session {msg.session} has no connection")
        return conn.send_nowait(msg, dtype=dtype)

    async def send(self, msg: wire.Message, *, dtype: str | None = None) -> wire.FrameInfo:
        return self.send_nowait(msg, dtype=dtype)

    def send_many(self, items: list[tuple[wire.Message, str | None]]) -> list[BaseException | None]:
        """Send several cloud -> device messages (``(msg, dtype)`` each, as ``send_nowait``)
        without waiting: grouped by connection, each connection's frames in ONE transport
        write, in the order given. Messages whose tensors are views of one shared buffer
        (``wire.encode_many``) share one conversion to the wire dtype.

        Returns one entry per item, in order: None when the frame was queued, else the
        exception ``send_nowait`` would have raised for that message alone: the encoder's
        error (a ``WireError``: end that session), ``ConnectionResetError`` (no connection
        for the session, the connection closed, or cut for not reading: ``slow_reader``, as
        ``send_nowait``). Never raises for one item's sake; accounting is per frame."""
        out: list[BaseException | None] = [None] * len(items)
        by_conn: dict[ServerConnection, list[int]] = {}
        for i, (msg, _) in enumerate(items):
            conn = self._owner.get(msg.session)
            if conn is None:
                out[i] = ConnectionResetError(f"session {msg.session} has no connection")
            else:
                by_conn.setdefault(conn, []).append(i)
        shared: dict = {}       # one conversion per buffer, whichever connections its views go to
        for conn, idx in by_conn.items():
            for i, res in zip(idx, conn._write_many([items[i] for i in idx], shared)):
                out[i] = res
        return out

    def owner(self, session: int) -> ServerConnection | None:
        """The live connection that opened ``session``, if any."""
        return self._owner.get(session)

    # -- per connection
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._next_id += 1
        conn = ServerConnection(self, writer, self._next_id)
        self.connections.add(conn)
        try:
            nodelay(writer)
            in_a_row = 0
            while True:
                # a connection that holds no session may only open one: small frames, and soon
                frame = await read_frame(reader, self.max_frame if conn.sessions else min(self.max_frame, OPEN_MAX_FRAME),
                                         idle_s=None if conn.sessions else self.idle_connection_s,
                                         frame_s=self.frame_timeout_s)
                if conn.closed_reason is not None:
                    break
                if isinstance(frame, str):
                    if frame != "eof":
                        self._refuse(conn, wire.FrameError(frame, _STREAM_END.get(frame, "bad frame length")), 0)
                        self.disconnects[frame] += 1
                    break
                ok, fatal = await self._on_frame(conn, frame)
                in_a_row = 0 if ok else in_a_row + 1
                if fatal or in_a_row >= MAX_REFUSALS_IN_A_ROW:
                    self.disconnects[fatal or "garbage"] += 1
                    break
                if ok is False and self.disconnect_on_refusal:   # None: declined, not a protocol breach
                    self.disconnects["refused"] += 1
                    break
                if conn.closed_reason is not None:
                    break
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            if conn.closed_reason is None:
                self.disconnects["connection_error"] += 1
        except asyncio.CancelledError:
            pass  # server stopping
        except Exception:  # never let one connection take the server down
            log.exception("connection %s failed", conn.id)
            self.disconnects["internal"] += 1
        finally:
            await self._drop(conn)
            self._tasks.discard(task)

    async def _drop(self, conn: ServerConnection) -> None:
        self.connections.discard(conn)
        conn._pump_task.cancel()
        for s in list(conn.sessions):
            self._forget(conn, s)
            await self._call(conn, wire.Close(s), answer=False)  # the app frees session state
        conn._writer.close()
        try:
            await asyncio.wait_for(conn._writer.wait_closed(), 1.0)
        except (Exception, asyncio.CancelledError):
            conn._writer.transport.abort()  # a peer that never reads would hold the socket open

    def _forget(self, conn: ServerConnection, s: int) -> None:
        conn.sessions.pop(s, None)
        if self._owner.get(s) is conn:
            del self._owner[s]

    def _refuse(self, conn: ServerConnection, err: wire.WireError, session: int,
                key: bytes | None = None) -> None:
        """Count a refusal and tell the peer, on the session if we can sign for it."""
        self.refusals[err.code] += 1
        conn.refusals[err.code] += 1
        if session and key is None and session not in conn.sessions:
            session = 0
        try:
            conn._write(wire.Error(session, err.code, err.reason[: wire.MAX_REASON]), key=key)
        except Exception:  # the peer may already be gone; the refusal is counted anyway
            pass

    async def _on_frame(self, conn: ServerConnection, frame: bytes) -> tuple[bool | None, str | None]:
        """Handle one frame; return (True: accepted, False: refused, None: declined or
        ignored, code if the connection must close)."""
        if self.tap is not None:   # audits: every byte the cloud receives, before any parsing
            self.tap(conn.id, frame)
        try:
            hdr = wire.peek_header(frame, max_frame=self.max_frame)
        except wire.WireError as e:  # not our header: the stream is out of sync or not ours
            self._refuse(conn, e, 0)
            return False, e.code if e.code in _FATAL else None
        if hdr.kind == "bundle":
            return await self._on_bundle(conn, frame)
        s = hdr.session
        if s in conn.retired:       # the app ended it (and told the device why) while this was in flight
            if hdr.kind == "close":
                del conn.retired[s]
                self.ignored["close"] += 1   # the device's Close has nothing left to do
            else:                            # answered, but not a breach: other sessions keep the connection
                self._refuse(conn, wire.AuthError("session_closed", f"session {s} was closed by the cloud"), 0)
            return None, None
        if hdr.kind != "open" and s != 0 and s not in conn.sessions:
            code = "foreign_session" if s in self._owner else "unknown_session"
            self._refuse(conn, wire.AuthError(code, f"session {s} is not open here"), 0)
            self._count_refused(conn, frame)
            return False, None
        try:
            msg, info = wire.decode_frame(frame, direction=wire.UP, key_for=conn._key_for,
                                          geometry_for=conn._geometry_for, max_frame=self.max_frame)
        except wire.WireError as e:
            self._refuse(conn, e, s)
            self._count_refused(conn, frame)
            return False, None
        conn.stats.add(wire.UP, info)
        self.stats.add(wire.UP, info)
        if isinstance(msg, wire.Open):
            return (True if await self._open(conn, msg) else None), None
        elif isinstance(msg, wire.Close):
            self._forget(conn, s)
            await self._call(conn, msg, answer=False)
        else:
            await self._call(conn, msg)
        return True, None

    async def _on_bundle(self, conn: ServerConnection, frame: bytes) -> tuple[bool | None, str | None]:
        """A bundle of replies: each entry is handled as the frame it stands for (its
        refusal is its session's alone, counted and answered as a frame's)."""
        try:
            entries = wire.decode_bundle(frame, direction=wire.UP, key_for=conn._key_for,
                                         geometry_for=conn._geometry_for, max_frame=self.max_frame)
        except wire.WireError as e:
            self._refuse(conn, e, 0)
            self._count_refused(conn, frame)
            return False, None
        conn.bundles = True
        ok: bool | None = True
        infos = [info for _, _, info in entries]
        conn.stats.add_all(wire.UP, infos)
        self.stats.add_all(wire.UP, infos)
        for s, msg, info in entries:
            if s in conn.retired:                       # as a frame of a session the app ended
                self._refuse(conn, wire.AuthError("session_closed", f"session {s} was closed by the cloud"), 0)
                ok = None if ok else ok
            elif isinstance(msg, wire.WireError):
                if msg.code == "unknown_session" and s in self._owner:
                    msg = wire.AuthError("foreign_session", f"session {s} is not open here")
                self._refuse(conn, msg, s)
                ok = False
            else:
                await self._call(conn, msg)
        return ok, None

    def _count_refused(self, conn: ServerConnection, frame: bytes) -> None:
        info = wire.FrameInfo("refused", 0, len(frame), False)
        conn.stats.add(wire.UP, info)
        self.stats.add(wire.UP, info)

    async def _open(self, conn: ServerConnection, msg: wire.Open) -> bool:
        """Open the session (True) or decline it with an ``Error`` (False). A handler that
        returns a ``Redirect`` sends the device elsewhere (True: the frame was fine)."""
        s = msg.session
        if s in self._owner:  # answer with the Open's own key: only its sender can verify it
            self._refuse(conn, wire.AuthError("session_in_use", f"session {s} is already open"),
                         s, key=msg.key)
            return False
        conn.sessions[s] = SessionState(msg.key, msg.geometry)
        self._owner[s] = conn
        try:
            answer = await self.handler(conn, msg)
            if isinstance(answer, wire.Redirect):    # a front door: the session opens elsewhere
                self._forget(conn, s)
                conn._write(answer, key=msg.key)
                self.redirects += 1
                return True
        except Exception as e:  # the application rejected the session
            self._forget(conn, s)
            code, reason = (e.code, e.reason) if isinstance(e, wire.WireError) else ("rejected", str(e))
            self._refuse(conn, wire.WireError(code, reason or type(e).__name__), s, key=msg.key)
            return False
        try:
            conn._write(wire.Opened(s))
        except ConnectionError:  # cut meanwhile: the read loop ends and the drop closes the session
            pass
        return True

    def forget(self, session: int) -> None:
        """The application ended ``session`` (it told the device why): the device's
        ``Close`` for it is ignored, other frames naming it get ``session_closed``."""
        conn = self._owner.get(session)
        if conn is not None:
            self._forget(conn, session)
            conn.retired[session] = True
            while len(conn.retired) > MAX_RETIRED:
                del conn.retired[next(iter(conn.retired))]

    async def _call(self, conn: ServerConnection, msg: wire.Message, answer: bool = True) -> None:
        try:
            await self.handler(conn, msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.handler_errors[type(e).__name__] += 1
            log.warning("handler failed on %r: %s", msg, type(e).__name__)
            if answer and msg.session in conn.sessions:
                try:
                    conn._write(wire.Error(msg.session, "handler_error", type(e).__name__))
                except Exception:
                    pass


# ---------------------------------------------------------------- client
