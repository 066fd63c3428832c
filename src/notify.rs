//! Webhook notifications about finished runs and drills: when to send (`on`), the payload
//! (generic JSON or Slack-compatible `{"text": …}`), and delivery with a timeout and retries.
//! Every string in a payload passes through the caller's redactor first, so a secret that
//! reached a step name, a path or a parameter never leaves the machine.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use runbook_engine::retry::RetryPolicy;
use serde::{Deserialize, Serialize};

pub use runbook_engine::analyzer::notify::{NotifyFormat, NotifySpec, RunEnd};

/// One target (RTO or RPO) of a drill, as the manifest's `drill` object has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillTarget {
    pub target_seconds: Option<f64>,
    pub measured_seconds: Option<f64>,
    /// `pass`, `fail` or `not_measured`.
    pub verdict: String,
    pub why: Option<String>,
}

/// What a notification says about one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NotifyPayload {
    pub runbook: String,
    /// The schedule entry that fired the run, when a scheduler did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The run's status (`succeeded`, `failed`, `cancelled`, …) or, when no bundle was
    /// written, what happened (`error`, `timed_out`).
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The drill verdict (`pass`, `fail`, `not_measured`) when the runbook is a drill.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rto: Option<DrillTarget>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpo: Option<DrillTarget>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    pub failed_steps: Vec<String>,
    /// Parameters the run was given (`--set`), secrets included until redacted.
    pub params: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// One line for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl NotifyPayload {
    /// Fills a payload from a bundle's `manifest.json` (as JSON, so that fields added later,
    /// such as `drill`, are read when present and ignored when absent).
    pub fn from_manifest(manifest: &serde_json::Value, bundle: Option<&Path>) -> Self {
        let s = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        let drill = &manifest["drill"];
        let target = |v: &serde_json::Value| -> Option<DrillTarget> {
            v.is_object()
                .then(|| serde_json::from_value(v.clone()).ok())
                .flatten()
        };
        Self {
            runbook: s(&manifest["runbook"]["name"]).unwrap_or_default(),
            status: s(&manifest["status"]).unwrap_or_else(|| "unknown".into()),
            verdict: s(&drill["verdict"]),
            rto: target(&drill["rto"]),
            rpo: target(&drill["rpo"]),
            bundle: bundle.map(|b| b.display().to_string()),
            started_at: s(&manifest["started_at"]),
            finished_at: s(&manifest["finished_at"]),
            duration_seconds: manifest["duration_seconds"].as_f64(),
            failed_steps: manifest["steps"]
                .as_array()
                .map(|steps| {
                    steps
                        .iter()
                        .filter(|st| st["status"] == "failed")
                        .filter_map(|st| s(&st["id"]))
                        .collect()
                })
                .unwrap_or_default(),
            host: s(&manifest["operator"]["host"]),
            ..Self::default()
        }
    }

    fn failed(&self) -> bool {
        self.status != "succeeded" || self.verdict.as_deref() == Some("fail")
    }

    fn rto_missed(&self) -> bool {
        self.rto.as_ref().is_some_and(|r| r.verdict == "fail")
    }

    /// A one-line summary: `db-restore (nightly): drill FAILED — RTO 312s > 300s`.
    pub fn summary(&self) -> String {
        let mut out = self.runbook.clone();
        if let Some(s) = &self.schedule {
            out.push_str(&format!(" ({s})"));
        }
        let outcome = match (self.status.as_str(), self.verdict.as_deref()) {
            ("succeeded", Some("fail")) => "drill FAILED".to_owned(),
            ("succeeded", Some("pass")) => "drill passed".to_owned(),
            ("succeeded", _) => "succeeded".to_owned(),
            (other, _) => other.to_uppercase(),
        };
        out.push_str(&format!(": {outcome}"));
        for (name, t) in [("RTO", &self.rto), ("RPO", &self.rpo)] {
            let Some(t) = t else { continue };
            match (t.measured_seconds, t.target_seconds) {
                (Some(m), Some(target)) => {
                    let cmp = if t.verdict == "fail" { ">" } else { "≤" };
                    out.push_str(&format!(" — {name} {m:.1}s {cmp} {target:.1}s"));
                }
                _ => out.push_str(&format!(" — {name} {}", t.verdict)),
            }
        }
        if !self.failed_steps.is_empty() {
            out.push_str(&format!(" — failed: {}", self.failed_steps.join(", ")));
        }
        if let Some(m) = &self.message {
            out.push_str(&format!(" — {m}"));
        }
        out
    }
}

impl RunEnd for NotifyPayload {
    fn failed(&self) -> bool {
        NotifyPayload::failed(self)
    }
    fn rto_missed(&self) -> bool {
        NotifyPayload::rto_missed(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("webhook client: {0}")]
    Client(String),
    #[error("webhook `{url}` failed after {attempts} attempt(s): {last}")]
    Failed {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("webhook `{url}` refused the notification: HTTP {status}")]
    Refused { url: String, status: u16 },
}

/// The request body, every string already redacted.
pub fn body(spec: &NotifySpec, event: &NotifyPayload, redact: &dyn Fn(&str) -> String) -> String {
    let value = match spec.format {
        NotifyFormat::Generic => serde_json::to_value(event).unwrap_or_default(),
        NotifyFormat::Slack => {
            let mut text = event.summary();
            if let Some(b) = &event.bundle {
                text.push_str(&format!("\nevidence: `{b}`"));
            }
            serde_json::json!({ "text": text })
        }
    };
    let mut value = value;
    runbook_engine::redact::matcher::redact_json_with(&mut value, redact);
    serde_json::to_string(&value).unwrap_or_default()
}

/// Posts the notification, retrying connection errors, timeouts, 5xx and 429 with backoff
/// (1 s, 2 s, 4 s, … capped at 30 s). A 4xx other than 429 is not retried: the request
/// itself is wrong. Error messages are redacted too (the URL may hold a token).
///
/// `redact` is `Sync` so that the future is `Send` (it is held across awaits) and can be
/// spawned on a multi-threaded runtime.
pub async fn send(
    spec: &NotifySpec,
    event: &NotifyPayload,
    redact: &(dyn Fn(&str) -> String + Sync),
) -> Result<(), NotifyError> {
    let payload = body(spec, event, redact);
    let client = reqwest::Client::builder()
        .timeout(spec.timeout)
        .build()
        .map_err(|e| NotifyError::Client(redact(&e.to_string())))?;
    let shown_url = redact(&redact_url(&spec.url));
    let policy = delivery_policy(spec.retries);
    let mut last = String::new();
    for attempt in 1..=policy.attempts {
        if attempt > 1 {
            tokio::time::sleep(runbook_engine::backoff::delay(&policy, attempt)).await;
        }
        let mut req = client
            .post(&spec.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(payload.clone());
        for (k, v) in &spec.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        match req.send().await {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) => {
                let status = resp.status();
                if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
                    return Err(NotifyError::Refused {
                        url: shown_url,
                        status: status.as_u16(),
                    });
                }
                last = format!("HTTP {}", status.as_u16());
            }
            Err(e) => last = redact(&without_url(&e)),
        }
    }
    Err(NotifyError::Failed {
        url: shown_url,
        attempts: policy.attempts,
        last,
    })
}

/// Delivery as the engine's retry policy: `retries` further attempts after the first, waiting
/// 1 s, 2 s, 4 s, … capped at 30 s.
fn delivery_policy(retries: u32) -> RetryPolicy {
    // No jitter: one webhook per run, nothing to spread out.
    runbook_engine::backoff::doubling(
        retries.saturating_add(1),
        Duration::from_secs(1),
        Duration::from_secs(30),
        false,
    )
}

/// reqwest errors name the URL, which for Slack-style webhooks is itself the secret.
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(u) = e.url() {
        text = text.replace(u.as_str(), "<url>");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Scheme, host and port only: the path and query of a webhook URL often carry its token.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}/…",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "<webhook url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runbook_engine::analyzer::notify::When;

    #[test]
    fn delivery_waits_double_up_to_thirty_seconds() {
        let policy = delivery_policy(7);
        assert_eq!(policy.attempts, 8);
        let waits: Vec<u64> = (2..=8)
            .map(|n| policy.delay_before(n, 0.5).as_secs())
            .collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30]);
    }

    fn payload() -> NotifyPayload {
        NotifyPayload {
            runbook: "db-restore".into(),
            schedule: Some("nightly".into()),
            status: "succeeded".into(),
            verdict: Some("fail".into()),
            rto: Some(DrillTarget {
                target_seconds: Some(300.0),
                measured_seconds: Some(312.0),
                verdict: "fail".into(),
                why: None,
            }),
            params: [("token".to_owned(), "hunter2-secret".to_owned())].into(),
            ..NotifyPayload::default()
        }
    }

    #[test]
    fn spec_deserialises_with_defaults() {
        let spec: NotifySpec = toml::from_str(
            "url = \"http://127.0.0.1:1/x\"\ntimeout = \"2s\"\non = [\"rto_missed\"]",
        )
        .expect("parses");
        assert_eq!(spec.format, NotifyFormat::Generic);
        assert_eq!(spec.timeout, Duration::from_secs(2));
        assert_eq!(spec.retries, 3);
        assert_eq!(spec.on, [When::RtoMissed]);
        assert!(
            toml::from_str::<NotifySpec>("url = \"https://hooks.example.test/x\"\nbogus = 1")
                .is_err()
        );
    }

    #[test]
    fn when_filters() {
        let mut spec: NotifySpec =
            toml::from_str("url = \"https://hooks.example.test/x\"").expect("parses");
        let p = payload();
        assert!(spec.wants(&p), "a failed drill is a failure");
        spec.on = vec![When::Success];
        assert!(!spec.wants(&p));
        spec.on = vec![When::RtoMissed];
        assert!(spec.wants(&p));
    }

    /// The scheduler's redactor on a payload whose param holds `"` and `\\`: the value is
    /// redacted as a value (and as a key), not looked for in the escaped body.
    #[test]
    fn a_secret_with_json_special_characters_is_redacted_in_the_body() {
        let secret = r#"pa"ss\word-0123"#;
        let spec: NotifySpec =
            toml::from_str("url = \"https://hooks.example.test/x\"").expect("parses");
        let redactor =
            runbook_engine::redact::Redactor::new(vec![("token".into(), secret.to_owned())]);
        let redact = |s: &str| redactor.redact_str(s);
        let mut event = payload();
        event.params = [
            ("token".to_owned(), secret.to_owned()),
            (secret.to_owned(), format!("x{secret}x")),
        ]
        .into();
        let text = body(&spec, &event, &redact);
        let escaped = serde_json::to_string(secret).expect("json");
        assert!(!text.contains(escaped.trim_matches('"')), "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value["params"]["token"], "[REDACTED:token]", "{text}");
        assert_eq!(
            value["params"]["[REDACTED:token]"], "x[REDACTED:token]x",
            "{text}"
        );
    }

    #[test]
    fn bodies_are_redacted() {
        let spec: NotifySpec =
            toml::from_str("url = \"https://hooks.example.test/x\"").expect("parses");
        let redact = |s: &str| s.replace("hunter2-secret", "[REDACTED:token]");
        let generic = body(&spec, &payload(), &redact);
        assert!(!generic.contains("hunter2"), "{generic}");
        assert!(generic.contains("[REDACTED:token]"), "{generic}");
        let slack = NotifySpec {
            format: NotifyFormat::Slack,
            ..spec
        };
        let text: serde_json::Value =
            serde_json::from_str(&body(&slack, &payload(), &redact)).expect("json");
        assert_eq!(
            text["text"],
            "db-restore (nightly): drill FAILED — RTO 312.0s > 300.0s"
        );
    }

    #[test]
    fn urls_lose_their_path_in_messages() {
        assert_eq!(
            redact_url("https://hooks.example.invalid/services/T000/B000/XXXX"),
            "https://hooks.example.invalid/…"
        );
    }
}
