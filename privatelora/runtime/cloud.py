"""The cloud part: frozen decoder layers, shared A and B, per-session KV caches.

Contract: ``CloudPart.run(requests)`` executes one stage for many sessions at once. A
request is a ``Handoff`` (hidden states entering the first cloud layer) or a ``Reply``
(the device's ``M A h`` for the adapted layer the session waits on). Sessions may be at
different layers and positions, prefill chunks, decode tokens and speculative verify
chains mixed: requests are grouped by layer and each group runs as one flat batch. A
stage is a *segment*: after an adapted layer (or the hand-off) the cloud runs the
unadapted layers that follow back to back, with no round trip, up to the next adapted
layer. The answer holds, per request, the session's next ``Activations`` (``A h`` of its
next adapted layer), a ``Handoff`` back to the device after the last cloud layer, or an
``Error`` that affects that session alone.

A ``Handoff`` whose ``start`` lies before the session's next position rewinds it: the
session's KV caches are truncated to ``start`` first (the device rejected speculative
tokens). A ``start`` beyond the session's own cache is refused; a rewind touches nothing
but that session's caches.

A stage that raises (out of memory while a cache grows, a kernel failure) is isolated:
every session it touched is restored to where it stood before the stage (caches cut back
to their lengths, positions and in-flight residuals as they were) and run again alone;
a session whose request fails alone too gets ``Error("stage_failed")``, the others their
answers, exactly as if the stage had not failed. ``fault_hook(layer, sessions)``, if set,
is called before each layer's batched work and each ``A h`` (tests inject failures with it).

The cloud holds no private tensor: no M, no token ids, no logits (test: every state name
is free of the private prefix). Its only per-session state is the KV cache and the
in-flight residual of the stage it waits on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from privatelora.config import PrivateLoRAConfig
from privatelora.model.block import KVCache, LayerWeights, Segment, attend, finish_layer, rms_norm, rope_tables
from privatelora.model.projections import PublicProjections, hf_weights
from privatelora.runtime.messages import Activations, Error, Handoff, Reply


@dataclass
class _Pending:
    layer: int
    start: int
    x: torch.Tensor                          # residual stream entering ``layer`` [n, d]
    want_all: bool
    normed: torch.Tensor | None = None       # input norm of x, once emitted
    base: dict | None = None                 # W h + b precomputed while the reply travels


@dataclass
class _Session:
    caches: dict = field(default_factory=dict)   # layer -> KVCache
    next_pos: int = 0
    pending: _Pending | None = None


@dataclass
class StageStats:
    stages: int = 0          # batched layer executions
    tokens: int = 0          # tokens over those executions
    sessions: int = 0        # session-stages over those executions

    @property
    def mean_batch_sessions(self) -> float:
        return self.sessions / self.stages if self.stages else 0.0


class CloudPart:
    def __init__(self, backbone, cfg: PrivateLoRAConfig, max_tokens_per_request: int = 4096):
        model = backbone.model
        self.model_config = model.config
        self.cfg = cfg
        self.device = model.device       # incoming activations are moved here (GPU when there is one)
        self.layer_ids = list(cfg.cloud_layers(backbone.n_layers))
        self.exchange_ids = list(cfg.exchange_layers(backbone.n_layers))   # adapted: one round trip each
        self._adapted = set(self.exchange_ids)
        self.layers = {i: LayerWeights.from_hf(model.model.layers[i], model.config, i) for i in self.layer_ids}
        self.next_layer = dict(zip(self.layer_ids, self.layer_ids[1:]))
        self.proj = PublicProjections(model.config, cfg, self.exchange_ids, device=model.device, weights=hf_weights(model))
        self.rotary = model.model.rotary_emb
        self.hidden = model.config.hidden_size
        self.max_positions = model.config.max_position_embeddings
        self.max_tokens_per_request = max_tokens_per_request
        self.sessions: dict[int, _Session] = {}
        self.stats = StageStats()
        self.fault_hook = None                   # tests: called as fault_hook(layer, session ids)

    # ---- session lifecycle -------------------------------------------------------------
    def open(self, session: int) -> None:
        if session in self.sessions:
            raise ValueError(f"session {session} is already open")
        self.sessions[session] = _Session()

    def close(self, session: int) -> None:
        """Forget the session and free its KV cache (idempotent)."""
        self.sessions.pop(session, None)

    def kv_bytes(self) -> int:
        # may be called from another thread than the one running stages (metrics, stats):
        # iterate over snapshots, taken atomically under the GIL, not the live dicts
        return sum(c.nbytes() for s in list(self.sessions.values()) for c in list(s.caches.values()))

    # ---- one stage for many sessions ---------------------------------------------------
    @torch.no_grad()
    def run(self, requests: list) -> list:
        saved = self._snapshot(requests)
        try:
            return self._run(requests)
        except Exception as e:
            if len(requests) == 1:
                self._restore(saved)
                return [Error(getattr(requests[0], "session", -1), "stage_failed",
                              f"the stage failed: {type(e).__name__}")]
        self._restore(saved)        # the batch failed: each request alone, so it ends only its own session
        out = []
        for req in requests:
            out.extend(self.run([req]))
        return out

    def _snapshot(self, requests: list) -> dict:
        saved = {}
        for req in requests:
            s = self.sessions.get(getattr(req, "session", None))
            if s is not None:
                saved[req.session] = (s, s.next_pos, s.pending, {l: c.length for l, c in s.caches.items()})
        return saved

    @staticmethod
    def _restore(saved: dict) -> None:
        for s, next_pos, pending, lengths in saved.values():
            for layer, c in s.caches.items():   # a rewind the stage made is redone when it runs again
                c.truncate(lengths.get(layer, 0))
            s.next_pos, s.pending = next_pos, pending

    def _run(self, requests: list) -> list:
        out: list = []
        seen: set[int] = set()
        ok = []
        for req in requests:
            err = self._validate(req, seen)
            if err is not None:
                out.append(err)
                continue
            seen.add(req.session)
            ok.append(req)
        absorb: dict[int, list] = defaultdict(list)   # layer -> [(session id, m tuple)]
        moving: list[int] = []                        # sessions entering a cloud layer
        for req in self._finite(ok, out):
            s = self.sessions[req.session]
            if isinstance(req, Handoff):
                n = req.hidden.shape[0]
                if req.start < s.next_pos:            # a rewind: drop the rejected positions
                    for c in s.caches.values():
                        c.truncate(req.start)
                s.pending = _Pending(self.layer_ids[0], req.start, req.hidden.to(self.device, self._dtype), req.want_all)
                s.next_pos = req.start + n
                moving.append(req.session)
            else:
                absorb[req.layer].append((req.session, req.m))
        for layer in sorted(absorb):
            self._absorb(layer, absorb[layer], out, moving)
        self._advance(moving, out)
        return out

    def prepare(self) -> None:
        """Compute the frozen ``W h + b`` of every session waiting on a reply.

        Call while replies travel: it overlaps the round trip with the frozen path.
        """
        groups: dict[int, list[_Pending]] = defaultdict(list)
        for s in list(self.sessions.values()):     # open() may insert from the event loop's thread
            p = s.pending
            if p is not None and p.normed is not None and p.base is None:
                groups[p.layer].append(p)
        with torch.no_grad():
            for layer, ps in groups.items():
                lw = self.layers[layer]
                h = torch.cat([p.normed for p in ps])
                base = {t: lw.base(t, h) for t in ("q", "k", "v")}
                off = 0
                for p in ps:
                    n = p.normed.shape[0]
                    p.base = {t: v[off:off + n] for t, v in base.items()}
                    off += n

    # ---- internals ---------------------------------------------------------------------
    @property
    def _dtype(self):
        return self.cfg.torch_dtype

    def _validate(self, req, seen) -> Error | None:
        sid = getattr(req, "session", -1)
        if not isinstance(req, (Handoff, Reply)):
            return Error(sid, "bad_request", f"the cloud accepts Handoff or Reply, not {type(req).__name__}")
        s = self.sessions.get(sid)
        if s is None:
            return Error(sid, "unknown_session", f"session {sid} is not open")
        if sid in seen:
            return Error(sid, "duplicate", "two requests for one session in one stage")
        r = self.cfg.rank
        if isinstance(req, Handoff):
            h = req.hidden
            if s.pending is not None:
                return Error(sid, "out_of_order", f"session waits for the reply of layer {s.pending.layer}")
            if type(req.start) is not int or not 0 <= req.start <= s.next_pos:
                return Error(sid, "bad_position", f"hand-off starts at {req.start}, beyond the session's "
                                                  f"{s.next_pos} cached positions")
            if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[1] != self.hidden or h.shape[0] < 1:
                return Error(sid, "bad_shape", f"hidden must be [n, {self.hidden}], got {_shape(h)}")
            if h.shape[0] > self.max_tokens_per_request:
                return Error(sid, "too_many_tokens", f"{h.shape[0]} tokens exceed {self.max_tokens_per_request} per request")
            if req.start + h.shape[0] > self.max_positions:
                return Error(sid, "too_long", f"context would reach {req.start + h.shape[0]} > {self.max_positions} positions")
            if not torch.is_floating_point(h):
                return Error(sid, "not_finite", "hidden states must be finite floats")
            return None             # finiteness: checked for the whole stage in _finite
        p = s.pending
        if p is None or p.normed is None or req.layer != p.layer:
            return Error(sid, "out_of_order", f"reply for layer {req.layer} was not asked for")
        n = p.x.shape[0]
        if not isinstance(req.m, tuple) or len(req.m) != len(self.cfg.targets):
            return Error(sid, "bad_shape", f"reply must hold {len(self.cfg.targets)} tensors")
        for m in req.m:
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != (n, r):
                return Error(sid, "bad_shape", f"each reply tensor must be [{n}, {r}], got {_shape(m)}")
            if not torch.is_floating_point(m):
                return Error(sid, "not_finite", "reply values must be finite floats")
        return None

    def _finite(self, reqs: list, out: list) -> list:
        """The requests whose floats are all finite; an ``Error`` for each of the others.

        One check over the whole stage (a torch op costs ~15 us of dispatch here, and a
        stage of 16 decode replies carries 48 tensors); per request only when it fails."""
        tensors = [t for r in reqs for t in ((r.hidden,) if isinstance(r, Handoff) else r.m)]
        if not tensors or bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all()):
            return reqs
        good = []
        for r in reqs:
            if all(bool(torch.isfinite(t).all()) for t in ((r.hidden,) if isinstance(r, Handoff) else r.m)):
                good.append(r)
            else:
                what = "hidden states" if isinstance(r, Handoff) else "reply values"
                out.append(Error(r.session, "not_finite", f"{what} must be finite floats"))
        return good

    def _absorb(self, layer: int, items: list, out: list, moving: list) -> None:
        """Finish adapted ``layer`` for a flat batch of sessions whose replies are in."""
        lw = self.layers[layer]
        sess = [self.sessions[sid] for sid, _ in items]
        pend = [s.pending for s in sess]
        x = torch.cat([p.x for p in pend])
        h = torch.cat([p.normed for p in pend])
        segs = [Segment(p.start, p.x.shape[0]) for p in pend]
        qkv = {}
        for t in ("q", "k", "v"):
            if all(p.base is not None for p in pend):
                qkv[t] = torch.cat([p.base[t] for p in pend])
            else:
                qkv[t] = lw.base(t, h)
        for i, t in enumerate(self.cfg.targets):
            m = torch.cat([mt[i] for _, mt in items]).to(self.device, self._dtype)
            qkv[t] = qkv[t] + m @ self.proj.B[(layer, t)].T
        self._finish(layer, [sid for sid, _ in items], x, qkv, segs, out, moving)

    def _plain(self, layer: int, sids: list[int], out: list, moving: list) -> None:
        """An unadapted layer for a flat batch of sessions: no exchange, ``W h`` alone."""
        lw = self.layers[layer]
        pend = [self.sessions[sid].pending for sid in sids]
        x = torch.cat([p.x for p in pend])
        h = rms_norm(x, lw.ln1, lw.eps)
        qkv = {t: lw.base(t, h) for t in ("q", "k", "v")}
        self._finish(layer, sids, x, qkv, [Segment(p.start, p.x.shape[0]) for p in pend], out, moving)

    def _finish(self, layer, sids, x, qkv, segs, out, moving) -> None:
        """Attention, MLP and residuals of ``layer``; each session moves on to the next cloud
        layer (``moving``) or, after the last one, hands its hidden states back."""
        lw = self.layers[layer]
        if self.fault_hook is not None:
            self.fault_hook(layer, list(sids))
        sess = [self.sessions[sid] for sid in sids]
        caches = [s.caches.setdefault(layer, KVCache()) for s in sess]
        cos, sin = rope_tables(self.rotary, segs, x)
        y = finish_layer(lw, x, attend(lw, qkv["q"], qkv["k"], qkv["v"], segs, caches, cos, sin))
        self.stats.stages += 1
        self.stats.tokens += x.shape[0]
        self.stats.sessions += len(sids)
        off = 0
        nxt = self.next_layer.get(layer)
        for sid, s in zip(sids, sess):
            p = s.pending
            n = p.x.shape[0]
            yi = y[off:off + n]
            off += n
            if nxt is None:
                s.pending = None
                rows = yi if p.want_all else yi[-1:]
                start = p.start if p.want_all else p.start + n - 1
                out.append(Handoff(sid, start, rows.contiguous(), p.want_all))
            else:
                s.pending = _Pending(nxt, p.start, yi, p.want_all)
                moving.append(sid)

    def _advance(self, sids: list[int], out: list) -> None:
        """Move sessions entering cloud layers forward: unadapted layers run back to back
        (earliest layer first, so sessions that meet at a layer share its batch) until each
        session reaches an adapted layer, whose ``A h`` goes to its device, or hands back."""
        waiting: dict[int, list[int]] = defaultdict(list)
        for sid in sids:
            waiting[self.sessions[sid].pending.layer].append(sid)
        emit: list[int] = []
        while waiting:
            layer = min(waiting)
            members = waiting.pop(layer)
            if layer in self._adapted:
                emit.extend(members)
                continue
            moved: list[int] = []
            self._plain(layer, members, out, moved)
            for sid in moved:
                waiting[self.sessions[sid].pending.layer].append(sid)
        self._emit(emit, out)

    def _emit(self, sids: list[int], out: list) -> None:
        """Norm + ``A h`` for every session entering an adapted layer, grouped by layer."""
        groups: dict[int, list[int]] = defaultdict(list)
        for sid in sids:
            groups[self.sessions[sid].pending.layer].append(sid)
        for layer, members in sorted(groups.items()):
            lw = self.layers[layer]
            if self.fault_hook is not None:
                self.fault_hook(layer, list(members))
            pend = [self.sessions[sid].pending for sid in members]
            h = rms_norm(torch.cat([p.x for p in pend]), lw.ln1, lw.eps)
            a = [h @ self.proj.A[(layer, k)].T for k in self.proj.a_keys()]
            off = 0
            for sid, p in zip(members, pend):
                n = p.x.shape[0]
                p.normed = h[off:off + n]
                out.append(Activations(sid, layer, tuple(t[off:off + n].contiguous() for t in a)))
                off += n


def _shape(t) -> str:
    return str(tuple(t.shape)) if hasattr(t, "shape") else type(t).__name__
