//! NCCL all-reduce for CUDA workers (feature `cuda`). The unique id is created by rank 0
//! (`new_id`), sent to the coordinator and relayed to the other ranks, never through a file.
//! A communicator belongs to one generation; the next generation builds a new one.
//!
//! Never hung, by construction:
//! - `ncclCommInitRank` runs on a helper thread and is given up after the connect timeout (a
//!   peer that never joins); a communicator it makes after that is aborted.
//! - A collective is enqueued, then its completion is polled (a CUDA event) instead of
//!   blocking in `cudaStreamSynchronize`. Between polls the loop checks the abort flag,
//!   `ncclCommGetAsyncError` (a lost peer) and the collective timeout; on any of them it
//!   calls `ncclCommAbort`, which ends the kernels waiting for peers.
//! - [`NcclAbort`] (the worker's stop path when the coordinator ends a generation) sets the
//!   flag, and aborts the communicator itself if the owning thread has not done so within
//!   2 s (it may be blocked inside an NCCL call), as PyTorch's NCCL watchdog does.
//!
//! The `Comm` trait works on host buffers, so a collective copies host → device → host.
//! Untested here (no GPU on the CI machine); only compiled by `.ci/run`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut};
use cudarc::nccl::{Id, result, sys};

use super::{Comm, CommError};

fn err(e: impl std::fmt::Debug) -> CommError {
    CommError::Nccl(format!("{e:?}"))
}

/// A fresh NCCL unique id (128 bytes), made by rank 0.
pub fn new_id() -> Result<Vec<u8>, CommError> {
    check_library()?;
    let id = Id::new().map_err(err)?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// cudarc opens libnccl on first use and panics when it is missing: say so first.
fn check_library() -> Result<(), CommError> {
    // SAFETY: dlopen of the library by name, and dlclose; no symbol of it is called.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(CommError::Nccl(
        "libnccl is not on the loader's path (PyTorch's nvidia-nccl wheel has it as libnccl.so.2, \
         which cudarc does not look for: link it as libnccl.so in a folder on LD_LIBRARY_PATH)"
            .into(),
    ))
}

/// The raw communicator, aborted exactly once: by a collective that failed or timed out,
/// by [`NcclAbort`], or on drop.
struct Raw {
    /// `ncclComm_t` as an address, so the handle can cross threads; `None` once aborted.
    comm: Mutex<Option<usize>>,
}

impl Raw {
    fn get(&self) -> Option<sys::ncclComm_t> {
        let g = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        g.map(|c| c as sys::ncclComm_t)
    }

    fn abort(&self) {
        let taken = self.comm.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = taken {
            // SAFETY: `c` came from ncclCommInitRank and is aborted only here, once.
            if let Err(e) = unsafe { result::comm_abort(c as sys::ncclComm_t) } {
                tracing::warn!("ncclCommAbort: {e:?}");
            }
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Ends a generation's communicator from another thread.
#[derive(Clone)]
pub struct NcclAbort {
    raw: Arc<Raw>,
    aborted: Arc<AtomicBool>,
}

impl NcclAbort {
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        let raw = self.raw.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            raw.abort();
        });
    }
}

pub struct Nccl {
    raw: Arc<Raw>,
    aborted: Arc<AtomicBool>,
    rank: usize,
    world: usize,
    stream: Arc<CudaStream>,
    staging: Option<CudaSlice<f32>>,
    collective_timeout: Duration,
}

// SAFETY: the communicator is used by one thread at a time (`&mut self`); NCCL only forbids
// concurrent calls on the same communicator, and ncclCommAbort is the documented way to end
// one from another thread.
unsafe impl Send for Nccl {}

/// Which collective to enqueue.
enum Op {
    AllReduce,
    Broadcast(i32),
}

impl Nccl {
    /// Join the generation's communicator as `rank` of `world` on GPU `ordinal`, giving up
    /// after `connect_timeout`.
    pub fn new(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: &[u8],
        connect_timeout: Duration,
        collective_timeout: Duration,
    ) -> Result<Self, CommError> {
        check_library()?;
        let internal: [std::ffi::c_char; 128] = id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| CommError::Nccl(format!("unique id has {} bytes, not 128", id.len())))?;
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        let stream = ctx.default_stream();
        let (tx, rx) = std::sync::mpsc::channel::<Result<usize, CommError>>();
        let init_ctx = ctx.clone();
        std::thread::spawn(move || {
            let made = init_ctx.bind_to_thread().map_err(err).and_then(|()| {
                let mut comm = std::mem::MaybeUninit::<sys::ncclComm_t>::uninit();
                // SAFETY: `comm` is written by NCCL before it is read.
                unsafe {
                    result::comm_init_rank(
                        comm.as_mut_ptr(),
                        world as i32,
                        sys::ncclUniqueId { internal },
                        rank as i32,
                    )
                    .map_err(err)?;
                    Ok(comm.assume_init() as usize)
                }
            });
            if let Err(std::sync::mpsc::SendError(Ok(late))) = tx.send(made) {
                // The caller gave up waiting: this communicator belongs to nobody.
                drop(Raw {
                    comm: Mutex::new(Some(late)),
                });
            }
        });
        let comm = match rx.recv_timeout(connect_timeout) {
            Ok(made) => made?,
            Err(_) => {
                return Err(CommError::Setup(format!(
                    "ncclCommInitRank did not complete within {connect_timeout:?}: a rank did not join"
                )));
            }
        };
        Ok(Self {
            raw: Arc::new(Raw {
                comm: Mutex::new(Some(comm)),
            }),
            aborted: Arc::new(AtomicBool::new(false)),
            rank,
            world,
            stream,
            staging: None,
            collective_timeout,
        })
    }

    pub fn abort_handle(&self) -> NcclAbort {
        NcclAbort {
            raw: self.raw.clone(),
            aborted: self.aborted.clone(),
        }
    }

    fn staging(&mut self, n: usize) -> Result<&mut CudaSlice<f32>, CommError> {
        if self.staging.as_ref().is_none_or(|s| s.len() != n) {
            self.staging = Some(self.stream.alloc_zeros::<f32>(n).map_err(err)?);
        }
        Ok(self.staging.as_mut().expect("allocated above"))
    }

    /// Abort the communicator and return `e` (or `Aborted` when that was asked).
    fn fail(&self, e: CommError) -> CommError {
        self.raw.abort();
        if self.aborted.load(Ordering::SeqCst) {
            CommError::Aborted
        } else {
            e
        }
    }

    /// Wait for `event` without blocking inside CUDA, watching for an abort, an
    /// asynchronous NCCL error and the timeout.
    fn wait(
        &self,
        event: &cudarc::driver::CudaEvent,
        comm: sys::ncclComm_t,
    ) -> Result<(), CommError> {
        let deadline = Instant::now() + self.collective_timeout;
        let mut nap = Duration::from_micros(20);
        loop {
            if event.try_is_complete().map_err(err)? {
                return Ok(());
            }
            if self.aborted.load(Ordering::SeqCst) {
                return Err(CommError::Aborted);
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is live (not aborted: the flag is checked above and only this
            // thread aborts before the 2 s grace of `NcclAbort`).
            unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            if !matches!(
                state,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                return Err(CommError::Nccl(format!(
                    "rank {}: asynchronous NCCL error {state:?} (a peer was lost?)",
                    self.rank
                )));
            }
            if Instant::now() > deadline {
                return Err(CommError::Timeout(format!(
                    "rank {}: an NCCL collective did not complete within {:?} (ranks out of step, or a peer stalled); \
                     raise it with {}",
                    self.rank,
                    self.collective_timeout,
                    super::COLLECTIVE_TIMEOUT_ENV
                )));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }

    fn collective(&mut self, buf: &mut [f32], op: Op) -> Result<(), CommError> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted);
        }
        let comm = self.raw.get().ok_or(CommError::Aborted)?;
        let result = (|| -> Result<(), CommError> {
            let stream = self.stream.clone();
            let dev = self.staging(buf.len())?;
            stream.memcpy_htod(buf, dev).map_err(err)?;
            let count = buf.len();
            {
                let (ptr, _guard) = dev.device_ptr_mut(&stream);
                let p = ptr as *mut std::ffi::c_void;
                let s = stream.cu_stream() as sys::cudaStream_t;
                // SAFETY: `p` is `count` f32 on this stream's device, in place.
                unsafe {
                    match op {
                        Op::AllReduce => result::all_reduce(
                            p,
                            p,
                            count,
                            sys::ncclDataType_t::ncclFloat32,
                            sys::ncclRedOp_t::ncclSum,
                            comm,
                            s,
                        ),
                        Op::Broadcast(root) => result::broadcast(
                            p,
                            p,
                            count,
                            sys::ncclDataType_t::ncclFloat32,
                            root,
                            comm,
                            s,
                        ),
                    }
                }
                .map_err(err)?;
            }
            let done = stream.record_event(None).map_err(err)?;
            self.wait(&done, comm)?;
            let dev = self.staging.as_ref().expect("staged");
            stream.memcpy_dtoh(dev, buf).map_err(err)?;
            stream.synchronize().map_err(err)
        })();
        result.map_err(|e| self.fail(e))
    }
}

impl Comm for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.collective(buf, Op::AllReduce)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.collective(buf, Op::Broadcast(root as i32))
    }
}
