//! The scheduler's Prometheus metrics: per entry the drill's RTO/RPO against its targets, the
//! verdict, the last success, the last run's status and duration, firing and skip counters —
//! plus the step families of each entry's last bundle (`metrics.prom`), relabelled with the
//! entry. Written to a node_exporter textfile directory and served over HTTP.
//!
//! Every series carries `schedule` (the entry) and `runbook`: two entries may drill the same
//! runbook with different parameters. As in the per-run metrics, state-like values are one
//! gauge per state (value 1 for the current one) and no sample has a timestamp.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use runbook_evidence::metrics::{escape_label, number, unix};

use super::child::STATES;
use super::state::State;

const VERDICTS: [&str; 3] = ["pass", "fail", "not_measured"];

/// What the scheduler knows about an entry beyond the state file.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub firings: u64,
    pub skipped: u64,
    pub running: bool,
    pub next_fire: Option<DateTime<Utc>>,
    /// The last bundle's `metrics.prom`.
    pub bundle_metrics: Option<String>,
}

/// One metric family being assembled: help, type, sample lines.
struct Family {
    help: String,
    kind: &'static str,
    samples: Vec<String>,
}

#[derive(Default)]
struct Families(BTreeMap<String, Family>, Vec<String>);

impl Families {
    fn add(&mut self, name: &str, kind: &'static str, help: &str, labels: &str, value: f64) {
        let fam = self.0.entry(name.to_owned()).or_insert_with(|| {
            self.1.push(name.to_owned());
            Family {
                help: help.to_owned(),
                kind,
                samples: Vec::new(),
            }
        });
        fam.samples
            .push(format!("{name}{{{labels}}} {}", number(value)));
    }

    /// Adds a bundle's families with `schedule` and `runbook` labels first; families the
    /// scheduler writes itself are left out (its value wins).
    fn merge_bundle(&mut self, text: &str, labels: &str, own: &[&str]) {
        let mut current: Option<String> = None;
        let mut help = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
                current = Some(name.to_owned());
                help = h.to_owned();
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            let family = current.clone().unwrap_or_else(|| name.to_owned());
            if own.contains(&family.as_str()) {
                continue;
            }
            // Drop the bundle's own `runbook` label: ours has the same value and comes first.
            let rest = &line[name_end..];
            let (inner, value) = match rest.strip_prefix('{') {
                Some(r) => match r.rsplit_once('}') {
                    Some((inner, value)) => (inner.to_owned(), value.trim().to_owned()),
                    None => continue,
                },
                None => (String::new(), rest.trim().to_owned()),
            };
            let inner = strip_label(&inner, "runbook");
            let all = if inner.is_empty() {
                labels.to_owned()
            } else {
                format!("{labels},{inner}")
            };
            let fam = self.0.entry(family.clone()).or_insert_with(|| {
                self.1.push(family.clone());
                Family {
                    help: help.clone(),
                    kind: "gauge",
                    samples: Vec::new(),
                }
            });
            fam.samples.push(format!("{name}{{{all}}} {value}"));
        }
    }

    fn render(self) -> String {
        let mut out = String::new();
        let Families(mut map, order) = self;
        for name in order {
            let Some(f) = map.remove(&name) else { continue };
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {}", f.kind);
            for s in f.samples {
                let _ = writeln!(out, "{s}");
            }
        }
        out
    }
}

/// Removes `key="…"` from a label list (values may contain escaped quotes and commas).
fn strip_label(inner: &str, key: &str) -> String {
    let mut parts = Vec::new();
    let mut rest = inner;
    while !rest.is_empty() {
        let Some(eq) = rest.find("=\"") else { break };
        let label = &rest[..eq];
        let mut i = eq + 2;
        let bytes = rest.as_bytes();
        while i < bytes.len() && bytes[i] != b'"' {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        let end = (i + 1).min(rest.len());
        if label.trim() != key {
            parts.push(rest[..end].to_owned());
        }
        rest = rest[end..].trim_start_matches(',');
    }
    parts.join(",")
}

/// The families the scheduler writes itself.
const OWN: [&str; 14] = [
    "runbook_drill_rto_seconds",
    "runbook_drill_rto_target_seconds",
    "runbook_drill_rpo_seconds",
    "runbook_drill_rpo_target_seconds",
    "runbook_drill_verdict",
    "runbook_drill_last_success_timestamp_seconds",
    "runbook_run_last_status",
    "runbook_run_duration_seconds",
    "runbook_schedule_firings_total",
    "runbook_schedule_skipped_total",
    "runbook_schedule_running",
    "runbook_schedule_next_fire_timestamp_seconds",
    "runbook_schedule_last_fire_timestamp_seconds",
    "runbook_schedule_last_exit_code",
];

/// `entries` is (schedule name, runbook name) per entry, `live` in the same order.
pub fn render(entries: &[(String, String)], live: &[Live], state: &State) -> String {
    let mut f = Families::default();
    for ((schedule, runbook), live) in entries.iter().zip(live) {
        let l = format!(
            "schedule=\"{}\",runbook=\"{}\"",
            escape_label(schedule),
            escape_label(runbook)
        );
        let st = state.entries.get(schedule).cloned().unwrap_or_default();
        let out = st.last_outcome.as_ref();
        f.add(
            "runbook_schedule_firings_total",
            "counter",
            "Runs this scheduler started for the entry since it started.",
            &l,
            live.firings as f64,
        );
        f.add(
            "runbook_schedule_skipped_total",
            "counter",
            "Fire times of the entry skipped because its previous run was still going (overlap).",
            &l,
            live.skipped as f64,
        );
        f.add(
            "runbook_schedule_running",
            "gauge",
            "1 while a run of the entry is going.",
            &l,
            f64::from(u8::from(live.running)),
        );
        if let Some(t) = live.next_fire {
            f.add(
                "runbook_schedule_next_fire_timestamp_seconds",
                "gauge",
                "Unix time the entry fires next.",
                &l,
                unix(t),
            );
        }
        if let Some(t) = st.last_fire {
            f.add(
                "runbook_schedule_last_fire_timestamp_seconds",
                "gauge",
                "Unix time the entry last started a run.",
                &l,
                unix(t),
            );
        }
        if let Some(t) = st.last_success {
            f.add(
                "runbook_drill_last_success_timestamp_seconds",
                "gauge",
                "Unix time a run of the entry last succeeded with its drill targets met.",
                &l,
                unix(t),
            );
        }
        let Some(o) = out else { continue };
        for s in STATES {
            f.add(
                "runbook_run_last_status",
                "gauge",
                "Outcome of the entry's last run: 1 for its status, 0 for the others.",
                &format!("{l},status=\"{s}\""),
                f64::from(u8::from(o.status == s)),
            );
        }
        if let Some(code) = o.exit_code {
            f.add(
                "runbook_schedule_last_exit_code",
                "gauge",
                "Exit code of the entry's last run (5: drill missed a target).",
                &l,
                f64::from(code),
            );
        }
        f.add(
            "runbook_run_duration_seconds",
            "gauge",
            "Wall-clock duration of the last run of the runbook.",
            &l,
            o.duration_seconds,
        );
        if let Some(v) = &o.verdict {
            for s in VERDICTS {
                f.add(
                    "runbook_drill_verdict",
                    "gauge",
                    "Verdict of the entry's last drill: 1 for it (pass, fail, not_measured), 0 for the others.",
                    &format!("{l},verdict=\"{s}\""),
                    f64::from(u8::from(v == s)),
                );
            }
        }
        for (kind, target) in [("rto", &o.rto), ("rpo", &o.rpo)] {
            let Some(t) = target else { continue };
            let upper = kind.to_uppercase();
            if let Some(m) = t.measured_seconds {
                f.add(
                    &format!("runbook_drill_{kind}_seconds"),
                    "gauge",
                    &format!("{upper} measured in the entry's last drill."),
                    &l,
                    m,
                );
            }
            if let Some(goal) = t.target_seconds {
                f.add(
                    &format!("runbook_drill_{kind}_target_seconds"),
                    "gauge",
                    &format!("{upper} target the drill declares."),
                    &l,
                    goal,
                );
            }
        }
    }
    for ((schedule, runbook), live) in entries.iter().zip(live) {
        if let Some(text) = &live.bundle_metrics {
            let l = format!(
                "schedule=\"{}\",runbook=\"{}\"",
                escape_label(schedule),
                escape_label(runbook)
            );
            f.merge_bundle(text, &l, &OWN);
        }
    }
    f.render()
}

/// Serves `GET /metrics` (and `/`) with the latest text until `stop`. One request per
/// connection: enough for Prometheus and curl.
pub async fn serve(listener: TcpListener, text: Arc<Mutex<String>>, stop: CancellationToken) {
    loop {
        let (mut conn, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let text = text.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&head);
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("");
            let path = parts.next().unwrap_or("");
            let (status, body, ctype) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET" | "HEAD", "/metrics" | "/") => (
                    "200 OK",
                    text.lock().map(|t| t.clone()).unwrap_or_default(),
                    "text/plain; version=0.0.4; charset=utf-8",
                ),
                ("GET" | "HEAD", _) => ("404 Not Found", "not found\n".into(), "text/plain"),
                _ => (
                    "405 Method Not Allowed",
                    "method not allowed\n".into(),
                    "text/plain",
                ),
            };
            let mut response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if method != "HEAD" {
                response.push_str(&body);
            }
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::DrillTarget;
    use crate::schedule::state::{EntryState, Outcome};

    #[test]
    fn merges_bundle_families_with_the_entry_labels() {
        let bundle = "# HELP runbook_step_duration_seconds Duration.\n# TYPE runbook_step_duration_seconds gauge\nrunbook_step_duration_seconds{runbook=\"db\",step=\"a\"} 1.5\n# HELP runbook_run_duration_seconds D.\n# TYPE runbook_run_duration_seconds gauge\nrunbook_run_duration_seconds{runbook=\"db\"} 3\n";
        let entries = vec![
            ("nightly".to_owned(), "db".to_owned()),
            ("weekly".to_owned(), "db".to_owned()),
        ];
        let live = vec![
            Live {
                bundle_metrics: Some(bundle.into()),
                ..Live::default()
            },
            Live {
                bundle_metrics: Some(bundle.into()),
                ..Live::default()
            },
        ];
        let mut state = State::default();
        state.entries.insert(
            "nightly".into(),
            EntryState {
                last_outcome: Some(Outcome {
                    status: "drill_failed".into(),
                    duration_seconds: 3.0,
                    verdict: Some("fail".into()),
                    rto: Some(DrillTarget {
                        target_seconds: Some(2.0),
                        measured_seconds: Some(2.5),
                        verdict: "fail".into(),
                        why: None,
                    }),
                    ..Outcome::default()
                }),
                ..EntryState::default()
            },
        );
        let t = render(&entries, &live, &state);
        assert_eq!(
            t.matches("# HELP runbook_step_duration_seconds").count(),
            1,
            "{t}"
        );
        assert!(t.contains(
            "runbook_step_duration_seconds{schedule=\"weekly\",runbook=\"db\",step=\"a\"} 1.5"
        ));
        assert!(t.contains("runbook_drill_rto_seconds{schedule=\"nightly\",runbook=\"db\"} 2.5"));
        assert!(t.contains(
            "runbook_drill_verdict{schedule=\"nightly\",runbook=\"db\",verdict=\"fail\"} 1"
        ));
        assert!(t.contains(
            "runbook_run_last_status{schedule=\"nightly\",runbook=\"db\",status=\"drill_failed\"} 1"
        ));
        // The scheduler's own run duration, not the bundle's.
        assert_eq!(t.matches("runbook_run_duration_seconds{").count(), 1, "{t}");
    }

    #[test]
    fn strips_one_label() {
        assert_eq!(
            strip_label("runbook=\"a\\\",b\",step=\"x\"", "runbook"),
            "step=\"x\""
        );
        assert_eq!(
            strip_label("step=\"x\",runbook=\"y\"", "runbook"),
            "step=\"x\""
        );
    }
}
