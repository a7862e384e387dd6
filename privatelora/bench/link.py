"""``bench link``: single-user decode rate over an emulated link vs the link model's
prediction.
"""

from __future__ import annotations

import asyncio
import sys
import time

from privatelora.bench.geometry import geometry_model, one_thread


def link(geometry: str = "tiny", link: str = "5g", rank: int = 16, dtype: str = "fp16", prompt_tokens: int = 8,
         new_tokens: int = 24, seed: int = 0, quiet: bool = False, backbone=None, adapted_layers: str = "all") -> dict:
    """Single-user decode rate over an emulated link vs what the link model predicts.

    Prediction = the same decode measured on loopback (all compute and codec work) + the
    link model's time for one decode step's frames (hand-off up, per layer activations
    down and reply up, hand-off down), each sent when the previous one has arrived.
    """
    import torch

    from privatelora import wire
    from privatelora.api import build_split
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model.sampling import SamplingParams
    from privatelora.serving.endpoint import CloudEndpoint
    from privatelora.serving.remote import run_remote
    from privatelora.transport import Client
    from privatelora.transport.link import get_profile, predict_time

    one_thread()
    profile = get_profile(link)
    bb = backbone or geometry_model(geometry, seed=seed)
    split = build_split(cfg=PrivateLoRAConfig(rank=rank, adapted_layers=adapted_layers), backbone=bb)
    split.adapter.randomize_(seed + 1, scale=0.5)
    prompt = torch.randint(0, bb.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    params = SamplingParams(max_new_tokens=new_tokens)

    async def decode(ep, name):
        client = await Client.connect(*ep.address, link=name, seed=seed)
        await run_remote(client, split.device, prompt[:2], SamplingParams(max_new_tokens=2), dtype=dtype)  # warm up
        mark = {}

        def observe(msg):
            if isinstance(msg, wire.Handoff) and "t" not in mark:
                mark["t"], mark["stats"] = time.perf_counter(), client.stats.as_dict()
        await run_remote(client, split.device, prompt, params, dtype=dtype, observe=observe)
        dt = time.perf_counter() - mark["t"]
        end = client.stats.as_dict()
        await client.close()
        return dt / (new_tokens - 1), mark["stats"], end

    async def main():
        async with CloudEndpoint(split.cloud) as ep:
            if not quiet:
                print(f"[bench link] {new_tokens} tokens on loopback, then over {profile.name}", file=sys.stderr,
                      flush=True)
            loop_s, _, _ = await decode(ep, "loopback")
            link_s, before, end = await decode(ep, profile.name if profile.name in ("lan", "wifi", "5g", "4g") else link)
            return loop_s, link_s, before, end

    loop_s, link_s, before, end = asyncio.run(main())

    def mean_frame(direction, kind):
        f = end[direction][kind]["frames"] - before[direction][kind]["frames"]
        return (end[direction][kind]["wire"] - before[direction][kind]["wire"]) / f

    layers = len(split.cloud.exchange_ids)
    step = [("up", mean_frame("up", "handoff"))]
    step += [("down", mean_frame("down", "activations")), ("up", mean_frame("up", "reply"))] * layers
    step += [("down", mean_frame("down", "handoff"))]
    link_only = predict_time(profile, step)
    predicted = loop_s + link_only
    return {"geometry": geometry, "link": profile.name, "adapted_layers": layers, "rank": rank, "dtype": dtype,
            "round_trips_per_token": layers + 1,
            "loopback_s_per_token": loop_s, "link_model_s_per_token": link_only,
            "predicted_tokens_per_s": 1 / predicted, "measured_tokens_per_s": 1 / link_s,
            "measured_over_predicted_time": link_s / predicted}
