"""Stream helpers shared by the server and the client: reading one whole frame, Nagle
off, the peer's refusals as an exception."""

from __future__ import annotations

import asyncio
import socket

from privatelora import wire

READ_LIMIT = 1 << 20  # StreamReader buffer: fewer pause/resume cycles for big hand-offs
CLOSED = object()  # queue sentinel: the connection is gone


class RemoteError(Exception):
    """The peer answered with an Error frame."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


class Redirected(RemoteError):
    """A front door answered the ``Open``: open the session at ``host:port`` (pinning
    ``cert``, a PEM certificate, when it is not empty)."""

    def __init__(self, host: str, port: int, cert: str = ""):
        super().__init__("redirect", f"open the session at {host}:{port}")
        self.host, self.port, self.cert = host, port, cert


def nodelay(writer: asyncio.StreamWriter) -> None:
    # one small frame per layer per token: never let Nagle hold it back for an ACK
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def read_frame(reader: asyncio.StreamReader, max_frame: int, *, idle_s: float | None = None,
                     frame_s: float | None = None) -> bytes | str:
    """One whole frame, or a code saying why the stream is over ("eof" = clean end).

    ``idle_s``: the frame must begin within this long ("idle"); ``frame_s``: once begun, it
    must be whole within this long ("slow_frame"). Waiting never consumes a partial frame.

    Fast path: when the reader already buffers a whole frame of a valid length (several
    frames arrived in one TCP read), it is taken without arming the two timers: nothing is
    awaited, so no timeout can apply. Anything else takes the guarded path below."""
    buf = getattr(reader, "_buffer", None)     # StreamReader's buffer (bytearray), read only
    if buf is not None and len(buf) >= wire.PREFIX.size + wire.MIN_LENGTH and reader.exception() is None:
        (length,) = wire.PREFIX.unpack_from(buf)
        if wire.MIN_LENGTH <= length <= max_frame and len(buf) >= wire.PREFIX.size + length:
            return await reader.readexactly(wire.PREFIX.size + length)   # whole: returns at once
    try:
        async with asyncio.timeout(idle_s):
            first = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        return "eof"
    except TimeoutError:
        return "idle"
    try:
        async with asyncio.timeout(frame_s):
            prefix = first + await reader.readexactly(wire.PREFIX.size - 1)
            (length,) = wire.PREFIX.unpack(prefix)
            if length < wire.MIN_LENGTH:
                return "bad_length"
            if length > max_frame:
                return "too_large"
            return prefix + await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return "truncated"
    except TimeoutError:
        return "slow_frame"
