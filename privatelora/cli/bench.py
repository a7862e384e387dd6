"""The ``bench`` commands' arguments and printers (the measurements live in
``privatelora/bench/``).
"""

from __future__ import annotations

from privatelora.bench.comm import comm
from privatelora.bench.fidelity import fidelity
from privatelora.bench.geometry import GEOMETRIES
from privatelora.bench.link import link
from privatelora.cli import latency as latency_cli
from privatelora.cli.common import non_negative, stdout_kept_for_json
from privatelora.config import PLACEMENT_HELP, PrivateLoRAConfig, UsageError


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
    ln.add_argument("--adapted-layers", metavar="SPEC", default="all", help=PLACEMENT_HELP)
    ln.add_argument("--json", action="store_true")

    def run_link(args):
        try:
            return link(args.geometry, args.link, args.rank, args.dtype, new_tokens=args.new_tokens, quiet=args.json,
                        adapted_layers=args.adapted_layers)
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
        try:
            return fidelity(args.model, args.dtype, args.positions, args.rank, args.shared_a, text_file=args.text,
                            quiet=args.json)
        except (ValueError, OSError) as e:
            raise UsageError(str(e))
    fi.set_defaults(func=run_fidelity, printer=print_fidelity)

    mo = bsub.add_parser("model", help="the paper's analytic throughput model next to ours (latency, batching, wire)")
    mo.add_argument("--rtt-ms", type=float, nargs="*", default=[0.0, 20.0], help="round trips to evaluate")
    mo.add_argument("--users", type=int, nargs="*", default=[1, 8, 32])
    mo.add_argument("--accept-rate", type=float, default=0.45, metavar="FLOAT",
                    help="per-token acceptance of drafted tokens, in (0, 1], for one more row per model "
                         "(last:2 placement); default 0.45: the shipped tiny draft's acceptance measured by "
                         "`bench latency` over 5G (a personalized M, last:1, K = 4) - an example, use your own")
    mo.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                    help="tokens drafted on the device per chain for that row (0: no draft)")
    mo.add_argument("--json", action="store_true")

    def run_model(args):
        from privatelora.bench.perfmodel import report
        if not 0.0 < args.accept_rate <= 1.0:
            raise UsageError(f"--accept-rate must be in (0, 1], not {args.accept_rate}")
        if not 0 <= args.draft_tokens <= 256:
            raise UsageError(f"--draft-tokens must be in 0..256, not {args.draft_tokens}")
        if any(not 0.0 <= r < float("inf") for r in args.rtt_ms):
            raise UsageError("--rtt-ms values must be finite and >= 0")
        try:
            return report(rtts=tuple(r / 1000 for r in args.rtt_ms), users=tuple(args.users),
                          draft_tokens=args.draft_tokens, accept_rate=args.accept_rate)
        except ValueError as e:
            raise UsageError(str(e))

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
        w = r["assumptions"]["latency_wire"]
        for rtt in sorted({x["rtt_ms"] for x in r["latency"]}, key=lambda v: (v != 20.0, v)):
            print(f"\none user, {rtt:g} ms round trip: placement and speculation (r={w['rank']}, "
                  f"{'shared A' if w['shared_a'] else 'separate A'}, {w['dtype']}; tokens/s; * = --draft-tokens/"
                  f"--accept-rate):")
            print(f"  {'model':12} {'adapted':>13} {'draft K':>7} {'accept':>6} {'one user':>8} {'device-only':>11}")
            for x in r["latency"]:
                if x["rtt_ms"] != rtt:
                    continue
                acc = f"{x['accept_rate']:.2f}" if x["draft_tokens"] else "-"
                where = f"{x['placement']} ({x['adapted_layers']})"
                print(f"  {x['model']:12} {where:>13} {x['draft_tokens']:7d} {acc:>6} "
                      f"{x['tok_s_one_user']:8.2f} {r['device_only_tps'][x['model']]:11.1f}"
                      f"{' *' if x['requested'] else ''}")
    mo.set_defaults(func=run_model, printer=print_model)

    def run_comm(args):
        if args.rank < 1 or args.prompt_tokens < 1:
            raise UsageError("--rank and --prompt-tokens must be positive")
        try:
            return comm(args.geometry, args.rank, args.shared_a, args.dtype, args.prompt_tokens, args.new_tokens,
                        args.seed, quiet=args.json)
        except ValueError as e:
            raise UsageError(str(e))
    c.set_defaults(func=run_comm, printer=print_comm)

    th = bsub.add_parser("throughput", help="decode throughput: our batched eager forward (the limit) vs ours vs "
                                            "paper-style serving, on one pinned backbone with N edge actors (Ray)",
                         description="For each user count: the limit (our batched eager forward over the cloud's "
                                     "layers: N sequences in one plain batched forward, no split, no adapter, no "
                                     "network; transformers' own forward is reported next to it unless --no-hf), ours "
                                     "(N edge actors over TCP, stages batched by the scheduler) and paper-style (the "
                                     "same actors, every stage alone), measured --repeat times interleaved; every "
                                     "figure is the median, with its min and max in the JSON. Prints tokens/s, "
                                     "time to first token and the backbone's busy fraction. Over an emulated link (--link) each "
                                     "row also gets the model's prediction: the same users' loopback step, "
                                     "measured right after, plus the link model's time for the step's round trips.")
    th.add_argument("--geometry", choices=["bench", "tiny", "7b"], default="bench",
                    help="bench: 7B proportions, CPU-sized, 16 layers (built once into the cache, ~0.9 GB); "
                         "tiny: the shipped model; 7b: Llama-2-7B's shapes, 8 layers (~7.5 GB; with "
                         "--gpus-per-replica only)")
    th.add_argument("--layers", type=int, default=None, metavar="L",
                    help="decoder layers of the bench or 7b checkpoint (default 16 and 8; built once each)")
    th.add_argument("--repeat", type=int, default=3, metavar="N",
                    help="measure each user count N times, interleaved; report medians with min/max (default 3)")
    th.add_argument("--gpus-per-replica", type=non_negative, default=0, metavar="G",
                    help="GPUs the backbone replica asks Ray for (default 0: the CPU)")
    th.add_argument("--users", default="1,2,4,8,16", help="comma-separated user counts (default 1,2,4,8,16)")
    th.add_argument("--link", default="loopback", help="loopback, lan, wifi, 5g, 4g (emulated on each device's link)")
    th.add_argument("--new-tokens", type=int, default=32, help="tokens each user decodes (default 32)")
    th.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of every user (default 16)")
    th.add_argument("--gather-ms", type=float, default=10.0,
                    help="ours: the longest a stage waits for its owed members (default 10, as serve)")
    th.add_argument("--no-merge", dest="merge", action="store_false",
                    help="ours: do not merge cohorts (by default, as serve does, a stage also waits within "
                         "--gather-ms for the sessions behind it in the step, so split cohorts rejoin)")
    th.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "int8"], default="fp32", help="wire dtype")
    th.add_argument("--adapted-layers", metavar="SPEC", default="all", help=PLACEMENT_HELP)
    th.add_argument("--edge-hosts", type=int, default=0, metavar="K",
                    help="carry the users on K edge hosts (one process and connection each, so over an "
                         "emulated link a host's users share it) instead of one edge actor per user (default)")
    th.add_argument("--no-hf", action="store_true", help="skip transformers' own forward (the cloud-only reference)")
    th.add_argument("--trace", action="store_true",
                    help="ours: also record the replica's stage-loop timeline (per decode cycle: stage and "
                         "prepare compute, the hand-off to the worker thread, the round trip) into each row")
    th.add_argument("--plot", metavar="FILE.png", help="also draw the curves (needs matplotlib)")
    th.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    th.add_argument("--json", action="store_true", help="print one JSON object (progress stays on stderr)")

    def run_throughput(args):
        try:
            users = [int(u) for u in args.users.split(",") if u.strip()]
        except ValueError:
            raise UsageError(f"--users must be comma-separated integers, not {args.users!r}")
        try:
            PrivateLoRAConfig(adapted_layers=args.adapted_layers)      # before any Ray work
        except ValueError as e:
            raise UsageError(str(e))
        from privatelora.transport.link import get_profile
        try:
            get_profile(args.link)
        except ValueError as e:
            raise UsageError(str(e))
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UsageError("--plot needs matplotlib: pip install 'privatelora[bench]'")
        from privatelora.actors.throughput import run
        with stdout_kept_for_json():
            out = run(args.geometry, users, args.link, args.new_tokens, args.prompt_tokens, args.gather_ms, args.merge,
                      hf=not args.no_hf, dtype=args.dtype, edge_hosts=args.edge_hosts, address=args.address,
                      adapted_layers=args.adapted_layers, repeat=args.repeat, gpus_per_replica=args.gpus_per_replica,
                      layers=args.layers, trace=args.trace)
        if args.plot:
            from privatelora.bench.throughput import plot
            plot(out, args.plot)
        return out
    th.set_defaults(func=run_throughput, printer=print_throughput)
    latency_cli.add_command(bsub)
    add_privacy(bsub)


def add_privacy(bsub):
    from privatelora.bench.privacy import QUICK, SETTINGS
    names = [s.config for s in SETTINGS]
    pv = bsub.add_parser(
        "privacy", help="what an honest-but-curious cloud recovers from its traffic, per configuration and defence",
        description="A victim device tunes a private M on held-out text (the Sonnets) and generates through a real "
                    "split in process; an attacker holding the public checkpoint and its own public text (Paradise "
                    "Lost) attacks every message the cloud received: the prompt tokens (nearest embedding row, "
                    "replay of public device layers, a learned inverter), the greedy outputs (LM head, replay of "
                    "public tail layers, an inverter), M (least squares on (A h, M A h)) and tuning labels (from "
                    "the gradient sent up). Each rate is an exact-recovery rate next to the no-traffic baseline; "
                    "each configuration reports its held-out perplexity cost and the device's speed cost.",
        epilog="configurations: " + ", ".join(f"{s.config} ({s.defence})" for s in SETTINGS))
    pv.add_argument("--model", default="tiny", help="backbone (default: the shipped tiny model)")
    pv.add_argument("--configs", metavar="NAMES", help=f"comma-separated configurations (default: all; "
                                                        f"--quick: {','.join(QUICK)})")
    pv.add_argument("--quick", action="store_true", help="fewer tokens, configurations and training (about a minute)")
    pv.add_argument("--prompts", type=int, help="victim prompts (default 4; quick 2)")
    pv.add_argument("--prompt-tokens", type=int, help="tokens per prompt (default 48; quick 32)")
    pv.add_argument("--new-tokens", type=int, help="greedy tokens each prompt generates (default 16; quick 8)")
    pv.add_argument("--tune-steps", type=int, help="steps tuning the victim's M (default 100; quick 20; 0: a random M)")
    pv.add_argument("--public-tokens", type=int, help="attacker's public text for its inverters (default 32768)")
    pv.add_argument("--no-labels", action="store_true", help="skip the label attack on tuning traffic")
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--json", action="store_true", help="print one JSON object (progress stays on stderr)")

    def run_privacy(args):
        from privatelora.bench.privacy import bench_privacy
        configs = None if args.configs is None else [c.strip() for c in args.configs.split(",") if c.strip()]
        if configs == []:
            raise UsageError("--configs names no configuration")
        bad = [c for c in configs or () if c not in names]
        if bad:
            raise UsageError(f"unknown configuration(s) {', '.join(bad)}; choose from {', '.join(names)}")
        for flag in ("prompts", "prompt_tokens", "new_tokens", "public_tokens"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
        if args.tune_steps is not None and args.tune_steps < 0:
            raise UsageError("--tune-steps must be >= 0")
        try:
            return bench_privacy(args.model, settings=configs, quick=args.quick, prompts=args.prompts,
                                 prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                 tune_steps=args.tune_steps, public_tokens=args.public_tokens,
                                 labels=not args.no_labels, seed=args.seed)
        except (ValueError, OSError) as e:
            raise UsageError(str(e))
    pv.set_defaults(func=run_privacy, printer=print_privacy)


def print_privacy(r):
    print(f"{r['model']}: victim {r['victim_text']} ({r['prompts']} prompts x {r['prompt_tokens']} tokens + "
          f"{r['new_tokens']} generated, M rank {r['rank']} tuned {r['tune_steps']} steps), attacker's text "
          f"{r['public_text']}; exact recovery (no-traffic baseline {100 * r['baseline_tokens']:.1f}%)")
    best = {(b["config"], b["signal"]): b for b in r["strongest"]}
    print(f"{'config':16} {'tokens':>15} {'outputs':>16} {'M':>6} {'labels':>7} {'ppl':>7} {'cost':>8} "
          f"{'device':>7}  defence")
    for c in r["configs"]:
        def cell(sig):
            b = best.get((c["config"], sig))
            return "-" if b is None else f"{100 * b['recovered']:.1f}% {b['attack']}" if sig in ("tokens", "outputs") \
                else f"{100 * b['recovered']:.0f}%"
        print(f"{c['config']:16} {cell('tokens'):>15} {cell('outputs'):>16} {cell('M'):>6} {cell('labels'):>7} "
              f"{c['heldout_ppl']:7.2f} {c['utility_cost']:+8.2f} {100 * c['speed_cost']:+6.0f}%  {c['defence']}")
    print("tokens: every token handed in (prompt + outputs fed back); tokens/outputs: the strongest attack's "
          "rate; M: share of M matrices within 1e-3 relative error; labels: '-' where not measured (cut noise "
          "is not applied to tuning); cost: held-out perplexity over the default's; device: the device's "
          "compute per token over the default's")


def print_throughput(r):
    who = f"{r['edge_hosts']} edge hosts" if r.get("edge_hosts") else "one edge actor per user"
    print(f"{r['geometry']} geometry ({r['layers']} cloud layers, rank {r['rank']}), link {r['link']}, "
          f"{r['new_tokens']} tokens per user, {who}; backbone on {r.get('device', 'cpu')}, cores "
          f"{r['cores']['backbone']}" + (f" (its event loop on {r['cores']['io']})" if r['cores'].get('io') else "")
          + f", devices on {r['cores']['edges']}; median of {r.get('repeat', 1)} runs")
    print(f"limit: {r.get('limit', 'the plain batched forward')}" + ("; hf: transformers' own forward"
                                                                     if r.get("hf_cloud_only") else ""))
    hf = any("hf_cloud_only_tok_s" in x for x in r["results"])
    hf_head = f" {'hf':>7}" if hf else ""
    print(f"{'users':>5} {'limit':>8}{hf_head} {'ours':>8} {'ours min-max':>13} {'paper':>8} "
          f"{'ours/limit':>10} {'ours/paper':>10} {'busy':>5} {'batch':>5} {'TTFT ours':>9} {'TTFT paper':>10}")
    for x in r["results"]:
        span = f"{x.get('ours_tok_s_min', x['ours_tok_s']):.1f}-{x.get('ours_tok_s_max', x['ours_tok_s']):.1f}"
        print(f"{x['users']:5d} {x['limit_tok_s']:8.1f}" + (f" {x['hf_cloud_only_tok_s']:7.1f}" if hf else "")
              + f" {x['ours_tok_s']:8.1f} {span:>13} {x['paper_style_tok_s']:8.1f} "
              f"{x['ours_over_limit']:10.2f} {x['ours_over_paper_style']:10.2f} {100 * x['backbone_busy']:4.0f}% "
              f"{x['ours_mean_batch']:5.1f} {x['ours_ttft_s'] * 1000:7.0f}ms {x['paper_style_ttft_s'] * 1000:8.0f}ms")
    for x in r["results"]:
        for t in x.get("ours_timeline") or []:
            if t.get("cycle_ms") is not None:
                print(f"{x['users']:5d} users, a decode cycle of ours (ms, medians of {t['decode_cycles']}): stage "
                      f"{t['stage_ms']:.2f}, prepare {t['prepare_ms']:.2f} (after {t['to_worker_ms']:.2f} to the "
                      f"worker), round trip {t['round_trip_ms']:.2f}, cycle {t['cycle_ms']:.2f}, exposed "
                      f"{t['exposed_ms']:.2f}; limit layer {x['limit_layer_ms']:.2f}"
                      + (f"; per token {t['token_ms']:.1f}, of which the devices' turn {t['hand_off_ms']:.1f}"
                         if t.get("token_ms") is not None and t.get("hand_off_ms") is not None else "")
                      + (f"; event loop CPU {t['loop_cpu_ms']:.2f} a stage" if t.get("loop_cpu_ms") is not None
                         else ""))
    if any("model_tok_s" in x for x in r["results"]):
        print("model (this machine's loopback step + the link model's time per token): " + ", ".join(
            f"{x['users']}: {x['model_tok_s']:.1f} tok/s (measured/model {x['ours_over_model']:.2f})"
            for x in r["results"]))
    s = r.get("summary")
    if s:
        span = f" ({s['ours_over_limit_min']:.2f}-{s['ours_over_limit_max']:.2f} over the runs)" \
            if "ours_over_limit_min" in s else ""
        print(f"at {s['users']} users: ours = {s['ours_over_limit']:.2f} of the limit{span}; ours / paper-style = "
              f"{s['ours_over_paper_style']:.2f}, {100 * s['share_of_ideal_gain']:.0f}% of the ideal gain "
              f"{s['ideal_gain']:.2f} (limit at {s['users']} users / limit at 1)"
              + (f"; the limit is {s['limit_over_hf']:.2f}x transformers' forward" if "limit_over_hf" in s else ""))
