import os
import stat

import pytest
import torch

from privatelora.runtime.accounting import naive_numbers_per_token_per_layer, privatelora_numbers_per_token_per_layer
from privatelora.model.adapters import AdapterError, PrivateAdapter, load_adapter, save_adapter
from privatelora.model.projections import PublicProjections
from privatelora.api import build_split
from privatelora.config import ConfigError, PrivateLoRAConfig
from privatelora.runtime.generation import Generation
from privatelora.model.sampling import SamplingParams
from privatelora.model.loading import ModelLoadError, load_backbone
from privatelora.privacy import PRIVATE_PREFIX, is_private
from privatelora.runtime.runner import InProcessRunner


def test_projections_are_public_and_deterministic(backbones):
    cfg = backbones["llama"].config     # the random scheme: drawn from the seed, no weights needed
    p1 = PublicProjections(cfg, PrivateLoRAConfig(rank=4, seed=3, projection="random"), range(2))
    p2 = PublicProjections(cfg, PrivateLoRAConfig(rank=4, seed=3, projection="random"), range(2))
    p3 = PublicProjections(cfg, PrivateLoRAConfig(rank=4, seed=4, projection="random"), range(2))
    assert all(torch.equal(p1.A[k], p2.A[k]) for k in p1.A)
    assert not torch.equal(p1.A[(0, "q")], p3.A[(0, "q")])
    assert p1.A[(0, "q")].shape == (4, cfg.hidden_size)
    assert p1.B[(0, "k")].shape == (cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads, 4)   # GQA: k is narrower
    shared = PublicProjections(cfg, PrivateLoRAConfig(rank=4, shared_a=True, projection="random"), range(2))
    assert set(k for _, k in shared.A) == {"shared"}


def test_private_adapter_names_prefix_zero_init_and_tag(backbones):
    bb = backbones["llama"]
    ad = PrivateAdapter(PrivateLoRAConfig(rank=4), bb.n_layers, bb.fingerprint)
    assert ad.M and all(n.startswith(PRIVATE_PREFIX) for n in ad.M)
    assert all(is_private(t) and not t.any() for t in ad.M.values())
    assert ad.num_parameters() == bb.n_layers * 3 * 16


def test_adapter_file_roundtrip_and_refusals(backbones, tmp_path):
    bb, other = backbones["llama"], backbones["qwen2"]
    cfg = PrivateLoRAConfig(rank=4)
    ad = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(7)
    path = tmp_path / "user.safetensors"
    save_adapter(ad, path)
    back = load_adapter(path, cfg, bb.n_layers, bb.fingerprint)
    assert all(torch.equal(ad.M[k], back.M[k]) for k in ad.M)
    with pytest.raises(AdapterError, match="another backbone"):
        load_adapter(path, cfg, other.n_layers, other.fingerprint)
    for bad in (PrivateLoRAConfig(rank=8), PrivateLoRAConfig(rank=4, shared_a=True),
                PrivateLoRAConfig(rank=4, seed=1), PrivateLoRAConfig(rank=4, targets=("q", "v"))):
        with pytest.raises(AdapterError, match="made for another"):
            load_adapter(path, bad, bb.n_layers, bb.fingerprint)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="not a readable"):
        load_adapter(junk, cfg, bb.n_layers, bb.fingerprint)
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors", cfg, bb.n_layers, bb.fingerprint)
    # the file's recorded config wins when building a split from it
    split = build_split(bb.model, PrivateLoRAConfig(rank=16), path, backbone=bb)
    assert split.cfg.rank == 4 and torch.equal(split.adapter.get(0, "q"), ad.get(0, "q"))


def test_adapter_with_nonfinite_values_refused(backbones, tmp_path):
    bb = backbones["llama"]
    cfg = PrivateLoRAConfig(rank=4)
    ad = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint)
    ad.M[next(iter(ad.M))][0, 0] = float("nan")
    save_adapter(ad, tmp_path / "nan.safetensors")
    with pytest.raises(AdapterError, match="finite"):
        load_adapter(tmp_path / "nan.safetensors", cfg, bb.n_layers, bb.fingerprint)


def test_config_validation():
    with pytest.raises(ConfigError):
        PrivateLoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="subset|among"):
        PrivateLoRAConfig(targets=("q", "o"))
    with pytest.raises(ConfigError, match="leave none"):
        PrivateLoRAConfig(device_head_layers=2, device_tail_layers=2).cloud_layers(4)
    assert PrivateLoRAConfig(targets=("v", "q")).targets == ("q", "v")


def test_unsupported_architecture_is_refused_clearly(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ModelLoadError, match="llama, mistral, qwen2"):
        load_backbone(model)
    model.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_backbone(tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_backbone(tmp_path / "nothing-here")


@pytest.mark.parametrize("shared_a", [False, True])
@pytest.mark.parametrize("variant", [{}, {"device_head_layers": 1, "device_tail_layers": 1}])
def test_bytes_per_token_per_layer_match_design_arithmetic(backbones, shared_a, variant):
    bb = backbones["qwen2"]
    r = 8
    split = build_split(bb.model, PrivateLoRAConfig(rank=r, shared_a=shared_a, **variant), backbone=bb)
    g = Generation(split.device.session(1), list(range(2, 12)), SamplingParams(max_new_tokens=6))
    InProcessRunner(split.cloud).run([g])
    c = g.device.comm
    cloud_layers = len(split.cloud.layer_ids)
    assert sorted(c.to_cloud) == split.cloud.layer_ids
    # 3r down + 3r up (6r); with shared A: r down + 3r up (4r)
    want = privatelora_numbers_per_token_per_layer(r, ("q", "k", "v"), shared_a)
    assert want["total"] == (4 * r if shared_a else 6 * r)
    tokens = 10 + 5   # prompt + 5 decode steps go through the cloud (the 6th token is not handed in)
    assert c.tokens == tokens
    for layer in split.cloud.layer_ids:
        assert c.to_cloud[layer] == tokens * want["to_cloud"]
        assert c.to_device[layer] == tokens * want["to_device"]
    d = c.to_dict()
    assert d["per_token_per_layer"]["total"] == want["total"] * 4    # fp32: 4 bytes a number
    assert d["to_cloud"] == 4 * (tokens * want["to_cloud"] * cloud_layers + c.handoff_to_cloud)
    # naive split of LoRA on q,k,v: d down + the three deltas up (4d without GQA)
    naive = naive_numbers_per_token_per_layer(bb.config, ("q", "k", "v"))
    kv = bb.config.num_key_value_heads * bb.config.hidden_size // bb.config.num_attention_heads
    assert naive == 2 * bb.config.hidden_size + 2 * kv


def test_adapter_files_are_written_atomically_and_private(tmp_path, monkeypatch):
    cfg = PrivateLoRAConfig(rank=4)
    old = PrivateAdapter(cfg, 4, "fp").randomize_(1)
    path = tmp_path / "me.safetensors"
    save_adapter(old, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    before = path.read_bytes()
    new = PrivateAdapter(cfg, 4, "fp").randomize_(2)

    def crash(*a):                     # the machine dies between writing and renaming
        raise OSError("disk gone")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_adapter(new, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["me.safetensors"]
    monkeypatch.undo()
    save_adapter(new, path)            # replaced whole, still private, nothing left behind
    assert [p.name for p in tmp_path.iterdir()] == ["me.safetensors"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    got = load_adapter(path, cfg, 4, "fp")
    assert all(torch.equal(got.M[k], new.M[k]) for k in new.M)
