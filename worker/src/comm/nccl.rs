//! NCCL all-reduce for CUDA workers (feature `cuda`). The unique id is created by rank 0
//! (`new_id`), sent to the coordinator and relayed to the other ranks, never through a file.
//! A communicator belongs to one generation; the next generation builds a new one.
//!
//! The `Comm` trait works on host buffers, so a collective copies host → device → host.
//! Untested here (no GPU on the CI machine); only compiled by `.ci/run`.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm as NcclComm, Id, ReduceOp};

use super::{Comm, CommError};

fn err(e: impl std::fmt::Debug) -> CommError {
    CommError::Nccl(format!("{e:?}"))
}

/// A fresh NCCL unique id (128 bytes), made by rank 0.
pub fn new_id() -> Result<Vec<u8>, CommError> {
    let id = Id::new().map_err(err)?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

pub struct Nccl {
    comm: NcclComm,
    stream: Arc<CudaStream>,
    staging: Option<CudaSlice<f32>>,
}

// SAFETY: the communicator is used by one thread at a time (`&mut self`); NCCL only forbids
// concurrent calls on the same communicator.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Join the generation's communicator as `rank` of `world` on GPU `ordinal`.
    pub fn new(ordinal: usize, rank: usize, world: usize, id: &[u8]) -> Result<Self, CommError> {
        let raw: [std::ffi::c_char; 128] = id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| CommError::Nccl(format!("unique id has {} bytes, not 128", id.len())))?;
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        let stream = ctx.default_stream();
        let comm =
            NcclComm::from_rank(stream.clone(), rank, world, Id::uninit(raw)).map_err(err)?;
        Ok(Self {
            comm,
            stream,
            staging: None,
        })
    }

    fn staging(&mut self, n: usize) -> Result<&mut CudaSlice<f32>, CommError> {
        if self.staging.as_ref().is_none_or(|s| s.len() != n) {
            self.staging = Some(self.stream.alloc_zeros::<f32>(n).map_err(err)?);
        }
        Ok(self.staging.as_mut().expect("allocated above"))
    }
}

impl Comm for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        let stream = self.stream.clone();
        let dev = self.staging(buf.len())?;
        stream.memcpy_htod(buf, dev).map_err(err)?;
        self.comm
            .all_reduce_in_place(self.staging.as_mut().expect("staged"), &ReduceOp::Sum)
            .map_err(err)?;
        stream
            .memcpy_dtoh(self.staging.as_ref().expect("staged"), buf)
            .map_err(err)?;
        stream.synchronize().map_err(err)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        let stream = self.stream.clone();
        let dev = self.staging(buf.len())?;
        stream.memcpy_htod(buf, dev).map_err(err)?;
        self.comm
            .broadcast_in_place(self.staging.as_mut().expect("staged"), root as i32)
            .map_err(err)?;
        stream
            .memcpy_dtoh(self.staging.as_ref().expect("staged"), buf)
            .map_err(err)?;
        stream.synchronize().map_err(err)
    }
}
