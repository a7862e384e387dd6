"""The codec's refusals. Every one carries a short stable ``code`` (used for counting)
and a reason for people; callers of the decoder rely on ``WireError`` alone."""

from __future__ import annotations


class WireError(Exception):
    """Every refusal of the codec. ``code`` is a short stable token (used for counting)."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


class FrameError(WireError):
    """Framing: length, header, version, kind, direction, compression, msgpack."""


class AuthError(WireError):
    """HMAC mismatch or no key for the named session."""


class SchemaError(WireError):
    """Fields, types or tensor encoding do not match the message kind."""


class GeometryError(SchemaError):
    """Valid tensors, but not of the shape/count/layer the session declared."""


class PrivacyError(WireError):
    """A cloud-bound frame would carry a private, integer or wrongly shaped tensor."""
