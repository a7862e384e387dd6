"""The device part: embedding, device-side layers, LM head and the private M.

Contract: a ``DeviceSession`` turns token ids into the ``Handoff`` that enters the cloud
(embedding, then any ``device_head_layers``), answers each ``Activations`` with the
``Reply`` ``M a`` (the only thing the device computes per cloud layer), and turns the
cloud's final ``Handoff`` into logits (``device_tail_layers``, final norm, LM head).
Token ids, logits and M stay here; the session counts every number it sends and receives.
"""

from __future__ import annotations

import secrets

import torch
import torch.nn.functional as F

from privatelora.config import PrivateLoRAConfig, PrivateLoRAError
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.block import KVCache, LayerWeights, Segment, attend, finish_layer, rms_norm, rope_tables
from privatelora.model.projections import PublicProjections, hf_weights
from privatelora.privacy import mark_private, register_private_tokens
from privatelora.runtime.accounting import CommStats
from privatelora.runtime.messages import Activations, Handoff, Reply


class DevicePart:
    """What one device holds for a backbone: public weights it needs plus its adapter."""

    def __init__(self, backbone, cfg: PrivateLoRAConfig, adapter: PrivateAdapter | None = None,
                 cut_noise: float = 0.0):
        model = backbone.model
        if not 0.0 <= cut_noise < float("inf"):
            raise PrivateLoRAError(f"cut_noise must be a finite number >= 0, not {cut_noise!r}")
        # a defence (``bench privacy`` measures its price): Gaussian noise of cut_noise times
        # each row's RMS added to the hand-off up, from a generator the cloud cannot seed
        self.cut_noise = float(cut_noise)
        self._noise = torch.Generator(device=model.device).manual_seed(secrets.randbits(63))
        self.cfg = cfg
        self.model_config = model.config
        self.tokenizer = backbone.tokenizer
        n = backbone.n_layers
        self.cloud_layer_ids = list(cfg.cloud_layers(n))
        self.exchange_ids = list(cfg.exchange_layers(n))     # adapted cloud layers: one round trip each
        self.adapted = set(cfg.adapted(n))
        self.head_ids = list(range(cfg.device_head_layers))
        self.tail_ids = list(range(n - cfg.device_tail_layers, n))
        local = self.head_ids + self.tail_ids
        self.local = {i: LayerWeights.from_hf(model.model.layers[i], model.config, i) for i in local}
        self.proj = PublicProjections(model.config, cfg, [i for i in local if i in self.adapted], device=model.device,
                                      weights=hf_weights(model))   # svd: from its own layers only
        self.rotary = model.model.rotary_emb
        self.embed = model.model.embed_tokens.weight
        self.norm_w = model.model.norm.weight
        self.norm_eps = model.model.norm.variance_epsilon
        self.lm_head = model.lm_head.weight
        self.lm_bias = getattr(model.lm_head, "bias", None)
        self.vocab = self.embed.shape[0]
        self.adapter = adapter if adapter is not None else PrivateAdapter(cfg, n, backbone.fingerprint, device=model.device)
        if self.adapter.cfg.rank != cfg.rank or self.adapter.cfg.targets != cfg.targets \
                or self.adapter.cfg.shared_a != cfg.shared_a or self.adapter.cfg.seed != cfg.seed \
                or self.adapter.cfg.projection != cfg.projection or set(self.adapter.layers) != self.adapted:
            raise PrivateLoRAError("adapter config does not match the split config "
                                   "(rank, targets, shared_a, seed, projection, adapted layers)")

    def session(self, session_id: int, bytes_per_number: int | None = None) -> "DeviceSession":
        """A new conversation. Bytes are counted at ``bytes_per_number`` (default: the
        compute dtype's size; the wire codec may send fewer)."""
        return DeviceSession(self, session_id, bytes_per_number or self.cfg.torch_dtype.itemsize)

    # ---- pieces shared by sessions -----------------------------------------------------
    def m_of(self, layer: int, a: tuple) -> tuple:
        """The reply ``M_t a`` for every target; ``a`` holds one tensor per A."""
        akeys = ("shared",) if self.cfg.shared_a else self.cfg.targets
        dt = self.cfg.torch_dtype
        if torch.is_grad_enabled():   # autograd through M: the plain products, no cached views
            by_key = dict(zip(akeys, a))
            return tuple(by_key[self.proj.a_key(t)].to(dt) @ self.adapter.get(layer, t).T
                         for t in self.cfg.targets)
        return tuple((a[i] if a[i].dtype is dt else a[i].to(dt)) @ mt for i, mt in self.m_plan(layer))

    def m_plan(self, layer: int) -> tuple:
        """Per target of ``layer``: (which ``a`` it multiplies, its M^T), made once per layer
        (M^T is a detached view of the adapter's M: in-place changes of M show through)."""
        plans = self.__dict__.setdefault("_m_plans", {})
        plan = plans.get(layer)
        if plan is None or plan[0] is not self.adapter:
            akeys = ("shared",) if self.cfg.shared_a else self.cfg.targets
            where = {k: i for i, k in enumerate(akeys)}
            plan = (self.adapter, tuple((where[self.proj.a_key(t)], self.adapter.get(layer, t).detach().T)
                                        for t in self.cfg.targets))
            plans[layer] = plan
        return plan[1]

    def local_layer(self, i: int, x: torch.Tensor, seg: Segment, cache: KVCache) -> torch.Tensor:
        """A whole layer on the device (head/tail layers): M applied locally if it is adapted."""
        lw = self.local[i]
        h = rms_norm(x, lw.ln1, lw.eps)
        qkv = {t: lw.base(t, h) for t in ("q", "k", "v")}
        for t in (self.cfg.targets if i in self.adapted else ()):
            a = h @ self.proj.A[(i, self.proj.a_key(t))].T
            qkv[t] = qkv[t] + (a @ self.adapter.get(i, t).T) @ self.proj.B[(i, t)].T
        cos, sin = rope_tables(self.rotary, [seg], x)
        return finish_layer(lw, x, attend(lw, qkv["q"], qkv["k"], qkv["v"], [seg], [cache], cos, sin))

    def add_cut_noise(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cut_noise:
            return x
        rms = x.float().pow(2).mean(-1, keepdim=True).sqrt()
        noise = torch.randn(x.shape, generator=self._noise, device=x.device, dtype=torch.float32)
        return (x.float() + self.cut_noise * rms * noise).to(x.dtype)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.norm_w, self.norm_eps)
        return mark_private(F.linear(h, self.lm_head, self.lm_bias))


class DeviceSession:
    """One user's conversation state on the device."""

    def __init__(self, part: DevicePart, session_id: int, bytes_per_number: int = 4):
        self.part = part
        self.session = session_id
        self.pos = 0                                    # tokens handed to the cloud so far
        self.caches = {i: KVCache() for i in part.local}
        self.comm = CommStats(bytes_per_number=bytes_per_number)
        self._inflight: int | None = None               # tokens of the step in flight
        self._private_ids: list[torch.Tensor] = []      # every id handed in, registered by value
        self._primed: tuple | None = None               # (hand-off, its logits) from ``logits_many``

    def hand_in(self, ids, want_all: bool = False) -> Handoff:
        """Embed ``ids`` (and run the head layers) into the hand-off that enters the cloud."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.part.embed.device).reshape(-1)
        if ids.numel() == 0:
            raise PrivateLoRAError("nothing to hand in: no tokens")
        if self._inflight is not None:
            raise PrivateLoRAError("a step is already in flight for this session")
        if int(ids.min()) < 0 or int(ids.max()) >= self.part.vocab:
            raise PrivateLoRAError(f"token id out of range for a vocabulary of {self.part.vocab}")
        # tagged, and registered by value (privacy.py) for as long as the session lives
        self._private_ids.append(register_private_tokens(mark_private(ids)))
        x = F.embedding(ids, self.part.embed)
        seg = Segment(self.pos, ids.numel())
        with torch.no_grad():
            for i in self.part.head_ids:
                x = self.part.local_layer(i, x, seg, self.caches[i])
            x = self.part.add_cut_noise(x)
        self._inflight = ids.numel()
        self.comm.tokens += ids.numel()
        self.comm.handoff_to_cloud += x.numel()
        msg = Handoff(self.session, self.pos, x, want_all or bool(self.part.tail_ids))
        self.pos += ids.numel()
        return msg

    def rewind(self, pos: int) -> None:
        """Forget the tokens handed in from ``pos`` on (drafted tokens the target rejected):
        the local layers' caches are truncated here, the cloud's by the next hand-off, whose
        ``start`` is ``pos``."""
        if not 0 <= pos <= self.pos:
            raise PrivateLoRAError(f"cannot rewind to {pos}: the session holds {self.pos} positions")
        if self._inflight is not None:
            raise PrivateLoRAError("cannot rewind while a step is in flight")
        for c in self.caches.values():
            c.truncate(pos)
        self.pos = pos

    def reply(self, act: Activations) -> Reply:
        self.comm.to_device[act.layer] += sum(t.numel() for t in act.a)
        with torch.no_grad():
            m = self.part.m_of(act.layer, act.a)
        self.comm.to_cloud[act.layer] += sum(t.numel() for t in m)
        return Reply(self.session, act.layer, m)

    def logits(self, back: Handoff, all_rows: bool = False) -> torch.Tensor:
        """Logits [rows, vocab] from the cloud's final hand-off (last row unless ``all_rows``);
        the ones ``logits_many`` computed for this very hand-off when there are."""
        self.comm.handoff_to_device += back.hidden.numel()
        primed, self._primed = self._primed, None
        if primed is not None and primed[0] is back:
            self._inflight = None
            return mark_private(primed[1] if all_rows else primed[1][-1:])
        x = back.hidden.to(self.part.cfg.torch_dtype)
        with torch.no_grad():
            if self.part.tail_ids:
                seg = Segment(back.start, x.shape[0])
                for i in self.part.tail_ids:
                    x = self.part.local_layer(i, x, seg, self.caches[i])
            if not all_rows:
                x = x[-1:]
            self._inflight = None
            return self.part.head_logits(x)


# ---- several sessions at once (an edge host carrying many users) ---------------------------
@torch.no_grad()
def replies_many(items: list, stacks: dict | None = None) -> list:
    """``session.reply(act)`` for several ``(session, Activations)``: per layer and shape,
    every session's ``M_t a`` in one batched product (``bmm`` of the stacked ``a`` and the
    stacked M^T). Per item its ``Reply``, with the same accounting as ``reply``, or the
    exception ``reply`` raises for it alone (a group that cannot be stacked is answered
    session by session). ``stacks``: the caller's cache of stacked M^T (private copies,
    tagged so; rebuilt when an M changes in place)."""
    out: list = [None] * len(items)
    groups: dict = {}
    for j, (sess, act) in enumerate(items):
        a0 = act.a[0] if isinstance(act.a, tuple) and act.a and isinstance(act.a[0], torch.Tensor) else None
        cfg = sess.part.cfg
        key = None if a0 is None or a0.dim() != 2 else \
            (act.layer, len(act.a), tuple(a0.shape), cfg.torch_dtype, cfg.targets, cfg.shared_a)
        groups.setdefault(key, []).append(j)
    for key, js in groups.items():
        if key is not None and len(js) > 1:
            try:
                _replies_stacked(key, [items[j] for j in js], out, js, {} if stacks is None else stacks)
                continue
            except Exception:    # malformed activations, say: each session meets its own error
                pass
        for j in js:
            try:
                out[j] = items[j][0].reply(items[j][1])
            except Exception as e:
                out[j] = e
    return out


def _replies_stacked(key: tuple, group: list, out: list, where: list, stacks: dict) -> None:
    layer, k, (n, r), dt = key[:4]
    plans = [sess.part.m_plan(layer) for sess, _ in group]
    idx = [i for i, _ in plans[0]]
    G, t = len(group), len(idx)
    a = torch.stack([x for _, act in group for x in act.a])                  # [G * k, n, r]
    if idx != list(range(k)):
        a = a.view(G, k, n, r)[:, idx].reshape(G * t, n, r)
    name = (layer, tuple(map(id, plans)))
    versions = tuple(p[0][1]._version for p in plans)       # an adapter's M's share one counter
    hit = stacks.get(name)
    if hit is None or hit[1] != versions:
        if len(stacks) >= 1024:
            stacks.clear()
        hit = stacks[name] = (plans, versions, mark_private(torch.stack([mt for p in plans for _, mt in p])))
    views = torch.bmm(a if a.dtype is dt else a.to(dt), hit[2]).unbind(0)   # [G * t, n, r]
    sent, back = k * n * r, t * n * r
    for g, ((sess, act), j) in enumerate(zip(group, where)):
        sess.comm.to_device[layer] += sent
        sess.comm.to_cloud[layer] += back
        out[j] = Reply(sess.session, layer, views[g * t:(g + 1) * t])


@torch.no_grad()
def logits_many(items: list) -> None:
    """Compute the final norm and LM head of several sessions' hand-offs ``(session,
    handoff)`` in one product per shared head (one read of the head's weights for all of
    an edge host's users), for each session's next ``logits(handoff)`` to use. Sessions
    whose part runs device tail layers are left to ``logits``."""
    groups: dict = {}
    for sess, back in items:
        part = sess.part
        if not part.tail_ids:
            key = (id(part.lm_head), id(part.lm_bias), id(part.norm_w), part.cfg.torch_dtype)
            groups.setdefault(key, []).append((sess, back))
    for group in groups.values():
        part = group[0][0].part
        x = torch.cat([back.hidden for _, back in group]).to(part.cfg.torch_dtype)
        logits = part.head_logits(x)
        o = 0
        for sess, back in group:
            n = back.hidden.shape[0]
            sess._primed = (back, logits[o:o + n])
            o += n
