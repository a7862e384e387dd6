"""Soak: many users with churn for a long time on the shipped tiny model, one replica
SIGKILLed halfway. Reports, per window, inter-token latency (p50/p99), tokens and
sessions; the replicas' and the devices' memory (RSS) over the run; and sessions lost
(a generation that ended in an error, which must never happen). Sessions that had to be
resumed are checked afterwards against the monolithic model, token for token.

    .venv/bin/python benchmarks/soak.py                  # 30 minutes, 16 users (not in CI)
    .venv/bin/python benchmarks/soak.py --minutes 2 --window-min 0.5     # a quick look

A local Ray cluster runs `Pool` (2 replicas and the router, whose front door the
devices use, as outside devices do with `serve`); the devices run in this process, each
with its own private adapter. A watch thread calls `Pool.heal` every second, as `serve`
does. Run it alone: timings suffer from other load. Writes benchmarks/results/soak.json.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"
PROMPTS = ["ROMEO:\nBut soft, what light", "KING:\nNow is the winter of our", "HAMLET:\nTo be, or not",
           "MACBETH:\nTomorrow, and tomorrow", "PORTIA:\nThe quality of mercy", "LEAR:\nBlow, winds, and crack",
           "PROSPERO:\nOur revels now are ended", "JULIET:\nO Romeo, Romeo", "OTHELLO:\nIt is the cause",
           "CLEOPATRA:\nGive me my robe", "BRUTUS:\nThere is a tide", "ANTONY:\nFriends, Romans"]


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--window-min", type=float, default=5.0, help="length of a reporting window")
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of the run at which a replica is killed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT / "soak.json")
    args = ap.parse_args()

    import torch
    import privatelora.actors  # noqa: F401  (Ray's auth mode)
    import ray
    from privatelora.actors.pool import Pool
    from privatelora.config import PrivateLoRAConfig
    from privatelora.model import reference
    from privatelora.model.adapters import PrivateAdapter
    from privatelora.model.loading import load_backbone
    from privatelora.model.sampling import SamplingParams
    from privatelora.placement.cluster import connect
    from privatelora.runtime.device import DevicePart
    from privatelora.serving.remote import AddressConnector, Resume, run_remote

    torch.set_num_threads(1)
    cfg = PrivateLoRAConfig()
    bb = load_backbone("tiny")
    eos = bb.tokenizer.eos_token_id
    adapters = [PrivateAdapter(cfg, bb.n_layers, bb.fingerprint).randomize_(9000 + u, scale=0.3)
                for u in range(args.users)]
    devices = [DevicePart(bb, cfg, a) for a in adapters]
    prompts = [bb.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]

    def say(msg):
        print(f"[soak {time.time() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)
    t_start = time.time()
    connect(None)
    pool = Pool("tiny", cfg, replicas=args.replicas, idle_timeout_s=60.0)
    door = pool.listen()
    say(f"{args.replicas} replicas up, front door on {door['host']}:{door['port']}; {args.users} users for "
        f"{args.minutes:g} min")

    stop_watch = threading.Event()
    events: list[dict] = []

    def watch():                        # what `serve` does every second
        while not stop_watch.wait(1.0):
            try:
                for i in pool.heal():
                    events.append({"event": "restarted", "replica": i, "t": time.time() - t0})
                    say(f"replica {i} restarted")
            except Exception as e:
                events.append({"event": "watch_failed", "error": repr(e)[:200], "t": time.time() - t0})
    threading.Thread(target=watch, daemon=True).start()

    duration = args.minutes * 60
    window = args.window_min * 60
    n_windows = max(1, int(round(duration / window)))
    itl: list[list[float]] = [[] for _ in range(n_windows)]
    tokens = [0] * n_windows
    started = [0] * n_windows
    sessions: list[dict] = []
    rss: list[dict] = []
    t0 = time.time()

    async def user(u: int):
        urng = random.Random(args.seed * 1000 + u)
        conn = AddressConnector(door["host"], door["port"], timeout=30)
        k = 0
        await asyncio.sleep(urng.uniform(0, 2))
        while time.time() - t0 < duration:
            k += 1
            prompt = prompts[urng.randrange(len(prompts))]
            params = SamplingParams(max_new_tokens=urng.randint(16, 96), temperature=0.8 if urng.random() < 0.5 else 0.0,
                                    top_p=0.95, seed=urng.randrange(1 << 30), stop_ids=(eos,))
            w = min(n_windows - 1, int((time.time() - t0) / window))
            started[w] += 1
            last = [time.time()]
            first = [True]

            def on_tokens(n, last=last, first=first):
                now = time.time()
                wi = min(n_windows - 1, int((now - t0) / window))
                if not first[0]:
                    itl[wi].append(now - last[0])
                first[0] = False
                last[0] = now
                tokens[wi] += 1
            rec = {"user": u, "k": k, "prompt": prompt, "params": params, "t": time.time() - t0}
            try:
                gen = await run_remote(conn, devices[u], prompt, params, timeout=30, on_tokens=on_tokens,
                                       resume=Resume(attempts=12))
                rec.update(tokens=gen.tokens, error=gen.error.code if gen.error else None, resumes=gen.resumes,
                           recoveries=gen.recoveries)
            except Exception as e:       # a session lost for good
                rec.update(tokens=None, error=f"{type(e).__name__}: {e}"[:300], resumes=None, recoveries=[])
            sessions.append(rec)
            if k % 5 == 0:               # churn connections too: a device that went away and came back
                await conn.close()
                conn = AddressConnector(door["host"], door["port"], timeout=30)
            await asyncio.sleep(urng.uniform(0.1, 1.5))
        await conn.close()

    async def monitor():
        killed = False
        next_sample, next_say = 0.0, 60.0
        while time.time() - t0 < duration + 5:
            el = time.time() - t0
            if el >= next_sample:
                rss.append({"t": el, "device_process": rss_mb(os.getpid()),
                            "replicas": {str(i): rss_mb(info["pid"]) for i, info in pool.infos.items()},
                            "pids": {str(i): info["pid"] for i, info in pool.infos.items()}})
                next_sample += 30.0
            if not killed and el >= args.kill_at * duration:
                load = ray.get(pool.router.snapshot.remote())["load"]
                victim = max(load, key=lambda r: load[r])
                pid = pool.infos[victim]["pid"]
                os.kill(pid, signal.SIGKILL)
                events.append({"event": "killed", "replica": victim, "pid": pid, "sessions": load[victim], "t": el})
                say(f"SIGKILLed replica {victim} (pid {pid}) holding {load[victim]} sessions")
                killed = True
            if el >= next_say:
                say(f"{sum(tokens)} tokens, {len(sessions)} sessions done")
                next_say += 60.0
            await asyncio.sleep(1.0)

    async def run_all():
        await asyncio.gather(monitor(), *(user(u) for u in range(args.users)))
    asyncio.run(run_all())
    stop_watch.set()
    wall = time.time() - t0

    lost = [s for s in sessions if s["error"] is not None]
    resumed = [s for s in sessions if s["resumes"]]
    say(f"checking {len(resumed)} resumed sessions against the monolithic model")
    merged = {}
    mismatched = 0
    for s in resumed:
        if s["user"] not in merged:
            merged[s["user"]] = reference.merged_model(bb, adapters[s["user"]])
        want, _ = reference.generate(merged[s["user"]], s["prompt"], s["params"])
        mismatched += want != s["tokens"]
    stats = pool.stats()
    pool.shutdown()
    ray.shutdown()

    windows = []
    for w in range(n_windows):
        end_t = (w + 1) * window
        snap = [r for r in rss if r["t"] <= end_t]
        windows.append({"window": w, "minutes": [round(w * window / 60, 2), round(min(end_t, wall) / 60, 2)],
                        "sessions_started": started[w], "tokens": tokens[w],
                        "itl_p50_ms": round(1000 * statistics.median(itl[w]), 2) if itl[w] else None,
                        "itl_p99_ms": round(1000 * pct(itl[w], 0.99), 2) if itl[w] else None,
                        "rss_mb": snap[-1] if snap else None})
    first, last = rss[0], rss[-1]
    growth = {"device_process": round(last["device_process"] - first["device_process"], 1)}
    for i, pid in last["pids"].items():      # replicas that lived the whole run (the killed one restarted)
        if first["pids"].get(i) == pid and first["replicas"].get(i) and last["replicas"].get(i):
            growth[f"replica_{i}"] = round(last["replicas"][i] - first["replicas"][i], 1)
    rec_all = [r for s in sessions for r in s["recoveries"]]
    out = {"config": {"minutes": args.minutes, "users": args.users, "replicas": args.replicas, "model": "tiny",
                      "window_min": args.window_min, "kill_at": args.kill_at, "seed": args.seed},
           "wall_s": round(wall, 1), "sessions": len(sessions), "sessions_lost": len(lost),
           "lost": [{k: v for k, v in s.items() if k in ("user", "k", "error")} for s in lost][:20],
           "sessions_resumed": len(resumed), "resumed_mismatched": mismatched,
           "resumed": [{"user": s["user"], "k": s["k"], "resumes": s["resumes"], "started_s": round(s["t"], 2),
                        "recovery_s": [round(r, 3) for r in s["recoveries"]]} for s in resumed],
           "recovery_s": {"n": len(rec_all), "p50": round(statistics.median(rec_all), 3) if rec_all else None,
                          "max": round(max(rec_all), 3) if rec_all else None},
           "tokens": sum(tokens), "itl_p50_ms_all": round(1000 * statistics.median([x for w in itl for x in w]), 2),
           "rss_growth_mb": growth, "rss_first": first, "rss_last": last, "windows": windows, "events": events,
           "replica_stats": [{k: s.get(k) for k in ("replica", "stages", "closed_sessions", "errors", "faults",
                                                    "refusals", "disconnects")} for s in stats]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    print(f"{'window':>8} {'minutes':>13} {'sessions':>9} {'tokens':>8} {'ITL p50':>9} {'ITL p99':>9}", file=sys.stderr)
    for w in windows:
        print(f"{w['window']:>8} {w['minutes'][0]:>6.1f}-{w['minutes'][1]:<6.1f} {w['sessions_started']:>9} "
              f"{w['tokens']:>8} {w['itl_p50_ms'] or 0:>8.1f}ms {w['itl_p99_ms'] or 0:>8.1f}ms", file=sys.stderr)
    print(f"sessions {len(sessions)}, lost {len(lost)}, resumed {len(resumed)} ({mismatched} not token-identical); "
          f"RSS growth MB {growth}", file=sys.stderr)


if __name__ == "__main__":
    main()
