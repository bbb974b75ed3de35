//! A `Comm` that adds up the time its collectives take, so each step can report how long it
//! spent in all-reduce (`allreduce_seconds` in the step metrics).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::{Comm, CommError};

pub struct Timed {
    inner: Box<dyn Comm>,
    /// Nanoseconds spent in collectives since the reader last took them.
    spent: Arc<AtomicU64>,
}

impl Timed {
    /// Wrap `inner`; the time goes to `spent` (take it with `swap(0)`).
    pub fn new(inner: Box<dyn Comm>, spent: Arc<AtomicU64>) -> Self {
        Self { inner, spent }
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut dyn Comm) -> T) -> T {
        let t = Instant::now();
        let r = f(self.inner.as_mut());
        self.spent
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

impl Comm for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.timed(|c| c.all_reduce_sum(buf))
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        self.timed(|c| c.broadcast(buf, root))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.timed(|c| c.barrier())
    }
}
