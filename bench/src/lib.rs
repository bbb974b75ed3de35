//! Shared helpers for the benchmark binaries: the simulated workers of `swarm`.

pub mod swarm;
