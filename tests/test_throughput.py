"""bench throughput's pieces: the limit forward, decode windows, the link model, policies,
core pinning, and one short end-to-end run on the tiny model (Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from privatelora.serving.scheduler import Scheduler
from privatelora.bench.throughput import decode_rate, limit_decode, link_step_s, predict_tps


def test_limit_forward_equals_the_hf_decoder_layers(backbones, one_thread):
    """The limit is an ordinary forward: HF's hidden states, batched, with its own caches."""
    for family in ("llama", "qwen2"):
        model = backbones[family].model
        ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            x0 = model.model.embed_tokens(ids)
            want = model(ids, output_hidden_states=True).hidden_states[-1]   # after the final norm
        r = limit_decode(model, users=3, prompt_tokens=9, new_tokens=3, prompt_hidden=x0)
        got = model.model.norm(r["prefill_out"])
        assert (got - want).abs().max().item() < 1e-4, family
        assert r["tok_s"] == pytest.approx(3 / r["step_s"]) and r["layer_s"] > 0


def test_decode_rate_counts_the_window_where_every_user_decodes():
    runs = [{"started": 0.0, "token_times": [1.0, 2.0, 3.0, 4.0, 5.0]},
            {"started": 0.0, "token_times": [1.5, 2.5, 3.5, 4.5]}]
    r = decode_rate(runs)
    # window (1.5, 4.5]: user 0 has 2, 3, 4; user 1 has 2.5, 3.5, 4.5
    assert r["window_tokens"] == 6 and r["window_s"] == pytest.approx(3.0)
    assert r["tok_s"] == pytest.approx(2.0)
    assert r["ttft_s"] == pytest.approx(1.25) and r["ttft_max_s"] == pytest.approx(1.5)


def test_link_model_adds_one_round_trip_per_cloud_layer_and_one_for_the_hand_offs():
    assert link_step_s("loopback", 16, 1024, 32, False, "fp32") == 0.0
    t = link_step_s("5g", 16, 1024, 32, False, "fp32")
    # 17 round trips of 20 ms plus mean jitter (two hops of 0.5 ms) plus transfer times
    assert 17 * 0.021 < t < 17 * 0.021 + 0.010
    # the model: linear in users while the link dominates, flat at the loopback rate
    assert predict_tps(1, 20.0, t) == pytest.approx(1 / (1 / 20.0 + t))
    assert predict_tps(16, 60.0, t) < 60.0
    assert predict_tps(64, 60.0, t) > predict_tps(16, 60.0, t)


def test_max_batch_one_serves_every_session_alone():
    s = Scheduler(max_batch=1)
    for sid in (1, 2, 3):
        s.open(sid, 0.0)
        s.submit(sid, 4, 1, f"item{sid}", 0.0)
    got = [s.next_batch(0.0) for _ in range(3)]
    assert got == [["item1"], ["item2"], ["item3"]]
    assert s.stats.sizes == {1: 3}
    with pytest.raises(ValueError):
        Scheduler(max_batch=-1)


def test_set_policy_switches_between_batched_and_one_at_a_time():
    from privatelora.serving.endpoint import CloudEndpoint

    ep = CloudEndpoint(object(), training=False)   # the endpoint only stores the cloud until it serves
    ep.set_policy(gather_s=0.0, max_batch=1)
    assert ep.scheduler.gather_s == 0.0 and ep.scheduler.max_batch == 1
    ep.set_policy(max_batch=0)
    assert ep.scheduler.max_batch == 0 and ep.scheduler.gather_s == 0.0
    with pytest.raises(ValueError):
        ep.set_policy(gather_s=-1)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_pinning_covers_threads_that_already_run():
    """Linux pins one thread at a time: a Ray worker's event loop thread exists before the
    actor pins itself, and must end up on the same cores."""
    code = textwrap.dedent("""
        import os, threading, json
        from privatelora.placement.checks import pin_to_cores
        ready, go = threading.Event(), threading.Event()
        seen = {}
        def worker():
            seen["tid"] = threading.get_native_id()
            ready.set(); go.wait()
            seen["late"] = sorted(os.sched_getaffinity(0))
            inner = threading.Thread(target=lambda: seen.__setitem__("child", sorted(os.sched_getaffinity(0))))
            inner.start(); inner.join()
        t = threading.Thread(target=worker); t.start(); ready.wait()
        pin_to_cores([0])
        go.set(); t.join()
        print(json.dumps({"main": sorted(os.sched_getaffinity(0)), **seen}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["main"] == [0] and r["late"] == [0] and r["child"] == [0]


def test_bench_throughput_end_to_end_on_the_tiny_model():
    """One short run through Ray: the three measurements, the policies really differ, and
    the JSON has what tools read."""
    from privatelora.actors.throughput import run
    out = run("tiny", users=(1, 2), new_tokens=6, prompt_tokens=4, hf=False, quiet=True)
    rows = out["results"]
    assert [r["users"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("limit_tok_s", "ours_tok_s", "paper_style_tok_s", "backbone_busy"):
            assert r[k] > 0, k
        assert 0 < r["backbone_busy"] <= 1.0
        assert r["paper_style_mean_batch"] == 1.0          # every stage alone
    assert rows[1]["ours_mean_batch"] > 1.0                  # two users share stages
    assert out["summary"]["ideal_gain"] == pytest.approx(rows[1]["limit_tok_s"] / rows[0]["limit_tok_s"])
    json.dumps(out)                                          # --json can print it
