//! Crash points for the durability tests, as SQLite and FoundationDB test theirs: the process
//! aborts (as `kill -9` would) at a chosen instant, and `runbook resume` must recover from it.
//! Both are read from the environment and documented in docs/operations.md:
//!
//! - `RUNBOOK_CRASH_AFTER_APPEND=N`: right after the N-th journal record of the bundle;
//! - `RUNBOOK_CRASH_IN_SEAL=K`: right after the K-th file operation of sealing (a temporary
//!   file written and synced, a rename), counted from the moment the run's end is recorded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The journal record after which to abort, if any.
pub(crate) fn after_append() -> Option<u64> {
    number("RUNBOOK_CRASH_AFTER_APPEND")
}

static SEALING: AtomicBool = AtomicBool::new(false);
static SEAL_OPS: AtomicU64 = AtomicU64::new(0);

/// From now on, file operations count as sealing's.
pub(crate) fn sealing_starts() {
    SEALING.store(true, Ordering::SeqCst);
}

/// One file operation of sealing is done: abort here if this is the chosen one.
pub(crate) fn sealing_step() {
    if !SEALING.load(Ordering::SeqCst) {
        return;
    }
    let k = SEAL_OPS.fetch_add(1, Ordering::SeqCst) + 1;
    if number("RUNBOOK_CRASH_IN_SEAL") == Some(k) {
        std::process::abort();
    }
}

fn number(var: &str) -> Option<u64> {
    std::env::var(var).ok().and_then(|n| n.parse().ok())
}
