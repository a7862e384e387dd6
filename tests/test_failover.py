"""`privatelora serve --replicas 2` as users run it: devices outside Ray connect to its one
front door; SIGKILL the replica serving a device in mid-generation and the device
finishes with exactly the monolithic model's tokens (it resumes on the other replica);
serve restarts the killed replica, which then serves new sessions."""

import asyncio
import os
import signal
import time

import pytest

from privatelora.config import PrivateLoRAConfig
from privatelora.model import reference
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.loading import load_backbone
from privatelora.model.sampling import SamplingParams
from privatelora.runtime.device import DevicePart
from privatelora.serving.remote import AddressConnector, Resume, run_remote
from privatelora.transport import Client
from procs import JsonProc

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = PrivateLoRAConfig()          # serve's defaults


def _serve(*args) -> JsonProc:
    """A `serve --json` subprocess in a Ray cluster of its own."""
    from privatelora.placement.cluster import auth_env
    return JsonProc("serve", "--port", "0", "--json", "--no-metrics", *args, env={**auth_env(), "RAY_ADDRESS": "local"})


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def test_sigkill_of_the_serving_replica_mid_generation_is_survived_token_identical(tiny):
    adapters = [PrivateAdapter(CFG, tiny.n_layers, tiny.fingerprint).randomize_(40 + u, scale=2.0) for u in range(2)]
    prompts = [[3 + (13 * u + 7 * i) % 250 for i in range(9 + u)] for u in range(2)]
    params = [SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=5)]
    want = [reference.generate(reference.merged_model(tiny, adapters[u]), prompts[u], params[u])[0] for u in range(2)]
    serve = _serve("--replicas", "2")
    try:
        ready = serve.wait_for("serving")
        door = ready["front_door"]
        assert len(ready["replicas"]) == 2 and not door["tls"]
        pids = {r["port"]: r["pid"] for r in ready["replicas"]}
        ids = {r["port"]: r["replica"] for r in ready["replicas"]}

        async def main():
            conns = [AddressConnector(door["host"], door["port"], timeout=30) for _ in range(2)]
            seen, killed = [0], {}

            def kill_mine(_msg):           # user 0's 12th answer: SIGKILL the replica it is on
                seen[0] += 1
                if seen[0] == 12:
                    (port,) = [p for (h, p) in conns[0]._clients if p != door["port"]]
                    killed["port"] = port
                    os.kill(pids[port], signal.SIGKILL)
            t0 = time.monotonic()
            gens = await asyncio.gather(
                run_remote(conns[0], DevicePart(tiny, CFG, adapters[0]), prompts[0], params[0], observe=kill_mine,
                           timeout=30, resume=Resume(attempts=10)),
                run_remote(conns[1], DevicePart(tiny, CFG, adapters[1]), prompts[1], params[1], timeout=30,
                           resume=Resume(attempts=10)))
            dt = time.monotonic() - t0
            for c in conns:
                await c.close()
            return gens, killed["port"], dt
        gens, killed_port, dt = asyncio.run(main())
        for u in range(2):
            assert gens[u].error is None and gens[u].tokens == want[u], u
        assert gens[0].resumes >= 1
        print(f"device 0 resumed {gens[0].resumes}x, back in {[round(r, 3) for r in gens[0].recoveries]} s; "
              f"both done in {dt:.1f} s")

        restarted = serve.wait_for("restarted", timeout=120)
        host, port = restarted["address"]
        assert restarted["replica"] == ids[killed_port]       # the killed one, and only it

        async def on_restarted():                # a new session straight on the restarted replica
            client = await Client.connect(host, port)
            try:
                return await run_remote(client, DevicePart(tiny, CFG, adapters[1]), prompts[1], params[1], timeout=30)
            finally:
                await client.close()
        again = asyncio.run(on_restarted())
        assert again.error is None and again.tokens == want[1]
    finally:
        res = serve.stop()
    assert res["rc"] == 0, res["stderr"][-3000:]
    assert all(e["event"] != "not_json" for e in serve.events), serve.events     # --json: JSON lines only
