//! The frame ahead of every ring collective's data: the previous rank's must equal this
//! rank's, so ranks out of step fail at once with both sides named instead of mixing up
//! buffers or waiting for bytes that never come.

use std::io::Read;
use std::net::TcpStream;

use super::CommError;

/// Which collective a frame announces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Op {
    AllReduce,
    Broadcast { root: u32 },
    Unknown(u32, u32),
}

/// Sent ahead of every collective's data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Frame {
    pub op: Op,
    pub seq: u64,
    pub floats: u64,
}

impl Frame {
    pub const SIZE: usize = 24;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let (op, root) = match self.op {
            Op::AllReduce => (1, 0),
            Op::Broadcast { root } => (2, root),
            Op::Unknown(op, root) => (op, root),
        };
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&op.to_le_bytes());
        b[4..8].copy_from_slice(&root.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.floats.to_le_bytes());
        b
    }

    fn decode(b: &[u8; Self::SIZE]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let op = match (u32_at(0), u32_at(4)) {
            (1, 0) => Op::AllReduce,
            (2, root) => Op::Broadcast { root },
            (op, root) => Op::Unknown(op, root),
        };
        Self {
            op,
            seq: u64_at(8),
            floats: u64_at(16),
        }
    }

    fn describe(&self) -> String {
        let what = match self.op {
            Op::AllReduce => "an all-reduce".to_string(),
            Op::Broadcast { root } => format!("a broadcast from rank {root}"),
            Op::Unknown(op, _) => format!("an unknown collective ({op})"),
        };
        format!(
            "collective #{} ({what} of {} floats)",
            self.seq, self.floats
        )
    }

    /// Read the previous rank's frame and compare it with `self`.
    pub fn check(&self, prev: &TcpStream, rank: usize, world: usize) -> Result<(), CommError> {
        let mut b = [0u8; Self::SIZE];
        let mut prev = prev;
        prev.read_exact(&mut b)?;
        let theirs = Self::decode(&b);
        if theirs != *self {
            return Err(CommError::OutOfStep(format!(
                "rank {} is at {}, rank {rank} at {}",
                (rank + world - 1) % world,
                theirs.describe(),
                self.describe()
            )));
        }
        Ok(())
    }
}
