"""``bench tuning``: held-out perplexity of every method for several users over several
training seeds (mean and spread), and the fraction of LoRA's gain each PrivateLoRA row
recovers, on log-perplexity.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch

from privatelora.config import PrivateLoRAConfig
from privatelora.training.baselines import FullFineTune, PrivateLoRAMethod, Untuned
from privatelora.training.data import load_corpus
from privatelora.training.loop import TrainSettings, evaluate, progress_bar, train

METHODS = ("untuned", "lora", "privatelora", "privatelora_shared_a", "privatelora_random", "full")
# Chosen on the validation split (docs/tuning.md says what was tried). A learning rate is
# one number, or per bundled user ("*": any other text) where the best differed by user.
# privatelora / privatelora_shared_a use the default (svd) projections, privatelora_random
# the random Gaussians with separate A (the scheme before svd).
DEFAULTS = {"rank": 24, "steps": 150, "batch": 8, "seq": 128, "schedule": "constant", "warmup": 10, "seeds": 3,
            "lr": {"lora": {"sonnets": 1e-3, "paradise_lost": 3e-3, "*": 1e-3}, "full": 1e-4,
                   "privatelora": 1e-2, "privatelora_shared_a": 1e-2, "privatelora_random": 1e-2}}
LORA_RANK, LORA_ALPHA = 16, 32


def default_lr(method: str, user: str = "*") -> float:
    lr = DEFAULTS["lr"][method]
    return lr.get(user, lr["*"]) if isinstance(lr, dict) else lr


def _method(name: str, bb, rank: int, targets, seed: int, adapted_layers: str = "all"):
    from privatelora.api import build_split
    from privatelora.training.baselines import PeftLoRA
    from privatelora.training.cloud import CloudTrainer
    if name == "untuned":
        return Untuned(bb)
    if name == "lora":     # the same targets and layers as the PrivateLoRA rows
        layers = PrivateLoRAConfig(adapted_layers=adapted_layers).adapted(bb.n_layers)
        return PeftLoRA(bb, rank=LORA_RANK, alpha=LORA_ALPHA, targets=targets, seed=seed,
                        layers=None if adapted_layers == "all" else layers)
    if name == "full":
        return FullFineTune(bb)
    cfg = PrivateLoRAConfig(rank=rank, targets=tuple(targets), shared_a=name.endswith("shared_a"),
                            adapted_layers=adapted_layers, projection="random" if "random" in name else "svd")
    split = build_split(cfg=cfg, backbone=bb)
    return PrivateLoRAMethod(split.device, trainer=CloudTrainer(split.cloud), name=name)


def _spread(xs) -> float:
    """Sample standard deviation (0 for one value)."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _gain(untuned: float, loss: float, lora: float):
    denom = untuned - lora
    return (untuned - loss) / denom if denom > 0 else None


# Sonnets and Paradise Lost chose the settings (on their validation parts); Areopagitica (Milton's
# prose) chose nothing: it shows how the defaults carry to a user they were not tuned on.
USERS = ("sonnets", "paradise_lost", "areopagitica")


def bench_tuning(model: str = "tiny", users=USERS, methods=METHODS,
                 rank: int | None = None, targets=("q", "k", "v"), lrs: dict | None = None,
                 steps: int | None = None, batch: int | None = None, seq: int | None = None,
                 schedule: str | None = None, split: str = "test", eval_tokens: int | None = 8192,
                 seed: int = 0, quiet: bool = False, backbone=None, placements=(), seeds: int | None = None,
                 adapted_layers: str = "all") -> dict:
    """Held-out perplexity of each method for each user, same data and budget for all, over
    ``seeds`` training seeds (``seed``, ``seed + 1``, ...: the batch order, and LoRA's init).

    Per row: ``loss`` is the mean over seeds (``losses``: each seed's) and ``ppl`` its exp;
    ``gain_recovered`` is computed from the mean losses, ``gain_recovered_std`` is the spread
    of the per-seed gains (each seed's row against the LoRA run of the same seed). LoRA and
    the PrivateLoRA rows use ``targets`` and ``adapted_layers``. ``placements``: extra
    PrivateLoRA rows ``(adapted_layers, rank)`` (e.g. ``("last:1", 48)``), each reported
    with its round trips per token and the share of the main PrivateLoRA row's gain it keeps."""
    from privatelora.model.loading import load_backbone
    torch.set_num_threads(1)   # device and cloud share this process; see bench.one_thread
    t_all = time.perf_counter()
    rank = rank or DEFAULTS["rank"]
    lrs = lrs or {}
    seeds = seeds or DEFAULTS["seeds"]
    seed_list = list(range(seed, seed + seeds))
    bb = backbone or load_backbone(model)
    base = TrainSettings(steps=steps or DEFAULTS["steps"], batch=batch or DEFAULTS["batch"],
                         seq=seq or DEFAULTS["seq"], schedule=schedule or DEFAULTS["schedule"],
                         warmup=DEFAULTS["warmup"], eval_every=0, eval_tokens=eval_tokens, seed=seed)
    runs = [(name, name, rank, adapted_layers) for name in methods] + \
        [(f"privatelora@{spec}/r{r}", "privatelora", r, spec) for spec, r in placements]
    out = {"model": bb.name, "fingerprint": bb.fingerprint, "split": split, "rank": rank, "targets": list(targets),
           "adapted_layers": adapted_layers, "seeds": seed_list, "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA},
           "settings": {k: v for k, v in asdict(base).items() if k not in ("lr", "eval_every", "seed")},
           "users": []}
    for user in users:
        corpus = load_corpus(user, bb.tokenizer, seq=base.seq)
        lr = {m: lrs.get(m) or default_lr(m, corpus.name) for m in METHODS[1:]}
        target = corpus.test if split == "test" else corpus.val
        rows = []
        for name, kind, r, spec in runs:
            t0 = time.perf_counter()
            losses, params = [], 0
            for s in seed_list[:1] if kind == "untuned" else seed_list:   # untuned: nothing random
                m = _method(kind, bb, r, targets, s, spec)
                if kind != "untuned":
                    prog = None if quiet else progress_bar(f"[bench tuning] {user} {name} seed {s}")
                    train(m, corpus, replace(base, lr=lr[kind], seed=s), heldout=target, progress=prog)
                losses.append(asyncio.run(evaluate(m, target, base.seq, eval_tokens)))
                params = m.num_params
                del m
            loss = sum(losses) / len(losses)
            row = {"method": name, "params": params, "loss": loss, "loss_std": _spread(losses), "losses": losses,
                   "ppl": math.exp(loss), "ppls": [math.exp(x) for x in losses], "lr": lr.get(kind),
                   "seconds": time.perf_counter() - t0}
            if kind.startswith("privatelora"):
                exchange = PrivateLoRAConfig(adapted_layers=spec).exchange_layers(bb.n_layers)
                row.update(adapted_layers=spec, rank=r, round_trips_per_token=len(exchange) + 1,
                           projection="random" if "random" in kind else "svd")
            rows.append(row)
            if not quiet:
                print(f"[bench tuning] {user} {name}: ppl {math.exp(loss):.2f} ({params} params, "
                      f"{len(losses)} seed(s))", file=sys.stderr, flush=True)
        by = {r["method"]: r for r in rows}
        gains = {}
        if "untuned" in by and "lora" in by:
            u, lora = by["untuned"]["loss"], by["lora"]
            for r in rows:
                if r["method"].startswith("privatelora"):
                    r["gain_recovered"] = _gain(u, r["loss"], lora["loss"])
                    per_seed = [_gain(u, x, y) for x, y in zip(r["losses"], lora["losses"])]
                    r["gains"] = per_seed
                    r["gain_recovered_std"] = None if None in per_seed else _spread(per_seed)
                    gains[r["method"]] = r["gain_recovered"]
                if r["method"] != "untuned" and lora["params"]:
                    r["params_vs_lora"] = r["params"] / lora["params"]
        if "privatelora" in by and gains.get("privatelora"):
            main = by["privatelora"]
            for r in rows:
                if r["method"].startswith("privatelora@") and r.get("gain_recovered") is not None:
                    r["share_of_all_layer_gain"] = r["gain_recovered"] / gains["privatelora"]
                    shares = [None if g is None or not a else g / a for g, a in zip(r["gains"], main["gains"])]
                    r["share_of_all_layer_gain_std"] = None if None in shares else _spread(shares)
        out["users"].append({"user": user, "tokens": corpus.sizes(), "results": rows, "gain_recovered": gains})
    out["seconds"] = time.perf_counter() - t_all
    return out


def print_tuning(res) -> None:
    print(f"held-out ({res['split']}) perplexity, {res['model']}, {res['settings']['steps']} steps x "
          f"{res['settings']['batch']} x {res['settings']['seq']} tokens, seeds {res['seeds']}, {res['seconds']:.0f}s")
    for u in res["users"]:
        print(f"\n{u['user']} (train {u['tokens']['train']} tokens)")
        print(f"  {'method':<28} {'params':>9} {'ppl':>8} {'RT/token':>8}  {'gain of LoRA':>16}  of all-layer PrivateLoRA")
        for r in u["results"]:
            g, a = r.get("gain_recovered"), r.get("share_of_all_layer_gain")
            gs, as_ = r.get("gain_recovered_std"), r.get("share_of_all_layer_gain_std")
            rt = r.get("round_trips_per_token")
            gtxt = "" if g is None else f"{100 * g:.1f}%" + ("" if gs is None else f" ± {100 * gs:.1f}")
            atxt = "" if a is None else f"{100 * a:.1f}%" + ("" if as_ is None else f" ± {100 * as_:.1f}")
            print(f"  {r['method']:<28} {r['params']:>9} {r['ppl']:>8.3f} {'' if rt is None else rt:>8}  "
                  f"{gtxt:>16}  {atxt}")


# ---------------------------------------------------------------- commands
