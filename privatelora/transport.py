"""Asyncio TCP transport for wire frames: ``Server`` (cloud side), ``Client`` (device side).

Contract
- Many sessions per connection (multiplexed). An edge host or a Ray edge actor carries
  many users; one connection per host avoids a TCP (+TLS) handshake per session and keeps
  one socket per peer pair. Each session still has its own HMAC key, and the server
  binds a session to the connection that opened it: a frame naming a session opened on
  another connection is refused (``foreign_session``) even with the right key.
- The server decodes strictly (``wire.decode_frame``). A refused frame is answered with
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
  ``privatelora.link``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import ssl
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable

from . import wire
from .link import LinkProfile, Shaper, get_profile

log = logging.getLogger(__name__)

MAX_REFUSALS_IN_A_ROW = 16  # a peer that only sends refused frames is not speaking our protocol
MAX_PENDING_WRITE = 4 << 20  # a peer that does not read its answers is dropped
_READ_LIMIT = 1 << 20  # StreamReader buffer: fewer pause/resume cycles for big hand-offs
_CLOSED = object()  # queue sentinel: the connection is gone
_FATAL = frozenset({"bad_version", "bad_header", "truncated", "too_large", "bad_length"})


class TLSRequiredError(RuntimeError):
    """Plain TCP was asked for on a non-loopback address."""


class RemoteError(Exception):
    """The peer answered with an Error frame."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


# ---------------------------------------------------------------- accounting
@dataclass
class KindBytes:
    frames: int = 0
    raw: int = 0
    wire: int = 0
    compressed: int = 0  # frames sent with lz4


@dataclass
class ByteStats:
    """Bytes per direction and frame kind."""

    up: dict[str, KindBytes] = field(default_factory=dict)
    down: dict[str, KindBytes] = field(default_factory=dict)

    def add(self, direction: str, info: wire.FrameInfo) -> None:
        k = getattr(self, direction).setdefault(info.kind, KindBytes())
        k.frames += 1
        k.raw += info.raw_bytes
        k.wire += info.wire_bytes
        k.compressed += info.compressed

    def total(self, direction: str) -> KindBytes:
        t = KindBytes()
        for k in list(getattr(self, direction).values()):   # a snapshot: scrapes run in other threads
            t.frames, t.raw, t.wire = t.frames + k.frames, t.raw + k.raw, t.wire + k.wire
            t.compressed += k.compressed
        return t

    def as_dict(self) -> dict:
        return {d: {**{kind: asdict(k) for kind, k in sorted(getattr(self, d).items())},
                    "total": asdict(self.total(d))} for d in (wire.UP, wire.DOWN)}


# ---------------------------------------------------------------- TLS helpers
def is_loopback(host: str | None) -> bool:
    if not host:
        return False  # "" / None listen on every interface
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve off-host


def server_ssl_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:  # mutual TLS: only clients holding a certificate issued by `ca`
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(ca: str | None = None, cert: str | None = None,
                       key: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def make_self_signed(directory, hosts=("localhost", "127.0.0.1", "::1"), days: int = 30):
    """Write ``cert.pem`` and ``key.pem`` (self-signed, for local tests) into ``directory``;
    return their paths. Clients trust it with ``ca=<cert.pem>``."""
    import datetime
    import os
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"privatelora {hosts[0]}")])
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    pub = key.public_key()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            # it is its own trust anchor, so it must be allowed to act as a CA
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pub), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private key: owner only
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    # one small frame per layer per token: never let Nagle hold it back for an ACK
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _read_frame(reader: asyncio.StreamReader, max_frame: int) -> bytes | str:
    """One whole frame, or a code saying why the stream is over ("eof" = clean end)."""
    try:
        prefix = await reader.readexactly(wire.PREFIX.size)
    except asyncio.IncompleteReadError as e:
        return "truncated" if e.partial else "eof"
    (length,) = wire.PREFIX.unpack(prefix)
    if length < wire.MIN_LENGTH:
        return "bad_length"
    if length > max_frame:
        return "too_large"
    try:
        return prefix + await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return "truncated"


@dataclass(repr=False)
class _SessionState:
    key: bytes
    geometry: wire.Geometry


# ---------------------------------------------------------------- server
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
                                                  ssl=self.ssl_context, limit=_READ_LIMIT)
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
            _nodelay(writer)
            in_a_row = 0
            while True:
                frame = await _read_frame(reader, self.max_frame)
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
            code = e.code if isinstance(e, wire.WireError) else "rejected"
            self._refuse(conn, wire.WireError(code, str(e) or type(e).__name__), s, key=msg.key)
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
class Session:
    """A client-side session: its id, geometry and incoming queue. The key stays hidden."""

    def __init__(self, client: "Client", sid: int, key: bytes, geometry: wire.Geometry):
        self.client, self.id, self._key, self.geometry = client, sid, key, geometry
        self._queue: asyncio.Queue = asyncio.Queue()

    def __repr__(self) -> str:
        return f"Session(id={self.id}, geometry={self.geometry!r})"

    async def send(self, msg: wire.Message, *, dtype: str | None = None) -> wire.FrameInfo:
        if msg.session != self.id:
            raise ValueError(f"message for session {msg.session} sent on session {self.id}")
        return await self.client.send(msg, dtype=dtype)

    async def recv(self, timeout: float | None = None) -> wire.Message:
        """Next message for this session (Error frames included). ConnectionError if closed."""
        try:                    # fast path: the answer is often in already
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout is None:
                item = await self._queue.get()
            else:               # asyncio.timeout, not wait_for: no extra task per message
                async with asyncio.timeout(timeout):
                    item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # every later recv fails the same way
            raise ConnectionError("connection closed")
        return item

    async def close(self) -> None:
        """Tell the cloud to free the session; forget its key."""
        try:
            await self.client.send(wire.Close(self.id))
        finally:
            self.client._sessions.pop(self.id, None)


class Client:
    """Device side of one connection; create with ``await Client.connect(...)``."""

    def __init__(self, reader, writer, *, max_frame: int, compress: str,
                 link: LinkProfile | None, seed: int | None):
        self._reader, self._writer = reader, writer
        self.max_frame, self.compress = max_frame, compress
        self._sessions: dict[int, Session] = {}
        self.stats = ByteStats()
        self.refusals: Counter[str] = Counter()  # incoming frames we refused
        self.errors: asyncio.Queue = asyncio.Queue()  # Error frames on session 0
        self.closed = False
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
            limit=_READ_LIMIT), timeout)
        _nodelay(writer)
        profile = get_profile(link) if isinstance(link, str) else link
        return cls(reader, writer, max_frame=max_frame, compress=compress, link=profile, seed=seed)

    async def open(self, geometry: wire.Geometry, *, timeout: float | None = 10.0) -> Session:
        """Open a session with a fresh random id and key; RemoteError if refused."""
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
        if self.closed:
            raise ConnectionError("connection closed")
        frame, info = wire.encode_frame(
            msg, key=sess._key if sess else None, direction=wire.UP, dtype=dtype,
            geometry=sess.geometry if sess else None, compress=self.compress,
            max_frame=self.max_frame)
        self.stats.add(wire.UP, info)
        if self._shaper is not None:
            self._shaper.up(frame)
        else:
            self._write_now(frame)
            await self._writer.drain()
        return info

    def send_raw(self, frame: bytes) -> None:
        """Write bytes as they are (relays and tests); not counted in ``stats``."""
        self._shaper.up(frame) if self._shaper is not None else self._write_now(frame)

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
        try:
            msg, info = wire.decode_frame(frame, direction=wire.DOWN, key_for=self._key_for,
                                          geometry_for=self._geometry_for, max_frame=self.max_frame)
        except wire.WireError as e:
            self.refusals[e.code] += 1
            return
        self.stats.add(wire.DOWN, info)
        sess = self._sessions.get(msg.session)
        if sess is not None:
            sess._queue.put_nowait(msg)
        else:
            self.errors.put_nowait(msg)  # session 0: about the connection

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await _read_frame(self._reader, self.max_frame)
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
            sess._queue.put_nowait(_CLOSED)
        self.errors.put_nowait(_CLOSED)

    async def close(self) -> None:
        """Flush the emulated link, close the connection (the server closes its sessions)."""
        if self._shaper is not None:
            await self._shaper.flush_up()
            self._shaper.close()
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
