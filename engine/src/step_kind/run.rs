//! `run = "…"`: a shell command. Its settings are step keys (`shell`, `env`, `cwd`, `sudo`,
//! `pty`, …), not a table of its own.

use super::{any_combination, any_value, StepKindSpec};

pub const SPEC: StepKindSpec = StepKindSpec {
    key: "run",
    probe: false,
    example: "run = \"<shell command>\"",
    keys: &[],
    required: &[],
    check: any_value,
    combination: any_combination,
    compact: |settings| super::text(settings, "run").unwrap_or_default(),
};
