#!/usr/bin/env bash
# bf16 against f32: one training run in each precision, identical otherwise (the `enwik8`
# shape, batch 8, lr 1.5e-3 with 20 warm-up steps, the embedded corpus, seed 0), then the
# largest and mean difference of their training losses and their last validation bpb.
#   usage: scripts/precision-agreement.sh [STEPS] [OUT-DIR]
# Environment: MEGABYTE (the binary, default megabyte on the PATH), DEVICE (default cuda),
# PRESET (default enwik8).
set -euo pipefail
mb=${MEGABYTE:-megabyte}
steps=${1:-150}
out=${2:-runs/precision}
for p in bf16 f32; do
    rm -rf "$out/$p"
    "$mb" train --preset "${PRESET:-enwik8}" --device "${DEVICE:-cuda}" --precision "$p" --batch-size 8 --lr 1.5e-3 \
        --warmup 20 --steps "$steps" --eval-every 50 --eval-bytes 65536 --out "$out/$p" >/dev/null
done
python3 - "$out/bf16/metrics.jsonl" "$out/f32/metrics.jsonl" <<'PY'
import json, sys
def load(path):
    rows = [json.loads(l) for l in open(path)]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r["valid_bpb"] for r in rows if "valid_bpb" in r]
(a, va), (b, vb) = load(sys.argv[1]), load(sys.argv[2])
diffs = [abs(a[s] - b[s]) for s in a if s in b]
print(json.dumps({"steps": len(diffs), "max_loss_diff": max(diffs), "mean_loss_diff": sum(diffs) / len(diffs),
                  "final_loss_bf16": a[max(a)], "final_loss_f32": b[max(b)], "valid_bpb_bf16": va[-1], "valid_bpb_f32": vb[-1]}))
PY
