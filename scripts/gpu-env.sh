# Source on a CUDA machine without Rust: unpacks the xz-compressed binaries built elsewhere
# (.devbin/megabyte.xz, and .devbin/it.xz, the integration-test binary) into /tmp/mb and
# points the loader at PyTorch's CUDA 13 libraries (NCCL included: nvidia/nccl/lib/libnccl.so.2,
# which the CUDA build's multi-GPU training loads).
#   usage: source scripts/device-env.sh; /tmp/mb/megabyte bench --device cuda ...
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib | tr '\n' ':')$SP/torch/lib:${LD_LIBRARY_PATH:-}
mkdir -p /tmp/mb
for f in .devbin/*.xz; do
    name=$(basename "$f" .xz)
    xz -dc "$f" > "/tmp/mb/$name" && chmod +x "/tmp/mb/$name"
done
