//! `upload = { src | content, dest, mode }`: puts a file (or rendered text) on each host.

use serde_json::Value;

use super::{text, Conflict, StepKindSpec};
use crate::request_check::{mode, non_empty};

pub const SPEC: StepKindSpec = StepKindSpec {
    key: "upload",
    probe: false,
    example: "upload = { dest = \"…\", content = \"…\" }",
    keys: &["src", "content", "dest", "mode"],
    required: &["dest"],
    check,
    combination,
    compact,
};

fn check(key: &str, v: &Value) -> Result<(), String> {
    match key {
        "dest" => non_empty(key, v),
        "mode" => mode(v).map(drop),
        _ => Ok(()),
    }
}

fn combination(present: &[&str]) -> Result<(), Conflict> {
    if present.contains(&"src") == present.contains(&"content") {
        return Err(Conflict {
            message: "`upload` needs exactly one of `src` (a file, relative to the runbook) and `content` (text, templates rendered)".to_owned(),
            label: "one of `src` or `content`",
        });
    }
    Ok(())
}

fn compact(settings: &Value) -> String {
    format!(
        "upload {} → {}",
        text(settings, "src").unwrap_or_else(|| "(content)".into()),
        text(settings, "dest").unwrap_or_default()
    )
}
