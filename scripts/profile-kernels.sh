#!/usr/bin/env bash
# Per-kernel GPU time of training steps, by Nsight Compute (ncu), summed by kernel name.
# Runs on the CUDA machine after `source scripts/device-env.sh`.
#   usage: scripts/profile-kernels.sh PRESET BATCH [STEPS]
set -euo pipefail
preset=$1 batch=$2 steps=${3:-1}
csv=/tmp/ncu-$preset-$batch.csv
ncu --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$csv" \
    /tmp/mb/megabyte bench --preset "$preset" --device cuda --batch-size "$batch" --warmup 0 --steps "$steps" --gen-bytes 0 >/dev/null
python3 - "$csv" "$steps" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; rows = rows[1:]
name_i, val_i, unit_i = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
tot = collections.Counter(); cnt = collections.Counter()
for r in rows:
    v = float(r[val_i].replace(",", ""))
    v *= {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}[r[unit_i]]
    n = r[name_i].split("(")[0][:60]
    tot[n] += v; cnt[n] += 1
steps = int(sys.argv[2]); all_ms = sum(tot.values())
print(f"kernels: {sum(cnt.values())}, GPU time {all_ms:.1f} ms over {steps} step(s)")
for n, v in tot.most_common(30):
    print(f"{v/steps:9.2f} ms {100*v/all_ms:5.1f}% {cnt[n]//steps:6d}x  {n}")
PY
