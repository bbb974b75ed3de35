//! Allocator tuning for training. Training frees and re-allocates the same large activation
//! and gradient buffers every step; by default mimalloc hands freed memory back to the OS
//! (purge) and the kernel then zeroes fresh pages on the next touch, which measured as ~36 % of
//! a CPU training step here (`perf`: `clear_page_erms`). Binaries that use mimalloc as their
//! global allocator call [`tune_for_training`] first thing in `main`.

use libmimalloc_sys as mi;

// Indices in mimalloc v3's `mi_option_e` (include/mimalloc.h of the vendored source); the
// crate does not export constants for these two.
const MI_OPTION_ARENA_EAGER_COMMIT: mi::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: mi::mi_option_t = 15;

/// Never purge freed memory back to the OS, and commit arenas eagerly. Safe at any time;
/// most effective before the first large allocation.
pub fn tune_for_training() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option table.
    unsafe {
        mi::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        mi::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 1);
    }
}
