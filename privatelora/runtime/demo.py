"""The multi-user demo, in one process: N users, one shared cloud part.

Each user has a device part with its own private adapter (seeded random M, standing in
for a tuned one) and its own prompt; users join at different steps, some greedy, some
sampled. Their stages are batched together by the cloud. The Ray version of the demo
places the same pieces in actors.
"""

from __future__ import annotations

import sys

from privatelora.config import PrivateLoRAConfig
from privatelora.model.adapters import PrivateAdapter
from privatelora.model.loading import load_backbone
from privatelora.model.sampling import SamplingParams
from privatelora.runtime.accounting import CommStats, naive_numbers_per_token_per_layer
from privatelora.runtime.cloud import CloudPart
from privatelora.runtime.device import DevicePart
from privatelora.runtime.draft import load_draft
from privatelora.runtime.generation import Generation
from privatelora.runtime.runner import InProcessRunner
from privatelora.runtime.prompts import encode_prompt

PROMPTS = [
    "ROMEO:\nBut soft, what light",
    "KING:\nNow is the",
    "HAMLET:\nTo be, or not",
    "JULIET:\nO Romeo, Romeo",
    "MACBETH:\nTomorrow, and tomorrow",
    "PORTIA:\nThe quality of mercy",
    "LEAR:\nBlow, winds, and crack",
    "PROSPERO:\nOur revels now are ended",
]


def print_users(users: list[dict]) -> None:
    """Each demo user's prompt and continuation (in-process and Ray demos alike)."""
    for u in users:
        print(f"--- user {u['user']} ({'sampled' if u['sampled'] else 'greedy'}) ---")
        print(u["prompt"] + u["text"])


def run_inprocess_demo(users: int = 4, max_new_tokens: int = 48, model: str = "tiny", rank: int = 16,
                       quiet: bool = False, adapted_layers: str = "all", draft: str | None = None,
                       draft_tokens: int = 4) -> dict:
    if users < 1:
        raise ValueError("--users must be at least 1")
    cfg = PrivateLoRAConfig(rank=rank, adapted_layers=adapted_layers)
    bb = load_backbone(model)
    cfg.adapted(bb.n_layers)                           # a placement this model cannot take fails here
    cloud = CloudPart(bb, cfg)
    tok = bb.tokenizer
    gens, starts = [], []
    for u in range(users):
        adapter = PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(1000 + u, scale=0.3)
        dev = DevicePart(bb, cfg, adapter)
        ids = encode_prompt(tok, PROMPTS[u % len(PROMPTS)])
        sampled = u % 2 == 1
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8 if sampled else 0.0,
                                top_p=0.95, seed=u)
        gens.append(Generation(dev.session(u + 1), ids, params, draft=load_draft(draft, bb) if draft else None,
                               draft_tokens=draft_tokens))
        starts.append(3 * u)   # users join at different steps
    if not quiet:
        print(f"[demo] {users} users share one {bb.name} backbone ({bb.n_layers} layers), rank {rank}", file=sys.stderr)
    stats = InProcessRunner(cloud).run(gens, starts)
    comm = CommStats()
    for g in gens:
        comm.add(g.device.comm)
    per = comm.numbers_per_token_per_layer()["total"]
    naive = naive_numbers_per_token_per_layer(bb.config, cfg.targets)
    out = {
        "mode": "in-process",
        "users": [{"user": i, "prompt": PROMPTS[i % len(PROMPTS)], "text": tok.decode(g.tokens, skip_special_tokens=True),
                   "tokens": len(g.tokens), "sampled": g.params.temperature > 0,
                   **g.stats()} for i, g in enumerate(gens)],
        "tokens_per_s": stats.tokens_generated / stats.seconds if stats.seconds else 0.0,
        "mean_batch_size": stats.mean_batch_size,
        "bytes_to_cloud": comm.to_dict()["to_cloud"],
        "bytes_to_device": comm.to_dict()["to_device"],
        "bytes_per_token_per_layer": per * comm.bytes_per_number,
        "naive_bytes_per_token_per_layer": naive * comm.bytes_per_number,
        "reduction": 1 - per / naive,
        "seconds": stats.seconds,
    }
    if not quiet:
        print_users(out["users"])
        print(f"--- {stats.tokens_generated} tokens, {out['tokens_per_s']:.1f} tok/s aggregate, mean stage batch "
              f"{out['mean_batch_size']:.2f} sessions, {out['bytes_per_token_per_layer']:.0f} B/token/layer vs "
              f"{out['naive_bytes_per_token_per_layer']} B naive split ({100 * out['reduction']:.1f}% less)")
    return out
