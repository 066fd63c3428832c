//! Prometheus metrics for a run, in the text exposition format, for node_exporter's textfile
//! collector (`--collector.textfile.directory`) or a Pushgateway.
//!
//! No sample carries a client-side timestamp (node_exporter skips a whole file that has one)
//! and no label has a run id (cardinality). State-like values are one gauge per state with
//! value 1 for the current one (`runbook_run_status{status="failed"} 1`).
//!
//! `runbook_run_last_success_timestamp_seconds` is written only for a succeeded run. If the
//! same file is overwritten by every run, a failed run makes the series disappear; alert with
//! `absent()` or keep the value in a separate file written only on success.

use std::fmt::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};
use runbook_engine::event::StepStatus;

use crate::manifest::Manifest;
use crate::run_view::run_duration;

/// Run states always exported (0 or 1); another current state (`running`, …) is added to them.
const RUN_STATES: [&str; 3] = ["succeeded", "failed", "cancelled"];
const STEP_STATES: [&str; 5] = ["succeeded", "failed", "skipped", "cancelled", "not_run"];

pub fn render_metrics(manifest: &Manifest) -> String {
    let m = manifest;
    let rb = escape_label(&m.runbook.name);
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, help: &str, samples: Vec<(String, f64)>| {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {}", number(value));
        }
    };

    let status = m.status.as_str();
    let mut states: Vec<&str> = RUN_STATES.to_vec();
    if !states.contains(&status) {
        states.push(status);
    }
    family(
        "runbook_run_status",
        "Outcome of the last run of the runbook: 1 for its status, 0 for the others.",
        states
            .iter()
            .map(|s| {
                (
                    format!("runbook=\"{rb}\",status=\"{}\"", escape_label(s)),
                    f64::from(u8::from(*s == status)),
                )
            })
            .collect(),
    );
    family(
        "runbook_run_duration_seconds",
        "Wall-clock duration of the last run of the runbook.",
        vec![(format!("runbook=\"{rb}\""), run_duration(m))],
    );
    family(
        "runbook_run_start_timestamp_seconds",
        "Unix time the last run of the runbook started.",
        vec![(format!("runbook=\"{rb}\""), unix(m.started_at))],
    );
    let success = (status == "succeeded").then(|| {
        m.finished_at
            .map(unix)
            .unwrap_or_else(|| unix(m.started_at) + run_duration(m))
    });
    family(
        "runbook_run_last_success_timestamp_seconds",
        "Unix time the runbook last completed successfully.",
        success
            .map(|t| vec![(format!("runbook=\"{rb}\""), t)])
            .unwrap_or_default(),
    );
    if let Some(d) = &m.drill {
        let label = format!("runbook=\"{rb}\"");
        for (name, o) in [("rto", &d.rto), ("rpo", &d.rpo)] {
            let Some(o) = o else { continue };
            family(
                &format!("runbook_drill_{name}_seconds"),
                &format!(
                    "Measured {} of the last drill (absent when it could not be measured).",
                    name.to_uppercase()
                ),
                o.measured_seconds
                    .map(|v| vec![(label.clone(), v)])
                    .unwrap_or_default(),
            );
            family(
                &format!("runbook_drill_{name}_target_seconds"),
                &format!("{} objective of the drill.", name.to_uppercase()),
                vec![(label.clone(), o.target_seconds)],
            );
        }
        family(
            "runbook_drill_verdict",
            "Verdict of the last drill: 1 for its verdict, 0 for the others.",
            ["pass", "fail", "not_measured"]
                .iter()
                .map(|v| {
                    (
                        format!("{label},verdict=\"{v}\""),
                        f64::from(u8::from(*v == d.verdict.as_str())),
                    )
                })
                .collect(),
        );
        let passed = (d.verdict == runbook_engine::event::Verdict::Pass)
            .then(|| m.finished_at.map_or_else(|| unix(m.started_at), unix));
        family(
            "runbook_drill_last_success_timestamp_seconds",
            "Unix time of the last drill that met every objective.",
            passed.map(|t| vec![(label.clone(), t)]).unwrap_or_default(),
        );
    }
    let step_label = |id: &str| format!("runbook=\"{rb}\",step=\"{}\"", escape_label(id));
    family(
        "runbook_step_duration_seconds",
        "Duration of each step in the last run, retries included (0 when it did not run).",
        m.steps
            .iter()
            .map(|s| (step_label(&s.id), s.duration_seconds))
            .collect(),
    );
    family(
        "runbook_step_attempts",
        "Attempts each step made in the last run, on all targets.",
        m.steps
            .iter()
            .map(|s| (step_label(&s.id), s.attempts.len() as f64))
            .collect(),
    );
    family(
        "runbook_step_status",
        "Outcome of each step in the last run: 1 for its status, 0 for the others.",
        m.steps
            .iter()
            .flat_map(|s| {
                let current = s.status.map_or("not_run", StepStatus::as_str);
                STEP_STATES.iter().map(move |st| {
                    (
                        format!("{},status=\"{st}\"", step_label(&s.id)),
                        f64::from(u8::from(*st == current)),
                    )
                })
            })
            .collect(),
    );
    out
}

/// Writes `dir/name` atomically: a hidden temporary file in the same directory (so the
/// textfile collector, which reads `*.prom`, never sees it), synced, then renamed over `name`.
pub fn write_textfile(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{name}` is not a plain file name"),
        ));
    }
    crate::fs::write_atomic(&dir.join(name), text.as_bytes())
}

/// Seconds since the Unix epoch, as Prometheus timestamps-as-values are written.
pub fn unix(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// A sample value: Rust's shortest round-trip decimal, or the format's NaN/±Inf spelling.
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Label value escaping per the text format: backslash, double quote and newline.
pub fn escape_label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{failed_run, succeeded_run};
    use std::io::Write as _;

    fn sample<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no sample {prefix}\n{text}"))
            .rsplit(' ')
            .next()
            .expect("value")
    }

    #[test]
    fn failed_run_metrics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = failed_run(dir.path());
        let t = render_metrics(&m);
        let rb = "runbook=\"db-restore\"";
        assert_eq!(
            sample(&t, &format!("runbook_run_status{{{rb},status=\"failed\"}}")),
            "1"
        );
        assert_eq!(
            sample(
                &t,
                &format!("runbook_run_status{{{rb},status=\"succeeded\"}}")
            ),
            "0"
        );
        assert_eq!(
            sample(
                &t,
                &format!("runbook_run_status{{{rb},status=\"cancelled\"}}")
            ),
            "0"
        );
        assert_eq!(t.matches("runbook_run_status{").count(), 3);
        assert_eq!(sample(&t, "runbook_run_duration_seconds{"), "10.25");
        assert_eq!(
            sample(&t, "runbook_run_start_timestamp_seconds{"),
            "1787220900"
        );
        assert!(!t.contains("runbook_run_last_success_timestamp_seconds"));
        assert_eq!(
            sample(
                &t,
                &format!("runbook_step_attempts{{{rb},step=\"restore\"}}")
            ),
            "2"
        );
        assert_eq!(
            sample(
                &t,
                &format!("runbook_step_duration_seconds{{{rb},step=\"restore\"}}")
            ),
            "4.4"
        );
        assert_eq!(
            sample(
                &t,
                &format!("runbook_step_status{{{rb},step=\"verify\",status=\"skipped\"}}")
            ),
            "1"
        );
        assert_eq!(
            sample(
                &t,
                &format!("runbook_step_status{{{rb},step=\"verify\",status=\"failed\"}}")
            ),
            "0"
        );
        // HELP and TYPE once per family, before its samples; no client-side timestamps.
        for name in [
            "runbook_run_status",
            "runbook_run_duration_seconds",
            "runbook_run_start_timestamp_seconds",
            "runbook_step_duration_seconds",
            "runbook_step_attempts",
            "runbook_step_status",
        ] {
            assert_eq!(t.matches(&format!("# HELP {name} ")).count(), 1, "{name}");
            assert_eq!(
                t.matches(&format!("# TYPE {name} gauge\n")).count(),
                1,
                "{name}"
            );
        }
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(
                l.rsplit('}').next().expect("v").trim().split(' ').count(),
                1,
                "{l}"
            );
        }
    }

    #[test]
    fn succeeded_run_has_last_success() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = succeeded_run(dir.path());
        let t = render_metrics(&m);
        assert_eq!(
            sample(
                &t,
                "runbook_run_last_success_timestamp_seconds{runbook=\"ok-book\"}"
            ),
            "1787220000.5"
        );
        assert_eq!(
            sample(
                &t,
                "runbook_run_status{runbook=\"ok-book\",status=\"succeeded\"}"
            ),
            "1"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = succeeded_run(dir.path());
        m.runbook.name = "we\"ird\\name".into();
        m.steps[0].id = "line\nbreak".into();
        let t = render_metrics(&m);
        assert!(t.contains("runbook=\"we\\\"ird\\\\name\",step=\"line\\nbreak\""));
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(0.1), "0.1");
        assert_eq!(number(1e21), "1000000000000000000000");
    }

    #[test]
    fn textfile_is_replaced_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_textfile(dir.path(), "runbook_x.prom", "a 1\n").expect("write");
        write_textfile(dir.path(), "runbook_x.prom", "a 2\n").expect("rewrite");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["runbook_x.prom"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("runbook_x.prom")).expect("read"),
            "a 2\n"
        );
        assert!(write_textfile(dir.path(), "../x.prom", "").is_err());
        assert!(write_textfile(dir.path(), "", "").is_err());
    }

    /// `promtool check metrics` accepts the output.
    #[test]
    fn promtool_accepts_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        for m in [failed_run(dir.path()), succeeded_run(dir.path())] {
            let child = std::process::Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn();
            let Ok(mut child) = child else {
                panic!(
                    "promtool is not installed: `apt-get install prometheus` (scripts/test does)"
                );
            };
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(render_metrics(&m).as_bytes())
                .expect("feed promtool");
            let out = child.wait_with_output().expect("promtool");
            assert!(
                out.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
