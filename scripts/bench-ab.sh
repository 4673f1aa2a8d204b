#!/usr/bin/env bash
# Two builds of megabyte measured side by side on one machine: the same `megabyte bench` runs,
# alternating between the binaries round by round so that both see the same machine state
# (clocks, temperature, other load). Prints one JSON line per measurement, tagged with the
# binary's label and the round, then the median of each figure per binary and their ratio.
#
#   scripts/bench-ab.sh cpu  OLD NEW [ROUNDS] [OUT.jsonl]
#       `tiny` at batch 4 on the CPU: training bytes/s (100 steps).
#   scripts/bench-ab.sh cpu-peer PYTHON NEW [ROUNDS] [OUT.jsonl]
#       The same `tiny` figure against the PyTorch peer (tools/reference/torch_peer.py, fp32,
#       torch.compile, its AdamW and clipping) in the place of OLD: PYTHON is an interpreter
#       with torch, e.g. .venv-test/bin/python after scripts/test.sh.
#   scripts/bench-ab.sh cuda OLD NEW [ROUNDS] [OUT.jsonl]
#       One GPU, bf16: the `enwik8` preset at batch 24 (training), the enwik8-10min model
#       (configs/enwik8/xp8-g768x4-l512x11-w1024-t1024-z-pe1.json) at batch 64 (training), and
#       `enwik8` generation of 2,048 bytes at batch 1 and 16.
#
# OLD and NEW are paths to `megabyte` binaries (CUDA builds for `cuda`); the commands use only
# flags that both take. ROUNDS defaults to 3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=${1:?usage: see the header of $0} old=${2:?OLD binary} new=${3:?NEW binary}
rounds=${4:-3} out=${5:-/dev/null}
tenmin=configs/enwik8/xp8-g768x4-l512x11-w1024-t1024-z-pe1.json
case "$mode" in
cpu | cpu-peer) benches=("tiny-b4|--preset tiny --batch-size 4 --warmup 3 --steps 100 --gen-bytes 0") ;;
cuda) benches=(
    "enwik8-b24|--preset enwik8 --device cuda --batch-size 24 --warmup 3 --steps 20 --gen-bytes 0"
    "enwik8-10min-b64|--config $tenmin --device cuda --batch-size 64 --warmup 3 --steps 20 --gen-bytes 0"
    "enwik8-gen|--preset enwik8 --device cuda --warmup 0 --steps 0 --gen-bytes 2048 --gen-batch 1,16"
) ;;
*) echo "mode must be cpu, cpu-peer or cuda" >&2; exit 2 ;;
esac
tmp=$(mktemp)
for round in $(seq 1 "$rounds"); do
    for entry in "${benches[@]}"; do
        name=${entry%%|*} args=${entry#*|}
        for label in old new; do
            bin=$old; [ "$label" = new ] && bin=$new
            if [ "$mode" = cpu-peer ] && [ "$label" = old ]; then
                line=$("$bin" tools/reference/torch_peer.py bench --preset tiny --batch-size 4 --device cpu \
                    --warmup 5 --steps 100 --gen-bytes 0 --autocast off)
            else
                # shellcheck disable=SC2086
                line=$("$bin" bench $args --json)
            fi
            if [ "$mode" = cpu-peer ] && [ "$label" = old ]; then
                version="torch_peer.py of $(git rev-parse --short HEAD)"
            else
                version=$("$bin" --version)
            fi
            printf '{"bench": "%s", "binary": "%s", "version": "%s", "date": "%s", "round": %s, "result": %s}\n' \
                "$name" "$label" "$version" "$(date -u +%F)" "$round" "$line" | tee -a "$tmp" >> "$out"
            echo "$name round $round $label done" >&2
        done
    done
done
python3 - "$tmp" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
figures = {}
for r in rows:
    res = r["result"]
    if res.get("train_bytes_per_sec"):
        figures.setdefault((r["bench"] + " training bytes/s", r["binary"]), []).append(res["train_bytes_per_sec"])
    for g in res.get("generation", []):
        figures.setdefault((f'{r["bench"]} B={g["batch"]} bytes/s', r["binary"]), []).append(g["bytes_per_sec"])
print(f'{"figure":<40} {"old (median)":>14} {"new (median)":>14} {"new/old":>8}  runs')
for name in dict.fromkeys(k[0] for k in figures):
    o, n = figures.get((name, "old"), []), figures.get((name, "new"), [])
    if not o or not n:
        continue
    mo, mn = statistics.median(o), statistics.median(n)
    spread = lambda xs: f"{min(xs):.0f}-{max(xs):.0f}"
    print(f'{name:<40} {mo:>14,.0f} {mn:>14,.0f} {mn / mo:>8.3f}  old {spread(o)}, new {spread(n)}')
PY
rm -f "$tmp"
