"""The method commands: ``generate`` (split or monolithic, in one process) and
``adapter init`` / ``adapter info``. They import no Ray.
"""

from __future__ import annotations

import sys
import time

from privatelora.cli.common import decode, draft_from_args, prompt_ids, split_config
from privatelora.config import UsageError


def cmd_generate(args) -> dict:
    from privatelora.api import build_split
    from privatelora.model import reference
    from privatelora.model.sampling import SamplingParams
    from privatelora.runtime.accounting import naive_numbers_per_token_per_layer
    from privatelora.runtime.generation import Generation
    from privatelora.runtime.runner import InProcessRunner

    if args.prompt is None and args.prompt_ids is None:
        raise UsageError("give --prompt TEXT or --prompt-ids IDS")     # before loading any model
    cfg = split_config(args)
    split = build_split(args.model, cfg, args.adapter)
    bb = split.backbone
    ids = prompt_ids(bb, args)
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
        g = Generation(split.device.session(1), ids, params, draft=draft_from_args(args, bb),
                       draft_tokens=args.draft_tokens)
        InProcessRunner(split.cloud).run([g])
        tokens, finish = g.tokens, g.finish_reason
        result.update(g.stats())          # round_trips (hand-offs included), and the draft's counts
        comm = g.device.comm.to_dict()
        naive = naive_numbers_per_token_per_layer(bb.config, split.cfg.targets) * comm["bytes_per_number"]
        per = comm["per_token_per_layer"]["total"]
        result["bytes"] = {"to_cloud": comm["to_cloud"], "to_device": comm["to_device"],
                           "per_token_per_layer": comm["per_token_per_layer"],
                           "naive_per_token_per_layer": naive,
                           "reduction": 1 - per / naive, "handoff": comm["handoff"]}
    dt = time.perf_counter() - t0
    result.update(tokens=tokens, text=decode(bb, tokens), finish_reason=finish, seconds=dt,
                  tokens_per_s=len(tokens) / dt if dt else 0.0)
    return result


def print_generate(res):
    print(res["text"] if res["text"] is not None else " ".join(map(str, res["tokens"])))
    extra = f"[{res['mode']}] {len(res['tokens'])} tokens in {res['seconds']:.2f}s ({res['tokens_per_s']:.1f} tok/s)"
    if "round_trips" in res:
        extra += f"; {res['round_trips']} round trips"
        if res.get("draft"):
            d = res["draft"]
            extra += f", draft {d['name']}: {d['accepted']}/{d['proposed']} drafted tokens accepted"
    if "bytes" in res:
        b = res["bytes"]
        extra += (f"; {b['per_token_per_layer']['total']:.0f} B/token/layer vs naive split "
                  f"{b['naive_per_token_per_layer']} B ({100 * b['reduction']:.1f}% less)")
    print(extra, file=sys.stderr)


def cmd_adapter_init(args) -> dict:
    from privatelora.model.adapters import PrivateAdapter, save_adapter
    from privatelora.model.loading import load_backbone
    cfg = split_config(args)
    bb = load_backbone(args.model, dtype=cfg.torch_dtype)
    ad = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint)
    if args.random_scale:
        ad.randomize_(args.seed, scale=args.random_scale)
    save_adapter(ad, args.out)
    return {"out": args.out, "parameters": ad.num_parameters(), **ad.metadata()}


def cmd_adapter_info(args) -> dict:
    from privatelora.model.adapters import read_adapter_metadata
    return read_adapter_metadata(args.file)
