"""The ``privatelora`` command line.

Method commands (``generate``, ``adapter``) import no Ray. Commands that need the Ray
side import it inside their handler, so ``privatelora generate`` starts fast.
Every bad argument or bad file exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + error otherwise)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


from .config import UsageError  # noqa: E402  (re-exported for the command modules)


def _positive(v: str) -> int:
    try:
        i = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}")
    if i < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v!r}")
    return i


def _add_split_args(p, with_adapter=True):
    p.add_argument("--model", default="tiny", help="local HF checkpoint directory, 'tiny' (default) or tiny-llama|tiny-mistral|tiny-qwen2")
    if with_adapter:
        p.add_argument("--adapter", help="private adapter file (.safetensors); its rank/targets/shared-A/seed win")
    p.add_argument("--rank", type=_positive, help="rank r of A, M, B (default 16; taken from --adapter if given)")
    p.add_argument("--targets", help="adapted projections, comma separated subset of q,k,v (default q,k,v)")
    p.add_argument("--shared-a", action="store_true", default=None, help="one A per layer shared by q, k, v")
    p.add_argument("--device-head-layers", type=_positive, default=0, help="first K decoder layers run on the device")
    p.add_argument("--device-tail-layers", type=_positive, default=0, help="last K decoder layers run on the device")
    p.add_argument("--projection-seed", type=_positive, default=None, help="public seed of A and B (default 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")


def _split_config(args):
    from .adapters import config_from_adapter
    from .config import PrivateLoRAConfig
    kw = dict(device_head_layers=args.device_head_layers, device_tail_layers=args.device_tail_layers, dtype=args.dtype)
    if getattr(args, "adapter", None):
        cfg = config_from_adapter(args.adapter, PrivateLoRAConfig(**kw))
        for name, have in (("rank", cfg.rank), ("shared_a", cfg.shared_a), ("projection_seed", cfg.seed)):
            given = getattr(args, name)
            if given is not None and given != have:
                raise UsageError(f"--{name.replace('_', '-')} {given} conflicts with the adapter file ({have})")
        if args.targets and tuple(sorted(args.targets.split(","))) != tuple(sorted(cfg.targets)):
            raise UsageError(f"--targets {args.targets} conflicts with the adapter file ({','.join(cfg.targets)})")
        return cfg
    if args.rank is not None:
        kw["rank"] = args.rank
    if args.targets:
        kw["targets"] = tuple(t.strip() for t in args.targets.split(","))
    if args.shared_a:
        kw["shared_a"] = True
    if args.projection_seed is not None:
        kw["seed"] = args.projection_seed
    return PrivateLoRAConfig(**kw)


def _prompt_ids(backbone, args) -> list[int]:
    if args.prompt_ids:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError("--prompt-ids must be comma separated integers")
    else:
        if backbone.tokenizer is None:
            raise UsageError("this checkpoint has no tokenizer: give --prompt-ids")
        ids = backbone.tokenizer.encode(args.prompt, add_special_tokens=False)
        if getattr(backbone.tokenizer, "bos_token_id", None) is not None and not args.no_bos:
            ids = [backbone.tokenizer.bos_token_id] + ids
    if not ids:
        raise UsageError("the prompt is empty")
    vocab = backbone.model.config.vocab_size
    if any(i < 0 or i >= vocab for i in ids):
        raise UsageError(f"prompt token ids must be in [0, {vocab})")
    limit = backbone.model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        raise UsageError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's {limit} positions")
    return ids


def _decode(backbone, ids) -> str | None:
    return None if backbone.tokenizer is None else backbone.tokenizer.decode(ids, skip_special_tokens=True)


def cmd_generate(args) -> dict:
    from . import reference
    from .accounting import naive_numbers_per_token_per_layer
    from .api import build_split
    from .generation import Generation, SamplingParams
    from .runner import InProcessRunner

    if args.prompt is None and args.prompt_ids is None:
        raise UsageError("give --prompt TEXT or --prompt-ids IDS")
    cfg = _split_config(args)
    split = build_split(args.model, cfg, args.adapter)
    bb = split.backbone
    ids = _prompt_ids(bb, args)
    stop = tuple(int(s) for s in args.stop_ids.split(",")) if args.stop_ids else ()
    if not args.no_eos_stop and bb.tokenizer is not None and bb.tokenizer.eos_token_id is not None:
        stop = stop + (bb.tokenizer.eos_token_id,)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, stop_ids=stop)
    t0 = time.perf_counter()
    result = {"model": bb.name, "mode": args.mode, "config": split.cfg.to_dict(), "prompt_tokens": len(ids)}
    if args.mode == "monolithic":
        model = reference.merged_model(bb, split.adapter)
        tokens, _ = reference.generate(model, ids, params)
        finish = "stop" if tokens and tokens[-1] in stop else "length"
    else:
        g = Generation(split.device.session(1), ids, params)
        InProcessRunner(split.cloud).run([g])
        tokens, finish = g.tokens, g.finish_reason
        comm = g.device.comm.to_dict()
        naive = naive_numbers_per_token_per_layer(bb.config, split.cfg.targets) * comm["bytes_per_number"]
        per = comm["per_token_per_layer"]["total"]
        result["bytes"] = {"to_cloud": comm["to_cloud"], "to_device": comm["to_device"],
                           "per_token_per_layer": comm["per_token_per_layer"],
                           "naive_per_token_per_layer": naive,
                           "reduction": 1 - per / naive, "handoff": comm["handoff"]}
    dt = time.perf_counter() - t0
    result.update(tokens=tokens, text=_decode(bb, tokens), finish_reason=finish, seconds=dt,
                  tokens_per_s=len(tokens) / dt if dt else 0.0)
    return result


def print_generate(res):
    print(res["text"] if res["text"] is not None else " ".join(map(str, res["tokens"])))
    extra = f"[{res['mode']}] {len(res['tokens'])} tokens in {res['seconds']:.2f}s ({res['tokens_per_s']:.1f} tok/s)"
    if "bytes" in res:
        b = res["bytes"]
        extra += (f"; {b['per_token_per_layer']['total']:.0f} B/token/layer vs naive split "
                  f"{b['naive_per_token_per_layer']} B ({100 * b['reduction']:.1f}% less)")
    print(extra, file=sys.stderr)


def cmd_adapter_init(args) -> dict:
    from .adapters import PrivateAdapter, save_adapter
    from .models import load_backbone
    cfg = _split_config(args)
    bb = load_backbone(args.model, dtype=cfg.torch_dtype)
    ad = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint)
    if args.random_scale:
        ad.randomize_(args.seed, scale=args.random_scale)
    save_adapter(ad, args.out)
    return {"out": args.out, "parameters": ad.num_parameters(), **ad.metadata()}


def cmd_adapter_info(args) -> dict:
    from .adapters import read_adapter_metadata
    return read_adapter_metadata(args.file)


@contextlib.contextmanager
def stdout_kept_for_json():
    """While Ray runs, send file descriptor 1 to stderr: Ray's own warnings (e.g. about
    worker start-up) may be printed on stdout, which ``--json`` keeps for one object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_demo(args) -> dict:
    if args.in_process:
        from .demo import run_inprocess_demo
        return run_inprocess_demo(users=args.users, max_new_tokens=args.max_new_tokens, model=args.model,
                                  rank=args.rank or 16, quiet=args.json)
    from .actors.commands import demo
    # the report is printed as the demo runs: only --json needs stdout kept clean
    with stdout_kept_for_json() if args.json else contextlib.nullcontext():
        return demo(users=args.users, max_new_tokens=args.max_new_tokens, model=args.model, rank=args.rank or 16,
                    address=args.address, quiet=args.json)


def cmd_serve(args) -> dict:
    from .actors.commands import serve
    return serve(args, _split_config(args))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="privatelora", description="Private, personalized LLM serving with PrivateLoRA: the cloud runs "
                "the shared backbone, each device keeps its tokens and private low-rank weights M.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text through the device/cloud split (in one process)",
                       description="Generate from a prompt. split mode runs the device and cloud parts through the "
                       "PrivateLoRA protocol and reports the bytes that would cross; monolithic runs the same "
                       "model with W + B M A merged (the reference).")
    _add_split_args(g)
    g.add_argument("--prompt", help="prompt text (tokenized on the device)")
    g.add_argument("--prompt-ids", help="prompt as comma separated token ids instead of text")
    g.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's BOS token")
    g.add_argument("--max-new-tokens", type=_positive, default=32)
    g.add_argument("--mode", choices=["split", "monolithic"], default="split")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--stop-ids", help="comma separated stop token ids (EOS is always one unless --no-eos-stop)")
    g.add_argument("--no-eos-stop", action="store_true")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate, printer=print_generate)


    a = sub.add_parser("adapter", help="create or inspect private adapter files")
    asub = a.add_subparsers(dest="adapter_command", metavar="ACTION", parser_class=_Parser)
    ai = asub.add_parser("init", help="write a new adapter (M = 0, or seeded random M for tests and demos)")
    _add_split_args(ai, with_adapter=False)
    ai.add_argument("--out", required=True, help="output .safetensors path")
    ai.add_argument("--random-scale", type=float, default=0.0, help="fill M with seeded random values of this scale")
    ai.add_argument("--seed", type=int, default=0, help="seed of the random M")
    ai.add_argument("--json", action="store_true")
    ai.set_defaults(func=cmd_adapter_init)
    af = asub.add_parser("info", help="print an adapter file's metadata")
    af.add_argument("file")
    af.add_argument("--json", action="store_true")
    af.set_defaults(func=cmd_adapter_info)

    from .endpoint_cli import add_commands
    add_commands(sub, _add_split_args, _positive)
    from .bench import add_commands as add_bench
    add_bench(sub)
    from .tuning import add_commands as add_tuning   # `tune` and `bench tuning`
    add_tuning(sub, _add_split_args, _positive)

    d = sub.add_parser("demo", help="multi-user demo on the embedded tiny model",
                       description="Several users with different private adapters and prompts share one "
                       "backbone; prints each user's text, throughput, batch size and bytes saved.")
    d.add_argument("--users", type=_positive, default=4)
    d.add_argument("--max-new-tokens", type=_positive, default=48)
    d.add_argument("--model", default="tiny")
    d.add_argument("--rank", type=_positive, default=None)
    d.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    d.add_argument("--in-process", action="store_true", help="no Ray: device and cloud parts in this process")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo, printer=lambda _res: None)   # the demo prints as it goes

    sv = sub.add_parser("serve", help="serve the shared backbone on a Ray cluster (pool of replicas + router)",
                        description="Joins (--address auto|HOST:PORT) or starts a Ray cluster, runs N backbone "
                        "replicas pinned to cloud nodes, each with its TCP endpoint, until Ctrl-C / SIGTERM.")
    _add_split_args(sv, with_adapter=False)
    sv.add_argument("--address", default=None, help="auto, HOST:PORT, or omit to start a local cluster")
    sv.add_argument("--replicas", type=_positive, default=1)
    sv.add_argument("--port", type=_positive, default=7431, help="first replica's port (replica i: PORT+i; 0: any)")
    sv.add_argument("--max-sessions", type=_positive, default=256, help="sessions holding KV caches per replica")
    sv.add_argument("--idle-timeout", type=float, default=120.0, help="seconds of silence before a session is reclaimed")
    sv.add_argument("--gather-ms", type=float, default=10.0,
                    help="most a stage waits for sessions that owe it a reply (batching vs latency)")
    sv.add_argument("--metrics-port", type=_positive, default=0,
                    help="replica i serves Prometheus /metrics on PORT+i, on its endpoint's host (0: off)")
    sv.add_argument("--metrics-sd-file", help="write a Prometheus file_sd targets JSON file listing every replica")
    sv.add_argument("--json", action="store_true")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv=None) -> int:
    from .config import PrivateLoRAError
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


if __name__ == "__main__":
    sys.exit(main())
