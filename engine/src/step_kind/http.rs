//! `http = { url, method, … }`: one HTTP(S) request, judged by its status. Also the one
//! `expect_status` grammar, used by `runbook check` for literal values and by the steps
//! crate's runner once templates are rendered.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{text, Conflict, StepKindSpec};
use crate::request_check::{boolean, table_of_strings, timeout, url};

pub const SPEC: StepKindSpec = StepKindSpec {
    key: "http",
    probe: true,
    example: "http = { url = \"…\" }",
    keys: &[
        "method",
        "url",
        "headers",
        "query",
        "body",
        "json",
        "form",
        "timeout",
        "expect_status",
        "follow_redirects",
        "ca_file",
        "client_cert",
        "client_key",
        "insecure_skip_verify",
        "basic",
        "bearer",
        "max_body",
    ],
    required: &["url"],
    check,
    combination,
    compact,
};

fn check(key: &str, v: &Value) -> Result<(), String> {
    match key {
        "timeout" => timeout(v).map(drop),
        "url" => url(v, &["http", "https"]),
        "method" => method(v),
        "expect_status" => match StatusExpect::deserialize(v).ok().map(|e| e.matcher()) {
            Some(Ok(_)) => Ok(()),
            _ => Err(format!(
                "`expect_status` {v} is not a status: write 200, \"2xx\", \"200-299\" or a list of them"
            )),
        },
        "follow_redirects" | "insecure_skip_verify" => boolean(key, v),
        "max_body" => match v.as_u64() {
            Some(_) => Ok(()),
            None => Err("`max_body` must be a number of bytes (0 or more)".into()),
        },
        "headers" | "query" | "form" => table_of_strings(key, v),
        _ => Ok(()),
    }
}

fn combination(present: &[&str]) -> Result<(), Conflict> {
    let bodies: Vec<&str> = ["body", "json", "form"]
        .into_iter()
        .filter(|k| present.contains(k))
        .collect();
    if bodies.len() > 1 {
        return Err(Conflict {
            message: format!("`http` has both `{}` and `{}`", bodies[0], bodies[1]),
            label: "a request has one body",
        });
    }
    if present.contains(&"basic") && present.contains(&"bearer") {
        return Err(Conflict {
            message: "`http` has both `basic` and `bearer`".into(),
            label: "a request authenticates one way",
        });
    }
    Ok(())
}

fn compact(settings: &Value) -> String {
    format!(
        "{} {}",
        text(settings, "method")
            .unwrap_or_else(|| "GET".into())
            .to_uppercase(),
        text(settings, "url").unwrap_or_default()
    )
}

/// Any HTTP token is a method (extension methods included), so only the characters are checked.
fn method(v: &Value) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    match v {
        Value::String(m) if !m.is_empty() && m.chars().all(token) => Ok(()),
        _ => Err(format!("`method` {v} is not an HTTP method like \"GET\"")),
    }
}

/// `expect_status`: `200`, `[200, 204]`, `"2xx"`, `"200-299"` (list items may be patterns too).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StatusExpect {
    Code(u16),
    Pattern(String),
    AnyOf(Vec<StatusItem>),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StatusItem {
    Code(u16),
    Pattern(String),
}

/// Inclusive status ranges, with the text the runbook wrote for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusMatcher {
    ranges: Vec<(u16, u16)>,
    text: String,
}

impl StatusMatcher {
    pub fn matches(&self, status: u16) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl fmt::Display for StatusMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl StatusExpect {
    /// The ranges it allows; `Err` says which item is not a status.
    pub fn matcher(&self) -> Result<StatusMatcher, String> {
        let items: Vec<StatusItem> = match self {
            StatusExpect::Code(c) => vec![StatusItem::Code(*c)],
            StatusExpect::Pattern(p) => vec![StatusItem::Pattern(p.clone())],
            StatusExpect::AnyOf(items) if items.is_empty() => {
                return Err("`expect_status` is an empty list".to_owned());
            }
            StatusExpect::AnyOf(items) => items.clone(),
        };
        let mut ranges = Vec::with_capacity(items.len());
        let mut texts = Vec::with_capacity(items.len());
        for item in &items {
            let (range, text) = match item {
                StatusItem::Code(c) => (status_range(&c.to_string())?, c.to_string()),
                StatusItem::Pattern(p) => (status_range(p)?, p.trim().to_owned()),
            };
            ranges.push(range);
            texts.push(text);
        }
        let text = if texts.len() == 1 {
            texts.remove(0)
        } else {
            format!("one of {}", texts.join(", "))
        };
        Ok(StatusMatcher { ranges, text })
    }
}

impl Default for StatusMatcher {
    fn default() -> Self {
        Self {
            ranges: vec![(200, 299)],
            text: "2xx".into(),
        }
    }
}

/// `200`, `2xx`, `200-299` → an inclusive range of valid status codes.
fn status_range(text: &str) -> Result<(u16, u16), String> {
    let t = text.trim();
    let bad = || {
        format!(
            "`expect_status` item `{t}` is not a status code (`200`), class (`2xx`) or range (`200-299`)"
        )
    };
    let code = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u16>() {
            Ok(c) if (100..=599).contains(&c) => Ok(c),
            _ => Err(bad()),
        }
    };
    let lower = t.to_ascii_lowercase();
    if let Some(class) = lower.strip_suffix("xx") {
        let digit = code(&format!("{class}00"))?;
        return Ok((digit, digit + 99));
    }
    if let Some((lo, hi)) = t.split_once('-') {
        let (lo, hi) = (code(lo)?, code(hi)?);
        return if lo <= hi { Ok((lo, hi)) } else { Err(bad()) };
    }
    let c = code(t)?;
    Ok((c, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn matcher(v: Value) -> Result<StatusMatcher, String> {
        StatusExpect::deserialize(&v)
            .map_err(|e| e.to_string())?
            .matcher()
    }

    #[test]
    fn statuses_codes_classes_and_ranges() {
        let m = matcher(json!([204, "3xx", "401-403"])).expect("valid");
        for ok in [204, 301, 399, 401, 403] {
            assert!(m.matches(ok), "{ok}");
        }
        for no in [200, 400, 404, 500] {
            assert!(!m.matches(no), "{no}");
        }
        assert_eq!(m.to_string(), "one of 204, 3xx, 401-403");
        for bad in [
            json!("2xy"),
            json!([]),
            json!("300-200"),
            json!(600),
            json!("6xx"),
        ] {
            assert!(matcher(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn check_and_runner_agree() {
        // One grammar: what `runbook check` accepts, the runner can match, and the reverse.
        for v in [
            json!(200),
            json!("2XX"),
            json!(" 200 - 299 "),
            json!("200-0299"),
            json!("2xy"),
            json!([]),
        ] {
            assert_eq!(
                check("expect_status", &v).is_ok(),
                matcher(v.clone()).is_ok(),
                "{v}"
            );
        }
    }
}
