"""Latency with fewer round trips per token: adapter placements and speculative decoding over
the emulated 5G link, on the shipped tiny model (1 and 4 users) and on the bench geometry
(1 user), next to device-only; and the personalization gain each placement keeps. One
command (about 25 minutes on 2 cores; run it alone, timings suffer from other load):

    .venv/bin/python benchmarks/latency.py     # after ./dev setup

Writes benchmarks/results/latency-5g-{tiny,bench}.json and tuning-placements.json and prints
the JSON. The figures in the README's Latency section come from this script.
"""

import argparse
import json
import sys
from pathlib import Path

from privatelora.bench.latency import run
from privatelora.bench.tuning import bench_tuning

OUT = Path(__file__).parent / "results"
# the same parameter budget as all 4 layers at rank 24 (6,912 parameters of M), or less
PLACEMENTS = [("last:1", 48), ("last:2", 33), ("every:2", 33), ("last:1", 24)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help="where the JSON goes")
    ap.add_argument("--skip-tuning", action="store_true", help="only the latency runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for geometry, users in (("tiny", 4), ("bench", 1)):
        r = run(geometry, "5g", users=users)
        (args.out / f"latency-5g-{geometry}.json").write_text(json.dumps(r, indent=1))
        print(json.dumps(r), flush=True)
    if not args.skip_tuning:
        r = bench_tuning(methods=("untuned", "lora", "privatelora"), placements=PLACEMENTS)
        (args.out / "tuning-placements.json").write_text(json.dumps(r, indent=1))
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    sys.exit(main())
