#!/usr/bin/env bash
# CPU figures for BENCHMARKS.md: training and generation bytes/s of the `tiny` preset (the
# shape of the PyTorch CPU peer: T = 256, P = 8, global 2 × 128, local 2 × 32, batch 4), three
# runs each, then the README quick start with its wall time and final bpb.
# Appends every record to benchmarks/cpu/cpu.jsonl.  Usage: scripts/bench-cpu.sh [--no-quickstart]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
bin=target/release/megabyte
out=benchmarks/cpu/cpu.jsonl
commit=$(git rev-parse --short HEAD)
echo "commit $commit, $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for i in 1 2 3; do
    $bin bench --preset tiny --batch-size 4 --steps 100 --gen-bytes 2048 --json \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r['commit']='$commit'; print(json.dumps(r))" \
        | tee -a "$out" \
        | python3 -c "import json,sys; r=json.load(sys.stdin); print('train %.0f B/s (%.1f ms/step)  generate %.0f B/s' % (r['train_bytes_per_sec'], r['train_step_ms'], r['generation'][0]['bytes_per_sec']))"
done
if [ "${1:-}" != "--no-quickstart" ]; then
    rm -rf runs/quickstart
    start=$(date +%s.%N)
    cargo run --release -q -- train --time 2 --out runs/quickstart | tee /tmp/megabyte-quickstart.log
    end=$(date +%s.%N)
    python3 - "$start" "$end" "$commit" >> "$out" <<'PY'
import json, sys
start, end, commit = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
rows = [json.loads(l) for l in open("runs/quickstart/metrics.jsonl")]
valid = [r for r in rows if "valid_bpb" in r]
print(json.dumps({"quickstart": True, "commit": commit, "wall_secs": round(end - start, 1),
                  "valid_bpb_before": valid[0]["valid_bpb"], "valid_bpb_after": valid[-1]["valid_bpb"],
                  "steps": valid[-1]["step"]}))
PY
    tail -1 "$out"
fi
