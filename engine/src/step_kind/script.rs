//! `script = "…"`: a Rhai script run by the engine; a returned map becomes the step's outputs.

use super::{any_combination, any_value, StepKindSpec};

pub const SPEC: StepKindSpec = StepKindSpec {
    key: "script",
    probe: false,
    example: "script = \"<Rhai>\"",
    keys: &[],
    required: &[],
    check: any_value,
    combination: any_combination,
    compact: |_| "script".to_owned(),
};
