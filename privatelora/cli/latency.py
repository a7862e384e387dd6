"""The ``bench latency`` command's arguments (the measurement: ``privatelora/bench/latency.py``)."""

from __future__ import annotations

from privatelora.config import UsageError


def add_command(bsub) -> None:
    la = bsub.add_parser(
        "latency", help="one user's tokens/s and inter-token latency with fewer round trips per token: adapter "
                        "placements and speculative decoding drafted on the device, vs device-only",
        description="In one run, on one backbone over an emulated link: one user (and --users N) decoding with all "
                    "layers adapted, then with fewer adapted layers, each without and with each draft. Prints "
                    "tokens/s, round trips per token, the drafts' acceptance rate and the time per output token "
                    "(p50/p99), next to the whole model decoding on the device's core with no network.")
    la.add_argument("--geometry", choices=["tiny", "bench"], default="tiny",
                    help="tiny: the shipped model (default); bench: 7B proportions, CPU-sized, 16 layers")
    la.add_argument("--link", default="5g", help="loopback, lan, wifi, 5g (default), 4g")
    la.add_argument("--users", type=int, default=1, help="also measure N concurrent users (default: one only)")
    la.add_argument("--placements", help="comma-separated specs separated by ';', e.g. 'all;last:2;last:1' "
                                         "(default: all, then fewer adapted layers)")
    la.add_argument("--drafts", help="comma-separated drafts to try (default: ngram, and tiny on the tiny geometry); "
                                     "'none' for no drafts")
    la.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per verify chain (default 4)")
    la.add_argument("--new-tokens", type=int, default=48, help="tokens each user generates (default 48)")
    la.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    la.add_argument("--repeats", type=int, default=3, help="runs per configuration; medians are reported (default 3)")
    la.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    la.add_argument("--json", action="store_true", help="print one JSON object (progress stays on stderr)")

    def run_latency(args):
        from privatelora.bench.latency import run
        from privatelora.config import PrivateLoRAError
        from privatelora.transport.link import get_profile
        try:
            get_profile(args.link)
        except ValueError as e:
            raise UsageError(str(e))
        for name in ("users", "draft_tokens", "new_tokens", "prompt_tokens", "repeats"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if args.new_tokens < 2:
            raise UsageError("--new-tokens must be at least 2 (the first token is the prefill's)")
        if args.temperature < 0:
            raise UsageError("--temperature must be >= 0")
        placements = [p.strip() for p in args.placements.split(";") if p.strip()] if args.placements else None
        drafts = None
        if args.drafts:
            drafts = [] if args.drafts.strip() == "none" else [d.strip() for d in args.drafts.split(",") if d.strip()]
        try:
            return run(args.geometry, args.link, users=args.users, new_tokens=args.new_tokens,
                       prompt_tokens=args.prompt_tokens, placements=placements, drafts=drafts,
                       draft_tokens=args.draft_tokens, repeats=args.repeats, temperature=args.temperature,
                       quiet=args.json)
        except PrivateLoRAError as e:
            raise UsageError(str(e))

    def printer(r):
        from privatelora.bench.latency import print_latency
        print_latency(r)
    la.set_defaults(func=run_latency, printer=printer)
