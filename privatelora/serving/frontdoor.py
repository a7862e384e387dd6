"""The front door: one address for every outside device, whatever replicas there are.

A ``FrontDoor`` listens like a replica and speaks the same wire protocol, but it holds no
session: it answers each ``Open`` with a ``Redirect`` to the replica ``place()`` picks
(the least loaded healthy one, in ``actors.router``), signed with the Open's own key and
carrying the replica's certificate for the device to pin. The device then opens the
session there and talks to that replica directly, so the front door costs one round trip
per new session (and one TCP connect per replica a device has not met yet), never one per
token, and it sees no activation at all. With no replica to offer it answers ``busy``.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from privatelora import wire
from privatelora.transport import Server


class NoReplica(Exception):
    """``place()`` has nowhere to send a session."""


class FrontDoor:
    """``place()`` returns ``(host, port, cert_pem)`` for a new session or raises
    ``NoReplica``; ``server_kw`` go to the ``transport.Server`` (TLS, bounds)."""

    def __init__(self, place: Callable[[], Awaitable[tuple[str, int, str]]], host: str = "127.0.0.1",
                 port: int = 0, **server_kw):
        self.place = place
        self.server = Server(self._handle, host, port, disconnect_on_refusal=True, **server_kw)
        self.placed = 0
        self.unplaced = 0

    @property
    def address(self):
        return self.server.address

    async def start(self) -> "FrontDoor":
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop()

    async def _handle(self, conn, msg):
        if not isinstance(msg, wire.Open):
            if isinstance(msg, wire.Close):      # the drop of a connection: nothing is open here
                return None
            raise wire.WireError("not_a_replica", "this address only places sessions: open them where "
                                 "it redirects you")
        try:
            host, port, cert = await self.place()
        except NoReplica as e:
            self.unplaced += 1
            raise wire.WireError("busy", f"no replica can take a session now: {e}")
        self.placed += 1
        return wire.Redirect(msg.session, host, port, cert or "")

    def stats(self) -> dict:
        return {"placed": self.placed, "unplaced": self.unplaced, "refusals": dict(self.server.refusals),
                "disconnects": dict(self.server.disconnects)}
