"""Personalization: bundled data, baselines, the ``tune`` command (in process and over TCP),
``bench tuning``'s report."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from privatelora.bench.tuning import METHODS, bench_tuning
from privatelora.training.baselines import LoRAMethod, Untuned
from privatelora.training.data import DATA_DIR, load_corpus, read_text, sample_batch, split_tokens
from privatelora.cli.main import main
from privatelora.model.loading import load_backbone

CLI = [sys.executable, "-m", "privatelora.cli"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def test_bundled_texts_are_committed_with_their_licence():
    readme = (DATA_DIR / "README.md").read_text()
    assert "CC BY 2.5" in readme and "Open Knowledge Foundation, Open Shakespeare / Open Milton" in readme
    name, text = read_text("sonnets")
    assert name == "sonnets" and "From fairest creatures we desire increase" in text
    name, text = read_text("paradise_lost")
    assert "Of Mans First Disobedience" in text and len(text) > 400_000


def test_splits_are_contiguous_and_disjoint(tiny, tmp_path):
    ids = torch.arange(1000)
    c = split_tokens("x", ids, 0.1, 0.1)
    assert torch.equal(torch.cat([c.train, c.val, c.test]), ids) and c.sizes() == {"train": 800, "val": 100, "test": 100}
    g = torch.Generator().manual_seed(0)
    inputs, labels = sample_batch(c.train, 4, 16, g)
    assert all(len(x) == 16 and x[1:] == y[:-1] and max(y) < 800 for x, y in zip(inputs, labels))
    path = tmp_path / "mine.txt.gz"
    path.write_bytes(gzip.compress(("to be or not to be " * 400).encode()))
    c = load_corpus(str(path), tiny.tokenizer, seq=32)
    assert len(c.train) > len(c.val) > 32


def test_lora_baseline_starts_at_the_base_model_and_counts_parameters(tiny):
    cfg = tiny.config
    lora = LoRAMethod(tiny, rank=16, alpha=32)
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = 16 * (d + cfg.num_attention_heads * hd) + 2 * 16 * (d + cfg.num_key_value_heads * hd)
    assert lora.num_params == cfg.num_hidden_layers * per_layer
    ids = [list(range(5, 40))]
    base = Untuned(tiny)
    assert abs(lora.evaluate(ids, [x[1:] + [2] for x in ids]) - base.evaluate(ids, [x[1:] + [2] for x in ids])) < 1e-4
    # hooks live on a private copy: the shared backbone has none
    assert all(not m._forward_hooks for m in tiny.model.modules())


def test_tune_writes_an_adapter_generate_accepts(tmp_path, capsys):
    out = tmp_path / "me.safetensors"
    rc = main(["tune", "--data", "sonnets", "--rank", "4", "--steps", "3", "--batch", "2", "--seq", "32",
               "--eval-tokens", "64", "--eval-every", "2", "--out", str(out), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and out.is_file()
    assert res["parameters"] == 4 * 3 * 16 and res["steps"] == 3 and not res["remote"]
    assert [h["step"] for h in res["history"]] == [2, 3]
    assert all(t.abs().max() > 0 for t in load_file(str(out)).values())     # M moved away from zero
    rc = main(["generate", "--adapter", str(out), "--prompt", "Shall I compare thee", "--max-new-tokens", "4", "--json"])
    gen = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(gen["tokens"]) == 4 and gen["config"]["rank"] == 4


@pytest.mark.parametrize("argv, why", [
    (["--data", "no/such/file.txt"], "neither a file"),
    (["--data", "sonnets", "--steps", "0"], "--steps"),
    (["--data", "sonnets", "--seq", "100000"], "--seq"),
    (["--data", "sonnets", "--lr", "-1"], "--lr"),
    (["--data", "sonnets", "--dtype", "bfloat16"], "float32"),
    (["--data", "sonnets", "--targets", "o"], "targets"),
    (["--data", "sonnets", "--connect", "nohostport"], "HOST:PORT"),
    (["--data", "sonnets", "--connect", "127.0.0.1:1", "--steps", "1"], "cannot connect"),
])
def test_tune_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, why):
    rc = main(["tune", *argv, "--out", str(tmp_path / "a.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and why in err[0], err


def test_tune_refuses_a_missing_output_directory_and_an_empty_file(tmp_path, capsys):
    assert main(["tune", "--data", "sonnets", "--out", str(tmp_path / "no" / "a.safetensors")]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["tune", "--data", str(empty), "--out", str(tmp_path / "a.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "no text" in err[1]


def test_bench_tuning_reports_every_method_and_the_gain_recovered(tiny):
    res = bench_tuning(users=("sonnets",), rank=4, steps=2, batch=2, seq=32, eval_tokens=64,
                              quiet=True, backbone=tiny)
    (user,) = res["users"]
    rows = {r["method"]: r for r in user["results"]}
    assert list(rows) == list(METHODS)
    assert rows["privatelora"]["params"] == rows["privatelora_shared_a"]["params"] == 4 * 3 * 16
    assert rows["full"]["params"] == sum(p.numel() for p in tiny.model.parameters())
    assert rows["untuned"]["params"] == 0
    lora_gain = rows["untuned"]["loss"] - rows["lora"]["loss"]
    for m in ("privatelora", "privatelora_shared_a"):
        g = (rows["untuned"]["loss"] - rows[m]["loss"]) / lora_gain if lora_gain > 0 else None  # None: no gain to share
        assert rows[m]["gain_recovered"] == pytest.approx(g) and user["gain_recovered"][m] == pytest.approx(g)
    assert all(r["ppl"] > 1 for r in rows.values())
    r = subprocess.run([*CLI, "bench", "tuning", "--methods", "lora,nope", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "nope" in r.stderr


@pytest.mark.slow   # three CLI processes; tests/test_training.py covers training over TCP in one process
def test_tune_over_tcp_equals_tune_in_process(tmp_path):
    """`privatelora tune --connect` against a running `privatelora cloud` writes the same
    adapter as the in-process run (fp32 on the wire, same batches)."""
    common = ["--data", "sonnets", "--rank", "4", "--shared-a", "--steps", "2", "--batch", "2", "--seq", "24",
              "--eval-tokens", "48", "--json"]
    cloud = subprocess.Popen([*CLI, "cloud", "--model", "tiny", "--rank", "4", "--shared-a", "--port", "0", "--no-metrics",
                              "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(cloud.stdout.readline())
        remote = subprocess.run([*CLI, "tune", *common, "--connect", f"127.0.0.1:{ready['port']}",
                                 "--out", str(tmp_path / "remote.safetensors")], capture_output=True, text=True,
                                timeout=300)
        assert remote.returncode == 0, remote.stderr
    finally:
        cloud.terminate()
        cloud.communicate(timeout=60)
    local = subprocess.run([*CLI, "tune", *common, "--out", str(tmp_path / "local.safetensors")],
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    r, l = json.loads(remote.stdout), json.loads(local.stdout)
    assert r["remote"] and not l["remote"]
    assert r["heldout_loss"] == pytest.approx(l["heldout_loss"], abs=1e-5)
    a, b = load_file(str(tmp_path / "remote.safetensors")), load_file(str(tmp_path / "local.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    up = r["wire"]["up"]
    assert set(up) <= {"open", "train_handoff", "reply", "grad_handoff", "grad_activations", "close", "total"}
    assert up["grad_activations"]["frames"] == 2 * 4                   # steps x cloud layers


@pytest.mark.slow
def test_tuning_lowers_heldout_perplexity(tmp_path, capsys):
    rc = main(["tune", "--data", "sonnets", "--steps", "60", "--out", str(tmp_path / "a.safetensors"), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["heldout_loss"] < res["heldout_loss_before"] - 0.05
