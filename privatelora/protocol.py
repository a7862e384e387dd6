"""The device/cloud protocol as typed messages (no IO here).

A session's generation step is a chain of stages. The device hands in hidden states
(``Handoff``, device -> cloud); for every cloud layer the cloud sends the low-rank
activations (``Activations``: ``A h``) and waits for the device's ``Reply`` (``M A h``);
after the last cloud layer it hands the hidden states back (``Handoff``, cloud -> device).
``Error`` answers a request the cloud refuses; it never affects another session.

The same classes are what the wire codec encodes. Their repr shows shapes, never values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _shape(t) -> str:
    return "x".join(str(s) for s in t.shape) if hasattr(t, "shape") else type(t).__name__


@dataclass(frozen=True, repr=False)
class Handoff:
    session: int
    start: int               # position of the first row in the session
    hidden: torch.Tensor     # [n, d]
    want_all: bool = False   # device -> cloud: hand back every row, not only the last

    def __repr__(self):
        return f"Handoff(session={self.session}, start={self.start}, hidden=[{_shape(self.hidden)}], want_all={self.want_all})"


@dataclass(frozen=True, repr=False)
class Activations:
    session: int
    layer: int
    a: tuple                 # one [n, r] per A (one if shared_a, else one per target)

    def __repr__(self):
        return f"Activations(session={self.session}, layer={self.layer}, a={[_shape(t) for t in self.a]})"


@dataclass(frozen=True, repr=False)
class Reply:
    session: int
    layer: int
    m: tuple                 # one [n, r] per target, in the config's target order

    def __repr__(self):
        return f"Reply(session={self.session}, layer={self.layer}, m={[_shape(t) for t in self.m]})"


@dataclass(frozen=True)
class Error:
    session: int
    code: str
    reason: str
