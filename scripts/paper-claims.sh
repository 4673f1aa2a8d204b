#!/usr/bin/env bash
# The paper-claims measurements (RESULTS.md), one subcommand per claim, on a CUDA machine.
# Every run appends JSON lines to $OUT (default runs/claims/results.jsonl) with its command.
#
#   scripts/paper-claims.sh equal-time MINUTES MODEL [MODEL...] [-- TRAIN-ARGS...]
#       Trains each model from scratch on enwik8 for MINUTES of wall time (validation
#       included), then scores the enwik8 test split (last 5M bytes) four ways: basic,
#       sliding (stride T/2), strided (offset P/2) and both; a byte transformer (P = 1)
#       only basic and sliding. `wall_secs` is the whole train command plus the basic test
#       score. Claims 1 and 2 (and 5).
#   scripts/paper-claims.sh search MINUTES MODEL [MODEL...] [-- TRAIN-ARGS...]
#       The hyper-parameter search: as equal-time, but scored on the validation split only
#       (the test split is never used to choose).
#       MODEL is a preset name or a model config JSON file (e.g. configs/enwik8/*.json).
#   scripts/paper-claims.sh probe SECONDS MINUTES MODEL [MODEL...] [-- TRAIN-ARGS...]
#       The early part of an equal-time run: each model trains on the MINUTES run's schedule
#       (--time MINUTES) and is stopped with Ctrl-C after SECONDS, so its curve lies on the
#       full run's; records its validation bpb by step (set --eval-every and --eval-bytes in
#       TRAIN-ARGS), steps, bytes/s, the last 100 steps' mean training bpb and its gradient
#       spikes (the largest norm after step 100, its step and each part's norm there, and the
#       steps above 5). For comparing starts, and learning rates, at a fraction of the cost.
#   scripts/paper-claims.sh curves PNG RUN [RUN...]
#       Training bpb (mean of the last 100 steps) and validation bpb against minutes, one
#       line per run (a run folder or its metrics.jsonl, plain or gzipped), in one PNG.
#       equal-time draws its runs' curves to $RUNS/equal-time-MINUTESmin.png.
#   scripts/paper-claims.sh compare RUN [RUN...]
#       The runs side by side from their metrics (a run folder or its metrics.jsonl, plain or
#       gzipped): steps, training seconds, bytes/s (the median of the steps' rates), validation
#       bpb by step, the gradient norm after step 100 (median, maximum, steps above 2 and 5: loss
#       spikes; where recorded, each part's norm at the peak and its median before and after
#       step 1,000), and the mean training bpb over each 1,000-step range (runs with one seed and
#       batch shape train on the same bytes at each step, so these pair them).
#   scripts/paper-claims.sh generation BYTES PRESET [PRESET...]
#       Batch-1 KV-cached generation of BYTES bytes on random weights. Claim 3.
#   scripts/paper-claims.sh modality SET MINUTES CONFIG [CONFIG...] [-- TRAIN-ARGS...]
#       SET: fashion-mnist, speech-en or code. Fetches and converts the set's train and test
#       files (unless $RUNS/SET/{train,test}.bin exist; t10k.bin for fashion-mnist), trains
#       each model config (a JSON file; e.g. configs/fashion-mnist.json and its
#       same-time baseline configs/fashion-mnist-baseline.json) for MINUTES with --documents,
#       scores the test split and writes a sample: an image grid, a 5-second WAV or code.
#   scripts/paper-claims.sh long-context MODEL BYTES-PER-STEP T [T...]
#       Training time per byte and peak memory of one architecture at each context T (batch
#       BYTES-PER-STEP / T), plotted to $RUNS/long-context.png. Claim 4.
#
# Environment: MEGABYTE (the binary, default megabyte on the PATH), DATA (default data),
# RUNS (default runs/claims), DEVICE (default cuda).
set -euo pipefail
mb=${MEGABYTE:-megabyte}
data=${DATA:-data}
runs=${RUNS:-runs/claims}
device=${DEVICE:-cuda}
out=${OUT:-$runs/results.jsonl}
mkdir -p "$runs"

# The commit the binary was built from (`megabyte --version`; a machine's checkout may be at
# another), stamped on every record.
commit=$("$mb" --version | sed -n 's/.*(commit \(.*\)).*/\1/p')

# record CLAIM PRESET JSON: one line with the claim's name, the preset, the commit and the
# TRAIN-ARGS the run was given (e.g. --dropout 0.1), if any.
train_args=()
record() {
    python3 -c 'import json, sys; r = json.loads(sys.argv[3]); r.update(claim=sys.argv[1], preset=sys.argv[2], commit=sys.argv[4], device=sys.argv[5]); r.update({"train_args": sys.argv[6]} if sys.argv[6] else {}); print(json.dumps(r))' \
        "$1" "$2" "$3" "$commit" "$device" "${train_args[*]}" | tee -a "$out"
}

# model_flags MODEL: the train/info flags for a preset name or a model config file.
model_flags() {
    if [ -f "$1" ]; then echo "--config $1"; else echo "--preset $1"; fi
}
# model_name MODEL: the preset, or the config file's name without .json.
model_name() {
    basename "$1" .json
}

# fresh_run PATH: PATH, or the first of PATH-2, PATH-3, ... that does not exist (the same
# model run again, with other TRAIN-ARGS, gets a folder of its own).
fresh_run() {
    local run=$1 k=1
    while [ -e "$run" ]; do k=$((k + 1)) run="$1-$k"; done
    echo "$run"
}

# take_models WORD... [-- TRAIN-ARGS...]: the words before `--` into `models`, the rest into
# `train_args`.
take_models() {
    models=() train_args=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do models+=("$1"); shift; done
    [ "${1:-}" = "--" ] && shift
    train_args=("$@")
}

cmd=${1:?usage: see the header of $0}
shift
case "$cmd" in
equal-time|search)
    minutes=${1:?minutes}
    shift
    take_models "$@"
    [ -f "$data/enwik8/test.bin" ] || "$mb" data fetch enwik8 --dir "$data"
    runs_done=() failed=0
    for m in "${models[@]}"; do
        read -r -a model <<<"$(model_flags "$m")"
        name=$(model_name "$m")
        read -r t p <<<"$("$mb" info "${model[@]}" --json | python3 -c 'import json, sys; c = json.load(sys.stdin)["config"]; print(c["context"], c["patch_size"])')"
        if [ "$cmd" = search ]; then
            split=valid modes=(basic)
        elif [ "$p" = 1 ]; then
            split=test modes=(basic sliding) # strided inference shifts by half a patch: MEGABYTE only
        else
            split=test modes=(basic sliding strided both)
        fi
        run=$(fresh_run "$runs/$name-${minutes}min")
        start=$(date +%s)
        if ! "$mb" train "${model[@]}" --device "$device" --data "$data/enwik8/train.bin" --valid "$data/enwik8/valid.bin" \
            --time "$minutes" --out "$run" "${train_args[@]}"; then
            echo "training $name failed: nothing recorded for it" >&2
            failed=1
            continue
        fi
        trained=$(( $(date +%s) - start ))
        for mode in "${modes[@]}"; do
            flags=()
            case $mode in
            sliding) flags=(--sliding $((t / 2))) ;;
            strided) flags=(--strided) ;;
            both) flags=(--sliding $((t / 2)) --strided) ;;
            esac
            s=$(date +%s)
            json=$("$mb" eval --checkpoint "$run" --data "$data/enwik8/$split.bin" --device "$device" --batch-size 16 --json "${flags[@]}" || echo '{"error": "eval failed"}')
            secs=$(( $(date +%s) - s ))
            json=$(python3 -c 'import json, sys; r = json.loads(sys.argv[1]); r.update(split=sys.argv[2], mode=sys.argv[3], eval_secs=int(sys.argv[4]), train_secs=int(sys.argv[5]), minutes=float(sys.argv[6])); r["wall_secs"] = r["train_secs"] + r["eval_secs"] if r["mode"] == "basic" else None; print(json.dumps(r))' \
                "$json" "$split" "$mode" "$secs" "$trained" "$minutes")
            record "$cmd" "$name" "$json"
        done
        runs_done+=("$run")
    done
    [ "$cmd" = equal-time ] && [ ${#runs_done[@]} -gt 0 ] && "$0" curves "$runs/equal-time-${minutes}min.png" "${runs_done[@]}"
    exit "$failed"
    ;;
probe)
    secs=${1:?seconds}
    minutes=${2:?minutes}
    shift 2
    take_models "$@"
    [ -f "$data/enwik8/valid.bin" ] || "$mb" data fetch enwik8 --dir "$data"
    for m in "${models[@]}"; do
        read -r -a model <<<"$(model_flags "$m")"
        name=$(model_name "$m")
        run=$(fresh_run "$runs/$name-probe-${secs}s")
        status=0
        # --foreground: SIGINT to the run alone. Without it timeout also signals its own process
        # group, so the run got two at once, which binaries before the fix took as "leave now".
        timeout --foreground -s INT "$secs" "$mb" train "${model[@]}" --device "$device" --data "$data/enwik8/train.bin" \
            --valid "$data/enwik8/valid.bin" --time "$minutes" --out "$run" "${train_args[@]}" || status=$?
        [ "$status" = 0 ] || [ "$status" = 124 ] || exit "$status" # 124: stopped by the timeout
        json=$(python3 - "$run/metrics.jsonl" "$secs" "$minutes" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "bytes_per_sec" in r]
late = [r for r in steps if r["step"] > 100]
peak = max(late, key=lambda r: r["grad_norm"], default={})
print(json.dumps({
    "valid_bpb_by_step": {str(r["step"]): round(r["valid_bpb"], 4) for r in rows if "valid_bpb" in r},
    "steps": steps[-1]["step"], "train_bytes_per_sec": round(steps[-1]["bytes_per_sec"]),
    "train_bpb_last_100": round(sum(r["bpb"] for r in steps[-100:]) / len(steps[-100:]), 4),
    "grad_norm_max_after_100": round(peak.get("grad_norm", 0.0), 2),
    "grad_norm_max_step": peak.get("step"),
    "grad_norms_at_max": {k: round(v, 3) for k, v in peak.get("grad_norms", {}).items()},
    "steps_grad_norm_above_5": sum(r["grad_norm"] > 5 for r in late),
    "split": "valid", "secs": int(sys.argv[2]), "minutes": float(sys.argv[3])}))
PY
)
        record probe "$name" "$json"
    done
    ;;
curves)
    png=${1:?png}
    shift
    python3 - "$@" > "$runs/curves.jsonl" <<'PY'
import gzip, json, os, sys
for arg in sys.argv[1:]:
    path = os.path.join(arg, "metrics.jsonl") if os.path.isdir(arg) else arg
    name = os.path.basename(arg.rstrip("/")).removesuffix(".gz").removesuffix(".jsonl").removeprefix("equal-time-")
    rows = [json.loads(l) for l in (gzip.open if path.endswith(".gz") else open)(path, "rt")]
    last, window = 0.0, []
    for r in rows:
        if "bpb" in r:
            last = r["elapsed_secs"] / 60
            window = (window + [r["bpb"]])[-100:]
            if r["step"] % 20 == 0:
                print(json.dumps({"run": name, "minutes": last, "train_bpb_mean100": sum(window) / len(window)}))
        elif "valid_bpb" in r and r["step"] > 0:
            print(json.dumps({"run": name, "minutes": last, "valid_bpb": r["valid_bpb"]}))
PY
    "$mb" plot "$runs/curves.jsonl" --x minutes --y train_bpb_mean100 --y valid_bpb --by run --out "$png"
    echo "plot: $png"
    ;;
compare)
    python3 - "$@" <<'PY'
import gzip, json, os, statistics, sys

def by_model_part(grad_norms):
    """A step's per-part norms with each embedder's tables and pads (separate parts since
    afcf92b) summed into their embedder."""
    sq = {}
    for k, v in grad_norms.items():
        part = k.split(".")[0]
        sq[part] = sq.get(part, 0.0) + v * v
    return {k: v**0.5 for k, v in sq.items()}

runs = {}
for arg in sys.argv[1:]:
    path = os.path.join(arg, "metrics.jsonl") if os.path.isdir(arg) else arg
    rows = [json.loads(l) for l in (gzip.open if path.endswith(".gz") else open)(path, "rt")]
    runs[os.path.basename(arg.rstrip("/")).removesuffix(".gz").removesuffix(".jsonl")] = (
        {r["step"]: r for r in rows if "bpb" in r}, {r["step"]: r["valid_bpb"] for r in rows if "valid_bpb" in r})
for name, (steps, valid) in runs.items():
    last = steps[max(steps)]
    rate = statistics.median(r["bytes_per_sec"] for r in steps.values())
    print(f"{name}: {last['step']} steps in {last['elapsed_secs']:.0f} s, median {rate / 1e6:.3f}M bytes/s")
    print("  valid bpb by step: " + ", ".join(f"{s} {v:.4f}" for s, v in sorted(valid.items())))
    # Loss spikes show as gradient norms far above the run's typical one (clipped at 1.0 by
    # default); the first 100 steps, where every run's norm is large, are left out.
    late = [r for k, r in sorted(steps.items()) if k > 100]
    if late:
        peak = max(late, key=lambda r: r["grad_norm"])
        norms = [r["grad_norm"] for r in late]
        print(f"  gradient norm after step 100: median {statistics.median(norms):.3f}, max {peak['grad_norm']:.1f}"
              f" at step {peak['step']}, {sum(n > 2 for n in norms)} steps above 2, {sum(n > 5 for n in norms)} above 5")
        if "grad_norms" in peak:  # per part of the model, recorded since ca78b42
            print("    by part at that step: " + ", ".join(f"{k} {v:.2f}" for k, v in peak["grad_norms"].items()))
            # Each part's typical norm (the median) before and after step 1,000.
            for label, rows in (("101-1,000", [r for r in late if r["step"] <= 1000]), ("after 1,000", [r for r in late if r["step"] > 1000])):
                parts = [by_model_part(r["grad_norms"]) for r in rows if "grad_norms" in r]
                if parts:
                    print(f"    median by part, steps {label}: " + ", ".join(f"{k} {statistics.median(p[k] for p in parts):.4f}" for k in parts[0]))
            spikes = [r for r in late if r["grad_norm"] > 5 and "grad_norms" in r]
            if spikes:
                shares = [{k: v * v / r["grad_norm"] ** 2 for k, v in by_model_part(r["grad_norms"]).items()} for r in spikes]
                print(f"    share of the squared norm in the steps above 5 (steps {spikes[0]['step']}-{spikes[-1]['step']}): "
                      + ", ".join(f"{k} {min(s[k] for s in shares):.0%}-{max(s[k] for s in shares):.0%}" for k in shares[0]))
    # Leaving the bigram plateau: the first step whose last 50 steps average below 3.0 bpb.
    bpb = [r["bpb"] for k, r in sorted(steps.items())]
    left = next((i + 1 for i in range(49, len(bpb)) if sum(bpb[i - 49 : i + 1]) / 50 < 3.0), None)
    print(f"  training bpb (mean of 50 steps) below 3.0 from step {left}")
print("mean training bpb by step range (" + " | ".join(runs) + "):")
top = min(max(steps) for steps, _ in runs.values())
for lo in range(0, top - top % 1000, 1000):
    ks = [k for k in range(lo + 1, lo + 1001) if all(k in steps for steps, _ in runs.values())]
    print(f"  {lo + 1}-{lo + 1000}: " + " | ".join(f"{sum(steps[k]['bpb'] for k in ks) / len(ks):.4f}" for steps, _ in runs.values()))
PY
    ;;
generation)
    bytes=${1:?bytes}
    shift
    for p in "$@"; do
        json=$("$mb" bench --preset "$p" --device "$device" --warmup 0 --steps 0 --gen-bytes "$bytes" --gen-batch 1 --json)
        record generation "$p" "$json"
    done
    ;;
modality)
    set_name=${1:?set}
    minutes=${2:?minutes}
    shift 2
    take_models "$@"
    conv="$runs/$set_name"
    mkdir -p "$conv"
    # Converted splits already in $RUNS/SET (e.g. converted elsewhere for a host with no
    # network) are used as they are; otherwise the set is fetched (once) and converted.
    splits="train test"
    [ "$set_name" = fashion-mnist ] && splits="train t10k"
    for split in $splits; do
        [ -f "$conv/$split.bin" ] || { "$mb" data fetch "$set_name" --dir "$data" >/dev/null; break; }
    done
    case "$set_name" in
    fashion-mnist)
        for split in train t10k; do
            [ -f "$conv/$split.bin" ] || "$mb" data images "$data/fashion-mnist/$split-images-idx3-ubyte" "$conv/$split.bin" --order patch-scan --block 4
        done
        train_bin="$conv/train.bin" test_bin="$conv/t10k.bin" holdout=784000
        sample=(--image 28x28x1 --order patch-scan --block 4 --count 64)
        ext=png ;;
    speech-en)
        for split in train test; do
            [ -f "$conv/$split.bin" ] || "$mb" data audio "$data/speech-en/$split" "$conv/$split.bin"
        done
        train_bin="$conv/train.bin" test_bin="$conv/test.bin" holdout=400000
        sample=(--wav 5s --sample-rate 8000 --bits 16)
        ext=wav ;;
    code)
        for split in train test; do
            [ -f "$conv/$split.bin" ] || "$mb" data code "$data/code/$split" "$conv/$split.bin" --ext c,h
        done
        train_bin="$conv/train.bin" test_bin="$conv/test.bin" holdout=5000000
        printf '\0' > "$conv/prompt"
        sample=(--prompt-file "$conv/prompt" -n 2000)
        ext=c ;;
    *)
        echo "unknown set $set_name: fashion-mnist, speech-en or code" >&2
        exit 2 ;;
    esac
    for cfg in "${models[@]}"; do
        name=$(basename "$cfg" .json)
        run="$runs/$set_name-$name-${minutes}min"
        start=$(date +%s)
        "$mb" train --config "$cfg" --device "$device" --data "$train_bin" --valid-bytes "$holdout" --documents \
            --time "$minutes" --sample-bytes 0 --out "$run" "${train_args[@]}"
        trained=$(( $(date +%s) - start ))
        json=$("$mb" eval --checkpoint "$run" --data "$test_bin" --documents --device "$device" --json)
        json=$(python3 -c 'import json, sys; r = json.loads(sys.argv[1]); r.update(set=sys.argv[2], train_secs=int(sys.argv[3]), minutes=float(sys.argv[4])); print(json.dumps(r))' \
            "$json" "$set_name" "$trained" "$minutes")
        record modality "$name" "$json"
        if [ "$ext" = c ]; then
            "$mb" generate --checkpoint "$run" --device "$device" "${sample[@]}" > "$run/sample.$ext"
        else
            "$mb" generate --checkpoint "$run" --device "$device" "${sample[@]}" --out "$run/sample.$ext"
        fi
        echo "sample: $run/sample.$ext"
    done
    ;;
long-context)
    read -r -a model <<<"$(model_flags "${1:?model}")"
    p=$(model_name "$1")
    per_step=${2:?bytes per step}
    shift 2
    # The embedded corpus (1.9 MB) holds one window of at most 1.8M bytes; longer contexts
    # train on enwik8 when it is at hand.
    bench_data=()
    [ -f "$data/enwik8/train.bin" ] && bench_data=(--data "$data/enwik8/train.bin")
    for t in "$@"; do
        batch=$(( per_step / t ))
        [ "$batch" -ge 1 ] || batch=1
        json=$("$mb" bench "${model[@]}" --context "$t" --device "$device" --batch-size "$batch" --warmup 2 --steps 5 --gen-bytes 0 --json "${bench_data[@]}" \
            || echo "{\"context\": $t, \"batch_size\": $batch, \"error\": \"did not run (see stderr)\"}")
        json=$(python3 -c 'import json, sys; r = json.loads(sys.argv[1]); b = r.get("train_bytes_per_sec"); r["us_per_byte"] = 1e6 / b if b else None; print(json.dumps(r))' "$json")
        record long-context "$p" "$json"
    done
    "$mb" plot "$out" --x context --y us_per_byte --y peak_memory_gib --by preset --log-x --out "$runs/long-context.png"
    echo "plot: $runs/long-context.png"
    ;;
*)
    echo "unknown subcommand $cmd: equal-time, search, probe, curves, compare, generation, modality or long-context" >&2
    exit 2
    ;;
esac
