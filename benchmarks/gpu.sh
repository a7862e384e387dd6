#!/usr/bin/env bash
# bench throughput on a GPU machine, in one go (under 8 minutes on one recent GPU):
#   bench geometry (16 layers), loopback (one edge actor per user, and all users on one
#   edge host) and an emulated 5G round trip;
#   7B-shaped geometry (Llama-2-7B's widths, 8 layers), loopback and 5G;
# each with the backbone replica on one GPU (--gpus-per-replica 1), medians of --repeat runs,
# and the replica's stage-loop timeline of every run of ours (--trace).
# Writes one JSON per run and index.json (what ran, how long, where) to
# benchmarks/results/gpu/ (or --out DIR, or $PRIVATELORA_GPU_OUT) and prints the index.
#
#   bash benchmarks/gpu.sh             # on the GPU machine, after ./dev setup (run here if .venv is missing)
#   bash benchmarks/gpu.sh --dry-run   # anywhere: print the commands, run a tiny CPU smoke instead
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${PRIVATELORA_GPU_OUT:-benchmarks/results/gpu}
DRY=0
BUDGET_S=${PRIVATELORA_GPU_BUDGET_S:-470}      # the whole script stays under 8 minutes
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT=${2:?--out needs a directory}; shift ;;
        -h|--help) sed -n 2,12p "$0"; exit 0 ;;
        *) echo "gpu.sh: error: unknown argument $1 (--dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
[ -x .venv/bin/privatelora ] || ./dev setup
PY=.venv/bin/python
BENCH=(.venv/bin/privatelora bench throughput --json --trace)

# name | arguments (every GPU run: --gpus-per-replica 1)
RUNS=(
    "bench-loopback|--geometry bench --link loopback --users 1,2,4,8,16 --new-tokens 32 --repeat 3"
    "bench-loopback-host|--geometry bench --link loopback --users 1,16 --edge-hosts 1 --new-tokens 32 --repeat 3 --no-hf"
    "bench-5g|--geometry bench --link 5g --users 1,16 --new-tokens 16 --repeat 3 --no-hf"
    "7b-loopback|--geometry 7b --layers 8 --link loopback --users 1,4,16 --new-tokens 16 --repeat 3"
    "7b-5g|--geometry 7b --layers 8 --link 5g --users 1,16 --new-tokens 16 --repeat 2 --no-hf"
)
SMOKE="smoke-tiny-cpu|--geometry tiny --link loopback --users 1,2 --new-tokens 4 --repeat 1 --no-hf"

mkdir -p "$OUT"
if [ "$DRY" = 1 ]; then
    for r in "${RUNS[@]}"; do
        echo "would run: ${BENCH[*]} ${r#*|} --gpus-per-replica 1 > $OUT/${r%%|*}.json"
    done
    RUNS=("$SMOKE")
    GPUS=()
else
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu.sh: error: torch sees no CUDA device (a CUDA build of torch and a GPU are needed; --dry-run" \
             "runs anywhere)" >&2
        exit 2
    fi
    GPUS=(--gpus-per-replica 1)
fi

start=$(date +%s)
status="$OUT/.status"
: > "$status"
for r in "${RUNS[@]}"; do
    name=${r%%|*}
    read -ra args <<< "${r#*|}"
    left=$((BUDGET_S - ($(date +%s) - start)))
    if [ "$left" -le 10 ]; then
        echo "$name skipped 0" >> "$status"
        echo "[gpu.sh] $name: skipped, the time budget is spent" >&2
        continue
    fi
    echo "[gpu.sh] $name: ${BENCH[*]} ${args[*]} ${GPUS[*]} (at most ${left}s)" >&2
    t0=$(date +%s)
    if timeout "$left" "${BENCH[@]}" "${args[@]}" "${GPUS[@]}" > "$OUT/$name.json.part"; then
        mv "$OUT/$name.json.part" "$OUT/$name.json"
        echo "$name ok $(($(date +%s) - t0))" >> "$status"
    else
        rm -f "$OUT/$name.json.part"
        echo "$name failed $(($(date +%s) - t0))" >> "$status"
        echo "[gpu.sh] $name failed" >&2
    fi
done

"$PY" - "$OUT" "$DRY" <<'EOF'
import json, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
runs = {}
for line in (out / ".status").read_text().split("\n"):
    if line.strip():
        name, state, seconds = line.split()
        run = {"status": state, "seconds": int(seconds)}
        if state == "ok":
            r = json.loads((out / f"{name}.json").read_text())
            run.update(file=f"{name}.json", device=r["device"], summary=r.get("summary"))
        runs[name] = run
(out / ".status").unlink()
index = {"dry_run": dry, "out": str(out), "runs": runs}
(out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
print(json.dumps(index))
sys.exit(0 if all(r["status"] == "ok" for r in runs.values()) else 1)
EOF
