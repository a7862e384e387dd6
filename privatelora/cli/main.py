"""The ``privatelora`` command line: the parser, and every command group registered here.

Method commands (``generate``, ``adapter``) import no Ray. Commands that need the Ray
side import it inside their handler, so ``privatelora generate`` starts fast.
Every bad argument or bad file exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from privatelora.cli import api as api_cli
from privatelora.cli import bench as bench_cli
from privatelora.cli import endpoint as endpoint_cli
from privatelora.cli import tune as tune_cli
from privatelora.cli.cluster import cmd_demo, cmd_serve
from privatelora.cli.common import (Parser, add_draft_args, add_endpoint_bounds, add_kv_cache_bytes, add_prompt_args,
                                    add_split_args, non_negative, positive)
from privatelora.cli.generate import cmd_adapter_info, cmd_adapter_init, cmd_generate, print_generate
from privatelora.config import PLACEMENT_HELP, PrivateLoRAError, UsageError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="privatelora", description="Private, personalized LLM serving with PrivateLoRA: the cloud runs "
                "the shared backbone, each device keeps its tokens and private low-rank weights M.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    g = sub.add_parser("generate", help="generate text through the device/cloud split (in one process)",
                       description="Generate from a prompt. split mode runs the device and cloud parts through the "
                       "PrivateLoRA protocol and reports the bytes that would cross; monolithic runs the same "
                       "model with W + B M A merged (the reference).")
    add_split_args(g)
    add_prompt_args(g)
    g.add_argument("--max-new-tokens", type=positive, default=32)
    g.add_argument("--mode", choices=["split", "monolithic"], default="split")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--stop-ids", help="comma separated stop token ids (EOS is always one unless --no-eos-stop)")
    g.add_argument("--no-eos-stop", action="store_true")
    add_draft_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate, printer=print_generate)


    a = sub.add_parser("adapter", help="create or inspect private adapter files")
    asub = a.add_subparsers(dest="adapter_command", metavar="ACTION", parser_class=Parser)
    ai = asub.add_parser("init", help="write a new adapter (M = 0, or seeded random M for tests and demos)")
    add_split_args(ai, with_adapter=False)
    ai.add_argument("--out", required=True, help="output .safetensors path")
    ai.add_argument("--random-scale", type=float, default=0.0, help="fill M with seeded random values of this scale")
    ai.add_argument("--seed", type=int, default=0, help="seed of the random M")
    ai.add_argument("--json", action="store_true")
    ai.set_defaults(func=cmd_adapter_init)
    af = asub.add_parser("info", help="print an adapter file's metadata")
    af.add_argument("file")
    af.add_argument("--json", action="store_true")
    af.set_defaults(func=cmd_adapter_info)

    endpoint_cli.add_commands(sub, add_split_args, positive)     # `cloud` and `edge`
    bench_cli.add_commands(sub)                                   # `bench ...`
    api_cli.add_commands(sub)                                     # `api`: the device's OpenAI-compatible API
    tune_cli.add_commands(sub, add_split_args, positive)         # `tune` and `bench tuning`

    d = sub.add_parser("demo", help="multi-user demo on the embedded tiny model",
                       description="Several users with different private adapters and prompts share one "
                       "backbone; prints each user's text, throughput, batch size and bytes saved.")
    d.add_argument("--users", type=positive, default=4)
    d.add_argument("--max-new-tokens", type=positive, default=48)
    d.add_argument("--model", default="tiny")
    d.add_argument("--rank", type=positive, default=None)
    d.add_argument("--adapted-layers", metavar="SPEC", default="all", help=PLACEMENT_HELP)
    add_draft_args(d)
    d.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    d.add_argument("--in-process", action="store_true", help="no Ray: device and cloud parts in this process")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo, printer=lambda _res: None)   # the demo prints as it goes

    sv = sub.add_parser("serve", help="serve the shared backbone on a Ray cluster (replicas, router, front door)",
                        description="Joins (--address auto|HOST:PORT) or starts a Ray cluster and runs backbone "
                        "replicas pinned to cloud nodes until Ctrl-C / SIGTERM. Devices connect to one address, "
                        "the front door on --port, which places each new session on the least loaded healthy "
                        "replica (a redirect: the device then talks to that replica directly). A replica that dies "
                        "or stops serving is taken out of the rotation and restarted; its devices resume their "
                        "sessions elsewhere. With --max-replicas above --min-replicas the pool grows and shrinks "
                        "with load.")
    add_split_args(sv, with_adapter=False)
    sv.add_argument("--address", default=None, help="auto, HOST:PORT, or omit to start a local cluster")
    sv.add_argument("--replicas", type=positive, default=None,
                    help="replicas to start with (default: --min-replicas, or 1)")
    sv.add_argument("--min-replicas", type=positive, default=None, help="fewest replicas the autoscaler keeps")
    sv.add_argument("--max-replicas", type=positive, default=None,
                    help="most replicas the autoscaler starts (above --min-replicas: autoscaling on)")
    sv.add_argument("--scale-up-sessions", type=float, default=12.0,
                    help="add a replica when open sessions per replica pass this ...")
    sv.add_argument("--scale-up-queue-ms", type=float, default=250.0,
                    help="... or when stage requests queue longer than this on average")
    sv.add_argument("--scale-down-sessions", type=float, default=4.0,
                    help="remove a replica when the sessions would stay under this per replica without it")
    sv.add_argument("--scale-down-after", type=float, default=20.0, metavar="SECONDS",
                    help="how long load must stay that low before a replica is removed")
    sv.add_argument("--drain-grace", type=float, default=10.0, metavar="SECONDS",
                    help="a removed replica's sessions get this long to finish before they resume elsewhere")
    sv.add_argument("--host", default=None,
                    help="front door address (default: loopback on a one-machine cluster, else the node's IP)")
    sv.add_argument("--port", type=positive, default=7431, help="the front door's TCP port (0: any free port)")
    sv.add_argument("--replica-port", type=positive, default=0,
                    help="replica i listens on PORT+i (default 0: any free port; devices learn it from the door)")
    sv.add_argument("--door-cert-out", metavar="FILE",
                    help="off loopback the front door speaks TLS with a fresh certificate: write it here for "
                    "devices (--tls-ca FILE)")
    sv.add_argument("--max-sessions", type=positive, default=256, help="sessions holding KV caches per replica")
    sv.add_argument("--idle-timeout", type=float, default=120.0, help="seconds of silence before a session is reclaimed")
    sv.add_argument("--gather-ms", type=float, default=10.0,
                    help="most a stage waits for sessions that owe it a reply (batching vs latency)")
    add_endpoint_bounds(sv)
    sv.add_argument("--gpus-per-replica", type=non_negative, default=0, metavar="G",
                    help="GPUs each replica asks Ray for (fractions allowed); with G > 0 it runs its layers on the "
                    "GPU (default 0: no GPU requested; a replica still uses CUDA where the node has it)")
    add_kv_cache_bytes(sv)
    sv.add_argument("--metrics-port", type=positive, default=9431,     # privatelora.serving.metrics.DEFAULT_PORT
                    help="replica i serves Prometheus /metrics on PORT+i, on its endpoint's host (default 9431; "
                    "0: any free port); replicas also export through Ray's metrics agent (docs/metrics.md)")
    sv.add_argument("--no-metrics", action="store_true",
                    help="no /metrics and no export through Ray's metrics agent (nor Ray's dashboard on a local "
                    "cluster)")
    sv.add_argument("--metrics-sd-file", help="write a Prometheus file_sd targets JSON file listing every replica")
    sv.add_argument("--json", action="store_true")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        res = args.func(args)
    except (UsageError, PrivateLoRAError, OSError) as e:
        sys.stderr.write(f"privatelora: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    if res is None:
        return 0
    if args.json:
        print(json.dumps(res))
    elif getattr(args, "printer", None):
        args.printer(res)
    else:
        print(json.dumps(res, indent=2))
    return 0
