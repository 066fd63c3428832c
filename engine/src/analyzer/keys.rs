//! The keys each table of a runbook takes. Step keys are derived from the step kinds'
//! descriptors ([`crate::step_kind`]), so that a new kind needs no entry here.

use std::sync::LazyLock;

use crate::runbook::RequestKind;
use crate::step_kind::{run, script};

pub(super) const TOP_KEYS: &[&str] = &[
    "runbook", "params", "defaults", "hooks", "evidence", "steps", "drill", "notify",
];
pub(super) const DRILL_KEYS: &[&str] = &[
    "rto",
    "rpo",
    "clock_start",
    "clock_stop",
    "restored_data_time",
];
pub(super) const STRATEGY_KEYS: &[&str] = &[
    "parallel",
    "rolling",
    "max_failures",
    "pause",
    "gate",
    "gate_before_first",
];
pub(super) const EVIDENCE_KEYS: &[&str] = &["facts", "redact", "timestamp_url"];
pub(super) const NOTIFY_KEYS: &[&str] = &["url", "format", "on", "headers", "timeout", "retries"];
pub(super) const RUNBOOK_KEYS: &[&str] = &[
    "name",
    "title",
    "description",
    "refs",
    "evidence_dir",
    "allow_env",
    "inventory",
];
pub(super) const HOOK_KEYS: &[&str] = &[
    "before_run",
    "after_run",
    "before_step",
    "after_step",
    "on_failure",
];
pub(super) const PARAM_KEYS: &[&str] = &["default", "doc", "secret", "env", "required"];
pub(super) const DEFAULT_KEYS: &[&str] = &[
    "timeout",
    "retry",
    "shell",
    "env",
    "cwd",
    "kill_grace",
    "become_password",
];
/// Durations that limit something, where zero can only be a mistake.
pub(super) const NONZERO_DURATIONS: &[&str] = &["timeout", "deadline", "max_delay", "rto", "rpo"];
pub(super) const RETRY_KEYS: &[&str] = &[
    "attempts",
    "backoff",
    "delay",
    "max_delay",
    "factor",
    "jitter",
    "deadline",
];
/// A step's own keys, before the keys of the kinds with a settings table (`http`, `tcp`, …).
const STEP_KEYS: &[&str] = &[
    "id",
    "title",
    "description",
    "phase",
    "needs",
    run::SPEC.key,
    "env",
    "cwd",
    "shell",
    "timeout",
    "kill_grace",
    "retry",
    "continue_on_failure",
    "always",
    "collect",
    script::SPEC.key,
    "when",
    "until",
    "check",
    "outputs",
    "capture",
    "before",
    "after",
    "run_on_cancel",
    "approve",
    "on",
    "strategy",
    "steps",
    "sudo",
    "become_password",
    "pty",
];
/// Keys a sub-step of a block takes: no `needs`, `on` or nested blocks of its own.
const BLOCK_STEP_KEYS: &[&str] = &[
    "id",
    "title",
    "description",
    run::SPEC.key,
    "env",
    "cwd",
    "shell",
    "timeout",
    "kill_grace",
    "retry",
    "continue_on_failure",
    "always",
    "run_on_cancel",
    script::SPEC.key,
    "when",
    "until",
    "check",
    "outputs",
    "capture",
    "before",
    "after",
    "sudo",
    "become_password",
    "pty",
    "local",
];
/// Keys after the kinds' keys.
const STEP_KEYS_TAIL: &[&str] = &["plan"];

/// The keys a step (or a step in a block) takes: its own, then one per step kind with a
/// settings table, taken from the kinds' descriptors.
pub(super) fn step_keys(in_block: bool) -> &'static [&'static str] {
    fn derive(own: &[&'static str]) -> Vec<&'static str> {
        own.iter()
            .copied()
            .chain(RequestKind::ALL.into_iter().map(RequestKind::key))
            .chain(STEP_KEYS_TAIL.iter().copied())
            .collect()
    }
    static TOP: LazyLock<Vec<&str>> = LazyLock::new(|| derive(STEP_KEYS));
    static BLOCK: LazyLock<Vec<&str>> = LazyLock::new(|| derive(BLOCK_STEP_KEYS));
    if in_block {
        &BLOCK
    } else {
        &TOP
    }
}

pub(super) fn list(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_keys_hold_every_kind_once() {
        for in_block in [false, true] {
            let keys = step_keys(in_block);
            for kind in crate::step_kind::all() {
                let n = keys.iter().filter(|k| **k == kind.key).count();
                assert_eq!(n, 1, "`{}` (in block: {in_block})", kind.key);
            }
        }
        assert!(step_keys(false).contains(&"steps") && !step_keys(true).contains(&"steps"));
    }
}
