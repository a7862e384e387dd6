"""Split training: exact gradients of M, strict cloud trainer, gradient frames, training over TCP.

Tolerance: every dL/dM tensor from the split equals the monolithic model's autograd
gradient within a relative error (Frobenius) of 1e-5, fp32.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch

from privatelora import wire
from privatelora.model.adapters import PrivateAdapter
from privatelora.runtime.cloud import CloudPart
from privatelora.config import PrivateLoRAConfig
from privatelora.runtime.device import DevicePart
from privatelora.runtime.generation import Generation
from privatelora.model.sampling import SamplingParams
from privatelora.privacy import is_private, mark_private
from privatelora.runtime.runner import InProcessRunner
from privatelora.serving.endpoint import CloudEndpoint
from privatelora.serving.remote import run_remote
from privatelora.wire import session_geometry
from privatelora.training.cloud import CloudTrainer
from privatelora.training.device import TrainStep, monolithic_loss_and_grads, run_step, run_step_remote
from privatelora.transport import Client
from privatelora.wire import Activations, Error, PrivacyError, Reply
from privatelora.runtime.train_messages import GradActivations, GradDone, GradHandoff, GradInput, GradReply, TrainHandoff

REL_TOL = 1e-5
VARIANTS = {
    "default": {},
    "shared_a": {"shared_a": True},
    "head1_tail1": {"device_head_layers": 1, "device_tail_layers": 1},
    "shared_a_head1_tail1": {"shared_a": True, "device_head_layers": 1, "device_tail_layers": 1},
}
LENGTHS = (30, 7, 41)   # 30, 41 > the tiny Mistral/Qwen2 sliding window (24): windows are exercised


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed=0, lengths=LENGTHS, vocab=250):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]
    labels = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]
    labels[1][2] = -100           # an ignored position
    return inputs, labels


def parts(bb, cfg, seed=1, scale=2.0):
    adapter = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint)
    if scale:
        adapter.randomize_(seed, scale=scale)   # non-zero M: dL/da = dL/dm M is exercised
    return adapter, DevicePart(bb, cfg, adapter), CloudPart(bb, cfg)


def rel_errors(adapter, ref) -> dict:
    return {n: float((M.grad - ref[n]).norm() / ref[n].norm()) for n, M in adapter.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_split_gradients_equal_monolithic_autograd(backbones, family, variant):
    bb = backbones[family]
    cfg = PrivateLoRAConfig(rank=8, **VARIANTS[variant])
    adapter, device, cloud = parts(bb, cfg)
    inputs, labels = batch()
    trainer = CloudTrainer(cloud)
    step = run_step(trainer, TrainStep(device, 1, inputs, labels))
    loss, ref = monolithic_loss_and_grads(bb, adapter, inputs, labels)
    assert abs(step.loss - loss) < 1e-5
    assert all(ref[n].norm() > 0 for n in ref)
    errs = rel_errors(adapter, ref)
    assert max(errs.values()) <= REL_TOL, errs
    assert trainer.sessions == {} and step.done          # graphs freed after the backward


def test_gradients_exact_from_zero_m_and_with_a_subset_of_targets(backbones):
    bb = backbones["qwen2"]
    for cfg in (PrivateLoRAConfig(rank=8), PrivateLoRAConfig(rank=6, targets=("q", "v"), shared_a=True,
                                                            device_tail_layers=1)):
        adapter, device, cloud = parts(bb, cfg, scale=0)   # M = 0: where tuning starts
        inputs, labels = batch(seed=3)
        run_step(CloudTrainer(cloud), TrainStep(device, 1, inputs, labels))
        _, ref = monolithic_loss_and_grads(bb, adapter, inputs, labels)
        errs = rel_errors(adapter, ref)
        assert max(errs.values()) <= REL_TOL, errs


def test_gradients_accumulate_over_steps_with_a_shared_denominator(backbones):
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4, device_head_layers=1)
    adapter, device, cloud = parts(bb, cfg)
    inputs, labels = batch(seed=5)
    trainer = CloudTrainer(cloud)
    total = sum(1 for s in labels for x in s if x != -100)
    for i in range(len(inputs)):   # micro-batches of one sequence, one denominator
        run_step(trainer, TrainStep(device, 1, inputs[i:i + 1], labels[i:i + 1], denominator=total))
    _, ref = monolithic_loss_and_grads(bb, adapter, inputs, labels)
    assert max(rel_errors(adapter, ref).values()) <= REL_TOL


def test_forward_only_step_gives_the_loss_and_keeps_no_graph(backbones):
    bb = backbones["mistral"]
    cfg = PrivateLoRAConfig(rank=8, shared_a=True)
    adapter, device, cloud = parts(bb, cfg)
    inputs, labels = batch(seed=2)
    trainer = CloudTrainer(cloud)
    step = TrainStep(device, 9, inputs, labels, backward=False)
    msg = step.start()
    while msg is not None:
        ans = trainer.handle(msg)
        assert not isinstance(ans, (GradReply, GradDone, GradInput))
        msg = step.on(ans)
    loss, _ = monolithic_loss_and_grads(bb, adapter, inputs, labels)
    assert abs(step.loss - loss) < 1e-5
    assert trainer.sessions == {} and all(M.grad is None for M in adapter.parameters())


# svd: B = U_r S_r carries the weights' singular values, about 0.3 in these random-init models
# (random B's columns: about 2.7), so M needs a larger step for the same change of the output.
@pytest.mark.parametrize("projection,lr", [("random", 0.05), ("svd", 0.5)])
def test_training_reduces_the_loss(backbones, projection, lr):
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=8, projection=projection)
    adapter, device, cloud = parts(bb, cfg, scale=0)
    trainer = CloudTrainer(cloud)
    inputs, labels = batch(seed=7, lengths=(24, 24))
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        losses.append(run_step(trainer, TrainStep(device, 1, inputs, labels)).loss)
        opt.step()
    assert losses[-1] < losses[0] - 0.3, losses


# ---------------------------------------------------------------- the cloud trainer is strict
def test_trainer_refuses_out_of_protocol_messages_and_frees_the_step(backbones):
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4)
    adapter, device, cloud = parts(bb, cfg)
    trainer = CloudTrainer(cloud)
    d, n, r = bb.config.hidden_size, 5, 4
    x = torch.randn(n, d)
    assert trainer.handle(GradHandoff(1, torch.zeros(n, d))).code == "out_of_order"
    assert trainer.handle(TrainHandoff(1, (2, 2), x)).code == "bad_lengths"
    assert trainer.handle(TrainHandoff(1, (n,), torch.randn(n, d + 1))).code == "bad_shape"
    assert trainer.handle(TrainHandoff(1, (n,), torch.full((n, d), float("nan")))).code == "not_finite"
    act = trainer.handle(TrainHandoff(1, (n,), x))
    assert isinstance(act, Activations) and act.layer == cloud.layer_ids[0]
    assert trainer.handle(TrainHandoff(1, (n,), x)).code == "out_of_order"   # step still in flight
    assert 1 in trainer.sessions
    bad = trainer.handle(Reply(1, act.layer, tuple(torch.zeros(n, r + 1) for _ in cfg.targets)))
    assert isinstance(bad, Error) and bad.code == "bad_shape" and trainer.sessions == {}
    act = trainer.handle(TrainHandoff(1, (n,), x))
    assert trainer.handle(GradActivations(1, act.layer, (torch.zeros(n, r),) * 3)).code == "out_of_order"
    assert trainer.sessions == {}
    trainer.handle(TrainHandoff(2, (n,), x))
    trainer.close(2)
    assert trainer.sessions == {}


def test_trainer_state_holds_nothing_private(backbones):
    """Mid-backward, the cloud's per-session state holds float activations and gradients
    only: no integer tensor (tokens, labels), nothing tagged private, no copy of M."""
    bb = backbones["qwen2"]
    cfg = PrivateLoRAConfig(rank=8)
    adapter, device, cloud = parts(bb, cfg)
    inputs, labels = batch()
    trainer = CloudTrainer(cloud)
    step = TrainStep(device, 3, inputs, labels)
    msg, seen = step.start(), 0
    while msg is not None:
        ans = trainer.handle(msg)
        for st in trainer.sessions.values():
            for rec in st.layers:
                for t in [] if rec is None else [rec.x, rec.h, *rec.a, *(rec.m or ()), rec.y, rec.gx]:
                    if t is None:
                        continue
                    seen += 1
                    assert t.is_floating_point() and not is_private(t)
                    assert not any(t.shape == M.shape and torch.equal(t, M) for M in adapter.parameters())
        msg = step.on(ans)
    assert seen > 0
    assert not any(is_private(t) for t in vars(trainer).values() if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------- gradient frames
G = wire.Geometry(hidden=32, rank=4, targets=("q", "k", "v"), shared_a=False, layers=(1, 2), max_tokens=8)
KEY = bytes(range(32))


def roundtrip(msg, direction, **kw):
    frame = wire.encode(msg, key=KEY, direction=direction, geometry=G, **kw)
    return wire.decode(frame, direction=direction, geometry_for=lambda s: G, key_for=lambda s: KEY)


def test_gradient_frames_round_trip():
    h, a = torch.randn(5, 32), torch.randn(5, 4)
    for msg, d in [(TrainHandoff(7, (3, 2), h), "up"), (TrainHandoff(7, (5,), h, False), "up"),
                   (GradHandoff(7, h), "up"), (GradReply(7, 2, (a, a, a)), "down"),
                   (GradActivations(7, 1, (a, a, a)), "up"), (GradInput(7, h), "down"), (GradDone(7), "down")]:
        out = roundtrip(msg, d)
        assert type(out) is type(msg)
        for f in ("hidden", "grad"):
            if hasattr(msg, f):
                assert torch.equal(getattr(out, f), getattr(msg, f))
        if hasattr(msg, "grads"):
            assert all(torch.equal(x, y) for x, y in zip(out.grads, msg.grads))
    assert roundtrip(TrainHandoff(7, (3, 2), h), "up").lengths == (3, 2)
    assert "0." not in repr(GradHandoff(7, h)) and "[5, 32]" in repr(GradHandoff(7, h))


@pytest.mark.parametrize("make", [
    lambda: GradActivations(7, 1, (mark_private(torch.zeros(2, 4)),) * 3),            # e.g. M
    lambda: GradActivations(7, 1, (torch.zeros(2, 4, dtype=torch.long),) * 3),        # integers
    lambda: GradActivations(7, 1, (torch.zeros(2, 4),) * 2),                          # count
    lambda: GradActivations(7, 3, (torch.zeros(2, 4),) * 3),                          # not a session layer
    lambda: GradActivations(7, 1, (torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 5))),
    lambda: GradHandoff(7, torch.zeros(2, 4)),                                        # [n, r] is no hidden grad
    lambda: GradHandoff(7, mark_private(torch.zeros(2, 32))),                         # e.g. logits
    lambda: TrainHandoff(7, (2,), torch.arange(64).reshape(2, 32)),                   # token ids
    lambda: TrainHandoff(7, (3,), torch.zeros(2, 32)),                                # lengths do not add up
    lambda: TrainHandoff(7, (2,), torch.zeros(9, 32)),                                # > max_tokens
])
def test_up_gradient_frames_refuse_private_integer_and_misshapen_tensors(make):
    with pytest.raises(PrivacyError):
        wire.encode(make(), key=KEY, direction="up", geometry=G)


def test_gradients_never_travel_int8_and_down_frames_check_geometry():
    with pytest.raises(wire.GeometryError):
        wire.encode(GradHandoff(7, torch.zeros(2, 32)), key=KEY, direction="up", geometry=G, dtype="int8")
    with pytest.raises(wire.GeometryError):
        wire.encode(GradReply(7, 1, (torch.zeros(2, 4),) * 2), key=KEY, direction="down", geometry=G)
    for kind_cls, d in ((GradHandoff, "down"), (GradReply, "up"), (TrainHandoff, "down")):
        assert d not in wire.kind_of(kind_cls).directions


def test_gradient_frames_decoder_raises_only_wire_errors():
    import random

    import msgpack
    rng = random.Random(0)
    frames = [("up", wire.encode(TrainHandoff(7, (3, 2), torch.randn(5, 32)), key=KEY, direction="up", geometry=G)),
              ("up", wire.encode(GradActivations(7, 1, (torch.randn(2, 4),) * 3), key=KEY, direction="up", geometry=G)),
              ("down", wire.encode(GradReply(7, 2, (torch.randn(2, 4),) * 3), key=KEY, direction="down", geometry=G))]
    import hmac
    for _ in range(600):
        d, f = rng.choice(frames)
        b = bytearray(f[4 + wire.HEADER.size: -wire.TAG_LEN])
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        signed = bytes(f[4: 4 + wire.HEADER.size]) + bytes(b)   # re-signed: the body parser meets garbage
        frame = wire.PREFIX.pack(len(signed) + wire.TAG_LEN) + signed + hmac.digest(KEY, signed, "sha256")[:16]
        try:
            wire.decode(frame, direction=d, geometry_for=lambda s: G, key_for=lambda s: KEY)
        except wire.WireError as e:
            assert e.code != "internal", e
    for obj in ({"lengths": [1, "x"], "hidden": [], "backward": True}, {"lengths": [0], "hidden": None, "backward": 1},
                {"lengths": list(range(1, 100)), "hidden": [0, 1, 1, 32, b""], "backward": True}):
        body = msgpack.packb(obj, use_bin_type=True)
        signed = wire.HEADER.pack(wire.VERSION, wire.kind_of(TrainHandoff).code, 0, 0, 7) + body
        frame = wire.PREFIX.pack(len(signed) + 16) + signed + hmac.digest(KEY, signed, "sha256")[:16]
        with pytest.raises(wire.WireError):
            wire.decode(frame, direction="up", geometry_for=lambda s: G, key_for=lambda s: KEY)


# ---------------------------------------------------------------- isolation between users
def _logits(device, cloud, prompt, n=8):
    g = Generation(device.session(77), prompt, SamplingParams(max_new_tokens=n), keep_logits=True)
    InProcessRunner(cloud).run([g])
    return g.tokens, torch.cat([g.logits[0]] + [x[-1:] for x in g.logits[1:]])


def _cloud_digest(cloud) -> str:
    h = hashlib.sha256()
    for lw in cloud.layers.values():
        for name, v in sorted(vars(lw).items()):
            if isinstance(v, torch.Tensor):
                h.update(name.encode() + v.detach().numpy().tobytes())
    for k in sorted(cloud.proj.A, key=str):
        h.update(cloud.proj.A[k].numpy().tobytes())
    for k in sorted(cloud.proj.B, key=str):
        h.update(cloud.proj.B[k].numpy().tobytes())
    return h.hexdigest()


def test_training_one_user_leaves_other_users_unchanged_in_process(backbones):
    bb = backbones["mistral"]
    cfg = PrivateLoRAConfig(rank=8, device_tail_layers=1)
    cloud = CloudPart(bb, cfg)
    other = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(11, scale=2.0)
    other_dev = DevicePart(bb, cfg, other)
    prompt = list(range(5, 25))
    tokens0, logits0 = _logits(other_dev, cloud, prompt)
    digest0, m0 = _cloud_digest(cloud), [M.clone() for M in other.parameters()]
    trained = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint)
    dev = DevicePart(bb, cfg, trained)
    trainer = CloudTrainer(cloud)
    opt = torch.optim.AdamW(trained.parameters(), lr=0.05)
    inputs, labels = batch(seed=4)
    for _ in range(3):
        opt.zero_grad()
        run_step(trainer, TrainStep(dev, 5, inputs, labels))
        opt.step()
    assert any(M.abs().max() > 0 for M in trained.parameters())          # the trained user did change
    tokens1, logits1 = _logits(other_dev, cloud, prompt)
    assert tokens1 == tokens0 and torch.equal(logits1, logits0)          # bit-identical for the other user
    assert _cloud_digest(cloud) == digest0 and all(torch.equal(a, b) for a, b in zip(m0, other.parameters()))
    assert cloud.sessions == {} and trainer.sessions == {}


# ---------------------------------------------------------------- over TCP
def test_training_over_tcp_is_exact_private_and_isolated(backbones, monkeypatch):
    """Remote steps equal in-process steps; every frame the server decodes is recorded and
    checked (kinds, shapes, dtypes: no tokens, labels, logits or M); another user
    generating on the same endpoint meanwhile gets exactly what it gets alone."""
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=8, device_head_layers=1, device_tail_layers=1)
    d, r = bb.config.hidden_size, cfg.rank
    inputs, labels = batch(seed=6, lengths=(19, 12))         # n = 31 rows != rank
    n = sum(len(s) for s in inputs)

    # reference: two in-process steps
    ref_adapter, ref_dev, ref_cloud = parts(bb, cfg, scale=0.5)
    ref_trainer, ref_grads = CloudTrainer(ref_cloud), []
    for _ in range(2):
        for M in ref_adapter.parameters():
            M.grad = None
        run_step(ref_trainer, TrainStep(ref_dev, 1, inputs, labels))
        ref_grads.append([M.grad.clone() for M in ref_adapter.parameters()])
        with torch.no_grad():
            for M in ref_adapter.parameters():
                M -= 0.1 * M.grad

    other = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(21, scale=2.0)
    prompt, params = list(range(3, 15)), SamplingParams(max_new_tokens=10)
    alone = Generation(DevicePart(bb, cfg, other).session(1), prompt, params)
    InProcessRunner(CloudPart(bb, cfg)).run([alone])

    seen = []
    real = wire.decode_frame

    def record(buf, *, direction, **kw):
        msg, info = real(buf, direction=direction, **kw)
        if direction == wire.UP:   # what the cloud decodes
            seen.append(msg)
        return msg, info
    monkeypatch.setattr(wire, "decode_frame", record)

    adapter, dev, cloud = parts(bb, cfg, scale=0.5)
    secrets = [M.detach().clone() for M in adapter.parameters()]

    async def main():
        async with CloudEndpoint(cloud) as ep:
            trainer_client = await Client.connect(*ep.address)
            other_client = await Client.connect(*ep.address)
            sess = await trainer_client.open(session_geometry(cloud.layer_ids, d, cfg, "fp32"))
            grads = []

            async def train():
                for _ in range(2):
                    for M in adapter.parameters():
                        M.grad = None
                    await run_step_remote(sess, TrainStep(dev, sess.id, inputs, labels))
                    grads.append([M.grad.clone() for M in adapter.parameters()])
                    with torch.no_grad():
                        for M in adapter.parameters():
                            M -= 0.1 * M.grad
                await sess.close()
            _, gen = await asyncio.gather(train(), run_remote(other_client, DevicePart(bb, cfg, other), prompt,
                                                              params, dtype="fp32"))
            await trainer_client.close()
            await other_client.close()
            await asyncio.sleep(0.05)
            return grads, gen, ep.trainer.sessions, ep.trainer.steps
    grads, gen, left, steps = asyncio.run(main())

    for got, want in zip(grads, ref_grads):
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    assert gen.error is None and gen.tokens == alone.tokens
    assert left == {} and steps == 2

    mine = [m for m in seen if m.session == sess_id(seen)]
    kinds = [type(m).__name__ for m in mine]
    assert set(kinds) == {"Open", "TrainHandoff", "Reply", "GradHandoff", "GradActivations", "Close"}
    L = len(cloud.layer_ids)
    assert kinds.count("TrainHandoff") == 2 and kinds.count("GradHandoff") == 2
    assert kinds.count("Reply") == 2 * L and kinds.count("GradActivations") == 2 * L
    for m in mine:
        tensors = [getattr(m, f) for f in ("hidden", "grad") if hasattr(m, f)]
        tensors += list(getattr(m, "m", ())) + list(getattr(m, "grads", ()))
        for t in tensors:
            assert t.dtype == torch.float32 and not is_private(t)
            assert tuple(t.shape) in ((n, d), (n, r))
            if t.shape[1] == r:                                             # no r rows in a row equal an M
                assert not any(torch.equal(t[i:i + r], s) for i in range(n - r + 1) for s in secrets)
        if isinstance(m, TrainHandoff):
            assert m.lengths == (19, 12)
        for f in ("ids", "tokens", "labels", "logits", "loss", "M"):
            assert not hasattr(m, f)


def sess_id(seen):
    """The training session: the one whose frames include a TrainHandoff."""
    return next(m.session for m in seen if isinstance(m, TrainHandoff))
