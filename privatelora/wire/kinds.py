"""Frame kinds: which message class travels under which one-byte kind, in which
direction, with which body fields, and the codec of its body.

A kind is one ``Kind`` record registered with ``register``; the message classes
themselves are plain dataclasses (``privatelora.runtime.messages``,
``privatelora.runtime.train_messages``). Kinds 1-15 are the serving protocol (here), 16+ are
free for extensions (split training: ``wire/training.py``). A body encoder validates what
we send (a cloud-bound tensor must be a float activation of the declared shape); a body
decoder validates what we accept, against the session's ``Geometry``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from privatelora.runtime.messages import Activations, Close, Error, Handoff, Message, Open, Opened, Redirect, Reply
from privatelora.wire.errors import GeometryError, PrivacyError, SchemaError
from privatelora.wire.schema import (
    CODE_RE,
    DOWN,
    MAX_POSITION,
    MAX_REASON,
    MAX_TOKENS,
    UP,
    FrameContext,
    Geometry,
    check_bool,
    check_int,
    check_keys,
)
from privatelora.wire.tensors import pack_group, unpack_tensor

KEY_LEN = 32
# Hidden states have outliers that int8 per-row scales would crush: an int8 session
# hands off in fp16 (the activations and replies stay int8).
HANDOFF_DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "fp16"}


@dataclass(frozen=True)
class Kind:
    """One frame kind. ``encode(msg, ctx) -> body dict``; ``decode(session, body, ctx) -> msg``."""

    code: int
    name: str
    cls: type
    directions: frozenset
    fields: frozenset = frozenset()           # exact body keys
    tensor_fields: tuple[str, ...] = ()       # body keys holding a tensor record, for accounting
    encode: Callable[[Any, FrameContext], dict] | None = None
    decode: Callable[[int, Any, FrameContext], Message] | None = None

    def encode_body(self, msg, ctx: FrameContext) -> dict:
        return self.encode(msg, ctx) if self.encode else {}

    def decode_body(self, session: int, body: Any, ctx: FrameContext) -> Message:
        check_keys(body, self.fields, self.name)
        return self.decode(session, body, ctx) if self.decode else self.cls(session)


KINDS: dict[int, Kind] = {}
BY_CLASS: dict[type, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add a frame kind; its code and class must be new."""
    if not 1 <= kind.code <= 255 or kind.code in KINDS or kind.cls in BY_CLASS:
        raise ValueError(f"kind {kind.code} ({kind.name}) is taken or out of range")
    KINDS[kind.code] = BY_CLASS[kind.cls] = kind
    return kind


def kind_of(cls: type) -> Kind | None:
    return BY_CLASS.get(cls)


def check_layer_out(ctx: FrameContext, g: Geometry | None, layer) -> None:
    """An outgoing layer index must be one of the session's layers."""
    if g is not None and (type(layer) is not int or layer not in g.layers):
        raise (PrivacyError if ctx.direction == UP else GeometryError)(
            "bad_layer", f"layer {layer!r} is not one of the session's layers")
    check_int(layer, "layer", 0, 65535)


def check_layer_in(g: Geometry, layer) -> int:
    if type(layer) is not int or layer not in g.layers:
        raise GeometryError("bad_layer", "layer is not one of the session's layers")
    return layer


# ---------------------------------------------------------------- serving kinds
def _enc_open(msg: Open, ctx):
    if type(msg.key) is not bytes or len(msg.key) != KEY_LEN:
        raise SchemaError("bad_key", f"the session key must be {KEY_LEN} bytes")
    if not isinstance(msg.geometry, Geometry):
        raise SchemaError("bad_geometry", "geometry must be a Geometry")
    return {"key": msg.key, "geometry": msg.geometry.validate().to_wire()}


def _dec_open(session, body, ctx):
    return Open(session, body["key"], Geometry.from_wire(body["geometry"]))


def _enc_handoff(msg: Handoff, ctx):
    g = ctx.geometry_if_needed()
    check_int(msg.start, "start", 0, MAX_POSITION)
    check_bool(msg.want_all, "want_all")
    h = pack_group(ctx, (msg.hidden,), 1, g.hidden if g else None, g.max_tokens if g else MAX_TOKENS, "hidden")
    return {"start": msg.start, "hidden": h, "want_all": msg.want_all}


def _dec_handoff(session, body, ctx):
    g = ctx.need_geometry()
    start = check_int(body["start"], "start", 0, MAX_POSITION)
    want_all = check_bool(body["want_all"], "want_all")
    # any wire dtype: the sender picks per hand-off (HANDOFF_DTYPE)
    (h,) = unpack_tensor(ctx, body["hidden"], 1, g.hidden, g.max_tokens, "hidden", None)
    return Handoff(session, start, h, want_all)


def _layer_tensors(cls, field: str, count: Callable[[Geometry], int]):
    """Codec of Activations / Reply: {"l": layer, <field>: one record of count x [n, rank]}."""
    def enc(msg, ctx):
        g = ctx.geometry_if_needed()
        check_layer_out(ctx, g, msg.layer)
        if g is not None and ctx.dtype != g.dtype:
            raise GeometryError("bad_dtype", f"session declared {g.dtype}, not {ctx.dtype}")
        ts = pack_group(ctx, getattr(msg, field), count(g) if g else None, g.rank if g else None,
                        g.max_tokens if g else MAX_TOKENS, field, shareable=True)
        return {"l": msg.layer, field: ts}

    def dec(session, body, ctx):
        g = ctx.need_geometry()
        layer = check_layer_in(g, body["l"])
        return cls(session, layer, unpack_tensor(ctx, body[field], count(g), g.rank, g.max_tokens, field, g.dtype))
    return enc, dec


def _check_error(code, reason) -> dict:
    if type(code) is not str or not CODE_RE.fullmatch(code):
        raise SchemaError("bad_field", "error code must match [a-z0-9_]{1,64}")
    if type(reason) is not str or len(reason) > MAX_REASON:
        raise SchemaError("bad_field", f"error reason must be a str of <= {MAX_REASON} chars")
    return {"code": code, "reason": reason}


MAX_HOST = 255
MAX_CERT = 16384


def _check_redirect(host, port, cert) -> dict:
    if type(host) is not str or not 0 < len(host) <= MAX_HOST or any(c.isspace() for c in host):
        raise SchemaError("bad_field", f"redirect host must be a str of 1-{MAX_HOST} chars without spaces")
    check_int(port, "port", 1, 65535)
    if type(cert) is not str or len(cert) > MAX_CERT:
        raise SchemaError("bad_field", f"redirect cert must be a PEM str of <= {MAX_CERT} chars")
    return {"host": host, "port": port, "cert": cert}


_act_enc, _act_dec = _layer_tensors(Activations, "a", lambda g: g.n_activations)
_rep_enc, _rep_dec = _layer_tensors(Reply, "m", lambda g: len(g.targets))
BOTH = frozenset({UP, DOWN})
register(Kind(1, "open", Open, frozenset({UP}), frozenset({"key", "geometry"}), (), _enc_open, _dec_open))
register(Kind(2, "opened", Opened, frozenset({DOWN})))
register(Kind(3, "handoff", Handoff, BOTH, frozenset({"start", "hidden", "want_all"}), ("hidden",),
              _enc_handoff, _dec_handoff))
register(Kind(4, "activations", Activations, frozenset({DOWN}), frozenset({"l", "a"}), ("a",), _act_enc, _act_dec))
register(Kind(5, "reply", Reply, frozenset({UP}), frozenset({"l", "m"}), ("m",), _rep_enc, _rep_dec))
register(Kind(6, "close", Close, frozenset({UP})))
register(Kind(7, "error", Error, BOTH, frozenset({"code", "reason"}), (),
              lambda msg, ctx: _check_error(msg.code, msg.reason),
              lambda session, body, ctx: Error(session, **_check_error(body["code"], body["reason"]))))
register(Kind(8, "redirect", Redirect, frozenset({DOWN}), frozenset({"host", "port", "cert"}), (),
              lambda msg, ctx: _check_redirect(msg.host, msg.port, msg.cert),
              lambda session, body, ctx: Redirect(session, **_check_redirect(body["host"], body["port"], body["cert"]))))
