#!/usr/bin/env bash
# Multi-GPU (data-parallel, NCCL) checks on a GPU host, ending with a table. Run from the
# repository root after `source scripts/gpu-env.sh` (it unpacks .gpu-host/{megabyte,it}.xz
# into /tmp/mb and puts PyTorch's libraries, libnccl.so.2 included, on the library path).
#   usage: scripts/ddp-check.sh [PART...]   PART: tests smoke agree speed env fault image640
#          (default: tests smoke, and with 2 GPUs or more agree speed env fault)
# Environment: MEGABYTE (default /tmp/mb/megabyte), IT (the test binary, default /tmp/mb/it),
# OUT (default runs/ddp-check), STEPS (agreement steps, default 200), SPEED_BATCH (paper-arxiv
# sequences per GPU, default 16), PEAK_TFLOPS. To keep each run under about 10 minutes, give
# the parts in two groups, on 8 GPUs (where speed makes four runs) three:
# tests smoke agree env | fault speed | image640
#   tests  the NCCL tests of tests/it/cuda.rs (world of 1; 2 GPUs train as one)
#   smoke  `--devices 0` (NCCL, world 1) against plain `--device cuda:0`: tiny, 60 steps
#   agree  the same global batch (enwik8, batch 8, bf16) for STEPS steps on GPU 0, again on
#          GPU 0 (run-to-run noise), and on GPUs 0,1: loss curves and validation bpb
#   speed  paper-arxiv bytes/s, SPEED_BATCH sequences per GPU, on 1, 2, 4 and 8 GPUs (those
#          visible): speed-up over 1 GPU (targets: ≥ 1.85x on 2, ≥ 7.2x on 8), efficiency,
#          MFU (PEAK_TFLOPS per GPU, default 790); speed.jsonl and speed.png
#   image640  the paper's Image640 shape (1,228,800-byte sequences) on all visible GPUs, one
#          sequence each, --recompute: bytes/s and peak memory
#   env    two processes started by hand with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
#          MASTER_PORT (the multi-host way), against the launcher's run of `agree`
#   fault  kill -9 one rank (the launcher must stop the job at once), and SIGSTOP one rank
#          (rank 0's watchdog must stop it after --nccl-timeout 20 s); the last checkpoint loads
set -uo pipefail
mb=${MEGABYTE:-/tmp/mb/megabyte}
it=${IT:-/tmp/mb/it}
out=${OUT:-runs/ddp-check}
steps=${STEPS:-200}
mkdir -p "$out"
table="$out/table.txt"
: > "$table"
row() { printf '%-34s %s\n' "$1" "$2" | tee -a "$table"; }

gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2 && ! ls ${LD_LIBRARY_PATH//:/ } 2>/dev/null | grep -q '^libnccl.so.2$'; then
    echo "libnccl.so.2 is not on the library path: source scripts/gpu-env.sh (PyTorch's nvidia/nccl/lib)" >&2
    exit 1
fi
parts=("$@")
if [ ${#parts[@]} -eq 0 ]; then
    parts=(tests smoke)
    [ "$gpus" -ge 2 ] && parts+=(agree speed env fault)
fi
echo "GPUs: $gpus; parts: ${parts[*]}; NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE-unset}"

# Losses of a run folder's metrics.jsonl, and comparisons of two of them.
compare() { # compare A B [FROM [TO]] -> "max mean n final_bpb_a final_bpb_b" over steps FROM..TO
    python3 - "$@" <<'PY'
import json, sys
def load(d):
    rows = [json.loads(l) for l in open(d + "/metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r["valid_bpb"] for r in rows if "valid_bpb" in r]
(a, va), (b, vb) = load(sys.argv[1]), load(sys.argv[2])
lo = int(sys.argv[3]) if len(sys.argv) > 3 else 0
hi = int(sys.argv[4]) if len(sys.argv) > 4 else 10**12
d = [abs(a[s] - b[s]) for s in a if s in b and lo <= s <= hi]
print(f"{max(d):.4f} {sum(d) / len(d):.4f} {len(d)} {va[-1]:.4f} {vb[-1]:.4f}")
PY
}
rate() { # median bytes/s of a run's steps after the first 3
    python3 - "$1" <<'PY'
import json, statistics, sys
r = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
s = [x["bytes_per_sec"] for x in r if "bytes_per_sec" in x and x["step"] > 3]
print(f"{statistics.median(s):.0f}")
PY
}
train() { # train OUT-NAME ARGS... (fresh run folder; output in OUT-NAME.log)
    local name=$1; shift
    rm -rf "$out/$name"
    "$mb" train --sample-bytes 0 --out "$out/$name" "$@" > "$out/$name.log" 2>&1
}
ok() { python3 -c "import sys; sys.exit(0 if $1 else 1)" 2>/dev/null && echo ok || echo FAIL; }

for part in "${parts[@]}"; do
case $part in
tests)
    "$it" cuda::data_parallel --include-ignored --test-threads 1 --nocapture > "$out/tests.log" 2>&1
    rc=$?
    row "NCCL tests (cuda.rs)" "$(grep -E '^NCCL|test result' "$out/tests.log" | tr '\n' ' ')$([ $rc = 0 ] && echo ok || echo FAIL)"
    ;;
smoke)
    common=(--preset tiny --batch-size 8 --steps 60 --eval-every 30 --eval-bytes 16384 --precision f32)
    train smoke-plain --device cuda:0 "${common[@]}"
    train smoke-nccl --devices 0 "${common[@]}"
    rc=$?
    read -r mx mean n ba bb <<< "$(compare "$out/smoke-plain" "$out/smoke-nccl")"
    row "--devices 0 vs cuda:0 (tiny, f32)" "exit $rc; max |dloss| $mx mean $mean over $n steps; bpb $ba vs $bb: $(ok "$rc == 0 and $mx < 1e-3")"
    ;;
agree)
    common=(--preset enwik8 --batch-size 8 --lr 1.5e-3 --warmup 20 --steps "$steps" --eval-every 50 --eval-bytes 65536)
    train agree-1a --device cuda:0 "${common[@]}"
    train agree-1b --device cuda:0 "${common[@]}"
    train agree-2 --devices 0,1 "${common[@]}"
    rc=$?
    read -r nmx nmean n _ _ <<< "$(compare "$out/agree-1a" "$out/agree-1b")"
    read -r mx mean n ba bb <<< "$(compare "$out/agree-1a" "$out/agree-2")"
    row "1 vs 1 GPU, repeat (noise)" "max |dloss| $nmx mean $nmean over $n steps"
    row "1 vs 2 GPUs, global batch 8" "exit $rc; max |dloss| $mx mean $mean over $n steps; valid bpb $ba vs $bb: $(ok "$rc == 0 and $mx <= max(3 * $nmx, 0.02) and abs($ba - $bb) < 0.02")"
    # Each checkpoint resumes on the other number of GPUs for 20 more steps.
    more=$((steps + 20))
    "$mb" train --resume "$out/agree-1a" --steps $more --devices 0,1 --sample-bytes 0 > "$out/agree-1a-resume.log" 2>&1; r1=$?
    "$mb" train --resume "$out/agree-2" --steps $more --device cuda:0 --sample-bytes 0 > "$out/agree-2-resume.log" 2>&1; r2=$?
    read -r mx mean n ba bb <<< "$(compare "$out/agree-1a" "$out/agree-2" $((steps + 1)))"
    row "resume 1 GPU on 2 and 2 on 1" "exit $r1/$r2; steps $((steps + 1))-$more: max |dloss| $mx mean $mean ($n steps): $(ok "$r1 == 0 and $r2 == 0 and $n == 20 and $mx <= max(3 * $nmx, 0.02)")"
    ;;
speed)
    # paper-arxiv on 1, 2, 4 and 8 GPUs (as many as are visible), SPEED_BATCH sequences per
    # GPU: bytes/s, MFU against PEAK_TFLOPS per GPU, speed-up and efficiency against 1 GPU;
    # records in speed.jsonl (with the ideal line) and the plot speed.png.
    sb=${SPEED_BATCH:-16}
    peak=${PEAK_TFLOPS:-790}
    fpb=$("$mb" info --preset paper-arxiv | sed -n 's/^training FLOPs per byte: \([0-9.e+]*\).*/\1/p')
    common=(--preset paper-arxiv --steps 12 --warmup 2 --eval-every 1000 --eval-bytes 8192 --checkpoint-every 1000 --keep 1)
    : > "$out/speed.jsonl"
    r1=""
    for n in 1 2 4 8; do
        [ "$n" -le "$gpus" ] || break
        if [ "$n" = 1 ]; then
            train speed-1 --device cuda:0 --batch-size "$sb" "${common[@]}"
        else
            train "speed-$n" --devices "$(seq -s, 0 $((n - 1)))" --batch-size $((n * sb)) "${common[@]}"
        fi
        rc=$?
        r=$(rate "$out/speed-$n" 2> /dev/null)
        if [ -z "$r" ]; then
            row "paper-arxiv on $n GPU(s), $sb each" "exit $rc, no steps: FAIL (see $out/speed-$n.log)"
            [ "$n" = 1 ] && break || continue
        fi
        r1=${r1:-$r}
        read -r x eff mfu <<< "$(python3 - "$n" "$r" "$r1" "$fpb" "$peak" "$out/speed.jsonl" <<'PY'
import json, sys
n, r, r1, fpb, peak = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
x, eff, mfu = r / r1, r / (n * r1), r * fpb / (n * peak * 1e12)
with open(sys.argv[6], "a") as f:
    f.write(json.dumps({"series": "measured", "gpus": n, "bytes_per_sec": r, "mfu": mfu, "speedup": x, "efficiency": eff}) + "\n")
    f.write(json.dumps({"series": "ideal", "gpus": n, "speedup": float(n), "efficiency": 1.0}) + "\n")
print(f"{x:.3f} {100 * eff:.1f} {100 * mfu:.1f}")
PY
)"
        [ -n "$x" ] || { row "paper-arxiv on $n GPU(s), $sb each" "$r bytes/s: no speed-up computed: FAIL"; continue; }
        case $n in 2) target=1.85 ;; 8) target=7.2 ;; *) target="" ;; esac
        verdict=$([ -n "$target" ] && echo " (target ≥ ${target}x): $(ok "$rc == 0 and $x >= $target")" || echo "$([ $rc = 0 ] || echo ': FAIL')")
        row "paper-arxiv on $n GPU(s), $sb each" "$r bytes/s, MFU $mfu%, ${x}x, efficiency $eff% (exit $rc)$verdict"
        rm -rf "$out/speed-$n" # 11 GB checkpoints each
    done
    [ -s "$out/speed.jsonl" ] && "$mb" plot "$out/speed.jsonl" --x gpus --y speedup --y efficiency --by series --out "$out/speed.png" > /dev/null
    ;;
image640)
    # The paper's Image640 shape (configs/image640.json: P = 192, T = 1,228,800, global 768 x 12,
    # local 768 x 8) on every visible GPU, one sequence each, with --recompute, on random bytes
    # (speed and memory only): bytes/s and rank 0's peak memory.
    head -c 40000000 /dev/urandom > "$out/random.bin"
    if [ "$gpus" = 1 ]; then devs=(--device cuda:0); else devs=(--devices "$(seq -s, 0 $((gpus - 1)))"); fi
    train image640 --config configs/image640.json "${devs[@]}" --batch-size "$gpus" --recompute --steps 8 --warmup 1 \
        --eval-every 1000 --eval-bytes 1228800 --checkpoint-every 1000 --keep 1 --data "$out/random.bin"
    rc=$?
    r=$(rate "$out/image640" 2> /dev/null)
    r=${r:-"no"}
    mem=$(sed -n 's/^peak GPU memory: \([0-9.]*\) GiB.*/\1/p' "$out/image640.log")
    row "Image640 on $gpus GPU(s), 1 seq each" "exit $rc; $r bytes/s; peak memory ${mem:-?} GiB (rank 0): $(ok "$rc == 0")"
    rm -rf "$out/image640" "$out/random.bin"
    ;;
env)
    [ -d "$out/agree-2" ] || { echo "env compares with agree's 2-GPU run: run agree first" >&2; continue; }
    common=(--preset enwik8 --batch-size 8 --lr 1.5e-3 --warmup 20 --steps "$steps" --eval-every 50 --eval-bytes 65536
        --sample-bytes 0 --out "$out/env" --device cuda)
    rm -rf "$out/env"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    for r in 1 0; do # rank 1 first: it waits for rank 0
        MASTER_ADDR=127.0.0.1 MASTER_PORT=$port WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r "$mb" train "${common[@]}" > "$out/env-$r.log" 2>&1 &
        eval "pid$r=\$!"
        sleep 1
    done
    wait "$pid0"; rc0=$?
    wait "$pid1"; rc1=$?
    read -r mx mean n ba bb <<< "$(compare "$out/agree-2" "$out/env" 0 "$steps")"
    row "2 processes by env rendezvous" "exit $rc0/$rc1; vs the launcher's run: max |dloss| $mx mean $mean over $n steps: $(ok "$rc0 == 0 and $rc1 == 0 and $n == $steps and $mx < 0.02")"
    ;;
fault)
    head -c 32768 crates/megabyte/corpus/enwik8-head.txt > "$out/eval.bin"
    for how in KILL STOP; do
        name=fault-$how
        rm -rf "$out/$name"
        "$mb" train --devices 0,1 --preset enwik8 --batch-size 8 --time 10 --checkpoint-every 20 --eval-every 1000 \
            --eval-bytes 16384 --nccl-timeout 20 --sample-bytes 0 --out "$out/$name" > "$out/$name.log" 2>&1 &
        launcher=$!
        # Wait for the first checkpoint, then hit rank 1.
        for _ in $(seq 600); do ls -d "$out/$name"/step-* > /dev/null 2>&1 && break; sleep 0.5; done
        victim=""
        for c in $(pgrep -P "$launcher"); do tr '\0' '\n' < "/proc/$c/environ" | grep -qx RANK=1 && victim=$c; done
        hit=$(date +%s.%N)
        kill -"$how" "$victim"
        wait "$launcher"; rc=$?
        secs=$(python3 -c "import time; print(f'{time.time() - $hit:.1f}')")
        [ "$how" = STOP ] && kill -CONT "$victim" 2>/dev/null
        last=$(ls -d "$out/$name"/step-* | tail -1)
        "$mb" eval --checkpoint "$last" --data "$out/eval.bin" --device cuda:0 > "$out/$name-eval.log" 2>&1
        loads=$?
        said=$(grep -E "^error" "$out/$name.log" | head -2 | cut -c1-150 | tr '\n' ' ')
        if [ $how = KILL ]; then limit=15; else limit=45; fi
        row "fault: kill -$how rank 1" "launcher exit $rc after ${secs}s; $(basename "$last") loads: $([ $loads = 0 ] && echo yes || echo no); $(ok "$rc != 0 and $secs < $limit and $loads == 0")"
        row "" "$said"
    done
    ;;
*) echo "unknown part $part" >&2 ;;
esac
done
echo
echo "== summary ($out/table.txt)"
cat "$table"
