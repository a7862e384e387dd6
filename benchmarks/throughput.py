"""Throughput on the bench geometry: limit vs ours vs paper-style, on loopback and on the
emulated 5G link, and with the users on one edge host, each user count measured
``--repeat`` times (default 3; medians with min/max). One command (about 20 minutes per
repeat on 2 cores):

    .venv/bin/python benchmarks/throughput.py     # after ./dev setup

Writes benchmarks/results/throughput-{loopback,loopback-host,5g}.{json,png} and prints the JSON.
The figures in the README's Performance section come from this script.
"""

import argparse
import json
import sys
from pathlib import Path

from privatelora.actors.throughput import run
from privatelora.bench.throughput import plot

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="bench", choices=["bench", "tiny"])
    ap.add_argument("--users", default="1,2,4,8,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="runs per user count; figures are their medians")
    ap.add_argument("--out", type=Path, default=OUT, help="where the JSON and plots go")
    runs = {"loopback": dict(link="loopback"), "loopback-host": dict(link="loopback", edge_hosts=1, hf=False),
            "5g": dict(link="5g", hf=False)}
    ap.add_argument("--only", default=",".join(runs), help=f"comma-separated runs among {', '.join(runs)} (default all)")
    args = ap.parse_args()
    users = tuple(int(u) for u in args.users.split(","))
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    if not only or set(only) - set(runs):
        ap.error(f"--only takes runs among {', '.join(runs)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in only:          # each with the replica's stage-loop timeline of ours (--trace)
        r = run(args.geometry, users=users, new_tokens=args.new_tokens, repeat=args.repeat, trace=True, **runs[name])
        (args.out / f"throughput-{name}.json").write_text(json.dumps(r, indent=1))
        plot(r, str(args.out / f"throughput-{name}.png"))
        print(json.dumps(r), flush=True)
    return None


if __name__ == "__main__":
    sys.exit(main())
