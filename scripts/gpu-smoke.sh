#!/usr/bin/env bash
# First GPU check on a CUDA host without a Rust toolchain: a `--features cuda` binary built
# elsewhere (xz-compressed at .gpu-host/megabyte.xz, see scripts/gpu-host.sh) against the driver
# and the CUDA 13 libraries of the host's PyTorch installation.
# Checks that CPU and GPU agree on a checkpoint's bpb and greedy sample, then measures plain
# (unfused, f32) GPU speed for `tiny` and `enwik8`.
#   usage: scripts/gpu-smoke.sh CHECKPOINT DATA_FILE [OUT_DIR]
set -uo pipefail
ckpt=$1 data=$2 out=${3:-/tmp}
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')$SP/torch/lib:${LD_LIBRARY_PATH:-}
xz -dc .gpu-host/megabyte.xz > /tmp/megabyte && chmod +x /tmp/megabyte
bin=/tmp/megabyte
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for d in cpu cuda; do
    $bin eval --checkpoint "$ckpt" --data "$data" --device $d --json | tee -a "$out/eval.jsonl"
done
for d in cpu cuda; do
    echo "== greedy sample on $d"
    $bin generate --checkpoint "$ckpt" --prompt "The " -n 120 --sampling greedy --device $d | tee "$out/sample-$d.txt"
done
cmp "$out/sample-cpu.txt" "$out/sample-cuda.txt" && echo "greedy samples identical"
$bin bench --preset tiny --device cuda --batch-size 4 --steps 20 --gen-bytes 512 --json | tee -a "$out/bench.jsonl"
$bin bench --preset enwik8 --device cuda --batch-size 4 --warmup 2 --steps 5 --gen-bytes 256 --json | tee -a "$out/bench.jsonl"
