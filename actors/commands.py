"""The Ray-side CLI commands: ``serve`` and the Ray ``demo``. Imported only by them."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import privatelora.actors  # noqa: F401  (Ray's auth mode, before Ray is imported)
import ray

from privatelora.cli.common import endpoint_bounds, kv_cache_kw
from privatelora.config import PrivateLoRAConfig, UsageError
from privatelora.placement import CLOUD
from privatelora.placement.cluster import connect

from privatelora.actors.pool import Pool


def join_cluster(address, dashboard: bool = False):
    """Join or start the Ray cluster; a clear usage error if it cannot serve (no cloud resource).
    ``dashboard``: a cluster started here runs Ray's dashboard, which writes the Prometheus
    discovery file of Ray's metrics agents (``prom_metrics_service_discovery.json``)."""
    try:
        connect(address, dashboard=dashboard)
    except ConnectionError as e:
        raise UsageError(f"cannot reach the Ray cluster at {address!r}: {e}")
    cloud = ray.cluster_resources().get(CLOUD, 0)
    if cloud < 1:
        raise UsageError(f"no node of this Ray cluster has the {CLOUD!r} resource; start the cloud nodes with "
                         f"ray start ... --resources '{{\"{CLOUD}\": 8}}'")


def check_gpus(per_replica: float) -> None:
    """A clear usage error, after leaving the cluster, when the joined cluster cannot give
    one replica ``per_replica`` GPUs (Ray would otherwise wait for a placement group that
    never fits)."""
    have = ray.cluster_resources().get("GPU", 0)
    if per_replica > have:
        ray.shutdown()
        raise UsageError(f"--gpus-per-replica {per_replica:g}: the Ray cluster has {have:g} GPUs")


def _ray_discovery_file() -> str:
    """Where Ray's head writes the Prometheus file_sd list of its metrics agents."""
    try:
        from ray._private.worker import _global_node
        return os.path.join(_global_node.get_session_dir_path(), "prom_metrics_service_discovery.json")
    except Exception:             # a private API: say where it is by default instead
        return "/tmp/ray/prom_metrics_service_discovery.json (Ray's temp dir, on the head node)"


def _replica_line(i: dict) -> dict:
    return {k: v for k, v in i.items() if k != "cert_pem"} | {"tls": bool(i["cert_pem"])}


def scaling(args):
    """(replicas to start, ``AutoscalePolicy`` or None) from the serve flags."""
    from privatelora.serving.autoscale import AutoscalePolicy
    lo = args.min_replicas or args.replicas or 1
    hi = args.max_replicas or max(lo, args.replicas or lo)
    start = args.replicas or lo
    if not 1 <= lo <= start <= hi:
        raise UsageError(f"need 1 <= --min-replicas ({lo}) <= --replicas ({start}) <= --max-replicas ({hi})")
    if hi == lo:
        return start, None
    try:
        return start, AutoscalePolicy(min_replicas=lo, max_replicas=hi, up_sessions=args.scale_up_sessions,
                                      up_queue_s=args.scale_up_queue_ms / 1000,
                                      down_sessions=args.scale_down_sessions, down_after_s=args.scale_down_after)
    except ValueError as e:
        raise UsageError(str(e))


def serve(args, cfg: PrivateLoRAConfig, out=None) -> dict:
    """Run the pool until SIGINT/SIGTERM; with ``--json``, events go to ``out`` as JSON lines."""
    out = out or sys.stdout
    from privatelora.serving.autoscale import Autoscaler
    from privatelora.serving.metrics import DEFAULT_PORT, MetricsPortError
    metrics = not getattr(args, "no_metrics", False)       # on unless --no-metrics
    metrics_port = getattr(args, "metrics_port", DEFAULT_PORT) if metrics else None
    sd_file = getattr(args, "metrics_sd_file", None)
    if sd_file and not metrics:
        raise UsageError("--metrics-sd-file lists /metrics targets: it does not go with --no-metrics")
    replicas, policy = scaling(args)
    gpus = getattr(args, "gpus_per_replica", 0)
    if gpus < 0:       # the parser refuses it; callers building args may not
        raise UsageError(f"--gpus-per-replica must be >= 0, not {gpus}")
    join_cluster(args.address, dashboard=metrics)
    check_gpus(gpus)
    started = time.time()
    bounds = endpoint_bounds(args)
    try:
        pool = Pool(args.model, cfg, replicas=replicas, max_sessions=args.max_sessions, port=args.replica_port,
                    idle_timeout_s=args.idle_timeout, gather_s=args.gather_ms / 1000, metrics_port=metrics_port,
                    ray_metrics=metrics, endpoint_options=bounds,
                    gpus_per_replica=gpus, **kv_cache_kw(args))
    except Exception as e:        # a replica could not start: one line when it is a metrics port
        cause = getattr(e, "cause", None)
        if isinstance(cause, MetricsPortError):
            ray.shutdown()
            raise UsageError(f"{cause.strerror} (serve: replica i serves /metrics on --metrics-port + i)") from None
        raise
    door = pool.listen(args.host, args.port)
    if door["cert_pem"] and args.door_cert_out:
        with open(args.door_cert_out, "w") as f:
            f.write(door["cert_pem"])

    def write_targets():
        if sd_file:     # Prometheus file_sd: one target per replica, labelled replica="i"
            from privatelora.serving.metrics import write_sd_file
            write_sd_file(sd_file, [(*i["metrics"], i["replica"]) for i in pool.infos.values()])
    write_targets()
    ready = {"event": "serving", "front_door": {"host": door["host"], "port": door["port"], "tls": bool(door["cert_pem"])},
             "replicas": [_replica_line(i) for i in pool.infos.values()],
             "autoscale": policy.to_dict() if policy else None, "seconds_to_ready": time.time() - started}

    stop = threading.Event()           # before the ready line: a stop sent right after it is a clean stop
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def emit(event: dict, text: str):
        print(json.dumps(event) if args.json else f"[serve] {text}", file=out if args.json else sys.stderr,
              flush=True)
    if args.json:
        print(json.dumps(ready), file=out, flush=True)
    else:
        for i in pool.infos.values():
            print(f"[serve] replica {i['replica']} ({i['device']}, layers {i['layers'][0]}-{i['layers'][-1]}) on "
                  f"{i['host']}:{i['port']}{' (TLS)' if i['cert_pem'] else ''}", file=sys.stderr, flush=True)
            if i["metrics"]:
                print(f"[serve] replica {i['replica']} metrics on http://{i['metrics'][0]}:{i['metrics'][1]}/metrics",
                      file=sys.stderr, flush=True)
        if metrics:
            print(f"[serve] metrics also through Ray's metrics agent (ray_privatelora_*); Prometheus finds it in "
                  f"{_ray_discovery_file()}", file=sys.stderr, flush=True)
        tls = " (TLS" + (f", certificate in {args.door_cert_out})" if args.door_cert_out else ")") if door["cert_pem"] else ""
        print(f"[serve] front door on {door['host']}:{door['port']}{tls}: privatelora edge --connect "
              f"{door['host']}:{door['port']} ...", file=sys.stderr, flush=True)
        if policy:
            print(f"[serve] autoscaling between {policy.min_replicas} and {policy.max_replicas} replicas",
                  file=sys.stderr, flush=True)
        print("[serve] Ctrl-C stops", file=sys.stderr, flush=True)
    scaler = Autoscaler(policy) if policy else None
    while not stop.wait(1.0):          # watch: restart what stopped serving, then scale
        try:
            for i in pool.heal():
                info = pool.infos.get(i)
                where = [info["host"], info["port"]] if info else None
                emit({"event": "restarted", "replica": i, "address": where},
                     f"replica {i} stopped serving: restarted on {where[0]}:{where[1]}" if where
                     else f"replica {i} could not be restarted: replaced by a new replica")
                write_targets()
            if scaler is not None:
                d = pool.autoscale(scaler, grace_s=args.drain_grace)
                if d["action"] != "hold":
                    emit({"event": "scaled", **{k: v for k, v in d.items() if k != "at"}},
                         f"scaled {d['action']} to {d['replicas_after']} replicas (replica {d['replica']}): {d['reason']}")
                    write_targets()
        except Exception as e:       # the watch must outlive a failed step: log it, try again
            emit({"event": "watch_failed", "error": f"{type(e).__name__}: {e}"[:300]},
                 f"watch step failed: {type(e).__name__}: {e}")
    stats = pool.stats()
    if sd_file:
        from privatelora.serving.metrics import write_sd_file
        write_sd_file(sd_file, [])     # a clean stop leaves no target to scrape
    pool.shutdown()
    ray.shutdown()
    return {"event": "stopped", "replicas": [{k: v for k, v in s.items() if k != "bytes"} for s in stats]}


def demo(users: int = 4, max_new_tokens: int = 48, model: str = "tiny", rank: int = 16, address=None,
         quiet: bool = False, adapted_layers: str = "all", draft: str | None = None, draft_tokens: int = 4) -> dict:
    from privatelora.runtime.accounting import naive_numbers_per_token_per_layer
    from privatelora.runtime.demo import PROMPTS, print_users
    from privatelora.model.loading import load_backbone

    if users < 1:
        raise UsageError("--users must be at least 1")
    t_start = time.time()

    def say(msg):
        if not quiet:
            print(f"[demo {time.time() - t_start:5.1f}s] {msg}", file=sys.stderr, flush=True)
    say("starting a local Ray cluster with cloud and edge resources" if address in (None, "local")
        else f"joining the Ray cluster at {address}")
    join_cluster(address)
    cfg = PrivateLoRAConfig(rank=rank, adapted_layers=adapted_layers)
    backbone = load_backbone(model)
    cfg.adapted(backbone.n_layers)                     # a placement this model cannot take fails before Ray work
    pool = Pool(model, cfg, replicas=1, pin_cores=True)
    replica = pool.infos[0]
    say(f"backbone replica up on {replica['host']}:{replica['port']}; starting {users} edge actors")
    edges = [pool.edge(u, adapter_seed=1000 + u) for u in range(users)]
    ray.get([e.node_id.remote() for e in edges])
    say("edge actors up (each holds its user's private adapter); generating")
    before = pool.stats()[0]
    t0 = time.time()
    futures = []
    for u, e in enumerate(edges):
        sampled = u % 2 == 1
        futures.append(e.generate.remote(PROMPTS[u % len(PROMPTS)], max_new_tokens=max_new_tokens,
                                         temperature=0.8 if sampled else 0.0, top_p=0.95, seed=u,
                                         draft=draft, draft_tokens=draft_tokens))
        time.sleep(0.05)                     # users join at different times
    results = ray.get(futures)
    wall = time.time() - t0
    after = pool.stats()[0]
    pool.shutdown()
    ray.shutdown()
    mc = backbone.config
    layers = len(replica["adapted_layers"])    # the naive split adapts the same layers
    tokens = sum(len(r["tokens"]) for r in results)
    cloud_tokens = sum(r["cloud_tokens"] for r in results)
    act = sum(r["activation_bytes"] for r in results)
    frames = sum(r["activation_frames"] for r in results)
    naive_layer = naive_numbers_per_token_per_layer(mc, cfg.targets) * 4       # fp32, no framing
    crossed = sum(r["bytes_to_cloud"] + r["bytes_to_device"] for r in results)
    naive_all = cloud_tokens * (naive_layer * layers + 2 * mc.hidden_size * 4)  # + the same hand-offs
    stages = after["stages"] - before["stages"]
    out = {
        "mode": "ray", "users": [{"user": r["user"], "prompt": PROMPTS[r["user"] % len(PROMPTS)], "text": r["text"],
                                  "tokens": len(r["tokens"]), "sampled": r["user"] % 2 == 1,
                                  "round_trips": r["round_trips"],
                                  **({"draft": r["draft"]} if "draft" in r else {})} for r in results],
        "tokens": tokens, "round_trips": sum(r["round_trips"] for r in results), "seconds": wall,
        "tokens_per_s": tokens / wall,
        "mean_batch_size": (after["stage_sessions"] - before["stage_sessions"]) / stages if stages else 0.0,
        "bytes_crossed": crossed, "naive_bytes": naive_all,
        "bytes_per_token_per_layer": act / frames if frames else 0.0,
        "naive_bytes_per_token_per_layer": naive_layer,
        "reduction": 1 - (act / frames) / naive_layer if frames else 0.0,
        "reduction_including_handoffs": 1 - crossed / naive_all,
        "total_seconds": time.time() - t_start,
    }
    if not quiet:
        print_users(out["users"])
        print(f"--- {tokens} tokens from {users} users in {wall:.1f}s: {out['tokens_per_s']:.1f} tok/s aggregate; "
              f"mean stage batch {out['mean_batch_size']:.2f} sessions; {out['bytes_per_token_per_layer']:.0f} B per "
              f"token per layer on the wire vs {naive_layer} B for a naive split ({100 * out['reduction']:.1f}% less; "
              f"{100 * out['reduction_including_handoffs']:.1f}% less counting the embedding hand-offs)")
    return out
