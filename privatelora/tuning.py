"""Personalization: user data, the tune loop, baselines, ``privatelora tune`` and ``bench tuning``.

Contract
- Data: ``read_text(spec)`` reads a bundled text by name (``sonnets``, ``paradise_lost``:
  ``privatelora/data/``) or any UTF-8 file (plain or ``.gz``); ``split_tokens`` cuts the
  token stream into contiguous train / validation / test parts (no window crosses a cut).
- Methods share one interface (``params``, ``num_params``, ``step(inputs, labels)`` =
  forward + backward of the mean label-token loss, ``evaluate(inputs, labels)`` = summed
  nats): ``PrivateLoRAMethod`` trains M through the split (``privatelora.training``), in
  process or over a ``transport.Session``; ``LoRAMethod`` (standard LoRA on q, k, v, own
  small implementation: A Kaiming-uniform, B zero, scale alpha / r) and
  ``FullFineTune`` (every backbone weight) are the baselines; ``Untuned`` only evaluates.
- ``train(method, corpus, settings)``: the one loop every method runs (AdamW, warmup then
  constant or cosine, grad-norm clip, same batches for the same seed), with held-out loss
  as it goes. Async so that a remote split awaits its round trips; ``run`` wraps it.
- ``bench_tuning``: held-out perplexity of every method for several users; the fraction
  of LoRA's gain each PrivateLoRA row recovers, on log-perplexity.
- ``add_commands(sub, add_split_args, positive)`` registers ``tune`` and ``bench tuning``.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import inspect
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import PrivateLoRAError, UsageError

DATA_DIR = Path(__file__).parent / "data"
BUNDLED = {"sonnets": "sonnets.txt.gz", "paradise_lost": "paradise_lost.txt.gz"}
IGNORE = -100


# ---------------------------------------------------------------- data
def read_text(spec) -> tuple[str, str]:
    """(name, text) of a bundled text name or a UTF-8 file path (plain or .gz)."""
    spec = str(spec)
    path = DATA_DIR / BUNDLED[spec] if spec in BUNDLED else Path(spec)
    if not path.is_file():
        raise UsageError(f"--data {spec!r} is neither a file nor one of {sorted(BUNDLED)}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {str(path)!r} as UTF-8 text: {e}") from None
    if not text.strip():
        raise UsageError(f"{str(path)!r} holds no text")
    return (spec if spec in BUNDLED else path.name), text


def encode_text(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer: tuning needs one to read text")
    fast = getattr(tokenizer, "backend_tokenizer", None)   # no max-length warning on long texts
    ids = fast.encode(text, add_special_tokens=False).ids if fast is not None else \
        tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Corpus:
    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    def sizes(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def split_tokens(name: str, ids: torch.Tensor, val_frac: float = 0.1, test_frac: float = 0.1) -> Corpus:
    """Contiguous parts: train (the start), validation, test (the end)."""
    n = len(ids)
    n_test, n_val = int(n * test_frac), int(n * val_frac)
    return Corpus(name, ids[: n - n_val - n_test], ids[n - n_val - n_test: n - n_test], ids[n - n_test:])


def load_corpus(spec, tokenizer, val_frac=0.1, test_frac=0.1, seq: int = 128) -> Corpus:
    name, text = read_text(spec)
    c = split_tokens(name, encode_text(tokenizer, text), val_frac, test_frac)
    for part in ("train",) + (("val",) if val_frac else ()) + (("test",) if test_frac else ()):
        if len(getattr(c, part)) < seq + 1:
            raise UsageError(f"{name}: {len(getattr(c, part))} {part} tokens, fewer than one window of "
                             f"{seq + 1}; give a longer text or a smaller --seq")
    return c


def sample_batch(ids: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """``batch`` random windows: inputs w[:-1], labels w[1:] (next-token prediction)."""
    starts = torch.randint(0, len(ids) - seq, (batch,), generator=gen).tolist()
    wins = [ids[s: s + seq + 1].tolist() for s in starts]
    return [w[:-1] for w in wins], [w[1:] for w in wins]


def eval_batches(ids: torch.Tensor, seq: int, max_tokens: int | None = None, batch: int = 8):
    """Non-overlapping windows over ``ids`` (up to ``max_tokens`` predicted tokens), batched."""
    wins = []
    for s in range(0, len(ids) - seq, seq):
        if max_tokens is not None and len(wins) * seq >= max_tokens:
            break
        w = ids[s: s + seq + 1].tolist()
        wins.append((w[:-1], w[1:]))
    return [([w[0] for w in wins[i:i + batch]], [w[1] for w in wins[i:i + batch]])
            for i in range(0, len(wins), batch)]


# ---------------------------------------------------------------- methods
def _ce_sum(logits: torch.Tensor, labels) -> torch.Tensor:
    lab = torch.as_tensor(labels, dtype=torch.long, device=logits.device).reshape(-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab, ignore_index=IGNORE, reduction="sum")


def _count(labels) -> int:
    return sum(1 for s in labels for x in s if x != IGNORE)


class Untuned:
    name = "untuned"

    def __init__(self, backbone):
        self.model = backbone.model
        self.params: list = []

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @torch.no_grad()
    def evaluate(self, inputs, labels) -> float:
        return float(_ce_sum(self.model(input_ids=torch.tensor(inputs)).logits, labels))

    def step(self, inputs, labels) -> float:
        with torch.enable_grad():
            loss = _ce_sum(self.model(input_ids=torch.tensor(inputs)).logits, labels) / max(_count(labels), 1)
            loss.backward()
        return float(loss.detach())


class LoRAMethod(Untuned):
    """Standard LoRA on q, k, v of every layer: W x + (alpha / r) B A x, A Kaiming-uniform
    (as peft), B = 0. Forward hooks on a private copy of the frozen backbone; A and B train."""

    name = "lora"

    def __init__(self, backbone, rank: int = 16, alpha: float = 32, targets=("q", "k", "v"), seed: int = 0):
        self.model = copy.deepcopy(backbone.model)   # hooks never touch the shared backbone
        g = torch.Generator().manual_seed(seed)
        self.scale = alpha / rank
        self.params, self._hooks = [], []
        for layer in self.model.model.layers:
            for t in targets:
                lin = getattr(layer.self_attn, f"{t}_proj")
                bound = 1 / math.sqrt(lin.in_features)   # kaiming_uniform_(a=sqrt(5)) as nn.Linear / peft
                A = ((torch.rand(rank, lin.in_features, generator=g) * 2 - 1) * bound).requires_grad_(True)
                B = torch.zeros(lin.out_features, rank, requires_grad=True)
                self.params += [A, B]
                self._hooks.append(lin.register_forward_hook(
                    lambda mod, inp, out, A=A, B=B: out + self.scale * ((inp[0] @ A.T) @ B.T)))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class FullFineTune(Untuned):
    """Every backbone weight trains (a private copy of the model)."""

    name = "full"

    def __init__(self, backbone):
        self.model = copy.deepcopy(backbone.model)
        self.params = list(self.model.parameters())
        for p in self.params:
            p.requires_grad_(True)


class PrivateLoRAMethod:
    """M trains through the split: in process (a ``CloudTrainer`` on a ``CloudPart``) or over
    ``session`` (a ``transport.Session`` on a cloud endpoint). Evaluation runs through the
    split as well (forward only)."""

    def __init__(self, device_part, trainer=None, session=None, name: str = "privatelora"):
        if (trainer is None) == (session is None):
            raise ValueError("give exactly one of trainer (in process) or session (remote)")
        self.part, self.trainer, self.session, self.name = device_part, trainer, session, name
        self.params = [M for _, M in device_part.adapter.named_parameters()]
        self._sid = session.id if session is not None else 1

    @property
    def num_params(self) -> int:
        return self.part.adapter.num_parameters()

    def _run(self, step):
        from .training import run_step, run_step_remote
        if self.trainer is not None:
            return run_step(self.trainer, step)
        return run_step_remote(self.session, step)

    def step(self, inputs, labels):
        from .training import TrainStep
        r = self._run(TrainStep(self.part, self._sid, inputs, labels))
        if inspect.isawaitable(r):
            async def done():
                return (await r).loss
            return done()
        return r.loss

    def evaluate(self, inputs, labels):
        from .training import TrainStep
        r = self._run(TrainStep(self.part, self._sid, inputs, labels, backward=False))
        if inspect.isawaitable(r):
            async def done():
                return (await r).loss_sum
            return done()
        return r.loss_sum


# ---------------------------------------------------------------- the loop
@dataclass
class TrainSettings:
    steps: int = 150
    batch: int = 8
    seq: int = 128
    lr: float = 1e-3
    warmup: int = 10
    schedule: str = "constant"       # constant after warmup (the paper) or cosine to 0
    clip: float = 1.0
    eval_every: int = 50
    eval_tokens: int = 4096          # held-out tokens per evaluation while training
    seed: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "cosine":
            p = (step - self.warmup) / max(1, self.steps - self.warmup)
            return self.lr * 0.5 * (1 + math.cos(math.pi * p))
        return self.lr


async def _maybe(x):
    return await x if inspect.isawaitable(x) else x


async def evaluate(method, ids: torch.Tensor, seq: int, max_tokens: int | None = None) -> float:
    """Mean nats per token over non-overlapping windows of ``ids``."""
    total, count = 0.0, 0
    for inputs, labels in eval_batches(ids, seq, max_tokens):
        total += await _maybe(method.evaluate(inputs, labels))
        count += _count(labels)
    return total / max(count, 1)


async def train_async(method, corpus: Corpus, s: TrainSettings, heldout: torch.Tensor | None = None,
                      progress=None) -> dict:
    """Run ``s.steps`` AdamW steps of ``method`` on ``corpus.train``; held-out loss (on
    ``heldout``, default the validation part) every ``s.eval_every`` steps and at the end."""
    heldout = corpus.val if heldout is None else heldout
    opt = torch.optim.AdamW(method.params, lr=s.lr, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed)
    history, losses = [], []
    t0 = time.perf_counter()
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = s.lr_at(step)
        opt.zero_grad(set_to_none=True)
        inputs, labels = sample_batch(corpus.train, s.batch, s.seq, gen)
        losses.append(await _maybe(method.step(inputs, labels)))
        if s.clip:
            torch.nn.utils.clip_grad_norm_(method.params, s.clip)
        opt.step()
        last = step + 1 == s.steps
        if (s.eval_every and (step + 1) % s.eval_every == 0) or last:
            held = await evaluate(method, heldout, s.seq, s.eval_tokens)
            history.append({"step": step + 1, "train_loss": sum(losses[-s.eval_every:]) / len(losses[-s.eval_every:]),
                            "heldout_loss": held})
        if progress is not None:
            progress(step + 1, s.steps, losses[-1], history[-1]["heldout_loss"] if history else None)
    for p in method.params:
        p.grad = None
    return {"steps": s.steps, "history": history, "seconds": time.perf_counter() - t0,
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None}


def train(method, corpus, s, heldout=None, progress=None) -> dict:
    return asyncio.run(train_async(method, corpus, s, heldout, progress))


def progress_bar(prefix: str, stream=None):
    stream = stream or sys.stderr
    t0 = time.perf_counter()

    def show(step, total, loss, held):
        filled = int(24 * step / total)
        bar = "#" * filled + "." * (24 - filled)
        held_s = f" held-out {held:.3f}" if held is not None else ""
        stream.write(f"\r{prefix} [{bar}] {step}/{total} loss {loss:.3f}{held_s} "
                     f"{time.perf_counter() - t0:.0f}s")
        if step == total:
            stream.write("\n")
        stream.flush()
    return show


# ---------------------------------------------------------------- bench tuning
METHODS = ("untuned", "lora", "privatelora", "privatelora_shared_a", "full")
# Chosen on the validation split (docs/tuning.md says what was tried). A learning rate is
# one number, or per bundled user ("*": any other text) where the best differed by user.
DEFAULTS = {"rank": 24, "steps": 150, "batch": 8, "seq": 128, "schedule": "constant", "warmup": 10,
            "lr": {"lora": {"sonnets": 1e-3, "paradise_lost": 3e-3, "*": 1e-3}, "full": 1e-4,
                   "privatelora": 1e-2, "privatelora_shared_a": 1e-2}}


def default_lr(method: str, user: str = "*") -> float:
    lr = DEFAULTS["lr"][method]
    return lr.get(user, lr["*"]) if isinstance(lr, dict) else lr


def _method(name: str, bb, rank: int, targets, seed: int):
    from .api import build_split
    from .config import PrivateLoRAConfig
    from .training import CloudTrainer
    if name == "untuned":
        return Untuned(bb)
    if name == "lora":
        return LoRAMethod(bb, rank=16, alpha=32, seed=seed)
    if name == "full":
        return FullFineTune(bb)
    cfg = PrivateLoRAConfig(rank=rank, targets=tuple(targets), shared_a=name == "privatelora_shared_a")
    split = build_split(cfg=cfg, backbone=bb)
    return PrivateLoRAMethod(split.device, trainer=CloudTrainer(split.cloud), name=name)


def bench_tuning(model: str = "tiny", users=("sonnets", "paradise_lost"), methods=METHODS,
                 rank: int | None = None, targets=("q", "k", "v"), lrs: dict | None = None,
                 steps: int | None = None, batch: int | None = None, seq: int | None = None,
                 schedule: str | None = None, split: str = "test", eval_tokens: int | None = 8192,
                 seed: int = 0, quiet: bool = False, backbone=None) -> dict:
    """Held-out perplexity of each method for each user, same data and budget for all."""
    from .models import load_backbone
    torch.set_num_threads(1)   # device and cloud share this process; see bench._one_thread
    t_all = time.perf_counter()
    rank = rank or DEFAULTS["rank"]
    lrs = lrs or {}
    bb = backbone or load_backbone(model)
    base = TrainSettings(steps=steps or DEFAULTS["steps"], batch=batch or DEFAULTS["batch"],
                         seq=seq or DEFAULTS["seq"], schedule=schedule or DEFAULTS["schedule"],
                         warmup=DEFAULTS["warmup"], eval_every=0, eval_tokens=eval_tokens, seed=seed)
    out = {"model": bb.name, "fingerprint": bb.fingerprint, "split": split, "rank": rank, "targets": list(targets),
           "settings": {k: v for k, v in asdict(base).items() if k not in ("lr", "eval_every")},
           "users": []}
    for user in users:
        corpus = load_corpus(user, bb.tokenizer, seq=base.seq)
        lr = {m: lrs.get(m) or default_lr(m, corpus.name) for m in METHODS[1:]}
        target = corpus.test if split == "test" else corpus.val
        rows = []
        for name in methods:
            t0 = time.perf_counter()
            m = _method(name, bb, rank, targets, seed)
            if name != "untuned":
                prog = None if quiet else progress_bar(f"[bench tuning] {user} {name}")
                train(m, corpus, replace(base, lr=lr[name]), heldout=target, progress=prog)
            loss = asyncio.run(evaluate(m, target, base.seq, eval_tokens))
            rows.append({"method": name, "params": m.num_params, "loss": loss, "ppl": math.exp(loss),
                         "lr": lr.get(name), "seconds": time.perf_counter() - t0})
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
        out["users"].append({"user": user, "tokens": corpus.sizes(), "results": rows, "gain_recovered": gains})
    out["seconds"] = time.perf_counter() - t_all
    return out


def print_tuning(res) -> None:
    print(f"held-out ({res['split']}) perplexity, {res['model']}, {res['settings']['steps']} steps x "
          f"{res['settings']['batch']} x {res['settings']['seq']} tokens, {res['seconds']:.0f}s")
    for u in res["users"]:
        print(f"\n{u['user']} (train {u['tokens']['train']} tokens)")
        print(f"  {'method':<22} {'params':>9} {'ppl':>8}  gain of LoRA")
        for r in u["results"]:
            g = r.get("gain_recovered")
            print(f"  {r['method']:<22} {r['params']:>9} {r['ppl']:>8.3f}  {'' if g is None else f'{100 * g:.1f}%'}")


# ---------------------------------------------------------------- commands
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
    from .adapters import save_adapter
    from .cli import _split_config
    from .device import DevicePart
    from .models import load_backbone

    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {args.out!r}: directory {str(out.parent)!r} does not exist")
    cfg = _split_config(args)
    if cfg.torch_dtype != torch.float32:
        raise UsageError("tuning runs in float32 (--dtype float32)")
    bb = load_backbone(args.model, dtype=cfg.torch_dtype)
    _check_settings(args, bb.config.max_position_embeddings)
    corpus = load_corpus(args.data, bb.tokenizer, val_frac=args.heldout, test_frac=0.0, seq=args.seq)
    per_step = args.batch * args.seq
    steps = args.steps if args.steps is not None else \
        max(1, math.ceil(args.epochs * len(corpus.train) / per_step)) if args.epochs is not None else DEFAULTS["steps"]
    lr = args.lr if args.lr is not None else default_lr("privatelora_shared_a" if cfg.shared_a else "privatelora")
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
        from .cloud import CloudPart
        from .training import CloudTrainer
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
    from .endpoint_cli import connect_client, parse_address
    from .serving import session_geometry
    from .training import TrainingError
    from .transport import RemoteError

    host, port = parse_address(args.connect)
    client = await connect_client(host, port, args)
    try:
        geometry = session_geometry(part.cloud_layer_ids, part.model_config.hidden_size, cfg, "fp32",
                                    max_tokens=max(2048, args.batch * args.seq))
        sess = await client.open(geometry)
        try:
            res = await tune(PrivateLoRAMethod(part, session=sess))
        finally:
            if not client.closed:
                await sess.close()
    except RemoteError as e:
        raise UsageError(f"the cloud refused the session: {e}")
    except TrainingError as e:
        raise UsageError(f"the cloud refused a training step: {e}")
    except (ConnectionError, asyncio.TimeoutError) as e:
        raise UsageError(f"lost the cloud at {host}:{port}: {type(e).__name__} {e}")
    finally:
        await client.close()
    return res, client.stats.as_dict()


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
    b = bsub.add_parser("tuning", help="held-out perplexity: untuned, LoRA, PrivateLoRA (separate / shared A), full")
    b.add_argument("--model", default="tiny")
    b.add_argument("--users", default="sonnets,paradise_lost", help="comma separated data names or files")
    b.add_argument("--methods", default=",".join(METHODS))
    b.add_argument("--rank", type=positive, default=DEFAULTS["rank"], help="rank of PrivateLoRA's M")
    b.add_argument("--targets", default="q,k,v", help="projections carrying M")
    b.add_argument("--steps", type=positive, default=DEFAULTS["steps"])
    b.add_argument("--batch", type=positive, default=DEFAULTS["batch"])
    b.add_argument("--seq", type=positive, default=DEFAULTS["seq"])
    b.add_argument("--schedule", choices=["constant", "cosine"], default=DEFAULTS["schedule"])
    for m in METHODS[1:]:
        b.add_argument(f"--lr-{m.replace('_', '-')}", type=float, default=None,
                       help=f"learning rate of {m} (default {default_lr(m):g}; see docs/tuning.md)")
    b.add_argument("--split", choices=["test", "val"], default="test", help="evaluate on test (default) or validation")
    b.add_argument("--eval-tokens", type=positive, default=8192)
    b.add_argument("--seed", type=int, default=0)
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
        return bench_tuning(args.model, users, methods, args.rank, targets, lrs, args.steps, args.batch, args.seq,
                            args.schedule, args.split, args.eval_tokens, args.seed, quiet=args.json)
    b.set_defaults(func=run, printer=print_tuning)
