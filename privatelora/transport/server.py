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
from dataclasses import dataclass
from typing import Awaitable, Callable

from privatelora import wire
from privatelora.transport.stats import ByteStats
from privatelora.transport.streams import READ_LIMIT, nodelay, read_frame
from privatelora.transport.tls import TLSRequiredError, is_loopback, server_ssl_context

log = logging.getLogger(__name__)

MAX_REFUSALS_IN_A_ROW = 16  # a peer that only sends refused frames is not speaking our protocol
MAX_PENDING_WRITE = 4 << 20  # a peer that does not read its answers is dropped
_FATAL = frozenset({"bad_version", "bad_header", "truncated", "too_large", "bad_length"})



@dataclass(repr=False)
class _SessionState:
    key: bytes
    geometry: wire.Geometry


Handler = Callable[["ServerConnection", wire.Message], Awaitable[None]]


class ServerConnection:
    """One accepted connection: the sessions it opened and its byte counts."""

    def __init__(self, server: "Server", writer: asyncio.StreamWriter, cid: int):
        self.server, self.id, self._writer = server, cid, writer
        self.peer = writer.get_extra_info("peername")
        self.sessions: dict[int, _SessionState] = {}
        self.stats = ByteStats()
        self.refusals: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"ServerConnection(id={self.id}, peer={self.peer}, sessions={len(self.sessions)})"

    def _key_for(self, s: int) -> bytes | None:
        st = self.sessions.get(s)
        return st.key if st else None

    def _geometry_for(self, s: int) -> wire.Geometry | None:
        st = self.sessions.get(s)
        return st.geometry if st else None

    def _write(self, msg: wire.Message, key: bytes | None = None,
               dtype: str | None = None) -> wire.FrameInfo:
        st = self.sessions.get(msg.session)
        if msg.session and st is None and key is None:
            raise wire.AuthError("unknown_session", f"session {msg.session} is not open here")
        frame, info = wire.encode_frame(
            msg, key=key or (st.key if st else None), direction=wire.DOWN, dtype=dtype,
            geometry=st.geometry if st else None, compress=self.server.compress,
            max_frame=self.server.max_frame)
        if self._writer.is_closing():
            raise ConnectionResetError("connection closed")
        self._writer.write(frame)  # one write per frame: frames never interleave
        self.stats.add(wire.DOWN, info)
        self.server.stats.add(wire.DOWN, info)
        return info

    async def send(self, msg: wire.Message, *, dtype: str | None = None) -> wire.FrameInfo:
        """Send a cloud -> device message on a session of this connection."""
        info = self._write(msg, dtype=dtype)
        await self._writer.drain()
        return info


class Server:
    """Cloud side: accepts connections and feeds decoded messages to ``handler``."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0, *,
                 cert: str | None = None, key: str | None = None, ca: str | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 max_frame: int = wire.DEFAULT_MAX_FRAME, compress: str = "auto",
                 disconnect_on_refusal: bool = False):
        if ssl_context is None and cert:
            ssl_context = server_ssl_context(cert, key, ca)
        if ssl_context is None and not is_loopback(host):
            raise TLSRequiredError(
                f"refusing to listen on {host or 'all interfaces'!r} without TLS: off loopback "
                "the activations must be encrypted. Pass cert= and key= (PEM paths), or "
                "ssl_context=; for local tests see privatelora.transport.make_self_signed.")
        self.handler, self.host, self.port = handler, host, port
        self.ssl_context, self.max_frame, self.compress = ssl_context, max_frame, compress
        # serving sets this: a peer that breaks the protocol once gets its Error, then is cut off
        self.disconnect_on_refusal = disconnect_on_refusal
        self.tap: Callable[[int, bytes], None] | None = None  # sees every incoming frame (audits)
        self.refusals: Counter[str] = Counter()  # refused frames, by code
        self.disconnects: Counter[str] = Counter()  # connections closed for cause, by code
        self.handler_errors: Counter[str] = Counter()  # handler exceptions, by type name
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

    async def send(self, msg: wire.Message, *, dtype: str | None = None) -> wire.FrameInfo:
        """Send to whichever connection opened ``msg.session``."""
        conn = self._owner.get(msg.session)
        if conn is None:
            raise wire.AuthError("unknown_session", f"session {msg.session} is not open")
        return await conn.send(msg, dtype=dtype)

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
                frame = await read_frame(reader, self.max_frame)
                if isinstance(frame, str):
                    if frame != "eof":
                        self._refuse(conn, wire.FrameError(frame, "bad frame length"), 0)
                        self.disconnects[frame] += 1
                    break
                ok, fatal = await self._on_frame(conn, frame)
                in_a_row = 0 if ok else in_a_row + 1
                if fatal or in_a_row >= MAX_REFUSALS_IN_A_ROW:
                    self.disconnects[fatal or "garbage"] += 1
                    break
                if not ok and self.disconnect_on_refusal:
                    self.disconnects["refused"] += 1
                    break
                if writer.transport.get_write_buffer_size() > MAX_PENDING_WRITE:
                    self.disconnects["slow_reader"] += 1
                    break
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
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
        for s in list(conn.sessions):
            self._forget(conn, s)
            await self._call(conn, wire.Close(s), answer=False)  # the app frees session state
        conn._writer.close()
        try:
            await asyncio.wait_for(conn._writer.wait_closed(), 1.0)
        except (Exception, asyncio.CancelledError):
            pass

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

    async def _on_frame(self, conn: ServerConnection, frame: bytes) -> tuple[bool, str | None]:
        """Handle one frame; return (accepted, code if the connection must close)."""
        if self.tap is not None:   # audits: every byte the cloud receives, before any parsing
            self.tap(conn.id, frame)
        try:
            hdr = wire.peek_header(frame, max_frame=self.max_frame)
        except wire.WireError as e:  # not our header: the stream is out of sync or not ours
            self._refuse(conn, e, 0)
            return False, e.code if e.code in _FATAL else None
        s = hdr.session
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
            await self._open(conn, msg)
        elif isinstance(msg, wire.Close):
            self._forget(conn, s)
            await self._call(conn, msg, answer=False)
        else:
            await self._call(conn, msg)
        return True, None

    def _count_refused(self, conn: ServerConnection, frame: bytes) -> None:
        info = wire.FrameInfo("refused", 0, len(frame), False)
        conn.stats.add(wire.UP, info)
        self.stats.add(wire.UP, info)

    async def _open(self, conn: ServerConnection, msg: wire.Open) -> None:
        s = msg.session
        if s in self._owner:  # answer with the Open's own key: only its sender can verify it
            self._refuse(conn, wire.AuthError("session_in_use", f"session {s} is already open"),
                         s, key=msg.key)
            return
        conn.sessions[s] = _SessionState(msg.key, msg.geometry)
        self._owner[s] = conn
        try:
            await self.handler(conn, msg)
        except Exception as e:  # the application rejected the session
            self._forget(conn, s)
            code, reason = (e.code, e.reason) if isinstance(e, wire.WireError) else ("rejected", str(e))
            self._refuse(conn, wire.WireError(code, reason or type(e).__name__), s, key=msg.key)
            return
        conn._write(wire.Opened(s))

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
