//! Learning-rate schedules: a pure function of the step. Linear warmup from 0, then constant,
//! linear decay, cosine decay (Loshchilov & Hutter, SGDR) or cosine with hard restarts
//! (as `transformers.get_cosine_with_hard_restarts_schedule_with_warmup`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
    CosineWithRestarts,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Floor of the decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Cycles for `cosine_with_restarts`.
    pub cycles: u64,
}

impl Schedule {
    /// A constant `lr` without warmup (a placeholder until a stage sets its own).
    pub fn constant(lr: f64) -> Self {
        Self {
            kind: ScheduleKind::Constant,
            lr,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 0.0,
            cycles: 1,
        }
    }

    /// Learning rate for the update that takes the model from `step` to `step + 1`.
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let floor = self.min_lr_ratio;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => 1.0 - progress,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            ScheduleKind::CosineWithRestarts => {
                if progress >= 1.0 {
                    0.0
                } else {
                    let cycle_pos = (self.cycles.max(1) as f64 * progress) % 1.0;
                    0.5 * (1.0 + (std::f64::consts::PI * cycle_pos).cos())
                }
            }
        };
        self.lr * (floor + (1.0 - floor) * factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            min_lr_ratio: 0.0,
            cycles: 2,
        }
    }

    #[test]
    fn warmup_is_linear_and_reaches_the_peak() {
        let s = sched(ScheduleKind::Cosine);
        assert!((s.at(0) - 0.1).abs() < 1e-12);
        assert!((s.at(4) - 0.5).abs() < 1e-12);
        assert!((s.at(10) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn decays_have_the_right_shape() {
        let lin = sched(ScheduleKind::Linear);
        assert!((lin.at(60) - 0.5).abs() < 1e-12);
        assert!(lin.at(110).abs() < 1e-12);
        let cos = sched(ScheduleKind::Cosine);
        assert!((cos.at(60) - 0.5).abs() < 1e-12);
        assert!((cos.at(35) - 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos())).abs() < 1e-12);
        let con = sched(ScheduleKind::Constant);
        assert_eq!(con.at(100), 1.0);
        let floor = Schedule {
            min_lr_ratio: 0.1,
            ..cos
        };
        assert!((floor.at(110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn restarts_jump_back_to_the_peak() {
        let s = sched(ScheduleKind::CosineWithRestarts);
        // two cycles of 50 steps: near zero at the end of the first, peak again at its start
        assert!(s.at(59) < 0.01, "{}", s.at(59));
        assert!((s.at(60) - 1.0).abs() < 1e-12);
        assert!((s.at(35) - 0.5).abs() < 1e-12);
    }
}
