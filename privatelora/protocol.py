"""The device/cloud protocol messages, as the core sees them.

A session's generation step is a chain of stages. The device hands in hidden states
(``Handoff``, device -> cloud); for every cloud layer the cloud sends the low-rank
activations (``Activations``: ``A h``) and waits for the device's ``Reply`` (``M A h``);
after the last cloud layer it hands the hidden states back (``Handoff``, cloud -> device).
``Error`` answers a request the cloud refuses; it never affects another session.

These are the wire codec's own typed messages (``privatelora.wire``): the in-process
runner, TCP and Ray all carry the very same objects. Their repr shows shapes, never values.
"""

from .wire import Activations, Close, Error, Handoff, Open, Opened, Reply  # noqa: F401
