//! Collectives over flat `f32` buffers (DESIGN §5): `local` for one worker, `ring` (TCP,
//! CPU; `shm` links between ranks on one machine) and `nccl` (CUDA, feature `cuda`), behind the `Comm` trait (`collective.rs`).

pub mod collective;
mod frame;
mod handshake;
mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;
mod shm;
mod timed;

pub use collective::{Comm, CommError};
pub(crate) use collective::{add_assign, chunk_range};
pub use handshake::RingKey;
pub use local::Local;
pub use ring::{COLLECTIVE_TIMEOUT_ENV, Ring, RingAbort, RingListener, RingOptions, Seat};
pub use shm::SHM_ENV;
pub use timed::Timed;
