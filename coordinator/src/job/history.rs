//! The run's curves as the coordinator saw them (rank 0's step reports), for the dashboard:
//! loss, tokens/s and learning rate per step, validation loss where it was measured. Bounded:
//! past [`History::CAP`] points every other one is dropped and the stride doubles, so a long
//! run keeps its whole shape in a fixed memory.

use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub step: u64,
    pub loss: f64,
    pub tokens_per_s: f64,
    pub lr: f64,
}

#[derive(Debug, Clone, Default)]
pub struct History {
    points: Vec<Point>,
    val: Vec<(u64, f64)>,
    stride: u64,
}

impl History {
    pub const CAP: usize = 2048;

    /// Rank 0 finished `p.step`. A step at or before the last one recorded means the group
    /// went back to a checkpoint: the points past it are replaced by the new ones.
    pub fn record(&mut self, p: Point, val_loss: Option<f64>) {
        self.points.retain(|q| q.step < p.step);
        self.val.retain(|(s, _)| *s < p.step);
        if let Some(v) = val_loss {
            self.val.push((p.step, v));
        }
        let stride = self.stride.max(1);
        // Always the newest point; older ones only on the stride.
        if let Some(last) = self.points.last()
            && last.step % stride != 0
        {
            self.points.pop();
        }
        self.points.push(p);
        if self.points.len() > Self::CAP {
            self.stride = stride * 2;
            let s = self.stride;
            let newest = self.points.len() - 1;
            let mut i = 0;
            self.points.retain(|q| {
                i += 1;
                q.step % s == 0 || i - 1 == newest
            });
        }
    }

    pub fn points(&self) -> &[Point] {
        &self.points
    }

    pub fn val(&self) -> &[(u64, f64)] {
        &self.val
    }

    /// Columns for the dashboard's charts (NaN, which JSON lacks, as null).
    pub fn to_json(&self) -> Value {
        let num = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
        json!({
            "step": self.points.iter().map(|p| p.step).collect::<Vec<_>>(),
            "loss": self.points.iter().map(|p| num(p.loss)).collect::<Vec<_>>(),
            "tokens_per_s": self.points.iter().map(|p| num(p.tokens_per_s)).collect::<Vec<_>>(),
            "lr": self.points.iter().map(|p| num(p.lr)).collect::<Vec<_>>(),
            "val_step": self.val.iter().map(|v| v.0).collect::<Vec<_>>(),
            "val_loss": self.val.iter().map(|v| num(v.1)).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(step: u64) -> Point {
        Point {
            step,
            loss: 10.0 - step as f64 * 1e-3,
            tokens_per_s: 100.0,
            lr: 1e-3,
        }
    }

    #[test]
    fn a_recovery_replaces_the_steps_after_the_checkpoint() {
        let mut h = History::default();
        for s in 1..=15 {
            h.record(p(s), (s % 5 == 0).then_some(s as f64));
        }
        // The group went back to the checkpoint at step 10 and trains step 11 again.
        h.record(Point { loss: 1.0, ..p(11) }, None);
        let steps: Vec<u64> = h.points().iter().map(|q| q.step).collect();
        assert_eq!(steps, (1..=11).collect::<Vec<_>>());
        assert_eq!(h.points().last().unwrap().loss, 1.0);
        assert_eq!(h.val(), &[(5, 5.0), (10, 10.0)]);
    }

    #[test]
    fn a_long_run_stays_bounded_and_keeps_its_first_and_newest_steps() {
        let mut h = History::default();
        for s in 1..=100_000 {
            h.record(p(s), None);
            assert!(h.points().len() <= History::CAP);
        }
        let pts = h.points();
        assert_eq!(pts.last().unwrap().step, 100_000);
        assert!(pts.len() > History::CAP / 4, "{}", pts.len());
        assert!(pts.first().unwrap().step <= 64, "{}", pts[0].step);
        assert!(pts.windows(2).all(|w| w[0].step < w[1].step));
    }
}
