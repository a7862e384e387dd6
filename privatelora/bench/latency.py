"""``bench latency``: what one user (and N users) feels per token, with every lever that
cuts device round trips, over an emulated link, next to running the model on the device.

For each configuration, in one run on one backbone: an adapter placement (``all``, then
fewer adapted layers) with no draft, then with each draft (``ngram``, and ``tiny`` on the
tiny geometry). Users decode greedily from real text (the held-out passages shipped with
the package), each through its own emulated link to an in-process cloud endpoint, with a
non-zero private M. Per configuration: decode tokens/s (aggregate over the users, from the
first generated token to the last), round trips per generated token, the drafts'
acceptance rate, and the time per output token as the app sees it (a chunk of n tokens
that arrives after t counts as n tokens of t / n: speculative chunks are not shown as
zero-latency tokens). The device-only figure decodes the same merged model (M included)
on one core with the transformers implementation and its KV cache, no network.
Every figure is the median over ``repeats`` runs with different prompts.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from privatelora.bench.geometry import geometry_model, one_thread

RANKS = {"tiny": 16, "bench": 32}
PLACEMENTS = {"tiny": ("all", "last:2", "every:2", "last:1"), "bench": ("all", "every:4", "last:2", "last:1")}


def _prompts(tokenizer, vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens: passages of held-out text, or random ids."""
    import torch
    if tokenizer is not None:
        from privatelora.bench.fidelity import SAMPLE_TEXT
        ids = tokenizer.encode(SAMPLE_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
        stride = max(1, (len(ids) - length) // max(n, 1))
        return [ids[i * stride: i * stride + length] for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


async def _decode(client, part, prompt, new_tokens: int, draft, draft_tokens: int, temperature: float) -> dict:
    """One generation over ``client``; arrival time of every token chunk and the counts."""
    from privatelora.model.sampling import SamplingParams
    from privatelora.serving.remote import run_remote
    chunks: list[tuple[float, int]] = []          # (arrival time, tokens in the chunk)

    def arrived(total: int) -> None:
        chunks.append((time.perf_counter(), total - sum(n for _, n in chunks)))
    gen = await run_remote(client, part, prompt, SamplingParams(max_new_tokens=new_tokens, temperature=temperature,
                                                                seed=0),
                           timeout=120.0, draft=draft, draft_tokens=draft_tokens, on_tokens=arrived)
    if gen.error is not None:
        raise RuntimeError(f"the cloud refused: {gen.error.code} {gen.error.reason}")
    # the prefill's chain (its token is the first) costs one round trip per adapted cloud layer + 1
    return {"chunks": chunks, "tokens": len(gen.tokens), "round_trips": gen.round_trips - len(part.exchange_ids) - 1,
            "proposed": gen.proposed, "accepted": gen.accepted}


def _summary(runs: list[dict]) -> dict:
    """Decode-window figures of concurrent users' runs (the first token is the prefill's)."""
    t0 = min(r["chunks"][0][0] for r in runs)
    t1 = max(r["chunks"][-1][0] for r in runs)
    tokens = sum(r["tokens"] - 1 for r in runs)
    tpot: list[float] = []
    for r in runs:
        for (a, _), (b, n) in zip(r["chunks"], r["chunks"][1:]):
            tpot += [(b - a) / n] * n
    proposed = sum(r["proposed"] for r in runs)
    return {"tok_s": tokens / (t1 - t0) if t1 > t0 else float("nan"),
            "round_trips_per_token": sum(r["round_trips"] for r in runs) / max(tokens, 1),
            "accept_rate": sum(r["accepted"] for r in runs) / proposed if proposed else None,
            "tpot": tpot}


def device_only_tok_s(model, prompt, new_tokens: int) -> float:
    """The whole (merged) model on this core: transformers with its KV cache, greedy."""
    import torch
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model(input_ids=ids, use_cache=True)
        cache, tok = out.cache, out.logits[0, -1].argmax().view(1, 1)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok, cache=cache, use_cache=True)
            cache, tok = out.cache, out.logits[0, -1].argmax().view(1, 1)
        return (new_tokens - 1) / (time.perf_counter() - t0)


def run(geometry: str = "tiny", link: str = "5g", users: int = 1, new_tokens: int = 48, prompt_tokens: int = 32,
        placements=None, drafts=None, draft_tokens: int = 4, repeats: int = 3, adapter_scale: float = 0.3,
        temperature: float = 0.0, seed: int = 0, quiet: bool = False) -> dict:
    from privatelora.api import build_split
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model import reference
    from privatelora.model.loading import load_backbone
    from privatelora.runtime.draft import load_draft
    from privatelora.serving.endpoint import CloudEndpoint
    from privatelora.transport import Client
    from privatelora.transport.link import get_profile

    def say(msg):
        if not quiet:
            print(f"[bench latency] {msg}", file=sys.stderr, flush=True)

    one_thread()
    profile = get_profile(link)
    bb = load_backbone("tiny") if geometry == "tiny" else geometry_model(geometry, layers=16, seed=seed)
    placements = list(placements or PLACEMENTS[geometry])
    drafts = list(drafts if drafts is not None else (["ngram", "tiny"] if geometry == "tiny" else ["ngram"]))
    counts = sorted({1, users})
    # one draft per concurrent user, loaded once (a bad one fails now, not after minutes of
    # measuring); run_remote resets a draft's state at the start of each session
    pool = {name: [load_draft(name, bb) for _ in range(max(counts))] for name in drafts}
    prompts = _prompts(bb.tokenizer, bb.config.vocab_size, repeats * max(counts), prompt_tokens, seed)
    results, device_only = [], []

    async def measure(ep, part, draft_name, n_users, rep) -> dict:
        clients = [await Client.connect(*ep.address, link=profile, seed=seed + 97 * rep + u) for u in range(n_users)]
        try:
            jobs = [_decode(c, part, prompts[(rep * n_users + u) % len(prompts)], new_tokens,
                            pool[draft_name][u] if draft_name else None, draft_tokens, temperature)
                    for u, c in enumerate(clients)]
            return _summary(await asyncio.gather(*jobs))
        finally:
            for c in clients:
                await c.close()

    async def main():
        for spec in placements:
            cfg = PrivateLoRAConfig(rank=RANKS[geometry], adapted_layers=spec)
            split = build_split(cfg=cfg, backbone=bb)
            split.adapter.randomize_(seed + 1, scale=adapter_scale)
            if spec == placements[0]:
                merged = reference.merged_model(bb, split.adapter)
                device_only.extend(device_only_tok_s(merged, prompts[i], new_tokens) for i in range(repeats))
                say(f"device only: {statistics.median(device_only):.1f} tok/s")
            async with CloudEndpoint(split.cloud) as ep:
                await measure(ep, split.device, None, 1, 0)         # warm-up: connections, caches, allocator
                for draft_name in [None] + drafts:
                    for n in counts:
                        reps = [await measure(ep, split.device, draft_name, n, r) for r in range(repeats)]
                        tpot = [t for r in reps for t in r["tpot"]]
                        acc = [r["accept_rate"] for r in reps if r["accept_rate"] is not None]
                        row = {"config": spec + (f"+{draft_name}" if draft_name else ""), "adapted_layers": spec,
                               "draft": draft_name, "users": n,
                               "tok_s": statistics.median(r["tok_s"] for r in reps),
                               "round_trips_per_token": statistics.median(r["round_trips_per_token"] for r in reps),
                               "accept_rate": statistics.median(acc) if acc else None,
                               "itl_p50_ms": 1000 * _percentile(tpot, 0.5), "itl_p99_ms": 1000 * _percentile(tpot, 0.99),
                               "tok_s_runs": [r["tok_s"] for r in reps]}
                        results.append(row)
                        say(f"{row['config']:>18} users={n}: {row['tok_s']:6.1f} tok/s, "
                            f"{row['round_trips_per_token']:.2f} round trips/token"
                            + (f", accept {row['accept_rate']:.2f}" if row["accept_rate"] is not None else ""))

    asyncio.run(main())
    base = next(r for r in results if r["config"] == placements[0] and r["users"] == 1)
    one = [r for r in results if r["users"] == 1]
    best = max(one, key=lambda r: r["tok_s"])
    return {"geometry": geometry, "link": profile.name, "rtt_ms": 1000 * profile.latency_s, "users": users,
            "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "draft_tokens": draft_tokens,
            "repeats": repeats, "temperature": temperature, "rank": RANKS[geometry],
            "adapter_scale": adapter_scale, "layers": bb.n_layers,
            "baseline_tok_s": base["tok_s"], "device_only_tok_s": statistics.median(device_only),
            "best": {"config": best["config"], "tok_s": best["tok_s"], "over_baseline": best["tok_s"] / base["tok_s"],
                     "over_device_only": best["tok_s"] / statistics.median(device_only)},
            "results": results}


def print_latency(r: dict) -> None:
    print(f"{r['geometry']} geometry ({r['layers']} layers, rank {r['rank']}), link {r['link']} "
          f"({r['rtt_ms']:.0f} ms round trip), {r['new_tokens']} tokens, K = {r['draft_tokens']} drafted per chain, "
          f"median of {r['repeats']}")
    print(f"{'config':>20} {'users':>5} {'tok/s':>8} {'RT/token':>8} {'accept':>6} {'ITL p50':>8} {'ITL p99':>8}")
    for x in r["results"]:
        acc = f"{x['accept_rate']:.2f}" if x["accept_rate"] is not None else "-"
        print(f"{x['config']:>20} {x['users']:5d} {x['tok_s']:8.1f} {x['round_trips_per_token']:8.2f} {acc:>6} "
              f"{x['itl_p50_ms']:6.1f}ms {x['itl_p99_ms']:6.1f}ms")
    b = r["best"]
    print(f"device only: {r['device_only_tok_s']:.1f} tok/s; all layers, no draft: {r['baseline_tok_s']:.1f} tok/s; "
          f"best: {b['config']} {b['tok_s']:.1f} tok/s = {b['over_baseline']:.2f}x the baseline, "
          f"{b['over_device_only']:.2f}x device-only")
