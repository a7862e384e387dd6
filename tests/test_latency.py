"""Round trips over the network: placements and drafts through the TCP endpoint, their
metrics, the commands that expose them, the shipped tiny draft and ``bench latency``."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from privatelora.api import build_split
from privatelora.config import PrivateLoRAConfig
from privatelora.model import reference
from privatelora.model.loading import load_backbone
from privatelora.model.sampling import SamplingParams
from privatelora.runtime.draft import TINY_DRAFT, NgramDraft, load_draft
from privatelora.runtime.generation import Generation
from privatelora.runtime.runner import InProcessRunner
from privatelora.serving.endpoint import CloudEndpoint
from privatelora.serving.metrics import instrument
from privatelora.serving.remote import run_remote
from privatelora.transport import Client, RemoteError

pytestmark = pytest.mark.usefixtures("one_thread")
CLI = [sys.executable, "-m", "privatelora.cli"]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def _prompt(bb, text="HAMLET:\nTo be, or not to be, that is the question:\n"):
    return bb.tokenizer.encode(text, add_special_tokens=False)


def test_the_shipped_tiny_draft_is_small_shares_the_tokenizer_and_is_exact(tiny):
    size = sum(f.stat().st_size for f in Path(TINY_DRAFT).iterdir() if f.is_file())
    assert size <= 2 * 1024 * 1024, f"tiny-draft is {size} bytes"
    assert (Path(TINY_DRAFT) / "README.md").is_file()
    from transformers import AutoTokenizer
    text = "KING:\nNow is the winter of our discontent"
    assert AutoTokenizer.from_pretrained(TINY_DRAFT, local_files_only=True).encode(text) == tiny.tokenizer.encode(text)
    split = build_split(cfg=PrivateLoRAConfig(rank=8, adapted_layers="last:1"), backbone=tiny)
    split.adapter.randomize_(5, scale=0.3)
    ids = _prompt(tiny)
    want, _ = reference.generate(reference.merged_model(tiny, split.adapter), ids, SamplingParams(max_new_tokens=40))
    g = Generation(split.device.session(1), ids, SamplingParams(max_new_tokens=40), draft=load_draft("tiny", tiny))
    InProcessRunner(split.cloud).run([g])
    assert g.tokens == want
    assert g.accepted / g.proposed > 0.3, g.stats()          # a useful draft, not a formality
    assert g.round_trips < 2 * 40 * 0.8                       # fewer chains than tokens


def test_over_tcp_placements_and_drafts_are_exact_refused_on_mismatch_and_measured(tiny):
    cfg = PrivateLoRAConfig(rank=8, adapted_layers="last:2")
    split = build_split(cfg=cfg, backbone=tiny)
    split.adapter.randomize_(2, scale=0.3)
    ids = _prompt(tiny)
    want, _ = reference.generate(reference.merged_model(tiny, split.adapter), ids, SamplingParams(max_new_tokens=24))
    other = build_split(cfg=PrivateLoRAConfig(rank=8), backbone=tiny)          # all layers adapted

    async def main():
        ep = CloudEndpoint(split.cloud)
        metrics = instrument(ep)
        async with ep:
            client = await Client.connect(*ep.address)
            plain, spec, tiny_spec = await asyncio.gather(
                run_remote(client, split.device, ids, SamplingParams(max_new_tokens=24)),
                run_remote(client, split.device, ids, SamplingParams(max_new_tokens=24), draft=NgramDraft()),
                run_remote(client, split.device, ids, SamplingParams(max_new_tokens=24),
                           draft=load_draft("tiny", tiny), draft_tokens=3))
            with pytest.raises(RemoteError, match="placement"):
                await run_remote(client, other.device, ids, SamplingParams(max_new_tokens=2))
            await client.close()
        return plain, spec, tiny_spec, metrics
    plain, spec, tiny_spec, metrics = asyncio.run(main())
    for g in (plain, spec, tiny_spec):
        assert g.error is None and g.tokens == want
    assert plain.round_trips == 3 * 24 and tiny_spec.round_trips < plain.round_trips
    reg = metrics.registry
    count = reg.get_sample_value("privatelora_round_trips_per_token_count")
    total = reg.get_sample_value("privatelora_round_trips_per_token_sum")
    # a chain costs 3 round trips (2 adapted layers + 1); every chain but each session's last is
    # observed (its yield shows in the next hand-off); a plain chain yields one token
    assert count == sum(g.round_trips // 3 - 1 for g in (plain, spec, tiny_spec))
    assert total / count < 3.0                    # the drafts brought the mean below a plain chain's
    verifies = reg.get_sample_value("privatelora_accepted_tokens_per_verify_count")
    accepted = reg.get_sample_value("privatelora_accepted_tokens_per_verify_sum")
    assert 0 < verifies <= spec.verifies + tiny_spec.verifies
    assert 0 < accepted <= spec.accepted + tiny_spec.accepted


def test_generate_and_adapter_commands_carry_placement_and_round_trips(tmp_path):
    ad = tmp_path / "a.safetensors"
    r = subprocess.run(CLI + ["adapter", "init", "--rank", "8", "--adapted-layers", "last:1", "--random-scale", "0.3",
                              "--out", str(ad), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["adapted_layers"] == "3"
    r = subprocess.run(CLI + ["generate", "--adapter", str(ad), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                              "--draft", "tiny", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["adapted_layers"] == "3" and len(out["tokens"]) == 12
    assert out["round_trips"] >= 2 and out["draft"]["name"] == "tiny" and out["draft"]["proposed"] >= 1
    mono = subprocess.run(CLI + ["generate", "--adapter", str(ad), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                                 "--mode", "monolithic", "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(mono.stdout)["tokens"] == out["tokens"]
    for bad, why in ((["--adapter", str(ad), "--adapted-layers", "all"], "conflicts with the adapter"),
                     (["--adapted-layers", "last:9"], "only 4 layers"),
                     (["--adapted-layers", "middle"], "adapted_layers must be"),
                     (["--draft", str(tmp_path)], "no config.json")):
        r = subprocess.run(CLI + ["generate", "--prompt", "A", "--max-new-tokens", "2"] + bad,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)


def test_bench_latency_reports_every_configuration():
    from privatelora.bench.latency import run
    r = run("tiny", "loopback", users=2, new_tokens=10, placements=["all", "last:1"], drafts=["ngram"], repeats=1,
            quiet=True)
    assert {"baseline_tok_s", "device_only_tok_s", "results", "best"} <= set(r)
    rows = {(x["config"], x["users"]): x for x in r["results"]}
    assert set(rows) == {(c, u) for c in ("all", "all+ngram", "last:1", "last:1+ngram") for u in (1, 2)}
    assert rows[("all", 1)]["round_trips_per_token"] == 5 and rows[("last:1", 2)]["round_trips_per_token"] == 2
    assert rows[("all", 1)]["accept_rate"] is None and rows[("all+ngram", 1)]["accept_rate"] is not None
    for x in r["results"]:
        assert x["tok_s"] > 0 and 0 < x["itl_p50_ms"] <= x["itl_p99_ms"]
    assert r["baseline_tok_s"] == rows[("all", 1)]["tok_s"] and r["device_only_tok_s"] > 0
