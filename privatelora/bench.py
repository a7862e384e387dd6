"""``privatelora bench``: measured comparisons, one JSON object each.

``bench comm`` decodes real tokens through the real encoder over a real loopback socket
on a 2-layer model of a named geometry (random weights from a fixed seed) and reports the
wire bytes per generated token per adapted layer, framing included, next to the naive
split of DESIGN.md section 5. Bytes per layer do not depend on depth, so two layers
suffice for the 7B geometry.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

GEOMETRIES = {
    # hidden, heads, kv heads, MLP, vocab: Llama-2-7B proportions
    "7b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
               vocab_size=32000),
    # DESIGN.md section 6: 7B proportions, CPU-sized
    "bench": dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, intermediate_size=2816,
                  vocab_size=8192),
    "tiny": None,   # the shipped tiny model's own config
}
NAIVE_DTYPE = "fp16"   # the paper's and DESIGN.md's baseline: a naive split in fp16


def geometry_model(name: str, layers: int = 2, seed: int = 0):
    """A random-weight Llama of geometry ``name`` with ``layers`` decoder layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .models import load_backbone
    from .config import PrivateLoRAError
    if name not in GEOMETRIES:
        raise PrivateLoRAError(f"unknown geometry {name!r}; choose one of {sorted(GEOMETRIES)}")
    if GEOMETRIES[name] is None:
        tiny = load_backbone("tiny").model.config.to_dict()
        dims = {k: tiny[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                     "intermediate_size", "vocab_size")}
    else:
        dims = GEOMETRIES[name]
    cfg = LlamaConfig(**dims, num_hidden_layers=layers, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg)
    return load_backbone(model)


def comm(geometry: str = "7b", rank: int = 128, shared_a: bool = False, dtype: str = "fp16",
         prompt_tokens: int = 8, new_tokens: int = 16, seed: int = 0, quiet: bool = False,
         backbone=None) -> dict:
    import torch

    from . import wire
    from .accounting import naive_numbers_per_token_per_layer, privatelora_numbers_per_token_per_layer
    from .api import build_split
    from .config import PrivateLoRAConfig
    from .generation import SamplingParams
    from .serving import CloudEndpoint, run_remote
    from .transport import Client

    if new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (decode steps are measured after the first token)")
    _one_thread()
    t0 = time.perf_counter()
    bb = backbone or geometry_model(geometry, seed=seed)
    if not quiet:
        print(f"[bench comm] built {geometry} geometry (2 layers) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    cfg = PrivateLoRAConfig(rank=rank, shared_a=shared_a)
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

    layers = len(split.cloud.layer_ids)
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


def cache_dir() -> Path:
    import os
    return Path(os.environ.get("PRIVATELORA_CACHE") or Path.home() / ".cache" / "privatelora")


def geometry_checkpoint(name: str, layers: int = 16, seed: int = 0, quiet: bool = False) -> str:
    """A local checkpoint directory of geometry ``name`` (built once from ``seed``, then
    reused), so that many processes (backbone replicas, edge actors) load one backbone by
    path. ``tiny`` is the shipped model itself."""
    if name == "tiny":
        return "tiny"
    path = cache_dir() / f"geometry-{name}-L{layers}-seed{seed}"
    if (path / "config.json").is_file():
        return str(path)
    import shutil
    import tempfile
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        geometry_model(name, layers=layers, seed=seed).model.save_pretrained(tmp)
        tmp.rename(path)         # atomic: a half-written checkpoint is never found
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").is_file():   # not a concurrent builder winning the race
            raise
    if not quiet:
        print(f"[bench] built the {name} geometry ({layers} layers, seed {seed}) into {path} in "
              f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return str(path)


def _one_thread():
    """Cloud and device share this process in a benchmark: two OpenMP pools of two threads
    on two cores spin against each other and slow every op ~100x; one thread each avoids it."""
    import torch
    torch.set_num_threads(1)


def link(geometry: str = "tiny", link: str = "5g", rank: int = 16, dtype: str = "fp16", prompt_tokens: int = 8,
         new_tokens: int = 24, seed: int = 0, quiet: bool = False, backbone=None) -> dict:
    """Single-user decode rate over an emulated link vs what the link model predicts.

    Prediction = the same decode measured on loopback (all compute and codec work) + the
    link model's time for one decode step's frames (hand-off up, per layer activations
    down and reply up, hand-off down), each sent when the previous one has arrived.
    """
    import torch

    from . import wire
    from .api import build_split
    from .config import PrivateLoRAConfig
    from .generation import SamplingParams
    from .link import get_profile, predict_time
    from .serving import CloudEndpoint, run_remote
    from .transport import Client

    _one_thread()
    profile = get_profile(link)
    bb = backbone or geometry_model(geometry, seed=seed)
    split = build_split(cfg=PrivateLoRAConfig(rank=rank), backbone=bb)
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

    layers = len(split.cloud.layer_ids)
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


SAMPLE_TEXT = Path(__file__).parent / "zoo" / "samples" / "heldout.txt"


def fidelity(model: str = "tiny", dtype: str = "int8", positions: int = 256, rank: int = 16,
             shared_a: bool = False, free_tokens: int = 64, seed: int = 0, text_file=None, quiet: bool = False) -> dict:
    """How much a lossy wire dtype changes the model's output, over a real socket.

    Teacher forcing: the same ``positions`` tokens of held-out text go through an fp32
    session and a ``dtype`` session; the next-token argmax is compared at every position.
    Free running: greedy decoding from the same prefix on both; reports where (if) they
    first diverge. The user has a non-zero M (with M = 0 the replies are exactly zero and
    the activations' quantization could not show).
    """
    from .api import build_split
    from .config import PrivateLoRAConfig
    from .generation import SamplingParams
    from .models import load_backbone
    from .serving import HANDOFF_DTYPE, CloudEndpoint, run_remote
    from .transport import Client

    _one_thread()
    bb = load_backbone(model)
    split = build_split(cfg=PrivateLoRAConfig(rank=rank, shared_a=shared_a), backbone=bb)
    split.adapter.randomize_(seed + 1, scale=0.5)
    text = Path(text_file or SAMPLE_TEXT).read_text(encoding="utf-8")
    ids = bb.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < positions:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {positions} positions")
    ids = ids[:positions]

    async def main():
        async with CloudEndpoint(split.cloud) as ep:
            client = await Client.connect(*ep.address)
            out = {}
            for dt in ("fp32", dtype):
                if not quiet:
                    print(f"[bench fidelity] {positions} positions and {free_tokens} free tokens in {dt}",
                          file=sys.stderr, flush=True)
                g = await run_remote(client, split.device, ids, SamplingParams(max_new_tokens=1), dtype=dt,
                                     keep_logits=True)
                free = await run_remote(client, split.device, ids[:16], SamplingParams(max_new_tokens=free_tokens),
                                        dtype=dt)
                out[dt] = (g.logits[0], free.tokens)
            await client.close()
            return out
    out = asyncio.run(main())
    ref, got = out["fp32"][0], out[dtype][0]
    err = (ref - got).abs()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    a, b = out["fp32"][1], out[dtype][1]
    diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {"model": bb.name, "dtype": dtype, "handoff_dtype": HANDOFF_DTYPE[dtype], "rank": rank,
            "shared_a": shared_a, "positions": positions, "argmax_agreement": agree,
            "mean_abs_logit_error": err.mean().item(), "max_abs_logit_error": err.max().item(),
            "logit_scale": ref.abs().mean().item(),
            "free_running_tokens": free_tokens, "first_divergence": diverge}


def print_fidelity(r):
    print(f"{r['model']}: {r['dtype']} activations ({r['handoff_dtype']} hand-offs) vs fp32, {r['positions']} positions")
    print(f"  next-token argmax agreement {100 * r['argmax_agreement']:.2f}%; logit error mean "
          f"{r['mean_abs_logit_error']:.4f}, max {r['max_abs_logit_error']:.4f} (mean |logit| {r['logit_scale']:.2f})")
    d = r["first_divergence"]
    print(f"  free-running greedy ({r['free_running_tokens']} tokens): "
          + ("identical" if d is None else f"first differs at token {d}"))


def print_link(r):
    print(f"{r['geometry']} geometry ({r['adapted_layers']} cloud layers), link {r['link']}, {r['dtype']}:")
    print(f"  predicted {r['predicted_tokens_per_s']:.2f} tok/s (loopback {1000 * r['loopback_s_per_token']:.1f} ms "
          f"+ link {1000 * r['link_model_s_per_token']:.1f} ms per token)")
    print(f"  measured  {r['measured_tokens_per_s']:.2f} tok/s ({100 * (r['measured_over_predicted_time'] - 1):+.1f}% time)")


def print_comm(r):
    print(f"{r['geometry']} geometry, rank {r['rank']}{', shared A' if r['shared_a'] else ''}, {r['dtype']} on the wire:")
    print(f"  PrivateLoRA: {r['bytes_per_token_per_layer']:.0f} B per token per layer "
          f"({r['to_device_bytes_per_token_per_layer']:.0f} down + {r['to_cloud_bytes_per_token_per_layer']:.0f} up, "
          f"{r['framing_bytes_per_token_per_layer']:.0f} of it framing)")
    print(f"  naive split: {r['naive_bytes_per_token_per_layer']} B ({r['naive_dtype']}, no framing counted)")
    print(f"  reduction:   {100 * r['reduction']:.2f}%")


def add_commands(sub):
    b = sub.add_parser("bench", help="measured benchmarks (JSON with --json)")
    bsub = b.add_subparsers(dest="bench_command", metavar="BENCH")
    c = bsub.add_parser("comm", help="wire bytes per token per layer vs a naive split, over a real socket")
    c.add_argument("--geometry", choices=sorted(GEOMETRIES), default="7b")
    c.add_argument("--rank", type=int, default=128)
    c.add_argument("--shared-a", action="store_true")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "int8"], default="fp16", help="wire dtype")
    c.add_argument("--prompt-tokens", type=int, default=8)
    c.add_argument("--new-tokens", type=int, default=16)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true")

    ln = bsub.add_parser("link", help="single-user decode rate over an emulated link vs the link model's prediction")
    ln.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    ln.add_argument("--link", default="5g", help="loopback, lan, wifi, 5g, 4g")
    ln.add_argument("--rank", type=int, default=16)
    ln.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "int8"], default="fp16")
    ln.add_argument("--new-tokens", type=int, default=24)
    ln.add_argument("--json", action="store_true")

    def run_link(args):
        from .config import UsageError
        try:
            return link(args.geometry, args.link, args.rank, args.dtype, new_tokens=args.new_tokens, quiet=args.json)
        except ValueError as e:
            raise UsageError(str(e))
    ln.set_defaults(func=run_link, printer=print_link)

    fi = bsub.add_parser("fidelity", help="argmax agreement and logit error of a lossy wire dtype vs fp32")
    fi.add_argument("--model", default="tiny")
    fi.add_argument("--dtype", choices=["fp16", "bf16", "int8"], default="int8")
    fi.add_argument("--positions", type=int, default=256)
    fi.add_argument("--rank", type=int, default=16)
    fi.add_argument("--shared-a", action="store_true")
    fi.add_argument("--text", help="text file to teacher-force (default: a held-out passage shipped with the package)")
    fi.add_argument("--json", action="store_true")

    def run_fidelity(args):
        from .config import UsageError
        try:
            return fidelity(args.model, args.dtype, args.positions, args.rank, args.shared_a, text_file=args.text,
                            quiet=args.json)
        except (ValueError, OSError) as e:
            raise UsageError(str(e))
    fi.set_defaults(func=run_fidelity, printer=print_fidelity)

    mo = bsub.add_parser("model", help="the paper's analytic throughput model next to ours (latency, batching, wire)")
    mo.add_argument("--rtt-ms", type=float, nargs="*", default=[0.0, 20.0], help="round trips to evaluate")
    mo.add_argument("--users", type=int, nargs="*", default=[1, 8, 32])
    mo.add_argument("--json", action="store_true")

    def run_model(args):
        from .perfmodel import report
        return report(rtts=tuple(r / 1000 for r in args.rtt_ms), users=tuple(args.users))

    def print_model(r):
        print(f"{'model':12} {'paper table':>11} {'paper formula':>13} {'device-only 4b':>14} {'A100 only':>9}")
        for m in r["models"]:
            print(f"{m['model']:12} {m['paper_table_tps']:11.1f} {m['paper_formula_tps']:13.1f} "
                  f"{m['device_only_4bit_tps']:14.1f} {m['cloud_only_tps']:9.1f}")
        print("\nours (5G 60/100 Mbit/s, framed wire bytes; tokens/s: one user | aggregate by users):")
        for m in r["models"]:
            for o in m["ours"]:
                agg = ", ".join(f"{u}: {v:.0f}" for u, v in o["aggregate_tps"].items())
                print(f"  {m['model']:12} r={o['rank']:<4} {'shared A' if o['shared_a'] else 'separate A':10} "
                      f"{o['dtype']:5} rtt {o['rtt_ms']:4.0f} ms: {o['single_user_tps']:6.2f} | {agg}")
    mo.set_defaults(func=run_model, printer=print_model)

    def run_comm(args):
        from .config import UsageError
        if args.rank < 1 or args.prompt_tokens < 1:
            raise UsageError("--rank and --prompt-tokens must be positive")
        try:
            return comm(args.geometry, args.rank, args.shared_a, args.dtype, args.prompt_tokens, args.new_tokens,
                        args.seed, quiet=args.json)
        except ValueError as e:
            raise UsageError(str(e))
    c.set_defaults(func=run_comm, printer=print_comm)

    th = bsub.add_parser("throughput", help="decode throughput: the physical limit vs ours vs paper-style serving, "
                                            "on one pinned backbone with N edge actors (Ray)",
                         description="For each user count: the limit (the backbone's layers decoding N sequences in "
                                     "one plain batched forward), ours (N edge actors over TCP, stages batched by the "
                                     "scheduler) and paper-style (the same actors, every stage alone). Prints tokens/s, "
                                     "time to first token and the backbone's busy fraction. Over an emulated link (--link) each "
                                     "row also gets the model's prediction: the same users' loopback step, "
                                     "measured right after, plus the link model's time for the step's round trips.")
    th.add_argument("--geometry", choices=["bench", "tiny"], default="bench",
                    help="bench: 7B proportions, CPU-sized, 16 layers (built once into the cache, ~0.9 GB); "
                         "tiny: the shipped model")
    th.add_argument("--users", default="1,2,4,8,16", help="comma-separated user counts (default 1,2,4,8,16)")
    th.add_argument("--link", default="loopback", help="loopback, lan, wifi, 5g, 4g (emulated on each device's link)")
    th.add_argument("--new-tokens", type=int, default=32, help="tokens each user decodes (default 32)")
    th.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of every user (default 16)")
    th.add_argument("--gather-ms", type=float, default=10.0,
                    help="ours: the longest a stage waits for its owed members (default 10, as serve)")
    th.add_argument("--merge", action="store_true",
                    help="ours: stages also wait (within --gather-ms) for sessions behind them, merging cohorts")
    th.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "int8"], default="fp32", help="wire dtype")
    th.add_argument("--edge-hosts", type=int, default=0, metavar="K",
                    help="carry the users on K edge hosts (one process and connection each, so over an "
                         "emulated link a host's users share it) instead of one edge actor per user (default)")
    th.add_argument("--no-hf", action="store_true", help="skip the transformers cloud-only reference")
    th.add_argument("--plot", metavar="FILE.png", help="also draw the curves (needs matplotlib)")
    th.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    th.add_argument("--json", action="store_true", help="print one JSON object (progress stays on stderr)")

    def run_throughput(args):
        from .config import UsageError
        try:
            users = [int(u) for u in args.users.split(",") if u.strip()]
        except ValueError:
            raise UsageError(f"--users must be comma-separated integers, not {args.users!r}")
        from .link import get_profile
        try:
            get_profile(args.link)
        except ValueError as e:
            raise UsageError(str(e))
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UsageError("--plot needs matplotlib: pip install 'privatelora[bench]'")
        from .actors.throughput import run
        from .cli import stdout_kept_for_json
        with stdout_kept_for_json():
            out = run(args.geometry, users, args.link, args.new_tokens, args.prompt_tokens, args.gather_ms, args.merge,
                      hf=not args.no_hf, dtype=args.dtype, edge_hosts=args.edge_hosts, address=args.address)
        if args.plot:
            from .throughput import plot
            plot(out, args.plot)
        return out
    th.set_defaults(func=run_throughput, printer=print_throughput)


def print_throughput(r):
    who = f"{r['edge_hosts']} edge hosts" if r.get("edge_hosts") else "one edge actor per user"
    print(f"{r['geometry']} geometry ({r['layers']} cloud layers, rank {r['rank']}), link {r['link']}, "
          f"{r['new_tokens']} tokens per user, {who}; backbone on cores {r['cores']['backbone']}, "
          f"devices on {r['cores']['edges']}")
    print(f"{'users':>5} {'limit':>8} {'ours':>8} {'paper':>8} {'ours/limit':>10} {'ours/paper':>10} "
          f"{'busy':>5} {'batch':>5} {'TTFT ours':>9} {'TTFT paper':>10}")
    for x in r["results"]:
        print(f"{x['users']:5d} {x['limit_tok_s']:8.1f} {x['ours_tok_s']:8.1f} {x['paper_style_tok_s']:8.1f} "
              f"{x['ours_over_limit']:10.2f} {x['ours_over_paper_style']:10.2f} {100 * x['backbone_busy']:4.0f}% "
              f"{x['ours_mean_batch']:5.1f} {x['ours_ttft_s'] * 1000:7.0f}ms {x['paper_style_ttft_s'] * 1000:8.0f}ms")
    if any("model_tok_s" in x for x in r["results"]):
        print("model (this machine's loopback step + the link model's time per token): " + ", ".join(
            f"{x['users']}: {x['model_tok_s']:.1f} tok/s (measured/model {x['ours_over_model']:.2f})"
            for x in r["results"]))
    s = r.get("summary")
    if s:
        print(f"at {s['users']} users: ours = {s['ours_over_limit']:.2f} of the limit; ours / paper-style = "
              f"{s['ours_over_paper_style']:.2f}, {100 * s['share_of_ideal_gain']:.0f}% of the ideal gain "
              f"{s['ideal_gain']:.2f} (limit at {s['users']} users / limit at 1)")
