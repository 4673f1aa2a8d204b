#!/usr/bin/env bash
# A CPU proxy for MEGABYTE's training spikes (benchmarks/spike-proxy/README.md):
# the `tiny` shape (437K parameters) on the first 2M bytes of enwik8's train split, 800 steps
# of 4 × 256 bytes at lr 2e-3 (warm-up 100, cosine), once per seed and setting. About 20 s a
# run on 2 cores. Like the enwik8 runs on the H200, some seeds' gradient norms spike far
# above the clipping norm (1.0), and the spikes start in the patch embedder. Validation: the
# next 100K bytes of the train split (2.0M to 2.1M).
#
#   scripts/spike-proxy.sh [SETTING...]
#       SETTING: the model and train arguments of one setting, quoted, e.g. "--preset tiny" or
#       "--config configs/tiny-pe1.json" or "--preset tiny --lr 1e-3"; default: those first two.
#       Prints one line per run and a line per setting; appends one JSON line per run to $OUT.
#
# Environment: MEGABYTE (the binary, default megabyte on the PATH), DATA (default data: holds
# enwik8/train.bin, fetched with `megabyte data fetch enwik8` when absent), RUNS (default
# runs/spike-proxy), SEEDS (default "1 2 3 4 5 6"), OUT (default benchmarks/spike-proxy/spike-proxy.jsonl).
set -euo pipefail
mb=${MEGABYTE:-megabyte}
data=${DATA:-data}
runs=${RUNS:-runs/spike-proxy}
out=${OUT:-benchmarks/spike-proxy/spike-proxy.jsonl}
seeds=${SEEDS:-1 2 3 4 5 6}
[ $# -gt 0 ] || set -- "--preset tiny" "--config configs/tiny-pe1.json"
[ -f "$data/enwik8/train.bin" ] || "$mb" data fetch enwik8 --dir "$data"
mkdir -p "$runs"
head -c 2000000 "$data/enwik8/train.bin" > "$runs/train.bin"
head -c 2100000 "$data/enwik8/train.bin" | tail -c 100000 > "$runs/valid.bin" # the validation bytes
commit=$("$mb" --version | sed -n 's/.*(commit \(.*\)).*/\1/p')
: > "$runs/this.jsonl"
for setting in "$@"; do
    read -r -a args <<<"$setting"
    name=$(echo "$setting" | tr -c 'A-Za-z0-9.\n-' '_' | sed 's/^[-_]*//')
    for seed in $seeds; do
        run="$runs/$name-seed$seed"
        rm -rf "$run"
        # --lr 2e-3 and --warmup 100 unless the setting gives its own
        defaults=()
        [[ " $setting " =~ \ --lr[\ =] ]] || defaults+=(--lr 2e-3)
        [[ " $setting " =~ \ --warmup[\ =] ]] || defaults+=(--warmup 100)
        "$mb" train "${args[@]}" "${defaults[@]}" --data "$runs/train.bin" --valid "$runs/valid.bin" --steps 800 \
            --batch-size 4 --eval-every 400 --sample-bytes 0 --checkpoint-every 100000 --seed "$seed" \
            --out "$run" > "$run.log" 2>&1
        python3 - "$run/metrics.jsonl" "$setting" "$seed" "$commit" <<'PY' | tee -a "$out" "$runs/this.jsonl"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "grad_norm" in r and r["step"] > 100]
peak = max(steps, key=lambda r: r["grad_norm"])
parts = peak.get("grad_norms", {})
patch = sum(v * v for k, v in parts.items() if k.startswith("patch_embedder")) ** 0.5
print(json.dumps({"setting": sys.argv[2], "seed": int(sys.argv[3]), "steps_above_5": sum(r["grad_norm"] > 5 for r in steps),
    "max_grad_norm": round(peak["grad_norm"], 2), "max_step": peak["step"], "patch_embedder_at_max": round(patch, 2),
    "valid_bpb": round([r["valid_bpb"] for r in rows if "valid_bpb" in r][-1], 4), "commit": sys.argv[4]}))
PY
    done
done
python3 - "$runs/this.jsonl" "$@" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for setting in sys.argv[2:]:
    mine = [r for r in rows if r["setting"] == setting]
    spiked = [r for r in mine if r["steps_above_5"] > 0]
    patch = [r for r in mine if r["patch_embedder_at_max"] > 5]
    print(f"{setting}: {len(spiked)} of {len(mine)} seeds above 5 after step 100 ({len(patch)} with the patch embedder above 5 "
          f"at the peak), largest {max(r['max_grad_norm'] for r in mine)}, valid bpb mean {statistics.mean(r['valid_bpb'] for r in mine):.4f}")
PY
