#!/usr/bin/env bash
# The GPU runs of RESULTS.md (equal-time runs, their early probes, the CUDA tests) on a CUDA host
# that has no Rust toolchain and no network. The `--features cuda` binary is built on a machine
# with Rust and copied to the host xz-compressed, with enwik8, in .gpu-host/ (git-ignored) of a
# checkout of this repository; there scripts/gpu-env.sh unpacks them and points LD_LIBRARY_PATH
# at the CUDA 13 libraries of the host's PyTorch installation. What a run measured is written to
# $OUT (default /tmp/out).
#
#   scripts/gpu-host.sh run CONFIG BATCH MINUTES LR [TRAIN-ARGS...]
#       One paper-claims equal-time run of CONFIG (batch BATCH, peak learning rate LR, warm-up
#       200, validation every 1,000 steps, no samples) plus its test scores, after three
#       untimed steps of the same model; TRAIN-ARGS go to
#       `megabyte train` (e.g. --dropout 0.1 --seed 2). $OUT gets results.jsonl and the run's
#       metrics.jsonl.gz, and the log ends with `paper-claims.sh compare` of the run.
#   scripts/gpu-host.sh probe SECONDS CONFIG BATCH MINUTES LR "SEED..." [TRAIN-ARGS...]
#       The first SECONDS of that run (`paper-claims.sh probe`: the MINUTES run's schedule,
#       stopped early; validation every 250 steps on 100,000 bytes) once per seed, after the
#       same untimed steps. For more seeds' spikes at a fraction of a run's cost. $OUT gets
#       results.jsonl and each seed's metrics-seedN.jsonl.gz, and the log ends with a table of
#       the probes in $OUT/results.jsonl (start with an empty $OUT).
#   scripts/gpu-host.sh engine
#       The CUDA integration tests (.gpu-host/it.xz: `cargo test --release --features cuda
#       --no-run`'s `it` binary) with `cuda` in their name.
#   scripts/gpu-host.sh serve [CLIENTS] [BYTES] [ROUNDS]
#       The server's load benchmark: a checkpoint of the `enwik8` preset (20 steps on the
#       embedded corpus: speed does not depend on the weights), `megabyte serve` on the GPU, and
#       scripts/bench-serve.py with 1, then CLIENTS (default 16) streaming clients of BYTES
#       (default 1024) bytes each, ROUNDS (default 3) requests per client; then, for comparison,
#       `megabyte bench`'s generation at batch 1 and 16 (the fixed-batch decoding engine).
#       $OUT gets serve.jsonl, bench.json and the server's log.
#
# Preparing .gpu-host on the build machine (commit first, the binary stamps the commit):
#   eval "$(scripts/cuda-toolchain.sh)"; CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
#   mkdir -p .gpu-host && strip -o .gpu-host/megabyte target/cuda/release/megabyte && xz -T2 -3 -f .gpu-host/megabyte
#   strip -o .gpu-host/it $(ls target/cuda/release/deps/it-* | grep -v '\.d$') && xz -T2 -3 -f .gpu-host/it
#                             # after `CARGO_TARGET_DIR=target/cuda cargo test --release --features cuda --no-run`
#   xz -T2 -9 -c ENWIK8 > .gpu-host/enwik8.xz   # the raw 10^8 bytes (25 MB); a .gz or .zip also works
# `run` and `probe` need megabyte.xz and enwik8.xz; `engine` needs it.xz only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-/tmp/out}
mkdir -p "$out"
# shellcheck source=gpu-env.sh
source scripts/gpu-env.sh # unpacks .gpu-host/*.xz into /tmp/mb
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# prepare CONFIG BATCH [TRAIN-ARGS...]: enwik8's splits in /tmp/data, the environment
# paper-claims.sh reads, and three untimed steps of the model. A freshly started host spent
# 12-17 s in a timed run's first two steps (benchmarks/claims/enwik8-10min/README.md; most
# likely the driver compiling the kernels' PTX into an empty cache); the untimed steps keep that
# out of the timed run.
prepare() {
    local config=$1 batch=$2 src s
    shift 2
    export MEGABYTE=/tmp/mb/megabyte DATA=/tmp/data RUNS=/tmp/runs OUT=$out/results.jsonl
    if [ ! -f /tmp/data/enwik8/test.bin ]; then
        src=/tmp/mb/enwik8 # gpu-env.sh unpacked .gpu-host/enwik8.xz here; else a .gz or .zip
        [ -f "$src" ] || src=$(ls .gpu-host/enwik8.* | head -1)
        /tmp/mb/megabyte data fetch enwik8 --from "$src" --dir /tmp/data
    fi
    s=$(date +%s)
    /tmp/mb/megabyte train --config "$config" --device cuda --data /tmp/data/enwik8/train.bin \
        --valid /tmp/data/enwik8/valid.bin --steps 3 --eval-every 2 --batch-size "$batch" \
        --sample-bytes 0 --out "/tmp/warm-up-$$" "$@" > /tmp/warm-up.log 2>&1 || { cat /tmp/warm-up.log; exit 1; }
    echo "warm-up: 3 untimed steps in $(( $(date +%s) - s )) s"
}

mode=${1:?usage: see the header of $0}
shift
case "$mode" in
run)
    config=${1:?config} batch=${2:?batch} minutes=${3:?minutes} lr=${4:?lr}
    shift 4
    prepare "$config" "$batch" "$@"
    status=0
    scripts/paper-claims.sh equal-time "$minutes" "$config" -- --batch-size "$batch" --lr "$lr" \
        --warmup 200 --eval-every 1000 --checkpoint-every 100000 --sample-bytes 0 "$@" || status=$?
    run=$(ls -dt /tmp/runs/"$(basename "$config" .json)"-"${minutes}"min* | head -1)
    gzip -c "$run/metrics.jsonl" > "$out/metrics.jsonl.gz"
    scripts/paper-claims.sh compare "$run" || true
    exit "$status"
    ;;
probe)
    secs=${1:?seconds} config=${2:?config} batch=${3:?batch} minutes=${4:?minutes} lr=${5:?lr} seeds=${6:?seeds}
    shift 6
    [[ $seeds =~ ^[0-9\ ]+$ ]] || { echo "SEEDS must be seed numbers, e.g. \"3 4 5\": got $seeds" >&2; exit 2; }
    [[ " $* " != *" --seed "* ]] || { echo "probe sets --seed itself, from SEEDS" >&2; exit 2; }
    prepare "$config" "$batch" "$@"
    failed=0
    for seed in $seeds; do
        rm -rf /tmp/runs # each probe's run folder is then /tmp/runs/NAME-probe-SECONDSs
        status=0
        scripts/paper-claims.sh probe "$secs" "$minutes" "$config" -- --batch-size "$batch" --lr "$lr" \
            --warmup 200 --eval-every 250 --checkpoint-every 100000 --sample-bytes 0 "$@" --seed "$seed" \
            > /tmp/probe.log 2>&1 || status=$?
        grep -v '^{' /tmp/probe.log || true
        if [ "$status" != 0 ]; then
            echo "seed $seed: the probe failed (status $status)" >&2
            failed=1
            continue
        fi
        gzip -c /tmp/runs/"$(basename "$config" .json)"-probe-"${secs}"s/metrics.jsonl > "$out/metrics-seed$seed.jsonl.gz"
    done
    [ -f "$OUT" ] && python3 - "$OUT" <<'PY'
import json, sys
print("seed  steps  max grad norm after 100 (step)  steps above 5  valid bpb (step)")
for line in open(sys.argv[1]):
    r = json.loads(line)
    seed = r["train_args"].split("--seed ")[-1].split()[0]
    last = max(r["valid_bpb_by_step"], key=int)
    print(f'{seed:>4}  {r["steps"]:>5}  {r["grad_norm_max_after_100"]:>8} ({r["grad_norm_max_step"]})'
          f'  {r["steps_grad_norm_above_5"]:>5}  {r["valid_bpb_by_step"][last]} ({last})')
PY
    exit "$failed"
    ;;
engine)
    /tmp/mb/it cuda --test-threads 1 2>&1 | tail -40
    ;;
serve)
    clients=${1:-16} bytes=${2:-1024} rounds=${3:-3}
    /tmp/mb/megabyte train --preset enwik8 --device cuda --steps 20 --sample-bytes 0 --out /tmp/serve-run \
        > /tmp/serve-train.log 2>&1 || { cat /tmp/serve-train.log; exit 1; }
    /tmp/mb/megabyte serve --checkpoint /tmp/serve-run --device cuda --port 8080 > "$out/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do
        python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:8080/health", timeout=2)' 2>/dev/null && break
        sleep 0.5
    done
    status=0
    python3 scripts/bench-serve.py --url http://127.0.0.1:8080 --bytes "$bytes" --rounds "$rounds" \
        --clients "1,$clients" | tee "$out/serve.jsonl" || status=$?
    kill -TERM "$server"
    wait "$server" || status=$?
    /tmp/mb/megabyte bench --preset enwik8 --device cuda --steps 0 --gen-bytes "$bytes" --gen-batch "1,$clients" --json \
        | tee "$out/bench.json" || status=$?
    exit "$status"
    ;;
*)
    echo "unknown mode $mode: run, probe, engine or serve" >&2
    exit 2
    ;;
esac
