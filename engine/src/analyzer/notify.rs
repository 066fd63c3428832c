//! `[notify]`, the webhook told how a run ended: the one reader of the table, for runbooks
//! (the analyzer), schedule files and the value a checked runbook carries to the CLI. It is
//! used when a run ends, maybe to report its failure, so a value that cannot work is an error
//! when the file is checked. Errors point at the table, not the line: a webhook's path often
//! holds a token, and the URL itself is never printed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value as J;

use super::keys::NOTIFY_KEYS;
use super::reader::{ShiftedSpans, TomlReader, Value};
use crate::diagnostic::{Code, Diagnostic};
use crate::source::Span;

/// A webhook: `[notify]` in a runbook or a schedule file.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifySpec {
    pub url: String,
    pub format: NotifyFormat,
    /// When to send; default: on failure (which includes a failed drill).
    pub on: Vec<When>,
    /// Extra request headers (`Authorization`, …); their values are treated as secrets.
    pub headers: BTreeMap<String, String>,
    /// Per request; default 10 s.
    pub timeout: Duration,
    /// Further attempts after a failed one (connection error, timeout, 5xx, 429); default 3.
    pub retries: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NotifyFormat {
    #[default]
    Generic,
    Slack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// The run failed, was cancelled, or its drill missed a target.
    Failure,
    /// The run succeeded and its drill (if any) did not fail.
    Success,
    /// The drill's RTO was measured and missed.
    RtoMissed,
    Always,
}

/// How a run ended, as far as `on` asks.
pub trait RunEnd {
    fn failed(&self) -> bool;
    fn rto_missed(&self) -> bool;
}

impl NotifySpec {
    /// Whether a run that ended so is one `on` asks to be told about.
    pub fn wants(&self, end: &impl RunEnd) -> bool {
        self.on.iter().any(|w| match w {
            When::Always => true,
            When::Failure => end.failed(),
            When::Success => !end.failed(),
            When::RtoMissed => end.rto_missed(),
        })
    }
}

const WHENS: [(&str, When); 4] = [
    ("failure", When::Failure),
    ("success", When::Success),
    ("rto_missed", When::RtoMissed),
    ("always", When::Always),
];
/// More would keep a finished run waiting for most of an hour (the waits double to 30 s).
const MAX_RETRIES: u32 = 20;
const HELP: &str = "keys: url (http or https), format = \"generic\" | \"slack\", on = [\"failure\", \"success\", \"rto_missed\", \"always\"], headers, timeout, retries (0 to 20)";

/// A `[notify]` table (as JSON values) checked and typed: the spec, or every problem in words
/// that never hold the URL. Unknown keys are left to the caller, which knows where they are.
pub fn notify_spec(json: &J) -> Result<NotifySpec, Vec<String>> {
    let mut problems = Vec::new();
    let url = match json.get("url") {
        None => {
            problems.push("`url` is missing".to_owned());
            None
        }
        Some(J::String(url)) => {
            if let Err(e) = crate::request_check::url(&json["url"], &["http", "https"]) {
                problems.push(e.replace(url.as_str(), "<webhook url>"));
            }
            Some(url.clone())
        }
        Some(_) => {
            problems.push("`url` must be a string".to_owned());
            None
        }
    };
    let format = match json.get("format") {
        None => NotifyFormat::Generic,
        Some(J::String(f)) if f == "generic" => NotifyFormat::Generic,
        Some(J::String(f)) if f == "slack" => NotifyFormat::Slack,
        Some(_) => {
            problems.push("`format` must be \"generic\" or \"slack\"".to_owned());
            NotifyFormat::Generic
        }
    };
    let on = match json.get("on") {
        None => vec![When::Failure],
        Some(J::Array(items)) => {
            let whens: Option<Vec<When>> = items
                .iter()
                .map(|w| {
                    WHENS
                        .iter()
                        .find(|(n, _)| w.as_str() == Some(*n))
                        .map(|p| p.1)
                })
                .collect();
            whens.unwrap_or_else(|| {
                problems.push(on_problem());
                Vec::new()
            })
        }
        Some(_) => {
            problems.push(on_problem());
            Vec::new()
        }
    };
    let mut headers = BTreeMap::new();
    if let Some(h) = json.get("headers") {
        match crate::request_check::table_of_strings("headers", h) {
            Ok(()) => {
                for (k, v) in h.as_object().into_iter().flatten() {
                    headers.insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
                }
            }
            Err(e) => problems.push(e),
        }
    }
    let timeout = match json.get("timeout") {
        None => Duration::from_secs(10),
        Some(J::String(d)) => match crate::duration::parse_duration(d) {
            Ok(d) if d.is_zero() => {
                problems.push("`timeout` must be more than zero".into());
                d
            }
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("`timeout`: {e}"));
                Duration::ZERO
            }
        },
        Some(_) => {
            problems.push("`timeout` must be a duration like \"10s\"".to_owned());
            Duration::ZERO
        }
    };
    let retries = match json.get("retries") {
        None => 3,
        Some(r) => match r.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n <= MAX_RETRIES => n,
            _ => {
                problems.push(format!(
                    "`retries` must be a whole number from 0 to {MAX_RETRIES}"
                ));
                0
            }
        },
    };
    match url {
        Some(url) if problems.is_empty() => Ok(NotifySpec {
            url,
            format,
            on,
            headers,
            timeout,
            retries,
        }),
        _ => Err(problems),
    }
}

fn on_problem() -> String {
    "`on` must be a list of \"failure\", \"success\", \"rto_missed\", \"always\"".to_owned()
}

impl TomlReader {
    /// Reads a `[notify]` table: the spec and the table as JSON values (what a runbook
    /// carries), where it is; every problem reported at the table.
    pub fn notify(&mut self, v: &Value<'_>, s: &ShiftedSpans) -> Option<(NotifySpec, J, Span)> {
        let t = self.table(v, "notify", s)?;
        self.check_keys(t, NOTIFY_KEYS, "`[notify]`", s);
        let json = self.json(v, s)?;
        let span = s.span(v.span());
        match notify_spec(&json) {
            Ok(spec) => Some((spec, json, span)),
            Err(problems) => {
                for p in &problems {
                    self.push(
                        Diagnostic::error(Code::BadValue, format!("`[notify]`: {p}"))
                            .at(&self.src, span.clone(), "in this table")
                            .help(HELP),
                    );
                }
                None
            }
        }
    }
}

/// A checked runbook's `[notify]` value (see [`crate::runbook::Runbook::notify`]) read back.
impl<'de> serde::Deserialize<'de> for NotifySpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let json = J::deserialize(d)?;
        if let Some(key) = json
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
            .find(|k| !NOTIFY_KEYS.contains(&k.as_str()))
        {
            return Err(serde::de::Error::custom(format!(
                "unknown key `{key}` in `[notify]`"
            )));
        }
        notify_spec(&json).map_err(|p| serde::de::Error::custom(p.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_every_value_read() {
        let spec =
            notify_spec(&json!({"url": "https://hooks.example.test/T/SECRET"})).expect("valid");
        assert_eq!(spec.format, NotifyFormat::Generic);
        assert_eq!(spec.on, [When::Failure]);
        assert_eq!(spec.timeout, Duration::from_secs(10));
        assert_eq!(spec.retries, 3);
        let spec = notify_spec(&json!({
            "url": "http://127.0.0.1:9/h", "format": "slack", "on": ["success", "rto_missed"],
            "headers": {"X-Api-Key": "k"}, "timeout": "5s", "retries": 20
        }))
        .expect("valid");
        assert_eq!(spec.format, NotifyFormat::Slack);
        assert_eq!(spec.on, [When::Success, When::RtoMissed]);
        assert_eq!(spec.headers["X-Api-Key"], "k");
        assert_eq!(spec.timeout, Duration::from_secs(5));
        assert_eq!(spec.retries, 20);
    }

    #[test]
    fn every_problem_is_named_and_the_url_never_shown() {
        let problems = notify_spec(&json!({
            "url": "ftp://hooks.example.test/SECRET", "on": ["sometimes"], "retries": 21,
            "timeout": "0s", "format": "teams", "headers": {"a": 1}
        }))
        .expect_err("invalid");
        assert_eq!(problems.len(), 6, "{problems:?}");
        assert!(
            problems.iter().all(|p| !p.contains("SECRET")),
            "{problems:?}"
        );
        let problems = notify_spec(&json!({"url": "not a url SECRET"})).expect_err("invalid");
        assert_eq!(
            problems,
            ["`url` `<webhook url>` is not a URL: relative URL without a base"]
        );
        assert_eq!(
            notify_spec(&json!({})).expect_err("invalid"),
            ["`url` is missing"]
        );
    }

    #[test]
    fn a_checked_value_reads_back_through_serde() {
        let spec: NotifySpec =
            serde_json::from_value(json!({"url": "https://h.test/x", "retries": 0}))
                .expect("reads");
        assert_eq!(spec.retries, 0);
        let unknown =
            serde_json::from_value::<NotifySpec>(json!({"url": "https://h.test", "colour": 1}));
        assert!(unknown.is_err());
    }

    struct End(bool, bool);
    impl RunEnd for End {
        fn failed(&self) -> bool {
            self.0
        }
        fn rto_missed(&self) -> bool {
            self.1
        }
    }

    #[test]
    fn on_decides_which_ends_are_told() {
        let mut spec = notify_spec(&json!({"url": "https://h.test"})).expect("valid");
        assert!(spec.wants(&End(true, false)));
        assert!(!spec.wants(&End(false, false)));
        spec.on = vec![When::RtoMissed];
        assert!(spec.wants(&End(false, true)));
        spec.on = vec![When::Always];
        assert!(spec.wants(&End(false, false)));
    }
}
