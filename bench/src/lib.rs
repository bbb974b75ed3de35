//! Shared helpers for the benchmark binaries (none yet beyond the binaries themselves).
