"""``bench privacy``: the harness has teeth (it recovers what the default configuration leaks,
next to its no-traffic baseline), a defence measurably recovers less, and the attacks use
only the traffic the cloud received."""

import subprocess
import sys

import pytest
import torch

from privatelora.bench import privacy as P
from privatelora.config import PrivateLoRAConfig
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.loading import load_backbone


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


@pytest.fixture(scope="module")
def report(tiny):
    return P.bench_privacy(settings=["default", "noise8"], quick=True, tune_steps=10, quiet=True, backbone=tiny)


def _rate(report, config, signal, attack=None):
    rows = [r for r in report["results"] if r["config"] == config and r["signal"] == signal
            and (attack is None or r["attack"] == attack)]
    assert rows, (config, signal, attack)
    return max(r["recovered"] for r in rows), rows[0]["baseline"]


def test_the_default_configuration_leaks_what_the_harness_says(report):
    for signal, attack in (("tokens", "nearest_row"), ("outputs", "lm_head"), ("M", "least_squares"),
                           ("labels", "gradient_match")):
        got, baseline = _rate(report, "default", signal, attack)
        assert got >= 0.95, (signal, got)
        assert got > baseline + 0.5, (signal, got, baseline)
    m = next(r for r in report["results"] if r["config"] == "default" and r["signal"] == "M")
    assert m["median_rel_error"] < P.M_TOL
    # too few tokens: least squares is underdetermined and recovers nothing
    first = m["curve"][0]
    assert first["tokens_seen"] < report["rank"] and first["recovered"] == 0.0
    assert 0.0 <= report["baseline_tokens"] < 0.2


def test_a_defence_recovers_fewer_tokens_at_a_measured_price(report):
    strongest = {(s["config"], s["signal"]): s["recovered"] for s in report["strongest"]}
    assert strongest[("noise8", "tokens")] < strongest[("default", "tokens")]
    by = {c["config"]: c for c in report["configs"]}
    assert by["noise8"]["utility_cost"] > 0 and by["noise8"]["heldout_ppl"] > by["default"]["heldout_ppl"]
    for c in by.values():
        lo, hi = c["device_ms_range"]
        assert 0 < lo <= c["device_ms_per_token"] <= hi and "speed_cost" in c


def test_results_have_the_documented_shape(report):
    keys = {"config", "device_head_layers", "device_tail_layers", "defence", "signal", "attack", "recovered"}
    assert report["results"] and all(keys <= set(r) for r in report["results"])
    assert {r["signal"] for r in report["results"]} == {"tokens", "outputs", "M", "labels"}
    assert all({"config", "defence", "utility_cost", "speed_cost"} <= set(c) for c in report["configs"])


def test_the_attacks_read_only_the_traffic(tiny):
    """Shuffling what the cloud received between positions destroys the token attack, and
    the M attack needs the replies: it reads them, not the adapter."""
    cfg = PrivateLoRAConfig()
    adapter = PrivateAdapter(cfg, tiny.n_layers, tiny.fingerprint).randomize_(3, scale=0.5)
    ids = [[5, 77, 301, 42, 9, 1200, 13, 640]]
    tr = P.record_traffic(tiny, cfg, adapter, ids, new_tokens=30)
    x, truth = P._up_rows(tr)
    assert len(truth) >= 2 * cfg.rank
    embed = tiny.model.model.embed_tokens.weight
    assert torch.equal(P.nearest_rows(x, embed), truth)
    perm = torch.randperm(len(truth), generator=torch.Generator().manual_seed(0))
    assert (P.nearest_rows(x[perm], embed) == truth).float().mean() < 0.5
    curve = P.m_recovery(tr, adapter, [cfg.rank - 1, len(truth)])["curve"]
    assert [c["recovered"] for c in curve] == [0.0, 1.0]    # underdetermined below r tokens, exact after
    g = torch.Generator().manual_seed(1)
    for pairs in tr.pairs.values():                          # replies made with another M: nothing recovered
        pairs[:] = [(a, m @ torch.randn(m.shape[1], m.shape[1], generator=g)) for a, m in pairs]
    assert P.m_recovery(tr, adapter, [len(truth)])["curve"][0]["recovered"] == 0.0


def test_replay_search_recovers_tokens_through_public_device_layers(tiny):
    cfg = PrivateLoRAConfig(device_head_layers=1)
    zero = PrivateAdapter(cfg, tiny.n_layers, tiny.fingerprint)
    ids = tiny.tokenizer.encode("Shall I compare thee to a summer's day?", add_special_tokens=False)
    tr = P.record_traffic(tiny, cfg, zero, [ids], new_tokens=2)
    x, truth = P._up_rows(tr)
    assert (P.nearest_rows(x, tiny.model.model.embed_tokens.weight) == truth).float().mean() < 0.5
    got = P.PublicLayers(tiny.model, range(1)).search(x, tiny.model.model.embed_tokens.weight)
    assert torch.equal(got, truth)


def test_cli_refuses_unknown_configurations():
    r = subprocess.run([sys.executable, "-m", "privatelora.cli", "bench", "privacy", "--configs", "default,nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown configuration" in r.stderr and "nope" in r.stderr
    r = subprocess.run([sys.executable, "-m", "privatelora.cli", "bench", "privacy", "--configs", ","],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "names no configuration" in r.stderr
    r = subprocess.run([sys.executable, "-m", "privatelora.cli", "bench", "privacy", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--configs" in r.stdout and "noise8" in r.stdout


def test_a_secret_start_changes_only_the_head_layers(tiny):
    cfg = PrivateLoRAConfig()
    base = PrivateAdapter(cfg, tiny.n_layers, tiny.fingerprint).randomize_(4, scale=0.5)
    out = P.with_secret(base, tiny.n_layers, 1, 4.0, seed=9)
    assert out is not base
    for layer in base.layers:
        for t in cfg.targets:
            same = torch.equal(out.get(layer, t), base.get(layer, t))
            assert same == (layer >= 1), (layer, t)
    assert torch.equal(P.with_secret(base, tiny.n_layers, 1, 4.0, seed=9).get(0, "q"), out.get(0, "q"))
    assert not torch.equal(P.with_secret(base, tiny.n_layers, 1, 4.0, seed=10).get(0, "q"), out.get(0, "q"))
