"""The central correctness test: split execution equals the monolithic merged model.

Tolerance: logits agree within 1e-4 (max abs, fp32); greedy tokens are identical.
"""

import pytest
import torch

from privatelora.model import reference
from privatelora.model.adapters import PrivateAdapter
from privatelora.runtime.cloud import CloudPart
from privatelora.config import PrivateLoRAConfig
from privatelora.runtime.device import DevicePart
from privatelora.runtime.generation import Generation
from privatelora.model.sampling import SamplingParams
from privatelora.runtime.runner import InProcessRunner

TOL = 1e-4
VARIANTS = {
    "default": {},
    "shared_a": {"shared_a": True},
    "head1_tail1": {"device_head_layers": 1, "device_tail_layers": 1},
}
# 20 + 32 positions > the tiny Mistral/Qwen2 sliding window (24): windows are exercised
PROMPT = [(7 * i + 3) % 250 + 2 for i in range(20)]


def _split(bb, cfg, seed=1, scale=2.0):
    adapter = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(seed, scale=scale)
    return adapter, CloudPart(bb, cfg), DevicePart(bb, cfg, adapter)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_split_equals_merged_monolithic(backbones, family, variant):
    bb = backbones[family]
    cfg = PrivateLoRAConfig(rank=8, **VARIANTS[variant])
    adapter, cloud, device = _split(bb, cfg)
    g = Generation(device.session(1), PROMPT, SamplingParams(max_new_tokens=32), keep_logits=True)
    InProcessRunner(cloud).run([g])
    merged = reference.merged_model(bb, adapter)
    tokens, ref_logits = reference.generate(merged, PROMPT, SamplingParams(max_new_tokens=32), keep_logits=True)
    assert len(g.tokens) == 32
    assert g.tokens == tokens
    # the adapter must matter, or the comparison proves nothing
    base_tokens, base_logits = reference.generate(bb.model, PROMPT, SamplingParams(max_new_tokens=32), keep_logits=True)
    assert (base_logits[0] - ref_logits[0]).abs().max() > 0.1
    assert g.logits[0].shape == (len(PROMPT), bb.config.vocab_size)          # prefill: every row
    assert (g.logits[0] - ref_logits[0]).abs().max() < TOL
    decode_err = max((a - b).abs().max().item() for a, b in zip(g.logits[1:], ref_logits[1:]))
    assert len(g.logits) == 32 and decode_err < TOL


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_zero_m_reproduces_untouched_base_model(backbones, family):
    bb = backbones[family]
    cfg = PrivateLoRAConfig(rank=8, device_head_layers=1)
    cloud, device = CloudPart(bb, cfg), DevicePart(bb, cfg)   # no adapter: M = 0
    g = Generation(device.session(1), PROMPT, SamplingParams(max_new_tokens=8), keep_logits=True)
    InProcessRunner(cloud).run([g])
    seq = PROMPT + g.tokens[:-1]
    base = reference.full_logits(bb.model, seq)
    got = torch.cat([g.logits[0]] + [l[-1:] for l in g.logits[1:]])
    assert (got - base).abs().max() < TOL


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sampled_generation_matches_monolithic(backbones, family):
    bb = backbones[family]
    cfg = PrivateLoRAConfig(rank=8)
    adapter, cloud, device = _split(bb, cfg, seed=5)
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=42)
    g = Generation(device.session(1), PROMPT, params)
    InProcessRunner(cloud).run([g])
    tokens, _ = reference.generate(reference.merged_model(bb, adapter), PROMPT, params)
    assert g.tokens == tokens
    greedy, _ = reference.generate(reference.merged_model(bb, adapter), PROMPT, SamplingParams(max_new_tokens=24))
    assert tokens != greedy   # sampling actually sampled


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_five_sessions_sharing_stages_equal_isolated_runs(backbones, family):
    bb = backbones[family]
    cfg = PrivateLoRAConfig(rank=8, shared_a=family == "mistral")
    lengths = [3, 11, 1, 17, 6]
    starts = [0, 2, 3, 7, 12]
    adapters = [PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(10 + i, scale=2.0) for i in range(5)]
    prompts = [[(13 * i + 5 * j) % 250 + 2 for j in range(n)] for i, n in enumerate(lengths)]
    params = [SamplingParams(max_new_tokens=12 + 2 * i, temperature=0.7 if i % 2 else 0.0, seed=i) for i in range(5)]

    def gens(shared_cloud=None):
        out = []
        for i in range(5):
            dev = DevicePart(bb, cfg, adapters[i])
            out.append(Generation(dev.session(i + 1), prompts[i], params[i], keep_logits=True))
        return out

    together = gens()
    cloud = CloudPart(bb, cfg)
    stats = InProcessRunner(cloud).run(together, starts)
    assert stats.mean_batch_size > 1.5, "sessions never shared a stage"
    assert cloud.sessions == {} and cloud.kv_bytes() == 0   # closed sessions freed their caches
    for i, g in enumerate(gens()):
        InProcessRunner(CloudPart(bb, cfg)).run([g])
        assert together[i].tokens == g.tokens
        for a, b in zip(together[i].logits, g.logits):
            assert (a - b).abs().max() < 1e-5


def test_policy_all_also_matches(backbones):
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4)
    adapter, cloud, device = _split(bb, cfg)
    gs = [Generation(device.session(i), PROMPT[: 5 + i], SamplingParams(max_new_tokens=6)) for i in range(3)]
    InProcessRunner(cloud, policy="all").run(gs, [0, 1, 1])
    merged = reference.merged_model(bb, adapter)
    for i, g in enumerate(gs):
        assert g.tokens == reference.generate(merged, PROMPT[: 5 + i], SamplingParams(max_new_tokens=6))[0]


def test_stop_tokens_and_max_tokens(backbones):
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4)
    adapter, cloud, device = _split(bb, cfg)
    free = Generation(device.session(1), PROMPT, SamplingParams(max_new_tokens=10))
    InProcessRunner(cloud).run([free])
    assert len(free.tokens) == 10 and free.finish_reason == "length"
    stop_at = free.tokens[3]
    first = free.tokens.index(stop_at)
    stopped = Generation(device.session(2), PROMPT, SamplingParams(max_new_tokens=10, stop_ids=(stop_at,)))
    InProcessRunner(cloud).run([stopped])
    assert stopped.tokens == free.tokens[: first + 1] and stopped.finish_reason == "stop"
    none = Generation(device.session(3), PROMPT, SamplingParams(max_new_tokens=0))
    InProcessRunner(cloud).run([none])
    assert none.tokens == [] and cloud.sessions == {}
