"""The baselines of ``bench tuning`` (issue 17): LoRA through ``peft`` equals the earlier
hand-written LoRA step for step, honours the targets and the placement; the bench reports
mean and spread over seeds."""

from __future__ import annotations

import math

import pytest
import torch

from privatelora.bench.tuning import bench_tuning
from privatelora.model.loading import load_backbone
from privatelora.training.baselines import LoRAMethod, PeftLoRA
from privatelora.training.data import load_corpus, sample_batch


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def test_peft_lora_equals_the_hand_written_lora(tiny, one_thread):
    """Same A (copied from the hand-written one), B = 0, same batches, AdamW with grad-norm clip:
    the loss of every step and the gradients agree within float32 round-off (peft adds
    ``lora_B(lora_A(x)) * scale`` to the base output, the hook ``scale * ((x A^T) B^T)``: the
    same products, summed in a different order)."""
    hand = LoRAMethod(tiny, rank=4, alpha=8, seed=3)
    peft = PeftLoRA(tiny, rank=4, alpha=8, seed=3)
    names = [n for n, _ in peft.named]
    assert len(names) == len(hand.params) == 2 * 3 * tiny.n_layers
    layer_params = []        # the hand-written list is (A, B) per target per layer, in q, k, v order
    for i in range(tiny.n_layers):
        for t in ("q", "k", "v"):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{t}_proj."
            layer_params += [dict(peft.named)[prefix + "lora_A.default.weight"],
                             dict(peft.named)[prefix + "lora_B.default.weight"]]
    with torch.no_grad():
        for k, (p, h) in enumerate(zip(layer_params, hand.params)):
            assert p.shape == h.shape
            if k % 2:                                          # both B start at zero
                assert not p.any() and not h.any()
            p.copy_(h)
    corpus = load_corpus("sonnets", tiny.tokenizer, seq=32)
    gen = torch.Generator().manual_seed(0)
    batches = [sample_batch(corpus.train, 2, 32, gen) for _ in range(4)]
    opts = [torch.optim.AdamW(m.params if m is hand else layer_params, lr=1e-2, weight_decay=0.0)
            for m in (hand, peft)]
    for inputs, labels in batches:
        losses = []
        for m, opt, params in ((hand, opts[0], hand.params), (peft, opts[1], layer_params)):
            opt.zero_grad(set_to_none=True)
            losses.append(m.step(inputs, labels))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        for h, p in zip(hand.params, layer_params):
            assert torch.allclose(h.grad, p.grad, rtol=1e-4, atol=1e-7)
        assert losses[1] == pytest.approx(losses[0], rel=1e-6)
        for opt in opts:
            opt.step()
    assert not torch.equal(layer_params[1], torch.zeros_like(layer_params[1]))        # B trained
    assert peft.evaluate(*batches[0]) == pytest.approx(hand.evaluate(*batches[0]), rel=1e-5)


def test_peft_lora_honours_targets_and_placement(tiny):
    m = PeftLoRA(tiny, rank=4, alpha=8, targets=("q", "v"), layers=[2, 3])
    assert {n.split(".self_attn.")[0].rsplit(".", 1)[1] + "." + n.split(".self_attn.")[1].split("_proj")[0]
            for n, _ in m.named} == {"2.q", "2.v", "3.q", "3.v"}
    hd = tiny.config.hidden_size
    kv = tiny.config.num_key_value_heads * (getattr(tiny.config, "head_dim", None)
                                            or hd // tiny.config.num_attention_heads)
    assert m.num_params == 2 * (4 * hd + hd * 4) + 2 * (4 * hd + kv * 4)
    assert all(not p.requires_grad for p in tiny.model.parameters())   # the shared backbone is untouched
    a, b = PeftLoRA(tiny, rank=4, seed=1), PeftLoRA(tiny, rank=4, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))
    assert not torch.equal(a.params[0], PeftLoRA(tiny, rank=4, seed=2).params[0])


def test_bench_tuning_seeds_give_mean_and_spread(tiny):
    res = bench_tuning(users=("sonnets",), methods=("untuned", "lora", "privatelora", "privatelora_random"),
                       rank=4, steps=2, batch=2, seq=32, eval_tokens=64, quiet=True, backbone=tiny, seeds=2,
                       targets=("q", "v"), adapted_layers="last:2", placements=[("last:1", 4)])
    assert res["seeds"] == [0, 1]
    rows = {r["method"]: r for r in res["users"][0]["results"]}
    assert len(rows["untuned"]["losses"]) == 1                     # nothing random to repeat
    for name in ("lora", "privatelora", "privatelora_random", "privatelora@last:1/r4"):
        r = rows[name]
        assert len(r["losses"]) == 2 and r["loss"] == pytest.approx(sum(r["losses"]) / 2)
        assert r["loss_std"] == pytest.approx(abs(r["losses"][0] - r["losses"][1]) / math.sqrt(2))
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    assert rows["lora"]["losses"][0] != rows["lora"]["losses"][1]  # the seed reaches LoRA's init and the batches
    # the LoRA baseline follows --targets and the placement: q, v of the last 2 layers
    assert rows["lora"]["params"] == 2 * (2 * 16 * 256) + 2 * (16 * 256 + 16 * 128)
    assert rows["privatelora"]["params"] == 2 * 2 * 16 and rows["privatelora"]["round_trips_per_token"] == 3
    assert rows["privatelora"]["projection"] == "svd" and rows["privatelora_random"]["projection"] == "random"
    u, lora = rows["untuned"]["loss"], rows["lora"]
    for name in ("privatelora", "privatelora_random"):
        r = rows[name]
        want = (u - r["loss"]) / (u - lora["loss"]) if u > lora["loss"] else None
        assert r["gain_recovered"] == pytest.approx(want)
        per_seed = [(u - x) / (u - y) if u > y else None for x, y in zip(r["losses"], lora["losses"])]
        assert r["gains"] == pytest.approx(per_seed)
