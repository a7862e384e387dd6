"""Tensor records: float activations <-> one ``[code, count, rows, cols, data(, scales)]``
record per frame, in fp32, fp16, bf16 or int8 (per-row absmax scales), little-endian.

numpy does the per-tensor work: on the hot path tensors are tiny ([1, rank]) and a torch
op costs ~20 us of dispatch where numpy costs ~1 us. Explicit '<' dtypes make the wire
little-endian on any host. Non-finite values are refused both ways.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from privatelora.privacy import is_private, private_hit
from privatelora.wire.errors import GeometryError, PrivacyError, SchemaError
from privatelora.wire.schema import DTYPES, MAX_TARGETS, UP, FrameContext

# a frame names its dtype by a one-byte code (a string would cost 4-5 bytes a frame)
DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_NP_WIRE = {"fp32": "<f4", "fp16": "<f2", "bf16": "<u2", "int8": "i1"}


def _check_out(ctx: FrameContext, t: Any, cols: int | None, max_rows: int, what) -> None:
    """Refuse, before encoding, anything that is not a float [n, cols] activation, and (up)
    a tensor tagged private or a view of one; ``pack_group`` then refuses (up) a tensor
    whose values are private (``_check_values``). ``what``: the field's name, or a callable
    giving it (built only for an error)."""
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
    if t.dtype is torch.float32 and t.is_cpu and not t.requires_grad:
        return t.numpy()                 # the common case: no detach/to dispatch (~1.5 us)
    return t.detach().to("cpu", torch.float32).numpy()


def pack_tensor(ctx: FrameContext, x: np.ndarray, what: str) -> list:
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


def check_record(name: str, got_count, rows, got_cols, count: int, cols: int, max_rows: int, what: str,
                 want: str | None) -> None:
    """A record's dtype ``name`` (decoded), count, rows and cols against what the session
    declared (``want``: its dtype, None: any); ``GeometryError`` where they differ."""
    if want is not None and name != want:
        raise GeometryError("bad_dtype", f"{what} is {name}, the session declared {want}")
    if type(got_count) is not int or got_count != count:
        raise GeometryError("bad_count", f"{what} must be {count} tensors")
    if type(rows) is not int or not 1 <= rows <= max_rows or type(got_cols) is not int or got_cols != cols:
        raise GeometryError("bad_shape", f"{what} must be [1..{max_rows}, {cols}]")


def _to_float32(w: np.ndarray, name: str) -> np.ndarray:
    """Wire values (fp32, fp16, bf16 bits) -> a new float32 array: writable, native order,
    detached from the frame."""
    if name == "bf16":
        return (w.astype(np.uint32) << 16).view(np.float32)  # bf16 = the top half of an fp32
    return w.astype(np.float32)


def unpack_tensor(ctx: FrameContext, v: Any, count: int, cols: int, max_rows: int, what: str,
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
    check_record(name, v[1], v[2], v[3], count, cols, max_rows, what, None)
    rows, size = v[2], DTYPES[name]
    data = v[4]
    if type(data) is not bytes or len(data) != count * rows * cols * size:
        raise SchemaError("bad_tensor", f"{what} payload length is not {count}x{rows}x{cols} {name}")
    w = np.frombuffer(data, dtype=_NP_WIRE[name]).reshape(count, rows, cols)
    if name == "int8":
        scale = np.frombuffer(v[5], dtype="<f4") if type(v[5]) is bytes and len(v[5]) % 4 == 0 else None
        if scale is None or scale.size != count * rows:
            raise SchemaError("bad_tensor", f"{what} needs {count * rows} fp32 scales")
        if not np.isfinite(scale).all() or (scale < 0).any() or (w == -128).any():
            raise SchemaError("bad_tensor", f"{what}: scales finite >= 0, values in [-127, 127]")
        with np.errstate(over="ignore"):  # overflow to inf is refused just below
            x = w.astype(np.float32) * scale.astype(np.float32).reshape(count, rows, 1)
    else:
        x = _to_float32(w, name)
    if not np.isfinite(x).all():
        raise SchemaError("non_finite", f"{what} holds NaN or inf")
    ctx.raw += count * rows * cols * size
    return tuple(map(torch.from_numpy, x))  # one tensor each, no parent tensor (~1 us a frame)


def unpack_block(buf, offset: int, n: int, count: int, rows: int, cols: int, name: str) -> list:
    """``n`` records of one shape and dtype (not int8), their data back to back in ``buf``
    from ``offset`` (a bundle's payloads), converted at once: per record its ``count``
    float32 [rows, cols] tensors, or None where it holds NaN or inf. The tensors are views
    of one new array (not of the frame); shapes are the caller's to have checked
    (``check_record``)."""
    w = np.frombuffer(buf, dtype=_NP_WIRE[name], count=n * count * rows * cols, offset=offset)
    x = _to_float32(w, name).reshape(n * count, rows, cols)
    ok = np.isfinite(x.reshape(n, -1)).all(axis=1).tolist()
    ts = torch.from_numpy(x).unbind(0)
    return [ts[i * count:(i + 1) * count] if ok[i] else None for i in range(n)]


def pack_group(ctx, ts, count, cols, max_rows, what, shareable: bool = False) -> list:
    """Check and pack a group of tensors into one record. ``shareable``: the kind's tensors
    may be views of a stage buffer that ``encode_many`` converts once (Activations, Reply;
    not a hand-off, whose tensor is often a row of a much larger one)."""
    err = PrivacyError if ctx.direction == UP else GeometryError
    if not isinstance(ts, (tuple, list)) or not 1 <= len(ts) <= MAX_TARGETS \
            or (count is not None and len(ts) != count):
        raise err("bad_count", f"{what} must be {count or '1-16'} tensors")
    for i, t in enumerate(ts):
        _check_out(ctx, t, cols, max_rows, lambda: f"{what}[{i}]")
    shape = ts[0].shape
    for t in ts:
        if t.shape != shape:
            raise err("bad_shape", f"{what} tensors must share one shape")
    shared = _shared_slice(ctx, ts) if shareable and ctx.shared is not None else None
    if shared is not None:   # views of one buffer converted once (``encode_many``)
        buf, offsets = shared
        record, x = buf.record(ctx, offsets, shape[0], what)
    else:  # one stack and one conversion for the group: per-tensor conversions cost ~5 us each
        x = _as_float32(torch.stack(ts) if len(ts) > 1 else ts[0][None])
        record = pack_tensor(ctx, x, what)           # refuses NaN/inf first
    if ctx.direction == UP and (shared is None or not buf.clean()):
        _check_values(x, what)          # a clean buffer: all its rows were checked at once
    return record


def _check_values(x: np.ndarray, what: str) -> None:
    """The by-value half of ``_check_out`` (up): refuse a tensor whose rows carry registered
    private values, whatever the object (``M.clone()``, ``M.T``, ``M.half()``, another
    layer's M, ``ids.float()``): ``privacy.private_hit``. Run on the group's float32 stack,
    before any wire rounding."""
    hit = private_hit(x.reshape(-1, x.shape[2]))
    if hit is not None:
        i, j = divmod(hit[0], x.shape[1])
        name = f"{what}[{i}]" if x.shape[0] > 1 else what
        raise PrivacyError("private_value", f"{name} row {j} equals {hit[1]}: private values stay on the device")


# ---------------------------------------------------------------- shared buffers
class SharedBuffer:
    """One contiguous float tensor (``t._base`` of the frames' tensors), converted to float32
    and to the wire dtype ONCE for every frame that sends views of it (``frames.encode_many``).

    A record built from it is byte-identical to ``pack_tensor`` of the stacked views: every
    dtype converts element by element (int8: per-row scales, rows of ``cols`` elements), and
    the NaN/inf refusal is that message's alone (checked over its own rows when the buffer
    is not all finite)."""

    def __init__(self, base: torch.Tensor, dtype: str, cols: int):
        self.dtype, self.cols, self.torch_dtype = dtype, cols, base.dtype
        self.start, self.end = base.storage_offset(), base.storage_offset() + base.numel()
        # elements between rows i and i+1 of a [k, T, r] buffer: one slice gathers a frame's views
        self.span = base.stride(0) if base.dim() == 3 and base.shape[2] == cols else 0
        self.x = _as_float32(base).reshape(-1)                       # float32, flat
        self._clean = None
        self.scale = None
        if dtype == "int8":
            rows = self.x.reshape(-1, cols)
            self.finite = bool(np.isfinite(rows).all())
            if self.finite:
                self.scale = (np.abs(rows).max(axis=1) / np.float32(127)).astype("<f4")
                safe = np.where(self.scale > 0, self.scale, np.float32(1))
                self.w = np.rint(rows / safe[:, None]).clip(-127, 127).astype("i1").reshape(-1)
        elif dtype == "bf16":
            bits = torch.from_numpy(self.x).to(torch.bfloat16).view(torch.int16)
            self.w = bits.numpy().astype("<i2")
            self.finite = bool(((self.w.view("<u2") & 0x7F80) != 0x7F80).all())
        elif dtype == "fp16":
            with np.errstate(over="ignore"):
                self.w = self.x.astype("<f2")
            self.finite = bool(np.isfinite(self.w).all())
        else:
            self.w = self.x.astype("<f4", copy=False)
            self.finite = bool(np.isfinite(self.w).all())
        if self.span:
            self.x2 = self.x.reshape(-1, self.span)
            self.w2 = self.w.reshape(-1, self.span) if self.finite else None

    def clean(self) -> bool:
        """No row of the whole buffer carries registered private values (``private_hit``,
        checked once for every frame that sends views of it); False sends each frame to
        its own check, which refuses the one that does."""
        if self._clean is None:
            self._clean = private_hit(self.x.reshape(-1, self.cols)) is None
        return self._clean

    def _gather(self, a: np.ndarray, a2, offsets: list[int], n: int) -> np.ndarray:
        """a[o:o+n] for each offset, stacked: one strided slice of ``a2`` (``a`` as [k, T*r])
        when the views are rows ``i..i+count`` of a [k, T, r] buffer at one token range."""
        span, o0 = self.span, offsets[0]
        if span and o0 % span + n <= span and offsets == list(range(o0, o0 + len(offsets) * span, span)):
            i, c = divmod(o0, span)
            return a2[i:i + len(offsets), c:c + n]
        return np.stack([a[o:o + n] for o in offsets])

    def record(self, ctx: FrameContext, offsets: list[int], rows: int, what: str) -> tuple[list, np.ndarray | None]:
        """The record of the views starting at flat element ``offsets`` ([rows, cols] each),
        and (up frames of a buffer not ``clean``: the by-value check) their float32 stack
        [count, rows, cols]."""
        n, cols, count = rows * self.cols, self.cols, len(offsets)
        x = self._gather(self.x, getattr(self, "x2", None), offsets, n).reshape(count, rows, cols) \
            if not self.finite or (ctx.direction == UP and not self.clean()) else None
        if not self.finite:          # some rows of the buffer are bad: are this message's?
            return pack_tensor(ctx, x, what), x
        ctx.raw += count * n * DTYPES[ctx.dtype]
        code = DTYPE_CODES[ctx.dtype]
        data = self._gather(self.w, getattr(self, "w2", None), offsets, n).tobytes()
        if self.dtype == "int8":
            scales = b"".join([self.scale[o // cols:o // cols + rows].tobytes() for o in offsets])
            return [code, count, rows, cols, data, scales], x
        return [code, count, rows, cols, data], x


def _shared_slice(ctx: FrameContext, ts) -> tuple[SharedBuffer, list[int]] | None:
    """(buffer, flat offsets) if every tensor of ``ts`` is a whole-rows contiguous view of one
    contiguous base tensor; None (encode them alone) otherwise. Called after ``_check_out``.
    What holds for the whole base is checked once per base (``ctx.shared``)."""
    t0 = ts[0]
    base = t0._base
    if base is None:
        return None
    cols = t0.shape[1]
    key = (id(base), ctx.dtype, cols)
    entry = ctx.shared.get(key)
    if entry is None:   # base kept in the entry: its id() stays unique for the batch
        usable = base.is_contiguous() and not base.is_neg() and base.numel() % cols == 0
        entry = ctx.shared[key] = (base, SharedBuffer(base, ctx.dtype, cols) if usable else None)
    buf = entry[1]
    if buf is None:
        return None
    start, end, dtype, n = buf.start, buf.end, buf.torch_dtype, t0.shape[0] * cols
    offsets = []
    for t in ts:
        o = t.storage_offset()
        if t._base is not base or t.dtype is not dtype or not t.is_contiguous() or (o - start) % cols \
                or o < start or o + n > end:
            return None
        offsets.append(o - start)
    return buf, offsets
