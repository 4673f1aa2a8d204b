#!/usr/bin/env bash
# Makes `cargo build --release --features cuda` work on a machine with no CUDA toolkit, from
# pinned CUDA 13.0 PyPI wheels (the H200 driver is CUDA 13.0: stay on the 13.0 line).
#
#   eval "$(scripts/cuda-toolchain.sh)"     # installs into .cuda/ once, prints the exports
#   cargo build --release --features cuda
#
# With a system CUDA 13.0 toolkit instead: export CUDA_HOME (and CUDA_COMPUTE_CAP=90 for H100/H200)
# and build directly.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=$root/.cuda
export CUDA_HOME=$D/nvidia/cu13
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    python3 -m pip install -q --target "$D" >&2 \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.0.0.19 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-curand==10.4.0.35 nvidia-cuda-cccl==13.0.85
fi
# CCCL headers (nv/target, cub, thrust, cuda) must be found under $CUDA_HOME/include; the
# 13.0 wheels put them in include/cccl/ or in a package of their own.
for sub in nv cub thrust cuda; do
    [ -e "$CUDA_HOME/include/$sub" ] && continue
    if [ -e "$CUDA_HOME/include/cccl/$sub" ]; then
        ln -s "cccl/$sub" "$CUDA_HOME/include/$sub"
    else
        found=$(find "$D/nvidia" -type d -path "*/include/$sub" | grep -v "^$CUDA_HOME/" | head -1)
        [ -n "$found" ] && cp -r "$found" "$CUDA_HOME/include/$sub"
    fi
done
# NCCL for multi-GPU training (the CUDA build links libnccl). Its own --target folder: pip
# --target skips a top-level folder (nvidia/) that already exists. 2.27.7 is the oldest
# nvidia-nccl-cu13 and the version whose bindings the build uses (cudarc's nccl-02027): at run
# time any libnccl.so.2 of 2.27 or later works (PyTorch's site-packages/nvidia/nccl/lib).
NCCL=$D/nccl/nvidia/nccl/lib
if [ ! -e "$NCCL/libnccl.so.2" ]; then
    python3 -m pip install -q --target "$D/nccl" nvidia-nccl-cu13==2.27.7 >&2
fi
ln -sf "$NCCL/libnccl.so.2" "$CUDA_HOME/lib/libnccl.so"
# Unversioned library names for the linker.
for lib in cublas cublasLt nvrtc curand cudart; do
    real=$(ls "$CUDA_HOME"/lib/lib$lib.so.* 2>/dev/null | head -1 || true)
    [ -n "$real" ] && ln -sf "$(basename "$real")" "$CUDA_HOME/lib/lib$lib.so"
done
# A stub libcuda.so.1 for linking (the driver's real one is used at run time).
if [ ! -e "$CUDA_HOME/lib/stubs/libcuda.so" ]; then
    (cd "$root" && cargo fetch -q >&2)
    src=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
    mkdir -p "$CUDA_HOME/lib/stubs"
    grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$src" | sed 's/pub unsafe fn //' | sort -u |
        sed 's/.*/int &(void){return 999;}/' > "$D/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_HOME/lib/stubs/libcuda.so.1" "$D/cuda_stub.c"
    ln -sf libcuda.so.1 "$CUDA_HOME/lib/stubs/libcuda.so"
fi
cat <<ENV
export CUDA_HOME=$CUDA_HOME CUDA_PATH=$CUDA_HOME PATH=$CUDA_HOME/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$CUDA_HOME/lib:$CUDA_HOME/lib/stubs
ENV
