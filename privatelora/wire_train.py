"""Frame kinds of split training (kinds 16-21), registered into ``wire``'s registry.

A training step of one session, with L cloud layers (DESIGN.md 2, issue 6):

    up    TrainHandoff      x_in [n, d] + segment lengths    (embedding / head-layer output)
    down  Activations       A h of cloud layer l             (kind 4, as in serving)
    up    Reply             M a of cloud layer l             (kind 5, as in serving)
    down  Handoff           hidden states after the last cloud layer, every row (kind 3)
    up    GradHandoff       dL/d(hidden) of that hand-off [n, d]
    down  GradReply         dL/dm of layer l, one [n, r] per target      (l = last .. first)
    up    GradActivations   dL/da of layer l, one [n, r] per A
    down  GradInput         dL/dx_in [n, d]   (only with device head layers, which carry M)
    down  GradDone          the backward is over (no device head layers)

Same strictness and privacy rules as the serving frames (``wire``'s contract): cloud-bound
(up) frames carry float tensors of the session's declared shapes only ([n, hidden] or
[n, rank] x the declared count), never a tensor tagged private (M, token ids, labels,
logits), and nothing else but segment lengths and a layer index. Gradients travel in fp32,
fp16 or bf16 (int8 row scales would crush them; refused both ways). ``TrainHandoff`` with
``backward=False`` is a forward-only pass (held-out loss through the split): the cloud
keeps no graph and answers with the final ``Handoff`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import wire
from .wire import (DOWN, DTYPE_CODES, MAX_TOKENS, UP, GeometryError, Message, PrivacyError,
                   SchemaError, _bool, _int, _keys, _pack_group, _tupled, _unpack_tensor, register)

GRAD_DTYPES = ("fp32", "fp16", "bf16")
_INT8 = DTYPE_CODES["int8"]


def _grad_dtype_out(ctx) -> None:
    if ctx.dtype not in GRAD_DTYPES:
        raise GeometryError("bad_dtype", f"gradients travel in {'/'.join(GRAD_DTYPES)}, not {ctx.dtype}")


def _grad_dtype_in(v) -> None:
    if type(v) is list and v and v[0] == _INT8:
        raise GeometryError("bad_dtype", "gradients never travel in int8")


def _geometry(ctx):
    return ctx.need_geometry() if ctx.direction == UP else ctx.geometry


class _Rows(Message):
    """One [n, hidden] tensor under body key "g" (GradHandoff up, GradInput down)."""

    FIELDS, TENSOR_FIELDS = frozenset({"g"}), ("g",)

    def _encode_body(self, ctx):
        g = _geometry(ctx)
        _grad_dtype_out(ctx)
        t = _pack_group(ctx, (self.grad,), 1, g.hidden if g else None,
                        g.max_tokens if g else MAX_TOKENS, "grad")
        return {"g": t}

    @classmethod
    def _decode_body(cls, session, body, ctx):
        _keys(body, cls.FIELDS, cls.NAME)
        g = ctx.need_geometry()
        _grad_dtype_in(body["g"])
        (t,) = _unpack_tensor(ctx, body["g"], 1, g.hidden, g.max_tokens, "grad", None)
        return cls(session, t)


class _LayerGrads(Message):
    """{"l": layer, "g": one record of count x [n, rank]} (GradReply down, GradActivations up)."""

    FIELDS, TENSOR_FIELDS = frozenset({"l", "g"}), ("g",)
    _count: ClassVar  # tensors per frame for a geometry

    def __post_init__(self):
        _tupled(self, "grads")

    def _encode_body(self, ctx):
        g = _geometry(ctx)
        _grad_dtype_out(ctx)
        if g is not None and (type(self.layer) is not int or self.layer not in g.layers):
            raise (PrivacyError if ctx.direction == UP else GeometryError)(
                "bad_layer", f"layer {self.layer!r} is not one of the session's layers")
        _int(self.layer, "layer", 0, 65535)
        ts = _pack_group(ctx, self.grads, self._count(g) if g else None, g.rank if g else None,
                         g.max_tokens if g else MAX_TOKENS, "grads")
        return {"l": self.layer, "g": ts}

    @classmethod
    def _decode_body(cls, session, body, ctx):
        _keys(body, cls.FIELDS, cls.NAME)
        g = ctx.need_geometry()
        layer = body["l"]
        if type(layer) is not int or layer not in g.layers:
            raise GeometryError("bad_layer", "layer is not one of the session's layers")
        _grad_dtype_in(body["g"])
        ts = _unpack_tensor(ctx, body["g"], cls._count(g), g.rank, g.max_tokens, "grads", None)
        return cls(session, layer, ts)


@register
@dataclass(frozen=True, repr=False, eq=False)
class TrainHandoff(Message):
    """Device -> cloud: a training forward of ``len(lengths)`` sequences, each from position 0,
    concatenated into ``hidden`` [sum(lengths), hidden]. ``backward``: keep the graph for a
    backward pass (False: forward only, e.g. held-out loss)."""

    KIND, NAME, DIRECTIONS = 16, "train_handoff", frozenset({UP})
    FIELDS, TENSOR_FIELDS = frozenset({"lengths", "hidden", "backward"}), ("hidden",)
    session: int
    lengths: tuple[int, ...]
    hidden: torch.Tensor
    backward: bool = True

    def __post_init__(self):
        _tupled(self, "lengths")

    @staticmethod
    def _check_lengths(lengths, rows: int | None, max_tokens: int, err) -> list[int]:
        if type(lengths) not in (list, tuple) or not 1 <= len(lengths) <= max_tokens:
            raise err("bad_lengths", f"lengths must be 1-{max_tokens} ints")
        for x in lengths:
            _int(x, "length", 1, max_tokens, err, "bad_lengths")
        if rows is not None and sum(lengths) != rows:
            raise err("bad_lengths", f"lengths sum to {sum(lengths)}, hidden has {rows} rows")
        return list(lengths)

    def _encode_body(self, ctx):
        g = ctx.need_geometry()
        _bool(self.backward, "backward")
        h = _pack_group(ctx, (self.hidden,), 1, g.hidden, g.max_tokens, "hidden")
        lengths = self._check_lengths(self.lengths, self.hidden.shape[0], g.max_tokens, PrivacyError)
        return {"lengths": lengths, "hidden": h, "backward": self.backward}

    @classmethod
    def _decode_body(cls, session, body, ctx):
        _keys(body, cls.FIELDS, cls.NAME)
        g = ctx.need_geometry()
        backward = _bool(body["backward"], "backward")
        lengths = cls._check_lengths(body["lengths"], None, g.max_tokens, SchemaError)
        (h,) = _unpack_tensor(ctx, body["hidden"], 1, g.hidden, g.max_tokens, "hidden", None)
        if sum(lengths) != h.shape[0]:
            raise SchemaError("bad_lengths", f"lengths sum to {sum(lengths)}, hidden has {h.shape[0]} rows")
        return cls(session, tuple(lengths), h, backward)


@register
@dataclass(frozen=True, repr=False, eq=False)
class GradHandoff(_Rows):
    """Device -> cloud: dL/d(hidden) of the cloud's final hand-off, [n, hidden]."""

    KIND, NAME, DIRECTIONS = 17, "grad_handoff", frozenset({UP})
    session: int
    grad: torch.Tensor


@register
@dataclass(frozen=True, repr=False, eq=False)
class GradReply(_LayerGrads):
    """Cloud -> device: dL/dm of one layer, one [n, rank] tensor per target."""

    KIND, NAME, DIRECTIONS = 18, "grad_reply", frozenset({DOWN})
    session: int
    layer: int
    grads: tuple[torch.Tensor, ...]
    _count = staticmethod(lambda g: len(g.targets))


@register
@dataclass(frozen=True, repr=False, eq=False)
class GradActivations(_LayerGrads):
    """Device -> cloud: dL/da of one layer, one [n, rank] tensor per A (1 with shared_a)."""

    KIND, NAME, DIRECTIONS = 19, "grad_activations", frozenset({UP})
    session: int
    layer: int
    grads: tuple[torch.Tensor, ...]
    _count = staticmethod(lambda g: g.n_activations)


@register
@dataclass(frozen=True, repr=False, eq=False)
class GradInput(_Rows):
    """Cloud -> device: dL/d(x_in) of the first cloud layer's input, [n, hidden]."""

    KIND, NAME, DIRECTIONS = 20, "grad_input", frozenset({DOWN})
    session: int
    grad: torch.Tensor


@register
@dataclass(frozen=True, repr=False)
class GradDone(Message):
    """Cloud -> device: the backward of this step is over and its graphs are freed."""

    KIND, NAME, DIRECTIONS = 21, "grad_done", frozenset({DOWN})
    session: int


TRAINING_KINDS = (TrainHandoff, GradHandoff, GradReply, GradActivations, GradInput, GradDone)
UP_TRAINING_KINDS = (TrainHandoff, GradHandoff, GradActivations)
assert all(wire.KINDS[c.KIND] is c for c in TRAINING_KINDS)
