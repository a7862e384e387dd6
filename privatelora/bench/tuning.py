"""``bench tuning``: held-out perplexity of every method for several users, and the
fraction of LoRA's gain each PrivateLoRA row recovers, on log-perplexity.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import asdict, replace

import torch

from privatelora.config import PrivateLoRAConfig
from privatelora.training.baselines import FullFineTune, LoRAMethod, PrivateLoRAMethod, Untuned
from privatelora.training.data import load_corpus
from privatelora.training.loop import TrainSettings, evaluate, progress_bar, train

METHODS = ("untuned", "lora", "privatelora", "privatelora_shared_a", "full")
# Chosen on the validation split (docs/tuning.md says what was tried). A learning rate is
# one number, or per bundled user ("*": any other text) where the best differed by user.
DEFAULTS = {"rank": 24, "steps": 150, "batch": 8, "seq": 128, "schedule": "constant", "warmup": 10,
            "lr": {"lora": {"sonnets": 1e-3, "paradise_lost": 3e-3, "*": 1e-3}, "full": 1e-4,
                   "privatelora": 1e-2, "privatelora_shared_a": 1e-2}}


def default_lr(method: str, user: str = "*") -> float:
    lr = DEFAULTS["lr"][method]
    return lr.get(user, lr["*"]) if isinstance(lr, dict) else lr


def _method(name: str, bb, rank: int, targets, seed: int, adapted_layers: str = "all"):
    from privatelora.api import build_split
    from privatelora.config import PrivateLoRAConfig
    from privatelora.training.cloud import CloudTrainer
    if name == "untuned":
        return Untuned(bb)
    if name == "lora":
        return LoRAMethod(bb, rank=16, alpha=32, seed=seed)
    if name == "full":
        return FullFineTune(bb)
    cfg = PrivateLoRAConfig(rank=rank, targets=tuple(targets), shared_a=name == "privatelora_shared_a",
                            adapted_layers=adapted_layers)
    split = build_split(cfg=cfg, backbone=bb)
    return PrivateLoRAMethod(split.device, trainer=CloudTrainer(split.cloud), name=name)


def bench_tuning(model: str = "tiny", users=("sonnets", "paradise_lost"), methods=METHODS,
                 rank: int | None = None, targets=("q", "k", "v"), lrs: dict | None = None,
                 steps: int | None = None, batch: int | None = None, seq: int | None = None,
                 schedule: str | None = None, split: str = "test", eval_tokens: int | None = 8192,
                 seed: int = 0, quiet: bool = False, backbone=None, placements=()) -> dict:
    """Held-out perplexity of each method for each user, same data and budget for all.

    ``placements``: extra PrivateLoRA rows ``(adapted_layers, rank)`` (e.g. ``("last:1", 48)``:
    the last layer alone at a higher rank), each reported with its round trips per token and
    the share of the all-layer PrivateLoRA row's gain it keeps."""
    from privatelora.model.loading import load_backbone
    torch.set_num_threads(1)   # device and cloud share this process; see bench.one_thread
    t_all = time.perf_counter()
    rank = rank or DEFAULTS["rank"]
    lrs = lrs or {}
    bb = backbone or load_backbone(model)
    base = TrainSettings(steps=steps or DEFAULTS["steps"], batch=batch or DEFAULTS["batch"],
                         seq=seq or DEFAULTS["seq"], schedule=schedule or DEFAULTS["schedule"],
                         warmup=DEFAULTS["warmup"], eval_every=0, eval_tokens=eval_tokens, seed=seed)
    runs = [(name, name, rank, "all") for name in methods] + \
        [(f"privatelora@{spec}/r{r}", "privatelora", r, spec) for spec, r in placements]
    out = {"model": bb.name, "fingerprint": bb.fingerprint, "split": split, "rank": rank, "targets": list(targets),
           "settings": {k: v for k, v in asdict(base).items() if k not in ("lr", "eval_every")},
           "users": []}
    for user in users:
        corpus = load_corpus(user, bb.tokenizer, seq=base.seq)
        lr = {m: lrs.get(m) or default_lr(m, corpus.name) for m in METHODS[1:]}
        target = corpus.test if split == "test" else corpus.val
        rows = []
        for name, kind, r, spec in runs:
            t0 = time.perf_counter()
            m = _method(kind, bb, r, targets, seed, spec)
            if kind != "untuned":
                prog = None if quiet else progress_bar(f"[bench tuning] {user} {name}")
                train(m, corpus, replace(base, lr=lr[kind]), heldout=target, progress=prog)
            loss = asyncio.run(evaluate(m, target, base.seq, eval_tokens))
            row = {"method": name, "params": m.num_params, "loss": loss, "ppl": math.exp(loss),
                   "lr": lr.get(kind), "seconds": time.perf_counter() - t0}
            if kind.startswith("privatelora"):
                exchange = PrivateLoRAConfig(adapted_layers=spec).exchange_layers(bb.n_layers)
                row.update(adapted_layers=spec, rank=r, round_trips_per_token=len(exchange) + 1)
            rows.append(row)
            if not quiet:
                print(f"[bench tuning] {user} {name}: ppl {math.exp(loss):.2f} ({m.num_params} params)",
                      file=sys.stderr, flush=True)
            del m
        by = {r["method"]: r for r in rows}
        gains = {}
        if "untuned" in by and "lora" in by:
            denom = by["untuned"]["loss"] - by["lora"]["loss"]
            for r in rows:
                if r["method"].startswith("privatelora"):
                    r["gain_recovered"] = (by["untuned"]["loss"] - r["loss"]) / denom if denom > 0 else None
                    gains[r["method"]] = r["gain_recovered"]
                if r["method"] != "untuned" and by["lora"]["params"]:
                    r["params_vs_lora"] = r["params"] / by["lora"]["params"]
        if "privatelora" in by and gains.get("privatelora"):
            for r in rows:
                if r["method"].startswith("privatelora@") and r.get("gain_recovered") is not None:
                    r["share_of_all_layer_gain"] = r["gain_recovered"] / gains["privatelora"]
        out["users"].append({"user": user, "tokens": corpus.sizes(), "results": rows, "gain_recovered": gains})
    out["seconds"] = time.perf_counter() - t_all
    return out


def print_tuning(res) -> None:
    print(f"held-out ({res['split']}) perplexity, {res['model']}, {res['settings']['steps']} steps x "
          f"{res['settings']['batch']} x {res['settings']['seq']} tokens, {res['seconds']:.0f}s")
    for u in res["users"]:
        print(f"\n{u['user']} (train {u['tokens']['train']} tokens)")
        print(f"  {'method':<26} {'params':>9} {'ppl':>8} {'RT/token':>8}  gain of LoRA  of all-layer PrivateLoRA")
        for r in u["results"]:
            g, a = r.get("gain_recovered"), r.get("share_of_all_layer_gain")
            rt = r.get("round_trips_per_token")
            print(f"  {r['method']:<26} {r['params']:>9} {r['ppl']:>8.3f} {'' if rt is None else rt:>8}  "
                  f"{'' if g is None else f'{100 * g:.1f}%':>12}  {'' if a is None else f'{100 * a:.1f}%'}")


# ---------------------------------------------------------------- commands
