"""``bench comm``: real tokens through the real encoder over a real loopback socket on a
2-layer model of a named geometry; the wire bytes per generated token per adapted layer,
framing included, next to a naive split (the device holds LoRA, so it needs the d-dim
hidden state down and returns three d-dim deltas up: 4d numbers per layer, in fp16).
"""

from __future__ import annotations

import asyncio
import sys
import time

from privatelora.bench.geometry import NAIVE_DTYPE, geometry_model, one_thread


def comm(geometry: str = "7b", rank: int = 128, shared_a: bool = False, dtype: str = "fp16",
         prompt_tokens: int = 8, new_tokens: int = 16, seed: int = 0, quiet: bool = False,
         backbone=None) -> dict:
    import torch

    from privatelora import wire
    from privatelora.api import build_split
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model.sampling import SamplingParams
    from privatelora.runtime.accounting import (
        naive_numbers_per_token_per_layer,
        privatelora_numbers_per_token_per_layer,
    )
    from privatelora.serving.endpoint import CloudEndpoint
    from privatelora.serving.remote import run_remote
    from privatelora.transport import Client

    if new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (decode steps are measured after the first token)")
    one_thread()
    t0 = time.perf_counter()
    bb = backbone or geometry_model(geometry, seed=seed)
    if not quiet:
        print(f"[bench comm] built {geometry} geometry (2 layers) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    # bytes do not depend on how A and B are made; random ones cost nothing to make, where the
    # svd scheme would take minutes of float64 SVDs at a 7B geometry
    cfg = PrivateLoRAConfig(rank=rank, shared_a=shared_a, projection="random")
    split = build_split(cfg=cfg, backbone=bb)
    split.adapter.randomize_(seed + 1, scale=0.5)     # a user with non-zero M: replies are not all zeros
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, bb.config.vocab_size, (prompt_tokens,), generator=g).tolist()
    snap = {}

    async def main():
        async with CloudEndpoint(split.cloud) as ep:
            client = await Client.connect(*ep.address)

            def observe(msg):   # after the prefill's hand-off comes back, only decode traffic remains
                if isinstance(msg, wire.Handoff) and "prefill" not in snap:
                    snap["prefill"] = client.stats.as_dict()
            gen = await run_remote(client, split.device, prompt,
                                   SamplingParams(max_new_tokens=new_tokens, temperature=0.0),
                                   dtype=dtype, observe=observe)
            end = client.stats.as_dict()
            await client.close()
            return gen, end

    gen, end = asyncio.run(main())
    if len(gen.tokens) != new_tokens:
        raise RuntimeError(f"generation stopped after {len(gen.tokens)} tokens")

    def delta(direction, kind, field):
        a = end.get(direction, {}).get(kind, {}).get(field, 0)
        b = snap["prefill"].get(direction, {}).get(kind, {}).get(field, 0)
        return a - b

    layers = len(split.cloud.exchange_ids)
    steps = new_tokens - 1       # decode steps that went through the cloud
    per = steps * layers
    assert delta("down", "activations", "frames") == per and delta("up", "reply", "frames") == per
    down = delta("down", "activations", "wire") / per
    up = delta("up", "reply", "wire") / per
    raw_down = delta("down", "activations", "raw") / per
    raw_up = delta("up", "reply", "raw") / per
    naive_numbers = naive_numbers_per_token_per_layer(bb.config, cfg.targets)
    naive = naive_numbers * wire.DTYPES[NAIVE_DTYPE]
    ours = privatelora_numbers_per_token_per_layer(rank, cfg.targets, shared_a)
    return {
        "geometry": geometry, "hidden": bb.config.hidden_size, "adapted_layers": layers, "rank": rank,
        "shared_a": shared_a, "dtype": dtype, "prompt_tokens": prompt_tokens, "decode_tokens": steps,
        "bytes_per_token_per_layer": down + up,
        "to_device_bytes_per_token_per_layer": down, "to_cloud_bytes_per_token_per_layer": up,
        "raw_bytes_per_token_per_layer": raw_down + raw_up,
        "framing_bytes_per_token_per_layer": down + up - raw_down - raw_up,
        "numbers_per_token_per_layer": ours["total"],
        "naive_numbers_per_token_per_layer": naive_numbers,
        "naive_bytes_per_token_per_layer": naive, "naive_dtype": NAIVE_DTYPE,
        "reduction": 1 - (down + up) / naive,
        "reduction_vs_naive_same_dtype": 1 - (down + up) / (naive_numbers * wire.DTYPES[dtype]),
        "handoff_bytes_per_token": {"to_cloud": delta("up", "handoff", "wire") / steps,
                                    "to_device": delta("down", "handoff", "wire") / steps},
        "seconds": time.perf_counter() - t0,
    }
