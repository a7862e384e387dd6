"""Frame kinds of split training (16-21): the codecs of ``privatelora.runtime.train_messages``,
registered into the frame-kind registry (``wire/kinds.py``).

Same strictness and privacy rules as the serving frames: cloud-bound (up) frames carry
float tensors of the session's declared shapes only ([n, hidden] or [n, rank] x the
declared count), never a tensor tagged private (M, token ids, labels, logits), and nothing
else but segment lengths and a layer index. Gradients travel in fp32, fp16 or bf16 (int8
row scales would crush them; refused both ways).
"""

from __future__ import annotations

from privatelora.runtime.train_messages import (
    GradActivations,
    GradDone,
    GradHandoff,
    GradInput,
    GradReply,
    TrainHandoff,
)
from privatelora.wire.errors import GeometryError, PrivacyError, SchemaError
from privatelora.wire.kinds import Kind, check_layer_in, check_layer_out, register
from privatelora.wire.schema import DOWN, MAX_TOKENS, UP, check_bool, check_int
from privatelora.wire.tensors import DTYPE_CODES, pack_group, unpack_tensor

GRAD_DTYPES = ("fp32", "fp16", "bf16")
_INT8 = DTYPE_CODES["int8"]


def _grad_dtype_out(ctx) -> None:
    if ctx.dtype not in GRAD_DTYPES:
        raise GeometryError("bad_dtype", f"gradients travel in {'/'.join(GRAD_DTYPES)}, not {ctx.dtype}")


def _grad_dtype_in(v) -> None:
    if type(v) is list and v and v[0] == _INT8:
        raise GeometryError("bad_dtype", "gradients never travel in int8")


def _rows(cls):
    """Codec of one [n, hidden] gradient under body key "g" (GradHandoff up, GradInput down)."""
    def enc(msg, ctx):
        g = ctx.geometry_if_needed()
        _grad_dtype_out(ctx)
        return {"g": pack_group(ctx, (msg.grad,), 1, g.hidden if g else None,
                                g.max_tokens if g else MAX_TOKENS, "grad")}

    def dec(session, body, ctx):
        g = ctx.need_geometry()
        _grad_dtype_in(body["g"])
        (t,) = unpack_tensor(ctx, body["g"], 1, g.hidden, g.max_tokens, "grad", None)
        return cls(session, t)
    return enc, dec


def _layer_grads(cls, count):
    """Codec of {"l": layer, "g": one record of count x [n, rank]} (GradReply, GradActivations)."""
    def enc(msg, ctx):
        g = ctx.geometry_if_needed()
        _grad_dtype_out(ctx)
        check_layer_out(ctx, g, msg.layer)
        ts = pack_group(ctx, msg.grads, count(g) if g else None, g.rank if g else None,
                        g.max_tokens if g else MAX_TOKENS, "grads")
        return {"l": msg.layer, "g": ts}

    def dec(session, body, ctx):
        g = ctx.need_geometry()
        layer = check_layer_in(g, body["l"])
        _grad_dtype_in(body["g"])
        return cls(session, layer, unpack_tensor(ctx, body["g"], count(g), g.rank, g.max_tokens, "grads", None))
    return enc, dec


def check_lengths(lengths, rows: int | None, max_tokens: int, err) -> list[int]:
    if type(lengths) not in (list, tuple) or not 1 <= len(lengths) <= max_tokens:
        raise err("bad_lengths", f"lengths must be 1-{max_tokens} ints")
    for x in lengths:
        check_int(x, "length", 1, max_tokens, err, "bad_lengths")
    if rows is not None and sum(lengths) != rows:
        raise err("bad_lengths", f"lengths sum to {sum(lengths)}, hidden has {rows} rows")
    return list(lengths)


def _enc_train(msg: TrainHandoff, ctx):
    g = ctx.need_geometry()
    check_bool(msg.backward, "backward")
    h = pack_group(ctx, (msg.hidden,), 1, g.hidden, g.max_tokens, "hidden")
    lengths = check_lengths(msg.lengths, msg.hidden.shape[0], g.max_tokens, PrivacyError)
    return {"lengths": lengths, "hidden": h, "backward": msg.backward}


def _dec_train(session, body, ctx):
    g = ctx.need_geometry()
    backward = check_bool(body["backward"], "backward")
    lengths = check_lengths(body["lengths"], None, g.max_tokens, SchemaError)
    (h,) = unpack_tensor(ctx, body["hidden"], 1, g.hidden, g.max_tokens, "hidden", None)
    if sum(lengths) != h.shape[0]:
        raise SchemaError("bad_lengths", f"lengths sum to {sum(lengths)}, hidden has {h.shape[0]} rows")
    return TrainHandoff(session, tuple(lengths), h, backward)


_UP, _DOWN = frozenset({UP}), frozenset({DOWN})
register(Kind(16, "train_handoff", TrainHandoff, _UP, frozenset({"lengths", "hidden", "backward"}), ("hidden",),
              _enc_train, _dec_train))
register(Kind(17, "grad_handoff", GradHandoff, _UP, frozenset({"g"}), ("g",), *_rows(GradHandoff)))
register(Kind(18, "grad_reply", GradReply, _DOWN, frozenset({"l", "g"}), ("g",),
              *_layer_grads(GradReply, lambda g: len(g.targets))))
register(Kind(19, "grad_activations", GradActivations, _UP, frozenset({"l", "g"}), ("g",),
              *_layer_grads(GradActivations, lambda g: g.n_activations)))
register(Kind(20, "grad_input", GradInput, _DOWN, frozenset({"g"}), ("g",), *_rows(GradInput)))
register(Kind(21, "grad_done", GradDone, _DOWN))
