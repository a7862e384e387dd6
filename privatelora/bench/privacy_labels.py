"""Label leakage in split tuning: an honest-but-curious cloud recovers the device's labels
from the gradient the device sends up (part of the privacy attack harness, issue 16).

The split is the codebase's own: ``build_split`` parts, a ``CloudTrainer`` wrapped so that
every message it receives (and every answer it sends) is recorded, and the device side's
``TrainStep`` / ``run_step``, labels the next tokens of each sequence (``sample_batch``'s
convention: inputs ``s[:-1]``, labels ``s[1:]``). The attacker then works from the
recording alone (``CloudView``: segment lengths, the final ``Handoff`` it sent down, the
``GradHandoff`` it got back) plus the public checkpoint: final norm, LM head and the public
weights of the decoder layers the device runs as tail layers, with M = 0 in them (it does
not know M, the ids or the labels).

Attack (``gradient_match``). With no device tail layers the device computes, per position
t with hand-off row h_t, ``dL/dh_t = (1/N) J_t^T W^T (p_t - e_{y_t})`` where J_t is the final
RMS norm's Jacobian at h_t, W the LM head and p_t = softmax(W norm(h_t) + b): everything but
the one-hot label and the scale 1/N is known to the cloud. For every candidate y the
predicted gradient is ``J_t^T (W^T p_t - W_y)``; its distance to the received one is a
closed form in ``W h_t``-like products (J_t is diag(w) times a rank-one correction of the
identity), so all of the vocabulary is scored at once. N is the step's row count (every
position carries a label in the tuning loop's batches; ``recover_labels`` can fit it
instead: a scale-free cosine pass, a least-squares scale, then the distance pass). With k
device tail layers the attacker replays the public tail layers on the hand-off
(full-sequence causal attention, as the device trains) with M = 0, solves
``J_f^T D = g`` for D = dL/d(tail output) by a few GMRES iterations on vector-Jacobian
products (truncated on purpose: ``SOLVE_ITERATIONS``), and decodes D as above.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from privatelora.config import PrivateLoRAConfig
from privatelora.model.block import LayerWeights, finish_layer, rms_norm
from privatelora.runtime.messages import Handoff
from privatelora.runtime.train_messages import GradHandoff, TrainHandoff
from privatelora.training.cloud import CloudTrainer, attention, segments

ATTACK = "gradient_match"
# randomize_ scale of the private M: a rank-16 M tuned on the Sonnets with bench tuning's
# defaults (150 steps x 8 x 128 tokens, lr 1e-2) had entries of std 0.17 = 0.68 / sqrt(16)
TUNED_SCALE = 0.7
# GMRES iterations of the tail solve. Measured on the Sonnets (4 x 64 labels, rank 16, tail
# 1 / 2): 10 iterations recover 0.98 / 0.95 with M = 0 and 0.74 / 0.62 with a private M;
# 160 iterations 1.0 / 0.97 and 0.54 / 0.30 (the exact inverse amplifies the mismatch).
SOLVE_ITERATIONS = 10


# ---------------------------------------------------------------- what the cloud sees
@dataclass
class CloudView:
    """What the cloud holds after one training step of one session: nothing private."""

    lengths: tuple[int, ...]       # from the TrainHandoff
    handoff: torch.Tensor          # [n, d] the final Handoff it sent down
    grad: torch.Tensor             # [n, d] the GradHandoff it received: dL/d(handoff)


class RecordingTrainer:
    """A ``CloudTrainer`` whose ``handle`` records every message in and every answer out."""

    def __init__(self, trainer: CloudTrainer):
        self.trainer = trainer
        self.received: list = []
        self.sent: list = []

    def handle(self, msg):
        self.received.append(msg)
        out = self.trainer.handle(msg)
        self.sent.append(out)
        return out

    def accepts(self, msg) -> bool:
        return self.trainer.accepts(msg)

    def views(self) -> list[CloudView]:
        """One ``CloudView`` per finished backward, from the recording alone."""
        out, lengths, handoff = [], None, None
        for msg, ans in zip(self.received, self.sent):
            if isinstance(msg, TrainHandoff):
                lengths, handoff = tuple(msg.lengths), None
            if isinstance(ans, Handoff):
                handoff = ans.hidden.detach().clone()
            if isinstance(msg, GradHandoff):
                out.append(CloudView(lengths, handoff, msg.grad.detach().clone()))
        return out

    def kinds(self) -> dict[str, int]:
        return dict(Counter(type(m).__name__ for m in self.received))


# ---------------------------------------------------------------- the attacker's public model
@dataclass
class PublicHead:
    """The public weights the attacker uses: final norm, LM head, the device's tail layers."""

    norm_w: torch.Tensor
    norm_eps: float
    lm_head: torch.Tensor
    lm_bias: torch.Tensor | None
    rotary: object
    tail: list[LayerWeights] = field(default_factory=list)

    @classmethod
    def from_backbone(cls, backbone, cfg: PrivateLoRAConfig) -> "PublicHead":
        model = backbone.model
        n = backbone.n_layers
        tail = [LayerWeights.from_hf(model.model.layers[i], model.config, i)
                for i in range(n - cfg.device_tail_layers, n)]
        return cls(model.model.norm.weight.detach(), model.model.norm.variance_epsilon,
                   model.lm_head.weight.detach(), getattr(model.lm_head, "bias", None),
                   model.model.rotary_emb, tail)

    def replay_tail(self, h: torch.Tensor, lengths) -> torch.Tensor:
        """The public tail layers on the hand-off, M = 0 (unknown to the attacker), in
        ``h``'s dtype."""
        segs = segments(lengths)
        x = h
        for lw in self.tail:
            lw = _cast(lw, h.dtype)
            hn = rms_norm(x, lw.ln1, lw.eps)
            q, k, v = (lw.base(t, hn) for t in ("q", "k", "v"))
            x = finish_layer(lw, x, attention(lw, q, k, v, segs, self.rotary, x))
        return x


def _cast(lw: LayerWeights, dtype) -> LayerWeights:
    return replace(lw, **{f.name: getattr(lw, f.name).to(dtype) for f in fields(lw)
                          if isinstance(getattr(lw, f.name), torch.Tensor)})


def _gmres(op, b: torch.Tensor, tol: float = 1e-6, max_iter: int = 160) -> tuple[torch.Tensor, int]:
    """Solve ``op(x) = b`` (op linear on tensors shaped like b) by GMRES without restarts
    (the tail Jacobians are poorly conditioned: restarts stall), Gram-Schmidt done twice
    as matrix products. (x, iterations)."""
    bn = float(b.norm())
    if bn == 0.0:
        return torch.zeros_like(b), 0
    V = torch.zeros(max_iter + 1, b.numel(), dtype=b.dtype)
    V[0] = b.reshape(-1) / bn
    H = torch.zeros(max_iter + 1, max_iter, dtype=torch.float64)
    e1 = torch.zeros(max_iter + 1, dtype=torch.float64)
    e1[0] = bn
    y, j = None, 0
    for j in range(max_iter):
        w = op(V[j].view_as(b)).reshape(-1)
        for _ in range(2):
            c = V[: j + 1] @ w
            w = w - c @ V[: j + 1]
            H[: j + 1, j] += c.double()
        H[j + 1, j] = float(w.norm())
        y = torch.linalg.lstsq(H[: j + 2, : j + 1], e1[: j + 2, None]).solution[:, 0]
        res = float((H[: j + 2, : j + 1] @ y - e1[: j + 2]).norm())
        if res <= tol * bn or H[j + 1, j] < 1e-14 * bn:
            break
        V[j + 1] = w / H[j + 1, j]
    return (y.to(b.dtype) @ V[: j + 1]).view_as(b), j + 1


def _decode(head: PublicHead, xs: torch.Tensor, D: torch.Tensor, denominator: float | None = None):
    """The label per row that best explains ``D`` = dL/dx (x the final norm's input), all
    of the vocabulary scored in closed form, and the loss's denominator used (``None``:
    fitted). Float64 throughout."""
    xs, D = xs.double(), D.double()
    w, W = head.norm_w.double(), head.lm_head.double()
    b = None if head.lm_bias is None else head.lm_bias.double()
    n, d = xs.shape
    s = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + head.norm_eps)          # [n, 1]
    x2 = xs.pow(2).sum(-1, keepdim=True)

    def P(v):   # J^T v' = P(w * v'): J = s diag(w) (I - s^2 x x^T / d), J^T = s (I - ...) diag(w)
        return s * v - s ** 3 * xs * (xs * v).sum(-1, keepdim=True) / d

    p = torch.softmax(F.linear(w * xs * s, W, b), dim=-1)                      # [n, V]
    q = P(w * (p @ W))                                                         # J^T W^T p
    Aw = W * w                                                                 # a_y = w * W_y
    a2 = Aw.pow(2).sum(-1)                                                     # [V]
    xa = xs @ Aw.T                                                             # [n, V]
    Pa2 = s ** 2 * a2 - 2 * s ** 4 * xa ** 2 / d + s ** 6 * xa ** 2 * x2 / d ** 2   # |J^T W_y|^2
    # pass 1, scale-free: cosine between D_t and v_y = q_t - J^T W_y
    dv = (D * q).sum(-1, keepdim=True) - P(D) @ Aw.T
    v2 = (q * q).sum(-1, keepdim=True) - 2 * P(q) @ Aw.T + Pa2
    y = (dv / v2.clamp_min(1e-300).sqrt()).argmax(-1)
    # the loss's scale: D ~ v / N, fitted by least squares on pass 1's choice
    fit = float(dv.gather(1, y[:, None]).sum() / D.pow(2).sum().clamp_min(1e-300))
    c = fit if denominator is None else float(denominator)
    # pass 2: distance between c D_t and v_y
    e = c * D - q
    dist = 2 * P(e) @ Aw.T + Pa2                                               # + |e|^2, same for all y
    return dist.argmin(-1), fit


def recover_labels(head: PublicHead, view: CloudView, denominator: float | str | None = "rows",
                   solve_iterations: int = SOLVE_ITERATIONS) -> tuple[torch.Tensor, dict]:
    """The attacker's guess of every label of a step, from what the cloud saw.

    ``denominator``: the loss's 1/N scale. "rows" (default): N = the step's row count, the
    label-token count when every position carries a label as in the tuning loop's
    batches (the cloud knows the rows); None: fitted from the gradient; or a number.
    ``solve_iterations``: GMRES iterations of the tail solve (a truncated solve is a
    regularisation: it gains when the device's tail M differs from the replay's zero)."""
    h = view.handoff.detach().double()
    g = view.grad.detach().double()
    info = {}
    if head.tail:
        with torch.enable_grad():
            hl = h.clone().requires_grad_(True)
            x = head.replay_tail(hl, view.lengths)

            def op(v):
                (out,) = torch.autograd.grad(x, hl, v, retain_graph=True)
                return out
            D, info["solve_iterations"] = _gmres(op, g, max_iter=solve_iterations)
            info["solve_residual"] = float((op(D) - g).norm() / g.norm().clamp_min(1e-300))
        x = x.detach()
    else:
        x, D = h, g
    n = float(h.shape[0]) if denominator == "rows" else denominator
    y, info["fitted_denominator"] = _decode(head, x, D, n)
    return y, info


# ---------------------------------------------------------------- the harness
def _batches(sequences, batch: int):
    for i in range(0, len(sequences), batch):
        yield sequences[i: i + batch]


def record_tuning(backbone, cfg: PrivateLoRAConfig, sequences, *, private_m: bool, seed: int = 0,
                  scale: float = TUNED_SCALE, batch: int = 8, adapter=None) -> tuple[RecordingTrainer, list[torch.Tensor]]:
    """Real split training steps (``batch`` sequences each; inputs ``s[:-1]``, labels
    ``s[1:]``) through a recording cloud: (the recording, the true labels of each step).
    ``adapter``: the victim's own ``PrivateAdapter`` (then ``private_m`` and ``scale`` are
    not used)."""
    from privatelora.api import build_split
    from privatelora.training.device import TrainStep, run_step

    seqs = [list(map(int, s)) for s in sequences if len(s) >= 2]
    if not seqs:
        raise ValueError("the attack needs sequences of at least 2 tokens")
    split = build_split(cfg=cfg, backbone=backbone, adapter=adapter)
    if private_m and adapter is None:
        split.adapter.randomize_(seed, scale=scale)
    rec = RecordingTrainer(CloudTrainer(split.cloud))
    truth = []
    for k, chunk in enumerate(_batches(seqs, batch)):
        inputs, labels = [s[:-1] for s in chunk], [s[1:] for s in chunk]
        run_step(rec, TrainStep(split.device, 1 + k, inputs, labels))
        truth.append(torch.tensor([t for s in labels for t in s]))
    for M in split.adapter.parameters():
        M.grad = None
    return rec, truth


def label_attack(backbone, cfg: PrivateLoRAConfig, sequences: list[list[int]], *, private_m: bool,
                 seed: int = 0, public_ids=None, scale: float = TUNED_SCALE, batch: int = 8, adapter=None) -> dict:
    """Split tuning steps over ``sequences`` (inputs ``s[:-1]``, labels ``s[1:]``, ``batch``
    sequences a step) with a recording cloud, then the label attack from its recording.

    ``private_m``: M random (``randomize_(seed, scale)``: entries of std scale/sqrt(rank);
    0.7 is the size of an adapter tuned with ``bench tuning``'s defaults) or zero. ``public_ids``: a public text's token ids whose most frequent token is the
    no-traffic guess (default: the most frequent label itself, an upper bound of that
    guess). Returns ``recovered`` (fraction of label tokens recovered exactly), ``labels``
    (their count), ``baseline``, ``attack``, ``seconds`` and details."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # device and cloud share this process (bench.geometry.one_thread)
    try:
        return _label_attack(backbone, cfg, sequences, private_m=private_m, seed=seed,
                             public_ids=public_ids, scale=scale, batch=batch, adapter=adapter)
    finally:
        torch.set_num_threads(threads)


def _label_attack(backbone, cfg, sequences, *, private_m, seed, public_ids, scale, batch, adapter) -> dict:
    t0 = time.perf_counter()
    rec, truth = record_tuning(backbone, cfg, sequences, private_m=private_m, seed=seed, scale=scale, batch=batch,
                               adapter=adapter)
    seqs = [s for s in sequences if len(s) >= 2]
    t_steps = time.perf_counter() - t0

    head = PublicHead.from_backbone(backbone, cfg)
    views = rec.views()
    assert len(views) == len(truth)
    hits, total, infos = 0, 0, []
    for view, lab in zip(views, truth):
        guess, info = recover_labels(head, view)
        hits += int((guess == lab).sum())
        total += lab.numel()
        infos.append(info)
    labels_all = torch.cat(truth)
    ref = labels_all if public_ids is None else torch.as_tensor(list(public_ids))
    common = int(torch.mode(ref.flatten()).values) if ref.numel() else -1
    out = {"recovered": hits / total, "labels": total,
           "baseline": float((labels_all == common).float().mean()), "attack": ATTACK,
           "device_tail_layers": cfg.device_tail_layers, "private_m": private_m,
           "m_scale": scale if private_m else 0.0, "steps": len(views),
           "lengths": [len(s) - 1 for s in seqs], "messages_received": rec.kinds(),
           "fitted_denominator": [i["fitted_denominator"] for i in infos],
           "seconds_training": t_steps, "seconds": time.perf_counter() - t0}
    if any("solve_residual" in i for i in infos):
        out["solve_residual"] = max(i.get("solve_residual", 0.0) for i in infos)
        out["solve_iterations"] = max(i.get("solve_iterations", 0) for i in infos)
    return out
