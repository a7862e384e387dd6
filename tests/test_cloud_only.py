"""A cloud process holds only its part: ``load_cloud_backbone`` reads from a checkpoint only
the decoder layers the cloud runs (no embedding, final norm, LM head or device layers, not
even as meta tensors), keeps the full model's fingerprint, and serves exactly what a cloud
built from the full backbone serves, in process and as ``privatelora cloud``."""

from __future__ import annotations

import json

import pytest
import torch

from privatelora.api import build_split, load_cloud_backbone
from privatelora.config import PrivateLoRAConfig
from privatelora.model.adapters import save_adapter
from privatelora.model.loading import DroppedLayer, load_backbone
from privatelora.model.sampling import SamplingParams
from privatelora.model.zoo import FAMILIES, byte_tokenizer, tiny_random
from privatelora.runtime.cloud import CloudPart
from privatelora.runtime.generation import Generation
from privatelora.runtime.runner import InProcessRunner

from procs import JsonProc

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD_TAIL = PrivateLoRAConfig(rank=8, device_head_layers=1, device_tail_layers=1)
PLACE = ["--model", "tiny", "--rank", "8", "--device-head-layers", "1", "--device-tail-layers", "1"]


@pytest.fixture(scope="module", autouse=True)
def cloud_proc():
    """``privatelora cloud`` started with the module, so that it loads while the tests in
    process run (the last test talks to it)."""
    proc = JsonProc("cloud", *PLACE, "--port", 0, "--no-metrics", "--json")
    yield proc
    if proc.proc.poll() is None:
        proc.stop()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        tiny_random(fam, seed=7).save_pretrained(d)       # safetensors
        byte_tokenizer().save_pretrained(d)
        out[fam] = str(d)
    return out


def _holds_only(bb, layers):
    model = bb.model
    assert model.model.embed_tokens is None and model.model.norm is None and model.lm_head is None
    n = bb.n_layers
    for i in range(n):
        assert isinstance(model.model.layers[i], DroppedLayer) == (i not in layers)
    names = [name for name, _ in list(model.named_parameters()) + list(model.named_buffers())]
    held = {int(name.split(".")[2]) for name in names if name.startswith("model.layers.")}
    assert held == set(layers)
    assert all(name.startswith(("model.layers.", "model.rotary_emb.")) for name in names), names
    assert not any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))
    v, d = bb.config.vocab_size, bb.config.hidden_size
    assert not any(tuple(p.shape) in ((v, d), (d, v)) for p in model.parameters())
    assert bb.tokenizer is None


def _generate(split, cloud, prompt=(5, 9, 2, 77, 31, 8), n=8):
    g = Generation(split.device.session(len(cloud.sessions) + 1), list(prompt), SamplingParams(max_new_tokens=n),
                   keep_logits=True)
    InProcessRunner(cloud).run([g])
    return g


def _same_serving(model, cfg, cloud_bb):
    """Against one device, a cloud from the cloud-only load answers bit for bit what a cloud
    from the full backbone answers."""
    split = build_split(model, cfg)
    split.adapter.randomize_(3, scale=0.5)
    assert cloud_bb.fingerprint == split.backbone.fingerprint
    a = _generate(split, split.cloud)
    b = _generate(split, CloudPart(cloud_bb, split.cfg))
    assert a.tokens == b.tokens and len(a.tokens) == 8
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_tiny_cloud_holds_only_its_layers_and_serves_the_same():
    bb = load_cloud_backbone("tiny", HEAD_TAIL)
    assert bb.name == "tiny" and list(HEAD_TAIL.cloud_layers(bb.n_layers)) == [1, 2]
    _holds_only(bb, [1, 2])
    assert bb.fingerprint == load_backbone("tiny").fingerprint
    _same_serving("tiny", HEAD_TAIL, bb)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_cloud_holds_only_its_layers_and_serves_the_same(saved, family):
    cfg = PrivateLoRAConfig(rank=8, device_head_layers=1, device_tail_layers=1,
                            projection="random" if family == "mistral" else "svd")
    bb = load_cloud_backbone(saved[family], cfg)
    _holds_only(bb, [1, 2])
    assert bb.fingerprint == load_backbone(saved[family]).fingerprint
    _same_serving(saved[family], cfg, bb)


def test_in_memory_models_are_kept_whole():
    model = tiny_random("llama", seed=1)
    bb = load_cloud_backbone(model, HEAD_TAIL)
    assert bb.model is model and model.lm_head is not None and model.model.embed_tokens is not None


def test_cloud_command_serves_an_edge_holding_only_its_layers(cloud_proc, tmp_path, capsys):
    """``privatelora cloud`` (cloud-only load) serves ``privatelora edge`` the tokens of the
    in-process split, with the same fingerprint and the cloud's layers only."""
    from privatelora.cli.main import main
    split = build_split("tiny", HEAD_TAIL)
    split.adapter.randomize_(11, scale=0.3)
    adapter = tmp_path / "user.safetensors"
    save_adapter(split.adapter, adapter)
    ready = cloud_proc.wait_for("listening", timeout=120)
    assert ready["fingerprint"] == split.backbone.fingerprint and ready["layers"] == [1, 2]
    capsys.readouterr()
    assert main(["edge", "--connect", f"127.0.0.1:{ready['port']}", *PLACE, "--adapter", str(adapter),
                 "--prompt-ids", "5,9,2,77,31", "--max-new-tokens", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["tokens"]
    g = Generation(split.device.session(1), [5, 9, 2, 77, 31],
                   SamplingParams(max_new_tokens=8, stop_ids=(split.backbone.tokenizer.eos_token_id,)))
    InProcessRunner(split.cloud).run([g])
    assert got == g.tokens and len(got) > 0
    stopped = cloud_proc.stop()
    assert stopped["rc"] == 0, stopped["stderr"][-2000:]
    assert cloud_proc.wait_for("stopped", timeout=5)["stages"] > 0
