//! The process exit codes every command shares (listed in `runbook --help` and docs).

pub const OK: i32 = 0;
pub const RUN_FAILED: i32 = 1;
pub const USAGE: i32 = 2;
pub const VERIFY_FAILED: i32 = 3;
pub const AWAITING_APPROVAL: i32 = 4;
/// A `[drill]` run whose steps succeeded but whose RTO/RPO was missed or not measured.
pub const DRILL_FAILED: i32 = 5;
pub const INTERRUPTED: i32 = 130;
