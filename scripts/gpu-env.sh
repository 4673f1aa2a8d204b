# Source on a CUDA host without a Rust toolchain, from the repository root: unpacks the
# xz-compressed binaries built elsewhere (.gpu-host/megabyte.xz, .gpu-host/it.xz, the
# integration-test binary, and .gpu-host/enwik8.xz if present; see scripts/gpu-host.sh) into
# /tmp/mb and points the loader at the CUDA 13 libraries of the host's PyTorch installation
# (cuBLAS, cuRAND, the runtime, and NCCL: nvidia/nccl/lib/libnccl.so.2, which the CUDA build's
# multi-GPU training loads).
#   usage: source scripts/gpu-env.sh; /tmp/mb/megabyte bench --device cuda ...
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')$SP/torch/lib:${LD_LIBRARY_PATH:-}
mkdir -p /tmp/mb
for f in .gpu-host/*.xz; do
    name=$(basename "$f" .xz)
    xz -dc "$f" > "/tmp/mb/$name" && chmod +x "/tmp/mb/$name"
done
