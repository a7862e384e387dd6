"""The Ray system: a cloud-only node with the backbone pool, an edge-only node with the
users' edge actors, one cluster for the whole module (actors take seconds to start)."""

import asyncio
import struct
import time

import msgpack
import pytest
import torch

import privatelora.actors  # noqa: F401  (sets Ray's auth mode before Ray is imported)
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from privatelora.model import reference
from privatelora import wire
from privatelora.actors.pool import Pool
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.sampling import SamplingParams
from privatelora.model.loading import load_backbone
from privatelora.placement import CLOUD, EDGE
from privatelora.placement.checks import audit_frames
from privatelora.placement.cluster import local_cluster, nodes_with
from privatelora.config import PrivateLoRAConfig
from privatelora.wire import session_geometry

USERS = 8
CFG = PrivateLoRAConfig(rank=16)
PROMPTS = ["ROMEO:\nBut soft", "KING:\nNow is the winter of our", "HAMLET:\nTo be", "J",
           "MACBETH:\nTomorrow, and tomorrow, and tomorrow, creeps in", "PORTIA:\nThe quality",
           "LEAR:\nBlow, winds", "PROSPERO:\nOur revels now are ended. These our actors"]


@pytest.fixture(scope="module")
def system():
    cluster = local_cluster(cloud_nodes=1, edge_nodes=1)
    pool = Pool("tiny", CFG, replicas=1, idle_timeout_s=4.0, record_frames=True, pin_cores=True)
    edges = [pool.edge(u, adapter_seed=500 + u) for u in range(USERS)]
    ray.get([e.node_id.remote() for e in edges], timeout=300)
    yield pool, edges
    pool.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def _reference(bb, user, prompt, params):
    adapter = PrivateAdapter(CFG, bb.n_layers, bb.fingerprint).randomize_(500 + user, scale=0.3)
    ids = bb.tokenizer.encode(prompt, add_special_tokens=False)
    return reference.generate(reference.merged_model(bb, adapter), ids, params)[0]


def _params(u, n):
    return dict(max_new_tokens=n, temperature=0.8 if u % 2 else 0.0, top_p=0.95, seed=u)


def test_eight_users_joining_at_different_times_match_the_monolithic_model(system, tiny):
    pool, edges = system
    futures = []
    for u, e in enumerate(edges):
        futures.append(e.generate.remote(PROMPTS[u], **_params(u, 24)))
        time.sleep(0.05 * u)                      # users join at different times
    results = ray.get(futures, timeout=300)
    eos = tiny.tokenizer.eos_token_id
    for u, r in enumerate(results):
        assert r["error"] is None and r["tokens"]
        want = _reference(tiny, u, PROMPTS[u], SamplingParams(**_params(u, 24), stop_ids=(eos,)))
        assert r["tokens"] == want, f"user {u} ({'sampled' if u % 2 else 'greedy'}) differs"
    assert len({tuple(r["tokens"]) for r in results}) == USERS     # different adapters, different texts


def test_batching_in_steady_decode(system):
    pool, edges = system
    before = pool.stats()[0]
    ray.get([e.generate.remote("ROMEO:\n", max_new_tokens=64) for e in edges], timeout=300)
    after = pool.stats()[0]
    stages = after["stages"] - before["stages"]
    sessions = after["stage_sessions"] - before["stage_sessions"]
    assert sessions / stages >= 4, (sessions, stages)


def test_cloud_receives_only_low_rank_activations_and_holds_nothing_private(system, tiny):
    pool, edges = system
    replica = pool.replicas[0]
    ray.get(replica.recorded_frames.remote(clear=True))
    secret = "SECRET-prompt of user three: my bank pin is 4471"
    r = ray.get(edges[3].generate.remote(secret, max_new_tokens=8), timeout=120)
    assert r["tokens"]
    frames = ray.get(replica.recorded_frames.remote(clear=True))
    kinds = {wire.peek_header(f).kind for f in frames}
    assert {"open", "handoff", "reply"} <= kinds <= {"open", "handoff", "reply", "close"}
    adapter = PrivateAdapter(CFG, tiny.n_layers, tiny.fingerprint).randomize_(503, scale=0.3)
    m_bytes = adapter.get(0, "q")[0].numpy().astype("<f4").tobytes()[:32]
    ids = tiny.tokenizer.encode(secret, add_special_tokens=False)
    forbidden = (secret.encode(), b"bank pin", m_bytes, struct.pack("<" + "q" * 4, *ids[:4]),
                 msgpack.packb(ids))
    ms = [M for _, M in adapter.named_parameters()]
    geo = dict(hidden=tiny.config.hidden_size, rank=CFG.rank)
    assert audit_frames(frames, **geo, forbidden=forbidden, private=ms, token_ids=[torch.tensor(ids)]) == []
    # the audit does catch a frame that carries text (copies of M by value: tests/test_privacy_values.py)
    assert audit_frames([frames[0] + secret.encode()], **geo, forbidden=(secret.encode(),))
    report = ray.get(replica.private_report.remote())
    assert report["tensors"] > 50 and report["private"] == []


def test_the_replica_holds_only_the_clouds_decoder_layers_and_still_serves(system, tiny):
    """The live replica actor's whole state: the cloud's decoder layers, A, B and rotary
    tables; no embedding, final norm or LM head, by name, by shape or by value (the
    checkpoint's own tensors, read here from its safetensors), and no meta tensor."""
    from safetensors import safe_open

    from privatelora.model.zoo import SHIPPED
    pool, edges = system
    replica = pool.replicas[0]
    with safe_open(SHIPPED / "model.safetensors", "pt") as sf:
        forbidden = {k: sf.get_tensor(k) for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    report = ray.get(replica.public_tensor_report.remote(forbidden), timeout=120)
    tensors = report["tensors"]
    v, d = tiny.config.vocab_size, tiny.config.hidden_size
    assert report["count"] > 50           # the walk reached the model, the cloud part and its projections
    layers = set(CFG.cloud_layers(tiny.n_layers))
    held = {int(t["path"].split("model.layers.")[1].split(".")[0]) for t in tensors if "model.layers." in t["path"]}
    assert held == layers
    assert [t["path"] for t in tensors if any(s in t["path"] for s in ("embed", "lm_head", "model.norm"))] == []
    assert [t["path"] for t in tensors if tuple(t["shape"]) in ((v, d), (d, v))] == []
    assert [(t["path"], t["equals"]) for t in tensors if t["equals"]] == []
    assert [t["path"] for t in tensors if t["device"] == "meta"] == []
    # the check bites: handed the replica's own first layer norm, it finds it by value
    first = min(layers)
    ln = ray.get(replica.public_tensor_report.remote(
        {"ln": _layer_tensor(f"model.layers.{first}.input_layernorm.weight")}), timeout=120)
    assert any(t["equals"] == ["ln"] for t in ln["tensors"])
    # and it serves: a user's generation equals the monolithic model's
    r = ray.get(edges[2].generate.remote(PROMPTS[2], max_new_tokens=6), timeout=120)
    eos = tiny.tokenizer.eos_token_id
    assert r["tokens"] == _reference(tiny, 2, PROMPTS[2], SamplingParams(max_new_tokens=6, stop_ids=(eos,)))


def _layer_tensor(name):
    from safetensors import safe_open

    from privatelora.model.zoo import SHIPPED
    with safe_open(SHIPPED / "model.safetensors", "pt") as sf:
        return sf.get_tensor(name)


def test_edge_actor_refuses_a_cloud_only_node(system):
    pool, _ = system
    cloud_node = [n for n in nodes_with(CLOUD) if n not in nodes_with(EDGE)][0]
    bad = pool.edge(99, adapter_seed=1, resources={},
                    scheduling_strategy=NodeAffinitySchedulingStrategy(cloud_node, soft=False))
    with pytest.raises(ray.exceptions.RayActorError, match="only on edge nodes"):
        ray.get(bad.node_id.remote(), timeout=120)


async def _raw_session(host, port, geometry):
    """A hand-rolled client: opens a real session, then misbehaves."""
    import secrets
    reader, writer = await asyncio.open_connection(host, port)
    sid, key = secrets.randbits(63), secrets.token_bytes(32)
    writer.write(wire.encode(wire.Open(sid, key, geometry), key=key, direction="up"))
    await writer.drain()
    return reader, writer, sid, key


async def _read_frame(reader):
    prefix = await reader.readexactly(4)
    return prefix + await reader.readexactly(int.from_bytes(prefix, "big"))


def _forge(kind, sid, key, body):
    import hmac
    signed = wire.HEADER.pack(wire.VERSION, kind, 0, 0, sid) + msgpack.packb(body, use_bin_type=True)
    return wire.PREFIX.pack(len(signed) + wire.TAG_LEN) + signed + hmac.digest(key, signed, "sha256")[:wire.TAG_LEN]


def test_misbehaving_clients_get_an_error_and_are_cut_off_others_unaffected(system, tiny):
    pool, edges = system
    info = pool.infos[0]
    geometry = session_geometry(info["layers"], tiny.config.hidden_size, CFG)
    hidden, r = tiny.config.hidden_size, CFG.rank
    nan_row = struct.pack("<f", float("nan")) * hidden

    def attacks(sid, key):
        return {
            "garbage": b"\x00\x00\x00\x30" + bytes(range(48)),
            "nan": _forge(3, sid, key, {"start": 0, "hidden": [0, 1, 1, hidden, nan_row], "want_all": False}),
            "wrong_shape": _forge(3, sid, key, {"start": 0, "hidden": [0, 1, 1, hidden + 1, bytes(4 * (hidden + 1))],
                                                "want_all": False}),
            "unknown_session": _forge(5, sid + 1, key, {"l": 0, "m": [0, 3, 1, r, bytes(12 * r)]}),
            "bad_mac": _forge(3, sid, bytes(32), {"start": 0, "hidden": [0, 1, 1, hidden, bytes(4 * hidden)],
                                                  "want_all": False}),
        }

    async def attack(name):
        reader, writer, sid, key = await _raw_session(info["host"], info["port"], geometry)
        opened = await _read_frame(reader)
        assert wire.peek_header(opened).kind == "opened"
        writer.write(attacks(sid, key)[name])
        await writer.drain()
        answer = await asyncio.wait_for(_read_frame(reader), 10)
        assert wire.peek_header(answer).kind == "error", name
        assert await asyncio.wait_for(reader.read(), 10) == b"", f"{name}: not disconnected"
        writer.close()

    async def all_attacks():
        for name in ("garbage", "nan", "wrong_shape", "unknown_session", "bad_mac"):
            await attack(name)

    good = [edges[u].generate.remote(PROMPTS[u], max_new_tokens=20) for u in (0, 2)]
    asyncio.run(all_attacks())
    results = ray.get(good, timeout=120)
    eos = tiny.tokenizer.eos_token_id
    for u, res in zip((0, 2), results):
        assert res["tokens"] == _reference(tiny, u, PROMPTS[u], SamplingParams(max_new_tokens=20, stop_ids=(eos,)))
    st = pool.stats()[0]
    assert st["disconnects"].get("refused", 0) + st["disconnects"].get("garbage", 0) >= 4


def test_killed_or_silent_devices_free_their_kv_cache(system, tiny):
    pool, _ = system
    replica = pool.replicas[0]
    victim = pool.edge(77, adapter_seed=77)
    ray.get(victim.node_id.remote(), timeout=120)
    victim.generate.remote("ROMEO:\n", max_new_tokens=400)
    deadline = time.time() + 60
    # a session's KV cache fills once its first layer's reply is in, a moment after it opens
    while ray.get(replica.stats.remote())["kv_bytes"] == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert ray.get(replica.stats.remote())["kv_bytes"] > 0
    ray.kill(victim)
    t0 = time.time()
    while ray.get(replica.stats.remote())["sessions"] and time.time() - t0 < 10:
        time.sleep(0.05)
    st = ray.get(replica.stats.remote())
    assert st["sessions"] == 0 and st["kv_bytes"] == 0

    # a device that opens a session, starts a prefill, then goes silent (connection kept)
    info = pool.infos[0]
    geometry = session_geometry(info["layers"], tiny.config.hidden_size, CFG)

    async def silent():
        reader, writer, sid, key = await _raw_session(info["host"], info["port"], geometry)
        await _read_frame(reader)
        writer.write(wire.encode(wire.Handoff(sid, 0, torch.randn(3, tiny.config.hidden_size)), key=key,
                                 direction="up", geometry=geometry))
        await writer.drain()
        # a whole prefill (M = 0: zero replies), so the session's KV cache holds 3 positions of
        # every cloud layer; then one more token's first activations, never answered
        kinds = []
        while not kinds or kinds[-1] != "handoff":
            msg = wire.decode(await _read_frame(reader), direction="down", geometry_for=lambda s: geometry,
                              key_for=lambda s: key)
            kinds.append(wire.kind_of(type(msg)).name)
            if isinstance(msg, wire.Activations):
                zero = tuple(torch.zeros(3, geometry.rank) for _ in geometry.targets)
                writer.write(wire.encode(wire.Reply(sid, msg.layer, zero), key=key, direction="up", geometry=geometry))
                await writer.drain()
        assert kinds == ["activations"] * len(geometry.layers) + ["handoff"]
        writer.write(wire.encode(wire.Handoff(sid, 3, torch.randn(1, tiny.config.hidden_size)), key=key,
                                 direction="up", geometry=geometry))
        await writer.drain()
        await _read_frame(reader)                        # the next token's first activations; never answered
        held = ray.get(replica.stats.remote())
        per_position = 2 * len(geometry.layers) * tiny.config.num_key_value_heads * \
            (getattr(tiny.config, "head_dim", None) or tiny.config.hidden_size // tiny.config.num_attention_heads) * 4
        assert held["sessions"] == 1 and held["kv_bytes"] >= 3 * per_position, held
        t0 = time.time()
        while ray.get(replica.stats.remote())["sessions"] and time.time() - t0 < 15:
            await asyncio.sleep(0.2)
        st = ray.get(replica.stats.remote())
        writer.close()
        return st, time.time() - t0
    st, waited = asyncio.run(silent())
    assert st["sessions"] == 0 and st["kv_bytes"] == 0 and st["errors"].get("silent_device", 0) >= 1   # it owed a reply
    assert waited < 4.0 + 3.0          # the idle timeout (4 s) plus the reclaim check period


def test_an_edge_host_carries_several_users_each_matching_the_monolithic_model(system, tiny):
    """One edge process, one connection, two users with their own M: each user's tokens
    are what the merged model with that user's adapter generates."""
    pool, _ = system
    users = [0, 3]
    host = pool.edge_host(users, adapter_seeds=[500 + u for u in users])
    prompts = {u: tiny.tokenizer.encode(PROMPTS[u], add_special_tokens=False) for u in users}
    runs = ray.get(host.bench_decode_many.remote(prompts, 10, 0.0), timeout=120)
    ray.get(host.close.remote())
    ray.kill(host)
    assert sorted(r["user"] for r in runs) == users
    for r in runs:
        assert r["error"] is None and len(r["token_times"]) == 10
        assert r["ids"] == _reference(tiny, r["user"], PROMPTS[r["user"]], SamplingParams(max_new_tokens=10))


def test_a_replica_whose_stage_loop_stops_is_reported_and_restarted_by_ray(system, tiny):
    """Last in the module: it restarts the shared replica. Its health check reports the
    stopped loop; ``Pool.heal`` has Ray restart the actor (``max_restarts``), starts its
    endpoint again and re-registers it; users then generate exactly as before."""
    pool, edges = system
    old = pool.infos[0]

    def break_the_stage_loop(replica):     # runs inside the actor (pickled by value: a local function)
        def broken(now):
            raise RuntimeError("injected stage-loop failure")
        replica.endpoint.scheduler.next_batch = broken
        replica.endpoint._wake.set()
    ray.get(pool.replicas[0].__ray_call__.remote(break_the_stage_loop))
    deadline = time.time() + 30
    while pool.health()[0]["ok"] and time.time() < deadline:
        time.sleep(0.2)
    (h,) = pool.health()
    assert not h["ok"] and "stage loop stopped" in h["reason"], h
    assert pool.heal() == [0]
    new = pool.infos[0]
    assert new["pid"] != old["pid"] and pool.health()[0]["ok"]
    assert ray.get(pool.router.snapshot.remote())["load"] == {0: 0}
    res = ray.get(edges[1].generate.remote(PROMPTS[1], max_new_tokens=12), timeout=120)
    eos = tiny.tokenizer.eos_token_id
    assert res["tokens"] == _reference(tiny, 1, PROMPTS[1], SamplingParams(max_new_tokens=12, stop_ids=(eos,)))
