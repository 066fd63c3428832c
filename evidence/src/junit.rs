//! `junit.xml`: the run as a JUnit report, for CI (Jenkins' `junit` step, GitLab, …).
//!
//! One `<testsuite>` named after the runbook (inside a `<testsuites>` root), one `<testcase>`
//! per step and target: `classname="<runbook>.<phase>"` (`steps` without a phase) and
//! `name="<step> [<target>]"`, so Jenkins shows runbook → phase → step. A failed step carries
//! `<failure message="<reason>" type="<outcome kind>">` with the end of its last attempt's log,
//! a skipped one `<skipped message="<reason>"/>`, a cancelled or unfinished one `<error>`.
//! A run that failed for a reason of its own (a `before_run`/`after_run` hook,
//! `--fail-on-leak`), or that did not succeed while no step case says so, gets a `run` case
//! (`classname="<runbook>.run"`) with that reason: a failed run never reads as green in CI.
//!
//! Attributes are limited to those the junit-10.xsd schema (Jenkins xUnit plugin) allows, so the
//! file validates there too: `skipped` and `timestamp` only on `<testsuite>`.

use std::fmt::Write as _;
use std::path::Path;

use chrono::SecondsFormat;
use runbook_engine::event::StepStatus;

use crate::log_tail::{excerpt, read_log_tail, LogLine};
use crate::manifest::{AttemptRecord, Manifest, StepRecord};
use crate::run_view::{attempts_by_target, clean_text, fmt_duration, outcome_kind, run_duration};

/// Log lines included in a `<failure>`/`<error>` body: the last ones, and the last stderr
/// lines wherever they are.
const TAIL_LINES: usize = 50;
const TAIL_ERR_LINES: usize = 20;
/// Bytes of the log end looked at for them.
const TAIL_BYTES: u64 = 256 * 1024;

enum Verdict {
    Pass,
    Failure { message: String, kind: String },
    Error { message: String, kind: String },
    Skipped { message: String },
}

struct Case<'a> {
    classname: String,
    name: String,
    time: f64,
    verdict: Verdict,
    /// Attempts on this target, in order (the last one's log goes into the failure body).
    attempts: Vec<&'a AttemptRecord>,
    step: &'a StepRecord,
}

pub fn render_junit(manifest: &Manifest, bundle: &Path) -> String {
    let m = manifest;
    let mut cases: Vec<Case> = Vec::new();
    for step in &m.steps {
        let classname = format!(
            "{}.{}",
            m.runbook.name,
            step.phase.as_deref().unwrap_or("steps")
        );
        let mut targets = attempts_by_target(step);
        if targets.is_empty() {
            targets.push(("local".to_owned(), Vec::new()));
        }
        let multi = targets.len() > 1;
        // With several targets, a failed step marks only the targets whose last attempt did
        // not succeed (all of them if each did: the step failed for another reason).
        let all_targets_ok = targets.iter().all(|(_, a)| {
            a.last()
                .and_then(|a| a.outcome.as_ref())
                .is_some_and(|o| o.succeeded())
        });
        for (target, attempts) in targets {
            let last = attempts.last().copied();
            let last_ok = last
                .and_then(|a| a.outcome.as_ref())
                .is_some_and(|o| o.succeeded());
            let time = if multi {
                attempts.iter().filter_map(|a| a.duration_seconds).sum()
            } else {
                step.duration_seconds
            };
            let verdict = verdict(m, step, last, last_ok, all_targets_ok);
            cases.push(Case {
                classname: classname.clone(),
                name: format!("{} [{}]", step.id, target),
                time,
                verdict,
                attempts,
                step,
            });
        }
    }

    // A drill's objectives are test cases of their own: a missed RTO fails the build.
    let drill_cases: Vec<(String, f64, Option<String>)> = m
        .drill
        .iter()
        .flat_map(|d| [("RTO", &d.rto), ("RPO", &d.rpo)])
        .filter_map(|(name, o)| o.as_ref().map(|o| (name, o)))
        .map(|(name, o)| {
            let measured = o
                .measured_seconds
                .map_or("not measured".to_owned(), |s| format!("{s:.1}s"));
            let message = format!(
                "{name} {measured}, target {:.1}s: {}{}",
                o.target_seconds,
                o.verdict.as_str(),
                o.why
                    .as_ref()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default()
            );
            let failed = o.verdict != runbook_engine::event::Verdict::Pass;
            (
                format!("drill {name}"),
                o.measured_seconds.unwrap_or(0.0),
                failed.then_some(message),
            )
        })
        .collect();
    let count = |f: fn(&Verdict) -> bool| cases.iter().filter(|c| f(&c.verdict)).count();
    let run_case = run_verdict(
        m,
        count(|v| matches!(v, Verdict::Failure { .. } | Verdict::Error { .. }))
            + drill_cases.iter().filter(|c| c.2.is_some()).count(),
    );
    let failures = count(|v| matches!(v, Verdict::Failure { .. }))
        + drill_cases.iter().filter(|c| c.2.is_some()).count()
        + usize::from(matches!(run_case, Some(Verdict::Failure { .. })));
    let errors = count(|v| matches!(v, Verdict::Error { .. }))
        + usize::from(matches!(run_case, Some(Verdict::Error { .. })));
    let skipped = count(|v| matches!(v, Verdict::Skipped { .. }));
    let total = cases.len() + drill_cases.len() + usize::from(run_case.is_some());
    let time = run_duration(m);
    // The junit schema's timestamp is an xs:dateTime without zone; it is UTC here (the exact
    // instant, with zone, is the `started_at` property).
    let timestamp = m.started_at.format("%Y-%m-%dT%H:%M:%S").to_string();

    let mut x = String::with_capacity(16 * 1024);
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{time:.3}\">",
        attr(&m.runbook.name),
        total,
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" \
         skipped=\"{skipped}\" time=\"{time:.3}\" timestamp=\"{timestamp}\" hostname=\"{}\" id=\"{}\">",
        attr(&m.runbook.name),
        total,
        attr(&m.operator.host),
        attr(&m.run_id),
    );
    x.push_str("    <properties>\n");
    let mut prop = |name: &str, value: &str| {
        let _ = writeln!(
            x,
            "      <property name=\"{}\" value=\"{}\"/>",
            attr(name),
            attr(value)
        );
    };
    prop("run_id", &m.run_id);
    prop("status", m.status.as_str());
    if let Some(title) = &m.runbook.title {
        prop("runbook_title", title);
    }
    prop("runbook_path", &m.runbook.path);
    prop("runbook_sha256", &m.runbook.sha256);
    prop(
        "started_at",
        &m.started_at.to_rfc3339_opts(SecondsFormat::Millis, true),
    );
    if let Some(end) = m.finished_at {
        prop(
            "finished_at",
            &end.to_rfc3339_opts(SecondsFormat::Millis, true),
        );
    }
    prop(
        "operator",
        &format!(
            "{}@{} (uid {})",
            m.operator.user, m.operator.host, m.operator.uid
        ),
    );
    prop("engine", &format!("{} {}", m.engine.name, m.engine.version));
    for r in &m.runbook.refs {
        prop("ref", r);
    }
    if let serde_json::Value::Object(params) = &m.params {
        for (k, v) in params {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            prop(&format!("param.{k}"), &v);
        }
    }
    x.push_str("    </properties>\n");

    for c in &cases {
        let _ = write!(
            x,
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
            attr(&c.classname),
            attr(&c.name),
            c.time
        );
        let out = system_out(c);
        match &c.verdict {
            Verdict::Pass => {
                let _ = writeln!(x, ">");
            }
            Verdict::Skipped { message } => {
                let _ = writeln!(x, ">\n      <skipped message=\"{}\"/>", attr(message));
            }
            Verdict::Failure { message, kind } | Verdict::Error { message, kind } => {
                let el = if matches!(c.verdict, Verdict::Failure { .. }) {
                    "failure"
                } else {
                    "error"
                };
                let body = c
                    .attempts
                    .last()
                    .map(|a| log_tail_text(bundle, a))
                    .unwrap_or_default();
                let _ = writeln!(
                    x,
                    ">\n      <{el} message=\"{}\" type=\"{}\">{}</{el}>",
                    attr(message),
                    attr(kind),
                    text(&body)
                );
            }
        }
        let _ = writeln!(x, "      <system-out>{}</system-out>", text(&out));
        x.push_str("    </testcase>\n");
    }
    for (name, time, failure) in &drill_cases {
        let _ = writeln!(
            x,
            "    <testcase classname=\"{}.drill\" name=\"{}\" time=\"{time:.3}\">",
            attr(&m.runbook.name),
            attr(name)
        );
        if let Some(message) = failure {
            let _ = writeln!(
                x,
                "      <failure message=\"{}\" type=\"objective\">{}</failure>",
                attr(message),
                text(message)
            );
        }
        x.push_str("    </testcase>\n");
    }
    if let Some(Verdict::Failure { message, kind } | Verdict::Error { message, kind }) = &run_case {
        let el = if matches!(run_case, Some(Verdict::Failure { .. })) {
            "failure"
        } else {
            "error"
        };
        let _ = writeln!(
            x,
            "    <testcase classname=\"{}.run\" name=\"run\" time=\"{time:.3}\">\n      \
             <{el} message=\"{}\" type=\"{}\">{}</{el}>",
            attr(&m.runbook.name),
            attr(message),
            attr(kind),
            text(&run_notes(m))
        );
        x.push_str("    </testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

/// The `run` case: a failure when the run failed for a reason of its own, or when it did not
/// succeed and no step or objective case (`failing` of them) says so — Jenkins would otherwise
/// show a failed run as passing.
fn run_verdict(m: &Manifest, failing: usize) -> Option<Verdict> {
    use runbook_engine::event::RunStatus;
    let status = m.status.as_str();
    match (&m.reason, m.status) {
        (Some(reason), RunStatus::Cancelled | RunStatus::Interrupted) => Some(Verdict::Error {
            message: reason.clone(),
            kind: status.into(),
        }),
        (Some(reason), _) => Some(Verdict::Failure {
            message: reason.clone(),
            kind: "run".into(),
        }),
        (None, RunStatus::Failed) if failing == 0 => Some(Verdict::Failure {
            message: format!("run {status}"),
            kind: "run".into(),
        }),
        (None, RunStatus::Cancelled | RunStatus::Interrupted) if failing == 0 => {
            Some(Verdict::Error {
                message: format!("run {status}"),
                kind: status.into(),
            })
        }
        _ => None,
    }
}

/// The body of the `run` case: the run's notes, which say what happened outside the steps.
fn run_notes(m: &Manifest) -> String {
    let mut out = format!("run {}: {}\n", m.run_id, m.status.as_str());
    if let Some(r) = &m.reason {
        let _ = writeln!(out, "reason: {r}");
    }
    for n in &m.notes {
        let _ = writeln!(
            out,
            "note {}: {}",
            n.at.to_rfc3339_opts(SecondsFormat::Millis, true),
            n.message
        );
    }
    out
}

fn verdict(
    m: &Manifest,
    step: &StepRecord,
    last: Option<&AttemptRecord>,
    last_ok: bool,
    all_targets_ok: bool,
) -> Verdict {
    let reason = || {
        step.reason
            .clone()
            .or_else(|| last.and_then(|a| a.error.clone()))
            .or_else(|| last.and_then(|a| a.outcome.as_ref().map(|o| o.describe())))
            .unwrap_or_default()
    };
    let kind = || match last.and_then(|a| a.outcome.as_ref()) {
        Some(o) => {
            let (kind, failure) = outcome_kind(o);
            failure.unwrap_or(kind)
        }
        None => "failed".to_owned(),
    };
    match step.status {
        Some(StepStatus::Succeeded) => Verdict::Pass,
        Some(StepStatus::Failed) => {
            if last_ok && !all_targets_ok {
                Verdict::Pass
            } else {
                Verdict::Failure {
                    message: reason(),
                    kind: kind(),
                }
            }
        }
        Some(StepStatus::Skipped) => Verdict::Skipped { message: reason() },
        Some(StepStatus::Cancelled) => Verdict::Error {
            message: {
                let r = reason();
                if r.is_empty() {
                    "cancelled".into()
                } else {
                    r
                }
            },
            kind: "cancelled".into(),
        },
        None => match last {
            Some(a) if a.outcome.is_none() => Verdict::Error {
                message: format!(
                    "attempt {} did not finish (run {})",
                    a.attempt,
                    m.status.as_str()
                ),
                kind: "unfinished".into(),
            },
            Some(_) => Verdict::Error {
                message: format!("step did not finish (run {})", m.status.as_str()),
                kind: "unfinished".into(),
            },
            None => Verdict::Skipped {
                message: format!("not run (run {})", m.status.as_str()),
            },
        },
    }
}

fn system_out(c: &Case) -> String {
    let s = c.step;
    let mut out = format!(
        "step {}: {}",
        s.id,
        s.status.map_or("not run", StepStatus::as_str)
    );
    if let Some(r) = &s.reason {
        let _ = write!(out, " — {r}");
    }
    out.push('\n');
    for a in &c.attempts {
        let _ = writeln!(
            out,
            "attempt {} on {}: {} in {} — log {}",
            a.attempt,
            a.target,
            a.outcome
                .as_ref()
                .map_or_else(|| "did not finish".into(), |o| o.describe()),
            a.duration_seconds.map_or_else(|| "?".into(), fmt_duration),
            a.log
        );
    }
    for f in &s.collected {
        match (&f.copy, &f.sha256, &f.error) {
            (_, _, Some(e)) => {
                let _ = writeln!(out, "collect {}: {e}", f.source);
            }
            (Some(p), Some(h), None) => {
                let _ = writeln!(out, "collected {} → {p} sha256 {h}", f.source);
            }
            (Some(p), None, None) => {
                let _ = writeln!(out, "collected {} → {p}", f.source);
            }
            (None, _, None) => {}
        }
    }
    out
}

/// The end of an attempt's log, as records (`<time> <tag> <text>`): the last lines plus the
/// last stderr lines before them (a process's stderr is often read before its last stdout),
/// with `…` where lines are left out.
fn log_tail_text(bundle: &Path, a: &AttemptRecord) -> String {
    match read_log_tail(&bundle.join(&a.log), 2000, TAIL_BYTES) {
        Ok(tail) => {
            let lines: Vec<&LogLine> = tail.lines.iter().collect();
            let keep = excerpt(&lines, TAIL_LINES, TAIL_ERR_LINES);
            let mut out = format!(
                "{} (attempt {} on {}){}:\n",
                a.log,
                a.attempt,
                a.target,
                if keep.len() < lines.len() || tail.truncated {
                    format!(
                        ", {} lines: the last ones and the last stderr lines",
                        keep.len()
                    )
                } else {
                    String::new()
                }
            );
            let mut prev: Option<usize> = None;
            for k in keep {
                if prev.map_or(k > 0 || tail.truncated, |p| p + 1 != k) {
                    out.push_str("…\n");
                }
                let l = lines[k];
                if l.tag.is_empty() {
                    let _ = writeln!(out, "{}", l.text);
                } else {
                    let _ = writeln!(out, "{} {} {}", l.time, l.tag, l.text);
                }
                prev = Some(k);
            }
            out
        }
        Err(e) => format!("(log {} could not be read: {e})\n", a.log),
    }
}

/// Text content: escaped, ANSI sequences removed, characters XML 1.0 forbids made visible.
fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in clean_text(s).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// Attribute value: as `text`, plus quotes, and whitespace as character references (an
/// attribute's newlines and tabs would otherwise be normalised to spaces).
fn attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in clean_text(s).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{failed_run, succeeded_run};

    /// Characters XML 1.0 allows.
    fn xml_char_ok(c: char) -> bool {
        matches!(c as u32, 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..=0x10FFFF)
    }

    fn testcase<'a>(xml: &'a str, name: &str) -> &'a str {
        let start = xml
            .find(&format!("name=\"{name}\""))
            .unwrap_or_else(|| panic!("no testcase {name}"));
        let end = start + xml[start..].find("</testcase>").expect("end");
        &xml[start..end]
    }

    #[test]
    fn failed_run_as_junit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = failed_run(dir.path());
        let x = render_junit(&m, dir.path());
        assert!(x.chars().all(xml_char_ok), "invalid XML character");
        assert!(x.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites "));
        // fetch, restore, verify, notify, cleanup on host-a and host-b.
        assert!(x.contains(
            "<testsuite name=\"db-restore\" tests=\"6\" failures=\"2\" errors=\"1\" skipped=\"1\" \
             time=\"10.250\" timestamp=\"2026-08-20T10:15:00\" hostname=\"jump-1\" id=\"7f3a9c\">"
        ));
        assert_eq!(x.matches("<testsuite ").count(), 1);
        assert_eq!(x.matches("<testcase ").count(), 6);

        let fetch = testcase(&x, "fetch [local]");
        assert!(x.contains("classname=\"db-restore.backup\" name=\"fetch [local]\" time=\"1.900\""));
        assert!(!fetch.contains("<failure"));
        assert!(fetch.contains("collect /srv/gone.txt: No such file"));

        let restore = testcase(&x, "restore [local]");
        assert!(restore
            .contains("<failure message=\"exit code 3 (after 2 attempts)\" type=\"exited\">"));
        // The last attempt's log, escaped, last 50 lines only.
        assert!(restore.contains(
            "steps/restore/local/attempt-2.log (attempt 2 on local), 50 lines: the last ones"
        ));
        assert!(restore.contains("err ERROR: relation \"orders\" does not exist"));
        assert!(restore.contains("]]&gt; &lt;/pre&gt;"));
        assert!(restore.contains("progress line 70"));
        assert!(restore.contains("…\n2026-08-20T10:15:05.024Z out progress line 24\n"));
        assert!(!restore.contains("progress line 23\n"));
        assert!(!restore.contains('\x1b'));

        let verify = testcase(&x, "verify [local]");
        assert!(verify.contains("<skipped message=\"needs `restore`, which failed\"/>"));
        let notify = testcase(&x, "notify [local]");
        assert!(x.contains("classname=\"db-restore.steps\" name=\"notify [local]\""));
        assert!(notify.contains("<error message=\"run cancelled (SIGINT)\" type=\"cancelled\">"));

        // Two targets: only the one that failed is a failure.
        assert!(!testcase(&x, "cleanup [host-a]").contains("<failure"));
        let b = testcase(&x, "cleanup [host-b]");
        assert!(b.contains("<failure message=\"exit code 1 on host-b\" type=\"exited\">"));
        assert!(b.contains("Permission denied"));

        assert!(x.contains("<property name=\"param.token\" value=\"[REDACTED:token]\"/>"));
        assert!(x.contains("<property name=\"runbook_title\" value=\"DB restore drill &lt;prod&gt; &amp; &quot;friends&quot;\"/>"));
    }

    #[test]
    fn stderr_read_before_the_last_stdout_is_in_the_failure_body() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = failed_run(dir.path());
        let mut log = String::from("2026-08-20T10:15:05.000Z --- $ restore\n");
        log.push_str("2026-08-20T10:15:05.001Z err fatal: disk full\n");
        for i in 0..100 {
            log.push_str(&format!("2026-08-20T10:15:05.002Z out line {i}\n"));
        }
        log.push_str("2026-08-20T10:15:06.000Z --- attempt 2: exit code 3\n");
        std::fs::write(dir.path().join("steps/restore/local/attempt-2.log"), log).expect("w");
        let x = render_junit(&m, dir.path());
        let restore = testcase(&x, "restore [local]");
        assert!(restore.contains(
            "…\n2026-08-20T10:15:05.001Z err fatal: disk full\n…\n\
             2026-08-20T10:15:05.002Z out line 51\n"
        ));
        assert!(restore.contains("--- attempt 2: exit code 3\n</failure>"));
    }

    #[test]
    fn succeeded_run_as_junit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = succeeded_run(dir.path());
        let x = render_junit(&m, dir.path());
        assert!(x.contains("tests=\"1\" failures=\"0\" errors=\"0\" skipped=\"0\""));
        assert!(x.contains(
            "<testcase classname=\"ok-book.steps\" name=\"only [local]\" time=\"0.020\">"
        ));
    }

    /// A run that did not succeed always has a failing case, even when every step passed.
    #[test]
    fn a_run_level_failure_is_a_run_case() {
        use runbook_engine::event::RunStatus;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = succeeded_run(dir.path());
        m.status = RunStatus::Failed;
        m.reason = Some("the `after_run` hook failed: <no> & \"done\"".into());
        let x = render_junit(&m, dir.path());
        assert!(x.contains("tests=\"2\" failures=\"1\" errors=\"0\" skipped=\"0\""));
        let run = testcase(&x, "run");
        assert!(run.contains(
            "<failure message=\"the `after_run` hook failed: &lt;no&gt; &amp; &quot;done&quot;\" type=\"run\">"
        ));
        assert!(run.contains("reason: the `after_run` hook failed"));

        // No reason recorded and no failing step: still failing, with the status.
        m.reason = None;
        let x = render_junit(&m, dir.path());
        assert!(testcase(&x, "run").contains("<failure message=\"run failed\" type=\"run\">"));
        m.status = RunStatus::Interrupted;
        let x = render_junit(&m, dir.path());
        assert!(x.contains("failures=\"0\" errors=\"1\""));
        assert!(testcase(&x, "run")
            .contains("<error message=\"run interrupted\" type=\"interrupted\">"));

        // A failed step already fails the report: no extra case without a run reason.
        let x = render_junit(&failed_run(dir.path()), dir.path());
        assert!(!x.contains("name=\"run\""));
        // A succeeded run has none either.
        let x = render_junit(&succeeded_run(dir.path()), dir.path());
        assert!(!x.contains("name=\"run\""));
    }

    #[test]
    fn escaping_handles_markup_quotes_newlines_and_forbidden_characters() {
        assert_eq!(
            attr("a<b>&\"c'\nd\te"),
            "a&lt;b&gt;&amp;&quot;c&apos;&#10;d&#9;e"
        );
        assert_eq!(text("x\x00y\x1b[31mz\x0c\u{ffff}"), "x^@yz^L\u{fffd}");
        assert_eq!(text("]]> <!-- -->"), "]]&gt; &lt;!-- --&gt;");
    }

    /// `xmllint` finds the output well-formed.
    #[test]
    fn xmllint_accepts_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = failed_run(dir.path());
        let path = dir.path().join("junit.xml");
        std::fs::write(&path, render_junit(&m, dir.path())).expect("write");
        match std::process::Command::new("xmllint")
            .arg("--noout")
            .arg(&path)
            .output()
        {
            Ok(out) => assert!(
                out.status.success(),
                "xmllint: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(_) => panic!(
                "xmllint is not installed: `apt-get install libxml2-utils` (scripts/test does)"
            ),
        }
    }
}
