"""Throughput on the bench geometry: limit vs ours vs paper-style, on loopback and on the
emulated 5G link, and with the users on one edge host. One command (about 20 minutes on
2 cores):

    .venv/bin/python benchmarks/throughput.py     # after ./dev setup

Writes benchmarks/results/throughput-{loopback,loopback-host,5g}.{json,png} and prints the JSON.
The figures in the README's Performance section come from this script.
"""

import json
import sys
from pathlib import Path

from privatelora.actors.throughput import run
from privatelora.throughput import plot

OUT = Path(__file__).parent / "results"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    runs = {"loopback": dict(link="loopback"), "loopback-host": dict(link="loopback", edge_hosts=1, hf=False),
            "5g": dict(link="5g", hf=False)}
    for name, kw in runs.items():
        r = run("bench", users=(1, 2, 4, 8, 16), new_tokens=32, **kw)
        (OUT / f"throughput-{name}.json").write_text(json.dumps(r, indent=1))
        plot(r, str(OUT / f"throughput-{name}.png"))
        print(json.dumps(r), flush=True)
    return None


if __name__ == "__main__":
    sys.exit(main())
