"""An edge host's users answered together: ``logits_many`` and ``DeviceBatch``.

- The batched LM head equals each session's own ``logits``; a part with device tail
  layers is left alone, and a stale precomputation is never used.
- Over TCP, sessions sharing a ``DeviceBatch`` (plain, speculative, and one not in the
  batch, on one connection) generate exactly what each generates alone, with the same
  round trips and frame counts, and the stage's replies really were answered together,
  in bundle frames both ways (the replies up, then the activations down).
- A session whose frames a burst handler answers does not time out while the cloud keeps
  talking to it, and still times out when the cloud goes silent.
"""

import asyncio

import pytest
import torch

from privatelora import wire
from privatelora.api import build_split
from privatelora.config import PrivateLoRAConfig
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.loading import load_backbone
from privatelora.model.sampling import SamplingParams
from privatelora.runtime.device import DevicePart, logits_many, replies_many
from privatelora.runtime.draft import NgramDraft
from privatelora.runtime.generation import Generation
from privatelora.runtime.messages import Activations, Handoff, Reply
from privatelora.runtime.runner import InProcessRunner
from privatelora.serving.endpoint import CloudEndpoint
from privatelora.serving.remote import DeviceBatch, run_remote
from privatelora.transport import Client
from privatelora.transport.client import Session

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mistral():
    return load_backbone("tiny-mistral")


def _devices(bb, cfg, n, seed=30):
    return [DevicePart(bb, cfg, PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(seed + i, scale=2.0))
            for i in range(n)]


def test_logits_many_equals_each_logits_and_skips_tail_layers(mistral):
    cfg = PrivateLoRAConfig(rank=8)
    parts = _devices(mistral, cfg, 3)
    d = mistral.model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    backs = [Handoff(j, 4, torch.randn(rows, d, generator=g), rows > 1) for j, rows in enumerate((1, 1, 4))]
    batched = [p.session(j) for j, p in enumerate(parts)]
    alone = [p.session(j) for j, p in enumerate(parts)]
    logits_many(list(zip(batched, backs)))
    assert all(s._primed is not None for s in batched)
    for s, s2, b in zip(batched, alone, backs):
        got, want = s.logits(b), s2.logits(b)
        assert got.shape == want.shape == (1, mistral.model.config.vocab_size)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        assert s._primed is None                                   # used once
    logits_many([(batched[2], backs[2])])                          # every row, for a verify
    got, want = batched[2].logits(backs[2], all_rows=True), alone[2].logits(backs[2], all_rows=True)
    assert got.shape == want.shape == (4, mistral.model.config.vocab_size)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # a precomputation for another hand-off is not used
    s, s2 = parts[0].session(9), parts[0].session(9)
    logits_many([(s, backs[1])])
    assert torch.allclose(s.logits(backs[0]), s2.logits(backs[0]), atol=1e-5)
    # device tail layers: the batch leaves the session to ``logits``
    tail = DevicePart(mistral, PrivateLoRAConfig(rank=8, device_tail_layers=1))
    t = tail.session(5)
    logits_many([(t, backs[0])])
    assert t._primed is None


def _alone(bb, cfg, part, prompt, params, draft=None):
    g = Generation(part.session(1), prompt, params, draft=draft)
    InProcessRunner(build_split(cfg=cfg, backbone=bb).cloud).run([g])
    return g


def test_replies_many_equals_each_reply_and_isolates_a_bad_one(mistral):
    cfg = PrivateLoRAConfig(rank=4)
    parts = _devices(mistral, cfg, 5)
    alone = [p.session(i + 1) for i, p in enumerate(parts)]
    together = [p.session(i + 1) for i, p in enumerate(parts)]
    layers = cfg.exchange_layers(mistral.n_layers)
    g = torch.Generator().manual_seed(5)

    def acts(rows_of):
        # decode rows at the first adapted layer, a prefill's rows and another layer mixed in
        return [Activations(i + 1, layers[i % 2], tuple(torch.randn(rows_of(i), 4, generator=g) for _ in range(3)))
                for i in range(5)]
    stacks = {}
    for step, rows_of in enumerate((lambda i: 1, lambda i: 1 + (i == 3) * 6, lambda i: 1)):
        batch = acts(rows_of)
        if step == 2:      # a malformed one: refused alone, the others still answered
            batch[1] = Activations(2, batch[1].layer, batch[1].a[:2])
        got = replies_many(list(zip(together, batch)), stacks)
        for i, (s, act, rep) in enumerate(zip(alone, batch, got)):
            if step == 2 and i == 1:
                with pytest.raises(IndexError):
                    s.reply(act)
                assert isinstance(rep, IndexError)
                continue
            want = s.reply(act)
            assert isinstance(rep, Reply) and (rep.session, rep.layer) == (want.session, want.layer)
            assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(rep.m, want.m))
        assert [s.comm.to_device for s in together] == [s.comm.to_device for s in alone]
        assert [s.comm.to_cloud for s in together] == [s.comm.to_cloud for s in alone]
    assert stacks       # the decode groups used the stacked M's
    # an M changed in place (a training step) is seen at once, stacked copy or not
    with torch.no_grad():
        parts[0].adapter.get(layers[0], cfg.targets[0]).add_(1.0)
    batch = acts(lambda i: 1)
    for s, act, rep in zip(alone, batch, replies_many(list(zip(together, batch)), stacks)):
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(rep.m, s.reply(act).m))


def test_device_batch_over_tcp_is_exact_and_answers_stages_together(mistral, monkeypatch):
    cfg = PrivateLoRAConfig(rank=8)
    parts = _devices(mistral, cfg, 5, seed=50)
    prompts = [[(5 * i + 3 * u) % 200 + 2 for i in range(6 + 3 * u)] for u in range(5)]
    params = SamplingParams(max_new_tokens=10)
    drafts = [None, None, NgramDraft(), None, None]
    batched = [True, True, True, True, False]         # the last one answers its own frames
    calls = []
    real = DeviceBatch.__call__

    def counting(self, client, items):
        calls.append(sum(isinstance(m, Activations) for _, m in items))
        return real(self, client, items)
    monkeypatch.setattr(DeviceBatch, "__call__", counting)
    heads = []
    real_heads = logits_many

    def counting_heads(items):
        heads.append(len(items))
        return real_heads(items)
    monkeypatch.setattr("privatelora.serving.remote.logits_many", counting_heads)
    bundles_down = []
    real_bundle = Client._on_bundle

    def counting_bundles(self, frame):
        bundles_down.append(len(frame))
        return real_bundle(self, frame)
    monkeypatch.setattr(Client, "_on_bundle", counting_bundles)
    bundles_up = []

    async def main():
        split = build_split(cfg=cfg, backbone=mistral)
        batch = DeviceBatch()
        async with CloudEndpoint(split.cloud) as ep:
            ep.server.tap = lambda cid, frame: frame[5] == wire.BUNDLE_CODE and bundles_up.append(len(frame))
            client = await Client.connect(*ep.address)
            gens = await asyncio.gather(*[
                run_remote(client, p, pr, params, draft=dr, batch=batch if b else None, timeout=30.0)
                for p, pr, dr, b in zip(parts, prompts, drafts, batched)])
            await client.close()
            return gens, ep.server.stats.as_dict(), batch
    gens, stats, batch = asyncio.run(main())
    for g, p, pr, dr in zip(gens, parts, prompts, drafts):
        want = _alone(mistral, cfg, p, pr, params, NgramDraft() if dr is not None else None)
        assert g.error is None and g.tokens == want.tokens
        assert g.round_trips == want.round_trips
        assert g.device.comm.to_device == want.device.comm.to_device
    assert stats["up"]["reply"]["frames"] + stats["up"]["handoff"]["frames"] == sum(g.round_trips for g in gens)
    assert max(calls) >= 2                 # one burst answered several sessions' activations
    assert max(heads) >= 2                 # several sessions' LM heads in one product
    assert not batch._runs                 # every session detached when it ended
    assert bundles_up and bundles_down     # replies went up in bundles, and then activations came down in them
    assert "refused" not in stats["up"]    # no entry of a bundle was refused


def test_recv_timeout_counts_frames_a_burst_handler_answered():
    async def main():
        loop = asyncio.get_running_loop()
        sess = Session(None, 1, b"k" * 32, None)

        async def chatter(n):            # the cloud keeps talking; the handler hears it
            for _ in range(n):
                await asyncio.sleep(0.05)
                sess.last_heard = loop.time()
            sess.deliver("answer")
        task = asyncio.create_task(chatter(8))            # 0.4 s of traffic, timeout 0.15 s
        assert await sess.recv(timeout=0.15) == "answer"
        await task
        with pytest.raises(TimeoutError):                 # silence: the timeout still applies
            await sess.recv(timeout=0.1)
    asyncio.run(main())


def test_a_burst_for_a_session_let_go_meanwhile_goes_to_its_queue(caplog):
    async def main():
        client = Client.__new__(Client)            # no socket needed: only the burst hand-over
        client._burst = []
        seen = []
        kept, gone = Session(client, 1, b"k" * 32, None), Session(client, 2, b"k" * 32, None)
        kept.burst = gone.burst = lambda c, items: seen.extend(items)
        client._burst += [(kept, "for the handler"), (gone, "late")]
        gone.burst = None                          # its generation ended before the burst's turn
        client._end_burst()
        assert seen == [(kept, "for the handler")]
        assert gone._queue.get_nowait() == "late" and kept._queue.empty()
    asyncio.run(main())
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
