//! The collective interface every backend implements: `Comm` over flat `f32` buffers, its
//! error, and how a buffer is cut into per-rank chunks.

/// Why a collective failed. After an error the communicator is unusable; the group is
/// re-formed by the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("peer connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("ring setup: {0}")]
    Setup(String),
    #[error("the collective was aborted")]
    Aborted,
    #[error("nccl: {0}")]
    Nccl(String),
    #[error("ranks out of step: {0}")]
    OutOfStep(String),
    #[error("collective timed out: {0}")]
    Timeout(String),
}

/// A group of `world_size` ranks that reduce and share buffers. Every rank calls the same
/// collectives in the same order with buffers of the same length.
pub trait Comm: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks, in place. Every rank gets bitwise the same result,
    /// and the summation order is fixed, so it does not depend on timing.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Copy `root`'s buffer to every rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Return once every rank has called it.
    fn barrier(&mut self) -> Result<(), CommError> {
        self.all_reduce_sum(&mut [0.0])
    }
}

/// `dst += src`, element by element: the ring's reduce step, over TCP and shared memory alike.
pub(crate) fn add_assign(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// `[start, end)` of chunk `c` when `n` elements are split into `parts` near-equal chunks.
pub(crate) fn chunk_range(n: usize, parts: usize, c: usize) -> std::ops::Range<usize> {
    (c * n / parts)..((c + 1) * n / parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_exactly() {
        for n in [0, 1, 5, 7, 100, 1001] {
            for parts in 1..=5 {
                let mut next = 0;
                for c in 0..parts {
                    let r = chunk_range(n, parts, c);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
