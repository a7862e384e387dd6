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
from privatelora.bench.throughput import decode_rate, limit_decode, link_step_s, predict_tps, spread


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
    # window [1.5, 4.5]: user 0 has 2, 3, 4 (2 intervals); user 1 has 1.5 ... 4.5 (3)
    assert r["window_tokens"] == 5 and r["window_s"] == pytest.approx(3.0)
    assert r["tok_s"] == pytest.approx(2.0)
    assert r["ttft_s"] == pytest.approx(1.25) and r["ttft_max_s"] == pytest.approx(1.5)


def test_decode_rate_of_a_batched_server_whose_users_tokens_arrive_together():
    # 16 users, one token each every 0.1 s, delivered in bursts (user u 1 ms after u - 1):
    # 160 tokens/s. Counting the arrivals inside the window (last first token, first last
    # token] would give 15 fewer tokens than intervals: 0.97 of the rate.
    period, users, tokens = 0.1, 16, 32
    runs = [{"started": 0.0, "token_times": [1.0 + k * period + u * 0.001 for k in range(tokens)]}
            for u in range(users)]
    r = decode_rate(runs)
    assert r["tok_s"] == pytest.approx(users / period, rel=1e-9)
    # users at different rates: the sum of their own rates
    runs = [{"started": 0.0, "token_times": [0.5 + k * 0.05 for k in range(60)]},
            {"started": 0.0, "token_times": [0.5 + k * 0.2 for k in range(12)]}]
    assert decode_rate(runs)["tok_s"] == pytest.approx(20.0 + 5.0, rel=1e-9)


def test_link_model_adds_one_round_trip_per_cloud_layer_and_one_for_the_hand_offs():
    assert link_step_s("loopback", 16, 1024, 32, False, "fp32") == 0.0
    t = link_step_s("5g", 16, 1024, 32, False, "fp32")
    # 17 round trips of 20 ms plus mean jitter (two hops of 0.5 ms) plus transfer times
    assert 17 * 0.021 < t < 17 * 0.021 + 0.010
    # the model: linear in users while the link dominates, flat at the loopback rate
    assert predict_tps(1, 20.0, t) == pytest.approx(1 / (1 / 20.0 + t))
    assert predict_tps(16, 60.0, t) < 60.0
    assert predict_tps(64, 60.0, t) > predict_tps(16, 60.0, t)


def test_spread_reports_the_median_with_its_range():
    r = spread({"ours_tok_s": [30.0, 10.0, 20.0], "limit_tok_s": [4.0, 2.0]})
    assert r == {"ours_tok_s": 20.0, "ours_tok_s_min": 10.0, "ours_tok_s_max": 30.0,
                 "limit_tok_s": 3.0, "limit_tok_s_min": 2.0, "limit_tok_s_max": 4.0}


def _real_decode_frames(shared_a: bool, rank: int = 16):
    """Every message of a real split generation on the tiny model (device and cloud parts
    in process), with its direction, and the geometry a session would declare."""
    from privatelora.api import build_split
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model.sampling import SamplingParams
    from privatelora.runtime.generation import Generation
    from privatelora.runtime.runner import InProcessRunner
    split = build_split("tiny", PrivateLoRAConfig(rank=rank, shared_a=shared_a))
    split.adapter.randomize_(3, scale=0.5)
    seen, run = [], split.cloud.run

    def recording(requests):
        answers = run(requests)
        seen.extend([("up", m) for m in requests] + [("down", m) for m in answers])
        return answers
    split.cloud.run = recording
    InProcessRunner(split.cloud).run([Generation(split.device.session(1), list(range(5, 25)),
                                                 SamplingParams(max_new_tokens=6))])
    return seen, split.backbone.config.hidden_size, tuple(split.cloud.exchange_ids), split.cfg.targets


@pytest.mark.parametrize("shared_a", [False, True])
def test_link_model_frames_are_the_size_of_real_frames(shared_a):
    """``frame_bytes`` (what ``link_step_s`` sends over the 5G model) sizes each decode
    frame exactly as the wire frames a real generation's activations, replies and
    hand-offs: its tensors are seeded noise, which lz4 cannot shrink, like real ones."""
    from privatelora import wire
    from privatelora.bench.perfmodel import frame_bytes
    seen, hidden, layers, targets = _real_decode_frames(shared_a)
    kinds = {wire.Handoff: "handoff", wire.Activations: "down_per_layer", wire.Reply: "up_per_layer"}
    for dtype in ("fp32", "fp16", "bf16", "int8"):
        geo = wire.Geometry(hidden=hidden, rank=16, targets=targets, shared_a=shared_a, layers=layers, dtype=dtype)
        want = frame_bytes(hidden, 16, shared_a, dtype)
        sizes = {}
        for direction, m in seen:
            t = m.hidden if isinstance(m, wire.Handoff) else (m.a if isinstance(m, wire.Activations) else m.m)[0]
            if t.shape[0] != 1:           # decode steps only: one row
                continue
            kw = {"dtype": wire.HANDOFF_DTYPE[dtype]} if isinstance(m, wire.Handoff) else {}
            sizes.setdefault(kinds[type(m)], set()).add(
                len(wire.encode(m, key=bytes(32), direction=direction, geometry=geo, **kw)))
        assert sizes == {k: {n} for k, n in want.items()}, dtype


def test_link_model_frames_are_incompressible_at_7b_widths():
    """At the bench and 7B widths the modelled hand-off is as big as its uncompressed
    frame; a constant tensor of the same shape would have been shrunk by lz4."""
    from privatelora import wire
    from privatelora.bench.perfmodel import frame_bytes
    for hidden in (1024, 4096):
        g = wire.Geometry(hidden=hidden, rank=32, targets=("q", "k", "v"), shared_a=False, layers=(0,), dtype="fp32")
        raw = len(wire.encode(wire.Handoff(1, 0, torch.ones(1, hidden)), key=bytes(32), direction="up", geometry=g,
                              dtype="fp32", compress="never"))
        ones = len(wire.encode(wire.Handoff(1, 0, torch.ones(1, hidden)), key=bytes(32), direction="up", geometry=g,
                               dtype="fp32"))
        assert frame_bytes(hidden, 32, False, "fp32")["handoff"] == raw > 2 * ones


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
    """One short run through Ray: the three measurements, repeated and reported as medians
    with their range, the policies really differ, the replica's timeline of every repeat of
    ours (``--trace``), and the JSON has what tools read."""
    from privatelora.actors.throughput import run
    from privatelora.bench.throughput import LIMIT
    out = run("tiny", users=(1, 2), new_tokens=6, prompt_tokens=4, hf=False, quiet=True, repeat=2, trace=True)
    rows = out["results"]
    assert [r["users"] for r in rows] == [1, 2]
    assert out["repeat"] == 2 and out["limit"] == LIMIT and out["device"] == "cpu"
    cores = out["cores"]                                     # the replica never shares a core with the devices
    if cores["backbone"]:
        assert not (set(cores["backbone"]) | set(cores["io"])) & set(cores["edges"])
    for r in rows:
        for k in ("limit_tok_s", "ours_tok_s", "paper_style_tok_s", "backbone_busy"):
            assert 0 < r[f"{k}_min"] <= r[k] <= r[f"{k}_max"], k
        assert 0 < r["backbone_busy"] <= 1.0
        assert r["paper_style_mean_batch"] == 1.0          # every stage alone
        assert r["ours_over_limit"] == pytest.approx(r["ours_tok_s"] / r["limit_tok_s"])     # from the medians
        assert r["ours_over_limit_min"] <= r["ours_over_limit_max"]
        assert "hf_cloud_only_tok_s" not in r
        assert len(r["ours_timeline"]) == 2                  # one per repeat
        for t in r["ours_timeline"]:
            assert t["decode_cycles"] >= 1 and t["stage_ms"] > 0 and t["cycle_ms"] >= t["stage_ms"]
            assert t["hand_outs"] >= 6 and t["token_ms"] > t["hand_off_ms"] > 0 and t["loop_cpu_ms"] > 0
    assert rows[1]["ours_mean_batch"] > 1.0                  # two users share stages
    s = out["summary"]
    assert s["ideal_gain"] == pytest.approx(rows[1]["limit_tok_s"] / rows[0]["limit_tok_s"])
    assert s["ours_over_limit"] == rows[1]["ours_over_limit"]
    assert s["ours_over_limit_min"] == rows[1]["ours_over_limit_min"]
    assert s["share_of_ideal_gain"] == pytest.approx(rows[1]["ours_over_paper_style"] / s["ideal_gain"])
    json.dumps(out)                                          # --json can print it


@pytest.mark.parametrize("kw, needle", [
    (dict(geometry="7b"), "7b only with --gpus-per-replica"),
    (dict(geometry="tiny", layers=4), "--layers"),
    (dict(geometry="bench", layers=0), "--layers"),
    (dict(geometry="tiny", repeat=0), "--repeat"),
    (dict(geometry="tiny", gpus_per_replica=-1), "--gpus-per-replica"),
])
def test_bench_throughput_refuses_bad_arguments_before_any_work(kw, needle):
    from privatelora.actors.throughput import run
    from privatelora.config import UsageError
    with pytest.raises(UsageError, match=needle):
        run(quiet=True, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_bench_throughput_asks_for_a_gpu_the_cluster_does_not_have():
    from privatelora.actors.throughput import run
    from privatelora.config import UsageError
    with pytest.raises(UsageError, match="--gpus-per-replica 1: the Ray cluster has 0 GPUs"):
        run("tiny", users=(1,), gpus_per_replica=1, quiet=True)


@pytest.mark.slow
def test_gpu_script_dry_run_prints_its_commands_and_runs_a_cpu_smoke(tmp_path):
    """``benchmarks/gpu.sh --dry-run`` runs anywhere: it lists the GPU runs and measures a
    tiny CPU run instead, writing its JSON and an index (the last line it prints)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["bash", os.path.join(repo, "benchmarks", "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    commands = [x for x in lines if x.startswith("would run: ")]
    assert len(commands) == 5 and all("--gpus-per-replica 1" in c and "--trace" in c for c in commands)
    assert any("--geometry 7b" in c for c in commands) and any("--link 5g" in c for c in commands)
    assert any("--edge-hosts 1" in c for c in commands)
    index = json.loads(lines[-1])
    assert index["dry_run"] and index["runs"]["smoke-tiny-cpu"]["status"] == "ok"
    assert json.loads((tmp_path / "index.json").read_text()) == index
    smoke = json.loads((tmp_path / "smoke-tiny-cpu.json").read_text())
    assert smoke["geometry"] == "tiny" and smoke["device"] == "cpu" and smoke["repeat"] == 1
    assert [r["users"] for r in smoke["results"]] == [1, 2]
    assert all(len(r["ours_timeline"]) == 1 for r in smoke["results"])      # --trace
