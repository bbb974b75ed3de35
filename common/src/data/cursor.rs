//! The global data cursor (DESIGN §4): the sample order is a pure function of `(seed, epoch)`
//! and the cursor is the global sample index, so a run resumes at exactly the same sample
//! whatever the number of workers.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// Position inside the epoch's permutation.
    pub index: u64,
}

/// Permutation of `0..n` for `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    Rng::derive(seed, &format!("epoch-{epoch}")).shuffle(&mut order);
    order
}

/// The rows of a global batch of `batch` rows that rank `rank` of `world` takes: a
/// contiguous slice, so the ranks' slices in rank order are the global batch.
pub fn rank_rows(batch: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    assert!(
        world > 0 && rank < world && batch.is_multiple_of(world),
        "batch {batch} over {world} ranks"
    );
    let per = batch / world;
    rank * per..(rank + 1) * per
}

impl Cursor {
    pub fn start() -> Self {
        Self { epoch: 0, index: 0 }
    }

    /// The next `count` sample indices (crossing epochs as needed), advancing the cursor.
    pub fn take(
        &mut self,
        count: usize,
        n: usize,
        seed: u64,
        order: &mut Option<(u64, Vec<u32>)>,
    ) -> Vec<usize> {
        assert!(n > 0, "cannot draw samples from an empty split");
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            if order.as_ref().is_none_or(|(e, _)| *e != self.epoch) {
                *order = Some((self.epoch, epoch_order(n, seed, self.epoch)));
            }
            let perm = &order.as_ref().expect("set above").1;
            out.push(perm[self.index as usize] as usize);
            self.index += 1;
            if self.index as usize >= n {
                self.epoch += 1;
                self.index = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_slices_concatenate_to_the_global_batch() {
        for (batch, world) in [(8, 1), (8, 2), (8, 4), (12, 3), (6, 6)] {
            let joined: Vec<usize> = (0..world)
                .flat_map(|r| rank_rows(batch, world, r))
                .collect();
            assert_eq!(joined, (0..batch).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_resumed_run_sees_the_same_samples_with_any_world_size() {
        // 1 rank x 3 steps of 4 == 2 ranks x (2 steps, resume, 1 step) of 2 rows each.
        let (n, seed, batch) = (10, 3, 4);
        let mut one = (Cursor::start(), None);
        let single: Vec<usize> = (0..3)
            .flat_map(|_| one.0.take(batch, n, seed, &mut one.1))
            .collect();
        let mut two = (Cursor::start(), None);
        let mut split = Vec::new();
        for step in 0..3 {
            if step == 2 {
                // "Resume": a fresh order cache from the saved cursor.
                two.1 = None;
            }
            let global = two.0.take(batch, n, seed, &mut two.1);
            for r in 0..2 {
                split.extend(global[rank_rows(batch, 2, r)].iter().copied());
            }
        }
        assert_eq!(single, split);
    }

    #[test]
    fn order_is_a_pure_function_and_resume_continues_it() {
        let mut cache = None;
        let mut full = Cursor::start();
        let all = full.take(25, 10, 3, &mut cache);
        let mut a = Cursor::start();
        let mut first = a.take(12, 10, 3, &mut None);
        let mut resumed = a; // as saved in a checkpoint
        first.extend(resumed.take(13, 10, 3, &mut None));
        assert_eq!(all, first);
        assert_eq!(full, resumed);
        let mut e0 = all[..10].to_vec();
        e0.sort();
        assert_eq!(
            e0,
            (0..10).collect::<Vec<_>>(),
            "each epoch is a permutation"
        );
        assert_ne!(all[..10], all[10..20], "epochs are shuffled differently");
    }
}
