"""One accepted connection of the ``Server`` (``transport/server.py``: the contract): the
sessions it opened, its byte counts, its writes (one frame, or a stage's frames in one write,
a stage's activations in one bundle for a peer that sends bundles) and its one writer task."""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from dataclasses import dataclass
from privatelora import wire
from privatelora.transport.stats import ByteStats


@dataclass(repr=False)
class SessionState:
    key: bytes
    geometry: wire.Geometry


class ServerConnection:
    """One accepted connection: the sessions it opened and its byte counts."""

    def __init__(self, server, writer: asyncio.StreamWriter, cid: int):     # server: its ``Server``
        self.server, self.id, self._writer = server, cid, writer
        self.peer = writer.get_extra_info("peername")
        self.sessions: dict[int, SessionState] = {}
        self.stats = ByteStats()
        self.refusals: Counter[str] = Counter()
        self.closed_reason: str | None = None  # why the server cut this connection, once it has
        self.retired: dict[int, bool] = {}  # sessions the app ended, until the device's Close (oldest first)
        self.bundles = False  # the peer has sent a bundle: it reads them too (docs/wire.md)
        self._kick = asyncio.Event()  # the transport holds unsent bytes: the writer task waits them out
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

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
        if self.closed_reason is not None or self._writer.is_closing():
            raise ConnectionResetError("connection closed")
        self._writer.write(frame)  # one write per frame: frames never interleave
        self.stats.add(wire.DOWN, info)
        self.server.stats.add(wire.DOWN, info)
        unsent = self._writer.transport.get_write_buffer_size()
        if unsent > self.server.max_pending_write:
            self.abort("slow_reader")
            raise ConnectionResetError(f"peer left {unsent} bytes unread")
        if unsent:
            self._kick.set()
        return info

    def _write_many(self, items: list, shared: dict) -> list:
        """Encode ``items`` [(msg, dtype)] (``wire.encode_many``) and write every frame that
        encoded in ONE transport write; per item, None (queued) or its exception."""
        out: list = [None] * len(items)
        jobs, where = [], []
        for i, (msg, dtype) in enumerate(items):
            st = self.sessions.get(msg.session)
            if msg.session and st is None:
                out[i] = wire.AuthError("unknown_session", f"session {msg.session} is not open here")
                continue
            jobs.append((msg, st.key if st else None, st.geometry if st else None, dtype))
            where.append(i)
        frames, infos = [], []
        if self.bundles and self.server.bundles:    # a stage's activations in one frame
            picked = [k for k, job in enumerate(jobs) if type(job[0]) is wire.Activations]
            frame, results = wire.encode_bundle([jobs[k][:3] for k in picked], direction=wire.DOWN,
                                                max_frame=self.server.max_frame, shared=shared) \
                if len(picked) > 1 else (None, [])
            if frame is not None:       # else (over the frame limit, say) one frame each, below
                frames.append(frame)
                for k, res in zip(picked, results):
                    if isinstance(res, BaseException):
                        out[where[k]] = res
                    else:
                        infos.append((where[k], res))
                rest = sorted(set(range(len(jobs))) - set(picked))
                jobs, where = [jobs[k] for k in rest], [where[k] for k in rest]
        for i, res in zip(where, wire.encode_many(jobs, direction=wire.DOWN, compress=self.server.compress,
                                                   max_frame=self.server.max_frame, shared=shared)):
            if isinstance(res, BaseException):
                out[i] = res
            else:
                frames.append(res[0])
                infos.append((i, res[1]))
        if not frames:
            return out
        if self.closed_reason is not None or self._writer.is_closing():
            for i, _ in infos:
                out[i] = ConnectionResetError("connection closed")
            return out
        self._writer.write(b"".join(frames))  # one write for the batch: frames stay whole, in order
        sent = [info for _, info in infos]
        self.stats.add_all(wire.DOWN, sent)
        self.server.stats.add_all(wire.DOWN, sent)
        unsent = self._writer.transport.get_write_buffer_size()
        if unsent > self.server.max_pending_write:
            self.abort("slow_reader")
            for i, _ in infos:
                out[i] = ConnectionResetError(f"peer left {unsent} bytes unread")
        elif unsent:
            self._kick.set()
        return out

    def send_nowait(self, msg: wire.Message, *, dtype: str | None = None) -> wire.FrameInfo:
        """Send a cloud -> device message on a session of this connection, without waiting
        for the peer. Raises the encoder's error, or ``ConnectionResetError`` if the
        connection is gone (or was just cut for not reading)."""
        return self._write(msg, dtype=dtype)

    async def send(self, msg: wire.Message, *, dtype: str | None = None) -> wire.FrameInfo:
        """``send_nowait`` (kept awaitable for callers that are coroutines)."""
        return self._write(msg, dtype=dtype)

    def abort(self, code: str) -> None:
        """Cut the connection now (its read loop ends and its sessions are closed)."""
        if self.closed_reason is None:
            self.closed_reason = code
            self.server.disconnects[code] += 1
        self._writer.transport.abort()

    async def _pump(self) -> None:
        """The connection's one writer: waits for the socket to drain, within the deadline."""
        try:
            while True:
                await self._kick.wait()
                self._kick.clear()
                try:
                    async with asyncio.timeout(self.server.send_timeout_s):
                        await self._writer.drain()
                except TimeoutError:
                    self.abort("send_timeout")
                    return
        except (ConnectionError, ssl.SSLError, RuntimeError):
            self.abort("connection_error")
        except asyncio.CancelledError:
            pass
