#!/usr/bin/env bash
# GPU time per kernel of one megabyte command, by Nsight Compute (ncu), summed by kernel name
# and divided by N (the steps or bytes the command ran); kernels inside CUDA graphs (the
# decoding engine) count one by one. Runs on the GPU host after
# `source scripts/gpu-env.sh`.
#   usage: scripts/profile-kernels.sh N MEGABYTE-ARGS...
#   e.g.   scripts/profile-kernels.sh 1 bench --preset enwik8 --device cuda --batch-size 24 --warmup 0 --steps 1 --gen-bytes 0
set -euo pipefail
div=$1
shift
csv=/tmp/ncu-$$.csv
ncu --graph-profiling node --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$csv" /tmp/mb/megabyte "$@" >/dev/null
python3 - "$csv" "$div" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; rows = rows[1:]
name_i, val_i, unit_i = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
scale = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}
tot = collections.Counter(); cnt = collections.Counter()
for r in rows:
    n = r[name_i].split("(")[0][:60]
    tot[n] += float(r[val_i].replace(",", "")) * scale[r[unit_i]]
    cnt[n] += 1
div = float(sys.argv[2]); all_ms = sum(tot.values())
print(f"kernels: {sum(cnt.values())}, GPU time {all_ms:.1f} ms; per 1/{div:g}: {all_ms/div:.3f} ms, {sum(cnt.values())/div:.1f} launches")
for n, v in tot.most_common(25):
    print(f"{v/div:9.3f} ms {100*v/all_ms:5.1f}% {cnt[n]/div:8.1f}x  {n}")
PY
