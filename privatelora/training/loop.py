"""The one training loop every method runs: AdamW, warmup then constant or cosine,
grad-norm clip, the same batches for the same seed, held-out loss as it goes. Async so
that a remote split awaits its round trips; ``train`` wraps it.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
import time
from dataclasses import dataclass

import torch

from privatelora.training.data import Corpus, eval_batches, label_count, sample_batch


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
        count += label_count(labels)
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
