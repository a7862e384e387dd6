"""Wire codec: round trips, strictness, privacy, fuzzing (decoder raises WireError only)."""

from __future__ import annotations

import hmac
import random
import struct

import lz4.block
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from privatelora import wire
from privatelora.privacy import mark_private
from privatelora.wire import Activations, AuthError, Close, Error, FrameError, Geometry, GeometryError, Handoff, Open, Opened, PrivacyError, Reply, SchemaError, WireError

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
G = Geometry(hidden=32, rank=4, targets=("q", "k", "v"), shared_a=False, layers=(0, 2, 5),
             dtype="fp32", max_tokens=8)


def dec(frame, direction, g=G, key=KEY):
    return wire.decode_frame(frame, direction=direction, geometry_for=lambda s: g,
                             key_for=lambda s: key)


def forge(kind, body, *, session=7, key=KEY, flags=None, version=wire.VERSION, reserved=0,
          direction="up", raw_body=None):
    """A frame with a valid MAC around an arbitrary body: reaches the body parser."""
    if flags is None:
        flags = wire.FLAG_DOWN if direction == "down" else 0
    data = raw_body if raw_body is not None else msgpack.packb(body, use_bin_type=True)
    signed = wire.HEADER.pack(version, kind, flags, reserved, session) + data
    tag = hmac.digest(key, signed, "sha256")[: wire.TAG_LEN]
    return wire.PREFIX.pack(len(signed) + wire.TAG_LEN) + signed + tag


def tensor_list(dtype, rows, cols, data=None, scales=None, count=1):
    """A tensor record as the wire carries it: [code, count, rows, cols, data(, scales)]."""
    size = wire.DTYPES[dtype]
    t = [wire.DTYPE_CODES[dtype], count, rows, cols,
         data if data is not None else bytes(count * rows * cols * size)]
    if dtype == "int8":
        t.append(scales if scales is not None else bytes(4 * rows * count))
    return t


# ---------------------------------------------------------------- strategies
@st.composite
def geometries(draw, dtype=None):
    hidden = draw(st.integers(1, 48))
    targets = tuple(draw(st.lists(st.sampled_from(["q", "k", "v", "o", "up_proj"]),
                                  min_size=1, max_size=4, unique=True)))
    return Geometry(hidden=hidden, rank=draw(st.integers(1, min(hidden, 8))), targets=targets,
                    shared_a=draw(st.booleans()),
                    layers=tuple(sorted(draw(st.sets(st.integers(0, 40), min_size=1, max_size=5)))),
                    dtype=dtype or draw(st.sampled_from(sorted(wire.DTYPES))),
                    max_tokens=draw(st.integers(1, 6)))


def floats_for(dtype):
    bound = 6e4 if dtype == "fp16" else 2.0**100
    return st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def tensors(draw, rows, cols, dtype):
    vals = draw(st.lists(floats_for(dtype), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(vals, dtype=torch.float32).reshape(rows, cols)


def assert_close(out, t, dtype):
    assert out.dtype == torch.float32 and out.shape == t.shape
    if dtype == "fp32":
        assert torch.equal(out, t)
    elif dtype == "fp16":
        assert torch.equal(out, t.half().float())
    elif dtype == "bf16":
        assert torch.equal(out, t.bfloat16().float())
    else:  # int8: per-row absmax/127 scale, rounding error at most half a step
        # (+ float32 rounding; the absolute slack only matters for subnormal rows)
        bound = t.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-4) + 1e-38
        assert bool(((out - t).abs() <= bound).all())


DT = st.sampled_from(sorted(wire.DTYPES))


# ---------------------------------------------------------------- round trips
@SETTINGS
@given(g=geometries(), key=st.binary(min_size=32, max_size=32), s=st.integers(1, 2**64 - 1))
def test_open_round_trip(g, key, s):
    frame, info = wire.encode_frame(Open(s, key, g), key=None, direction="up")
    msg, info2 = wire.decode_frame(frame, direction="up")
    assert msg == Open(s, key, g) and info == info2 and info.kind == "open"


@SETTINGS
@given(s=st.integers(1, 2**64 - 1), code=st.from_regex(r"[a-z0-9_]{1,64}", fullmatch=True),
       reason=st.text(max_size=200), direction=st.sampled_from(["up", "down"]),
       conn=st.booleans())
def test_small_messages_round_trip(s, code, reason, direction, conn):
    err = Error(0 if conn else s, code, reason)
    assert dec(wire.encode(err, key=KEY, direction=direction), direction)[0] == err
    simple = Close(s) if direction == "up" else Opened(s)
    assert dec(wire.encode(simple, key=KEY, direction=direction), direction)[0] == simple


@SETTINGS
@given(s=st.integers(1, 2**64 - 1), host=st.from_regex(r"[a-z0-9.:-]{1,255}", fullmatch=True),
       port=st.integers(1, 65535), cert=st.text(max_size=300))
def test_redirect_round_trips_down_only_and_refuses_bad_fields(s, host, port, cert):
    msg = wire.Redirect(s, host, port, cert)
    assert dec(wire.encode(msg, key=KEY, direction="down"), "down")[0] == msg
    with pytest.raises(wire.WireError):                 # a device never redirects the cloud
        wire.encode(msg, key=KEY, direction="up")
    for bad in (wire.Redirect(s, "", port), wire.Redirect(s, "a b", port), wire.Redirect(s, host, 0),
                wire.Redirect(s, host, 70000), wire.Redirect(s, host, port, "x" * 20000)):
        with pytest.raises(wire.SchemaError):
            wire.encode(bad, key=KEY, direction="down")


@SETTINGS
@given(data=st.data(), dtype=DT, direction=st.sampled_from(["up", "down"]))
def test_handoff_round_trip(data, dtype, direction):
    g = data.draw(geometries())
    n = data.draw(st.integers(1, g.max_tokens))
    h = data.draw(tensors(n, g.hidden, dtype))
    start = data.draw(st.integers(0, wire.MAX_POSITION))
    msg = Handoff(3, start, h, data.draw(st.booleans()))
    frame, info = wire.encode_frame(msg, key=KEY, direction=direction, dtype=dtype, geometry=g)
    out, info2 = dec(frame, direction, g)
    assert (out.start, out.want_all) == (start, msg.want_all)
    assert_close(out.hidden, h, dtype)
    assert info == info2 and info.raw_bytes == h.numel() * wire.DTYPES[dtype]
    assert info.wire_bytes == len(frame) == wire.frame_info(frame).wire_bytes


@SETTINGS
@given(data=st.data())
def test_activations_and_reply_round_trip(data):
    g = data.draw(geometries())
    n = data.draw(st.integers(1, g.max_tokens))
    layer = data.draw(st.sampled_from(g.layers))
    a = tuple(data.draw(tensors(n, g.rank, g.dtype)) for _ in range(g.n_activations))
    m = tuple(data.draw(tensors(n, g.rank, g.dtype)) for _ in g.targets)
    for msg, direction, ts in ((Activations(9, layer, a), "down", a), (Reply(9, layer, m), "up", m)):
        frame, info = wire.encode_frame(msg, key=KEY, direction=direction, geometry=g)
        out, info2 = dec(frame, direction, g)
        assert type(out) is type(msg) and out.layer == layer and out.session == 9
        for o, t in zip(out.a if direction == "down" else out.m, ts, strict=True):
            assert_close(o, t, g.dtype)
        assert info == info2 == wire.frame_info(frame)


def test_compression_where_it_pays():
    g = Geometry(256, 64, ("q", "k", "v"), False, (0,), "fp32", 64)
    zeros = Reply(1, 0, tuple(torch.zeros(64, 64) for _ in range(3)))  # an untuned M replies 0
    frame, info = wire.encode_frame(zeros, key=KEY, direction="up", geometry=g)
    assert info.compressed and info.wire_bytes < info.raw_bytes / 10
    assert all(torch.equal(t, torch.zeros(64, 64)) for t in dec(frame, "up", g)[0].m)
    noise = Reply(1, 0, tuple(torch.randn(64, 64) for _ in range(3)))
    assert not wire.encode_frame(noise, key=KEY, direction="up", geometry=g)[1].compressed
    small = Reply(1, 0, tuple(torch.zeros(1, 64) for _ in range(3)))  # too small to try
    assert not wire.encode_frame(small, key=KEY, direction="up", geometry=g)[1].compressed
    forced, info = wire.encode_frame(noise, key=KEY, direction="up", geometry=g, compress="always")
    assert info.compressed and wire.frame_info(forced) == info
    assert torch.equal(dec(forced, "up", g)[0].m[2], noise.m[2])


def test_repr_hides_values_and_keys():
    t = torch.full((2, 4), 123.456)
    text = repr(Reply(1, 0, (t, t, t))) + repr(Open(1, KEY, G)) + repr(Handoff(1, 0, t, True))
    assert "123" not in text and "\\x" not in text and "[2, 4]" in text and "<32 bytes>" in text


def test_registry_refuses_duplicate_kind():
    class Dup(wire.Message):
        pass

    with pytest.raises(ValueError):        # a kind code already taken
        wire.register(wire.Kind(1, "dup", Dup, frozenset({"up"})))
    with pytest.raises(ValueError):        # a class that already has a kind
        wire.register(wire.Kind(99, "open_again", wire.Open, frozenset({"up"})))
    assert 99 not in wire.KINDS and wire.kind_of(Dup) is None


# ---------------------------------------------------------------- privacy on encode
def reply_of(*ts, layer=2):
    return Reply(7, layer, ts)


@pytest.mark.parametrize("make", [
    lambda: reply_of(mark_private(torch.zeros(1, 4)), torch.zeros(1, 4), torch.zeros(1, 4)),
    lambda: reply_of(mark_private(torch.zeros(4, 4))[:2], torch.zeros(2, 4), torch.zeros(2, 4)),
    lambda: reply_of(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4), torch.zeros(1, 4)),
    lambda: reply_of(torch.zeros(1, 5), torch.zeros(1, 5), torch.zeros(1, 5)),  # not [n, rank]
    lambda: reply_of(torch.zeros(9, 4), torch.zeros(9, 4), torch.zeros(9, 4)),  # n > max_tokens
    lambda: reply_of(torch.zeros(1, 1, 4), torch.zeros(1, 4), torch.zeros(1, 4)),
    lambda: reply_of(torch.zeros(1, 4), torch.zeros(1, 4)),  # one tensor per target
    lambda: reply_of(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 4), layer=1),
    lambda: Handoff(7, 0, torch.zeros(1, 4), False),  # a [1, rank] tensor is not a hidden state
    lambda: Handoff(7, 0, torch.arange(32).reshape(1, 32), False),  # token ids
    lambda: Handoff(7, 0, mark_private(torch.zeros(1, 32)), False),  # e.g. logits
])
def test_up_frames_refuse_private_integer_and_misshapen_tensors(make):
    with pytest.raises(PrivacyError):
        wire.encode(make(), key=KEY, direction="up", geometry=G)


def test_up_tensor_frames_need_the_geometry():
    with pytest.raises(PrivacyError):
        wire.encode(reply_of(*[torch.zeros(1, 4)] * 3), key=KEY, direction="up")


def test_down_encode_checks_geometry_but_is_not_privacy():
    bad = Activations(7, 0, (torch.zeros(1, 5),) * 3)
    with pytest.raises(GeometryError):
        wire.encode(bad, key=KEY, direction="down", geometry=G)
    with pytest.raises(SchemaError):
        wire.encode(Handoff(7, 0, torch.tensor([[float("nan")]]), True), key=KEY, direction="down")
    with pytest.raises(SchemaError):  # 1e6 overflows fp16
        wire.encode(Handoff(7, 0, torch.full((1, 32), 1e6), True), key=KEY, direction="down",
                    dtype="fp16", geometry=G)
    with pytest.raises(FrameError):
        wire.encode(Activations(7, 0, (torch.zeros(1, 4),) * 3), key=KEY, direction="up",
                    geometry=G)


# ---------------------------------------------------------------- strict decoder
GOOD_REPLY = {"l": 2, "m": tensor_list("fp32", 1, 4, count=3)}


@pytest.mark.parametrize("frame,exc,code", [
    (forge(5, GOOD_REPLY, version=2), FrameError, "bad_version"),
    (forge(5, GOOD_REPLY, reserved=1), FrameError, "bad_header"),
    (forge(5, GOOD_REPLY, flags=0x80), FrameError, "bad_header"),
    (forge(99, GOOD_REPLY), FrameError, "unknown_kind"),
    (forge(4, {"l": 2, "a": tensor_list("fp32", 1, 4, count=3)}), FrameError, "bad_direction"),
    (forge(5, GOOD_REPLY, direction="down"), FrameError, "bad_direction"),
    (forge(5, GOOD_REPLY, session=0), FrameError, "bad_session"),
    (forge(5, GOOD_REPLY, key=OTHER_KEY), AuthError, "bad_mac"),
    (forge(5, GOOD_REPLY, raw_body=b"\xc1"), FrameError, "malformed"),
    (forge(5, GOOD_REPLY, raw_body=msgpack.packb(GOOD_REPLY) + b"\x00"), FrameError, "malformed"),
    (forge(5, GOOD_REPLY, raw_body=b"\x82\xa1l\x02\xa1l\x02"), FrameError, "malformed"),
    (forge(5, GOOD_REPLY, flags=wire.FLAG_LZ4, raw_body=b"\x00\x00\x10\x00garbage"),
     FrameError, "bad_compression"),
    (forge(5, GOOD_REPLY, flags=wire.FLAG_LZ4, raw_body=b"\xff\xff\xff\xff" + bytes(8)),
     FrameError, "too_large"),
    (forge(5, {**GOOD_REPLY, "extra": 1}), SchemaError, "bad_fields"),
    (forge(5, {"l": 2}), SchemaError, "bad_fields"),
    (forge(5, [2, GOOD_REPLY["m"]]), SchemaError, "bad_fields"),
    (forge(5, {**GOOD_REPLY, "l": True}), GeometryError, "bad_layer"),
    (forge(5, {**GOOD_REPLY, "l": 1}), GeometryError, "bad_layer"),
    (forge(5, {**GOOD_REPLY, "m": tensor_list("fp32", 1, 4, count=2)}), GeometryError, "bad_count"),
    (forge(5, {**GOOD_REPLY, "m": tensor_list("fp32", 9, 4, count=3)}), GeometryError, "bad_shape"),
    (forge(5, {**GOOD_REPLY, "m": tensor_list("fp32", 1, 5, count=3)}), GeometryError, "bad_shape"),
    (forge(5, {**GOOD_REPLY, "m": tensor_list("fp16", 1, 4, count=3)}), GeometryError, "bad_dtype"),
    (forge(5, {**GOOD_REPLY, "m": tensor_list("fp32", 1, 4, bytes(4 * 4 * 4), count=3)}), SchemaError, "bad_tensor"),
    (forge(5, {**GOOD_REPLY, "m": [0, 3, 1, 4, bytes(15)]}), SchemaError, "bad_tensor"),
    (forge(5, {**GOOD_REPLY, "m": [9, 3, 1, 4, bytes(96)]}), SchemaError, "bad_tensor"),
    (forge(5, {**GOOD_REPLY, "m": [0, 3, 1, 4, "text"]}), SchemaError, "bad_tensor"),
    (forge(5, {**GOOD_REPLY, "m": tensor_list("fp32", 1, 4, struct.pack("<4f", 1, 2, 3, float("nan")) * 3, count=3)}),
     SchemaError, "non_finite"),
    (forge(3, {"start": 0, "hidden": tensor_list("fp16", 1, 32, b"\x00\x7c" * 32), "want_all": True}),
     SchemaError, "non_finite"),
    (forge(3, {"start": -1, "hidden": tensor_list("fp32", 1, 32), "want_all": True}), SchemaError, "bad_field"),
    (forge(3, {"start": 0, "hidden": tensor_list("fp32", 1, 32), "want_all": 1}), SchemaError, "bad_field"),
    (forge(3, {"start": 0, "hidden": tensor_list("int8", 1, 32, scales=struct.pack("<f", float("inf"))),
               "want_all": True}), SchemaError, "bad_tensor"),
    (forge(3, {"start": 0, "hidden": tensor_list("int8", 1, 32, b"\x80" * 32), "want_all": True}),
     SchemaError, "bad_tensor"),
    (forge(3, {"start": 0, "hidden": tensor_list("int8", 1, 32)[:5], "want_all": True}),
     SchemaError, "bad_tensor"),
    (forge(7, {"code": "Bad Code", "reason": ""}), SchemaError, "bad_field"),
    (forge(6, {"why": 1}), SchemaError, "bad_fields"),
])
def test_decoder_refuses(frame, exc, code):
    with pytest.raises(exc) as e:
        dec(frame, "up")
    assert e.value.code == code


def test_decoder_refuses_framing_and_sessions():
    good = wire.encode(reply_of(*[torch.zeros(1, 4)] * 3), key=KEY, direction="up", geometry=G)
    for frame, code in ((good[:-1], "bad_length"), (good + b"\x00", "bad_length"),
                        (good[:10], "truncated"), (b"\xff" * 40, "too_large"), ("text", "bad_type")):
        with pytest.raises(FrameError) as e:
            dec(frame, "up")
        assert e.value.code == code
    with pytest.raises(FrameError) as e:
        wire.decode(good, direction="up", max_frame=len(good) - 5)
    assert e.value.code == "too_large"
    with pytest.raises(AuthError) as e:
        wire.decode(good, direction="up", key_for=lambda s: None)
    assert e.value.code == "unknown_session"
    with pytest.raises(GeometryError) as e:
        wire.decode(good, direction="up", key_for=lambda s: KEY)
    assert e.value.code == "no_geometry"
    assert dec(memoryview(bytearray(good)), "up")[0].layer == 2


def test_open_is_signed_by_its_own_key():
    frame = wire.encode(Open(5, KEY, G), key=None, direction="up")
    body = msgpack.packb({"key": KEY, "geometry": G.to_wire()}, use_bin_type=True)
    with pytest.raises(AuthError):  # signed with another key than the one inside
        wire.decode(forge(1, None, session=5, key=OTHER_KEY, raw_body=body), direction="up")
    bad_geometries = [{**G.to_wire(), "rank": 64}, {**G.to_wire(), "layers": [2, 1]},
                      {**G.to_wire(), "targets": ["q", "q"]}, {**G.to_wire(), "dtype": "fp64"},
                      {**G.to_wire(), "extra": 0}, {**G.to_wire(), "targets": [["q"]]}]
    for gw in bad_geometries:
        with pytest.raises(SchemaError) as e:
            wire.decode(forge(1, {"key": KEY, "geometry": gw}, session=5), direction="up")
        assert e.value.code in ("bad_geometry", "bad_fields")
    with pytest.raises(SchemaError):
        wire.decode(forge(1, {"key": KEY[:16], "geometry": G.to_wire()}, session=5), direction="up")
    with pytest.raises(FrameError):
        wire.decode(frame, direction="down")
    bomb = wire.PREFIX.pack(1 << 20) + lz4.block.compress(bytes(1 << 20), store_size=False)
    with pytest.raises(FrameError) as e:  # an unauthenticated Open may not inflate to MiBs
        wire.decode(forge(1, None, session=5, flags=wire.FLAG_LZ4, raw_body=bomb), direction="up")
    assert e.value.code == "too_large"
    assert wire.decode(frame, direction="up").geometry == G


# ---------------------------------------------------------------- fuzzing
def _valid_frames():
    g1 = Geometry(32, 4, ("q", "k", "v"), True, (0, 2, 5), "int8", 8)
    return [
        ("up", G, wire.encode(Open(7, KEY, G), key=None, direction="up")),
        ("up", G, wire.encode(reply_of(*[torch.randn(2, 4)] * 3), key=KEY, direction="up", geometry=G)),
        ("up", G, wire.encode(Handoff(7, 3, torch.randn(3, 32), False), key=KEY, direction="up",
                              geometry=G, dtype="bf16")),
        ("down", g1, wire.encode(Activations(7, 5, (torch.randn(2, 4),)), key=KEY, direction="down",
                                 geometry=g1)),
        ("down", G, wire.encode(Handoff(7, 3, torch.zeros(8, 32), True), key=KEY, direction="down",
                                geometry=G, compress="always")),
        ("down", G, wire.encode(Error(0, "bad_mac", "x"), key=None, direction="down")),
        ("up", G, wire.encode(Close(7), key=KEY, direction="up")),
    ]


FRAMES = _valid_frames()


def assert_wire_error_or_valid(frame, direction, g, key=KEY, may_decode=False):
    try:
        msg = dec(frame, direction, g, key)
    except WireError as e:
        assert e.code != "internal", e  # an unguarded path: fix the decoder
        return
    assert may_decode, f"garbage decoded to {msg}"


@SETTINGS
@given(junk=st.binary(max_size=300), direction=st.sampled_from(["up", "down"]))
def test_fuzz_random_bytes(junk, direction):
    assert_wire_error_or_valid(junk, direction, G)
    assert_wire_error_or_valid(wire.PREFIX.pack(len(junk)) + junk, direction, G)


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, 6), op=st.sampled_from(["flip", "truncate", "extend", "length", "key"]),
       pos=st.integers(0, 10**6), bit=st.integers(0, 7), extra=st.binary(min_size=1, max_size=8))
def test_fuzz_mutated_frames(which, op, pos, bit, extra):
    direction, g, frame = FRAMES[which]
    b = bytearray(frame)
    if op == "flip":
        b[pos % len(b)] ^= 1 << bit
    elif op == "truncate":
        b = b[: pos % len(b)]
    elif op == "extend":
        b += extra
    elif op == "length":
        b[:4] = struct.pack(">I", (len(b) - 4 + (pos % 9) - 4) % 2**32)
    # key swap: a session frame checked under another session's key
    key = OTHER_KEY if op == "key" else KEY
    may = op == "key" and which in (0, 5)  # Open carries its key; session 0 uses the public one
    assume(op == "key" or bytes(b) != frame)
    assert_wire_error_or_valid(bytes(b), direction, g, key, may_decode=may)


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, 6), pos=st.integers(0, 10**6), val=st.integers(0, 255),
       cut=st.integers(0, 64))
def test_fuzz_mutated_bodies_with_valid_mac(which, pos, val, cut):
    """Re-sign mutated bodies so the body parser (not only the MAC) meets garbage."""
    direction, g, frame = FRAMES[which]
    hdr = wire.peek_header(frame)
    body = bytearray(frame[4 + wire.HEADER.size: -wire.TAG_LEN])
    body[pos % len(body)] = val
    body = body[: len(body) - cut] if cut < len(body) else body
    assert_wire_error_or_valid(forge(frame[5], None, session=hdr.session, flags=hdr.flags,
                                     raw_body=bytes(body)), direction, g, may_decode=True)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=6), c, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), obj=msgpack_values, field=st.booleans())
def test_fuzz_structured_bodies(kind, obj, field):
    k = wire.KINDS[kind]
    if field and k.fields:  # a well-formed field set with one arbitrary value
        obj = {name: obj for name in k.fields}
    direction = "up" if "up" in k.directions else "down"
    assert_wire_error_or_valid(forge(kind, obj, direction=direction), direction, G, may_decode=True)
    body = msgpack.packb(obj)
    packed = wire.PREFIX.pack(len(body)) + lz4.block.compress(body, store_size=False)
    flags = (wire.FLAG_DOWN if direction == "down" else 0) | wire.FLAG_LZ4
    assert_wire_error_or_valid(forge(kind, None, direction=direction, flags=flags, raw_body=packed),
                               direction, G, may_decode=True)


def test_fuzz_never_leaks_other_exceptions_seeded():
    rng = random.Random(0)
    frames = FRAMES
    for _ in range(2000):
        direction, g, frame = rng.choice(frames)
        b = bytearray(frame)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        assert_wire_error_or_valid(bytes(b), direction, g, may_decode=True)
        with pytest.raises(WireError):
            wire.frame_info(bytes(b[: rng.randrange(4 + wire.HEADER.size)]))
