"""The split over real sockets: two processes, the endpoint, byte counts, TLS."""

import asyncio
import json
import signal
import subprocess
import sys

import pytest

from privatelora.bench import comm as bench_comm, fidelity as bench_fidelity, link as bench_link
from privatelora.bench.geometry import geometry_model
from privatelora.model.adapters import PrivateAdapter, save_adapter
from privatelora.api import build_split
from privatelora.config import PrivateLoRAConfig
from privatelora.runtime.device import DevicePart
from privatelora.runtime.generation import Generation
from privatelora.model.sampling import SamplingParams
from privatelora.model.loading import load_backbone
from privatelora.runtime.runner import InProcessRunner
from privatelora.serving.endpoint import CloudEndpoint
from privatelora.serving.remote import run_remote
from privatelora.transport import Client, RemoteError, make_self_signed

CLI = [sys.executable, "-m", "privatelora.cli"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _inprocess(bb, cfg, adapter, prompt, params):
    g = Generation(DevicePart(bb, cfg, adapter).session(1), prompt, params)
    InProcessRunner(build_split(cfg=cfg, backbone=bb).cloud).run([g])
    return g.tokens


def test_two_processes_over_tcp_equal_in_process(tmp_path):
    bb = load_backbone("tiny-qwen2")
    cfg = PrivateLoRAConfig(rank=8, shared_a=True)
    adapter = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(4, scale=2.0)
    path = tmp_path / "user.safetensors"
    save_adapter(adapter, path)
    cloud = subprocess.Popen([*CLI, "cloud", "--model", "tiny-qwen2", "--rank", "8", "--shared-a", "--port", "0",
                              "--no-metrics", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(cloud.stdout.readline())
        assert ready["event"] == "listening" and ready["fingerprint"] == bb.fingerprint
        for dtype, temp in (("fp32", 0.0), ("fp32", 0.8)):
            edge = subprocess.run([*CLI, "edge", "--connect", f"127.0.0.1:{ready['port']}", "--model", "tiny-qwen2",
                                   "--adapter", str(path), "--prompt-ids", "5,6,7,8,9,10,11", "--max-new-tokens", "16",
                                   "--temperature", str(temp), "--seed", "3", "--wire-dtype", dtype, "--json"],
                                  capture_output=True, text=True, timeout=180)
            assert edge.returncode == 0, edge.stderr
            res = json.loads(edge.stdout)
            want = _inprocess(bb, cfg, adapter, [5, 6, 7, 8, 9, 10, 11],
                              SamplingParams(max_new_tokens=16, temperature=temp, top_p=1.0, seed=3, stop_ids=(1,)))
            assert res["tokens"] == want
            assert res["bytes"]["to_cloud"] > 0 and res["bytes"]["to_device"] > 0
        cloud.send_signal(signal.SIGTERM)
        out, err = cloud.communicate(timeout=60)
        assert cloud.returncode == 0, err
        stopped = json.loads(out.strip().splitlines()[-1])
        assert stopped["event"] == "stopped" and stopped["stages"] > 0
    finally:
        if cloud.poll() is None:
            cloud.kill()


def test_edge_errors_exit_2():
    r = subprocess.run([*CLI, "edge", "--connect", "127.0.0.1:1", "--model", "tiny", "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot connect" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*CLI, "cloud", "--model", "tiny", "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "TLS" in r.stderr


def test_endpoint_batches_users_refuses_mismatch_and_speaks_tls(tmp_path):
    bb = load_backbone("tiny-mistral")
    cfg = PrivateLoRAConfig(rank=8)
    adapters = [PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(20 + i, scale=2.0) for i in range(4)]
    prompts = [list(range(3, 9 + 3 * i)) for i in range(4)]
    params = SamplingParams(max_new_tokens=12)
    cert, key = make_self_signed(tmp_path)

    async def main():
        split = build_split(cfg=cfg, backbone=bb)
        async with CloudEndpoint(split.cloud, cert=cert, key=key) as ep:
            client = await Client.connect(*ep.address, ca=cert, server_hostname="localhost")
            gens = await asyncio.gather(*[run_remote(client, DevicePart(bb, cfg, a), p, params, dtype="fp32")
                                          for a, p in zip(adapters, prompts)])
            other = DevicePart(bb, PrivateLoRAConfig(rank=4))          # a device with another geometry
            with pytest.raises(RemoteError, match="geometry_mismatch"):
                await run_remote(client, other, [1, 2, 3], params)
            await client.close()
            return gens, split.cloud.stats.mean_batch_sessions, ep.server.stats.as_dict()
    gens, batch, stats = asyncio.run(main())
    for g, a, p in zip(gens, adapters, prompts):
        assert g.error is None and g.tokens == _inprocess(bb, cfg, a, p, params)
    assert batch > 1.5                    # users shared stages over TCP too
    # one reply per layer per token handed in: the prompt (one frame) and every token but the last
    assert stats["up"]["reply"]["frames"] == sum(len(g.tokens) for g in gens) * bb.n_layers


@pytest.fixture(scope="module")
def seven_b():
    return geometry_model("7b")


def test_bench_comm_7b_reductions(seven_b):
    fp16 = bench_comm.comm("7b", rank=128, dtype="fp16", new_tokens=4, quiet=True, backbone=seven_b)
    assert fp16["raw_bytes_per_token_per_layer"] == 6 * 128 * 2          # 6r numbers, fp16
    assert fp16["naive_bytes_per_token_per_layer"] == 4 * 4096 * 2       # 4d numbers, fp16
    assert fp16["framing_bytes_per_token_per_layer"] > 0                 # framing is counted
    assert fp16["reduction"] >= 0.95
    int8 = bench_comm.comm("7b", rank=128, shared_a=True, dtype="int8", new_tokens=4, quiet=True, backbone=seven_b)
    assert int8["raw_bytes_per_token_per_layer"] == 4 * 128              # 4r numbers, 1 byte
    assert int8["reduction"] >= 0.98


@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["tiny", "bench"])
def test_5g_decode_rate_matches_link_model(geometry):
    r = bench_link.link(geometry, "5g", new_tokens=24, quiet=True)
    assert abs(r["measured_over_predicted_time"] - 1) <= 0.15, r


def test_int8_transport_fidelity_on_the_shipped_tiny_model():
    r = bench_fidelity.fidelity("tiny", "int8", positions=256, free_tokens=32)
    assert r["model"] == "tiny" and r["positions"] == 256
    assert r["argmax_agreement"] >= 0.99, r
    assert r["max_abs_logit_error"] > 0          # int8 really was on the wire
