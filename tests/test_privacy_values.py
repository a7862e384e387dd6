"""Privacy checks that follow values, not objects (privacy.py's registry, the wire
encoder's ``private_value`` refusal, ``audit_frames(private=..., token_ids=...)``).

A copy of M (``M.clone()``, its transpose, fp16/bf16 casts, one row of another layer's M
among honest rows) or token ids cast to float must be refused by the encoder and caught by
the frame audit; honest replies ``M A h`` (thousands of random draws at rank 4, zero
replies, real generations and training steps over TCP) must never be.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from privatelora import wire
from privatelora.api import build_split
from privatelora.config import PrivateLoRAConfig
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.loading import load_backbone
from privatelora.model.sampling import SamplingParams
from privatelora.placement.checks import audit_frames
from privatelora.privacy import ValueIndex, private_match, register_private_tokens
from privatelora.runtime.cloud import CloudPart
from privatelora.runtime.device import DevicePart
from privatelora.runtime.train_messages import GradActivations
from privatelora.serving.endpoint import CloudEndpoint
from privatelora.serving.remote import run_remote
from privatelora.training.cloud import CloudTrainer
from privatelora.training.device import TrainStep
from privatelora.transport import Client
from privatelora.wire import PrivacyError, Reply
from privatelora.wire import tensors as wire_tensors

KEY = bytes(range(32))
pytestmark = pytest.mark.usefixtures("one_thread")


def geometry(rank, layers=(0, 1, 2, 3), hidden=32, dtype="fp32"):
    return wire.Geometry(hidden=hidden, rank=rank, targets=("q", "k", "v"), shared_a=False,
                         layers=tuple(layers), dtype=dtype)


def up(msg, g, **kw):
    return wire.encode(msg, key=KEY, direction="up", geometry=g, **kw)


@pytest.fixture
def adapter():
    return PrivateAdapter(PrivateLoRAConfig(rank=8), 4, "test").randomize_(5, scale=0.3)


def test_encoder_refuses_private_values_whatever_the_object(adapter):
    g, M, other = geometry(8), adapter.get(1, "k"), adapter.get(3, "v")
    honest = torch.randn(2, 8) @ M.T
    ids = register_private_tokens(torch.tensor([17, 5, 230, 42, 9]))
    padded = torch.zeros(1, 8)
    padded[0, :5] = ids.float()
    cases = {
        "clone": (M.clone(),) * 3,
        "transpose": (M.T.contiguous(),) * 3,
        "fp16": (M.half(), M.half(), M.half()),
        "bf16": (M.to(torch.bfloat16),) * 3,
        "another layer's row among honest rows": (honest, honest, torch.cat([honest[:1], other[5:6]])),
        "ids padded to rank": (padded, padded * 0, padded * 0),
    }
    for name, m in cases.items():
        for dtype in ("fp32", "fp16", "int8"):
            with pytest.raises(PrivacyError) as e:
                up(Reply(1, 0, m), geometry(8, dtype=dtype))
            assert e.value.code == "private_value", name
    with pytest.raises(PrivacyError, match=r"m\[2\] row 1 equals row 5 of a private M \(private.layers.3.v.M\)"):
        up(Reply(1, 0, cases["another layer's row among honest rows"]), g)
    with pytest.raises(PrivacyError, match="private token ids"):
        up(Reply(1, 0, cases["ids padded to rank"]), g)
    with pytest.raises(PrivacyError, match="tagged private"):           # the object check stays
        up(Reply(1, 0, (M,) * 3), g)
    # in place changes are followed: the old values stop matching, the new ones match
    old = M.clone()
    with torch.no_grad():
        M.mul_(-1.5)
    assert private_match(M.clone()) and private_match(old) is None


def test_honest_replies_are_never_refused_at_rank_4():
    cfg = PrivateLoRAConfig(rank=4)
    adapters = [PrivateAdapter(cfg, 8, "test").randomize_(s, scale=0.3) for s in (1, 2)]   # 384 vectors
    g = geometry(4, layers=range(8))
    gen = torch.Generator().manual_seed(0)
    ids = register_private_tokens(torch.randint(0, 250, (64,), generator=gen))   # noqa: F841 (kept alive)
    for i in range(3000):
        a, layer = adapters[i % 2], i % 8
        n = 1 + i % 3
        scale = 10 ** (4 * torch.rand((), generator=gen).item() - 2)          # 0.01 .. 100
        h = torch.randn(n, 4, generator=gen) * scale
        m = tuple(h @ a.get(layer, t).T for t in cfg.targets)
        up(Reply(1, layer, m), g)
        if i % 10 == 0:
            up(Reply(1, layer, tuple(torch.zeros(n, 4) for _ in cfg.targets)), g)   # M = 0: zero replies
    # a bulk draw at the worst scale (rows distributed like M's own entries), vectorized path
    sigma = float(torch.cat([M.flatten() for M in adapters[0].parameters()]).std())
    assert private_match(torch.randn(200_000, 4, generator=gen) * sigma) is None
    assert private_match(torch.randn(200_000, 4, generator=gen) @ adapters[1].get(2, "q").T) is None


def test_value_index_tolerance_covers_wire_rounding(adapter):
    Ms = adapter.parameters()
    M = Ms[4]
    s = M.abs().amax(1, keepdim=True) / 127
    assert private_match(torch.round(M / s) * s)                            # int8 per-row absmax
    index, int8 = ValueIndex(Ms), ValueIndex(Ms, slack=2.0)
    b = M.to(torch.bfloat16).float()
    s = b.abs().amax(1, keepdim=True) / 127
    assert int8.match(torch.round(b / s) * s)                                # bf16, then int8
    assert index.match(2 * M) is None                                        # scaling: out of scope
    assert index.match(torch.zeros(3, 8)) is None


def _record_generation(bb, cfg, adapter, prompt, params, dtype):
    async def main():
        frames = []
        async with CloudEndpoint(build_split(cfg=cfg, backbone=bb).cloud) as ep:
            ep.server.tap = lambda cid, frame: frames.append(bytes(frame))
            async with await Client.connect(*ep.address) as client:
                gen = await run_remote(client, DevicePart(bb, cfg, adapter), prompt, params, dtype=dtype)
        return gen, frames
    return asyncio.run(main())


def test_generation_over_tcp_passes_the_value_audit_and_forgeries_are_caught():
    bb = load_backbone("tiny-llama")
    cfg = PrivateLoRAConfig(rank=8)
    adapter = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(11, scale=0.3)
    prompt, params = [5, 6, 7, 8, 9, 10, 11], SamplingParams(max_new_tokens=8)
    d, Ms = bb.config.hidden_size, adapter.parameters()
    for dtype in ("fp32", "int8"):
        gen, frames = _record_generation(bb, cfg, adapter, prompt, params, dtype)
        assert gen.error is None and len(gen.tokens) == 8
        assert {"handoff", "reply"} <= {wire.peek_header(f).kind for f in frames}
        ids = torch.tensor(prompt + list(gen.tokens))
        assert audit_frames(frames, hidden=d, rank=cfg.rank, private=Ms, token_ids=[ids]) == [], dtype

    # forgeries: frames the encoder would refuse, encoded with its value check off
    part = DevicePart(bb, cfg, adapter)
    layer, M = part.exchange_ids[0], adapter.get(2, "q")
    padded = torch.zeros(cfg.rank, cfg.rank)
    padded[0, :7] = torch.tensor(prompt, dtype=torch.float32)
    honest = torch.randn(cfg.rank, cfg.rank) @ M.T
    saved = wire_tensors._check_values
    wire_tensors._check_values = lambda x, what: None
    try:
        forged = {(dtype, what): up(Reply(1, layer, m), wire.session_geometry(part.exchange_ids, d, cfg, dtype))
                  for dtype in ("fp32", "bf16", "int8")
                  for what, m in (("M", (honest, M.clone(), honest)), ("ids", (honest, honest, padded)))}
    finally:
        wire_tensors._check_values = saved
    ids = torch.tensor(prompt)
    for (dtype, what), frame in forged.items():
        bad = audit_frames([frame], hidden=d, rank=cfg.rank, private=Ms, token_ids=[ids])
        want = "m[1] row 0 equals row 0 of a private M" if what == "M" else "m[2] row 0 equals private token ids"
        assert len(bad) == 1 and want in bad[0], (dtype, what, bad)
    # without the values, the byte-level audit alone misses the int8 copy of M
    assert audit_frames([forged[("int8", "M")]], hidden=d, rank=cfg.rank,
                        forbidden=(M.numpy().astype("<f4").tobytes()[:32],)) == []


def test_training_steps_with_changing_m_pass_the_encoder_and_refuse_a_copy_of_m():
    bb = load_backbone("tiny-llama")
    cfg = PrivateLoRAConfig(rank=8, device_head_layers=1, device_tail_layers=1)
    adapter = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(3, scale=0.5)
    device, cloud = DevicePart(bb, cfg, adapter), CloudPart(bb, cfg)
    g = wire.session_geometry(cloud.layer_ids, bb.config.hidden_size, cfg, "fp32")
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randint(2, 250, (n,), generator=gen).tolist() for n in (13, 6)]
    labels = [torch.randint(2, 250, (n,), generator=gen).tolist() for n in (13, 6)]
    trainer, kinds = CloudTrainer(cloud), []
    for _ in range(3):
        for M in adapter.parameters():
            M.grad = None
        step = TrainStep(device, 1, inputs, labels)      # registers its ids and labels
        msg = step.start()
        while msg is not None:                           # every up message goes through the encoder
            up(msg, g)
            kinds.append(type(msg).__name__)
            msg = step.on(trainer.handle(msg))
        with torch.no_grad():
            for M in adapter.parameters():
                M -= 0.1 * M.grad                        # in place: the registry follows
        layer, M = cloud.layer_ids[0], adapter.get(cloud.layer_ids[0], "v")
        with pytest.raises(PrivacyError, match="private_value"):
            up(GradActivations(1, layer, (torch.randn(8, 8), M.detach().clone(), torch.randn(8, 8))), g)
        ids_row = torch.tensor(inputs[1] + [0, 0], dtype=torch.float32)[None]
        with pytest.raises(PrivacyError, match="private token ids"):
            up(GradActivations(1, layer, (ids_row,) * 3), g)
    assert {"TrainHandoff", "Reply", "GradHandoff", "GradActivations"} <= set(kinds)
