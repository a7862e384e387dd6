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


def nodelay(writer: asyncio.StreamWriter) -> None:
    # one small frame per layer per token: never let Nagle hold it back for an ACK
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def read_frame(reader: asyncio.StreamReader, max_frame: int) -> bytes | str:
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

