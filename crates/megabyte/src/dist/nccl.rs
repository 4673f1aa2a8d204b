//! NCCL for data-parallel training on CUDA: one communicator per process (one GPU each), its
//! collectives on candle's one stream, and a watchdog that turns a dead or hung rank into a
//! clear error instead of a silent hang.
//!
//! NCCL calls only queue work on the stream; a peer that died leaves the queue waiting
//! forever. So every collective records a CUDA event after it, and the watchdog thread checks
//! those events (and `ncclCommGetAsyncError`) every second: a collective still unfinished
//! after the timeout, a host-side phase (joining the communicator) that takes longer, or an
//! error NCCL reports makes it print the reason, abort the communicator and end the process
//! (exit status [`WATCHDOG_EXIT`]). The launcher then stops the other ranks.
//!
//! The library comes from the host at run time: `libnccl.so.2` of NCCL 2.27 or later (PyTorch's
//! `site-packages/nvidia/nccl/lib` on the GPU hosts). The bindings are cudarc's for 2.27.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use cudarc::driver::{sys as cu, CudaContext, CudaEvent, CudaStream, DevicePtr, DriverError};
use candle_core::{DType, Device, Storage, Tensor};
use cudarc::nccl::sys;

use super::{exchange_id, Collective, DistEnv, Fingerprint, ID_BYTES};
use crate::error::{Error, Result};

/// The exit status of a process the watchdog ends.
pub const WATCHDOG_EXIT: i32 = 3;

fn nccl_err(what: &str, code: sys::ncclResult_t, comm: sys::ncclComm_t) -> Error {
    let detail = last_error(comm);
    Error::Dist(format!(
        "NCCL {what} failed ({code:?}{}); rerun with NCCL_DEBUG=WARN for NCCL's own account",
        if detail.is_empty() { String::new() } else { format!(": {detail}") }
    ))
}

/// NCCL's last error message for `comm` (or the process), if any.
fn last_error(comm: sys::ncclComm_t) -> String {
    // SAFETY: ncclGetLastError accepts a null or valid communicator and returns a static,
    // NUL-terminated string (or null).
    unsafe {
        let p = sys::ncclGetLastError(comm);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().trim().to_string()
        }
    }
}

fn cuda_err(what: &str, e: DriverError) -> Error {
    Error::Dist(format!("CUDA failed while {what} ({e:?})"))
}

fn check(what: &str, code: sys::ncclResult_t, comm: sys::ncclComm_t) -> Result<()> {
    match code {
        sys::ncclResult_t::ncclSuccess => Ok(()),
        other => Err(nccl_err(what, other, comm)),
    }
}

/// The version of the NCCL library loaded, e.g. 22707 for 2.27.7.
pub fn version() -> Result<i32> {
    let mut v = 0;
    // SAFETY: an out-pointer for an int.
    check("version query", unsafe { sys::ncclGetVersion(&mut v) }, std::ptr::null_mut())?;
    Ok(v)
}

/// One process's rank of an NCCL job: its communicator on candle's stream of this process's
/// GPU, and the watchdog over it. Dropping it aborts the communicator; [`Collective::finish`]
/// closes it cleanly after the last collective.
pub struct NcclGroup {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    device: CudaDevice,
    stream: Arc<CudaStream>,
    watchdog: Watchdog,
}

// SAFETY: the communicator is used by one thread at a time (`&mut self` for every collective);
// the watchdog thread only calls ncclCommGetAsyncError and ncclCommAbort, which NCCL allows
// from another thread.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

impl NcclGroup {
    /// Joins the job `env` describes on `device` (CUDA): rank 0 makes the NCCL id and hands it
    /// out over TCP at MASTER_ADDR:MASTER_PORT ([`exchange_id`], which also compares
    /// `fingerprint`s), then every rank joins the communicator. Within `timeout` every rank
    /// must have joined, and later every collective must finish, or the watchdog reports why
    /// through `report` and ends the process.
    pub fn connect(
        env: &DistEnv,
        device: &Device,
        fingerprint: &Fingerprint,
        timeout: Duration,
        report: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::Dist("multi-GPU training runs on CUDA devices: use --device cuda".into()));
        };
        let stream = cuda.cuda_stream();
        let ctx = stream.context().clone();
        let watchdog = Watchdog::start(ctx.clone(), timeout, report);
        let id = exchange_id(
            env,
            fingerprint,
            || {
                let mut id = sys::ncclUniqueId { internal: [0; ID_BYTES] };
                // SAFETY: an out-pointer for the id.
                check("id creation (ncclGetUniqueId)", unsafe { sys::ncclGetUniqueId(&mut id) }, std::ptr::null_mut())?;
                Ok(id.internal.map(|c| c as u8))
            },
            timeout,
        )?;
        ctx.bind_to_thread().map_err(|e| cuda_err("selecting the GPU for NCCL", e))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let unique = sys::ncclUniqueId { internal: id.map(|b| b as ::core::ffi::c_char) };
        let code = {
            let _phase = watchdog.phase("joining the NCCL communicator (ncclCommInitRank)");
            // SAFETY: an out-pointer for the communicator; the id came from rank 0.
            unsafe { sys::ncclCommInitRank(&mut comm, env.world_size as i32, unique, env.rank as i32) }
        };
        check(&format!("communicator setup of rank {} of {}", env.rank, env.world_size), code, comm)?;
        watchdog.watch(comm);
        Ok(NcclGroup { comm, rank: env.rank, world: env.world_size, device: cuda.clone(), stream, watchdog })
    }

    /// Runs `call(pointer, elements, dtype)` for each buffer inside one NCCL group, then
    /// records an event the watchdog follows.
    fn grouped(
        &mut self,
        what: &'static str,
        bufs: &[Tensor],
        call: impl Fn(u64, usize, sys::ncclDataType_t, sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<()> {
        let mut targets = Vec::with_capacity(bufs.len());
        for t in bufs {
            targets.push(self.address(t)?);
        }
        self.stream.context().bind_to_thread().map_err(|e| cuda_err("selecting the GPU for NCCL", e))?;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        // SAFETY: group calls bracket the collectives below.
        check(what, unsafe { sys::ncclGroupStart() }, self.comm)?;
        let mut failed = None;
        for &(ptr, n, dtype) in &targets {
            let code = call(ptr, n, dtype, self.comm, stream);
            if code != sys::ncclResult_t::ncclSuccess && failed.is_none() {
                failed = Some(code);
            }
        }
        // SAFETY: closes the group opened above.
        let end = unsafe { sys::ncclGroupEnd() };
        if let Some(code) = failed {
            return Err(nccl_err(what, code, self.comm));
        }
        check(what, end, self.comm)?;
        let event = self
            .stream
            .record_event(Some(cu::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| cuda_err("recording an event after a collective", e))?;
        self.watchdog.follow(what, event);
        Ok(())
    }

    /// (device address, elements, NCCL type) of a contiguous f32 or f64 CUDA tensor on this
    /// group's device.
    fn address(&self, t: &Tensor) -> Result<(u64, usize, sys::ncclDataType_t)> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(CudaStorage { slice, device }) = &*storage else {
            return Err(Error::Dist("NCCL collectives take CUDA tensors".into()));
        };
        if !layout.is_contiguous() || !device.same_device(&self.device) {
            return Err(Error::Dist("NCCL collectives take contiguous tensors on this rank's GPU".into()));
        }
        let offset = layout.start_offset();
        // The guards cudarc returns are dropped at once: sound on megabyte's one stream (see
        // `gpu::single_stream`), on which the collectives run too.
        let (base, size, dtype) = match slice {
            CudaStorageSlice::F32(x) => (x.device_ptr(&self.stream).0, 4, sys::ncclDataType_t::ncclFloat32),
            CudaStorageSlice::F64(x) => (x.device_ptr(&self.stream).0, 8, sys::ncclDataType_t::ncclFloat64),
            _ => return Err(Error::Dist(format!("NCCL collectives here take f32 or f64, not {:?}", t.dtype()))),
        };
        debug_assert!(matches!(t.dtype(), DType::F32 | DType::F64));
        Ok((base + (offset * size) as u64, t.elem_count(), dtype))
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// In place, one ncclAllReduce per buffer in one NCCL group.
    fn all_reduce_sum(&mut self, bufs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.grouped("all-reduce", &bufs, |ptr, n, dtype, comm, stream| {
            // SAFETY: ptr covers n elements of dtype on this GPU, written only by this
            // collective until the stream passes it (the caller's buffers are its own).
            unsafe { sys::ncclAllReduce(ptr as *const _, ptr as *mut _, n, dtype, sys::ncclRedOp_t::ncclSum, comm, stream) }
        })?;
        Ok(bufs)
    }

    /// In place, one ncclBroadcast per buffer in one NCCL group.
    fn broadcast(&mut self, bufs: Vec<Tensor>, root: usize) -> Result<Vec<Tensor>> {
        if root >= self.world {
            return Err(Error::Dist(format!("broadcast from rank {root} of {}", self.world)));
        }
        self.grouped("broadcast", &bufs, |ptr, n, dtype, comm, stream| {
            // SAFETY: as for the all-reduce.
            unsafe { sys::ncclBroadcast(ptr as *const _, ptr as *mut _, n, dtype, root as i32, comm, stream) }
        })?;
        Ok(bufs)
    }

    /// Waits for the queued work, then finalizes and destroys the communicator (under the
    /// watchdog: a peer that never finalizes cannot hang this rank).
    fn finish(&mut self) -> Result<()> {
        if self.comm.is_null() {
            return Ok(());
        }
        self.stream.synchronize().map_err(|e| cuda_err("waiting for the last collectives", e))?;
        let comm = self.comm;
        let _phase = self.watchdog.phase("closing the NCCL communicator (ncclCommFinalize)");
        // SAFETY: a live communicator with no queued work; it is not used again.
        check("finalize", unsafe { sys::ncclCommFinalize(comm) }, comm)?;
        // Out of the watchdog's hands before it is destroyed (it may be checking it right now).
        let watched = self.watchdog.take();
        self.comm = std::ptr::null_mut();
        if watched.is_null() {
            // The watchdog took it first: it aborts it and ends the process.
            return Err(Error::Dist("the NCCL watchdog stopped this rank while it closed the communicator".into()));
        }
        // SAFETY: as above.
        check("destroy", unsafe { sys::ncclCommDestroy(comm) }, std::ptr::null_mut())
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // Leaving without `finish` (an error on this rank): abort, which never waits for
            // the other ranks; the watchdog now follows only the abort itself.
            let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
            // Null when the watchdog took it first: it aborts it itself and ends the process,
            // and a second abort would free it twice.
            if !self.watchdog.take().is_null() {
                self.watchdog.forget();
                let _phase = self.watchdog.phase("aborting the NCCL communicator after an error");
                // SAFETY: a live communicator, not used again (the watchdog no longer has it).
                unsafe {
                    sys::ncclCommAbort(comm);
                }
            }
        }
        self.watchdog.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// The watchdog.

/// Something this rank waits for: a collective (its event) or a host-side phase (no event,
/// removed when it ends).
struct Pending {
    id: u64,
    what: String,
    since: Instant,
    event: Option<CudaEvent>,
}

struct WatchState {
    ctx: Arc<CudaContext>,
    timeout: Duration,
    pending: Mutex<VecDeque<Pending>>,
    next_id: AtomicU64,
    /// The communicator to check for asynchronous errors (its address; 0: none). The watchdog
    /// holds the lock across its NCCL calls on it, so once [`Watchdog::take`] has returned it,
    /// the watchdog no longer touches it and it may be destroyed or aborted.
    comm: Mutex<usize>,
    stop: AtomicBool,
    report: Box<dyn Fn(&str) + Send + Sync>,
}

/// A thread that ends the process when this rank waits on the others longer than the timeout
/// or NCCL reports an error.
struct Watchdog {
    state: Arc<WatchState>,
    thread: Option<JoinHandle<()>>,
}

/// A host-side phase under the watchdog, until dropped.
struct Phase<'a> {
    state: &'a WatchState,
    id: u64,
}

impl Drop for Phase<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.state.pending.lock() {
            p.retain(|x| x.id != self.id);
        }
    }
}

impl Watchdog {
    fn start(ctx: Arc<CudaContext>, timeout: Duration, report: Box<dyn Fn(&str) + Send + Sync>) -> Self {
        let state = Arc::new(WatchState {
            ctx,
            timeout,
            pending: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(0),
            comm: Mutex::new(0),
            stop: AtomicBool::new(false),
            report,
        });
        let s = state.clone();
        let thread = std::thread::Builder::new().name("nccl-watchdog".into()).spawn(move || s.run()).ok();
        Watchdog { state, thread }
    }

    /// The communicator whose asynchronous errors to check (null: none).
    fn watch(&self, comm: sys::ncclComm_t) {
        *self.state.comm.lock().unwrap_or_else(|e| e.into_inner()) = comm as usize;
    }

    /// Stops checking the communicator and returns it: null when there was none, or when
    /// the watchdog has taken it to abort it (and is ending the process).
    fn take(&self) -> sys::ncclComm_t {
        self.state.take_comm()
    }

    fn phase(&self, what: &str) -> Phase<'_> {
        let id = self.push(what, None);
        Phase { state: &self.state, id }
    }

    fn follow(&self, what: &str, event: CudaEvent) {
        self.push(what, Some(event));
    }

    fn push(&self, what: &str, event: Option<CudaEvent>) -> u64 {
        let id = self.state.next_id.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut p) = self.state.pending.lock() {
            p.push_back(Pending { id, what: what.to_string(), since: Instant::now(), event });
        }
        id
    }

    /// Stops following what is pending.
    fn forget(&self) {
        if let Ok(mut p) = self.state.pending.lock() {
            p.clear();
        }
    }

    fn stop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

impl WatchState {
    fn run(&self) {
        let tick = (self.timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let _ = self.ctx.bind_to_thread();
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(tick);
            if let Some(problem) = self.check() {
                if self.stop.load(Ordering::SeqCst) {
                    return; // closing down: nothing is waited for any more
                }
                self.fault(&problem);
            }
        }
    }

    /// The watched communicator, no longer watched (see [`Watchdog::take`]).
    fn take_comm(&self) -> sys::ncclComm_t {
        std::mem::take(&mut *self.comm.lock().unwrap_or_else(|e| e.into_inner())) as sys::ncclComm_t
    }

    /// What is wrong, if anything.
    fn check(&self) -> Option<String> {
        let watched = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let comm = *watched as sys::ncclComm_t;
        if !comm.is_null() {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator (taken out under this lock before it is destroyed)
            // and an out-pointer.
            let code = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            if code == sys::ncclResult_t::ncclSuccess
                && state != sys::ncclResult_t::ncclSuccess
                && state != sys::ncclResult_t::ncclInProgress
            {
                let detail = last_error(comm);
                return Some(format!(
                    "NCCL reported {state:?}{}: another rank probably failed (see its error)",
                    if detail.is_empty() { String::new() } else { format!(" ({detail})") }
                ));
            }
        }
        drop(watched);
        let mut pending = self.pending.lock().ok()?;
        // Collectives finish in order: drop the finished ones at the front.
        while let Some(front) = pending.front() {
            match front.event.as_ref().map(|e| e.try_is_complete()) {
                Some(Ok(true)) => {
                    pending.pop_front();
                }
                Some(Err(e)) => return Some(format!("CUDA failed during {} ({e})", front.what)),
                Some(Ok(false)) | None => break,
            }
        }
        let late = pending.iter().find(|p| {
            p.since.elapsed() > self.timeout && !matches!(p.event.as_ref().map(|e| e.try_is_complete()), Some(Ok(true)))
        })?;
        Some(format!(
            "{} has not finished after {:.0} s (--nccl-timeout): another rank died, hangs or is far behind",
            late.what,
            self.timeout.as_secs_f64()
        ))
    }

    /// Reports `problem`, aborts the communicator (waiting at most 10 s for that) and ends the
    /// process.
    fn fault(&self, problem: &str) -> ! {
        (self.report)(&format!("{problem}; stopping this rank"));
        let comm = self.take_comm();
        if !comm.is_null() {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let comm = comm as usize;
            std::thread::spawn(move || {
                // SAFETY: the communicator is live; the process ends right after.
                unsafe {
                    sys::ncclCommAbort(comm as sys::ncclComm_t);
                }
                let _ = done_tx.send(());
            });
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        }
        // _exit, not exit: the main thread may be blocked in CUDA, and exit's handlers could
        // wait for it.
        // SAFETY: ends the process at once.
        unsafe { libc::_exit(WATCHDOG_EXIT) }
    }
}
