//! Who is in the job (pure: no I/O; time is passed in, so tests run on paused time).
//! Workers hold a lease renewed by every message; a worker whose lease ran out is dropped.
//! Groups are formed from live workers in registration order.

use std::collections::BTreeMap;

use stackwise_proto::model::{Capabilities, ProtoError, Registration};
use tokio::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    pub name: String,
    pub caps: Capabilities,
    pub ring_address: String,
    /// Issued at registration; the session hello must carry it.
    pub session_secret: String,
    pub last_seen: Instant,
    /// Rank in the current generation.
    pub rank: Option<u32>,
    pub step: u64,
    pub loss: f64,
    pub tokens_per_s: f64,
}

#[derive(Debug)]
pub struct Membership {
    /// Ordered by id; ids are zero-padded sequence numbers, so this is registration order.
    members: BTreeMap<String, Member>,
    next_id: u64,
    lease: Duration,
}

impl Membership {
    pub fn new(lease: Duration) -> Self {
        Self {
            members: BTreeMap::new(),
            next_id: 0,
            lease,
        }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Add a worker with a fresh id and the session secret it was issued.
    pub fn register(&mut self, reg: Registration, session_secret: String, now: Instant) -> String {
        self.next_id += 1;
        let id = format!("w{:05}", self.next_id);
        self.members.insert(
            id.clone(),
            Member {
                id: id.clone(),
                name: reg.name,
                caps: reg.capabilities,
                ring_address: reg.ring_address,
                session_secret,
                last_seen: now,
                rank: None,
                step: 0,
                loss: f64::NAN,
                tokens_per_s: 0.0,
            },
        );
        id
    }

    /// Renew `id`'s lease.
    pub fn touch(&mut self, id: &str, now: Instant) -> Result<&mut Member, ProtoError> {
        let m = self
            .members
            .get_mut(id)
            .ok_or_else(|| ProtoError::UnknownWorker(id.to_string()))?;
        m.last_seen = now;
        Ok(m)
    }

    pub fn get(&self, id: &str) -> Option<&Member> {
        self.members.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Member> {
        self.members.get_mut(id)
    }

    pub fn remove(&mut self, id: &str) -> Option<Member> {
        self.members.remove(id)
    }

    /// Drop and return the members whose lease ran out by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Member> {
        let lease = self.lease;
        let dead: Vec<String> = self
            .members
            .values()
            .filter(|m| now.duration_since(m.last_seen) > lease)
            .map(|m| m.id.clone())
            .collect();
        dead.iter()
            .filter_map(|id| self.members.remove(id))
            .collect()
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The group for a new generation: the first `w` eligible workers in registration order,
    /// where `w` is the largest size in `min..=max` (and at most the live count) that
    /// divides the global batch. Ranks are assigned in that order. None if no such group.
    pub fn form(
        &mut self,
        min: usize,
        max: usize,
        batch: usize,
        eligible: impl Fn(&str) -> bool,
    ) -> Option<Vec<String>> {
        let n = self
            .members
            .keys()
            .filter(|id| eligible(id))
            .count()
            .min(max);
        let world = (min.max(1)..=n).rev().find(|w| batch.is_multiple_of(*w))?;
        for m in self.members.values_mut() {
            m.rank = None;
        }
        let ids: Vec<String> = self
            .members
            .keys()
            .filter(|id| eligible(id))
            .take(world)
            .cloned()
            .collect();
        for (rank, id) in ids.iter().enumerate() {
            let m = self.members.get_mut(id).expect("listed above");
            m.rank = Some(rank as u32);
            m.step = 0;
            m.tokens_per_s = 0.0;
        }
        Some(ids)
    }
}

#[cfg(test)]
mod tests {
    use stackwise_proto::model::DeviceKind;

    use super::*;

    fn reg(name: &str) -> Registration {
        Registration {
            name: name.into(),
            capabilities: Capabilities {
                device_kind: DeviceKind::Cpu,
                device: "cpu".into(),
                memory_bytes: 0,
                host: "h".into(),
                cpu_threads: 1,
            },
            ring_address: "127.0.0.1:9".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_worker_is_dropped_after_its_lease_and_not_before() {
        let mut m = Membership::new(Duration::from_secs(5));
        let a = m.register(reg("a"), "sa".into(), Instant::now());
        let b = m.register(reg("b"), "sb".into(), Instant::now());
        tokio::time::advance(Duration::from_secs(3)).await;
        m.touch(&a, Instant::now()).unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            m.expire(Instant::now()).is_empty(),
            "exactly at the lease is still alive"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let dropped: Vec<_> = m.expire(Instant::now()).into_iter().map(|x| x.id).collect();
        assert_eq!(dropped, vec![b.clone()]);
        assert!(matches!(
            m.touch(&b, Instant::now()),
            Err(ProtoError::UnknownWorker(_))
        ));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(m.expire(Instant::now()).len(), 1);
        assert!(m.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn groups_follow_registration_order_and_divide_the_batch() {
        let mut m = Membership::new(Duration::from_secs(5));
        let ids: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| m.register(reg(n), format!("s{n}"), Instant::now()))
            .collect();
        assert_eq!(m.form(1, 4, 8, |_| true).unwrap(), ids);
        // 4 live, at most 3 wanted, batch 8: 3 does not divide 8, so 2.
        assert_eq!(m.form(1, 3, 8, |_| true).unwrap(), ids[..2].to_vec());
        assert_eq!(m.get(&ids[1]).unwrap().rank, Some(1));
        assert_eq!(m.get(&ids[2]).unwrap().rank, None);
        // Nothing between min and the live count divides the batch.
        assert_eq!(m.form(3, 3, 8, |_| true), None);
        m.remove(&ids[0]);
        assert_eq!(m.form(2, 4, 6, |_| true).unwrap(), ids[1..].to_vec());
        assert_eq!(m.get(&ids[1]).unwrap().rank, Some(0));
        assert_eq!(m.form(4, 4, 8, |_| true), None);
        // Only workers with an open session are eligible.
        assert_eq!(
            m.form(1, 4, 6, |id| id != ids[1]).unwrap(),
            ids[2..].to_vec()
        );
    }
}
