//! How long a worker waits before it tries the coordinator again: doubling from `min` up to
//! `max`, and back to `min` once it got through. Each wait is drawn from the upper half of
//! its step ("equal jitter"), so workers cut off at the same instant (a coordinator
//! restart) spread their retries instead of knocking together.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The worker's policy: 200 ms, doubling up to 5 s.
    pub fn reconnect() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(5))
    }

    /// The attempt got through (the worker registered): start again from `min`.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The wait before the next attempt: uniform in [step/2, step].
    pub fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step / 2 + spread(step / 2)
    }
}

/// A uniformly random duration in [0, d]: e.g. the phase of a worker's first heartbeat, so
/// that workers which registered together do not heartbeat in the same instant forever.
pub fn spread(d: Duration) -> Duration {
    let r = stackwise_proto::random_bytes(8);
    let unit = u64::from_le_bytes(r.try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    d.mul_f64(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter_in_the_upper_half_and_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(5000));
        let steps = [200, 400, 800, 1600, 3200, 5000, 5000];
        let mut waits = Vec::new();
        for _ in 0..50 {
            b.reset();
            for step in steps {
                let w = b.next_wait();
                assert!(
                    w >= ms(step) / 2 && w <= ms(step),
                    "{w:?} for step {step} ms"
                );
                waits.push(w);
            }
        }
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(
            distinct.len() > waits.len() / 2,
            "waits are jittered: {} distinct of {}",
            distinct.len(),
            waits.len()
        );
    }
}
