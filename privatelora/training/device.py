"""The device side of split training: ``TrainStep`` (one forward + backward of a batch of
sequences, a state machine like ``Generation``), ``run_step`` (in process),
``run_step_remote`` (over a ``transport.Session``), and ``monolithic_loss_and_grads``, the
reference whose autograd gradients the split's must equal. The protocol and the
gradient algebra are described in ``training/cloud.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from privatelora.config import PrivateLoRAError
from privatelora.model.adapters import m_name
from privatelora.model.block import finish_layer, rms_norm
from privatelora.model.projections import PublicProjections, hf_weights
from privatelora.privacy import mark_private, register_private_tokens
from privatelora.runtime.messages import Activations, Error, Handoff, Reply
from privatelora.runtime.train_messages import (
    GradActivations,
    GradDone,
    GradHandoff,
    GradInput,
    GradReply,
    TrainHandoff,
)
from privatelora.training.cloud import IGNORE, CloudTrainer, TrainingError, attention, segments


def _local_layer(part, i: int, x: torch.Tensor, segs) -> torch.Tensor:
    """A whole adapted layer on the device (head/tail), M applied locally (graph kept)."""
    lw, proj = part.local[i], part.proj
    h = rms_norm(x, lw.ln1, lw.eps)
    qkv = {t: lw.base(t, h) for t in ("q", "k", "v")}
    for t in (part.cfg.targets if i in part.adapted else ()):
        a = h @ proj.A[(i, proj.a_key(t))].T
        qkv[t] = qkv[t] + (a @ part.adapter.get(i, t).T) @ proj.B[(i, t)].T
    return finish_layer(lw, x, attention(lw, qkv["q"], qkv["k"], qkv["v"], segs, part.rotary, x))


def _add_grad(t: torch.Tensor, g: torch.Tensor) -> None:
    t.grad = g.detach().clone() if t.grad is None else t.grad + g


class TrainStep:
    """The device side of one forward (+ backward) of a batch of sequences."""

    def __init__(self, part, session: int, inputs, labels, *, backward: bool = True,
                 denominator: float | None = None):
        if not inputs or len(inputs) != len(labels):
            raise PrivateLoRAError("a step needs sequences and one label sequence for each")
        self.part, self.session, self.backward = part, session, backward
        self.lengths = [len(s) for s in inputs]
        if min(self.lengths) < 1 or [len(s) for s in labels] != self.lengths:
            raise PrivateLoRAError("every sequence needs >= 1 token and as many labels")
        dev = part.embed.device
        self.ids = register_private_tokens(mark_private(
            torch.as_tensor([i for s in inputs for i in s], dtype=torch.long, device=dev)))
        self.labels = register_private_tokens(mark_private(
            torch.as_tensor([i for s in labels for i in s], dtype=torch.long, device=dev)))
        if int(self.ids.min()) < 0 or int(self.ids.max()) >= part.vocab:
            raise PrivateLoRAError(f"token id out of range for a vocabulary of {part.vocab}")
        self.tokens = int((self.labels != IGNORE).sum())          # label tokens of this step
        self.denominator = float(denominator if denominator is not None else max(self.tokens, 1))
        self.loss_sum: float | None = None                        # nats over label tokens
        self.done = False
        self._layers = part.exchange_ids                          # adapted cloud layers, in order
        self._k = 0                                                # next cloud layer expected
        self._a: dict[int, tuple] = {}                             # layer -> A h received
        self._phase = "new"
        if backward:
            for _, M in part.adapter.named_parameters():
                M.requires_grad_(True)

    @property
    def loss(self) -> float:
        """Mean cross-entropy per label token of this step."""
        return self.loss_sum / max(self.tokens, 1)

    def _fail(self, why: str):
        raise TrainingError("protocol", f"unexpected message in phase {self._phase}: {why}")

    def start(self) -> TrainHandoff:
        if self._phase != "new":
            self._fail("started twice")
        segs = segments(self.lengths)
        x = F.embedding(self.ids, self.part.embed)
        with torch.set_grad_enabled(self.backward):
            for i in self.part.head_ids:
                x = _local_layer(self.part, i, x, segs)
        self._x_in = x if (self.backward and x.requires_grad) else None   # head layers carrying M
        self._phase = "forward"
        return TrainHandoff(self.session, tuple(self.lengths), x.detach().contiguous(), self.backward)

    def on(self, msg):
        if isinstance(msg, Error):
            self.done = True
            raise TrainingError(msg.code, msg.reason)
        if getattr(msg, "session", None) != self.session:
            self._fail("message for another session")
        if isinstance(msg, Activations):
            return self._reply(msg)
        if isinstance(msg, Handoff):
            return self._head(msg)
        if isinstance(msg, GradReply):
            return self._grad_reply(msg)
        if isinstance(msg, (GradInput, GradDone)):
            return self._finish(msg)
        self._fail(type(msg).__name__)

    def _reply(self, act: Activations) -> Reply:
        if self._phase != "forward" or self._k >= len(self._layers) or act.layer != self._layers[self._k]:
            self._fail(f"activations of layer {act.layer}")
        self._k += 1
        if self.backward:
            self._a[act.layer] = act.a
        with torch.no_grad():
            m = self.part.m_of(act.layer, act.a)
        return Reply(self.session, act.layer, m)

    def _head(self, back: Handoff):
        if self._phase != "forward" or self._k != len(self._layers):
            self._fail("hand-off before the last cloud layer")
        n = sum(self.lengths)
        if tuple(back.hidden.shape) != (n, self.part.model_config.hidden_size):
            self._fail("hand-off of the wrong shape")
        segs = segments(self.lengths)
        hidden = back.hidden.detach().to(self.part.cfg.torch_dtype).requires_grad_(self.backward)
        with torch.set_grad_enabled(self.backward):
            x = hidden
            for i in self.part.tail_ids:
                x = _local_layer(self.part, i, x, segs)
            logits = self.part.head_logits(x)                      # tagged private
            loss = F.cross_entropy(logits.float(), self.labels, ignore_index=IGNORE, reduction="sum")
        self.loss_sum = float(loss.detach())
        if not self.backward:
            self.done, self._phase = True, "done"
            return None
        # every gradient below (cloud and device) is of this normalised loss
        (loss / self.denominator).backward()   # tail-layer M grads land in M.grad
        self._phase = "backward"
        self._k = len(self._layers) - 1
        return GradHandoff(self.session, hidden.grad.detach().contiguous())

    def _grad_reply(self, msg: GradReply) -> GradActivations:
        if self._phase != "backward" or self._k < 0 or msg.layer != self._layers[self._k]:
            self._fail(f"gradient of layer {msg.layer}")
        self._k -= 1
        part, layer = self.part, msg.layer
        akeys = part.proj.a_keys()
        a = dict(zip(akeys, self._a.pop(layer)))
        ga = {k: None for k in akeys}
        dt = part.cfg.torch_dtype
        with torch.no_grad():
            for t, gm in zip(part.cfg.targets, msg.grads):
                gm = gm.to(dt)
                M = part.adapter.get(layer, t)
                key = "shared" if part.cfg.shared_a else t
                _add_grad(M, gm.T @ a[key].to(dt))                         # dL/dM = dL/dm^T a
                g = gm @ M.detach()                                        # dL/da = dL/dm M
                ga[key] = g if ga[key] is None else ga[key] + g
        return GradActivations(self.session, layer, tuple(ga[k].contiguous() for k in akeys))

    def _finish(self, msg):
        if self._phase != "backward" or self._k != -1:
            self._fail("end of backward before the first cloud layer")
        if isinstance(msg, GradInput):
            if self._x_in is None:
                self._fail("input gradient without device head layers")
            self._x_in.backward(msg.grad.to(self._x_in.dtype))
        elif self._x_in is not None:
            self._fail("backward ended without the input gradient the head layers need")
        self._x_in = None
        self.done, self._phase = True, "done"
        return None


# ---------------------------------------------------------------- drivers
def run_step(trainer: CloudTrainer, step: TrainStep) -> TrainStep:
    """One step in process: every message goes straight to the trainer (no IO)."""
    msg = step.start()
    while msg is not None:
        msg = step.on(trainer.handle(msg))
    return step


def wire_dtype(msg, session_dtype: str) -> str | None:
    """The wire dtype a training-path message travels in: Activations/Reply in the
    session's dtype; hidden states and gradients in the session dtype too, except that an
    int8 session sends them in fp16 (row scales would crush them); None: no tensor."""
    from privatelora.wire import HANDOFF_DTYPE
    if isinstance(msg, (Activations, Reply)):
        return session_dtype
    if isinstance(msg, (Handoff, TrainHandoff, GradHandoff, GradReply, GradActivations, GradInput)):
        return HANDOFF_DTYPE[session_dtype]
    return None


async def run_step_remote(session, step: TrainStep, timeout: float = 300.0) -> TrainStep:
    """One step over a ``transport.Session`` opened on a cloud endpoint."""
    msg = step.start()
    while msg is not None:
        await session.send(msg, dtype=wire_dtype(msg, session.geometry.dtype))
        msg = step.on(await session.recv(timeout))
    return step


# ---------------------------------------------------------------- reference
def monolithic_loss_and_grads(backbone, adapter, inputs, labels, denominator: float | None = None):
    """(mean loss, {M name: dL/dM}) from the unsplit HF model: forward hooks add
    ``B (M (A x))`` to the outputs of q/k/v (x: the projection's input), M a torch leaf."""
    model, cfg = backbone.model, adapter.cfg
    proj = PublicProjections(model.config, cfg, adapter.layers, device=model.device, weights=hf_weights(model))
    leaves = {name: M.detach().clone().requires_grad_(True) for name, M in adapter.named_parameters()}
    hooks = []
    for i in adapter.layers:                # the placement: only these layers carry M
        layer = model.model.layers[i]
        for t in cfg.targets:
            A, B, M = proj.A[(i, proj.a_key(t))], proj.B[(i, t)], leaves[m_name(i, t)]
            hooks.append(getattr(layer.self_attn, f"{t}_proj").register_forward_hook(
                lambda mod, inp, out, A=A, B=B, M=M: out + ((inp[0] @ A.T) @ M.T) @ B.T))
    try:
        with torch.enable_grad():
            total, count = 0.0, 0
            for ids, lab in zip(inputs, labels):
                logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0]
                lab = torch.as_tensor(lab, dtype=torch.long)
                total = total + F.cross_entropy(logits.float(), lab, ignore_index=IGNORE, reduction="sum")
                count += int((lab != IGNORE).sum())
            loss = total / float(denominator if denominator is not None else max(count, 1))
            names = sorted(leaves)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    finally:
        for h in hooks:
            h.remove()
    return float(loss.detach()), dict(zip(names, grads))
