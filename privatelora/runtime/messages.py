"""The device/cloud protocol messages: plain dataclasses, no codec, no sockets.

A session's generation step is a chain of stages. The device hands in hidden states
(``Handoff``, device -> cloud); for every adapted cloud layer the cloud sends the low-rank
activations (``Activations``: ``A h``) and waits for the device's ``Reply`` (``M A h``);
after the last cloud layer it hands the hidden states back (``Handoff``, cloud -> device).
``Error`` answers a request the cloud refuses; it never affects another session.

The in-process runner, TCP and Ray all carry these very objects; ``privatelora.wire``
turns them into authenticated frames and back (one codec per kind, see ``wire/kinds.py``).
Their repr shows shapes, never values or key bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


def brief(v: Any) -> str:
    """Repr that never shows tensor values or key bytes."""
    if isinstance(v, torch.Tensor):
        return f"Tensor{list(v.shape)}:{str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (tuple, list)) and any(isinstance(x, (torch.Tensor, bytes)) for x in v):
        return "(" + ", ".join(brief(x) for x in v) + ")"
    return repr(v)


def tupled(obj, name: str) -> None:
    """Freeze a list field of a frozen dataclass into a tuple."""
    if isinstance(getattr(obj, name), list):
        object.__setattr__(obj, name, tuple(getattr(obj, name)))


class Message:
    """Base of every message: a frozen dataclass with a ``session`` id (0: the connection)."""

    session: int

    def __repr__(self) -> str:
        body = ", ".join(f"{f.name}={brief(getattr(self, f.name))}" for f in fields(self))
        return f"{type(self).__name__}({body})"


@dataclass(frozen=True, repr=False)
class Open(Message):
    """Device -> cloud: start a session with its HMAC key and geometry (``wire.Geometry``)."""

    session: int
    key: bytes
    geometry: Any


@dataclass(frozen=True, repr=False)
class Opened(Message):
    """Cloud -> device: the session is open."""

    session: int


@dataclass(frozen=True, repr=False, eq=False)
class Handoff(Message):
    """Hidden states [n, hidden] entering the first cloud layer (up) or leaving the last (down)."""

    session: int
    start: int  # position of the first row
    hidden: torch.Tensor
    want_all: bool = False  # up: False = hand back only the last row


@dataclass(frozen=True, repr=False, eq=False)
class Activations(Message):
    """Cloud -> device: a = A h for one layer; 1 tensor if shared_a else one per target."""

    session: int
    layer: int
    a: tuple[torch.Tensor, ...]

    def __post_init__(self):
        tupled(self, "a")


@dataclass(frozen=True, repr=False, eq=False)
class Reply(Message):
    """Device -> cloud: m = M a for one layer, one [n, rank] tensor per target."""

    session: int
    layer: int
    m: tuple[torch.Tensor, ...]

    def __post_init__(self):
        tupled(self, "m")


@dataclass(frozen=True, repr=False)
class Close(Message):
    """Device -> cloud: the session is over; the cloud frees its state."""

    session: int


@dataclass(frozen=True, repr=False)
class Redirect(Message):
    """Cloud -> device, answering an ``Open`` at a front door: open the session at this
    replica instead. ``cert`` is the replica's PEM certificate to pin ("" on loopback)."""

    session: int
    host: str
    port: int
    cert: str = ""


@dataclass(frozen=True, repr=False)
class Error(Message):
    """Either way: a refusal or failure. Session 0 = about the connection, not a session."""

    session: int
    code: str
    reason: str
