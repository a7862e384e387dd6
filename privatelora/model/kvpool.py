"""The cloud's KV cache: one paged pool per replica, and batched attention over it.

A ``KVPool`` holds the keys and values of every session in fixed-size blocks
(``block_size`` positions) within a byte budget. Storage, per cloud layer, is
``[blocks * block_size, n_kv, head_dim]`` for K and for V: on a GPU the whole budget at
once; on a CPU it starts small and doubles as sessions hold more blocks, never past the
budget (block ids are handed out lowest first and reused first, so it follows the peak). A session owns, per
*window group* (the layers that share one sliding window, or full attention), a block
table: the ids of the blocks that hold its positions in order. All layers of a group use
the same table, so a session costs one block per ``block_size`` positions per group,
whatever the number of layers.

- **Reserving** (``reserve``) is all or nothing: the blocks a stage needs for every
  session of the stage, in every group, or ``KVFull`` and nothing changes. The cloud
  turns that into a clear ``busy`` for the session that did not fit.
- **Truncating** (``truncate``: a rewind, a failed stage) frees the blocks past the new
  length; **closing** (``free``) frees them all.
- **Sliding windows evict**: in a group whose layers slide over ``window`` positions,
  blocks wholly older than every future query can see (``evict``, called as the session
  advances) go back to the pool. A rewind to before the evicted positions is refused
  by the caller (``first_kept``).
- Block 0 is never handed out and stays zero: padded rows of a batched gather read it,
  so no stale (or uninitialised) value is ever read, and masked rows stay finite.

``paged_attend`` runs one layer's attention for a flat batch of sessions in ONE
``scaled_dot_product_attention`` call: new keys/values are written into their slots, each
session's keys/values are gathered from its blocks into a padded batch, and a boolean
mask applies causality, the sliding window and the padding. Two packings, chosen per
stage by the work they cost: *padded* (``[B, Nmax]`` queries against ``[B, Smax]``
keys: decode steps) and *flat* (all ``T`` queries against all gathered keys with a
block-diagonal mask: one long prefill beside short decodes). ``block.attend`` with one
``KVCache`` per session is the pure-torch reference it is tested against.

**Decode mirrors.** On a CPU the gather is the attention's largest cost: a decode step of
16 sessions at 48 positions copies 6 MB per layer that the plain forward only reads. A
cohort that goes on decoding one row per session per step gathers its keys and values
once per layer into a *mirror* (``[B, Smax + MIRROR_SLACK, n_kv, head_dim]``, the padded
layout the attention reads); the steps after it write only their new rows there (and
into the pool, which stays the source of truth). A mirror is read only while its cohort
(the same sessions, in order) starts exactly where it left off; a session's truncation
or end drops every mirror holding it, a flat step drops its layer's, and it is gathered
again when its slack runs out. It is built only for a cohort seen going on from the step
before at that layer (``remember``), so cohorts whose members change never pay for one.
Mirrors live in the byte budget's room beside the storage: storage growth drops them
first, so ``allocated_bytes`` (storage plus ``mirror_bytes``) never passes the budget; on a
GPU, whose storage takes the whole budget, there are none.

Gauges: ``blocks`` (allocated), ``used``, ``free`` and ``capacity`` (the budget);
``allocated_bytes`` is the bytes of the storage tensors themselves and of the mirrors
(``mirror_bytes``), ``used_bytes`` the share of the storage held by sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from privatelora.model.block import Segment, apply_rope

BLOCK_SIZE = 16
MIRROR_SLACK = 64       # decode steps a mirror takes before it is gathered again
MAX_MIRRORS = 256       # (layer, cohort) mirrors kept at most, least recently used dropped
MIRROR_MIN_BATCH = 2    # a session decoding alone gathers little: no mirror
MAX_SEEN = 4096         # cohorts remembered as gathered once (forgotten all at once past this)
WASTED_MIRRORS = 64     # mirrors dropped unread in a row before building them mostly stops
INITIAL_BLOCKS = 16     # storage allocated up front; it doubles as sessions need more, up to the budget
CPU_SHARE = 0.25        # default budget on a CPU: this share of the machine's memory
GPU_SHARE = 0.90        # ... on a GPU: this share of what is free once the weights are loaded


class KVFull(Exception):
    """The pool has no room for what was asked (the session gets ``busy``)."""


def default_budget(device) -> int:
    """The default byte budget of the pool on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_SHARE)
    try:
        import os
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(total * CPU_SHARE)


@dataclass
class _Table:
    blocks: list = field(default_factory=list)   # block id per block of positions (0: evicted)
    length: int = 0                              # positions held
    first_kept: int = 0                          # positions before this were evicted


@dataclass
class _Group:
    window: int | None
    layers: list                                 # layer indices of this group
    free: list                                   # free block ids (a stack: hot blocks are reused)
    tables: dict = field(default_factory=dict)   # session -> _Table


@dataclass
class _Mirror:
    """One layer's keys and values of a decode cohort (its sessions, in order), laid out
    ``[B, cap, n_kv, head_dim]`` as the attention reads them: built by one gather, then
    each step only writes its new rows. Valid while the cohort's positions go on exactly
    as recorded (``lens``); a session's truncation or end drops every mirror holding it.
    Rows up to ``width`` hold values or zeros; the rest is untouched memory (its pages are
    only taken as steps reach them), zeroed as the cohort's longest row passes it."""
    lens: list
    width: int
    k: torch.Tensor
    v: torch.Tensor
    hits: int = 0

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class KVPool:
    def __init__(self, layers: dict, *, n_kv: int, head_dim: int, budget_bytes: int, dtype=torch.float32,
                 device="cpu", block_size: int = BLOCK_SIZE):
        """``layers``: layer index -> its sliding window (None: full attention)."""
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size, self.n_kv, self.head_dim = block_size, n_kv, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        elem = torch.empty((), dtype=dtype).element_size()
        self.block_bytes = 2 * block_size * n_kv * head_dim * elem * len(layers)    # one block in every layer
        self.capacity = int(budget_bytes // self.block_bytes) if layers else 0     # the budget, in blocks
        if layers and self.capacity < 2:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block: one block of {block_size} "
                             f"positions in {len(layers)} layers takes {self.block_bytes} bytes")
        self.allocated = 0            # blocks the storage holds now (block 0 included); grows up to capacity
        self._mirrors: dict[tuple, _Mirror] = {}  # (layer, cohort) -> its keys/values, gathered once
        self._mirror_keys: dict[int, set] = {}    # session -> the mirrors that hold it
        self.mirror_hits = self.mirror_builds = 0  # steps a layer read a mirror; mirrors gathered
        self._wasted = self._skip = 0  # mirrors dropped unread since the last read; builds still to skip
        self._seen: dict[tuple, list] = {}        # (layer, cohort) gathered once -> its lengths after
        self.budget_bytes = self.capacity * self.block_bytes
        self.k = {i: torch.zeros(0, n_kv, head_dim, dtype=dtype, device=self.device) for i in layers}
        self.v = {i: torch.zeros(0, n_kv, head_dim, dtype=dtype, device=self.device) for i in layers}
        # a GPU takes its budget up front (a doubling there could fail for the copy's peak); a
        # CPU grows as sessions need (a process reserving gigabytes it never touches cannot fork)
        self._grow(self.capacity if self.device.type == "cuda" else min(self.capacity, INITIAL_BLOCKS))
        groups: dict = {}
        for i, w in sorted(layers.items()):
            groups.setdefault(w, []).append(i)
        # every group draws from its own ids 1..blocks-1: a block id names storage in the group's layers only
        self.groups = {w: _Group(w, ls, list(range(self.capacity - 1, 0, -1))) for w, ls in groups.items()}
        self._scratch: dict = {}      # "k"/"v" -> the gather's output buffer, reused by every layer

    def _grow(self, blocks: int) -> None:
        """Storage for ``blocks`` blocks in every layer (the ones held are copied over).
        Ids are handed out lowest first and reused first, so storage follows what sessions
        hold at their peak rather than the budget: memory is only taken when needed."""
        if blocks <= self.allocated:
            return
        while self._mirrors and (blocks * self.block_bytes + self.mirror_bytes) > self.budget_bytes:
            self._forget(next(iter(self._mirrors)))  # mirrors only ever use what blocks do not need
        slots = blocks * self.block_size
        for d in (self.k, self.v):
            for i, old in d.items():
                new = torch.empty(slots, self.n_kv, self.head_dim, dtype=self.dtype, device=self.device)
                new[:old.shape[0]] = old
                if not old.shape[0]:
                    new[:self.block_size].zero_()      # block 0: the zero block padding reads
                d[i] = new
        self.allocated = blocks

    def scratch(self, name: str, rows: int) -> torch.Tensor:
        """A reused ``[rows, n_kv, head_dim]`` buffer for a gather's output. A fresh
        multi-megabyte tensor per layer costs its page faults every time (a gather into
        one took 4-6x as long as into a reused buffer); gauges count it in neither."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty(max(rows, 2 * (0 if buf is None else buf.shape[0])), self.n_kv, self.head_dim,
                              dtype=self.dtype, device=self.device)
            self._scratch[name] = buf
        return buf[:rows]

    # ---- decode mirrors ---------------------------------------------------------------
    def mirror_for(self, layer: int, plan: "Plan") -> _Mirror | None:
        """``layer``'s mirror of ``plan``'s cohort if it holds exactly what the cohort had
        before this step (most recently used last), its rows up to ``plan.smax`` readable."""
        m = self._mirrors.pop((layer, plan.sids), None)
        if m is None:
            return None
        if m.lens != plan.starts or plan.smax > m.k.shape[1]:
            self._forget((layer, plan.sids))    # what it holds is not this cohort's any more
            return None
        self._mirrors[(layer, plan.sids)] = m
        self.mirror_hits += 1
        m.hits += 1
        self._wasted = self._skip = 0
        if plan.smax > m.width:          # rows this step exposes: zeros past each session's length
            m.k[:, m.width:plan.smax].zero_()
            m.v[:, m.width:plan.smax].zero_()
            m.width = plan.smax
        return m

    def _forget(self, key: tuple) -> None:
        self._mirrors.pop(key, None)
        for sid in key[1]:
            keys = self._mirror_keys.get(sid)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._mirror_keys[sid]

    def forget_mirrors(self, session: int) -> None:
        """Its positions were cut, freed or rewritten (a failed stage): no mirror that holds
        them stays."""
        for key in list(self._mirror_keys.get(session, ())):
            self._forget(key)

    def remember(self, layer: int, plan: "Plan", kk: torch.Tensor, vv: torch.Tensor) -> None:
        """Keep a decode cohort's gathered ``[B, smax, n_kv, head_dim]`` keys and values as
        ``layer``'s mirror of it, with room for ``MIRROR_SLACK`` more steps, if the budget
        has that room beside the storage (storage growth drops mirrors first; the least
        recently used go when the room or ``MAX_MIRRORS`` runs out). Only a step of single
        rows of at least ``MIRROR_MIN_BATCH`` sessions builds one (a speculative chain's
        rewinds would leave it stale at once; one session gathers little), and only when
        the same cohort was gathered at this layer the step before, going on from there
        (cohorts whose members change from token to token never pay for one); and after
        ``WASTED_MIRRORS`` mirrors dropped unread (more cohorts taking turns than mirrors
        fit), the next ``WASTED_MIRRORS`` builds are skipped (or until a mirror is read)."""
        B, smax = kk.shape[0], kk.shape[1]
        if B < MIRROR_MIN_BATCH or any(n != 1 for n in plan.ns):
            return
        key = (layer, plan.sids)
        if self._seen.pop(key, None) != plan.starts:   # not yet seen going on from the step before
            if len(self._seen) >= MAX_SEEN:
                self._seen.clear()
            self._seen[key] = plan.lengths
            return
        if self._skip:                        # cohorts take turns faster than mirrors pay
            self._skip -= 1
            return
        need = 2 * B * (smax + MIRROR_SLACK) * self.n_kv * self.head_dim * kk.element_size()
        if self.allocated * self.block_bytes + need > self.budget_bytes:
            return                            # could not fit even alone: keep the others
        while self._mirrors and (len(self._mirrors) >= MAX_MIRRORS or
                                 self.allocated * self.block_bytes + self.mirror_bytes + need > self.budget_bytes):
            victim = next(iter(self._mirrors))
            self._wasted += self._mirrors[victim].hits == 0
            self._forget(victim)
            if self._wasted >= WASTED_MIRRORS:
                self._wasted, self._skip = 0, WASTED_MIRRORS
        shape = (B, smax + MIRROR_SLACK, self.n_kv, self.head_dim)
        k = torch.empty(shape, dtype=kk.dtype, device=kk.device)
        v = torch.empty(shape, dtype=kk.dtype, device=kk.device)
        k[:, :smax] = kk                 # padding rows: the zero block's zeros
        v[:, :smax] = vv
        self._mirrors[key] = _Mirror(plan.lengths, smax, k, v)
        self.mirror_builds += 1
        for sid in plan.sids:
            self._mirror_keys.setdefault(sid, set()).add(key)

    def drop_mirrors(self, layer: int) -> None:
        """``layer``'s mirrors are stale (a step wrote its rows without them)."""
        for key in [key for key in self._mirrors if key[0] == layer]:
            self._forget(key)

    # ---- gauges -----------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        """Bytes the pool holds: the storage tensors themselves (the zero block included) and
        the decode mirrors (``mirror_bytes``)."""
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values()) + self.mirror_bytes

    @property
    def mirror_bytes(self) -> int:
        return sum(m.bytes for m in list(self._mirrors.values()))

    @property
    def used_bytes(self) -> int:
        """Bytes of storage that sessions' blocks hold."""
        per_layer = self.block_bytes // len(self.k) if self.k else 0
        return sum(sum(1 for b in t.blocks if b) * per_layer * len(g.layers) for g in list(self.groups.values())
                   for t in list(g.tables.values()))

    def gauges(self) -> dict:
        """Blocks allocated (the storage, its zero block included), used by sessions (in the
        window group that holds the most) and free (allocated, not used); the budget
        (``capacity``, blocks) and the bytes."""
        used = max((sum(sum(1 for b in t.blocks if b) for t in list(g.tables.values()))
                    for g in list(self.groups.values())), default=0)
        allocated = self.allocated
        return {"blocks": allocated, "used": used, "free": max(0, allocated - 1 - used), "capacity": self.capacity,
                "block_size": self.block_size, "allocated_bytes": self.allocated_bytes,
                "used_bytes": self.used_bytes, "mirror_bytes": self.mirror_bytes}

    # ---- tables -----------------------------------------------------------------------
    def length(self, session: int) -> int:
        g = next(iter(self.groups.values()), None)
        t = g.tables.get(session) if g else None
        return t.length if t else 0

    def rewind_floor(self, session: int) -> int:
        """The earliest position a hand-off may start at: a query there must still see its
        whole sliding window (0 unless a window group evicted)."""
        return max((t.first_kept + g.window - 1 for g in self.groups.values()
                    if g.window is not None and (t := g.tables.get(session)) is not None and t.first_kept),
                   default=0)

    def reserve(self, wants: list) -> None:
        """Make room for ``(session, new_length)`` pairs, all or nothing (``KVFull``)."""
        bs = self.block_size
        top = 0
        for g in self.groups.values():
            need = 0
            for sid, n in wants:
                t = g.tables.get(sid)
                need += max(0, -(-n // bs) - (len(t.blocks) if t else 0))
            if need > len(g.free):
                raise KVFull(f"the KV pool has {len(g.free)} free blocks of {bs} positions, this stage needs "
                             f"{need} ({self.capacity - 1} in all, {self.block_bytes} bytes each)")
            if need:
                top = max(top, max(g.free[-need:]))       # the ids the pops below hand out
        if top >= self.allocated:
            try:
                self._grow(min(self.capacity, max(2 * self.allocated, top + 1)))
            except (MemoryError, RuntimeError) as e:   # the machine has less than the budget said
                raise KVFull(f"the KV pool could not grow to {top + 1} blocks: {type(e).__name__}") from None
        for g in self.groups.values():
            for sid, n in wants:
                t = g.tables.setdefault(sid, _Table())
                while len(t.blocks) * bs < n:
                    t.blocks.append(g.free.pop())

    def advance(self, session: int, length: int) -> None:
        """The session now holds ``length`` positions (after its stage wrote them)."""
        for g in self.groups.values():
            g.tables[session].length = length

    def truncate(self, session: int, length: int) -> None:
        """Forget positions from ``length`` on; blocks past it go back to the pool."""
        bs = self.block_size
        for g in self.groups.values():
            t = g.tables.get(session)
            if t is None:
                continue
            if length < t.length:
                self.forget_mirrors(session)
            t.length = min(t.length, max(0, length))
            keep = -(-t.length // bs)
            while len(t.blocks) > keep:
                b = t.blocks.pop()
                if b:
                    g.free.append(b)

    def evict(self, session: int, next_query: int) -> None:
        """Sliding groups: free the blocks no query from ``next_query`` on can see."""
        bs = self.block_size
        for g in self.groups.values():
            t = g.tables.get(session)
            if g.window is None or t is None:
                continue
            dead = max(0, next_query - g.window + 1 - bs) // bs     # keep one block of slack for rewinds
            for j in range(dead):
                if t.blocks[j]:
                    g.free.append(t.blocks[j])
                    t.blocks[j] = 0
            t.first_kept = max(t.first_kept, dead * bs)

    def free(self, session: int) -> None:
        self.forget_mirrors(session)
        for g in self.groups.values():
            t = g.tables.pop(session, None)
            if t is not None:
                g.free.extend(b for b in reversed(t.blocks) if b)

    # ---- a stage's plan -----------------------------------------------------------------
    def plan(self, sessions: list, segments: list[Segment]) -> "Plan":
        """Slots to write and to gather, and the masks, for one batch; every layer of the
        stage (and of the layers after it, until the lengths change) reuses it."""
        return Plan(self, sessions, segments)


class Plan:
    """Index tensors and masks of one flat batch, per window group (built once per step)."""

    def __init__(self, pool: KVPool, sessions: list, segments: list[Segment]):
        bs, dev = pool.block_size, pool.device
        ns = [s.n for s in segments]
        lengths = [s.start + s.n for s in segments]
        B, T, nmax, smax = len(segments), sum(ns), max(ns), max(lengths)
        # padded packing costs B * nmax * smax scores, flat packing T * sum(lengths)
        self.flat = B > 1 and T * sum(lengths) < B * nmax * smax
        self.groups = {}
        qpos = torch.cat([torch.arange(s.start, s.start + s.n) for s in segments])
        for w, g in pool.groups.items():
            write, read = [], []
            for sid, seg in zip(sessions, segments):
                t = g.tables[sid]
                read.append([t.blocks[p // bs] * bs + p % bs for p in range(seg.start + seg.n)])
                write.extend(read[-1][seg.start:])         # this step's positions: the row's tail
            if self.flat:
                gather = torch.tensor([x for r in read for x in r])
                mask = self._flat_mask(segments, qpos, w)
            else:
                gather = torch.tensor([r + [0] * (smax - len(r)) for r in read])
                mask = self._padded_mask(segments, nmax, smax, w)
            self.groups[w] = (torch.tensor(write, device=dev), gather.to(dev), None if mask is None else mask.to(dev))
        self.sids, self.ns, self.starts, self.lengths = tuple(sessions), ns, [s.start for s in segments], lengths
        if not self.flat:
            self.nmax, self.smax = nmax, smax
            # this step's rows in the padded [B, Smax] layout: where a mirror takes them
            self.new_at = (torch.tensor([b for b, n in enumerate(ns) for _ in range(n)], device=dev),
                           torch.tensor([s.start + j for s in segments for j in range(s.n)], device=dev))
            # where each flat query row goes in the padded [B, nmax] layout (None: no padding)
            rows = [b * nmax + j for b, n in enumerate(ns) for j in range(n)]
            self.q_rows = None if nmax == 1 or all(n == nmax for n in ns) else torch.tensor(rows, device=dev)

    @staticmethod
    def _padded_mask(segments, nmax, smax, window):
        if all(s.n == 1 for s in segments) and len({s.start for s in segments}) == 1 and \
                (window is None or smax <= window):
            return None                                         # a lockstep decode: every key visible
        kpos = torch.arange(smax)[None, None, :]
        qpos = torch.stack([torch.arange(s.start, s.start + nmax) for s in segments])[:, :, None]
        lim = torch.tensor([s.start + s.n for s in segments])[:, None, None]
        mask = (kpos <= qpos) & (kpos < lim)
        if window is not None:
            mask &= kpos > qpos - window
        return mask[:, None]                                    # [B, 1, nmax, smax]

    @staticmethod
    def _flat_mask(segments, qpos, window):
        owner_q = torch.cat([torch.full((s.n,), b) for b, s in enumerate(segments)])
        owner_k = torch.cat([torch.full((s.start + s.n,), b) for b, s in enumerate(segments)])
        kpos = torch.cat([torch.arange(s.start + s.n) for s in segments])
        mask = (owner_q[:, None] == owner_k[None, :]) & (kpos[None, :] <= qpos[:, None])
        if window is not None:
            mask &= kpos[None, :] > qpos[:, None] - window
        return mask                                             # [T, sum(lengths)]


def paged_attend(lw, pool: KVPool, plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary + causal (sliding) attention of a flat batch over the pool, one SDPA call.

    q [T, H*hd], k, v [T, KV*hd] -> [T, H*hd]. Writes this batch's keys and values into
    their slots first (``pool.reserve`` made room; the caller advances the lengths)."""
    T, H, KV, hd = q.shape[0], lw.n_heads, lw.n_kv, lw.head_dim
    q = apply_rope(q.view(T, H, hd), cos, sin)
    k = apply_rope(k.view(T, KV, hd), cos, sin)
    write, gather, mask = plan.groups[lw.window]
    ks, vs = pool.k[lw.index], pool.v[lw.index]
    ks.index_copy_(0, write, k.to(ks.dtype))
    vs.index_copy_(0, write, v.view(T, KV, hd).to(vs.dtype))
    gqa = H != KV
    if plan.flat:
        pool.drop_mirrors(lw.index)         # this step's rows reach no mirror: they would be stale
        n = gather.numel()
        kk = torch.index_select(ks, 0, gather.view(-1), out=pool.scratch("k", n))
        vv = torch.index_select(vs, 0, gather.view(-1), out=pool.scratch("v", n))
        kk, vv = kk.transpose(0, 1)[None], vv.transpose(0, 1)[None]    # [1, KV, S, hd]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk, vv, attn_mask=mask,
                                           scale=hd ** -0.5, enable_gqa=gqa)
        return o[0].transpose(0, 1).reshape(T, H * hd)
    B, nmax, smax = gather.shape[0], plan.nmax, plan.smax
    mirror = pool.mirror_for(lw.index, plan)
    if mirror is not None:                  # the cohort goes on: only this step's rows are new
        mirror.k.index_put_(plan.new_at, k.to(ks.dtype))
        mirror.v.index_put_(plan.new_at, v.view(T, KV, hd).to(vs.dtype))
        mirror.lens = plan.lengths
        kk, vv = mirror.k[:, :smax], mirror.v[:, :smax]
    else:
        n = gather.numel()
        kk = torch.index_select(ks, 0, gather.view(-1), out=pool.scratch("k", n)).view(B, smax, KV, hd)
        vv = torch.index_select(vs, 0, gather.view(-1), out=pool.scratch("v", n)).view(B, smax, KV, hd)
        pool.remember(lw.index, plan, kk, vv)
    kk, vv = kk.transpose(1, 2), vv.transpose(1, 2)
    if plan.q_rows is None:
        qq = q.view(B, nmax, H, hd)
    else:
        qq = q.new_zeros(B * nmax, H, hd).index_copy_(0, plan.q_rows, q).view(B, nmax, H, hd)
    o = F.scaled_dot_product_attention(qq.transpose(1, 2), kk, vv, attn_mask=mask, scale=hd ** -0.5,
                                       enable_gqa=gqa)                 # [B, H, nmax, hd]
    o = o.transpose(1, 2).reshape(B * nmax, H * hd)
    return o if plan.q_rows is None else o.index_select(0, plan.q_rows)
