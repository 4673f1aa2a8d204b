//! With the `cuda` feature, compiles kernels/megabyte.cu (which includes one header per op,
//! kernels/*.cuh) and kernels/decode.cu with nvcc (from `CUDA_HOME`, `CUDA_PATH` or the PATH;
//! `scripts/cuda-toolchain.sh` provides one) into fat binaries: machine code for
//! `CUDA_COMPUTE_CAP` (default 90, the H100/H200), so the driver does not spend ~20 s compiling
//! PTX at a run's first steps, plus that PTX for newer GPUs. CPU builds need nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    // megabyte.cu includes one header per op; every file in kernels/ counts.
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=CUDA_PATH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|home| PathBuf::from(home).join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    // The attention kernels use mma.sync bf16 and ldmatrix: Ampere (8.0) or newer.
    assert!(cap.parse::<u32>().is_ok_and(|c| c >= 80), "CUDA_COMPUTE_CAP={cap}: megabyte's kernels need compute capability 80 or newer");
    for module in ["megabyte", "decode"] {
        let status = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17", "-gencode", &format!("arch=compute_{cap},code=[sm_{cap},compute_{cap}]")])
            .args([format!("kernels/{module}.cu"), "-o".into()])
            .arg(out_dir.join(format!("{module}.fatbin")))
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e} (set CUDA_HOME, or eval \"$(scripts/cuda-toolchain.sh)\")", nvcc.display()));
        assert!(status.success(), "nvcc failed on kernels/{module}.cu");
    }
}
