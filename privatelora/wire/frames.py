"""Frames: one message <-> one authenticated, length-prefixed frame. The only codec.

Layout (``docs/wire.md`` has the details and every refusal code):
``[u32 length][u8 version, u8 kind, u8 flags, u8 0, u64 session][msgpack body][16-byte tag]``
with the tag an HMAC-SHA256 (truncated to 128 bits) of header and body under the
session's key, and the body lz4-compressed only where that saves at least 10%.

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
  Decoded tensors are float32.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from typing import Any, Callable, NamedTuple

import lz4.block
import msgpack

from privatelora.runtime.messages import Error, Message, Open
from privatelora.wire.errors import AuthError, FrameError, SchemaError, WireError
from privatelora.wire.kinds import KEY_LEN, KINDS, kind_of
from privatelora.wire.schema import DOWN, DTYPES, MAX_OPEN_BODY, UP, FrameContext, Geometry, check_int
from privatelora.wire.tensors import CODE_DTYPES

VERSION = 1
PREFIX = struct.Struct(">I")  # length of everything after the prefix
HEADER = struct.Struct(">BBBBQ")  # version, kind, flags, reserved (0), session
TAG_LEN = 16  # HMAC-SHA256 truncated to 128 bits
MIN_LENGTH = HEADER.size + TAG_LEN  # smallest legal value of the length prefix
DEFAULT_MAX_FRAME = 64 << 20  # bound on the length prefix (bytes after it)
FLAG_LZ4, FLAG_DOWN = 0x01, 0x02
# Session 0 is the connection channel (refusals of frames whose session the peer cannot
# prove). Its MAC key is public: integrity against accidents only, not authentication.
CONNECTION_KEY = b"privatelora/wire/v1/connection-channel"
COMPRESS_MIN_BYTES = 1024  # below this lz4 cannot save enough to pay for the try
COMPRESS_MIN_GAIN = 0.10  # keep lz4 only if the body shrinks by at least 10%
BUNDLE_CODE = 9  # a connection's bundle of many sessions' tensor frames (wire/bundle.py)
RAW_OF: dict = {}  # kind code -> raw tensor bytes of a frame whose body is not a msgpack map (``frame_info``)


class FrameInfo(NamedTuple):
    """Byte accounting of one frame: raw = tensor elements x wire dtype size (no scales,
    no framing); wire = the whole frame, prefix + header + body + tag. (Immutable; a
    NamedTuple rather than a frozen dataclass: half the cost, paid on every frame.)"""

    kind: str
    raw_bytes: int
    wire_bytes: int
    compressed: bool


class Header(NamedTuple):
    kind: str
    session: int
    flags: int
    length: int  # value of the length prefix


# HMAC with the key's inner and outer SHA-256 states computed once per key and copied per
# frame: half the cost of ``hmac.digest`` on a decode-sized frame (~1.3 us of ~2.7). Bounded;
# Open frames (keys chosen by unauthenticated peers) never enter it.
_MAC_STATES: dict[bytes, tuple] = {}
MAC_CACHE_KEYS = 4096
_IPAD, _OPAD = bytes(x ^ 0x36 for x in range(256)), bytes(x ^ 0x5C for x in range(256))


def _tag(key: bytes, signed) -> bytes:
    """HMAC-SHA256(key, signed)[:TAG_LEN], the same bytes as ``hmac.digest``."""
    if type(key) is not bytes:      # a bytearray or view: not hashable, not cached
        return hmac.digest(key, signed, "sha256")[:TAG_LEN]
    st = _MAC_STATES.get(key)
    if st is None:
        k = (key if len(key) <= 64 else hashlib.sha256(key).digest()).ljust(64, b"\0")
        st = (hashlib.sha256(k.translate(_IPAD)), hashlib.sha256(k.translate(_OPAD)))
        while _MAC_STATES and len(_MAC_STATES) >= MAC_CACHE_KEYS:
            _MAC_STATES.pop(next(iter(_MAC_STATES), None), None)    # the oldest key
        _MAC_STATES[key] = st
    inner = st[0].copy()
    inner.update(signed)
    outer = st[1].copy()
    outer.update(inner.digest())
    return outer.digest()[:TAG_LEN]


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
    return _encode(msg, key, direction, dtype, compress, geometry, max_frame, None)


def _encode(msg, key, direction, dtype, compress, geometry, max_frame, shared):
    kind = kind_of(type(msg))
    if kind is None:
        raise SchemaError("unknown_kind", f"{type(msg).__name__} is not a registered message kind")
    if direction not in kind.directions:
        raise FrameError("bad_direction", f"{kind.name} frames do not travel {direction}")
    check_int(msg.session, "session", 0, 2**64 - 1)
    if msg.session == 0 and kind.cls is not Error:
        raise FrameError("bad_session", "session 0 carries only Error frames")
    if compress not in ("auto", "never", "always"):
        raise ValueError(f"compress must be auto, never or always, not {compress!r}")
    dtype = dtype if dtype is not None else geometry.dtype if geometry is not None else "fp32"
    if dtype not in DTYPES:
        raise SchemaError("bad_dtype", f"dtype must be one of {sorted(DTYPES)}")
    mac_key = _resolve_key(msg, key)
    ctx = FrameContext(direction, geometry, dtype, encoding=True, shared=shared)
    body = msgpack.packb(kind.encode_body(msg, ctx), use_bin_type=True)
    flags = FLAG_DOWN if direction == DOWN else 0
    if compress == "always" or (compress == "auto" and len(body) >= COMPRESS_MIN_BYTES):
        packed = PREFIX.pack(len(body)) + lz4.block.compress(body, store_size=False)
        if compress == "always" or len(packed) <= (1 - COMPRESS_MIN_GAIN) * len(body):
            body, flags = packed, flags | FLAG_LZ4
    signed = HEADER.pack(VERSION, kind.code, flags, 0, msg.session) + body
    if len(signed) + TAG_LEN > max_frame:
        raise FrameError("too_large", f"frame of {len(signed) + TAG_LEN} bytes > {max_frame}")
    tag = hmac.digest(mac_key, signed, "sha256")[:TAG_LEN] if kind.cls is Open else _tag(mac_key, signed)
    frame = PREFIX.pack(len(signed) + TAG_LEN) + signed + tag
    return frame, FrameInfo(kind.name, ctx.raw, len(frame), bool(flags & FLAG_LZ4))


def encode_many(jobs, *, direction: str, compress: str = "auto", max_frame: int = DEFAULT_MAX_FRAME,
                shared: dict | None = None) -> list:
    """Encode several messages at once: ``jobs`` is a list of ``(msg, key, geometry, dtype)``
    (the arguments of ``encode_frame``). Returns one entry per job, in order: ``(frame,
    FrameInfo)``, or the exception ``encode_frame`` would have raised for that message alone
    (a refusal of one message never affects another). Frames are byte-identical to
    ``encode_frame``'s. ``Activations`` / ``Reply`` tensors that are whole-row views
    ``buf[i, off:off+n]`` of one contiguous tensor ``buf`` (their ``_base``, e.g. a stage's
    [k, T, r] buffer) are converted to the wire dtype once per buffer for all the frames
    (``tensors.SharedBuffer``: the whole buffer is converted, so it should hold what the
    batch sends); any other message is encoded as ``encode_frame`` does. ``shared``: a dict to reuse conversions across calls
    of one batch (the server passes one per ``send_many``)."""
    if direction not in (UP, DOWN):
        raise ValueError(f"direction must be {UP!r} or {DOWN!r}, not {direction!r}")
    shared = {} if shared is None else shared
    out = []
    for msg, key, geometry, dtype in jobs:
        try:
            out.append(_encode(msg, key, direction, dtype, compress, geometry, max_frame, shared))
        except Exception as e:          # this message's own failure, returned, not raised
            out.append(e)
    return out


def encode(msg: Message, *, key: bytes | None, direction: str, **kw) -> bytes:
    """``encode_frame`` without the FrameInfo."""
    return encode_frame(msg, key=key, direction=direction, **kw)[0]


_LAST_SPLIT: tuple = (None, 0, None)   # (frame, max_frame, result): peek_header then decode_frame
_MEMO_MAX = 64 << 10                   # ... of one small immutable frame parse its header once


def _split(buf: Any, max_frame: int):
    """Check prefix and header; return (view, Header, Kind)."""
    global _LAST_SPLIT
    last = _LAST_SPLIT
    if last[0] is buf and last[1] == max_frame:
        return last[2]
    res = _split_new(buf, max_frame)
    if type(buf) is bytes and len(buf) <= _MEMO_MAX:
        _LAST_SPLIT = (buf, max_frame, res)
    return res


def _split_new(buf: Any, max_frame: int):
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
    k = KINDS.get(kind)
    if k is None:
        raise FrameError("unknown_kind", f"unknown frame kind {kind}")
    return view, Header(k.name, session, flags, length), k


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


def _verify(view: memoryview, key: bytes, cached: bool = True) -> None:
    signed, tag = view[PREFIX.size: len(view) - TAG_LEN], view[len(view) - TAG_LEN:]
    mac = _tag(key, signed) if cached else hmac.digest(key, signed, "sha256")[:TAG_LEN]
    if not hmac.compare_digest(mac, tag):
        raise AuthError("bad_mac", "frame authentication failed")


@_guarded
def _decode(buf, direction, geometry_for, key_for, max_frame):
    view, hdr, kind = _split(buf, max_frame)
    if bool(hdr.flags & FLAG_DOWN) != (direction == DOWN) or direction not in kind.directions:
        raise FrameError("bad_direction", f"{hdr.kind} frame is not valid travelling {direction}")
    if kind.code == BUNDLE_CODE:
        raise FrameError("unknown_kind", "a bundle frame is read with wire.decode_bundle")
    if hdr.session == 0 and kind.cls is not Error:
        raise FrameError("bad_session", "session 0 carries only Error frames")
    if kind.cls is Open:  # signed by the key it carries: parse (bounded) first, then verify
        if hdr.length > MAX_OPEN_BODY:  # parsed before it is authenticated: keep it small
            raise FrameError("too_large", "Open frame too large")
        body = _body(view, hdr.flags, MAX_OPEN_BODY)
        key = body.get("key") if type(body) is dict else None
        if type(key) is not bytes or len(key) != KEY_LEN:
            raise SchemaError("bad_key", f"Open must carry a {KEY_LEN}-byte key")
        _verify(view, key, cached=False)   # a key any peer may choose: not cached
        geometry = None
    else:
        key = CONNECTION_KEY if hdr.session == 0 else key_for(hdr.session) if key_for else None
        if key is None:
            raise AuthError("unknown_session", f"no key for session {hdr.session}")
        _verify(view, key)  # before parsing: unauthenticated bodies are never parsed
        body = _body(view, hdr.flags, max_frame)
        geometry = geometry_for(hdr.session) if geometry_for and hdr.session else None
    ctx = FrameContext(direction, geometry)
    msg = kind.decode_body(hdr.session, body, ctx)
    return msg, FrameInfo(kind.name, ctx.raw, len(view), bool(hdr.flags & FLAG_LZ4))


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
    view, hdr, kind = _split(buf, max_frame)
    if kind.code in RAW_OF:           # a kind whose body is not a msgpack map (a bundle)
        return FrameInfo(kind.name, RAW_OF[kind.code](buf, max_frame), len(view), False)
    body = _body(view, hdr.flags, max_frame)
    raw = 0
    for name in kind.tensor_fields:
        t = body.get(name) if type(body) is dict else None
        if type(t) is list and len(t) >= 5 and type(t[0]) is int and t[0] in CODE_DTYPES \
                and all(type(x) is int for x in t[1:4]):
            raw += _record_raw(t)
    return FrameInfo(kind.name, raw, len(view), bool(hdr.flags & FLAG_LZ4))


def _record_raw(t: list) -> int:
    return t[1] * t[2] * t[3] * DTYPES[CODE_DTYPES[t[0]]]


# the framing pieces a kind whose body is not a msgpack map reads its frames with (wire/bundle.py)
guarded, split_frame, mac_tag, verify_mac, record_raw = _guarded, _split, _tag, _verify, _record_raw
