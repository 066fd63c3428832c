//! `tcp = { host, port, timeout }`: opens a TCP connection and closes it.

use serde_json::Value;

use super::{any_combination, text, StepKindSpec};
use crate::request_check::{non_empty, port, timeout};

pub const SPEC: StepKindSpec = StepKindSpec {
    key: "tcp",
    probe: true,
    example: "tcp = { host = \"…\", port = 22 }",
    keys: &["host", "port", "timeout"],
    required: &["host", "port"],
    check,
    combination: any_combination,
    compact,
};

fn check(key: &str, v: &Value) -> Result<(), String> {
    match key {
        "timeout" => timeout(v).map(drop),
        "port" => port(v).map(drop),
        "host" => non_empty(key, v),
        _ => Ok(()),
    }
}

fn compact(settings: &Value) -> String {
    format!(
        "tcp {}:{}",
        text(settings, "host").unwrap_or_default(),
        text(settings, "port").unwrap_or_default()
    )
}
