"""Fewer round trips per token, both exact: adapter placement and speculative decoding.

- Greedy generation with any placement, with and without a draft, is token-identical to
  the monolithic merged model carrying the same (random, non-zero) M on the same layers,
  for Llama, Mistral (sliding window) and Qwen2 (biases, GQA); with M = 0, to the untouched
  transformers model. Speculative and plain sessions batched in the same stages stay exact.
- Speculative sampling preserves the target distribution (statistical test, with a
  deliberately wrong acceptance rule that the same test rejects).
- A rewind touches only its own session; a start beyond the session's cache is refused.
"""

import math

import pytest
import torch

from privatelora.config import ConfigError, PrivateLoRAConfig
from privatelora.model import reference
from privatelora.model.adapters import AdapterError, PrivateAdapter, load_adapter, save_adapter
from privatelora.model.sampling import Sampler, SamplingParams
from privatelora.model.zoo import tiny_random
from privatelora.runtime.cloud import CloudPart
from privatelora.runtime.device import DevicePart
from privatelora.runtime.draft import ModelDraft, NgramDraft, load_draft
from privatelora.runtime.generation import Generation
from privatelora.runtime.messages import Error, Handoff
from privatelora.runtime.runner import InProcessRunner

# 20 + 32 positions > the tiny Mistral/Qwen2 sliding window (24): windows are exercised
PROMPT = [(7 * i + 3) % 250 + 2 for i in range(20)]
PLACEMENTS = ["all", "last:1", "first:1", "every:2", "1,2"]


def _parts(bb, cfg, seed=1, scale=2.0):
    adapter = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint)
    if scale:
        adapter.randomize_(seed, scale=scale)
    return adapter, CloudPart(bb, cfg), DevicePart(bb, cfg, adapter)


def _drafts(bb, merged):
    """A draft that always agrees (the merged target itself), one that rarely does (another
    random model), and n-gram lookup."""
    other = tiny_random(bb.model.config.model_type, seed=7)
    return {"self": ModelDraft(merged), "other": ModelDraft(other), "ngram": NgramDraft()}


def test_placement_specs():
    n = 16
    assert PrivateLoRAConfig(adapted_layers="all").adapted(n) == tuple(range(16))
    assert PrivateLoRAConfig(adapted_layers="last:2").adapted(n) == (14, 15)
    assert PrivateLoRAConfig(adapted_layers="first:3").adapted(n) == (0, 1, 2)
    assert PrivateLoRAConfig(adapted_layers="every:4").adapted(n) == (3, 7, 11, 15)
    assert PrivateLoRAConfig(adapted_layers="8, 0,16".replace("16", "15")).adapted(n) == (0, 8, 15)
    cfg = PrivateLoRAConfig(adapted_layers="last:2", device_tail_layers=1)
    assert cfg.exchange_layers(n) == (14,)                 # layer 15 is adapted, but on the device
    for bad in ("last:0", "some", "1,,2", "every:-1"):
        with pytest.raises(ConfigError):
            PrivateLoRAConfig(adapted_layers=bad)
    with pytest.raises(ConfigError, match="only 16 layers"):
        PrivateLoRAConfig(adapted_layers="last:17").adapted(n)
    with pytest.raises(ConfigError, match="does not exist"):
        PrivateLoRAConfig(adapted_layers="3,16").adapted(n)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_any_placement_with_and_without_drafts_equals_the_merged_model(backbones, family, placement):
    bb = backbones[family]
    for local in ({}, {"device_head_layers": 1, "device_tail_layers": 1}):
        cfg = PrivateLoRAConfig(rank=8, adapted_layers=placement, **local)
        adapter, cloud, device = _parts(bb, cfg)
        assert set(adapter.M) == {f"private.layers.{i}.{t}.M" for i in cfg.adapted(bb.n_layers) for t in "qkv"}
        merged = reference.merged_model(bb, adapter)
        want, _ = reference.generate(merged, PROMPT, SamplingParams(max_new_tokens=32))
        gens = [Generation(device.session(1), PROMPT, SamplingParams(max_new_tokens=32))]
        for i, (name, d) in enumerate(_drafts(bb, merged).items()):
            gens.append(Generation(device.session(10 + i), PROMPT, SamplingParams(max_new_tokens=32), draft=d,
                                   draft_tokens=3 if name == "ngram" else 4))
        InProcessRunner(cloud).run(gens)          # speculative and plain sessions share stages
        for g in gens:
            assert g.error is None and g.tokens == want, (family, placement, local, g.draft)
        rt = len(cloud.exchange_ids) + 1
        assert gens[0].round_trips == rt * 32     # prefill chain + one chain per further token
        assert gens[1].accepted == gens[1].proposed > 0         # the perfect draft: every drafted token kept
        assert gens[1].round_trips <= rt * (1 + math.ceil(31 / 5))    # 5 tokens per verify chain
        assert all(g.proposed >= g.accepted for g in gens[1:])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_zero_m_with_a_placement_and_a_draft_is_the_untouched_model(backbones, family):
    bb = backbones[family]
    _, cloud, device = _parts(bb, PrivateLoRAConfig(rank=8, adapted_layers="last:2"), scale=0)
    want, _ = reference.generate(bb.model, PROMPT, SamplingParams(max_new_tokens=24))
    g = Generation(device.session(3), PROMPT, SamplingParams(max_new_tokens=24), draft=NgramDraft())
    h = Generation(device.session(4), PROMPT, SamplingParams(max_new_tokens=24), draft=ModelDraft(bb.model))
    InProcessRunner(cloud).run([g, h])
    assert g.tokens == want and h.tokens == want
    assert h.accepted == h.proposed > 0          # M = 0: the draft is the target, every draft is accepted


def test_speculative_sessions_stop_at_stop_tokens_and_budget(backbones):
    bb = backbones["llama"]
    adapter, cloud, device = _parts(bb, PrivateLoRAConfig(rank=8, adapted_layers="last:1"))
    want, _ = reference.generate(reference.merged_model(bb, adapter), PROMPT, SamplingParams(max_new_tokens=30))
    stop = want[7]
    first_stop = want.index(stop)
    for k in (1, 4, 7):
        g = Generation(device.session(k), PROMPT, SamplingParams(max_new_tokens=30, stop_ids=(stop,)),
                       draft=ModelDraft(bb.model), draft_tokens=k)
        InProcessRunner(cloud).run([g])
        assert g.tokens == want[:first_stop + 1] and g.finish_reason == "stop"
        g = Generation(device.session(100 + k), PROMPT, SamplingParams(max_new_tokens=5), draft=NgramDraft(),
                       draft_tokens=k)
        InProcessRunner(cloud).run([g])
        assert g.tokens == want[:5] and g.finish_reason == "length"


def _chain(cloud, dev, ids):
    """One chain of round trips for ``ids`` handed in by ``dev``; returns the final hand-off."""
    msg = dev.hand_in(ids)
    while True:
        (ans,) = cloud.run([msg])
        if isinstance(ans, Handoff):
            dev.logits(ans)
            return ans
        assert not isinstance(ans, Error), ans
        msg = dev.reply(ans)


def test_a_rewind_touches_only_its_own_session_and_a_start_beyond_the_cache_is_refused(backbones):
    bb = backbones["llama"]
    _, cloud, device = _parts(bb, PrivateLoRAConfig(rank=8, adapted_layers="1,3"))
    a, b = device.session(1), device.session(2)
    for dev, ids in ((a, PROMPT), (b, PROMPT[:9])):
        cloud.open(dev.session)
        _chain(cloud, dev, ids)
        _chain(cloud, dev, [5, 6, 7])                    # a verify chain: one token plus two drafts
    kv = lambda sid: {layer: cloud.kv_length(sid) for layer in cloud.layer_ids}   # noqa: E731
    assert set(kv(1)) == set(cloud.layer_ids) and set(kv(1).values()) == {23} and set(kv(2).values()) == {12}
    x = torch.randn(1, bb.config.hidden_size)
    (err,) = cloud.run([Handoff(1, 24, x)])              # beyond session 1's 23 cached positions
    assert isinstance(err, Error) and err.code == "bad_position"
    assert set(kv(1).values()) == {23}                   # a refused request changes nothing
    a.rewind(21)                                         # the device rejected both drafts
    _chain(cloud, a, [9])                                # ... and hands in its next token at 21
    assert set(kv(1).values()) == {22} and set(kv(2).values()) == {12}     # session 2 untouched
    with pytest.raises(Exception):
        a.rewind(23)                                     # the device cannot rewind forward either


def test_an_adapter_for_another_placement_is_refused(tmp_path, backbones):
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4, adapted_layers="last:1")
    ad = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(0)
    path = tmp_path / "a.safetensors"
    save_adapter(ad, path)
    assert load_adapter(path, cfg, bb.n_layers, bb.fingerprint).layers == (3,)
    assert load_adapter(path, PrivateLoRAConfig(rank=4, adapted_layers="3"), bb.n_layers, bb.fingerprint)
    with pytest.raises(AdapterError, match="adapted_layers"):
        load_adapter(path, PrivateLoRAConfig(rank=4), bb.n_layers, bb.fingerprint)
    with pytest.raises(Exception, match="adapted layers"):
        DevicePart(bb, PrivateLoRAConfig(rank=4), ad)


def test_a_draft_must_share_the_targets_vocabulary(tmp_path, backbones):
    other = tiny_random("llama", vocab_size=300)
    other.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="vocabulary"):
        load_draft(str(tmp_path), backbones["llama"])
    with pytest.raises(Exception, match="no config.json"):
        load_draft(str(tmp_path / "nothing"), backbones["llama"])
    assert load_draft("ngram").propose([1, 2, 3, 1, 2], 3) == ([3, 1, 2], None)


# ---------------------------------------------------------------- speculative sampling
V = 6
P_LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
Q = torch.tensor([0.05, 0.4, 0.3, 0.1, 0.1, 0.05])            # a poor draft: far from p


def _wrong_verify(sampler, logits, drafts, draft_probs):
    """A tempting but wrong rule: on rejection, resample from p instead of the residual."""
    for i, d in enumerate(drafts):
        p = sampler.probs(logits[i])
        p = p / p.sum()
        q = draft_probs[i] / draft_probs[i].sum()
        if sampler.uniform() < min(1.0, float(p[d] / q[d])):
            continue
        return i, sampler.draw(p)
    return len(drafts), sampler.draw(sampler.probs(logits[len(drafts)]))


def _frequencies(verify, temperature, top_p, deterministic, draws=12000, k=2):
    """Empirical distribution of the first two tokens a verify chain emits."""
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=1234)
    sampler = Sampler(params)
    g = torch.Generator().manual_seed(99)
    logits = P_LOGITS.expand(k + 1, V)
    counts = torch.zeros(2, V)
    for _ in range(draws):
        drafts = [int(torch.multinomial(Q, 1, generator=g)) for _ in range(k)]
        probs = None if deterministic else [Q] * k
        n, nxt = verify(sampler, logits, drafts, probs)
        emitted = drafts[:n] + [nxt]
        counts[0, emitted[0]] += 1
        if len(emitted) > 1:
            counts[1, emitted[1]] += 1
    return counts / counts.sum(dim=1, keepdim=True), counts.sum(dim=1), Sampler(params).probs(P_LOGITS)


def _max_z(freq, n, p):
    p = p / p.sum()
    return float(((freq - p).abs() / torch.sqrt(p * (1 - p) / n + 1e-12)).max())


@pytest.mark.parametrize("temperature,top_p,deterministic", [(1.0, 1.0, False), (0.7, 0.9, False), (1.0, 1.0, True)])
def test_speculative_sampling_preserves_the_target_distribution(temperature, top_p, deterministic):
    freq, n, p = _frequencies(lambda s, *a: s.verify(*a), temperature, top_p, deterministic)
    # every emitted token, first or second, is distributed as p: |freq - p| within 4.5 standard errors
    # on each of the 6 tokens (a false alarm has probability < 1e-4)
    for row in range(2):
        assert _max_z(freq[row], n[row], p) < 4.5, (row, freq[row], p / p.sum())


def test_the_distribution_test_rejects_a_wrong_acceptance_rule():
    freq, n, p = _frequencies(_wrong_verify, 1.0, 1.0, False)
    assert _max_z(freq[0], n[0], p) > 10              # the same test, far outside its tolerance


def test_greedy_verify_keeps_the_agreeing_prefix():
    s = Sampler(SamplingParams())
    logits = torch.eye(5)[[1, 2, 4, 0]] * 3          # argmax per row: 1, 2, 4, 0
    assert s.verify(logits, [1, 2, 3]) == (2, 4)
    assert s.verify(logits, [1, 2, 4]) == (3, 0)
    assert s.verify(logits, [0, 2, 4]) == (0, 1)
    with pytest.raises(Exception):
        s.verify(logits, [1, 2])
    assert math.isclose(float(Sampler(SamplingParams(temperature=1.0)).probs(torch.zeros(4)).sum()), 1.0)


# ---------------------------------------------------------------- split training with placements
@pytest.mark.parametrize("placement", ["last:1", "1,2", "every:2", "0"])
def test_split_training_gradients_equal_autograd_for_any_placement(backbones, placement):
    from privatelora.training.cloud import CloudTrainer
    from privatelora.training.device import TrainStep, monolithic_loss_and_grads, run_step
    bb = backbones["qwen2"]
    inputs, labels = [[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[6, 7, 8, 9, 10, 11], [12, 13, -100]]
    for local in ({}, {"device_head_layers": 1}, {"device_head_layers": 1, "device_tail_layers": 1}):
        cfg = PrivateLoRAConfig(rank=4, adapted_layers=placement, **local)
        adapter, cloud, device = _parts(bb, cfg, scale=0.5)
        step = run_step(CloudTrainer(cloud), TrainStep(device, 1, inputs, labels))
        loss, grads = monolithic_loss_and_grads(bb, adapter, inputs, labels)
        assert abs(step.loss - loss) < 1e-5
        assert set(grads) == set(adapter.M)
        for name, M in adapter.named_parameters():
            assert torch.allclose(M.grad, grads[name], rtol=1e-4, atol=1e-6), (placement, local, name)
