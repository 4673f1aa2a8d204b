//! Devices: opening one by name, CUDA memory (the allocator's pool settings and peak-memory
//! statistics) and the dense rate MFU is measured against. Without the `cuda` feature (or on
//! the CPU) the memory functions do nothing and report nothing.

use candle_core::Device;

use crate::error::{Error, Result};

/// A device from `cpu`, `cuda` or `cuda:N`.
pub fn device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::Config(format!("bad device `{spec}`: use cpu, cuda or cuda:N")))?,
        None => return Err(Error::Config(format!("bad device `{spec}`: use cpu, cuda or cuda:N"))),
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::Config(format!(
            "device `{spec}` needs a build with `--features cuda` (this one is CPU-only)"
        )));
    }
    let device = Device::new_cuda(ordinal)?;
    single_stream(&device);
    keep_freed_memory(&device);
    Ok(device)
}

/// The dense bf16 matrix rate of one device of `device`'s kind, in TFLOP/s, which model FLOPs
/// utilisation (MFU) is a fraction of: on CUDA the H200's measured rate (BENCHMARKS.md), `None`
/// on the CPU.
pub fn peak_tflops(device: &Device) -> Option<f64> {
    device.is_cuda().then_some(PEAK_BF16_TFLOPS)
}

/// See [`peak_tflops`].
pub const PEAK_BF16_TFLOPS: f64 = 790.0;

/// The CUDA GPUs this process can see; an error on a build without `--features cuda`.
pub fn cuda_device_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| Error::Config(format!("cannot count the CUDA GPUs ({e:?}): is the NVIDIA driver installed?")))
    }
    #[cfg(not(feature = "cuda"))]
    Err(Error::Config("CUDA GPUs need a build with `--features cuda` (this one is CPU-only)".into()))
}

/// Keeps memory freed to CUDA's stream-ordered pool (which candle allocates from) for reuse
/// instead of returning it to the driver at every synchronisation, as the default threshold of
/// 0 does; a training step then reallocates nothing from the driver after the first.
pub fn keep_freed_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Some(pool) = pool(device) {
        let mut threshold = u64::MAX;
        // SAFETY: a valid pool and a u64 value, as the attribute requires.
        unsafe {
            sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut _);
        }
    }
    let _ = device;
}

/// Turns off cudarc's per-buffer event recording, which guards buffers shared between
/// streams: megabyte runs everything on the device's one stream, and the events cost host
/// time at every kernel launch (several per launch, thousands of launches per step).
pub fn single_stream(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // SAFETY: every tensor of this device is used on its one stream only.
        unsafe { d.disable_event_tracking() }
    }
    let _ = device;
}

/// Bytes of device memory in use at the peak since the last [`reset_peak_memory`] (CUDA only).
pub fn peak_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = pool(device) {
        device.synchronize().ok()?;
        let mut high = 0u64;
        // SAFETY: as above.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut high as *mut u64 as *mut _) };
        return (r == sys::CUresult::CUDA_SUCCESS).then_some(high);
    }
    let _ = device;
    None
}

/// Starts a new peak-memory measurement.
pub fn reset_peak_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Some(pool) = pool(device) {
        let _ = device.synchronize();
        let mut zero = 0u64;
        // SAFETY: as above; the driver accepts only 0 for this attribute.
        unsafe {
            sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut zero as *mut u64 as *mut _);
        }
    }
    let _ = device;
}

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::sys;

/// The default memory pool of a CUDA device.
#[cfg(feature = "cuda")]
fn pool(device: &Device) -> Option<sys::CUmemoryPool> {
    let Device::Cuda(d) = device else { return None };
    let cu_device = d.cuda_stream().context().cu_device();
    let mut pool = std::ptr::null_mut();
    // SAFETY: an out-pointer for the device's default pool.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
}

/// A point on the device's stream timeline (CUDA events with timing); `None` elsewhere.
pub struct Mark {
    #[cfg(feature = "cuda")]
    event: candle_core::cuda_backend::cudarc::driver::CudaEvent,
}

impl Mark {
    /// Marks the current end of the device's queue: the time the GPU reaches it.
    pub fn now(device: &Device) -> Option<Mark> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            let flags = candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
            return d.cuda_stream().record_event(Some(flags)).ok().map(|event| Mark { event });
        }
        let _ = device;
        None
    }

    /// Milliseconds on the GPU from this mark to `later` (waits for both).
    pub fn ms_until(&self, later: &Mark) -> Option<f64> {
        #[cfg(feature = "cuda")]
        return self.event.elapsed_ms(&later.event).ok().map(f64::from);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = later;
            None
        }
    }
}
