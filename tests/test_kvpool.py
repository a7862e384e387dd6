"""The paged KV pool and its batched attention against the per-session reference
(``block.attend`` over one ``KVCache`` per session), fp32 within 1e-5."""

from types import SimpleNamespace

import pytest
import torch

from privatelora.model.block import KVCache, Segment, attend
from privatelora.model.kvpool import KVFull, KVPool, paged_attend

TOL = 1e-5


def _layer(index=0, heads=4, kv=2, hd=8, window=None):
    return SimpleNamespace(index=index, n_heads=heads, n_kv=kv, head_dim=hd, window=window)


class _Both:
    """Drives the pool and the reference side by side over the same inputs."""

    def __init__(self, layers, block_size=4, budget_blocks=64, seed=0):
        self.layers = layers
        lw = layers[0]
        per_block = 2 * block_size * lw.n_kv * lw.head_dim * 4 * len(layers)
        self.pool = KVPool({l.index: l.window for l in layers}, n_kv=lw.n_kv, head_dim=lw.head_dim,
                           budget_bytes=budget_blocks * per_block, block_size=block_size)
        self.ref = {}                      # (session, layer) -> KVCache
        self.g = torch.Generator().manual_seed(seed)

    def step(self, batch):
        """batch: [(session, start, n)]; returns the largest difference over all layers."""
        for sid, start, n in batch:
            if start < self.pool.length(sid):
                self.pool.truncate(sid, start)
                for lw in self.layers:
                    self.ref.setdefault((sid, lw.index), KVCache()).truncate(start)
        self.pool.reserve([(sid, start + n) for sid, start, n in batch])
        segs = [Segment(start, n) for _, start, n in batch]
        sids = [sid for sid, _, _ in batch]
        plan = self.pool.plan(sids, segs)
        T = sum(s.n for s in segs)
        worst = 0.0
        for lw in self.layers:
            hd = lw.head_dim
            q = torch.randn(T, lw.n_heads * hd, generator=self.g)
            k = torch.randn(T, lw.n_kv * hd, generator=self.g)
            v = torch.randn(T, lw.n_kv * hd, generator=self.g)
            cos, sin = torch.rand(T, hd, generator=self.g), torch.rand(T, hd, generator=self.g)
            got = paged_attend(lw, self.pool, plan, q, k, v, cos, sin)
            want = attend(lw, q, k, v, segs, [self.ref.setdefault((sid, lw.index), KVCache()) for sid in sids],
                          cos, sin)
            worst = max(worst, (got - want).abs().nan_to_num(nan=float("inf")).max().item())   # NaN fails
        for sid, start, n in batch:
            self.pool.advance(sid, start + n)
            self.pool.evict(sid, start + n)
        return worst, plan


def test_mixed_prefill_and_decode_batches_with_gqa_equal_the_reference():
    both = _Both([_layer(0), _layer(1)])
    err, plan = both.step([(1, 0, 5), (2, 0, 9), (3, 0, 1)])            # three prefills
    assert err < TOL
    err, plan = both.step([(1, 5, 1), (2, 9, 3), (3, 1, 1)])            # decode beside a verify chain
    assert err < TOL
    err, plan = both.step([(1, 6, 1), (2, 12, 1), (3, 2, 1)])           # decode at unequal lengths
    assert err < TOL and not plan.flat
    err, plan = both.step([(1, 7, 1), (2, 13, 1), (3, 3, 40), (4, 0, 1)])   # a long prefill among decodes
    assert err < TOL and plan.flat, "a long prefill beside decodes packs flat"


def test_lockstep_decode_needs_no_mask_and_still_equals_the_reference():
    both = _Both([_layer(0, heads=2, kv=2)])
    both.step([(s, 0, 3) for s in range(1, 5)])
    err, plan = both.step([(s, 3, 1) for s in range(1, 5)])
    assert err < TOL and plan.groups[None][2] is None


def test_truncation_frees_blocks_and_the_rewound_session_equals_the_reference():
    both = _Both([_layer(0)], block_size=4)
    both.step([(1, 0, 10), (2, 0, 6)])
    held = both.pool.gauges()["used"]
    assert held == 3 + 2
    err, _ = both.step([(1, 5, 1), (2, 6, 1)])          # session 1 rewinds from 10 to 5
    assert err < TOL
    assert both.pool.gauges()["used"] == 2 + 2         # 6 positions: 2 blocks; 7: 2 blocks
    for _ in range(3):
        err, _ = both.step([(1, both.pool.length(1), 1)])
        assert err < TOL


def test_sliding_windows_evict_and_still_equal_the_reference_and_a_full_layer_keeps_everything():
    layers = [_layer(0, window=6), _layer(1, window=None)]
    both = _Both(layers, block_size=4, budget_blocks=40)
    both.step([(1, 0, 3), (2, 0, 2)])
    for _ in range(30):
        err, _ = both.step([(1, both.pool.length(1), 1), (2, both.pool.length(2), 1)])
        assert err < TOL
    slide, full = both.pool.groups[6], both.pool.groups[None]
    assert sum(1 for b in slide.tables[1].blocks if b) <= 4       # 6 positions, one block of slack
    assert sum(1 for b in full.tables[1].blocks if b) == 9        # 33 positions in blocks of 4
    assert both.pool.rewind_floor(1) > 0
    err, _ = both.step([(1, 31, 2), (2, 32, 1)])                   # a short rewind is still served
    assert err < TOL


def test_reserve_is_all_or_nothing_and_gauges_equal_the_real_allocation():
    pool = KVPool({0: None, 1: None}, n_kv=2, head_dim=8, budget_bytes=10 * 2 * 4 * 2 * 8 * 4 * 2, block_size=4)
    assert pool.capacity == pool.allocated == 10
    assert pool.allocated_bytes == sum(t.numel() * t.element_size() for d in (pool.k, pool.v) for t in d.values())
    g = pool.gauges()
    assert (g["blocks"], g["used"], g["free"], g["capacity"]) == (10, 0, 9, 10)     # block 0: the zero block
    pool.reserve([(1, 20)])                                          # 5 blocks
    with pytest.raises(KVFull, match="free blocks"):
        pool.reserve([(2, 8), (3, 12)])                              # 2 + 3 > 4 free: nothing taken
    assert pool.gauges()["used"] == 5 and 2 not in pool.groups[None].tables
    pool.reserve([(2, 16)])
    g = pool.gauges()
    assert (g["used"], g["free"]) == (9, 0)
    assert g["used_bytes"] == 9 * pool.block_bytes
    pool.free(1)
    pool.free(2)
    g = pool.gauges()
    assert (g["used"], g["free"], g["used_bytes"]) == (0, 9, 0)
    assert pool.k[0][:4].abs().sum() == 0                            # the zero block stays zero


def test_storage_grows_as_sessions_need_it_and_never_past_the_budget():
    pool = KVPool({0: None, 1: None}, n_kv=2, head_dim=8, budget_bytes=100 * 2 * 4 * 2 * 8 * 4 * 2, block_size=4)
    assert (pool.capacity, pool.allocated) == (100, 16)
    assert pool.allocated_bytes == 16 * pool.block_bytes
    k0 = torch.randn(4, 2, 8)
    pool.reserve([(1, 4)])
    slot = pool.groups[None].tables[1].blocks[0] * 4
    pool.k[0][slot:slot + 4] = k0
    pool.reserve([(2, 4 * 40)])                                      # 40 more: storage grows to hold id 41
    assert pool.allocated == 42 and pool.allocated_bytes == 42 * pool.block_bytes
    assert torch.equal(pool.k[0][slot:slot + 4], k0) and pool.k[0][:4].abs().sum() == 0   # held data kept
    with pytest.raises(KVFull):
        pool.reserve([(3, 4 * 60)])                                  # 60 > 58 free: refused, nothing grows
    assert pool.allocated == 42
    pool.reserve([(3, 4 * 58)])
    assert pool.allocated == 100 and pool.gauges()["free"] == 0     # capped at the budget


def test_a_budget_below_one_block_is_a_clear_error():
    with pytest.raises(ValueError, match="holds no block"):
        KVPool({0: None}, n_kv=2, head_dim=8, budget_bytes=100)


def test_a_burst_of_long_prompts_beyond_the_budget_gets_busy_and_the_admitted_ones_are_exact():
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model.loading import load_backbone
    from privatelora.runtime.cloud import CloudPart
    from privatelora.runtime.messages import Error, Handoff
    bb = load_backbone("tiny")
    cfg = PrivateLoRAConfig(rank=8, adapted_layers="last:1")
    probe = CloudPart(bb, cfg, kv_cache_bytes=1 << 20)
    budget = 7 * probe.kv.block_bytes                    # the zero block + 6 blocks of 16 positions
    small, roomy = CloudPart(bb, cfg, kv_cache_bytes=budget), CloudPart(bb, cfg)
    d = bb.config.hidden_size
    g = torch.Generator().manual_seed(0)
    prompts = {sid: torch.randn(20, d, generator=g) for sid in range(1, 6)}     # 2 blocks each
    answers = {}
    for cloud in (small, roomy):
        for sid in prompts:
            cloud.open(sid)
        out = cloud.run([Handoff(sid, 0, h) for sid, h in prompts.items()])
        while any(not isinstance(a, (Handoff, Error)) for a in out):
            from privatelora.runtime.messages import Reply
            out = [a for a in out if isinstance(a, (Handoff, Error))] + cloud.run(
                [Reply(a.session, a.layer, tuple(torch.zeros(a.a[0].shape[0], 8) for _ in cfg.targets))
                 for a in out if not isinstance(a, (Handoff, Error))])
        answers[cloud is small] = {a.session: a for a in out}
    busy = [sid for sid, a in answers[True].items() if isinstance(a, Error)]
    assert busy == [4, 5] and all(answers[True][s].code == "busy" and "KV" in answers[True][s].reason for s in busy)
    for sid in (1, 2, 3):
        assert torch.allclose(answers[True][sid].hidden, answers[False][sid].hidden, atol=1e-5)
    assert small.kv.gauges()["free"] == 0
    small.close(1)
    assert small.kv.gauges()["free"] == 2
    small.close(4)
    small.open(6)
    (ans,) = small.run([Handoff(6, 0, prompts[4])])
    assert not isinstance(ans, Error)                    # the freed blocks admit the next session


def test_a_burst_over_tcp_beyond_the_byte_budget_gets_busy_and_the_replica_serves_on():
    """Five devices send 40-token prompts at once to an endpoint whose KV pool holds two of
    them: the others get ``busy`` (never an out-of-memory), the admitted ones generate what
    they generate alone, every block comes back, and the next session is served."""
    import asyncio

    from privatelora.config import PrivateLoRAConfig
    from privatelora.model.adapters import PrivateAdapter
    from privatelora.model.loading import load_backbone
    from privatelora.model.sampling import SamplingParams
    from privatelora.runtime.cloud import CloudPart
    from privatelora.runtime.device import DevicePart
    from privatelora.serving.endpoint import CloudEndpoint
    from privatelora.serving.remote import run_remote
    from privatelora.transport import Client
    bb = load_backbone("tiny")
    cfg = PrivateLoRAConfig(rank=8)
    per_block = CloudPart(bb, cfg, kv_cache_bytes=1 << 20).kv.block_bytes
    params = SamplingParams(max_new_tokens=4)
    prompts = [[(11 * u + 3 * i) % 400 + 2 for i in range(40)] for u in range(6)]    # 40 + 4 positions: 3 blocks

    def device(u):
        return DevicePart(bb, cfg, PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(u, scale=0.5))

    async def main(budget_blocks, users):
        cloud = CloudPart(bb, cfg, kv_cache_bytes=(budget_blocks + 1) * per_block)
        async with CloudEndpoint(cloud, max_wait_s=0.5) as ep:
            client = await Client.connect(*ep.address)
            gens = await asyncio.gather(*[run_remote(client, device(u), prompts[u], params) for u in users])
            for _ in range(200):
                if not ep.stats()["sessions"]:
                    break
                await asyncio.sleep(0.01)
            after = ep.stats()
            late = await run_remote(client, device(5), prompts[5], params)
            await client.close()
            ep.check_health()
            return gens, after, late

    alone = {u: asyncio.run(main(64, [u]))[0][0].tokens for u in range(6)}
    gens, after, late = asyncio.run(main(6, range(5)))
    busy = [g for g in gens if g.error is not None]
    served = [(u, g) for u, g in enumerate(gens) if g.error is None]
    assert len(served) >= 2 and busy, [g.error for g in gens]
    assert all(g.error.code == "busy" and "KV cache" in g.error.reason for g in busy)
    assert all(g.tokens == alone[u] for u, g in served)
    assert after["kv"]["used"] == 0 and after["kv"]["free"] == 6 and after["errors"].get("busy") == len(busy)
    assert late.error is None and late.tokens == alone[5]


def test_decode_mirrors_are_reused_dropped_when_stale_and_stay_equal_to_the_reference(monkeypatch):
    from privatelora.model import kvpool
    monkeypatch.setattr(kvpool, "MIRROR_SLACK", 3)           # a mirror holds 3 more steps: rebuilt often
    empty = torch.empty

    def nan_empty(*shape, **kw):                              # uninitialised memory at its worst
        return empty(*shape, **kw).fill_(float("nan"))
    monkeypatch.setattr(torch, "empty", nan_empty)
    both = _Both([_layer(0), _layer(1, window=5)], block_size=4, budget_blocks=400)
    pool = both.pool
    lens = {1: 4, 2: 5, 3: 6}
    both.step([(s, 0, n) for s, n in lens.items()])           # prefills build none
    assert pool.mirror_bytes == 0 and pool.mirror_builds == 0

    def decode(*sids):
        err, plan = both.step([(s, lens[s], 1) for s in sids])
        for s in sids:
            lens[s] += 1
        assert err < TOL and not plan.flat
        assert pool.allocated_bytes <= pool.budget_bytes

    decode(1, 2, 3)
    assert pool.mirror_builds == 0                            # a cohort seen once: no mirror yet
    decode(1, 2, 3)
    assert pool.mirror_builds == 2 and pool.mirror_hits == 0  # going on from there: one per layer
    assert pool.gauges()["mirror_bytes"] == pool.mirror_bytes > 0
    assert pool.allocated_bytes == pool.mirror_bytes + sum(t.numel() * 4 for d in (pool.k, pool.v)
                                                           for t in d.values())
    for _ in range(7):                                         # past the slack: gathered again
        decode(1, 2, 3)
    assert pool.mirror_hits >= 10 and pool.mirror_builds >= 4
    for _ in range(3):                                         # two cohorts in turn keep a mirror each
        decode(1, 2)
        decode(3)
    hits = pool.mirror_hits
    decode(1, 2)
    assert pool.mirror_hits == hits + 2
    builds = pool.mirror_builds
    for _ in range(3):                                         # members that change every step: no mirror
        decode(1, 3)
        decode(2, 3)
    assert pool.mirror_builds == builds
    # a rewind drops the mirrors that hold the session; the next steps stay exact
    lens[2] -= 3
    err, _ = both.step([(2, lens[2], 1), (1, lens[1], 1)])
    assert err < TOL
    lens[2] += 1
    lens[1] += 1
    assert all(2 not in key[1] or key[1] == (2, 1) for key in pool._mirrors)
    decode(2, 1)
    decode(2, 1)
    # a session ends and its id comes back as a new sequence
    pool.free(3)
    assert all(3 not in key[1] for key in pool._mirrors)
    for lw in both.layers:
        both.ref.pop((3, lw.index))
    lens[3] = 0
    both.step([(3, 0, 2)])
    lens[3] = 2
    decode(1, 2, 3)
    decode(1, 2, 3)


def test_mirrors_only_use_room_the_blocks_do_not_need():
    lw = _layer(0)
    per_block = 2 * 4 * lw.n_kv * lw.head_dim * 4
    mirror = 2 * 2 * (9 + 64) * lw.n_kv * lw.head_dim * 4     # two sessions at 9 positions
    # the budget: 16 blocks of storage and one mirror
    both = _Both([lw], block_size=4, budget_blocks=16 + -(-mirror // per_block))
    both.step([(1, 0, 7), (2, 0, 7)])
    both.step([(1, 7, 1), (2, 7, 1)])
    err, _ = both.step([(1, 8, 1), (2, 8, 1)])
    assert err < TOL and both.pool.mirror_bytes == mirror
    # sessions need more blocks than the storage holds: it grows, and the mirror goes first
    both.step([(3, 0, 4 * 14)])
    assert both.pool.mirror_bytes == 0 and both.pool.allocated_bytes <= both.pool.budget_bytes
    err, _ = both.step([(1, 9, 1), (2, 9, 1)])               # gathered again, still exact
    assert err < TOL
    # a budget with no room beside the blocks builds none
    tight = _Both([lw], block_size=4, budget_blocks=16)
    tight.step([(1, 0, 7), (2, 0, 7)])
    for n in range(7, 12):
        err, _ = tight.step([(1, n, 1), (2, n, 1)])
        assert err < TOL
    assert tight.pool.mirror_builds == 0


def test_more_cohorts_in_turn_than_mirrors_fit_stop_building_them(monkeypatch):
    from privatelora.model import kvpool
    monkeypatch.setattr(kvpool, "MAX_MIRRORS", 2)
    cohorts = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]

    def turns(wasted):
        monkeypatch.setattr(kvpool, "WASTED_MIRRORS", wasted)
        both = _Both([_layer(0)], block_size=4, budget_blocks=800)
        lens = {s: 2 for c in cohorts for s in c}
        both.step([(s, 0, 2) for s in lens])
        for _ in range(8):                      # six cohorts take turns, two mirrors fit
            for c in cohorts:
                err, _ = both.step([(s, lens[s], 1) for s in c])
                assert err < TOL
                for s in c:
                    lens[s] += 1
        err, _ = both.step([(1, lens[1], 1)])   # one session alone builds none
        assert err < TOL
        return both.pool.mirror_hits, both.pool.mirror_builds

    _, unguarded = turns(10 ** 6)
    _, guarded = turns(3)
    assert unguarded < 48 // 2 and guarded <= unguarded      # of 48 steps: a cohort builds only when seen going on
