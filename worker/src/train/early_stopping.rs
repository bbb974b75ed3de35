//! Early stopping (pure): a stage ends after `patience` evaluations without a new best
//! validation loss.

use super::state::TrainerState;

/// Record validation loss `v`; returns whether early stopping (`patience` evaluations
/// without a new best) ends the stage.
pub fn observe_val_loss(state: &mut TrainerState, v: f64, patience: Option<u64>) -> bool {
    state.last_val_loss = Some(v);
    if state.best_val_loss.is_none_or(|b| v < b) {
        state.best_val_loss = Some(v);
        state.evals_since_best = 0;
    } else {
        state.evals_since_best += 1;
        if patience.is_some_and(|p| state.evals_since_best >= p) {
            state.stopped_early = true;
        }
    }
    state.stopped_early
}

#[cfg(test)]
mod tests {
    use super::*;
    use stackwise_common::schedule::Schedule;

    fn state() -> TrainerState {
        TrainerState::start("r", 0, Schedule::constant(1.0), false)
    }

    #[test]
    fn early_stopping_waits_patience_evaluations_without_a_new_best() {
        let mut s = state();
        assert!(!observe_val_loss(&mut s, 3.0, Some(2)));
        assert!(!observe_val_loss(&mut s, 3.5, Some(2)));
        assert!(
            !observe_val_loss(&mut s, 2.0, Some(2)),
            "a new best resets the count"
        );
        assert!(!observe_val_loss(&mut s, 2.5, Some(2)));
        assert!(observe_val_loss(&mut s, 2.1, Some(2)));
        assert_eq!((s.best_val_loss, s.last_val_loss), (Some(2.0), Some(2.1)));
        let mut never = state();
        for v in [1.0, 2.0, 3.0, 4.0] {
            assert!(!observe_val_loss(&mut never, v, None));
        }
    }
}
