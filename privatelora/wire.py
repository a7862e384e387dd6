"""Wire codec: typed messages <-> authenticated, length-prefixed frames. The only codec.

Contract
- ``encode_frame`` / ``encode`` turn one message into one frame; ``decode_frame`` /
  ``decode`` turn one frame back into a message, or raise a ``WireError`` subclass. For ANY
  input bytes the decoder raises nothing but ``WireError`` (a last-resort guard maps an
  unexpected exception to code ``"internal"``; the fuzz tests assert it never fires).
- A cloud-bound (``"up"``) frame never carries a private tensor: ``encode`` raises
  ``PrivacyError`` for a tensor tagged private (``privacy.is_private``, also through a
  view), for a non-float tensor (token ids) and for any shape other than the session's
  declared ``[n, rank]`` / ``[n, hidden]``. Up tensor frames therefore need the geometry.
- The decoder is strict: bounded size, version, known kind for the direction, exact field
  set and types, tensors consistent with their byte length and with the session's
  ``Geometry``, finite values only, HMAC verified before the body is parsed (``Open``
  carries its own key and is verified with it; TLS protects it off loopback).
- No pickle: bodies are msgpack maps of plain values; tensors are raw little-endian bytes.
  Decoded tensors are float32. Layout and refusal codes: ``docs/wire.md``.
- New message kinds (e.g. gradient frames for split training) are one ``@register``-ed
  class with ``_encode_body`` / ``_decode_body``.
"""

from __future__ import annotations

import hmac
import re
import struct
import functools
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar

import lz4.block
import msgpack
import numpy as np
import torch

from .privacy import is_private

VERSION = 1
UP, DOWN = "up", "down"  # up: device -> cloud, down: cloud -> device
PREFIX = struct.Struct(">I")  # length of everything after the prefix
HEADER = struct.Struct(">BBBBQ")  # version, kind, flags, reserved (0), session
TAG_LEN = 16  # HMAC-SHA256 truncated to 128 bits
KEY_LEN = 32
MIN_LENGTH = HEADER.size + TAG_LEN  # smallest legal value of the length prefix
DEFAULT_MAX_FRAME = 64 << 20  # bound on the length prefix (bytes after it)
FLAG_LZ4, FLAG_DOWN = 0x01, 0x02
# Session 0 is the connection channel (refusals of frames whose session the peer cannot
# prove). Its MAC key is public: integrity against accidents only, not authentication.
CONNECTION_KEY = b"privatelora/wire/v1/connection-channel"
COMPRESS_MIN_BYTES = 1024  # below this lz4 cannot save enough to pay for the try
COMPRESS_MIN_GAIN = 0.10  # keep lz4 only if the body shrinks by at least 10%
MAX_TOKENS, MAX_HIDDEN, MAX_TARGETS, MAX_LAYERS = 1 << 16, 1 << 16, 16, 1024
MAX_POSITION, MAX_REASON, MAX_OPEN_BODY = 2**31 - 1, 1024, 16384

# wire dtype -> bytes per element (int8 adds one fp32 scale per row), and its numpy layout
DTYPES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
# a frame names its dtype by a one-byte code (a string would cost 4-5 bytes a frame)
DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_NP_WIRE = {"fp32": "<f4", "fp16": "<f2", "bf16": "<u2", "int8": "i1"}
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,15}")
_CODE_RE = re.compile(r"[a-z0-9_]{1,64}")


# ---------------------------------------------------------------- errors
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


# ---------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """What a session exchanges; fixed by its ``Open`` and checked on every frame."""

    hidden: int
    rank: int
    targets: tuple[str, ...]  # adapted projections, e.g. ("q", "k", "v")
    shared_a: bool  # one A per layer: Activations carries 1 tensor instead of len(targets)
    layers: tuple[int, ...]  # cloud layers that exchange activations, in order
    dtype: str = "fp32"  # wire dtype of Activations / Reply
    max_tokens: int = 2048  # rows per frame

    def __post_init__(self):
        for name in ("targets", "layers"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def n_activations(self) -> int:
        return 1 if self.shared_a else len(self.targets)

    def validate(self) -> "Geometry":
        g, c = GeometryError, "bad_geometry"
        _int(self.hidden, "hidden", 1, MAX_HIDDEN, g, c)
        _int(self.rank, "rank", 1, self.hidden, g, c)
        _int(self.max_tokens, "max_tokens", 1, MAX_TOKENS, g, c)
        _bool(self.shared_a, "shared_a", g, c)
        if type(self.dtype) is not str or self.dtype not in DTYPES:
            raise g("bad_geometry", f"dtype must be one of {sorted(DTYPES)}")
        t, ls = self.targets, self.layers
        if type(t) is not tuple or not 1 <= len(t) <= MAX_TARGETS \
                or not all(type(x) is str and _NAME_RE.fullmatch(x) for x in t) \
                or len(set(t)) != len(t):
            raise g("bad_geometry", "targets must be 1-16 distinct short lowercase names")
        if type(ls) is not tuple or not 1 <= len(ls) <= MAX_LAYERS:
            raise g("bad_geometry", f"layers must be a tuple of 1-{MAX_LAYERS} ints")
        for x in ls:
            _int(x, "layer", 0, 65535, g, c)
        if any(b <= a for a, b in zip(ls, ls[1:])):
            raise g("bad_geometry", "layers must be strictly increasing")
        return self

    def to_wire(self) -> dict:
        return asdict(self)  # tuples pack as msgpack arrays

    @classmethod
    def from_wire(cls, obj: Any) -> "Geometry":
        _keys(obj, _GEOMETRY_FIELDS, "geometry")
        if type(obj["targets"]) is not list or type(obj["layers"]) is not list:
            raise GeometryError("bad_geometry", "targets and layers must be arrays")
        return cls(**{**obj, "targets": tuple(obj["targets"]),
                      "layers": tuple(obj["layers"])}).validate()


_GEOMETRY_FIELDS = frozenset(f.name for f in fields(Geometry))


# ---------------------------------------------------------------- field checks
# Shared by encode (validating what we send) and decode (what we accept).
def _int(v, what, lo, hi, err=SchemaError, code="bad_field") -> int:
    if type(v) is not int or not lo <= v <= hi:  # `type is`: refuses bool, a subclass of int
        raise err(code, f"{what} must be an int in [{lo}, {hi}]")
    return v


def _bool(v, what, err=SchemaError, code="bad_field") -> bool:
    if type(v) is not bool:
        raise err(code, f"{what} must be a bool")
    return v


def _keys(obj, expected: frozenset, what: str) -> None:
    if type(obj) is not dict or obj.keys() != expected:
        raise SchemaError("bad_fields", f"{what} must have exactly the fields {sorted(expected)}")


@dataclass
class _Ctx:
    """Per-frame state: direction, session geometry, wire dtype, raw payload bytes."""

    direction: str
    geometry: Geometry | None
    dtype: str = "fp32"
    raw: int = 0
    encoding: bool = False

    def need_geometry(self) -> Geometry:
        if self.geometry is None:
            err = PrivacyError if self.encoding and self.direction == UP else GeometryError
            raise err("no_geometry", "tensor frames need the session's declared geometry")
        return self.geometry


# ---------------------------------------------------------------- tensors
# numpy does the per-tensor work: on the hot path tensors are tiny ([1, rank]) and a torch
# op costs ~20 us of dispatch where numpy costs ~1 us. Explicit '<' dtypes make the wire
# little-endian on any host.
def _check_out(ctx: _Ctx, t: Any, cols: int | None, max_rows: int, what) -> None:
    """Refuse, before encoding, anything that is not a float [n, cols] activation.
    ``what``: the field's name, or a callable giving it (built only for an error)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 \
            or (ctx.direction == UP and (is_private(t) or (t._base is not None and is_private(t._base)))) \
            or not 1 <= t.shape[0] <= max_rows or (cols is not None and t.shape[1] != cols):
        err = PrivacyError if ctx.direction == UP else SchemaError
        what = what() if callable(what) else what
        if not isinstance(t, torch.Tensor):
            raise err("bad_tensor", f"{what} is a {type(t).__name__}, not a tensor")
        if ctx.direction == UP and (is_private(t) or (t._base is not None and is_private(t._base))):
            raise PrivacyError("private_tensor", f"{what} is tagged private: it stays on the device")
        if not t.is_floating_point():
            raise err("not_float", f"{what} has dtype {t.dtype}; only float activations travel")
        raise (err if ctx.direction == UP else GeometryError)(
            "bad_shape", f"{what} has shape {list(t.shape)}, declared [1..{max_rows}, {cols}]")


def _as_float32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _pack_tensor(ctx: _Ctx, x: np.ndarray, what: str) -> list:
    """float32 [count, rows, cols] -> one record [code, count, rows, cols, data(, scales)].

    One record per frame, not one per tensor: at one decode token per frame the record
    header is a visible share of the bytes (7B, fp16: 768 payload bytes per frame).
    """
    count, rows, cols = x.shape
    ctx.raw += x.size * DTYPES[ctx.dtype]
    code = DTYPE_CODES[ctx.dtype]
    if ctx.dtype == "int8":  # symmetric per-row absmax: x ~ q * scale, |error| <= scale / 2
        if not np.isfinite(x).all():
            raise SchemaError("non_finite", f"{what} holds NaN or inf")
        scale = (np.abs(x).max(axis=2) / np.float32(127)).astype("<f4")      # [count, rows]
        safe = np.where(scale > 0, scale, np.float32(1))
        q = np.rint(x / safe[..., None]).clip(-127, 127).astype("i1")
        return [code, count, rows, cols, q.tobytes(), scale.tobytes()]
    if ctx.dtype == "bf16":  # numpy has no bf16: let torch round, ship the bit pattern
        bits = torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16)
        w = bits.numpy().astype("<i2")
        finite = ((w.view("<u2") & 0x7F80) != 0x7F80).all()  # exponent all ones = inf/NaN
    elif ctx.dtype == "fp16":
        with np.errstate(over="ignore"):  # overflow to inf is refused just below
            w = x.astype("<f2")
        finite = np.isfinite(w).all()
    else:
        w = x.astype("<f4", copy=False)
        finite = np.isfinite(w).all()
    if not finite:  # one check after the cast: NaN/inf stay NaN/inf, overflow becomes inf
        raise SchemaError("non_finite", f"{what} holds NaN or inf, or overflows {ctx.dtype}")
    return [code, count, rows, cols, w.tobytes()]


def _unpack_tensor(ctx: _Ctx, v: Any, count: int, cols: int, max_rows: int, what: str,
                   want: str | None) -> tuple[torch.Tensor, ...]:
    """[code, count, rows, cols, data(, scales)] -> ``count`` float32 [rows, cols] tensors;
    ``want``: the required dtype (None: any)."""
    if type(v) is not list or len(v) not in (5, 6) or type(v[0]) is not int or v[0] not in CODE_DTYPES:
        raise SchemaError("bad_tensor", f"{what} is not [dtype, count, rows, cols, data(, scales)]")
    name = CODE_DTYPES[v[0]]
    if want is not None and name != want:
        raise GeometryError("bad_dtype", f"{what} is {name}, the session declared {want}")
    if len(v) != (6 if name == "int8" else 5):
        raise SchemaError("bad_tensor", f"{what}: int8 tensors (only) carry row scales")
    if type(v[1]) is not int or v[1] != count:
        raise GeometryError("bad_count", f"{what} must be {count} tensors")
    rows, size = v[2], DTYPES[name]
    if type(rows) is not int or not 1 <= rows <= max_rows or type(v[3]) is not int or v[3] != cols:
        raise GeometryError("bad_shape", f"{what} must be [1..{max_rows}, {cols}]")
    data = v[4]
    if type(data) is not bytes or len(data) != count * rows * cols * size:
        raise SchemaError("bad_tensor", f"{what} payload length is not {count}x{rows}x{cols} {name}")
    w = np.frombuffer(data, dtype=_NP_WIRE[name]).reshape(count, rows, cols)
    if name == "bf16":
        x = (w.astype(np.uint32) << 16).view(np.float32)  # bf16 = the top half of an fp32
    elif name == "int8":
        scale = np.frombuffer(v[5], dtype="<f4") if type(v[5]) is bytes and len(v[5]) % 4 == 0 else None
        if scale is None or scale.size != count * rows:
            raise SchemaError("bad_tensor", f"{what} needs {count * rows} fp32 scales")
        if not np.isfinite(scale).all() or (scale < 0).any() or (w == -128).any():
            raise SchemaError("bad_tensor", f"{what}: scales finite >= 0, values in [-127, 127]")
        with np.errstate(over="ignore"):  # overflow to inf is refused just below
            x = w.astype(np.float32) * scale.astype(np.float32).reshape(count, rows, 1)
    else:
        x = w.astype(np.float32)  # a copy: writable, native order, detached from the frame
    if not np.isfinite(x).all():
        raise SchemaError("non_finite", f"{what} holds NaN or inf")
    ctx.raw += count * rows * cols * size
    return torch.from_numpy(x).unbind(0)


def _pack_group(ctx, ts, count, cols, max_rows, what) -> list:
    err = PrivacyError if ctx.direction == UP else GeometryError
    if not isinstance(ts, (tuple, list)) or not 1 <= len(ts) <= MAX_TARGETS \
            or (count is not None and len(ts) != count):
        raise err("bad_count", f"{what} must be {count or '1-16'} tensors")
    for i, t in enumerate(ts):
        _check_out(ctx, t, cols, max_rows, lambda: f"{what}[{i}]")
    if len({t.shape for t in ts}) != 1:
        raise err("bad_shape", f"{what} tensors must share one shape")
    # one stack and one conversion for the group: per-tensor conversions cost ~5 us each
    return _pack_tensor(ctx, _as_float32(torch.stack(ts) if len(ts) > 1 else ts[0][None]), what)


def _unpack_group(ctx, v, count, cols, max_rows, what, want) -> tuple[torch.Tensor, ...]:
    return _unpack_tensor(ctx, v, count, cols, max_rows, what, want)


# ---------------------------------------------------------------- messages
def _brief(v: Any) -> str:
    """Repr that never shows tensor values or key bytes."""
    if isinstance(v, torch.Tensor):
        return f"Tensor{list(v.shape)}:{str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (tuple, list)) and any(isinstance(x, (torch.Tensor, bytes)) for x in v):
        return "(" + ", ".join(_brief(x) for x in v) + ")"
    return repr(v)


class Message:
    """Base of all frame kinds. Subclasses are frozen dataclasses registered by ``kind``."""

    KIND: ClassVar[int]
    NAME: ClassVar[str]
    DIRECTIONS: ClassVar[frozenset[str]]
    FIELDS: ClassVar[frozenset[str]] = frozenset()  # exact body keys
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ()  # body keys holding tensor(s), for accounting
    session: int

    def __repr__(self) -> str:
        body = ", ".join(f"{f.name}={_brief(getattr(self, f.name))}" for f in fields(self))
        return f"{type(self).__name__}({body})"

    def _encode_body(self, ctx: _Ctx) -> dict:
        return {}

    @classmethod
    def _decode_body(cls, session: int, body: Any, ctx: _Ctx) -> "Message":
        _keys(body, cls.FIELDS, cls.NAME)
        return cls(session)


KINDS: dict[int, type[Message]] = {}


def register(cls: type[Message]) -> type[Message]:
    """Add a message kind. Kinds 1-15 are the serving protocol; 16+ are free (training)."""
    if not 1 <= cls.KIND <= 255 or cls.KIND in KINDS:
        raise ValueError(f"kind {cls.KIND} of {cls.__name__} is taken or out of range")
    KINDS[cls.KIND] = cls
    return cls


def _tupled(obj, name):
    if isinstance(getattr(obj, name), list):
        object.__setattr__(obj, name, tuple(getattr(obj, name)))


@register
@dataclass(frozen=True, repr=False)
class Open(Message):
    """Device -> cloud: start a session with its HMAC key and geometry."""

    KIND, NAME, DIRECTIONS, FIELDS = 1, "open", frozenset({UP}), frozenset({"key", "geometry"})
    session: int
    key: bytes
    geometry: Geometry

    def _encode_body(self, ctx):
        if type(self.key) is not bytes or len(self.key) != KEY_LEN:
            raise SchemaError("bad_key", f"the session key must be {KEY_LEN} bytes")
        if not isinstance(self.geometry, Geometry):
            raise SchemaError("bad_geometry", "geometry must be a Geometry")
        return {"key": self.key, "geometry": self.geometry.validate().to_wire()}

    @classmethod
    def _decode_body(cls, session, body, ctx):
        _keys(body, cls.FIELDS, cls.NAME)
        return cls(session, body["key"], Geometry.from_wire(body["geometry"]))


@register
@dataclass(frozen=True, repr=False)
class Opened(Message):
    """Cloud -> device: the session is open."""

    KIND, NAME, DIRECTIONS = 2, "opened", frozenset({DOWN})
    session: int


@register
@dataclass(frozen=True, repr=False, eq=False)
class Handoff(Message):
    """Hidden states [n, hidden] entering the first cloud layer (up) or leaving the last (down)."""

    KIND, NAME, DIRECTIONS = 3, "handoff", frozenset({UP, DOWN})
    FIELDS, TENSOR_FIELDS = frozenset({"start", "hidden", "want_all"}), ("hidden",)
    session: int
    start: int  # position of the first row
    hidden: torch.Tensor
    want_all: bool = False  # up: False = hand back only the last row

    def _encode_body(self, ctx):
        g = ctx.need_geometry() if ctx.direction == UP else ctx.geometry
        _int(self.start, "start", 0, MAX_POSITION)
        _bool(self.want_all, "want_all")
        h = _pack_group(ctx, (self.hidden,), 1, g.hidden if g else None,
                        g.max_tokens if g else MAX_TOKENS, "hidden")
        return {"start": self.start, "hidden": h, "want_all": self.want_all}

    @classmethod
    def _decode_body(cls, session, body, ctx):
        _keys(body, cls.FIELDS, cls.NAME)
        g = ctx.need_geometry()
        start = _int(body["start"], "start", 0, MAX_POSITION)
        want_all = _bool(body["want_all"], "want_all")
        # any wire dtype: the caller picks per hand-off (hidden states have outliers that
        # int8 per-row scales would crush, so an int8 session may still hand off in fp16)
        (h,) = _unpack_tensor(ctx, body["hidden"], 1, g.hidden, g.max_tokens, "hidden", None)
        return cls(session, start, h, want_all)


class _LayerTensors(Message):
    """Shared logic of Activations / Reply: {"l": layer, <field>: one record of count x [n, rank]}."""

    FIELD: ClassVar[str]
    _count: ClassVar[Callable[[Geometry], int]]  # tensors per frame for a geometry

    def __post_init__(self):
        _tupled(self, self.FIELD)

    def _encode_body(self, ctx):
        g = ctx.need_geometry() if ctx.direction == UP else ctx.geometry
        if g is not None:
            if type(self.layer) is not int or self.layer not in g.layers:
                raise (PrivacyError if ctx.direction == UP else GeometryError)(
                    "bad_layer", f"layer {self.layer!r} is not one of the session's layers")
            if ctx.dtype != g.dtype:
                raise GeometryError("bad_dtype", f"session declared {g.dtype}, not {ctx.dtype}")
        _int(self.layer, "layer", 0, 65535)
        ts = _pack_group(ctx, getattr(self, self.FIELD), self._count(g) if g else None,
                         g.rank if g else None, g.max_tokens if g else MAX_TOKENS, self.FIELD)
        return {"l": self.layer, self.FIELD: ts}

    @classmethod
    def _decode_body(cls, session, body, ctx):
        _keys(body, cls.FIELDS, cls.NAME)
        g = ctx.need_geometry()
        layer = body["l"]
        if type(layer) is not int or layer not in g.layers:
            raise GeometryError("bad_layer", "layer is not one of the session's layers")
        ts = _unpack_group(ctx, body[cls.FIELD], cls._count(g), g.rank, g.max_tokens,
                           cls.FIELD, g.dtype)
        return cls(session, layer, ts)


@register
@dataclass(frozen=True, repr=False, eq=False)
class Activations(_LayerTensors):
    """Cloud -> device: a = A h for one layer; 1 tensor if shared_a else one per target."""

    KIND, NAME, DIRECTIONS, FIELD = 4, "activations", frozenset({DOWN}), "a"
    FIELDS, TENSOR_FIELDS = frozenset({"l", "a"}), ("a",)
    session: int
    layer: int
    a: tuple[torch.Tensor, ...]
    _count = staticmethod(lambda g: g.n_activations)


@register
@dataclass(frozen=True, repr=False, eq=False)
class Reply(_LayerTensors):
    """Device -> cloud: m = M a for one layer, one [n, rank] tensor per target."""

    KIND, NAME, DIRECTIONS, FIELD = 5, "reply", frozenset({UP}), "m"
    FIELDS, TENSOR_FIELDS = frozenset({"l", "m"}), ("m",)
    session: int
    layer: int
    m: tuple[torch.Tensor, ...]
    _count = staticmethod(lambda g: len(g.targets))


@register
@dataclass(frozen=True, repr=False)
class Close(Message):
    """Device -> cloud: the session is over; the cloud frees its state."""

    KIND, NAME, DIRECTIONS = 6, "close", frozenset({UP})
    session: int


@register
@dataclass(frozen=True, repr=False)
class Error(Message):
    """Either way: a refusal or failure. Session 0 = about the connection, not a session."""

    KIND, NAME, DIRECTIONS = 7, "error", frozenset({UP, DOWN})
    FIELDS = frozenset({"code", "reason"})
    session: int
    code: str
    reason: str

    def _encode_body(self, ctx):
        return self._check(self.code, self.reason)

    @classmethod
    def _decode_body(cls, session, body, ctx):
        _keys(body, cls.FIELDS, cls.NAME)
        return cls(session, **cls._check(body["code"], body["reason"]))

    @staticmethod
    def _check(code, reason) -> dict:
        if type(code) is not str or not _CODE_RE.fullmatch(code):
            raise SchemaError("bad_field", "error code must match [a-z0-9_]{1,64}")
        if type(reason) is not str or len(reason) > MAX_REASON:
            raise SchemaError("bad_field", f"error reason must be a str of <= {MAX_REASON} chars")
        return {"code": code, "reason": reason}


# ---------------------------------------------------------------- frames
@dataclass(frozen=True)
class FrameInfo:
    """Byte accounting of one frame: raw = tensor elements x wire dtype size (no scales,
    no framing); wire = the whole frame, prefix + header + body + tag."""

    kind: str
    raw_bytes: int
    wire_bytes: int
    compressed: bool


@dataclass(frozen=True)
class Header:
    kind: str
    session: int
    flags: int
    length: int  # value of the length prefix


def _resolve_key(msg: Message, key: bytes | None) -> bytes:
    if isinstance(msg, Open):
        if key is not None and key != msg.key:
            raise SchemaError("bad_key", "an Open frame is signed with the key it carries")
        return msg.key
    if msg.session == 0:
        return CONNECTION_KEY
    if type(key) is not bytes or len(key) != KEY_LEN:
        raise AuthError("no_key", f"session frames need the session's {KEY_LEN}-byte key")
    return key


def encode_frame(msg: Message, *, key: bytes | None, direction: str, dtype: str | None = None,
                 compress: str = "auto", geometry: Geometry | None = None,
                 max_frame: int = DEFAULT_MAX_FRAME) -> tuple[bytes, FrameInfo]:
    """Encode ``msg`` into one frame; also return its ``FrameInfo``.

    dtype: wire dtype of tensors; default the geometry's, else fp32. compress: "auto" (lz4
    where it pays), "never" or "always". geometry: required for up tensor frames.
    """
    cls = type(msg)
    if KINDS.get(getattr(cls, "KIND", -1)) is not cls:
        raise SchemaError("unknown_kind", f"{cls.__name__} is not a registered message kind")
    if direction not in cls.DIRECTIONS:
        raise FrameError("bad_direction", f"{cls.NAME} frames do not travel {direction}")
    _int(msg.session, "session", 0, 2**64 - 1)
    if msg.session == 0 and cls is not Error:
        raise FrameError("bad_session", "session 0 carries only Error frames")
    if compress not in ("auto", "never", "always"):
        raise ValueError(f"compress must be auto, never or always, not {compress!r}")
    dtype = dtype if dtype is not None else geometry.dtype if geometry is not None else "fp32"
    if dtype not in DTYPES:
        raise SchemaError("bad_dtype", f"dtype must be one of {sorted(DTYPES)}")
    mac_key = _resolve_key(msg, key)
    ctx = _Ctx(direction, geometry, dtype, encoding=True)
    body = msgpack.packb(msg._encode_body(ctx), use_bin_type=True)
    flags = FLAG_DOWN if direction == DOWN else 0
    if compress == "always" or (compress == "auto" and len(body) >= COMPRESS_MIN_BYTES):
        packed = PREFIX.pack(len(body)) + lz4.block.compress(body, store_size=False)
        if compress == "always" or len(packed) <= (1 - COMPRESS_MIN_GAIN) * len(body):
            body, flags = packed, flags | FLAG_LZ4
    signed = HEADER.pack(VERSION, cls.KIND, flags, 0, msg.session) + body
    if len(signed) + TAG_LEN > max_frame:
        raise FrameError("too_large", f"frame of {len(signed) + TAG_LEN} bytes > {max_frame}")
    tag = hmac.digest(mac_key, signed, "sha256")[:TAG_LEN]
    frame = PREFIX.pack(len(signed) + TAG_LEN) + signed + tag
    return frame, FrameInfo(cls.NAME, ctx.raw, len(frame), bool(flags & FLAG_LZ4))


def encode(msg: Message, *, key: bytes | None, direction: str, **kw) -> bytes:
    """``encode_frame`` without the FrameInfo."""
    return encode_frame(msg, key=key, direction=direction, **kw)[0]


def _split(buf: Any, max_frame: int):
    """Check prefix and header; return (view, Header, message class)."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise FrameError("bad_type", f"a frame is bytes, not {type(buf).__name__}")
    view = memoryview(buf).cast("B") if isinstance(buf, memoryview) else memoryview(buf)
    if len(view) < PREFIX.size + MIN_LENGTH:
        raise FrameError("truncated", f"{len(view)} bytes is shorter than any frame")
    (length,) = PREFIX.unpack_from(view)
    if length > max_frame:
        raise FrameError("too_large", f"frame of {length} bytes > {max_frame}")
    if length != len(view) - PREFIX.size:
        raise FrameError("bad_length", f"prefix says {length} bytes, frame has {len(view) - 4}")
    version, kind, flags, reserved, session = HEADER.unpack_from(view, PREFIX.size)
    if version != VERSION:
        raise FrameError("bad_version", f"version {version}, this codec speaks {VERSION}")
    if reserved or flags & ~(FLAG_LZ4 | FLAG_DOWN):
        raise FrameError("bad_header", "reserved header bits are set")
    cls = KINDS.get(kind)
    if cls is None:
        raise FrameError("unknown_kind", f"unknown frame kind {kind}")
    return view, Header(cls.NAME, session, flags, length), cls


def _guarded(fn):
    """Last line of defence: callers rely on WireError only, whatever the input bytes."""
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        try:
            return fn(*args, **kw)
        except WireError:
            raise
        except Exception as e:
            raise FrameError("internal", type(e).__name__) from None
    return wrapper


@_guarded
def peek_header(buf: Any, *, max_frame: int = DEFAULT_MAX_FRAME) -> Header:
    """Kind and session of a frame, without authenticating it (for routing only)."""
    return _split(buf, max_frame)[1]


def _no_dup_map(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):  # msgpack lets the last duplicate win; we refuse the ambiguity
        raise ValueError("duplicate map key")
    return d


def _body(view: memoryview, flags: int, max_frame: int) -> Any:
    body = view[PREFIX.size + HEADER.size: len(view) - TAG_LEN]
    if flags & FLAG_LZ4:
        if len(body) < PREFIX.size:
            raise FrameError("bad_compression", "compressed body without its size")
        (size,) = PREFIX.unpack_from(body)
        if size > max_frame:  # bound the allocation before decompressing (lz4 bombs)
            raise FrameError("too_large", f"body inflates to {size} bytes > {max_frame}")
        try:
            body = lz4.block.decompress(body[PREFIX.size:], uncompressed_size=size)
        except Exception:
            raise FrameError("bad_compression", "lz4 block does not decompress") from None
        if len(body) != size:
            raise FrameError("bad_compression", "lz4 block has the wrong size")
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                               object_pairs_hook=_no_dup_map)
    except Exception:
        raise FrameError("malformed", "body is not one well-formed msgpack value") from None


def _verify(view: memoryview, key: bytes) -> None:
    signed, tag = view[PREFIX.size: len(view) - TAG_LEN], view[len(view) - TAG_LEN:]
    if not hmac.compare_digest(hmac.digest(key, signed, "sha256")[:TAG_LEN], tag):
        raise AuthError("bad_mac", "frame authentication failed")


@_guarded
def _decode(buf, direction, geometry_for, key_for, max_frame):
    view, hdr, cls = _split(buf, max_frame)
    if bool(hdr.flags & FLAG_DOWN) != (direction == DOWN) or direction not in cls.DIRECTIONS:
        raise FrameError("bad_direction", f"{hdr.kind} frame is not valid travelling {direction}")
    if hdr.session == 0 and cls is not Error:
        raise FrameError("bad_session", "session 0 carries only Error frames")
    if cls is Open:  # signed by the key it carries: parse (bounded) first, then verify
        if hdr.length > MAX_OPEN_BODY:  # parsed before it is authenticated: keep it small
            raise FrameError("too_large", "Open frame too large")
        body = _body(view, hdr.flags, MAX_OPEN_BODY)
        key = body.get("key") if type(body) is dict else None
        if type(key) is not bytes or len(key) != KEY_LEN:
            raise SchemaError("bad_key", f"Open must carry a {KEY_LEN}-byte key")
        _verify(view, key)
        geometry = None
    else:
        key = CONNECTION_KEY if hdr.session == 0 else key_for(hdr.session) if key_for else None
        if key is None:
            raise AuthError("unknown_session", f"no key for session {hdr.session}")
        _verify(view, key)  # before parsing: unauthenticated bodies are never parsed
        body = _body(view, hdr.flags, max_frame)
        geometry = geometry_for(hdr.session) if geometry_for and hdr.session else None
    ctx = _Ctx(direction, geometry)
    msg = cls._decode_body(hdr.session, body, ctx)
    return msg, FrameInfo(cls.NAME, ctx.raw, len(view), bool(hdr.flags & FLAG_LZ4))


def decode_frame(buf: bytes, *, direction: str,
                 geometry_for: Callable[[int], Geometry | None] | None = None,
                 key_for: Callable[[int], bytes | None] | None = None,
                 max_frame: int = DEFAULT_MAX_FRAME) -> tuple[Message, FrameInfo]:
    """Decode one whole frame (prefix included) that travelled ``direction``.

    key_for / geometry_for map a session id to its key / Geometry, or None if unknown.
    Raises only WireError subclasses.
    """
    if direction not in (UP, DOWN):  # a caller bug, not an input: fail loudly
        raise ValueError(f"direction must be {UP!r} or {DOWN!r}, not {direction!r}")
    return _decode(buf, direction, geometry_for, key_for, max_frame)


def decode(buf: bytes, *, direction: str, geometry_for=None, key_for=None,
           max_frame: int = DEFAULT_MAX_FRAME) -> Message:
    """``decode_frame`` without the FrameInfo."""
    return decode_frame(buf, direction=direction, geometry_for=geometry_for,
                        key_for=key_for, max_frame=max_frame)[0]


@_guarded
def frame_info(buf: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> FrameInfo:
    """Kind, raw payload bytes and wire bytes of a frame, for accounting. Does not
    authenticate or validate tensors (use decode for that); raises WireError on garbage."""
    view, hdr, cls = _split(buf, max_frame)
    body = _body(view, hdr.flags, max_frame)
    raw = 0
    for name in cls.TENSOR_FIELDS:
        t = body.get(name) if type(body) is dict else None
        if type(t) is list and len(t) >= 5 and type(t[0]) is int and t[0] in CODE_DTYPES \
                and all(type(x) is int for x in t[1:4]):
            raw += t[1] * t[2] * t[3] * DTYPES[CODE_DTYPES[t[0]]]
    return FrameInfo(cls.NAME, raw, len(view), bool(hdr.flags & FLAG_LZ4))
