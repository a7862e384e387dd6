"""A device reads only its own tensors from a checkpoint, and computes exactly what the
device part of a full load computes."""

from __future__ import annotations

import pytest
import torch

from privatelora.model.adapters import save_adapter
from privatelora.api import build_device, build_split
from privatelora.config import PrivateLoRAConfig
from privatelora.runtime.generation import Generation
from privatelora.model.sampling import SamplingParams
from privatelora.model.loading import ModelLoadError, load_backbone
from privatelora.runtime.runner import InProcessRunner
from privatelora.model.zoo import byte_tokenizer, tiny_random


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, fam, kw in (("llama", "llama", {}), ("qwen2", "qwen2", {}), ("tied", "llama", {"tie_word_embeddings": True})):
        d = tmp_path_factory.mktemp(name)
        tiny_random(fam, seed=5, **kw).save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("name", ["llama", "qwen2", "tied"])
@pytest.mark.parametrize("head_tail", [(0, 0), (1, 1)])
def test_device_only_load_matches_the_full_load(saved, one_thread, name, head_tail):
    cfg = PrivateLoRAConfig(rank=8, device_head_layers=head_tail[0], device_tail_layers=head_tail[1])
    split = build_split(str(saved[name]), cfg)
    split.adapter.randomize_(3, scale=0.5)
    adapter_file = saved[name] / f"adapter-{head_tail[0]}.safetensors"
    save_adapter(split.adapter, adapter_file)
    dev = build_device(str(saved[name]), cfg, str(adapter_file))
    assert dev.adapter.fingerprint == split.backbone.fingerprint      # the adapter file's check passed
    n = split.backbone.n_layers
    cloud_ids = set(cfg.cloud_layers(n))
    # the cloud's layers were never read: they exist only as meta tensors
    model_layers = [dev.local.get(i) for i in range(n)]
    assert all((m is None) == (i in cloud_ids) for i, m in enumerate(model_layers))
    # the same tokens and logits as the full load's device part, against the same cloud
    prompt = [5, 9, 2, 77, 31]
    out = []
    for device in (split.device, dev):
        g = Generation(device.session(1 + len(out)), prompt, SamplingParams(max_new_tokens=6), keep_logits=True)
        InProcessRunner(split.cloud).run([g])
        out.append(g)
    assert out[0].tokens == out[1].tokens
    assert max((a - b).abs().max().item() for a, b in zip(out[0].logits, out[1].logits)) < 1e-5


def test_device_only_load_never_materializes_cloud_layers(saved):
    bb = load_backbone(str(saved["llama"]), layers=[])
    assert bb.fingerprint == load_backbone(str(saved["llama"])).fingerprint
    assert all(p.device.type == "meta" for p in bb.model.model.layers.parameters())
    assert bb.model.model.embed_tokens.weight.device.type == "cpu" and bb.tokenizer is not None


def test_device_only_load_of_a_checkpoint_missing_the_head_is_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil
    d = tmp_path / "broken"
    shutil.copytree(saved["llama"], d)
    f = d / "model.safetensors"
    state = load_file(f)
    del state["lm_head.weight"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lm_head"):
        load_backbone(str(d), layers=[])


def test_sharded_checkpoints_and_other_safetensors_files(tmp_path):
    """Shards are found through the index; an adapter file beside the weights is not a shard."""
    d = tmp_path / "sharded"
    tiny_random("llama", seed=2).save_pretrained(d, max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").is_file()
    full = load_backbone(str(d))
    part = load_backbone(str(d), layers=[3])
    assert part.fingerprint == full.fingerprint
    assert torch.equal(part.model.model.layers[3].mlp.up_proj.weight, full.model.model.layers[3].mlp.up_proj.weight)
    assert part.model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
