"""The cloud part: frozen decoder layers, shared A and B, one paged KV pool.

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

Batches are *flights* (``_Flight``): the sessions that cross a layer together, as one flat
``[T, d]`` tensor. A cohort in lockstep stays one flight from layer to layer, so nothing
is split per session and re-joined inside a step; its KV slot plan and rotary tables are
built once per step, and its ``A h`` is one ``[k, T, r]`` buffer whose row slices are the
sessions' activations. Flights split or merge only when members part or meet.

KV cache (``privatelora.model.kvpool``): one pool per part, in blocks, within a byte
budget (``kv_cache_bytes``; default from the device's memory). A hand-off reserves the
blocks its positions need; a session that does not fit gets ``Error("busy")`` and the
others run. Attention is one batched call per layer over the pool. Closing a session
frees its blocks; sliding-window layers give back blocks no future query can see.

A ``Handoff`` whose ``start`` lies before the session's next position rewinds it: the
session's KV blocks past ``start`` are freed first (the device rejected speculative
tokens). A ``start`` beyond the session's own cache is refused, and so is one a sliding
window already evicted; a rewind touches nothing but that session's blocks.

A stage that raises (a kernel failure, out of memory) is isolated: every session it
touched is restored to where it stood before the stage (KV cut back to its length,
positions and in-flight flights as they were) and run again alone;
a session whose request fails alone too gets ``Error("stage_failed")``, the others their
answers, exactly as if the stage had not failed. ``fault_hook(layer, sessions)``, if set,
is called before each layer's batched work and each ``A h`` (tests inject failures with it).

The cloud holds no private tensor: no M, no token ids, no logits (test: every state name
is free of the private prefix). Its only per-session state is its KV blocks and the
in-flight residual of the stage it waits on.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

import torch

from privatelora.config import PrivateLoRAConfig
from privatelora.model.block import LayerWeights, Segment, finish_layer, rms_norm, rope_tables
from privatelora.model.kvpool import KVFull, KVPool, default_budget, paged_attend
from privatelora.model.projections import PublicProjections, hf_weights
from privatelora.runtime.messages import Activations, Error, Handoff, Reply

PLAN_CACHE = 16      # recent batches' slot plans and rotary tables (a cohort reuses one per step)


@dataclass(eq=False)
class _Flight:
    """Sessions crossing one cloud layer together as one flat batch ``x`` [T, d].

    A flight moves from layer to layer whole (a new flight object per layer, so a failed
    stage can go back to the old one); it is only split or merged when its members part
    (a reply missing from a stage, sessions meeting at a layer)."""
    layer: int
    sids: list
    segs: list                               # Segment of each session, in order
    offs: list                               # first row of each session in x
    want_all: list
    x: torch.Tensor                          # residual stream entering ``layer``
    plan: tuple                              # (kvpool.Plan, cos, sin) of these segments
    normed: torch.Tensor | None = None       # input norm of x, once emitted
    base: dict | None = None                 # W h + b precomputed while the replies travel

    def rows(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t[self.offs[i]:self.offs[i] + self.segs[i].n]


@dataclass
class _Pending:
    flight: _Flight
    i: int                                   # this session's index in the flight

    @property
    def layer(self) -> int:
        return self.flight.layer

    @property
    def normed(self) -> torch.Tensor | None:
        """The session's rows of the layer's input norm, once its ``A h`` went out."""
        f = self.flight
        return None if f.normed is None else f.rows(f.normed, self.i)


@dataclass
class _Session:
    next_pos: int = 0
    epoch: int = 0                           # bumped whenever its block table changes
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
    def __init__(self, backbone, cfg: PrivateLoRAConfig, max_tokens_per_request: int = 4096,
                 kv_cache_bytes: int | None = None, block_size: int | None = None):
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
        self._a_t, self._b_t = _transposed(self.proj, cfg.rank)
        self.rotary = model.model.rotary_emb
        self.hidden = model.config.hidden_size
        self.max_positions = model.config.max_position_embeddings
        self.max_tokens_per_request = max_tokens_per_request
        lw0 = self.layers[self.layer_ids[0]] if self.layer_ids else None
        budget = default_budget(self.device) if kv_cache_bytes is None else int(kv_cache_bytes)
        self.kv = KVPool({i: lw.window for i, lw in self.layers.items()}, n_kv=lw0.n_kv if lw0 else 1,
                         head_dim=lw0.head_dim if lw0 else 1, budget_bytes=budget,
                         dtype=lw0.wq.dtype if lw0 else torch.float32, device=self.device,
                         **({} if block_size is None else {"block_size": block_size}))
        self._plans: dict = {}
        # table epochs are unique over the replica's life, not per session: a session id
        # closed and opened again must never find its former life's plan (its slots may
        # now be another session's blocks)
        self._epochs = itertools.count(1)
        self.sessions: dict[int, _Session] = {}
        self.stats = StageStats()
        self.fault_hook = None                   # tests: called as fault_hook(layer, session ids)

    # ---- session lifecycle -------------------------------------------------------------
    def open(self, session: int) -> None:
        if session in self.sessions:
            raise ValueError(f"session {session} is already open")
        self.sessions[session] = _Session(epoch=next(self._epochs))

    def close(self, session: int) -> None:
        """Forget the session and give its KV blocks back to the pool (idempotent)."""
        if self.sessions.pop(session, None) is not None:
            self.kv.free(session)

    def kv_bytes(self) -> int:
        """Bytes of the KV pool held by sessions (may be called from another thread)."""
        return self.kv.used_bytes

    def kv_length(self, session: int) -> int:
        """Positions the session holds in the KV pool."""
        return self.kv.length(session)

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
            sid = getattr(req, "session", None)
            s = self.sessions.get(sid)
            if s is not None:
                saved[sid] = (s, s.next_pos, s.pending, self.kv.length(sid))
        return saved

    def _restore(self, saved: dict) -> None:
        for sid, (s, next_pos, pending, length) in saved.items():
            self.kv.truncate(sid, length)   # a rewind the stage made is redone when it runs again
            s.next_pos, s.pending = next_pos, pending
            s.epoch = next(self._epochs)
            self.kv.forget_mirrors(sid)     # a layer it wrote before failing may be in one

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
        entering: list = []                           # hand-offs entering the first cloud layer
        for req in self._finite(ok, out):
            if isinstance(req, Handoff):
                entering.append(req)
            else:
                absorb[self.sessions[req.session].pending.layer].append((req.session, req.m))
        moving: list[_Flight] = []
        if entering:
            f = self._enter(entering, out)
            if f is not None:
                moving.append(f)
        for layer in sorted(absorb):
            self._absorb(layer, absorb[layer], out, moving)
        self._advance(moving, out)
        return out

    def _enter(self, reqs: list, out: list) -> _Flight | None:
        """Hand-offs: rewind, reserve KV blocks (``busy`` for a session that does not fit),
        and one flight into the first cloud layer."""
        admitted = []
        for req in reqs:
            s, n = self.sessions[req.session], req.hidden.shape[0]
            if req.start < s.next_pos:                # a rewind: drop the rejected positions
                self.kv.truncate(req.session, req.start)
            try:
                self.kv.reserve([(req.session, req.start + n)])
            except KVFull as e:
                out.append(Error(req.session, "busy", f"no room in this replica's KV cache: {e}"))
                continue
            self.kv.advance(req.session, req.start + n)
            self.kv.evict(req.session, req.start)
            s.next_pos, s.epoch = req.start + n, next(self._epochs)
            admitted.append(req)
        if not admitted:
            return None
        # in session order, whatever order the hand-offs came in: a cohort's rows then stand
        # in the same order token after token, as its KV pool mirrors (kvpool.py) require
        admitted.sort(key=lambda r: r.session)
        x = torch.cat([r.hidden for r in admitted]).to(self.device, self._dtype)
        return self._flight(self.layer_ids[0], [r.session for r in admitted],
                            [Segment(r.start, r.hidden.shape[0]) for r in admitted],
                            [r.want_all for r in admitted], x)

    def _flight(self, layer, sids, segs, want_all, x, normed=None, base=None, like=None) -> _Flight:
        """A flight of ``sids`` at ``layer``; ``like``: the flight it continues (same
        members, same order), whose offsets and plan it keeps."""
        if like is not None:
            offs, plan = like.offs, like.plan
        else:
            offs, o = [], 0
            for seg in segs:
                offs.append(o)
                o += seg.n
            plan = self._plan(sids, segs)
        f = _Flight(layer, sids, segs, offs, want_all, x, plan, normed, base)
        for i, sid in enumerate(sids):
            self.sessions[sid].pending = _Pending(f, i)
        return f

    def _plan(self, sids, segs) -> tuple:
        """The batch's KV slot plan and rotary tables, cached: a cohort reuses them at every
        layer of a step (the key changes whenever a member's block table does)."""
        key = tuple((sid, self.sessions[sid].epoch, seg.start, seg.n) for sid, seg in zip(sids, segs))
        hit = self._plans.get(key)
        if hit is None:
            like = torch.empty(0, dtype=self._dtype, device=self.device)
            hit = (self.kv.plan(sids, segs), *rope_tables(self.rotary, segs, like))
            if len(self._plans) >= PLAN_CACHE:
                del self._plans[next(iter(self._plans))]
            self._plans[key] = hit
        return hit

    def _regroup(self, layer: int, sids: list) -> _Flight:
        """One flight of ``sids`` (all pending at ``layer``): theirs as it is when they are
        exactly one whole flight, else their rows gathered from the flights they are in."""
        pend = [self.sessions[sid].pending for sid in sids]
        f0 = pend[0].flight
        if all(p.flight is f0 for p in pend) and len(sids) == len(f0.sids):
            if [p.i for p in pend] == list(range(len(sids))):
                return f0
        def rows(attr):
            ts = [getattr(p.flight, attr) for p in pend]
            if any(t is None for t in ts):
                return None
            return torch.cat([p.flight.rows(t, p.i) for p, t in zip(pend, ts)])
        base = None
        if all(p.flight.base is not None for p in pend):
            base = {t: torch.cat([p.flight.rows(p.flight.base[t], p.i) for p in pend]) for t in ("q", "k", "v")}
        return self._flight(layer, list(sids), [p.flight.segs[p.i] for p in pend],
                            [p.flight.want_all[p.i] for p in pend], rows("x"), rows("normed"), base)

    def prepare(self) -> None:
        """Compute the frozen ``W h + b`` of every flight waiting on its replies.

        Call while replies travel: it overlaps the round trip with the frozen path.
        """
        flights = {}
        for s in list(self.sessions.values()):     # open() may insert from the event loop's thread
            p = s.pending
            if p is not None and p.flight.normed is not None and p.flight.base is None:
                flights[id(p.flight)] = p.flight
        with torch.no_grad():
            for f in flights.values():
                lw = self.layers[f.layer]
                f.base = {t: lw.base(t, f.normed) for t in ("q", "k", "v")}

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
            floor = self.kv.rewind_floor(sid)
            if req.start < floor:
                return Error(sid, "bad_position", f"hand-off starts at {req.start}: the sliding window has "
                                                  f"evicted what a query before {floor} would see")
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
        if p is None or p.flight.normed is None or req.layer != p.layer:
            return Error(sid, "out_of_order", f"reply for layer {req.layer} was not asked for")
        n = p.flight.segs[p.i].n
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
        if not tensors or _all_finite(tensors):
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
        """Finish adapted ``layer`` for the sessions whose replies are in: one flat batch."""
        lw = self.layers[layer]
        m_of = dict(items)
        f = self._regroup(layer, sorted(m_of, key=lambda sid: (id(self.sessions[sid].pending.flight),
                                                               self.sessions[sid].pending.i)))
        h = f.normed
        qkv = dict(f.base) if f.base is not None else {t: lw.base(t, h) for t in ("q", "k", "v")}
        for i, t in enumerate(self.cfg.targets):
            m = torch.cat([m_of[sid][i] for sid in f.sids]).to(self.device, self._dtype)
            qkv[t] = torch.addmm(qkv[t], m, self._b_t[(layer, t)])
        self._finish(f, qkv, out, moving)

    def _plain(self, f: _Flight, out: list, moving: list) -> None:
        """An unadapted layer for a flight: no exchange, ``W h`` alone."""
        lw = self.layers[f.layer]
        h = rms_norm(f.x, lw.ln1, lw.eps)
        self._finish(f, {t: lw.base(t, h) for t in ("q", "k", "v")}, out, moving)

    def _finish(self, f: _Flight, qkv: dict, out: list, moving: list) -> None:
        """Attention, MLP and residuals of the flight's layer; the flight moves on to the
        next cloud layer (``moving``) or, after the last one, each session hands back."""
        lw = self.layers[f.layer]
        if self.fault_hook is not None:
            self.fault_hook(f.layer, list(f.sids))
        plan, cos, sin = f.plan
        y = finish_layer(lw, f.x, paged_attend(lw, self.kv, plan, qkv["q"], qkv["k"], qkv["v"], cos, sin))
        self.stats.stages += 1
        self.stats.tokens += y.shape[0]
        self.stats.sessions += len(f.sids)
        nxt = self.next_layer.get(f.layer)
        if nxt is not None:
            moving.append(self._flight(nxt, f.sids, f.segs, f.want_all, y, like=f))
            return
        for i, sid in enumerate(f.sids):
            self.sessions[sid].pending = None
            seg, yi = f.segs[i], f.rows(y, i)
            if f.want_all[i]:
                out.append(Handoff(sid, seg.start, yi, True))
            else:
                out.append(Handoff(sid, seg.start + seg.n - 1, yi[-1:], False))

    def _advance(self, flights: list, out: list) -> None:
        """Move flights forward: unadapted layers run back to back (earliest layer first,
        flights that meet at a layer merge into one batch) until each reaches an adapted
        layer, whose ``A h`` goes to its devices, or hands back."""
        waiting: dict[int, list] = defaultdict(list)
        for f in flights:
            waiting[f.layer].append(f)
        emit: list = []
        while waiting:
            layer = min(waiting)
            fs = waiting.pop(layer)
            f = fs[0] if len(fs) == 1 else self._regroup(layer, [sid for g in fs for sid in g.sids])
            if layer in self._adapted:
                emit.append(f)
                continue
            moved: list = []
            self._plain(f, out, moved)
            for g in moved:
                waiting[g.layer].append(g)
        for f in emit:
            self._emit(f, out)

    def _emit(self, f: _Flight, out: list) -> None:
        """Norm + ``A h`` of a flight entering an adapted layer: one [k, T, r] buffer whose
        row slices are the sessions' activations (encoded from that one buffer)."""
        lw = self.layers[f.layer]
        if self.fault_hook is not None:
            self.fault_hook(f.layer, list(f.sids))
        h = rms_norm(f.x, lw.ln1, lw.eps)
        keys = self.proj.a_keys()
        buf = (h @ self._a_t[f.layer]).view(h.shape[0], len(keys), self.cfg.rank).transpose(0, 1).contiguous()
        f.normed = h
        k, T = len(keys), buf.shape[1]
        if T == len(f.sids):     # one row each (decode): every [1, r] view in one unbind
            views = buf.view(k * T, 1, buf.shape[2]).unbind(0)
            out.extend(Activations(sid, f.layer, views[i::T]) for i, sid in enumerate(f.sids))
            return
        for sid, part in zip(f.sids, buf.split([seg.n for seg in f.segs], dim=1)):
            out.append(Activations(sid, f.layer, part.unbind(0)))


def _all_finite(tensors: list) -> bool:
    """Whether all of ``tensors`` is finite. Views of a few small bases (a bundle's replies,
    decoded into one tensor) are checked through them: anything else non-finite in a base
    only sends the caller to its per-request check."""
    bases, size = {}, 0
    for t in tensors:
        b = t._base if t._base is not None else t
        if b.dtype != t.dtype:          # a view of other bits: checked as itself
            b = t
        bases[id(b)] = b
        size += t.numel()
    if len(bases) <= 4 and sum(b.numel() for b in bases.values()) <= 2 * size:
        return all(bool(torch.isfinite(b).all()) for b in bases.values())
    return bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all())


def _transposed(proj, rank: int) -> tuple[dict, dict]:
    """The public projections stored as the stage multiplies by them: per layer every A
    side by side, transposed (``[d, k * r]``: one product ``h @ A^T`` for all targets), and
    each B transposed (``[r, out]``: ``addmm``). On a CPU a small batch times a weight
    stored this way runs 2-3x faster than against ``[out, in]``. ``proj``'s own tables
    become views of these: the same values, no second copy."""
    a_t, b_t, keys = {}, {}, proj.a_keys()
    for layer in sorted({layer for layer, _ in proj.A}):
        a_t[layer] = torch.cat([proj.A[(layer, k)] for k in keys]).T.contiguous()
        for j, k in enumerate(keys):
            proj.A[(layer, k)] = a_t[layer][:, j * rank:(j + 1) * rank].T
    for key, b in list(proj.B.items()):
        b_t[key] = b.T.contiguous()
        proj.B[key] = b_t[key].T
    return a_t, b_t


def _shape(t) -> str:
    return str(tuple(t.shape)) if hasattr(t, "shape") else type(t).__name__
