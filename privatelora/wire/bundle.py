"""Bundles: one stage's ``Activations`` (down) or ``Reply`` frames (up) for many sessions of
one connection, in ONE frame (kind 9), each session's entry authenticated with its own key.

An edge host carrying sixteen users gets sixteen activations per stage and answers sixteen
replies; as ordinary frames that is 32 frames per stage, each with its own msgpack body,
read, dispatch and accounting. A bundle carries them with a fixed binary table and the
payloads back to back; what stays per session is what must: its key's tag, its geometry's
checks, the privacy checks of what goes up (``tensors.pack_group``, the same as a frame's).

Layout (after the usual prefix and header, kind 9, session 0, never lz4):
``[u16 count, u16 0][count x entry][payloads, in entry order]`` then the frame's tag under
the connection key (integrity of the table; authenticity is per entry). An entry is
``[u64 session, u8 kind (4 activations / 5 reply), u8 dtype code, u8 tensors, u8 0,
u16 layer, u32 rows, u16 cols][16-byte tag]``; its payload is the tensor record's data
(``tensors x rows x cols`` elements, then for int8 ``tensors x rows`` fp32 scales). The
entry's tag is HMAC-SHA256(session key, header of a kind-9 frame on that session + the
entry's 20 fixed bytes + its payload)[:16], so it can stand for no ordinary frame.

Contract
- ``encode_bundle`` checks each message exactly as ``encode_frame`` does (same refusals,
  privacy included) and leaves a refused one out: the caller gets, per message, its
  ``FrameInfo`` share or the exception, and one frame for the rest.
- ``decode_bundle`` raises a ``WireError`` only for the frame as a whole (table,
  lengths, the frame's tag); an entry that fails (unknown session, bad tag, geometry, NaN)
  is returned as that session's ``WireError`` and never affects another entry. For ANY
  input bytes it raises nothing but ``WireError``.
- A peer sends bundles only to a peer that has sent it one (``docs/wire.md``): a device
  bundles its replies, and the cloud then bundles its activations for that connection.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from typing import Callable

from privatelora.runtime.messages import Activations, Reply
from privatelora.wire.errors import AuthError, FrameError, GeometryError, SchemaError, WireError
from privatelora.wire.frames import (BUNDLE_CODE, CONNECTION_KEY, DEFAULT_MAX_FRAME, FLAG_DOWN, FLAG_LZ4, HEADER, PREFIX,
                                     RAW_OF, TAG_LEN, VERSION, FrameInfo, guarded, mac_tag, record_raw, split_frame,
                                     verify_mac)
from privatelora.wire.kinds import Kind, check_layer_in, check_layer_out, register
from privatelora.wire.schema import DOWN, DTYPES, UP, FrameContext
from privatelora.wire.tensors import CODE_DTYPES, check_record, pack_group, unpack_block, unpack_tensor


@dataclass(frozen=True)
class Bundle:
    """Marker of the bundle kind (its frames are read with ``decode_bundle``)."""

    session: int = 0


BUNDLE = register(Kind(BUNDLE_CODE, "bundle", Bundle, frozenset({UP, DOWN})))
BODY = struct.Struct(">HH")                  # count, reserved
ENTRY = struct.Struct(">QBBBBHIH")           # session, kind, dtype code, tensors, reserved, layer, rows, cols
ENTRY_LEN = ENTRY.size + TAG_LEN             # 36 bytes a session
MAX_ENTRIES = 4096
# per direction: the kind code an entry may have, its message class and its tensor field
_ENTRY_KINDS = {DOWN: (4, "activations", Activations, "a"), UP: (5, "reply", Reply, "m")}
FIXED = PREFIX.size + HEADER.size + BODY.size + TAG_LEN     # a bundle's own bytes, beside its entries


def _count(g, direction: str) -> int:
    return g.n_activations if direction == DOWN else len(g.targets)


def _entry_mac(key: bytes, flags: int, fixed: bytes, payload) -> bytes:
    return mac_tag(key, HEADER.pack(VERSION, BUNDLE.code, flags, 0, struct.unpack_from(">Q", fixed)[0])
                + fixed + payload)


def encode_bundle(jobs, *, direction: str, max_frame: int = DEFAULT_MAX_FRAME,
                  shared: dict | None = None) -> tuple[bytes | None, list]:
    """One bundle frame for ``jobs`` [(msg, key, geometry)]: ``Activations`` down or
    ``Reply`` up, each in its session's declared dtype. Returns ``(frame, results)``:
    ``results[i]`` is the ``FrameInfo`` of message i (its kind, raw bytes and its share of
    the frame's bytes: the shares add up to the frame's length) or the exception
    ``encode_frame`` would have raised for it alone (then it is not in the frame; ``frame``
    is None when no message is). ``shared``: as ``encode_many``'s (down: views of one stage
    buffer converted once)."""
    if direction not in _ENTRY_KINDS:
        raise ValueError(f"direction must be {UP!r} or {DOWN!r}, not {direction!r}")
    code, name, cls, field = _ENTRY_KINDS[direction]
    flags = FLAG_DOWN if direction == DOWN else 0
    shared = {} if shared is None else shared
    results: list = []
    table, payloads, infos = [], [], []
    for msg, key, g in jobs:
        try:
            if type(msg) is not cls:
                raise FrameError("bad_direction", f"{type(msg).__name__} frames do not travel {direction} in a bundle")
            if type(key) is not bytes or not msg.session or len(key) != 32:
                raise AuthError("no_key", "bundle entries need their session's 32-byte key")
            ctx = FrameContext(direction, g, g.dtype if g is not None else "fp32", encoding=True, shared=shared)
            g = ctx.need_geometry()
            check_layer_out(ctx, g, msg.layer)
            rec = pack_group(ctx, getattr(msg, field), _count(g, direction), g.rank, g.max_tokens, field,
                             shareable=True)
            fixed = ENTRY.pack(msg.session, code, rec[0], rec[1], 0, msg.layer, rec[2], rec[3])
            payload = rec[4] + rec[5] if len(rec) == 6 else rec[4]
            table.append(fixed + _entry_mac(key, flags, fixed, payload))
            payloads.append(payload)
            infos.append(len(results))
            results.append(FrameInfo(name, ctx.raw, ENTRY_LEN + len(payload), False))
        except Exception as e:        # this message's own refusal, returned, not raised
            results.append(e)
    if not table:
        return None, results
    signed = HEADER.pack(VERSION, BUNDLE.code, flags, 0, 0) + BODY.pack(len(table), 0) + b"".join(table) \
        + b"".join(payloads)
    if len(table) > MAX_ENTRIES or len(signed) + TAG_LEN > max_frame:
        err = FrameError("too_large", f"a bundle of {len(table)} entries, {len(signed) + TAG_LEN} bytes, is over "
                                      f"the limits ({MAX_ENTRIES} entries, {max_frame} bytes)")
        return None, [err if i in infos else r for i, r in enumerate(results)]
    first = results[infos[0]]
    results[infos[0]] = first._replace(wire_bytes=first.wire_bytes + FIXED)
    return PREFIX.pack(len(signed) + TAG_LEN) + signed + mac_tag(CONNECTION_KEY, signed), results


def _split_bundle(buf, max_frame: int):
    view, hdr, kind = split_frame(buf, max_frame)
    if kind is not BUNDLE:
        raise FrameError("unknown_kind", f"a {hdr.kind} frame is not a bundle")
    return view, hdr


def _table(view) -> list:
    """A bundle's entries, as ``(fields, table offset, payload offset, payload size, data
    size)``, read by fixed offsets; ``FrameError`` where its table and payloads do not match."""
    end, pos = len(view) - TAG_LEN, PREFIX.size + HEADER.size
    if end - pos < BODY.size:
        raise FrameError("malformed", "bundle shorter than its header")
    n, reserved = BODY.unpack_from(view, pos)
    pos += BODY.size
    if reserved or not 1 <= n <= MAX_ENTRIES or end - pos < n * ENTRY_LEN:
        raise FrameError("malformed", f"bundle table of {n} entries does not fit (1-{MAX_ENTRIES})")
    entries, at = [], pos + n * ENTRY_LEN
    for i in range(n):
        e = pos + i * ENTRY_LEN
        fields = ENTRY.unpack_from(view, e)
        dtype = CODE_DTYPES.get(fields[2])
        if dtype is None:
            raise FrameError("malformed", f"bundle entry {i} has dtype code {fields[2]}")
        data = fields[3] * fields[6] * fields[7] * DTYPES[dtype]
        size = data + (fields[3] * fields[6] * 4 if dtype == "int8" else 0)
        if size > end - at:
            raise FrameError("malformed", "bundle payloads do not match its table")
        entries.append((fields, e, at, size, data))
        at += size
    if at != end:
        raise FrameError("malformed", "bundle payloads do not match its table")
    return entries


@guarded
def decode_bundle(buf, *, direction: str, key_for: Callable[[int], bytes | None],
                  geometry_for: Callable[[int], object], max_frame: int = DEFAULT_MAX_FRAME) -> list:
    """Read a bundle frame that travelled ``direction``. Returns one ``(session, message
    or WireError, FrameInfo)`` per entry, in order (the FrameInfo's wire bytes are the
    entry's share, as ``encode_bundle``'s). Raises ``WireError`` only for the frame itself."""
    if direction not in _ENTRY_KINDS:
        raise ValueError(f"direction must be {UP!r} or {DOWN!r}, not {direction!r}")
    view, hdr = _split_bundle(buf, max_frame)
    if bool(hdr.flags & FLAG_DOWN) != (direction == DOWN):
        raise FrameError("bad_direction", f"bundle is not valid travelling {direction}")
    if hdr.session != 0 or hdr.flags & FLAG_LZ4:
        raise FrameError("bad_header", "a bundle names no session and is never compressed")
    verify_mac(view, CONNECTION_KEY)
    entries = _table(view)
    code, name, cls, field = _ENTRY_KINDS[direction]
    out: list = [None] * len(entries)
    ready = []                          # (i, dtype name): checked, tensors still to read
    for i, (fields, e, at, size, data) in enumerate(entries):
        try:
            ready.append((i, _check_entry(view, fields, e, at, size, hdr.flags, code, field, key_for, geometry_for)))
        except WireError as err:
            out[i] = (fields[0], err, FrameInfo("refused", 0, _share(i, size), False))
    # runs of consecutive entries of one dtype and shape: their payloads lie back to back, so
    # one conversion and one finite check reads them all (int8, with its row scales, alone)
    k = 0
    while k < len(ready):
        i, dname = ready[k]
        fields, _, at, size, data = entries[i]
        j = k + 1                       # the run: the next entries, in table order, of this layout
        while dname != "int8" and j < len(ready) and ready[j][0] == i + j - k \
                and _layout(entries[i + j - k][0]) == _layout(fields):
            j += 1
        if dname == "int8":
            got = [_entry_tensors(view, fields, at, size, data, field)]
        else:
            got = unpack_block(view, at, j - k, fields[3], fields[6], fields[7], dname)
        for (i, _), ts in zip(ready[k:j], got):
            fields, _, _, size, data = entries[i]
            if isinstance(ts, WireError) or ts is None:
                err = ts if ts is not None else SchemaError("non_finite", f"{field} holds NaN or inf")
                out[i] = (fields[0], err, FrameInfo("refused", 0, _share(i, size), False))
            else:
                out[i] = (fields[0], cls(fields[0], fields[5], ts), FrameInfo(name, data, _share(i, size), False))
        k = j
    return out


def _layout(fields) -> tuple:
    """An entry's dtype code, tensor count, rows and cols: what its payload's layout is."""
    return fields[2], fields[3], fields[6], fields[7]


def _share(i: int, size: int) -> int:
    """Entry ``i``'s share of the bundle's bytes (the bundle's own, on the first entry)."""
    return ENTRY_LEN + size + (FIXED if i == 0 else 0)


def _check_entry(view, fields, e, at, size, flags, code, field, key_for, geometry_for) -> str:
    """Everything about one entry but its values: kind, session and key, its tag, the
    session's geometry (layer, dtype, count, shape). Returns the dtype's name."""
    session, kind, dcode, count, reserved, layer, rows, cols = fields
    if kind != code or reserved or not session:
        raise FrameError("bad_direction" if kind != code else "bad_header",
                         f"bundle entry of kind {kind} on session {session} is not valid here")
    key = key_for(session)
    if key is None:
        raise AuthError("unknown_session", f"no key for session {session}")
    mac = _entry_mac(key, flags, bytes(view[e:e + ENTRY.size]), view[at:at + size])
    if not hmac.compare_digest(mac, bytes(view[e + ENTRY.size:e + ENTRY_LEN])):
        raise AuthError("bad_mac", "bundle entry authentication failed")
    g = geometry_for(session)
    if g is None:
        raise GeometryError("no_geometry", "tensor frames need the session's declared geometry")
    check_layer_in(g, layer)
    dname = CODE_DTYPES[dcode]
    if dname == g.dtype == "int8" and not count * rows:   # no rows: no row scales either
        raise SchemaError("bad_tensor", f"{field}: int8 tensors (only) carry row scales")
    check_record(dname, count, rows, cols, _count(g, UP if code == 5 else DOWN), g.rank, g.max_tokens, field,
                 g.dtype)
    return dname


def _entry_tensors(view, fields, at, size, data, field):
    """One entry's tensors read alone (int8: values and row scales), or its ``WireError``."""
    rec = [fields[2], fields[3], fields[6], fields[7], bytes(view[at:at + data])] \
        + ([bytes(view[at + data:at + size])] if size > data else [])
    try:
        return unpack_tensor(FrameContext(DOWN, None), rec, fields[3], fields[7], fields[6], field, None)
    except WireError as err:
        return err


def bundle_records(buf, max_frame: int = DEFAULT_MAX_FRAME) -> list:
    """The entries of a bundle frame as ``(session, kind code, [dtype code, count, rows,
    cols, data(, scales)])`` records, WITHOUT authenticating them: for audits of recorded
    traffic (``placement.checks.audit_frames``) and accounting. Raises ``WireError`` for a
    frame that is not a well-formed bundle."""
    view, _ = _split_bundle(buf, max_frame)
    out = []
    for fields, _, at, size, data in _table(view):
        rec = [fields[2], fields[3], fields[6], fields[7], bytes(view[at:at + data])]
        if size > data:         # int8: the row scales
            rec.append(bytes(view[at + data:at + size]))
        out.append((fields[0], fields[1], rec))
    return out


RAW_OF[BUNDLE_CODE] = lambda buf, max_frame: sum(record_raw(rec) for _, _, rec in bundle_records(buf, max_frame))


__all__ = ["Bundle", "BUNDLE", "ENTRY_LEN", "FIXED", "MAX_ENTRIES", "bundle_records", "decode_bundle",
           "encode_bundle"]
