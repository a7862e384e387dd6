"""The ``tune`` command (train a user's M through the split, in process or against a
``privatelora cloud`` endpoint) and the ``bench tuning`` command's arguments.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path

import torch

from privatelora.bench.tuning import DEFAULTS, METHODS, USERS, bench_tuning, default_lr, print_tuning
from privatelora.config import PLACEMENT_HELP, PrivateLoRAConfig, PrivateLoRAError, UsageError
from privatelora.training.baselines import PrivateLoRAMethod
from privatelora.training.data import BUNDLED, load_corpus
from privatelora.training.loop import TrainSettings, evaluate, progress_bar, train_async


def _check_settings(args, max_positions: int) -> None:
    if args.seq < 2 or args.seq > max_positions:
        raise UsageError(f"--seq must be in [2, {max_positions}]")
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError("--lr must be a positive number")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if args.epochs is not None and not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise UsageError("--epochs must be a positive number")
    if not 0 < args.heldout < 0.5:
        raise UsageError("--heldout must be a fraction in (0, 0.5)")


def cmd_tune(args) -> dict:
    """Tune M. In process, device and cloud share this process and one full backbone; with
    ``--connect`` the cloud is a ``privatelora cloud`` holding only its decoder layers."""
    from privatelora.cli.common import split_config
    from privatelora.model.adapters import save_adapter
    from privatelora.model.loading import load_backbone
    from privatelora.runtime.device import DevicePart

    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {args.out!r}: directory {str(out.parent)!r} does not exist")
    cfg = split_config(args)
    if cfg.torch_dtype != torch.float32:
        raise UsageError("tuning runs in float32 (--dtype float32)")
    bb = load_backbone(args.model, dtype=cfg.torch_dtype)
    _check_settings(args, bb.config.max_position_embeddings)
    corpus = load_corpus(args.data, bb.tokenizer, val_frac=args.heldout, test_frac=0.0, seq=args.seq)
    per_step = args.batch * args.seq
    steps = args.steps if args.steps is not None else \
        max(1, math.ceil(args.epochs * len(corpus.train) / per_step)) if args.epochs is not None else DEFAULTS["steps"]
    lr = args.lr if args.lr is not None else default_lr(
        "privatelora_random" if cfg.projection == "random" else "privatelora_shared_a" if cfg.shared_a else "privatelora")
    s = TrainSettings(steps=steps, batch=args.batch, seq=args.seq, lr=lr, warmup=min(args.warmup, steps),
                      schedule=args.schedule, eval_every=args.eval_every, eval_tokens=args.eval_tokens, seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    prog = None if args.json else progress_bar(f"[tune] {corpus.name}")

    async def tune(method) -> dict:
        before = await evaluate(method, corpus.val, s.seq, s.eval_tokens)
        if not args.json:
            print(f"[tune] {corpus.name}: {len(corpus.train)} train / {len(corpus.val)} held-out tokens, "
                  f"{method.num_params} trainable parameters, held-out loss {before:.3f} before", file=sys.stderr)
        res = await train_async(method, corpus, s, progress=prog)
        res["heldout_loss_before"] = before
        return res

    t0 = time.perf_counter()
    part = DevicePart(bb, cfg)
    if args.connect:
        res, wire_stats = asyncio.run(_tune_remote(args, part, cfg, tune))
    else:
        from privatelora.runtime.cloud import CloudPart
        from privatelora.training.cloud import CloudTrainer
        res = asyncio.run(tune(PrivateLoRAMethod(part, trainer=CloudTrainer(CloudPart(bb, cfg)))))
        wire_stats = None
    for M in part.adapter.parameters():
        M.requires_grad_(False)
    save_adapter(part.adapter, out)
    final = res["history"][-1]["heldout_loss"]
    result = {"out": str(out), "data": corpus.name, "model": bb.name, "config": cfg.to_dict(),
              "parameters": part.adapter.num_parameters(), "steps": s.steps, "lr": s.lr, "batch": s.batch,
              "seq": s.seq, "tokens": corpus.sizes(), "heldout_loss_before": res["heldout_loss_before"],
              "heldout_loss": final, "heldout_ppl_before": math.exp(res["heldout_loss_before"]),
              "heldout_ppl": math.exp(final), "history": res["history"], "seconds": time.perf_counter() - t0,
              "remote": bool(args.connect)}
    if wire_stats is not None:
        result["wire"] = wire_stats
    return result


async def _tune_remote(args, part, cfg, tune):
    from privatelora.cli.endpoint import network_error, parse_address
    from privatelora.serving.remote import AddressConnector
    from privatelora.training.cloud import TrainingError
    from privatelora.transport import RemoteError, TLSRequiredError
    from privatelora.wire import session_geometry

    host, port = parse_address(args.connect)
    # a cloud endpoint, or the front door of a serve (the session opens where it redirects)
    conn = AddressConnector(host, port, ca=args.tls_ca, server_hostname=args.tls_server_name, timeout=args.timeout)
    try:
        geometry = session_geometry(part.exchange_ids, part.model_config.hidden_size, cfg, "fp32",
                                    max_tokens=max(2048, args.batch * args.seq))
        sess = await conn.open(geometry)
        try:
            res = await tune(PrivateLoRAMethod(part, session=sess))
        finally:
            if not sess.client.closed:
                await sess.close()
    except TLSRequiredError as e:
        raise UsageError(str(e))
    except RemoteError as e:
        raise UsageError(f"the cloud refused the session: {e}")
    except TrainingError as e:
        raise UsageError(f"the cloud refused a training step: {e}")
    except OSError as e:              # ConnectionError and TimeoutError included
        raise network_error(host, port, e)
    finally:
        stats = conn.stats().as_dict()
        await conn.close()
    return res, stats


def print_tune(res) -> None:
    print(f"{res['out']}: {res['parameters']} parameters, {res['steps']} steps on {res['data']}; held-out "
          f"perplexity {res['heldout_ppl_before']:.2f} -> {res['heldout_ppl']:.2f} ({res['seconds']:.0f}s"
          f"{', over TCP' if res['remote'] else ''})")


def _bench_subparsers(sub):
    import argparse
    bench = sub.choices.get("bench")
    if bench is None:
        return None
    for action in bench._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def add_commands(sub, add_split_args, positive) -> None:
    t = sub.add_parser("tune", help="train a private adapter (M only) on your text through the split",
                       description="Trains the private M of every adapted projection on a text file: the device "
                       "keeps text, labels, M and the loss; the cloud (in process, or --connect HOST:PORT) runs "
                       "its layers forward and backward on activations and gradients only. Writes an adapter "
                       "file that generate, edge and demo accept.")
    add_split_args(t, with_adapter=False)
    t.set_defaults(rank=DEFAULTS["rank"])
    t.add_argument("--data", required=True, help=f"UTF-8 text file (.txt or .gz), or one of {', '.join(BUNDLED)}")
    t.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    t.add_argument("--connect", help="HOST:PORT of a running `privatelora cloud` (default: in process)")
    n = t.add_mutually_exclusive_group()
    n.add_argument("--steps", type=positive, help=f"optimizer steps (default {DEFAULTS['steps']})")
    n.add_argument("--epochs", type=float, help="passes over the training tokens instead of --steps")
    t.add_argument("--lr", type=float, help="learning rate of M (default: the bench's best, "
                   f"{default_lr('privatelora'):g})")
    t.add_argument("--batch", type=positive, default=DEFAULTS["batch"], help="sequences per step")
    t.add_argument("--seq", type=positive, default=DEFAULTS["seq"], help="tokens per sequence")
    t.add_argument("--warmup", type=positive, default=DEFAULTS["warmup"], help="linear warmup steps")
    t.add_argument("--schedule", choices=["constant", "cosine"], default=DEFAULTS["schedule"])
    t.add_argument("--heldout", type=float, default=0.1, help="fraction of the text held out (its end)")
    t.add_argument("--eval-every", type=positive, default=25, help="held-out loss every N steps (0: at the end)")
    t.add_argument("--eval-tokens", type=positive, default=4096, help="held-out tokens per evaluation")
    t.add_argument("--seed", type=int, default=0, help="seed of the batch sampler")
    t.add_argument("--threads", type=positive, default=1, help="torch threads (0: torch's default)")
    t.add_argument("--tls-ca", help="PEM CA (or self-signed certificate) to trust; required off loopback")
    t.add_argument("--tls-server-name", help="expected certificate host name, if not the --connect host")
    t.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for any answer")
    t.add_argument("--json", action="store_true", help="one JSON object on stdout, no progress")
    t.set_defaults(func=cmd_tune, printer=print_tune)

    bsub = _bench_subparsers(sub)
    if bsub is None:
        return
    b = bsub.add_parser("tuning", help="held-out perplexity over seeds: untuned, LoRA (peft), PrivateLoRA (svd "
                        "projections with separate / shared A, random projections), full")
    b.add_argument("--model", default="tiny")
    b.add_argument("--users", default=",".join(USERS), help="comma separated data names or files")
    b.add_argument("--methods", default=",".join(METHODS))
    b.add_argument("--rank", type=positive, default=DEFAULTS["rank"], help="rank of PrivateLoRA's M")
    b.add_argument("--targets", default="q,k,v", help="projections carrying M and LoRA")
    b.add_argument("--adapted-layers", metavar="SPEC", default="all",
                   help="layers carrying M and LoRA in the main rows (" + PLACEMENT_HELP + ")")
    b.add_argument("--placements", default="",
                   help="extra PrivateLoRA rows with fewer adapted layers, as SPEC@RANK separated by ';' "
                        "(e.g. 'last:1@48;last:2@33': the same parameter budget as all 4 layers at rank 24)")
    b.add_argument("--steps", type=positive, default=DEFAULTS["steps"])
    b.add_argument("--batch", type=positive, default=DEFAULTS["batch"])
    b.add_argument("--seq", type=positive, default=DEFAULTS["seq"])
    b.add_argument("--schedule", choices=["constant", "cosine"], default=DEFAULTS["schedule"])
    for m in METHODS[1:]:
        b.add_argument(f"--lr-{m.replace('_', '-')}", type=float, default=None,
                       help=f"learning rate of {m} (default {default_lr(m):g}; see docs/tuning.md)")
    b.add_argument("--split", choices=["test", "val"], default="test", help="evaluate on test (default) or validation")
    b.add_argument("--eval-tokens", type=positive, default=8192)
    b.add_argument("--seed", type=int, default=0, help="first training seed")
    b.add_argument("--seeds", type=positive, default=DEFAULTS["seeds"],
                   help=f"training seeds per cell (default {DEFAULTS['seeds']}): mean and spread")
    b.add_argument("--json", action="store_true")

    def run(args):
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise UsageError(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
        lrs = {m: getattr(args, f"lr_{m}") for m in METHODS[1:] if getattr(args, f"lr_{m}") is not None}
        if any(not v > 0 for v in lrs.values()):
            raise UsageError("learning rates must be positive")
        users = tuple(u.strip() for u in args.users.split(",") if u.strip())
        if not users:
            raise UsageError("--users names no data")
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        try:
            PrivateLoRAConfig(targets=targets, adapted_layers=args.adapted_layers)
        except PrivateLoRAError as e:
            raise UsageError(str(e))
        if args.seeds < 1:
            raise UsageError("--seeds must be at least 1")
        placements = []
        for item in (p.strip() for p in args.placements.split(";") if p.strip()):
            spec, sep, r = item.rpartition("@")
            if not sep or not r.isdigit() or int(r) < 1:
                raise UsageError(f"--placements: {item!r} is not SPEC@RANK (e.g. last:1@48)")
            try:
                PrivateLoRAConfig(adapted_layers=spec)
            except PrivateLoRAError as e:
                raise UsageError(f"--placements: {e}")
            placements.append((spec, int(r)))
        return bench_tuning(args.model, users, methods, args.rank, targets, lrs, args.steps, args.batch, args.seq,
                            args.schedule, args.split, args.eval_tokens, args.seed, quiet=args.json,
                            placements=placements, seeds=args.seeds, adapted_layers=args.adapted_layers)
    b.set_defaults(func=run, printer=print_tuning)
