//! `screenshot = { url, … }`: a PNG of a page, taken with headless Chromium.

use serde_json::Value;

use super::{any_combination, text, StepKindSpec};
use crate::request_check::{boolean, table_of_strings, timeout, url};

pub const SPEC: StepKindSpec = StepKindSpec {
    key: "screenshot",
    probe: false,
    example: "screenshot = { url = \"…\" }",
    keys: &[
        "url",
        "width",
        "height",
        "wait_for",
        "full_page",
        "headers",
        "ca_file",
        "insecure_skip_verify",
        "timeout",
        "browser",
    ],
    required: &["url"],
    check,
    combination: any_combination,
    compact,
};

fn check(key: &str, v: &Value) -> Result<(), String> {
    match key {
        "timeout" => timeout(v).map(drop),
        "url" => url(v, &["http", "https", "file", "data", "about"]),
        "full_page" | "insecure_skip_verify" => boolean(key, v),
        "width" | "height" => match v.as_u64() {
            Some(1..=16_384) => Ok(()),
            _ => Err(format!(
                "`{key}` must be a number of pixels from 1 to 16384"
            )),
        },
        "headers" => table_of_strings(key, v),
        _ => Ok(()),
    }
}

fn compact(settings: &Value) -> String {
    format!("screenshot {}", text(settings, "url").unwrap_or_default())
}
