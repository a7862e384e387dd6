"""Bad requests get an Error for that session alone; the cloud holds nothing private."""

import torch

from privatelora.model import reference
from privatelora.model.adapters import PrivateAdapter
from privatelora.runtime.cloud import CloudPart
from privatelora.config import PrivateLoRAConfig
from privatelora.runtime.device import DevicePart
from privatelora.runtime.generation import Generation
from privatelora.model.sampling import SamplingParams
from privatelora.placement.checks import walk_tensors
from privatelora.privacy import PRIVATE_PREFIX, is_private
from privatelora.runtime.messages import Activations, Error, Handoff, Reply


def test_cloud_state_holds_no_private_tensor(backbones):
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4)
    adapter = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(3)
    cloud, device = CloudPart(bb, cfg), DevicePart(bb, cfg, adapter)
    g = Generation(device.session(1), [5, 6, 7, 8], SamplingParams(max_new_tokens=3))
    cloud.open(1)
    msg = g.start()
    for _ in range(3):     # stop mid-generation, with a live KV cache and an in-flight stage
        (ans,) = cloud.run([msg])
        msg = g.on(ans)
    found = list(walk_tensors(cloud, "cloud"))
    paths = [p for p, _ in found]
    assert any("pending" in p for p in paths) and any(".kv." in p for p in paths), paths[:20]  # session state
    assert not [p for p, t in found if is_private(t)]
    assert not [p for p in (n for n, _ in found) if PRIVATE_PREFIX in p]
    m_values = {t.data_ptr() for t in adapter.M.values()}
    assert not [p for p, t in found if t.data_ptr() in m_values]
    # the device side does hold them (the walk would find them there)
    assert [p for p, t in walk_tensors(device, "device") if is_private(t)]


def test_bad_requests_are_isolated(backbones):
    bb = backbones["mistral"]
    cfg = PrivateLoRAConfig(rank=4)
    adapter = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(9, scale=2.0)
    cloud, device = CloudPart(bb, cfg), DevicePart(bb, cfg, adapter)
    good = Generation(device.session(1), [3, 4, 5, 6, 7], SamplingParams(max_new_tokens=10))
    cloud.open(1)
    for sid in (2, 3, 4, 5, 6):
        cloud.open(sid)
    d = bb.config.hidden_size
    msg = good.start()
    codes = []
    step = 0
    while msg is not None:
        bad = [
            Handoff(99, 0, torch.zeros(1, d)),                                  # unknown session
            Handoff(2, 0, torch.full((2, d), float("nan"))),                    # NaN
            Handoff(3, 0, torch.zeros(2, d + 1)),                               # wrong shape
            Reply(4, 0, (torch.zeros(1, 4),) * 3),                              # reply never asked for
            Handoff(5, 7, torch.zeros(1, d)),                                   # wrong position
            Handoff(6, 0, torch.zeros(10_000, d)),                              # oversized prompt
            "garbage",
        ]
        answers = cloud.run([*bad[: step % 7 + 1], msg])
        errs = [a for a in answers if isinstance(a, Error)]
        codes += [e.code for e in errs]
        (ans,) = [a for a in answers if a.session == 1]
        assert not isinstance(ans, Error)
        msg = good.on(ans)
        step += 1
    ref, _ = reference.generate(reference.merged_model(bb, adapter), [3, 4, 5, 6, 7], SamplingParams(max_new_tokens=10))
    assert good.tokens == ref
    assert {"unknown_session", "not_finite", "bad_shape", "out_of_order", "bad_position", "too_many_tokens", "bad_request"} <= set(codes)


def test_reply_with_wrong_shape_or_nan_is_refused_then_session_recovers(backbones):
    bb = backbones["qwen2"]
    cfg = PrivateLoRAConfig(rank=4)
    adapter = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(2)
    cloud, device = CloudPart(bb, cfg), DevicePart(bb, cfg, adapter)
    g = Generation(device.session(1), [9, 8, 7], SamplingParams(max_new_tokens=4))
    cloud.open(1)
    (act,) = cloud.run([g.start()])
    assert isinstance(act, Activations)
    good = g.on(act)
    for bad in (Reply(1, act.layer, good.m[:2]), Reply(1, act.layer, (good.m[0] * float("inf"),) + good.m[1:]),
                Reply(1, act.layer + 1, good.m), Reply(1, act.layer, tuple(m[:1] for m in good.m))):
        (err,) = cloud.run([bad])
        assert isinstance(err, Error)
    (nxt,) = cloud.run([good])     # the session's state was not disturbed
    msg = g.on(nxt)
    while msg is not None:
        (ans,) = cloud.run([msg])
        msg = g.on(ans)
    assert g.tokens == reference.generate(reference.merged_model(bb, adapter), [9, 8, 7], SamplingParams(max_new_tokens=4))[0]


def test_replies_that_are_views_of_one_shared_tensor_are_checked_each_alone(backbones):
    """A bundle's replies arrive as views of the one tensor it was decoded into, and the
    stage checks them for NaN/inf through that tensor: a NaN in one session's rows refuses
    that session alone, and the others go on to the monolithic model's tokens."""
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4)
    cloud = CloudPart(bb, cfg)
    prompts = {1: [5, 6, 7], 2: [9, 8, 7, 6], 3: [4, 4]}
    adapters = {sid: PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(40 + sid) for sid in prompts}
    gens = {sid: Generation(DevicePart(bb, cfg, adapters[sid]).session(sid), p, SamplingParams(max_new_tokens=4))
            for sid, p in prompts.items()}
    for sid in gens:
        cloud.open(sid)
    msgs = {sid: g.start() for sid, g in gens.items()}
    poisoned = views = 0
    while msgs:
        batch, poisoning = list(msgs.values()), False
        if len(msgs) > 1 and all(isinstance(m, Reply) for m in batch) and len({m.m[0].shape for m in batch}) == 1:
            # as a decoded bundle holds them: one tensor, each reply a view of its rows
            sids = sorted(msgs)
            shared = torch.stack([torch.stack(msgs[sid].m) for sid in sids])
            batch = [Reply(sid, msgs[sid].layer, tuple(shared[i].unbind(0))) for i, sid in enumerate(sids)]
            assert all(t._base is shared for r in batch for t in r.m)
            views += 1
            if not poisoned and 2 in msgs:
                poisoning = True
                bad = shared.clone()
                bad[sids.index(2), 1, 0, 0] = float("nan")
                batch = [Reply(sid, msgs[sid].layer, tuple(bad[i].unbind(0))) for i, sid in enumerate(sids)]
                poisoned = True
        answers = cloud.run(batch)
        refused = [a for a in answers if isinstance(a, Error)]
        assert bool(refused) == poisoning
        if refused:      # the poisoned step: session 2 alone; it sends its true reply next
            assert [(a.session, a.code) for a in refused] == [(2, "not_finite")]
        nxt = {a.session: gens[a.session].on(a) for a in answers if not isinstance(a, Error)}
        msgs = {sid: m for sid, m in nxt.items() if m is not None}
        if refused:
            msgs[2] = Reply(2, batch[sids.index(2)].layer, tuple(shared[sids.index(2)].unbind(0)))
    assert poisoned and views > 3
    for sid, g in gens.items():
        ref, _ = reference.generate(reference.merged_model(bb, adapters[sid]), prompts[sid], SamplingParams(max_new_tokens=4))
        assert g.tokens == ref, sid


def test_many_sessions_one_error_code_each_duplicate(backbones):
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4)
    cloud = CloudPart(bb, cfg)
    cloud.open(1)
    h = torch.zeros(2, bb.config.hidden_size)
    answers = cloud.run([Handoff(1, 0, h), Handoff(1, 0, h)])
    assert [type(a).__name__ for a in answers] == ["Error", "Activations"]
    assert answers[0].code == "duplicate"


def test_a_reopened_session_id_never_writes_into_blocks_another_session_now_holds(backbones):
    """Plans are cached by (session, table epoch, start, rows): a session id closed and
    opened again must not find its former life's plan, whose slots may now be another's."""
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4)
    cloud = CloudPart(bb, cfg)
    device = DevicePart(bb, cfg, PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(4))
    prompt = [5, 6, 7, 8]

    def first_layer(sid, ids):                       # the hand-off, then the reply: layer 0's keys written
        g = Generation(device.session(sid), ids, SamplingParams(max_new_tokens=2))
        (ans,) = cloud.run([g.start()])
        (ans,) = cloud.run([g.on(ans)])
        assert not isinstance(ans, Error), ans

    cloud.open(7)
    first_layer(7, prompt)
    cloud.close(7)
    cloud.open(8)                                    # takes the blocks session 7 gave back
    first_layer(8, prompt[::-1])
    layer = cloud.layer_ids[0]
    group = cloud.kv.groups[cloud.layers[layer].window]
    slots = [group.tables[8].blocks[p // cloud.kv.block_size] * cloud.kv.block_size + p % cloud.kv.block_size
             for p in range(len(prompt))]
    held = cloud.kv.k[layer][slots].clone()
    cloud.open(7)                                    # the same id, a new session, the same first hand-off
    first_layer(7, prompt)
    assert not set(group.tables[7].blocks) & set(group.tables[8].blocks)
    assert torch.equal(cloud.kv.k[layer][slots], held), "session 7 wrote into session 8's blocks"


def test_a_failed_stage_drops_the_kv_mirrors_of_its_sessions(backbones):
    """A stage that fails after a layer wrote a cohort's mirror is retried session by
    session; those sessions' mirrors go (their rows were rewritten by the retry)."""
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4)
    cloud = CloudPart(bb, cfg)
    device = DevicePart(bb, cfg, PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(5))
    gens = {sid: Generation(device.session(sid), [3 + sid, 4, 5], SamplingParams(max_new_tokens=8, temperature=0.0))
            for sid in (1, 2)}
    for sid in gens:
        cloud.open(sid)
    msgs = [g.start() for g in gens.values()]
    failed = []

    def hook(layer, sids):
        if len(cloud.kv._mirrors) and not failed and layer == cloud.layer_ids[-1] and len(sids) == 2:
            failed.append(layer)
            raise RuntimeError("injected")
    cloud.fault_hook = hook
    while msgs:
        answers = cloud.run(msgs)
        assert not [a for a in answers if isinstance(a, Error)], answers
        if failed and len(failed) == 1:
            assert not any(sid in key[1] for key in cloud.kv._mirrors for sid in (1, 2))
            failed.append("checked")
        msgs = [m for a in answers if (m := gens[a.session].on(a)) is not None]
    assert failed == [cloud.layer_ids[-1], "checked"] and cloud.kv.mirror_builds > 0
