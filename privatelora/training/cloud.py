"""Split training of the private M with exact gradients . No IO.

Only M trains; A, B and the backbone are public and frozen. The device holds the text, the
labels, M, and computes the loss; the cloud runs its decoder layers forward (full-sequence
prefill, no KV cache) and backward, seeing only what it sees in serving plus gradients
with respect to those same activations. Messages: ``runtime/train_messages.py``; frames: ``wire/training.py``. The device side is ``training/device.py``.

Contract
- ``CloudTrainer(cloud_part)``: the cloud side. ``handle(msg)`` takes one message of a
  session in a training step (``TrainHandoff``; ``Reply`` while that session's training
  forward waits on it; ``GradHandoff``; ``GradActivations``) and returns one answer
  (``Activations``, ``Handoff``, ``GradReply``, ``GradInput``, ``GradDone``) or an
  ``Error`` that drops that session's step only. It keeps a session's per-layer graphs from
  its ``TrainHandoff`` to the end of its backward and frees them then, on error and on
  ``close``. It holds no M, token, label or logit (nothing private-prefixed).
- ``TrainStep(device_part, session, inputs, labels)``: the device side of one forward and
  backward of a batch of sequences, a state machine like ``Generation``: ``start()`` gives
  the first message, ``on(answer)`` the next one, or None when done. It adds dL/dM to
  ``M.grad`` of the device's adapter, the loss being the sum of the label tokens'
  cross-entropy divided by ``denominator`` (default: this step's label-token count).
- ``run_step(trainer, step)`` drives a step in process; ``run_step_remote(session, step)``
  the same over a ``transport.Session`` (a ``privatelora cloud`` endpoint).
- ``monolithic_loss_and_grads(...)``: the reference, the HF model with forward hooks adding
  ``B (M (A x))`` to q/k/v and M a torch leaf: split gradients must equal its autograd's.

Each layer's graph is its own, with detached leaves at layer boundaries, so each side runs
exactly the backward of what it computed. Cloud layer l (x_l a leaf, m a leaf received):

    h = norm(x_l);  a = A h  --(device: m = M a)-->  q,k,v = W h + B m;  y_l = attn/MLP
    backward:  dL/dm, dL/dx_l|W-path = grad(y_l, dL/dy_l)                  --> GradReply
               device: dL/dM_t += dL/dm_t^T a;  dL/da = sum_t dL/dm_t M_t  --> GradActivations
               dL/dx_l = dL/dx_l|W-path + grad(a, dL/da)  = dL/dy_{l-1}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from privatelora.config import PrivateLoRAError
from privatelora.model.block import KVCache, Segment, attend, finish_layer, rms_norm, rope_tables
from privatelora.runtime.messages import Activations, Error, Handoff, Reply
from privatelora.runtime.train_messages import (
    GradActivations,
    GradDone,
    GradHandoff,
    GradInput,
    GradReply,
    TrainHandoff,
)

IGNORE = -100   # label of a position that carries no loss


class TrainingError(PrivateLoRAError):
    """The cloud refused a training message, or answered out of protocol."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


def segments(lengths) -> list[Segment]:
    return [Segment(0, n) for n in lengths]   # every training sequence starts at position 0


def attention(lw, q, k, v, segs, rotary, like) -> torch.Tensor:
    """Causal (sliding) attention of fresh sequences: each segment against itself only."""
    cos, sin = rope_tables(rotary, segs, like)
    return attend(lw, q, k, v, segs, [KVCache() for _ in segs], cos, sin)


# ---------------------------------------------------------------- cloud
@dataclass
class _Layer:
    x: torch.Tensor                        # input residual [n, d], a leaf
    h: torch.Tensor                        # its input norm (graph from x)
    a: tuple                               # A h per A key (graph from x)
    m: tuple | None = None                 # the device's M a, leaves
    y: torch.Tensor | None = None          # output of the layer and the unadapted layers after it
    gx: torch.Tensor | None = None         # dL/dx through the W path, awaiting dL/da


@dataclass
class _Step:
    lengths: list[int]
    backward: bool
    n: int
    phase: str                             # "forward" | "grad_handoff" | "grad_activations"
    at: int = 0                            # index into the adapted layers of the one waited on
    layers: list[_Layer] = field(default_factory=list)
    prefix: tuple | None = None            # (x_in leaf, output) of unadapted layers before the first adapted


class CloudTrainer:
    """Forward and backward of the cloud's layers for sessions in a training step."""

    def __init__(self, cloud, max_sessions: int = 16):
        self.cloud = cloud                 # a CloudPart: its public weights, A, B, rotary
        self.cfg = cloud.cfg
        self.layer_ids = list(cloud.layer_ids)
        self.exchange = list(cloud.exchange_ids)     # adapted layers: one exchange each way
        # the device needs dL/dx_in only when one of its head layers carries M
        n = cloud.model_config.num_hidden_layers
        self.head = any(i in self.cfg.adapted(n) for i in range(self.cfg.device_head_layers))
        self.max_sessions = max_sessions
        self.sessions: dict[int, _Step] = {}
        self.steps = 0                     # finished backward passes (stats)

    def accepts(self, msg) -> bool:
        """Is ``msg`` for the trainer (not the serving path)?"""
        if isinstance(msg, (TrainHandoff, GradHandoff, GradActivations)):
            return True
        st = self.sessions.get(getattr(msg, "session", None))
        return isinstance(msg, Reply) and st is not None and st.phase == "forward"

    def close(self, session: int) -> None:
        """Free the session's graphs (idempotent)."""
        self.sessions.pop(session, None)

    def graph_sessions(self) -> int:
        return len(self.sessions)

    def handle(self, msg):
        sid = getattr(msg, "session", -1)
        try:
            if isinstance(msg, TrainHandoff):
                return self._start(msg)
            st = self.sessions.get(sid)
            if st is None:
                raise TrainingError("out_of_order", f"session {sid} is not in a training step")
            if isinstance(msg, Reply):
                return self._absorb(sid, st, msg)
            if isinstance(msg, GradHandoff):
                return self._grad_handoff(sid, st, msg)
            if isinstance(msg, GradActivations):
                return self._grad_activations(sid, st, msg)
            raise TrainingError("bad_request", f"the trainer does not take {type(msg).__name__}")
        except TrainingError as e:
            if not isinstance(msg, TrainHandoff) or e.code != "out_of_order":
                self.sessions.pop(sid, None)   # a broken step cannot continue: free its graphs
            return Error(sid, e.code, e.reason)

    # ---- checks -------------------------------------------------------------------------
    def _tensor(self, t, rows: int, cols: int, what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or tuple(t.shape) != (rows, cols):
            got = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
            raise TrainingError("bad_shape", f"{what} must be [{rows}, {cols}], got {got}")
        if not torch.is_floating_point(t) or not torch.isfinite(t).all():
            raise TrainingError("not_finite", f"{what} must hold finite floats")
        return t.detach().to(self.cfg.torch_dtype)

    def _tensors(self, ts, count: int, rows: int, what: str) -> tuple:
        if not isinstance(ts, tuple) or len(ts) != count:
            raise TrainingError("bad_shape", f"{what} must hold {count} tensors")
        return tuple(self._tensor(t, rows, self.cfg.rank, what) for t in ts)

    def _expect(self, st: _Step, phase: str, layer: int | None = None) -> None:
        want = self.exchange[st.at] if st.at < len(self.exchange) else None
        if st.phase != phase or (layer is not None and layer != want):
            raise TrainingError("out_of_order", f"the step waits for {st.phase} of layer {want}")

    # ---- forward ------------------------------------------------------------------------
    def _start(self, msg: TrainHandoff):
        sid = msg.session
        if sid in self.sessions:
            raise TrainingError("out_of_order", "the session's previous step is not finished")
        if len(self.sessions) >= self.max_sessions:
            raise TrainingError("busy", f"{self.max_sessions} sessions are training; try again later")
        lengths = list(msg.lengths)
        n = sum(lengths) if lengths and all(type(x) is int and x >= 1 for x in lengths) else -1
        if n < 1:
            raise TrainingError("bad_lengths", "lengths must be positive ints")
        rows = msg.hidden.shape[0] if isinstance(msg.hidden, torch.Tensor) and msg.hidden.dim() == 2 else -1
        if rows != n:
            raise TrainingError("bad_lengths", f"lengths sum to {n}, hidden has {rows} rows")
        if n > self.cloud.max_tokens_per_request:
            raise TrainingError("too_many_tokens", f"{n} tokens exceed {self.cloud.max_tokens_per_request} per request")
        if max(lengths) > self.cloud.max_positions:
            raise TrainingError("too_long", f"a sequence of {max(lengths)} > {self.cloud.max_positions} positions")
        x = self._tensor(msg.hidden, n, self.cloud.hidden, "hidden")
        st = _Step(lengths, bool(msg.backward), n, "forward")
        self.sessions[sid] = st
        first = self.layer_ids.index(self.exchange[0]) if self.exchange else len(self.layer_ids)
        if first > 0:      # unadapted layers before the first adapted one: no exchange
            x0 = x.detach().requires_grad_(st.backward and self.head)
            with torch.set_grad_enabled(x0.requires_grad):
                x = self._plain_run(x0, 0, first, st)
            if x0.requires_grad:
                st.prefix = (x0, x)
        if not self.exchange:
            return self._hand_back(sid, st, x)
        return self._emit(sid, st, x)

    def _plain_run(self, x: torch.Tensor, lo: int, hi: int, st: _Step) -> torch.Tensor:
        """Unadapted cloud layers ``layer_ids[lo:hi]`` (frozen W alone), back to back."""
        segs = segments(st.lengths)
        for layer in self.layer_ids[lo:hi]:
            lw = self.cloud.layers[layer]
            h = rms_norm(x, lw.ln1, lw.eps)
            qkv = {t: lw.base(t, h) for t in ("q", "k", "v")}
            x = finish_layer(lw, x, attention(lw, qkv["q"], qkv["k"], qkv["v"], segs, self.cloud.rotary, x))
        return x

    def _hand_back(self, sid: int, st: _Step, y: torch.Tensor) -> Handoff:
        if st.backward:
            st.phase = "grad_handoff"
        else:
            self.sessions.pop(sid, None)
        return Handoff(sid, 0, y.detach().contiguous(), True)

    def _emit(self, sid: int, st: _Step, x: torch.Tensor) -> Activations:
        """Norm + A h of the layer ``st.at`` for input ``x``."""
        layer = self.exchange[st.at]
        lw = self.cloud.layers[layer]
        proj = self.cloud.proj
        # the first layer's input needs no gradient unless device head layers made it
        need_x = st.backward and (st.at > 0 or self.head)
        x = x.detach().requires_grad_(need_x)
        with torch.set_grad_enabled(st.backward):
            h = rms_norm(x, lw.ln1, lw.eps)
            a = tuple(h @ proj.A[(layer, k)].T for k in proj.a_keys())
        st.layers.append(_Layer(x, h, a))
        return Activations(sid, layer, tuple(t.detach().contiguous() for t in a))

    def _absorb(self, sid: int, st: _Step, msg: Reply):
        self._expect(st, "forward", msg.layer)
        layer, rec = self.exchange[st.at], st.layers[-1]
        lw, proj = self.cloud.layers[layer], self.cloud.proj
        m = self._tensors(msg.m, len(self.cfg.targets), st.n, "reply")
        m = tuple(t.requires_grad_(st.backward) for t in m)
        segs = segments(st.lengths)
        with torch.set_grad_enabled(st.backward):
            qkv = {t: lw.base(t, rec.h) for t in ("q", "k", "v")}
            for t, mt in zip(self.cfg.targets, m):
                qkv[t] = qkv[t] + mt @ proj.B[(layer, t)].T
            y = finish_layer(lw, rec.x, attention(lw, qkv["q"], qkv["k"], qkv["v"], segs,
                                                   self.cloud.rotary, rec.x))
            # the unadapted layers up to the next adapted one belong to this record's graph
            pos = self.layer_ids.index(layer) + 1
            nxt = self.layer_ids.index(self.exchange[st.at + 1]) if st.at + 1 < len(self.exchange) \
                else len(self.layer_ids)
            y = self._plain_run(y, pos, nxt, st)
        if st.backward:
            rec.m, rec.y = m, y
        if st.at + 1 < len(self.exchange):
            st.at += 1
            return self._emit(sid, st, y)
        return self._hand_back(sid, st, y)

    # ---- backward -----------------------------------------------------------------------
    def _grad_handoff(self, sid: int, st: _Step, msg: GradHandoff):
        self._expect(st, "grad_handoff")
        g = self._tensor(msg.grad, st.n, self.cloud.hidden, "grad")
        if not self.exchange:
            return self._end(sid, st, g)
        return self._backward_layer(sid, st, g)

    def _end(self, sid: int, st: _Step, gx):
        """The backward reached the cloud's input: through the unadapted prefix, if any, to
        the device's head layers (``GradInput``), or done."""
        if st.prefix is not None:
            x0, y0 = st.prefix
            with torch.enable_grad():
                (gx,) = torch.autograd.grad(y0, [x0], gx)
            st.prefix = None
        self.sessions.pop(sid, None)
        self.steps += 1
        return GradInput(sid, gx.contiguous()) if self.head else GradDone(sid)

    def _backward_layer(self, sid: int, st: _Step, gy: torch.Tensor) -> GradReply:
        """dL/dm (to the device) and dL/dx through the W path (kept) of layer ``st.at``."""
        rec = st.layers[st.at]
        leaves = list(rec.m) + ([rec.x] if rec.x.requires_grad else [])
        with torch.enable_grad():
            grads = torch.autograd.grad(rec.y, leaves, gy, retain_graph=rec.x.requires_grad)
        gm = grads[:len(rec.m)]
        rec.gx = grads[len(rec.m)] if rec.x.requires_grad else None
        rec.y = rec.m = None
        st.phase = "grad_activations"
        return GradReply(sid, self.exchange[st.at], tuple(g.contiguous() for g in gm))

    def _grad_activations(self, sid: int, st: _Step, msg: GradActivations):
        self._expect(st, "grad_activations", msg.layer)
        rec = st.layers[st.at]
        ga = self._tensors(msg.grads, len(rec.a), st.n, "grad")
        gx = None
        if rec.x.requires_grad:   # the A path: a = A norm(x)
            with torch.enable_grad():
                (ga_x,) = torch.autograd.grad(rec.a, [rec.x], ga)
            gx = rec.gx + ga_x
        st.layers[st.at] = None   # free this layer's graph
        if st.at > 0:
            st.at -= 1
            return self._backward_layer(sid, st, gx)
        return self._end(sid, st, gx)


# ---------------------------------------------------------------- device
