"""``privatelora bench throughput``: limit vs ours vs paper-style, measured in one run.

One backbone replica (pinned, stage thread and event loop, to the first core when the
machine has two or more, so that device work never steals the cloud's CPU; its event loop
gets the second core when there are three or more: ``actors.pool.split_cores``) and N edge
actors (pinned to the remaining cores) over the TCP transport. For each user count B, in
this order, on the same warm replica:

1. limit: our batched eager forward (``BackboneReplica.limit``): B sequences through the
   cloud's decoder layers in one plain batched forward on the replica's own worker thread
   (``privatelora.bench.throughput.limit_decode``; embedding and LM head are not part of
   what is compared). Transformers' own forward (on unless ``--no-hf``) is reported next
   to it; it runs HF's whole model, so for it, and only for it, the benchmark's replica
   loads the full backbone (``Pool(full_model=True)``); every other replica holds only
   the cloud's layers;
2. ours: B edge actors decode together, the scheduler batching their stages;
3. paper-style: the same B actors with ``max_batch=1`` and no gathering: every stage
   runs alone, as the paper's reference code serves one device at a time.

The sequence runs ``repeat`` times (default 3); every figure reported is the median of
its repeats, with ``_min`` and ``_max`` beside it, and ratios come from the medians.
Decode rates come from per-token arrival times on the devices (steady-state window, all
users active); the backbone's busy fraction from the time its worker spent computing.
With ``gpus_per_replica`` the replica asks Ray for GPUs and runs on one (the ``7b``
geometry, 8 layers by default, is only measured there).
"""

from __future__ import annotations

import sys
import time

import privatelora.actors  # noqa: F401  (Ray's auth mode, before Ray is imported)
import ray

from privatelora.config import PrivateLoRAConfig, UsageError
from privatelora.bench.throughput import HF_REFERENCE, LIMIT, decode_rate, link_step_s, predict_tps, spread

from privatelora.actors.commands import check_gpus, join_cluster
from privatelora.actors.pool import Pool

RANKS = {"bench": 32, "tiny": 16, "7b": 128}      # privatelora/bench/geometry.py; 7b: the paper's rank
LAYERS = {"bench": 16, "7b": 8}        # decoder layers of the geometry's checkpoint (tiny: its own)
EDGE_WAVE = 8                          # edge actors started at once (each loads the backbone once)


class _Devices:
    """The simulated devices: one edge actor per user, or ``hosts`` edge hosts sharing them."""

    def __init__(self, pool: Pool, n: int, hosts: int, dtype: str, say):
        self.hosts = hosts
        self.actors = []
        if hosts:
            groups = [[u for u in range(n) if u % hosts == h] for h in range(min(hosts, n))]
            self.actors = [pool.edge_host(g, adapter_seeds=[1000 + u for u in g], wire_dtype=dtype) for g in groups]
            ray.get([a.node_id.remote() for a in self.actors])
            say(f"{len(self.actors)} edge hosts up, carrying {n} users")
            return
        for i in range(0, n, EDGE_WAVE):
            wave = [pool.edge(u, adapter_seed=1000 + u, wire_dtype=dtype) for u in range(i, min(n, i + EDGE_WAVE))]
            ray.get([e.node_id.remote() for e in wave])
            self.actors += wave
            say(f"{len(self.actors)}/{n} edge actors up")

    def decode(self, prompts: list, new_tokens: int, start_at: float, link: str) -> list[dict]:
        """The first ``len(prompts)`` users decode together; one result per user."""
        if not self.hosts:
            return ray.get([e.bench_decode.remote(p, new_tokens, start_at, link)
                            for e, p in zip(self.actors, prompts)])
        refs = []
        for h, actor in enumerate(self.actors):
            mine = {u: p for u, p in enumerate(prompts) if u % self.hosts == h}
            if mine:
                refs.append(actor.bench_decode_many.remote(mine, new_tokens, start_at, link))
        return [r for part in ray.get(refs) for r in part]

    def close(self) -> None:
        ray.get([a.close.remote() for a in self.actors])


def _timed(pool: Pool, devices: _Devices, prompts, new_tokens: int, link: str, *, gather_s: float, max_batch: int,
           merge: bool = False, trace: bool = False) -> dict:
    replica = pool.replicas[0]
    ray.get(replica.set_policy.remote(gather_s=gather_s, merge=merge, max_batch=max_batch))
    before = ray.get(replica.stats.remote())
    if trace:
        ray.get(replica.timeline.remote(True))
    start_at = time.time() + 0.5
    runs = devices.decode(prompts, new_tokens, start_at, link)
    timeline = ray.get(replica.timeline.remote(False)) if trace else None
    after = ray.get(replica.stats.remote())
    errors = [r["error"] for r in runs if r["error"]]
    if errors or any(r["tokens"] != new_tokens for r in runs):
        raise RuntimeError(f"a benchmark generation failed: {errors or 'short output'}")
    end = max(r["token_times"][-1] for r in runs)
    stages = after["stages"] - before["stages"]
    rate = decode_rate(runs)
    return {**rate, "wall_s": end - start_at,
            "busy": (after["busy_s"] - before["busy_s"]) / (end - start_at),
            "mean_batch": (after["stage_sessions"] - before["stage_sessions"]) / stages if stages else 0.0,
            **({"timeline": timeline} if trace else {})}


def run(geometry: str = "bench", users=(1, 2, 4, 8, 16), link: str = "loopback", new_tokens: int = 32,
        prompt_tokens: int = 16, gather_ms: float = 10.0, merge: bool = True, hf: bool = True, dtype: str = "fp32",
        edge_hosts: int = 0, address=None, quiet: bool = False, adapted_layers: str = "all", repeat: int = 3,
        gpus_per_replica: float = 0, layers: int | None = None, trace: bool = False) -> dict:
    """Measure every user count ``repeat`` times, interleaved (limit, HF, ours, paper-style,
    then again), and report each figure as the median with ``_min``/``_max`` beside it;
    ratios come from the medians. ``layers``: decoder layers of the geometry's checkpoint
    (default ``LAYERS``); ``7b`` needs a GPU (``gpus_per_replica`` > 0). ``trace``: each row
    also gets ``ours_timeline``, the replica's stage-loop timeline of each repeat of ours
    (``serving/timeline.py``: compute, thread hand-off and round trip per decode cycle)."""
    import torch

    from privatelora.bench.geometry import GEOMETRIES, geometry_checkpoint
    from privatelora.transport.link import get_profile

    users = sorted(set(users))
    if not users or users[0] < 1:
        raise UsageError("--users must be positive integers")
    if geometry not in GEOMETRIES or (geometry == "7b" and not gpus_per_replica):
        raise UsageError("--geometry must be bench or tiny (7b only with --gpus-per-replica)")
    if edge_hosts < 0:
        raise UsageError("--edge-hosts must be >= 0")
    if new_tokens < 4:
        raise UsageError("--new-tokens must be at least 4 (the rate is measured after the first token)")
    if dtype not in ("fp32", "fp16", "bf16", "int8"):
        raise UsageError("--dtype must be fp32, fp16, bf16 or int8")
    if repeat < 1:
        raise UsageError("--repeat must be >= 1")
    if gpus_per_replica < 0:
        raise UsageError("--gpus-per-replica must be >= 0")
    if layers is not None and (layers < 1 or geometry == "tiny"):
        raise UsageError("--layers must be >= 1, and the tiny geometry has its own")
    layers = layers or LAYERS.get(geometry)
    profile = get_profile(link)
    t_start = time.time()

    def say(msg):
        if not quiet:
            print(f"[throughput {time.time() - t_start:5.1f}s] {msg}", file=sys.stderr, flush=True)

    model = geometry_checkpoint(geometry, **({} if layers is None else {"layers": layers}), quiet=quiet)
    mc = _config(model)
    cfg = PrivateLoRAConfig(rank=RANKS[geometry], adapted_layers=adapted_layers)
    say(f"{geometry} geometry, rank {cfg.rank}, link {profile.name}; starting a local Ray cluster"
        if address in (None, "local") else f"joining {address}")
    join_cluster(address)
    check_gpus(gpus_per_replica)
    pool = Pool(model, cfg, replicas=1, pin_cores=True, gather_s=gather_ms / 1000,   # pins where 2+ cores
                full_model=hf,       # HF's forward needs the whole model; the limit, the cloud's layers
                gpus_per_replica=gpus_per_replica)
    try:
        info = pool.infos[0]
        say(f"backbone replica up ({len(info['layers'])} cloud layers on {info['device']}, cores "
            f"{pool.cloud_cores or 'all'}, its event loop on {pool.io_cores or 'all'}); starting "
            f"{users[-1]} users' devices (cores {pool.edge_cores or 'all'})")
        devices = _Devices(pool, users[-1], edge_hosts, dtype, say)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, mc.vocab_size, (prompt_tokens,), generator=g).tolist() for _ in range(users[-1])]
        devices.decode([p[:4] for p in prompts], 4, 0.0, link)      # warm up: connections, caches
        # a decode step's round trips: one per adapted cloud layer, plus the hand-offs
        link_s = link_step_s(profile, len(info["adapted_layers"]), mc.hidden_size, cfg.rank, cfg.shared_a, dtype) \
            if profile.shaped else None
        rows = [_measure(pool, devices, prompts[:b], new_tokens, prompt_tokens, link, repeat, hf, link_s,
                         gather_s=gather_ms / 1000, merge=merge, say=say, trace=trace) for b in users]
        devices.close()
    finally:
        pool.shutdown()
        ray.shutdown()
    base = rows[0]
    top = rows[-1]
    out = {"geometry": geometry, "link": profile.name, "rank": cfg.rank, "layers": len(info["layers"]),
           "adapted_layers": adapted_layers, "dtype": dtype, "edge_hosts": edge_hosts,
           "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "gather_ms": gather_ms, "merge": merge,
           "repeat": repeat, "statistic": "median of the repeats; _min/_max: their range", "limit": LIMIT,
           "hf_cloud_only": HF_REFERENCE if hf else None,
           "device": info["device"], "gpus_per_replica": gpus_per_replica,
           "cores": {"backbone": pool.cloud_cores, "io": pool.io_cores, "edges": pool.edge_cores}, "results": rows,
           "total_seconds": time.time() - t_start}
    if base["users"] == 1 and top["users"] > 1:
        ideal = top["limit_tok_s"] / base["limit_tok_s"]
        out["summary"] = {"users": top["users"], "ours_over_limit": top["ours_over_limit"],
                          "ours_over_limit_min": top["ours_over_limit_min"],
                          "ours_over_limit_max": top["ours_over_limit_max"],
                          "ideal_gain": ideal, "ours_over_paper_style": top["ours_over_paper_style"],
                          "share_of_ideal_gain": top["ours_over_paper_style"] / ideal if top["ours_over_paper_style"]
                          else None}
        if hf:     # the limit against transformers' own forward, at the same batch
            out["summary"]["limit_over_hf"] = top["limit_tok_s"] / top["hf_cloud_only_tok_s"]
    return out


def _measure(pool: Pool, devices: _Devices, prompts, new_tokens: int, prompt_tokens: int, link: str, repeat: int,
             hf: bool, link_s: float | None, *, gather_s: float, merge: bool, say, trace: bool = False) -> dict:
    """One user count's row: limit, HF, ours, paper-style (and, over a shaped link, i.e.
    ``link_s`` not None, ours on loopback for the model), measured ``repeat`` times in that
    order; medians with min/max."""
    b, replica = len(prompts), pool.replicas[0]
    keys = ["limit_tok_s", "limit_layer_ms", "ours_tok_s", "paper_style_tok_s", "ours_ttft_s", "paper_style_ttft_s",
            "backbone_busy", "paper_style_backbone_busy", "ours_mean_batch", "paper_style_mean_batch"]
    keys += ["hf_cloud_only_tok_s"] if hf else []
    keys += ["ours_loopback_tok_s"] if link_s is not None else []
    samples: dict[str, list[float]] = {k: [] for k in keys}
    over_limit, timelines = [], []
    for i in range(repeat):
        say(f"{b:3d} users, repeat {i + 1}/{repeat}: limit{', hf' if hf else ''}, ours, paper-style")
        lim = ray.get(replica.limit.remote(b, prompt_tokens, new_tokens))
        got = {"limit_tok_s": lim["tok_s"], "limit_layer_ms": lim["layer_s"] * 1000}
        if hf:
            got["hf_cloud_only_tok_s"] = ray.get(replica.limit.remote(b, prompt_tokens, new_tokens, hf=True))["tok_s"]
        ours = _timed(pool, devices, prompts, new_tokens, link, gather_s=gather_s, max_batch=0, merge=merge,
                      trace=trace)
        if trace:
            timelines.append(ours["timeline"])
        paper = _timed(pool, devices, prompts, new_tokens, link, gather_s=0.0, max_batch=1)
        got.update({"ours_tok_s": ours["tok_s"], "paper_style_tok_s": paper["tok_s"], "ours_ttft_s": ours["ttft_s"],
                    "paper_style_ttft_s": paper["ttft_s"], "backbone_busy": ours["busy"],
                    "paper_style_backbone_busy": paper["busy"], "ours_mean_batch": ours["mean_batch"],
                    "paper_style_mean_batch": paper["mean_batch"]})
        if link_s is not None:     # the model: this cohort's loopback step, measured now, plus the link's time
            got["ours_loopback_tok_s"] = _timed(pool, devices, prompts, new_tokens, "loopback", gather_s=gather_s,
                                                max_batch=0, merge=merge)["tok_s"]
        for k in keys:
            samples[k].append(got[k])
        over_limit.append(got["ours_tok_s"] / got["limit_tok_s"])
    row = {"users": b, **spread(samples)}
    row.update({"ours_over_limit": row["ours_tok_s"] / row["limit_tok_s"], "ours_over_limit_min": min(over_limit),
                "ours_over_limit_max": max(over_limit),
                "ours_over_paper_style": row["ours_tok_s"] / row["paper_style_tok_s"]
                if row["paper_style_tok_s"] else None})
    if trace:                  # where ours spends a decode cycle, per repeat (serving/timeline.py)
        row["ours_timeline"] = timelines
    if link_s is not None:
        row.update({"link_s_per_token": link_s, "model_tok_s": predict_tps(b, row["ours_loopback_tok_s"], link_s)})
        row["ours_over_model"] = row["ours_tok_s"] / row["model_tok_s"]
    say(f"{b:3d} users (median of {repeat}): limit {row['limit_tok_s']:6.1f}  ours {row['ours_tok_s']:6.1f} "
        f"[{row['ours_tok_s_min']:.1f}-{row['ours_tok_s_max']:.1f}]  paper-style {row['paper_style_tok_s']:6.1f} "
        f"tok/s; backbone busy {100 * row['backbone_busy']:.0f}% (ours), mean batch {row['ours_mean_batch']:.1f}"
        + (f"; model {row['model_tok_s']:.1f}" if link_s is not None else ""))
    return row


def _config(model: str):
    from transformers import AutoConfig
    if model == "tiny":
        from privatelora.model.loading import load_backbone
        return load_backbone("tiny").config
    return AutoConfig.from_pretrained(model, local_files_only=True)
