"""Throughput measurement pieces that need no Ray: the physical limit, windows, the model.

``bench throughput`` (driven from ``privatelora.actors.throughput``) compares, on one
backbone pinned to its own cores:

- **limit**: our batched eager forward over the cloud's decoder layers (``limit_decode``,
  ``LIMIT``): B sequences in one ordinary batched forward, no split, no adapter, no
  network, dense batched attention over equal-length caches (full attention: a sliding
  window is not applied, so beyond a window it is a timing, not the model). Our own
  block's math; transformers' own forward (``hf_decode``) is reported next to it;
- **ours** and **paper-style**: B edge actors over TCP, with and without cross-user
  batching. Their decode rate is counted from per-token arrival times (``decode_rate``).

Both forwards run on the model's device (its weights' device: the GPU when the replica
has one) and synchronise it before reading the clock. ``spread`` turns repeated
measurements into the reported median with its min and max. ``predict_tps`` is the model
a run over an emulated link is compared with (see its docstring); ``perfmodel`` holds the
paper's model.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from privatelora.model.block import LayerWeights, apply_rope, finish_layer, rms_norm

LIMIT = "our batched eager forward over the cloud's layers (no split, no adapter, no network)"
HF_REFERENCE = "transformers' own forward of the whole model (LM head included), batched, with its KV cache"


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (CUDA runs async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def spread(samples: dict[str, list[float]]) -> dict[str, float]:
    """Repeated measurements as reported: each ``k`` becomes the median of its samples,
    with ``k_min`` and ``k_max`` beside it."""
    out = {}
    for k, v in samples.items():
        out.update({k: statistics.median(v), f"{k}_min": min(v), f"{k}_max": max(v)})
    return out


@torch.no_grad()
def limit_decode(model, users: int, prompt_tokens: int, new_tokens: int, layer_ids=None, seed: int = 0,
                 prompt_hidden: torch.Tensor | None = None) -> dict:
    """Decode ``users`` sequences through the decoder layers in one batched forward.

    Returns the prefill time, the mean time of a decode step after it, and the per-layer
    step time (what one cloud stage at this batch costs with no split overhead at all).
    The inputs are random hidden states (drawn on the CPU from ``seed``, so every device
    gets the same ones) unless ``prompt_hidden`` [users, prompt, d] is given; caches and
    inputs live on the layers' device, in their dtype; ``prefill_out`` is the layers'
    output for the prompt (tests compare it to HF).
    """
    cfg = model.config
    ids = list(layer_ids) if layer_ids is not None else list(range(cfg.num_hidden_layers))
    layers = [LayerWeights.from_hf(model.model.layers[i], cfg, i) for i in ids]
    lw0 = layers[0]
    H, KV, hd = lw0.n_heads, lw0.n_kv, lw0.head_dim
    dtype, dev = lw0.wq.dtype, lw0.wq.device      # a cloud-only model has no embedding to ask
    total = prompt_tokens + new_tokens
    g = torch.Generator().manual_seed(seed)
    kc = [torch.zeros(users, KV, total, hd, dtype=dtype, device=dev) for _ in layers]
    vc = [torch.zeros(users, KV, total, hd, dtype=dtype, device=dev) for _ in layers]
    rotary = model.model.rotary_emb

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(dev)

    def forward(x, start):                                   # x [B, n, d]
        n = x.shape[1]
        cos, sin = rotary(x, torch.arange(start, start + n, device=dev)[None])
        cos, sin = cos[0].repeat(users, 1), sin[0].repeat(users, 1)     # [users * n, hd], batch-major
        for j, lw in enumerate(layers):
            h = rms_norm(x, lw.ln1, lw.eps)
            q = apply_rope(F.linear(h, lw.wq, lw.bq).view(users * n, H, hd), cos, sin)
            k = apply_rope(F.linear(h, lw.wk, lw.bk).view(users * n, KV, hd), cos, sin)
            v = F.linear(h, lw.wv, lw.bv).view(users, n, KV, hd)
            kc[j][:, :, start:start + n] = k.view(users, n, KV, hd).transpose(1, 2)
            vc[j][:, :, start:start + n] = v.transpose(1, 2)
            o = F.scaled_dot_product_attention(q.view(users, n, H, hd).transpose(1, 2), kc[j][:, :, :start + n],
                                               vc[j][:, :, :start + n], is_causal=n > 1,
                                               scale=hd ** -0.5, enable_gqa=H != KV)
            x = finish_layer(lw, x, o.transpose(1, 2).reshape(users, n, H * hd))
        return x

    d = cfg.hidden_size
    x0 = randn(users, prompt_tokens, d) if prompt_hidden is None else prompt_hidden.to(dev, dtype)
    steps = [randn(users, 1, d) for _ in range(new_tokens)]      # drawn before the clock starts
    t0 = _clock(dev)
    prefill_out = forward(x0, 0)
    prefill = _clock(dev) - t0
    t0 = _clock(dev)
    for i, x in enumerate(steps):
        forward(x, prompt_tokens + i)
    step = (_clock(dev) - t0) / max(1, new_tokens)
    return {"users": users, "prefill_s": prefill, "step_s": step, "layer_s": step / len(layers),
            "tok_s": users / step, "prefill_out": prefill_out}


@torch.no_grad()
def hf_decode(model, users: int, prompt_tokens: int, new_tokens: int, seed: int = 0) -> dict:
    """The same decode through the whole HF model (``generate``-style loop, LM head
    included): what a cloud-only service built on transformers would run, on the model's
    device."""
    g = torch.Generator().manual_seed(seed)
    dev = model.device
    ids = torch.randint(0, model.config.vocab_size, (users, prompt_tokens), generator=g).to(dev)
    out = model(ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = _clock(dev)
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    step = (_clock(dev) - t0) / max(1, new_tokens)
    return {"users": users, "step_s": step, "tok_s": users / step}


def decode_rate(runs: list[dict]) -> dict:
    """Aggregate decode tokens/s of concurrent users from their token arrival times.

    ``runs``: one dict per user with ``token_times`` (wall-clock arrival of each generated
    token) and ``started``. The window runs from the moment every user has its first
    token to the moment the first user finishes: all users decode throughout it, so
    the rate is the steady state, free of prefill and of stragglers' tails. The rate is
    the sum of each user's own rate in the window (its token intervals there over their
    span). Counting the tokens that arrive inside the window instead undercounts a batched
    server by one token per user: its users' tokens arrive together, and a window from one
    burst to the next takes only the bursts' first and last arrivals (3% at 16 users and
    32 tokens).
    """
    firsts = [r["token_times"][0] for r in runs]
    ends = [r["token_times"][-1] for r in runs]
    a, b = max(firsts), min(ends)
    ttft = sorted(r["token_times"][0] - r["started"] for r in runs)
    rate, intervals = 0.0, 0
    for r in runs:
        inside = [t for t in r["token_times"] if a <= t <= b]
        if len(inside) < 2 or inside[-1] <= inside[0]:
            rate = None     # a user without two tokens in the window: no shared steady state
            break
        rate += (len(inside) - 1) / (inside[-1] - inside[0])
        intervals += len(inside) - 1
    if rate is None:        # too few tokens for a shared window: the whole run's rate
        intervals = sum(len(r["token_times"]) - 1 for r in runs)
        a, b = max(firsts), max(ends)
        rate = intervals / (b - a) if b > a else 0.0
    return {"tok_s": rate, "window_s": b - a, "window_tokens": intervals,
            "ttft_s": sum(ttft) / len(ttft), "ttft_max_s": ttft[-1]}


def link_step_s(link, layers: int, hidden: int, rank: int, shared_a: bool, dtype: str) -> float:
    """Time the link itself adds to one decode token: the hand-off up, per cloud layer
    ``A h`` down and the reply up, the hand-off down, each waiting for the one before
    (``link.predict_time`` on our framed bytes). Zero on loopback."""
    from privatelora.bench.perfmodel import frame_bytes
    from privatelora.transport.link import get_profile, predict_time
    profile = get_profile(link)
    if not profile.shaped:
        return 0.0
    f = frame_bytes(hidden, rank, shared_a, dtype)
    step = [("up", f["handoff"])] + [("down", f["down_per_layer"]), ("up", f["up_per_layer"])] * layers \
        + [("down", f["handoff"])]
    return predict_time(profile, step)


def predict_tps(users: int, loopback_tok_s: float, link_s: float) -> float:
    """The model of ``bench throughput`` over a link: aggregate decode tokens/s of
    ``users`` lockstep devices.

    A decode step of the cohort costs what it costs on loopback on this machine (the
    backbone's stages at this batch, codec, scheduling, the devices' work: measured,
    ``users / loopback_tok_s``) plus the time the link adds to the step's L + 1 sequential
    round trips (``link_s``, from the link model). Each device has a link of its own, so
    link time does not grow with users while the backbone's share does: the curve rises
    about linearly while link time dominates and flattens where the backbone saturates,
    at the loopback rate.
    """
    return users / (users / loopback_tok_s + link_s)


def plot(result: dict, path: str) -> None:
    """Tokens/s against users: limit, ours (its range over the repeats shaded), paper-style
    (and the model over a link)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["results"]
    u = [r["users"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(u, [r["limit_tok_s"] for r in rows], "k--o", label="limit: our batched eager forward, no split")
    who = f"{result['edge_hosts']} edge host(s)" if result.get("edge_hosts") else "an edge actor per user"
    ax.plot(u, [r["ours_tok_s"] for r in rows], "-o", color="tab:blue", label=f"ours: {who}, batched stages")
    if "ours_tok_s_min" in rows[0]:      # the range over the repeats
        ax.fill_between(u, [r["ours_tok_s_min"] for r in rows], [r["ours_tok_s_max"] for r in rows],
                        color="tab:blue", alpha=0.15, linewidth=0)
    ax.plot(u, [r["paper_style_tok_s"] for r in rows], "-s", color="tab:orange",
            label="paper-style: one device per stage")
    if "model_tok_s" in rows[0]:
        ax.plot(u, [r["model_tok_s"] for r in rows], ":", color="tab:blue", label="model (loopback + link)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(u, [str(x) for x in u])
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title(f"{result['geometry']} geometry, {result['layers']} cloud layers, link {result['link']}"
                 + (f", median of {result['repeat']}" if result.get("repeat", 1) > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
