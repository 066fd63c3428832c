//! `report.html`: one self-contained page an assessor can open (or print to PDF) to see the
//! verdict, what failed, when each step ran, and the logs — without any tool.
//!
//! Everything comes from the manifest and the attempt logs in the bundle; nothing is fetched
//! (inline CSS, a few lines of inline JS, a Content-Security-Policy that forbids loading
//! anything). Links to logs and collected files are relative: they work when the page sits at
//! the bundle root (`<bundle>/report.html`).

use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use chrono::{DateTime, Utc};
use runbook_engine::event::{AttemptOutcome, StepStatus};

use crate::manifest::{AttemptRecord, Manifest, StepRecord};
use crate::EvidenceError;

/// Most of an attempt log shown in the report: the last lines/bytes.
const MAX_LOG_LINES: usize = 2000;
const MAX_LOG_BYTES: u64 = 1024 * 1024;
/// All logs in one page together (beyond it, each log gets only its last `MIN_LOG_BYTES`).
const MAX_TOTAL_LOG_BYTES: u64 = 24 * 1024 * 1024;
const MIN_LOG_BYTES: u64 = 64 * 1024;
/// Lines of output shown for a failed step in "What failed".
const FAILURE_EXCERPT_LINES: usize = 8;

// ---------------------------------------------------------------------------------------------
// Shared helpers (also used by junit.rs)
// ---------------------------------------------------------------------------------------------

/// One record of an attempt log (`<time> <tag> <bytes>`, see log.rs).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LogLine {
    /// RFC 3339 UTC, as written.
    pub time: String,
    /// `out`, `err`, `out+`, `err+`, `---`, or empty when the line is not a log record.
    pub tag: String,
    /// The bytes, decoded lossily.
    pub text: String,
}

impl LogLine {
    pub fn is_err(&self) -> bool {
        self.tag.starts_with("err")
    }
    pub fn is_meta(&self) -> bool {
        self.tag == "---"
    }
}

/// The end of an attempt log.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogTail {
    pub lines: Vec<LogLine>,
    /// Size of the whole file.
    pub total_bytes: u64,
    /// Lines before `lines` were left out.
    pub truncated: bool,
}

pub(crate) fn parse_log_line(raw: &[u8]) -> LogLine {
    let text = String::from_utf8_lossy(raw);
    let mut parts = text.splitn(3, ' ');
    let (time, tag, rest) = (parts.next(), parts.next(), parts.next());
    match (time, tag) {
        (Some(time), Some(tag))
            if time.len() >= 20
                && time.as_bytes()[4] == b'-'
                && matches!(tag, "out" | "err" | "out+" | "err+" | "---") =>
        {
            LogLine {
                time: time.to_owned(),
                tag: tag.to_owned(),
                text: rest.unwrap_or("").to_owned(),
            }
        }
        _ => LogLine {
            time: String::new(),
            tag: String::new(),
            text: text.into_owned(),
        },
    }
}

/// Reads the last `max_lines` records of a log, looking at no more than its last `max_bytes`.
pub(crate) fn read_log_tail(
    path: &Path,
    max_lines: usize,
    max_bytes: u64,
) -> std::io::Result<LogTail> {
    let mut file = std::fs::File::open(path)?;
    let total_bytes = file.metadata()?.len();
    let mut truncated = false;
    let start = total_bytes.saturating_sub(max_bytes);
    if start > 0 {
        file.seek(SeekFrom::Start(start))?;
        truncated = true;
    }
    let mut data = Vec::new();
    file.take(max_bytes).read_to_end(&mut data)?;
    let mut body: &[u8] = &data;
    if start > 0 {
        // Drop the partial first record.
        body = match body.iter().position(|&b| b == b'\n') {
            Some(n) => &body[n + 1..],
            None => &[],
        };
    }
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let mut records: Vec<&[u8]> = if body.is_empty() {
        Vec::new()
    } else {
        body.split(|&b| b == b'\n').collect()
    };
    if records.len() > max_lines {
        records.drain(..records.len() - max_lines);
        truncated = true;
    }
    Ok(LogTail {
        lines: records.into_iter().map(parse_log_line).collect(),
        total_bytes,
        truncated,
    })
}

/// Text safe to show anywhere: ANSI escape sequences removed, carriage returns dropped, other
/// control characters (except tab and newline) shown in caret notation like `cat -v` (`^G`),
/// noncharacters U+FFFE/U+FFFF replaced by U+FFFD.
pub(crate) fn clean_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.peek() {
                // CSI: ESC [ parameters… final byte 0x40–0x7E
                Some('[') => {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: ESC ] … BEL or ESC \
                Some(']') => {
                    chars.next();
                    while let Some(c) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' {
                            if chars.peek() == Some(&'\\') {
                                chars.next();
                            }
                            break;
                        }
                    }
                }
                Some(_) => {
                    chars.next();
                }
                None => {}
            },
            '\t' | '\n' => out.push(c),
            '\r' => {}
            c if (c as u32) < 0x20 => {
                out.push('^');
                out.push(char::from_u32(0x40 + c as u32).unwrap_or('?'));
            }
            '\x7f' => out.push_str("^?"),
            '\u{fffe}' | '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `3 ms`, `1.04 s`, `2 min 03 s`, `1 h 02 min`.
pub(crate) fn fmt_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "–".into();
    }
    if secs < 1.0 {
        return format!("{} ms", (secs * 1000.0).round() as u64);
    }
    if secs < 60.0 {
        let s = format!("{secs:.2}");
        return format!("{} s", s.trim_end_matches('0').trim_end_matches('.'));
    }
    let total = secs.round() as u64;
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h} h {m:02} min {s:02} s")
    } else {
        format!("{m} min {s:02} s")
    }
}

/// Serde name of an outcome (`exited`, `timed_out`, …) and, for `failed`, its failure kind.
pub(crate) fn outcome_kind(outcome: &AttemptOutcome) -> (String, Option<String>) {
    let v = serde_json::to_value(outcome).unwrap_or_default();
    let kind = v
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("unknown")
        .to_owned();
    let failure = v.get("failure").and_then(|k| k.as_str()).map(str::to_owned);
    (kind, failure)
}

/// Attempts grouped by target, targets in order of first appearance.
pub(crate) fn attempts_by_target(step: &StepRecord) -> Vec<(String, Vec<&AttemptRecord>)> {
    let mut out: Vec<(String, Vec<&AttemptRecord>)> = Vec::new();
    for a in &step.attempts {
        match out.iter_mut().find(|(t, _)| *t == a.target) {
            Some((_, list)) => list.push(a),
            None => out.push((a.target.clone(), vec![a])),
        }
    }
    out
}

/// The end of the run: `finished_at`, else the latest time anything was recorded.
pub(crate) fn run_end(m: &Manifest) -> DateTime<Utc> {
    if let Some(end) = m.finished_at {
        return end;
    }
    let mut end = m.started_at;
    for s in &m.steps {
        for t in [s.started_at, s.finished_at].into_iter().flatten() {
            end = end.max(t);
        }
        for a in &s.attempts {
            end = end.max(a.finished_at.unwrap_or(a.started_at));
        }
    }
    end
}

pub(crate) fn run_duration(m: &Manifest) -> f64 {
    m.duration_seconds
        .unwrap_or_else(|| secs_between(m.started_at, run_end(m)))
}

fn secs_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(0) as f64 / 1e6
}

fn step_status_str(step: &StepRecord) -> &'static str {
    match step.status {
        Some(s) => s.as_str(),
        None if step.attempts.iter().any(|a| a.outcome.is_none()) => "unfinished",
        None => "not run",
    }
}

fn status_class(status: &str) -> &'static str {
    match status {
        "succeeded" => "ok",
        "failed" => "fail",
        "skipped" | "not run" => "skip",
        "cancelled" => "cancel",
        "interrupted" | "unfinished" | "timed_out" => "warn",
        _ => "info",
    }
}

fn attempt_class(a: &AttemptRecord) -> &'static str {
    match &a.outcome {
        None => "warn",
        Some(o) if o.succeeded() => "ok",
        Some(o) => match outcome_kind(o).0.as_str() {
            "timed_out" => "warn",
            "cancelled" => "cancel",
            _ => "fail",
        },
    }
}

fn attempt_outcome_text(a: &AttemptRecord) -> String {
    match &a.outcome {
        Some(o) => o.describe(),
        None => "did not finish".into(),
    }
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn fmt_clock(t: DateTime<Utc>) -> String {
    t.format("%H:%M:%S%.3f").to_string()
}

fn anchor(step_id: &str) -> String {
    let mut out = String::from("step-");
    for c in step_id.chars() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            out.push(c);
        } else {
            let _ = write!(out, "_{:x}", c as u32);
        }
    }
    out
}

/// A relative bundle path as an `href` (each segment percent-encoded where needed).
fn href(rel: &str) -> String {
    let mut out = String::new();
    for b in rel.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    escape_html(&out)
}

fn json_inline(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// Renders the report for a bundle; `bundle` is the bundle directory (attempt logs are read
/// from it). A missing log is noted in the page, not an error; other read errors are.
pub fn render_report(manifest: &Manifest, bundle: &Path) -> Result<String, EvidenceError> {
    let m = manifest;
    let status = m.status.as_str();
    let vclass = status_class(status);
    let title = m
        .runbook
        .title
        .clone()
        .unwrap_or_else(|| m.runbook.name.clone());
    let end = run_end(m);
    let total = run_duration(m);
    let mut h = String::with_capacity(64 * 1024);

    // Logs, read once: (step index, attempt index) -> tail or a note. Steps that did not
    // succeed get their share of the page's log budget first.
    let mut logs: Vec<Vec<Option<Result<LogTail, String>>>> = m
        .steps
        .iter()
        .map(|s| vec![None; s.attempts.len()])
        .collect();
    let mut order: Vec<(usize, usize)> = m
        .steps
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..s.attempts.len()).map(move |j| (i, j)))
        .collect();
    order.sort_by_key(|&(i, _)| m.steps[i].status == Some(StepStatus::Succeeded));
    let mut budget = MAX_TOTAL_LOG_BYTES;
    for (i, j) in order {
        let a = &m.steps[i].attempts[j];
        if a.log.is_empty() {
            logs[i][j] = Some(Err(
                "Superseded: of a probe's attempts only the last is kept in full; this one is summarised by its outcome and details (journal.jsonl)."
                    .to_owned(),
            ));
            continue;
        }
        let path = bundle.join(&a.log);
        let max_bytes = MAX_LOG_BYTES.min(budget.max(MIN_LOG_BYTES));
        let tail = match read_log_tail(&path, MAX_LOG_LINES, max_bytes) {
            Ok(t) => {
                budget = budget.saturating_sub(t.total_bytes.min(max_bytes));
                Ok(t)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(format!("The log file {} is not in the bundle.", a.log))
            }
            Err(source) => return Err(EvidenceError::Read { path, source }),
        };
        logs[i][j] = Some(tail);
    }
    let logs: Vec<Vec<Result<LogTail, String>>> = logs
        .into_iter()
        .map(|per| per.into_iter().flatten().collect())
        .collect();

    let _ = writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"{} {}\">\n\
         <link rel=\"icon\" href=\"data:,\">\n\
         <title>{} — {} — run {}</title>\n<style>{}</style>\n</head>\n<body>",
        escape_html(&m.engine.name),
        escape_html(&m.engine.version),
        escape_html(&status.to_uppercase()),
        escape_html(&m.runbook.name),
        escape_html(&m.run_id),
        CSS
    );

    // ---- Verdict banner ----------------------------------------------------------------
    let failed: Vec<(usize, &StepRecord)> = m
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            matches!(
                s.status,
                Some(StepStatus::Failed) | Some(StepStatus::Cancelled)
            ) || (s.status.is_none() && s.attempts.iter().any(|a| a.outcome.is_none()))
        })
        .collect();
    let _ = writeln!(
        h,
        "<header class=\"verdict v-{vclass}\">\n<div class=\"badge-big\">{}</div>\n\
         <div class=\"vtext\">\n<h1>{}</h1>\n<div class=\"vsub\">runbook <b>{}</b> · run <b>{}</b> · \
         {} · {}</div>",
        escape_html(&status.replace('_', " ").to_uppercase()),
        escape_html(&title),
        escape_html(&m.runbook.name),
        escape_html(&m.run_id),
        escape_html(&fmt_time(m.started_at)),
        escape_html(&fmt_duration(total)),
    );
    if let Some(reason) = &m.reason {
        // A run can fail with every step green (a hook, `--fail-on-leak`): say why first.
        let _ = writeln!(
            h,
            "<div class=\"vline\">Run {}: {}</div>",
            escape_html(&status.replace('_', " ")),
            escape_html(&clean_text(reason))
        );
    }
    let _ = writeln!(h, "<div class=\"vline\">{}</div>", verdict_line(m, &failed));
    h.push_str("</div>\n</header>\n<main>\n");

    // ---- Drill verdict ------------------------------------------------------------------
    if let Some(d) = &m.drill {
        render_drill(&mut h, d);
    }

    // ---- What failed --------------------------------------------------------------------
    if !failed.is_empty() {
        h.push_str("<section id=\"failures\">\n<h2>What failed</h2>\n");
        for (i, s) in &failed {
            let st = step_status_str(s);
            let _ = write!(
                h,
                "<div class=\"fcard c-{}\">\n<div class=\"fhead\"><span class=\"badge b-{}\">{}</span> \
                 <a href=\"#{}\" class=\"fstep\">{}</a>",
                status_class(st),
                status_class(st),
                escape_html(st),
                anchor(&s.id),
                escape_html(&s.id)
            );
            if let Some(p) = &s.phase {
                let _ = write!(h, " <span class=\"phase\">{}</span>", escape_html(p));
            }
            let _ = writeln!(
                h,
                "<span class=\"fmeta\">{} attempt{} · {}</span></div>",
                s.attempts.len(),
                if s.attempts.len() == 1 { "" } else { "s" },
                escape_html(&fmt_duration(s.duration_seconds))
            );
            if let Some(r) = &s.reason {
                let _ = writeln!(
                    h,
                    "<div class=\"freason\">{}</div>",
                    escape_html(&clean_text(r))
                );
            }
            // The last attempt that did not succeed (on any target), else the last one.
            let pick = s
                .attempts
                .iter()
                .enumerate()
                .rev()
                .find(|(_, a)| !a.outcome.as_ref().is_some_and(|o| o.succeeded()))
                .or_else(|| s.attempts.iter().enumerate().next_back());
            if let Some((ai, a)) = pick {
                let _ = writeln!(
                    h,
                    "<div class=\"fcmd\">Last {}attempt {} on <b>{}</b>: <b>{}</b> — <code>{}</code></div>",
                    if s.attempts.len() > 1 && attempt_class(a) != "ok" { "failed " } else { "" },
                    a.attempt,
                    escape_html(&a.target),
                    escape_html(&attempt_outcome_text(a)),
                    escape_html(&first_line(&a.command))
                );
                if let Some(Ok(tail)) = logs[*i].get(ai) {
                    let out: Vec<&LogLine> = tail.lines.iter().filter(|l| !l.is_meta()).collect();
                    if !out.is_empty() {
                        let keep = excerpt(&out, FAILURE_EXCERPT_LINES, FAILURE_EXCERPT_LINES);
                        let errs = keep.iter().filter(|&&k| out[k].is_err()).count();
                        let _ = writeln!(
                            h,
                            "<div class=\"excerpt-title\">End of the output{}:</div>\n<pre class=\"log excerpt\">",
                            if errs > 0 {
                                " — <span class=\"errkey\">stderr</span> lines marked red"
                            } else {
                                " (nothing on stderr)"
                            }
                        );
                        let mut prev: Option<usize> = None;
                        for k in keep {
                            if prev.is_some_and(|p| p + 1 != k) || (prev.is_none() && k > 0) {
                                h.push_str("<span class=\"l gap\">        ⋯\n</span>");
                            }
                            render_log_line(&mut h, out[k]);
                            prev = Some(k);
                        }
                        h.push_str("</pre>\n");
                    }
                }
            }
            h.push_str("</div>\n");
        }
        h.push_str("</section>\n");
    }

    // ---- Run facts ------------------------------------------------------------------------
    h.push_str("<section id=\"facts\">\n<h2>Run</h2>\n<dl class=\"facts\">\n");
    let mut fact = |k: &str, v: String| {
        let _ = writeln!(h, "<dt>{}</dt><dd>{}</dd>", escape_html(k), v);
    };
    fact(
        "Status",
        format!(
            "<span class=\"badge b-{vclass}\">{}</span>",
            escape_html(status)
        ),
    );
    fact("Run ID", format!("<code>{}</code>", escape_html(&m.run_id)));
    fact(
        "Runbook",
        format!(
            "<b>{}</b>{}",
            escape_html(&m.runbook.name),
            m.runbook
                .title
                .as_ref()
                .map(|t| format!(" — {}", escape_html(t)))
                .unwrap_or_default()
        ),
    );
    fact(
        "Operator",
        format!(
            "<code>{}@{}</code> <span class=\"dim\">(uid {})</span>",
            escape_html(&m.operator.user),
            escape_html(&m.operator.host),
            m.operator.uid
        ),
    );
    fact("Started", escape_html(&fmt_time(m.started_at)));
    fact(
        "Finished",
        match m.finished_at {
            Some(t) => escape_html(&fmt_time(t)),
            None => "<span class=\"dim\">not recorded</span>".into(),
        },
    );
    fact("Duration", escape_html(&fmt_duration(total)));
    fact(
        "Refs",
        if m.runbook.refs.is_empty() {
            "<span class=\"dim\">none</span>".into()
        } else {
            m.runbook
                .refs
                .iter()
                .map(|r| {
                    if r.starts_with("https://") || r.starts_with("http://") {
                        format!(
                            "<a class=\"ref\" href=\"{}\">{}</a>",
                            escape_html(r),
                            escape_html(r)
                        )
                    } else {
                        format!("<span class=\"ref\">{}</span>", escape_html(r))
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        },
    );
    fact(
        "Runbook file",
        format!(
            "<code>{}</code> <span class=\"dim\">(copy: <a href=\"{}\">{}</a>)</span><br>\
             <span class=\"dim\">sha256</span> <code class=\"hash\">{}</code>",
            escape_html(&m.runbook.path),
            href(&m.runbook.copy),
            escape_html(&m.runbook.copy),
            escape_html(&m.runbook.sha256)
        ),
    );
    if let Some(inv) = &m.inventory {
        fact(
            "Inventory file",
            format!(
                "<code>{}</code> <span class=\"dim\">(copy: <a href=\"{}\">{}</a>)</span><br>\
                 <span class=\"dim\">sha256</span> <code class=\"hash\">{}</code>",
                escape_html(&inv.path),
                href(&inv.copy),
                escape_html(&inv.copy),
                escape_html(&inv.sha256)
            ),
        );
    }
    fact(
        "Command",
        format!(
            "<code>{}</code>",
            escape_html(&clean_text(&m.command_line.join(" ")))
        ),
    );
    fact(
        "Working dir",
        format!("<code>{}</code>", escape_html(&m.workdir)),
    );
    fact(
        "Engine",
        format!(
            "{} {} <span class=\"dim\">· evidence format {}</span>",
            escape_html(&m.engine.name),
            escape_html(&m.engine.version),
            escape_html(&m.format)
        ),
    );
    if !m.secrets.is_empty() {
        fact(
            "Secrets redacted",
            m.secrets
                .iter()
                .map(|s| format!("<code>{}</code>", escape_html(s)))
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    h.push_str("</dl>\n");

    // Counts
    h.push_str("<div class=\"counts\">");
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for s in &m.steps {
        let st = step_status_str(s);
        match counts.iter_mut().find(|(k, _)| *k == st) {
            Some((_, n)) => *n += 1,
            None => counts.push((st, 1)),
        }
    }
    let order = [
        "failed",
        "cancelled",
        "unfinished",
        "succeeded",
        "skipped",
        "not run",
    ];
    counts.sort_by_key(|(k, _)| order.iter().position(|o| o == k).unwrap_or(order.len()));
    let _ = write!(
        h,
        "<span class=\"count\"><b>{}</b> steps</span>",
        m.steps.len()
    );
    for (k, n) in counts {
        let _ = write!(
            h,
            "<span class=\"count b-{}\"><b>{n}</b> {}</span>",
            status_class(k),
            escape_html(k)
        );
    }
    h.push_str("</div>\n</section>\n");

    // ---- Timeline ---------------------------------------------------------------------------
    render_timeline(&mut h, m, end);

    // ---- Steps table ------------------------------------------------------------------------
    h.push_str(
        "<section id=\"steps\">\n<h2>Steps</h2>\n<table class=\"steps\">\n<thead><tr><th>#</th><th>Step</th>\
         <th>Phase</th><th>Status</th><th class=\"num\">Attempts</th><th class=\"num\">Duration</th>\
         <th>Started</th><th>Reason / result</th></tr></thead>\n<tbody>\n",
    );
    for (n, s) in m.steps.iter().enumerate() {
        let st = step_status_str(s);
        let targets: Vec<String> = attempts_by_target(s).into_iter().map(|t| t.0).collect();
        let result = match (&s.reason, s.attempts.last()) {
            (Some(r), _) => escape_html(&clean_text(r)),
            (None, Some(a)) if s.status == Some(StepStatus::Succeeded) => {
                if s.attempts.len() > 1 {
                    format!("succeeded on attempt {}", a.attempt)
                } else {
                    String::new()
                }
            }
            (None, Some(a)) => escape_html(&attempt_outcome_text(a)),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            h,
            "<tr class=\"r-{}\"><td class=\"num dim\">{}</td><td><a href=\"#{}\"><b>{}</b></a>{}</td>\
             <td>{}</td><td><span class=\"badge b-{}\">{}</span></td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"dim\">{}</td><td>{}</td></tr>",
            status_class(st),
            n + 1,
            anchor(&s.id),
            escape_html(&s.id),
            if targets.is_empty() || targets == ["local"] {
                String::new()
            } else {
                format!(" <span class=\"dim\">[{}]</span>", escape_html(&targets.join(", ")))
            },
            s.phase.as_deref().map(escape_html).unwrap_or_default(),
            status_class(st),
            escape_html(st),
            s.attempts.len(),
            if s.attempts.is_empty() && s.started_at.is_none() {
                "–".into()
            } else {
                escape_html(&fmt_duration(s.duration_seconds))
            },
            s.started_at.map(fmt_clock).unwrap_or_default(),
            result
        );
    }
    h.push_str("</tbody>\n</table>\n</section>\n");

    // ---- Parameters -------------------------------------------------------------------------
    h.push_str("<section id=\"params\">\n<h2>Parameters</h2>\n");
    match &m.params {
        serde_json::Value::Object(map) if !map.is_empty() => {
            h.push_str(
                "<table class=\"kv\">\n<thead><tr><th>Name</th><th>Value</th><th>Source</th></tr></thead>\n<tbody>\n",
            );
            for (k, v) in map {
                let source = m.param_sources.get(k).map(param_source).unwrap_or_default();
                let _ = writeln!(
                    h,
                    "<tr><td><code>{}</code></td><td><code class=\"val\">{}</code></td><td class=\"dim\">{}</td></tr>",
                    escape_html(k),
                    escape_html(&clean_text(&json_inline(v))),
                    escape_html(&source)
                );
            }
            h.push_str("</tbody>\n</table>\n");
        }
        serde_json::Value::Object(_) | serde_json::Value::Null => {
            h.push_str("<p class=\"dim\">This runbook takes no parameters.</p>\n");
        }
        other => {
            let _ = writeln!(
                h,
                "<pre class=\"json\">{}</pre>",
                escape_html(&other.to_string())
            );
        }
    }
    // The claim names what was searched and what was not: no more than redaction does.
    let _ = write!(
        h,
        "<p class=\"dim small\">Secret values are shown as <code>[REDACTED:name]</code>. \
         Searched for in everything the run wrote (logs, transcripts, journal, manifest, collected text files, this report; the copy of the runbook is kept verbatim), for each value: {}. Not searched: {}.</p>\n</section>\n",
        escape_html(crate::redact::SEARCHED_FORMS),
        escape_html(crate::redact::NOT_SEARCHED)
    );

    // ---- Step details -----------------------------------------------------------------------
    h.push_str(
        "<section id=\"details\">\n<h2>Step details and logs \
         <span class=\"tools no-print\"><button type=\"button\" onclick=\"setAll(true)\">Expand all</button>\
         <button type=\"button\" onclick=\"setAll(false)\">Collapse all</button></span></h2>\n",
    );
    for (i, s) in m.steps.iter().enumerate() {
        render_step_details(&mut h, s, &logs[i], bundle);
    }
    h.push_str("</section>\n");

    // ---- Collected files --------------------------------------------------------------------
    let collected: Vec<(&StepRecord, &crate::manifest::Collected)> = m
        .steps
        .iter()
        .flat_map(|s| s.collected.iter().map(move |c| (s, c)))
        .collect();
    h.push_str("<section id=\"collected\">\n<h2>Collected files</h2>\n");
    if collected.is_empty() {
        h.push_str("<p class=\"dim\">No files were collected.</p>\n");
    } else {
        h.push_str(
            "<table class=\"kv\">\n<thead><tr><th>Step</th><th>File</th><th>In the bundle</th><th>SHA-256</th></tr></thead>\n<tbody>\n",
        );
        for (s, c) in collected {
            let copy = match &c.copy {
                Some(p) => format!(
                    "<a href=\"{}\"><code>{}</code></a>",
                    href(p),
                    escape_html(p)
                ),
                None => "<span class=\"dim\">not copied</span>".into(),
            };
            let hash = match (&c.sha256, &c.error) {
                (_, Some(e)) => format!("<span class=\"errtext\">{}</span>", escape_html(e)),
                (Some(h), None) => format!("<code class=\"hash\">{}</code>", escape_html(h)),
                (None, None) => "<span class=\"dim\">directory</span>".into(),
            };
            let _ = writeln!(
                h,
                "<tr><td><a href=\"#{}\">{}</a></td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                anchor(&s.id),
                escape_html(&s.id),
                escape_html(&c.source),
                copy,
                hash
            );
        }
        h.push_str("</tbody>\n</table>\n");
    }
    h.push_str("</section>\n");

    // ---- Notes ------------------------------------------------------------------------------
    h.push_str("<section id=\"notes\">\n<h2>Notes</h2>\n");
    if m.notes.is_empty() {
        h.push_str("<p class=\"dim\">No notes were recorded.</p>\n");
    } else {
        h.push_str("<ul class=\"notes\">\n");
        for n in &m.notes {
            let _ = writeln!(
                h,
                "<li><span class=\"ts\">{}</span> {}</li>",
                escape_html(&fmt_clock(n.at)),
                escape_html(&clean_text(&n.message))
            );
        }
        h.push_str("</ul>\n");
    }
    h.push_str("</section>\n");

    // ---- Fields other parts of the engine may add (rendered only when present) --------------
    let value = serde_json::to_value(m).unwrap_or_default();
    for (key, id, heading) in [
        ("approvals", "approvals", "Approvals"),
        ("resumed", "resumed", "Resumptions"),
    ] {
        if let Some(serde_json::Value::Array(rows)) = value.get(key) {
            if !rows.is_empty() {
                let _ = writeln!(h, "<section id=\"{id}\">\n<h2>{heading}</h2>");
                render_json_rows(&mut h, rows);
                h.push_str("</section>\n");
            }
        }
    }
    // Placeholder for drill results (RTO/RPO…): the manifest has no `drill` field yet; when it
    // gets one, it is shown here as a generic table until a dedicated rendering exists.
    if let Some(drill) = value.get("drill").filter(|d| !d.is_null()) {
        h.push_str("<section id=\"drill\">\n<h2>Drill</h2>\n");
        match drill {
            serde_json::Value::Object(map) => {
                h.push_str("<table class=\"kv\">\n<tbody>\n");
                for (k, v) in map {
                    let _ = writeln!(
                        h,
                        "<tr><th>{}</th><td><code>{}</code></td></tr>",
                        escape_html(k),
                        escape_html(&clean_text(&json_inline(v)))
                    );
                }
                h.push_str("</tbody>\n</table>\n");
            }
            serde_json::Value::Array(rows) => render_json_rows(&mut h, rows),
            other => {
                let _ = writeln!(
                    h,
                    "<pre class=\"json\">{}</pre>",
                    escape_html(&other.to_string())
                );
            }
        }
        h.push_str("</section>\n");
    }

    // ---- Footer -----------------------------------------------------------------------------
    let bundle_name = bundle
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| bundle.display().to_string());
    let _ = writeln!(
        h,
        "</main>\n<footer>\n<h2>Verifying this evidence</h2>\n\
         <p>This page is a view of the evidence bundle <code>{}</code>; the bundle is the record. \
         Check that no file in it was changed since the run:</p>\n\
         <pre class=\"cmd\">cd {}\nsha256sum -c SHA256SUMS</pre>\n\
         <p>Every line must end in <code>OK</code>. <code>manifest.json</code> holds the data shown here; \
         <code>journal.jsonl</code> is the event-by-event record it was built from; \
         <code>steps/&lt;step&gt;/&lt;target&gt;/attempt-&lt;n&gt;.log</code> are the complete logs \
         (this page shows at most the last {} lines / {} MiB of each). The runbook as run is \
         <code>{}</code>, sha256 <code class=\"hash\">{}</code>.</p>\n\
         <p class=\"dim\">Generated by {} {} from evidence format {} · run {} · {}@{}</p>\n</footer>",
        escape_html(&bundle_name),
        escape_html(&shell_quote(&bundle_name)),
        MAX_LOG_LINES,
        MAX_LOG_BYTES / (1024 * 1024),
        escape_html(&m.runbook.copy),
        escape_html(&m.runbook.sha256),
        escape_html(&m.engine.name),
        escape_html(&m.engine.version),
        escape_html(&m.format),
        escape_html(&m.run_id),
        escape_html(&m.operator.user),
        escape_html(&m.operator.host),
    );
    let _ = writeln!(h, "<script>{JS}</script>\n</body>\n</html>");
    Ok(h)
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:@+=".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn first_line(s: &str) -> String {
    let s = s.trim();
    let mut lines = s.lines();
    let first = clean_text(lines.next().unwrap_or(""));
    let first: String = if first.chars().count() > 100 {
        first.chars().take(100).collect::<String>() + "…"
    } else {
        first
    };
    if lines.next().is_some() {
        format!("{first} …")
    } else {
        first
    }
}

fn param_source(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(map) => {
            let from = map.get("from").map(json_inline).unwrap_or_default();
            let rest: Vec<String> = map
                .iter()
                .filter(|(k, _)| *k != "from")
                .map(|(k, v)| format!("{k} {}", json_inline(v)))
                .collect();
            if rest.is_empty() {
                from
            } else {
                format!("{from} ({})", rest.join(", "))
            }
        }
        other => json_inline(other),
    }
}

/// The drill's objectives, measurements and verdict, first thing after the header.
fn render_drill(h: &mut String, d: &runbook_engine::event::DrillReport) {
    use runbook_engine::event::Verdict;
    let class = match d.verdict {
        Verdict::Pass => "succeeded",
        Verdict::Fail => "failed",
        Verdict::NotMeasured => "cancelled",
    };
    let _ = writeln!(
        h,
        "<section id=\"drill\">\n<h2>Drill <span class=\"badge b-{class}\">{}</span></h2>\n\
         <table class=\"drill\"><tr><th>Objective</th><th>Target</th><th>Measured</th><th>Verdict</th><th>Why</th></tr>",
        escape_html(&d.verdict.as_str().replace('_', " "))
    );
    for (name, o) in [("RTO (recovery time)", &d.rto), ("RPO (data age)", &d.rpo)] {
        let Some(o) = o else { continue };
        let _ = writeln!(
            h,
            "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape_html(&fmt_duration(o.target_seconds)),
            escape_html(&o.measured_seconds.map_or("—".to_owned(), fmt_duration)),
            escape_html(&o.verdict.as_str().replace('_', " ")),
            escape_html(o.why.as_deref().unwrap_or(""))
        );
    }
    h.push_str("</table>\n<p class=\"dim\">");
    if let Some(t) = d.clock_started_at {
        let _ = write!(h, "clock started {} ", escape_html(&fmt_time(t)));
    }
    if let Some(t) = d.clock_stopped_at {
        let _ = write!(h, "· stopped {} ", escape_html(&fmt_time(t)));
    }
    if let Some(t) = d.restored_data_time {
        let _ = write!(h, "· restored data from {}", escape_html(&fmt_time(t)));
    }
    h.push_str("</p>\n</section>\n");
}

fn verdict_line(m: &Manifest, failed: &[(usize, &StepRecord)]) -> String {
    let n = m.steps.len();
    let succeeded = m
        .steps
        .iter()
        .filter(|s| s.status == Some(StepStatus::Succeeded))
        .count();
    let skipped = m
        .steps
        .iter()
        .filter(|s| s.status == Some(StepStatus::Skipped))
        .count();
    if failed.is_empty() {
        let mut line = format!("{succeeded} of {n} steps succeeded");
        if skipped > 0 {
            let _ = write!(line, ", {skipped} skipped");
        }
        let not_run = n - succeeded - skipped;
        if not_run > 0 {
            let _ = write!(line, ", {not_run} not run");
        }
        return escape_html(&(line + "."));
    }
    let list: Vec<String> = failed
        .iter()
        .map(|(_, s)| {
            let reason = s
                .reason
                .as_deref()
                .map(|r| format!(" — {}", escape_html(&clean_text(r))))
                .unwrap_or_default();
            format!(
                "<a href=\"#{}\">{}</a>{}",
                anchor(&s.id),
                escape_html(&s.id),
                reason
            )
        })
        .collect();
    format!(
        "{} of {n} step{} did not succeed: {}",
        failed.len(),
        if n == 1 { "" } else { "s" },
        list.join("; ")
    )
}

/// Indices of the lines to show for a failure: the last `last` lines plus the last `errs`
/// stderr lines (a process's stderr is often read before its last stdout), in log order.
pub(crate) fn excerpt(lines: &[&LogLine], last: usize, errs: usize) -> Vec<usize> {
    let mut keep: Vec<usize> = (lines.len().saturating_sub(last)..lines.len()).collect();
    let err_idx: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].is_err()).collect();
    keep.extend(err_idx.iter().rev().take(errs));
    keep.sort_unstable();
    keep.dedup();
    keep
}

fn render_log_line(h: &mut String, l: &LogLine) {
    let class = if l.is_meta() {
        "m"
    } else if l.is_err() {
        "e"
    } else {
        "o"
    };
    let time = l.time.get(11..23).unwrap_or(&l.time);
    let tag = match l.tag.as_str() {
        "" => "",
        "---" => "···",
        t => t,
    };
    let _ = write!(
        h,
        "<span class=\"l {class}\"><span class=\"lt\">{}</span><span class=\"lg\">{}</span>{}\n</span>",
        escape_html(time),
        escape_html(tag),
        escape_html(&clean_text(&l.text))
    );
}

fn render_step_details(
    h: &mut String,
    s: &StepRecord,
    logs: &[Result<LogTail, String>],
    bundle: &Path,
) {
    let st = step_status_str(s);
    let open = matches!(st, "failed" | "cancelled" | "unfinished");
    let _ = writeln!(
        h,
        "<details id=\"{}\" class=\"step c-{}\"{}>\n<summary><span class=\"badge b-{}\">{}</span> \
         <b>{}</b>{}<span class=\"smeta\">{} attempt{} · {}</span></summary>\n<div class=\"sbody\">",
        anchor(&s.id),
        status_class(st),
        if open { " open" } else { "" },
        status_class(st),
        escape_html(st),
        escape_html(&s.id),
        s.phase
            .as_deref()
            .map(|p| format!(" <span class=\"phase\">{}</span>", escape_html(p)))
            .unwrap_or_default(),
        s.attempts.len(),
        if s.attempts.len() == 1 { "" } else { "s" },
        escape_html(&if s.attempts.is_empty() && s.started_at.is_none() {
            "did not run".to_owned()
        } else {
            fmt_duration(s.duration_seconds)
        })
    );
    if let Some(r) = &s.reason {
        let _ = writeln!(
            h,
            "<p class=\"reason\"><b>Reason:</b> {}</p>",
            escape_html(&clean_text(r))
        );
    }
    if !s.targets.is_empty() {
        h.push_str("<table class=\"hosts\"><tr><th>Host</th><th>Status</th><th>Attempts</th><th>Reason</th></tr>\n");
        for t in &s.targets {
            let st = t.status.as_str();
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td><span class=\"badge b-{}\">{}</span></td><td>{}</td><td>{}</td></tr>",
                escape_html(&t.target),
                status_class(st),
                escape_html(st),
                t.attempts,
                escape_html(&clean_text(t.reason.as_deref().unwrap_or("")))
            );
        }
        h.push_str("</table>\n");
    }
    for (ai, a) in s.attempts.iter().enumerate() {
        let class = attempt_class(a);
        let _ = writeln!(
            h,
            "<div class=\"attempt\">\n<div class=\"ahead\"><span class=\"dot d-{class}\"></span>\
             <b>Attempt {}</b> on <b>{}</b> · <span class=\"t-{class}\">{}</span>{} · {} · started {}{}</div>",
            a.attempt,
            escape_html(&a.target),
            escape_html(&clean_text(&attempt_outcome_text(a))),
            a.exit_code
                .filter(|_| !attempt_outcome_text(a).contains("exit code"))
                .map(|c| format!(" <span class=\"dim\">(exit code {c})</span>"))
                .unwrap_or_default(),
            a.duration_seconds
                .map(fmt_duration)
                .unwrap_or_else(|| "–".into()),
            escape_html(&fmt_clock(a.started_at)),
            a.retry_delay_seconds
                .map(|d| format!(" · retried after {}", escape_html(&fmt_duration(d))))
                .unwrap_or_default(),
        );
        let _ = writeln!(
            h,
            "<div class=\"cmdlabel\">Command <span class=\"dim\">in <code>{}</code></span></div>\
             <pre class=\"cmd\">{}</pre>",
            escape_html(&a.cwd),
            escape_html(&clean_text(a.command.trim_end()))
        );
        let _ = writeln!(
            h,
            "<div class=\"cmdlabel\">Log <a href=\"{}\"><code>{}</code></a> \
             <span class=\"dim\">· {} B stdout, {} B stderr</span></div>",
            href(&a.log),
            escape_html(&a.log),
            a.output.stdout,
            a.output.stderr
        );
        match logs.get(ai) {
            Some(Ok(tail)) => {
                if tail.truncated {
                    let _ = writeln!(
                        h,
                        "<p class=\"trunc\">The log is longer than shown ({} in all): only the last {} lines are \
                         included here. The complete log is <code>{}</code> in the bundle.</p>",
                        escape_html(&fmt_bytes(tail.total_bytes)),
                        tail.lines.len(),
                        escape_html(&a.log)
                    );
                }
                h.push_str("<pre class=\"log\">");
                // The log starts with the command (`--- $ …`), shown just above: leave it out.
                let mut skip = 0;
                if !tail.truncated
                    && tail
                        .lines
                        .first()
                        .is_some_and(|l| l.is_meta() && l.text.starts_with("$ "))
                {
                    let n = a.command.trim_end_matches('\n').split('\n').count();
                    skip = tail
                        .lines
                        .iter()
                        .take(n)
                        .take_while(|l| l.is_meta())
                        .count();
                }
                for l in &tail.lines[skip..] {
                    render_log_line(h, l);
                }
                h.push_str("</pre>\n");
            }
            Some(Err(note)) => {
                let _ = writeln!(h, "<p class=\"trunc\">{}</p>", escape_html(note));
            }
            None => {}
        }
        render_attempt_screenshot(h, bundle, a);
        h.push_str("</div>\n");
    }
    if let Some(outputs) = &s.outputs {
        let text = serde_json::to_string_pretty(outputs).unwrap_or_default();
        let _ = writeln!(
            h,
            "<div class=\"cmdlabel\">Step outputs</div><pre class=\"json\">{}</pre>",
            escape_html(&clean_text(&text))
        );
    }
    if !s.collected.is_empty() {
        h.push_str("<div class=\"cmdlabel\">Collected</div><ul class=\"plain\">\n");
        for c in &s.collected {
            let _ = writeln!(
                h,
                "<li><code>{}</code> {}</li>",
                escape_html(&c.source),
                match (&c.copy, &c.error) {
                    (_, Some(e)) => format!("<span class=\"errtext\">— {}</span>", escape_html(e)),
                    (Some(p), None) => format!(
                        "→ <a href=\"{}\"><code>{}</code></a>",
                        href(p),
                        escape_html(p)
                    ),
                    (None, None) => String::new(),
                }
            );
        }
        h.push_str("</ul>\n");
    }
    if s.attempts.is_empty() && s.reason.is_none() {
        h.push_str("<p class=\"dim\">No attempt was made.</p>\n");
    }
    h.push_str("</div>\n</details>\n");
}

/// Larger screenshots are linked, not embedded, so the report stays small enough to mail.
const MAX_EMBEDDED_SCREENSHOT: u64 = 4 << 20;

/// The screenshot an attempt took, if any: `attempt-<n>.png` beside the attempt's log with its
/// `attempt-<n>.png.json` sidecar (written by the screenshot step). The image is embedded as a
/// `data:` URI (the page loads nothing) and links to the file in the bundle; the sidecar's URL,
/// time and sha256 are shown, and a digest that does not match the file is flagged.
fn render_attempt_screenshot(h: &mut String, bundle: &Path, a: &AttemptRecord) {
    use base64::Engine as _;
    use sha2::Digest as _;

    let Some(rel) = a.log.strip_suffix(".log").map(|stem| format!("{stem}.png")) else {
        return;
    };
    // The manifest names the path: stay inside the bundle.
    if Path::new(&rel)
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return;
    }
    let png_path = bundle.join(&rel);
    let Ok(sidecar) = std::fs::read(bundle.join(format!("{rel}.json"))) else {
        return;
    };
    let Ok(info) = serde_json::from_slice::<serde_json::Value>(&sidecar) else {
        return;
    };
    let Ok(meta) = std::fs::metadata(&png_path) else {
        return;
    };
    let text = |k: &str| info[k].as_str().map(clean_text).unwrap_or_default();
    let recorded = text("sha256");
    let mut img = String::new();
    let mut digest_note = String::new();
    if meta.len() <= MAX_EMBEDDED_SCREENSHOT {
        if let Ok(png) = std::fs::read(&png_path) {
            let actual = hex::encode(sha2::Sha256::digest(&png));
            if !recorded.eq_ignore_ascii_case(&actual) {
                digest_note = format!(
                    " <span class=\"errtext\">— the file's sha256 is {actual}, not the recorded one</span>"
                );
            }
            img = format!(
                "<img alt=\"screenshot of {}\" src=\"data:image/png;base64,{}\" \
                 style=\"max-width:min(480px,100%);max-height:320px;border:1px solid #d0d7de;display:block\">",
                escape_html(&text("url")),
                base64::engine::general_purpose::STANDARD.encode(&png)
            );
        }
    }
    if img.is_empty() {
        img = format!(
            "<span class=\"dim\">{} — open the file</span>",
            escape_html(&fmt_bytes(meta.len()))
        );
    }
    let status = info["http_status"]
        .as_u64()
        .map(|s| format!(" · HTTP {s}"))
        .unwrap_or_default();
    let final_url = text("final_url");
    let redirected = if !final_url.is_empty() && final_url != text("url") {
        format!(" → <code>{}</code>", escape_html(&final_url))
    } else {
        String::new()
    };
    let _ = writeln!(
        h,
        "<div class=\"cmdlabel\">Screenshot <a href=\"{href}\"><code>{rel_html}</code></a> \
         <span class=\"dim\">· {w}×{hgt}{status}</span></div>\
         <div class=\"shot\"><a href=\"{href}\" title=\"open full size\">{img}</a>\
         <div class=\"small\"><code>{url}</code>{redirected}<br>taken {at} · sha256 <code>{sha}</code>{digest_note}</div></div>",
        href = href(&rel),
        rel_html = escape_html(&rel),
        w = info["width"].as_u64().unwrap_or(0),
        hgt = info["height"].as_u64().unwrap_or(0),
        url = escape_html(&text("url")),
        at = escape_html(&text("captured_at")),
        sha = escape_html(&recorded),
    );
}

#[cfg(test)]
mod screenshot_tests {
    use super::*;

    fn attempt(log: &str) -> AttemptRecord {
        serde_json::from_value(serde_json::json!({
            "attempt": 1, "target": "local", "command": "screenshot", "cwd": "/",
            "started_at": "2026-08-20T10:15:00Z", "output": {"stdout": 0, "stderr": 0},
            "log": log
        }))
        .expect("attempt")
    }

    #[test]
    fn screenshots_are_embedded_with_url_time_and_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let png = b"\x89PNG\r\n\x1a\nnot really an image".to_vec();
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&png));
        let shot = dir.path().join("steps/grafana/local/attempt-2.png");
        std::fs::create_dir_all(shot.parent().expect("parent")).expect("mkdir");
        std::fs::write(&shot, &png).expect("png");
        let sidecar = serde_json::json!({
            "url": "https://grafana/d/abc?kiosk&auth=<redacted>", "final_url": "https://grafana/d/abc?kiosk",
            "http_status": 200, "width": 1280, "height": 800, "captured_at": "2026-08-20T10:15:03.120Z",
            "sha256": sha
        });
        std::fs::write(
            dir.path().join("steps/grafana/local/attempt-2.png.json"),
            sidecar.to_string(),
        )
        .expect("sidecar");

        let mut h = String::new();
        render_attempt_screenshot(
            &mut h,
            dir.path(),
            &attempt("steps/grafana/local/attempt-2.log"),
        );
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        assert!(
            h.contains(&format!("src=\"data:image/png;base64,{b64}\"")),
            "{h}"
        );
        assert!(
            h.contains("<a href=\"steps/grafana/local/attempt-2.png\""),
            "{h}"
        );
        assert!(h.contains("auth=&lt;redacted&gt;"), "{h}");
        assert!(h.contains("2026-08-20T10:15:03.120Z"));
        assert!(h.contains(&sha));
        assert!(h.contains("1280×800 · HTTP 200"));
        assert!(!h.contains("not the recorded one"));

        // A file changed after the capture is flagged.
        std::fs::write(&shot, b"\x89PNG\r\n\x1a\nswapped").expect("png");
        let mut h = String::new();
        render_attempt_screenshot(
            &mut h,
            dir.path(),
            &attempt("steps/grafana/local/attempt-2.log"),
        );
        assert!(h.contains("not the recorded one"), "{h}");

        // No screenshot, or a path leaving the bundle: nothing.
        for log in [
            "steps/other/local/attempt-1.log",
            "../grafana/local/attempt-2.log",
        ] {
            let mut h = String::new();
            render_attempt_screenshot(&mut h, dir.path(), &attempt(log));
            assert!(h.is_empty(), "{log}: {h}");
        }
    }

    #[test]
    fn the_report_shows_an_attempts_screenshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = super::test_support::failed_run(dir.path());
        let png = b"\x89PNG\r\n\x1a\nfetch";
        std::fs::write(dir.path().join("steps/fetch/local/attempt-1.png"), png).expect("png");
        std::fs::write(
            dir.path().join("steps/fetch/local/attempt-1.png.json"),
            r#"{"url":"http://status/","captured_at":"2026-08-20T10:15:01Z","sha256":"00"}"#,
        )
        .expect("sidecar");
        let html = render_report(&m, dir.path()).expect("render");
        assert!(html.contains("data:image/png;base64,"));
        assert!(html.contains("<a href=\"steps/fetch/local/attempt-1.png\""));
    }
}

fn fmt_bytes(n: u64) -> String {
    if n >= 1024 * 1024 {
        format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
    } else if n >= 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn render_json_rows(h: &mut String, rows: &[serde_json::Value]) {
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        if let serde_json::Value::Object(map) = r {
            for k in map.keys() {
                if !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
    }
    h.push_str("<table class=\"kv\">\n<thead><tr>");
    for c in &cols {
        let _ = write!(h, "<th>{}</th>", escape_html(c));
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for r in rows {
        h.push_str("<tr>");
        for c in &cols {
            let v = r.get(c).map(json_inline).unwrap_or_default();
            let _ = write!(h, "<td>{}</td>", escape_html(&clean_text(&v)));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n");
}

/// A 1–2–5 step giving about `target` ticks over `total` seconds.
fn tick_step(total: f64, target: f64) -> f64 {
    let raw = (total / target).max(1e-3);
    let mag = 10f64.powf(raw.log10().floor());
    let nice = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|f| f * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    // Whole seconds → minute-friendly steps.
    match nice {
        s if s > 30.0 && s <= 60.0 => 60.0,
        s if s > 60.0 && s <= 120.0 => 120.0,
        s if s > 120.0 && s <= 300.0 => 300.0,
        s if s > 300.0 && s <= 600.0 => 600.0,
        s => s,
    }
}

fn fmt_offset(secs: f64) -> String {
    if secs == 0.0 {
        return "0".into();
    }
    if secs < 1.0 {
        return format!("+{} ms", (secs * 1000.0).round());
    }
    if secs < 60.0 {
        let s = format!("{secs:.1}");
        return format!("+{} s", s.trim_end_matches(".0"));
    }
    let total = secs.round() as u64;
    if total >= 3600 {
        format!("+{}h{:02}m", total / 3600, (total % 3600) / 60)
    } else if total % 60 == 0 {
        format!("+{} min", total / 60)
    } else {
        format!("+{}m{:02}s", total / 60, total % 60)
    }
}

fn render_timeline(h: &mut String, m: &Manifest, end: DateTime<Utc>) {
    let total = secs_between(m.started_at, end).max(1e-3);
    let pct = |t: DateTime<Utc>| (secs_between(m.started_at, t) / total * 100.0).clamp(0.0, 100.0);
    let step = tick_step(total, 6.0);
    let mut ticks = Vec::new();
    let mut t = 0.0;
    while t <= total * 1.0001 {
        ticks.push(t);
        t += step;
    }
    let _ = write!(
        h,
        "<section id=\"timeline\">\n<h2>Timeline <span class=\"dim small\">from {} · total {}</span></h2>\n\
         <div class=\"gantt\">\n<div class=\"glabel gaxis-label\"></div><div class=\"gtrack gaxis\">",
        escape_html(&fmt_time(m.started_at)),
        escape_html(&fmt_duration(total))
    );
    for t in &ticks {
        let p = t / total * 100.0;
        let _ = write!(
            h,
            "<span class=\"tick{}\" style=\"left:{p:.3}%\">{}</span>",
            if p > 92.0 { " tick-end" } else { "" },
            escape_html(&fmt_offset(*t))
        );
    }
    h.push_str("</div>\n");
    for s in &m.steps {
        let st = step_status_str(s);
        let targets = attempts_by_target(s);
        // One row per target when a step ran on several (they overlap in time).
        let rows: Vec<(Option<String>, Vec<&AttemptRecord>)> = if targets.len() > 1 {
            targets.into_iter().map(|(t, a)| (Some(t), a)).collect()
        } else {
            vec![(None, s.attempts.iter().collect())]
        };
        for (target, attempts) in rows {
            let _ = write!(
                h,
                "<div class=\"glabel\"><a href=\"#{}\">{}</a>{}</div><div class=\"gtrack\">",
                anchor(&s.id),
                escape_html(&s.id),
                match (&target, &s.phase) {
                    (Some(t), _) => format!("<span class=\"gphase\">@{}</span>", escape_html(t)),
                    (None, Some(p)) => format!("<span class=\"gphase\">{}</span>", escape_html(p)),
                    (None, None) => String::new(),
                }
            );
            for t in &ticks {
                let _ = write!(
                    h,
                    "<i class=\"grid\" style=\"left:{:.3}%\"></i>",
                    t / total * 100.0
                );
            }
            if attempts.is_empty() {
                let _ = write!(
                    h,
                    "<span class=\"gnote\">{}{}</span>",
                    escape_html(st),
                    s.reason
                        .as_deref()
                        .map(|r| format!(" — {}", escape_html(&clean_text(r))))
                        .unwrap_or_default()
                );
            }
            for a in &attempts {
                let start = pct(a.started_at);
                let stop = pct(a.finished_at.unwrap_or(end));
                let tip = format!(
                    "{} · attempt {} on {} · {} · {} · started {}",
                    s.id,
                    a.attempt,
                    a.target,
                    attempt_outcome_text(a),
                    a.duration_seconds
                        .map(fmt_duration)
                        .unwrap_or_else(|| "–".into()),
                    fmt_clock(a.started_at)
                );
                let _ = write!(
                    h,
                    "<span class=\"bar g-{}\" style=\"left:{start:.3}%;width:{:.3}%\" title=\"{}\">{}</span>",
                    attempt_class(a),
                    (stop - start).max(0.0),
                    escape_html(&clean_text(&tip)),
                    if attempts.len() > 1 && stop - start > 4.0 {
                        format!("{}", a.attempt)
                    } else {
                        String::new()
                    }
                );
            }
            if let Some(last) = attempts.last() {
                // Per target: how its last attempt ended; per step: the step's status.
                let (state, class, secs) = match &target {
                    Some(_) => (
                        attempt_outcome_text(last),
                        attempt_class(last),
                        attempts.iter().filter_map(|a| a.duration_seconds).sum(),
                    ),
                    None => (st.to_owned(), status_class(st), s.duration_seconds),
                };
                let label = if class == "ok" && attempts.len() == 1 {
                    fmt_duration(secs)
                } else {
                    format!(
                        "{} · {} attempt{} · {}",
                        state,
                        attempts.len(),
                        if attempts.len() == 1 { "" } else { "s" },
                        fmt_duration(secs)
                    )
                };
                let bars: Vec<(f64, f64)> = attempts
                    .iter()
                    .map(|a| (pct(a.started_at), pct(a.finished_at.unwrap_or(end))))
                    .collect();
                let style = label_position(&bars, label.chars().count());
                let _ = write!(
                    h,
                    "<span class=\"glab t-{class}\" style=\"{style}\">{}</span>",
                    escape_html(&clean_text(&label))
                );
            }
            h.push_str("</div>\n");
        }
    }
    h.push_str(
        "</div>\n<div class=\"legend\"><span><i class=\"g-ok\"></i>succeeded</span>\
         <span><i class=\"g-fail\"></i>failed</span><span><i class=\"g-warn\"></i>timed out / unfinished</span>\
         <span><i class=\"g-cancel\"></i>cancelled</span><span class=\"dim\">one bar per attempt; gaps between bars are retry delays</span></div>\n</section>\n",
    );
}

/// Where a bar label goes: in the widest free stretch of the track (after the last bar, in a
/// retry gap, or before the first bar), as a CSS `left`/`right`.
fn label_position(bars: &[(f64, f64)], chars: usize) -> String {
    // About 0.75 % of the track per character at the usual width.
    let need = chars as f64 * 0.75 + 1.5;
    let first = bars.iter().map(|b| b.0).fold(100.0, f64::min);
    let last = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    let after = 100.0 - last;
    if after >= need {
        return format!("left:calc({last:.3}% + 6px)");
    }
    let mut gap = (0.0, 0.0);
    let mut sorted = bars.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut reach = sorted.first().map_or(0.0, |b| b.1);
    for b in sorted.iter().skip(1) {
        if b.0 - reach > gap.1 - gap.0 {
            gap = (reach, b.0);
        }
        reach = reach.max(b.1);
    }
    if gap.1 - gap.0 >= need && gap.1 - gap.0 >= first {
        return format!("left:calc({:.3}% + 6px)", gap.0);
    }
    if first >= need {
        return format!("right:calc({:.3}% + 6px)", 100.0 - first);
    }
    // No room: after the last bar, running into the margin.
    format!("left:calc({last:.3}% + 6px)")
}

const JS: &str = r##"
function setAll(open){document.querySelectorAll('details').forEach(function(d){d.open=open;});}
var rbOpen=null;
window.addEventListener('beforeprint',function(){rbOpen=[];document.querySelectorAll('details').forEach(function(d){rbOpen.push(d.open);d.open=true;});});
window.addEventListener('afterprint',function(){if(!rbOpen)return;document.querySelectorAll('details').forEach(function(d,i){d.open=rbOpen[i];});rbOpen=null;});
if(location.hash){var t=document.getElementById(location.hash.slice(1));if(t&&t.tagName==='DETAILS'){t.open=true;}}
document.querySelectorAll('a[href^="#step-"]').forEach(function(a){a.addEventListener('click',function(){var t=document.getElementById(a.getAttribute('href').slice(1));if(t&&t.tagName==='DETAILS'){t.open=true;}});});
"##;

const CSS: &str = r##"
:root{--ok:#1a7f37;--ok-bg:#dafbe1;--fail:#cf222e;--fail-bg:#ffebe9;--warn:#bc4c00;--warn-bg:#fff1e5;
--cancel:#7d4e00;--cancel-bg:#fff8c5;--skip:#57606a;--skip-bg:#eaeef2;--info:#0969da;--info-bg:#ddf4ff;
--fg:#1f2328;--dim:#656d76;--line:#d0d7de;--soft:#f6f8fa;}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI","Noto Sans",Helvetica,Arial,sans-serif;color:var(--fg);background:#fff}
code,pre,.mono{font-family:ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,"DejaVu Sans Mono","Liberation Mono",monospace;font-size:12.5px}
a{color:var(--info);text-decoration:none}a:hover{text-decoration:underline}
.dim{color:var(--dim)}.small{font-size:12px;font-weight:400}
main,footer{max-width:1200px;margin:0 auto;padding:0 28px}
h2{font-size:18px;margin:28px 0 10px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h2 .dim{margin-left:8px}
.verdict{display:flex;align-items:center;gap:24px;padding:22px 28px;border-bottom:4px solid;margin-bottom:6px}
.verdict .vtext{min-width:0}
.verdict h1{margin:0 0 2px;font-size:24px;line-height:1.25}
.vsub{color:var(--dim)}
.vline{margin-top:6px;font-size:15px}
.badge-big{flex:none;font-size:30px;font-weight:800;letter-spacing:.06em;color:#fff;padding:12px 24px;border-radius:10px;min-width:220px;text-align:center}
.v-ok{background:var(--ok-bg);border-color:var(--ok)}.v-ok .badge-big{background:var(--ok)}
.v-fail{background:var(--fail-bg);border-color:var(--fail)}.v-fail .badge-big{background:var(--fail)}
.v-warn{background:var(--warn-bg);border-color:var(--warn)}.v-warn .badge-big{background:var(--warn)}
.v-cancel{background:var(--cancel-bg);border-color:var(--cancel)}.v-cancel .badge-big{background:var(--cancel)}
.v-skip,.v-info{background:var(--info-bg);border-color:var(--info)}.v-skip .badge-big,.v-info .badge-big{background:var(--info)}
.v-fail .vline a{color:var(--fail);font-weight:600}
.badge{display:inline-block;font-size:12px;font-weight:600;padding:1px 8px;border-radius:10px;border:1px solid;white-space:nowrap}
.b-ok{color:var(--ok);background:var(--ok-bg);border-color:#aceebb}
.b-fail{color:var(--fail);background:var(--fail-bg);border-color:#ffcecb}
.b-warn{color:var(--warn);background:var(--warn-bg);border-color:#ffd8b5}
.b-cancel{color:var(--cancel);background:var(--cancel-bg);border-color:#f5e0a0}
.b-skip{color:var(--skip);background:var(--skip-bg);border-color:var(--line)}
.b-info{color:var(--info);background:var(--info-bg);border-color:#b6e3ff}
.t-ok{color:var(--ok)}.t-fail{color:var(--fail);font-weight:600}.t-warn{color:var(--warn);font-weight:600}.t-cancel{color:var(--cancel)}.t-skip{color:var(--skip)}.t-info{color:var(--info)}
#failures h2{color:var(--fail);border-color:#ffcecb}
.fcard{border:1px solid #ffcecb;border-left:5px solid var(--fail);border-radius:6px;padding:10px 14px;margin:10px 0;background:#fff}
.fcard.c-cancel{border-color:#f5e0a0;border-left-color:var(--cancel)}.fcard.c-warn{border-color:#ffd8b5;border-left-color:var(--warn)}
.fhead{display:flex;align-items:center;gap:8px;flex-wrap:wrap}
.fstep{font-size:16px;font-weight:700;color:var(--fg)}
.fmeta{margin-left:auto;color:var(--dim)}
.freason{font-size:15px;font-weight:600;margin:4px 0}
.fcmd{color:var(--fg);margin:2px 0 6px}.fcmd code{background:var(--soft);padding:1px 5px;border-radius:4px}
.excerpt-title{color:var(--dim);font-size:12px;margin-top:6px}
.errkey{color:var(--fail);font-weight:600}
.phase{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:var(--dim);border:1px solid var(--line);border-radius:4px;padding:0 5px;vertical-align:1px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:5px 18px;margin:0}
dl.facts dt{color:var(--dim);font-weight:600}dl.facts dd{margin:0;min-width:0;overflow-wrap:anywhere}
.hash{font-size:11.5px;overflow-wrap:anywhere}
.ref{display:inline-block;background:var(--soft);border:1px solid var(--line);border-radius:4px;padding:0 6px;margin-right:4px}
.counts{display:flex;gap:8px;flex-wrap:wrap;margin-top:14px}
.count{border:1px solid var(--line);border-radius:6px;padding:3px 10px}
.gantt{display:grid;grid-template-columns:minmax(140px,220px) 1fr;border:1px solid var(--line);border-radius:6px;overflow:hidden}
.glabel{padding:4px 10px;border-top:1px solid #eaeef2;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;background:var(--soft);font-weight:600}
.glabel a{color:var(--fg)}
.gphase{font-weight:400;color:var(--dim);font-size:11px;margin-left:6px}
.gtrack{position:relative;border-top:1px solid #eaeef2;min-height:30px;margin-right:56px}
.gaxis,.gaxis-label{border-top:none;min-height:24px;background:#fff}
.gaxis-label{background:var(--soft)}
.tick{position:absolute;top:4px;font-size:11px;color:var(--dim);transform:translateX(-50%);white-space:nowrap}
.tick:first-child{transform:none}.tick-end{transform:translateX(-100%)}
.grid{position:absolute;top:0;bottom:0;width:0;border-left:1px dashed #e4e8ec}
.bar{position:absolute;top:7px;height:16px;min-width:3px;border-radius:3px;color:#fff;font-size:10px;line-height:16px;text-align:center;overflow:hidden}
.g-ok{background:#2da44e}.g-fail{background:var(--fail)}.g-warn{background:#e16f24}.g-cancel{background:#bf8700}.g-skip,.g-info{background:#8c959f}
.glab{position:absolute;top:6px;font-size:11.5px;white-space:nowrap;color:var(--dim)}
.glab.t-fail{color:var(--fail)}
.gnote{position:absolute;left:8px;top:5px;font-size:12px;color:var(--dim);font-style:italic;white-space:nowrap}
.legend{display:flex;gap:16px;flex-wrap:wrap;margin-top:6px;font-size:12px;color:var(--dim)}
.legend i{display:inline-block;width:12px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #eaeef2;vertical-align:top}
thead th{background:var(--soft);border-bottom:1px solid var(--line);font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--dim)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.r-fail td{background:#fff8f7}tr.r-fail td:first-child{box-shadow:inset 4px 0 0 var(--fail)}
tr.r-cancel td:first-child{box-shadow:inset 4px 0 0 var(--cancel)}
table.kv code.val{overflow-wrap:anywhere}
details.step{border:1px solid var(--line);border-radius:6px;margin:8px 0;background:#fff}
details.step.c-fail{border-color:#ffcecb;border-left:5px solid var(--fail)}
details.step.c-ok{border-left:5px solid #2da44e}
details.step.c-skip{border-left:5px solid #8c959f}
details.step.c-cancel{border-left:5px solid var(--cancel)}
details.step.c-warn{border-left:5px solid var(--warn)}
summary{cursor:pointer;padding:8px 12px;display:flex;align-items:center;gap:8px;list-style:none}
summary::-webkit-details-marker{display:none}
summary::before{content:"\25B8";color:var(--dim);width:10px}
details[open]>summary::before{content:"\25BE"}
.smeta{margin-left:auto;color:var(--dim);font-size:12.5px}
.sbody{padding:0 14px 12px}
.reason{margin:4px 0 8px}
.attempt{border-top:1px solid #eaeef2;padding-top:8px;margin-top:8px}
.ahead{margin-bottom:4px}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:7px}
.d-ok{background:#2da44e}.d-fail{background:var(--fail)}.d-warn{background:#e16f24}.d-cancel{background:#bf8700}
.cmdlabel{font-size:12px;color:var(--dim);margin:6px 0 2px;font-weight:600}
.cmdlabel code{font-weight:400}
pre{margin:0;padding:8px 10px;border-radius:6px;white-space:pre-wrap;overflow-wrap:anywhere}
pre.cmd,pre.json{background:var(--soft);border:1px solid #eaeef2}
pre.log{background:#fbfbfc;border:1px solid #eaeef2;max-height:520px;overflow:auto;padding:6px 0;line-height:1.45}
pre.excerpt{max-height:none}
.l{display:block;padding:0 10px 0 0}
.lt{color:#8c959f;padding:0 10px 0 12px;user-select:none}
.lg{display:inline-block;width:3.2em;color:#8c959f;user-select:none;font-size:11px}
.l.gap{color:#8c959f}
.l.e{background:#fff0ef;color:#a40e26;box-shadow:inset 3px 0 0 var(--fail)}
.l.e .lg{color:var(--fail);font-weight:700}
.l.m{color:var(--dim);font-style:italic}
.trunc{background:var(--cancel-bg);border:1px solid #f5e0a0;padding:4px 10px;border-radius:6px;margin:4px 0;font-size:12.5px}
.errtext{color:var(--fail)}
ul.notes,ul.plain{margin:0;padding-left:18px}
.ts{color:var(--dim);font-family:ui-monospace,monospace;font-size:12px;margin-right:6px}
.tools{float:right}
.tools button{font:inherit;font-size:12px;padding:2px 10px;margin-left:6px;border:1px solid var(--line);border-radius:6px;background:var(--soft);cursor:pointer}
footer{margin-top:32px;padding-bottom:40px;color:var(--fg)}
footer h2{font-size:16px}
footer pre.cmd{display:inline-block;min-width:380px}
@media print{
  @page{size:A4;margin:14mm 12mm}
  *{-webkit-print-color-adjust:exact;print-color-adjust:exact}
  body{font-size:11px;background:#fff}
  main,footer{max-width:none;padding:0}
  .verdict{padding:12px 14px;border-width:2px;border-style:solid;border-radius:6px;margin-bottom:10px}
  .badge-big{font-size:22px;min-width:160px;padding:8px 14px}
  .no-print{display:none!important}
  a{color:inherit}
  h2{break-after:avoid;margin-top:18px}
  .fcard,tr,.gantt,pre.cmd,summary{break-inside:avoid}
  .ahead,.cmdlabel,summary{break-after:avoid}
  details>summary::before{content:none}
  details::details-content{content-visibility:visible;display:block}
  details:not([open])>*:not(summary){display:block}
  pre.log{max-height:none;overflow:visible;background:#fff}
  .l.e{background:#fff0ef}
  code,pre{font-size:9.5px}
}
"##;

#[cfg(test)]
pub(crate) mod test_support {
    //! Manifests for tests, built from JSON the way `manifest.json` is written.

    use std::path::Path;

    use crate::manifest::Manifest;

    /// A failed run: `fetch` succeeded, `restore` failed twice (exit 3, stderr), `verify` was
    /// skipped, `notify` was cancelled, `cleanup` ran on two targets. Logs are written into
    /// `bundle`.
    pub fn failed_run(bundle: &Path) -> Manifest {
        let logs: &[(&str, &str)] = &[
            (
                "steps/fetch/local/attempt-1.log",
                "2026-08-20T10:15:00.100Z --- $ curl -fsS https://backup/latest\n\
                 2026-08-20T10:15:00.300Z out fetched snapshot-2026-08-20 <42 MB> & verified\n\
                 2026-08-20T10:15:02.000Z --- attempt 1: succeeded\n",
            ),
            (
                "steps/restore/local/attempt-1.log",
                "2026-08-20T10:15:02.100Z --- $ restore --from snapshot\n\
                 2026-08-20T10:15:03.000Z out restoring\n\
                 2026-08-20T10:15:04.000Z err boom\n\
                 2026-08-20T10:15:04.000Z --- attempt 1: exit code 3\n",
            ),
            (
                "steps/cleanup/host-a/attempt-1.log",
                "2026-08-20T10:15:08.000Z --- $ rm -rf /tmp/x\n\
                 2026-08-20T10:15:08.500Z --- attempt 1: succeeded\n",
            ),
            (
                "steps/cleanup/host-b/attempt-1.log",
                "2026-08-20T10:15:08.000Z --- $ rm -rf /tmp/x\n\
                 2026-08-20T10:15:08.400Z err rm: cannot remove '/tmp/x': Permission denied\n\
                 2026-08-20T10:15:08.600Z --- attempt 1: exit code 1\n",
            ),
        ];
        for (rel, text) in logs {
            let p = bundle.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, text).expect("write log");
        }
        // attempt 2 of restore: many lines, invalid UTF-8, control characters, ANSI colours.
        let mut log2 = Vec::new();
        log2.extend_from_slice(b"2026-08-20T10:15:05.000Z --- $ restore --from snapshot\n");
        for i in 1..=70 {
            log2.extend_from_slice(
                format!("2026-08-20T10:15:05.{i:03}Z out progress line {i}\n").as_bytes(),
            );
        }
        log2.extend_from_slice(
            b"2026-08-20T10:15:06.000Z out caf\xc3\xa9 \xff\xfe \x01\x07bell \x1b[32mgreen\x1b[0m ]]> </pre>\n",
        );
        log2.extend_from_slice(
            b"2026-08-20T10:15:06.500Z err ERROR: relation \"orders\" does not exist\n",
        );
        log2.extend_from_slice(b"2026-08-20T10:15:06.500Z --- attempt 2: exit code 3\n");
        let p = bundle.join("steps/restore/local/attempt-2.log");
        std::fs::write(&p, log2).expect("write log");

        let v: serde_json::Value = serde_json::from_str(r##"{
          "format": "runbook-evidence/1",
          "run_id": "7f3a9c",
          "status": "failed",
          "started_at": "2026-08-20T10:15:00Z",
          "finished_at": "2026-08-20T10:15:10.250Z",
          "duration_seconds": 10.25,
          "runbook": {
            "name": "db-restore",
            "title": "DB restore drill <prod> & \"friends\"",
            "refs": ["SOC2 A1.3", "https://wiki.example/dr"],
            "path": "runbooks/db-restore.toml",
            "sha256": "abababababababababababababababababababababababababababababababab",
            "copy": "runbook/db-restore.toml"
          },
          "params": {"cluster": "prod-a", "token": "[REDACTED:token]", "replicas": 3},
          "param_sources": {"cluster": {"from": "cli"}, "token": {"from": "env", "var": "TOKEN"},
                            "replicas": {"from": "default"}},
          "operator": {"user": "alice", "uid": 1000, "host": "jump-1"},
          "engine": {"name": "runbook", "version": "0.1.0"},
          "workdir": "/srv/runbooks",
          "command_line": ["runbook", "run", "runbooks/db-restore.toml"],
          "summary": {"succeeded": 1, "failed": 2, "skipped": 1, "cancelled": 1},
          "steps": [
            {"id": "fetch", "phase": "backup", "status": "succeeded",
             "started_at": "2026-08-20T10:15:00.100Z", "finished_at": "2026-08-20T10:15:02Z",
             "duration_seconds": 1.9,
             "attempts": [{"attempt": 1, "target": "local", "command": "curl -fsS https://backup/latest",
                "cwd": "/srv", "started_at": "2026-08-20T10:15:00.100Z",
                "finished_at": "2026-08-20T10:15:02Z", "duration_seconds": 1.9, "exit_code": 0,
                "outcome": {"kind": "exited", "code": 0}, "output": {"stdout": 40, "stderr": 0},
                "log": "steps/fetch/local/attempt-1.log"}],
             "collected": [{"name": "snap.meta", "source": "/srv/snap.meta",
                            "copy": "collected/fetch/snap.meta", "sha256": "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"},
                           {"name": "gone.txt", "source": "/srv/gone.txt",
                            "error": "No such file or directory (os error 2)"}],
             "outputs": {"snapshot": "snapshot-2026-08-20"}},
            {"id": "restore", "phase": "restore", "status": "failed",
             "reason": "exit code 3 (after 2 attempts)",
             "started_at": "2026-08-20T10:15:02.100Z", "finished_at": "2026-08-20T10:15:06.500Z",
             "duration_seconds": 4.4,
             "attempts": [
               {"attempt": 1, "target": "local", "command": "restore --from snapshot", "cwd": "/srv",
                "started_at": "2026-08-20T10:15:02.100Z", "finished_at": "2026-08-20T10:15:04Z",
                "duration_seconds": 1.9, "exit_code": 3, "outcome": {"kind": "exited", "code": 3},
                "error": "exit code 3", "output": {"stdout": 10, "stderr": 5},
                "retry_delay_seconds": 1.0, "log": "steps/restore/local/attempt-1.log"},
               {"attempt": 2, "target": "local", "command": "restore --from snapshot", "cwd": "/srv",
                "started_at": "2026-08-20T10:15:05Z", "finished_at": "2026-08-20T10:15:06.500Z",
                "duration_seconds": 1.5, "exit_code": 3, "outcome": {"kind": "exited", "code": 3},
                "error": "exit code 3", "output": {"stdout": 1500, "stderr": 45},
                "log": "steps/restore/local/attempt-2.log"}],
             "collected": []},
            {"id": "verify", "phase": "verify", "status": "skipped",
             "reason": "needs `restore`, which failed", "duration_seconds": 0.0,
             "attempts": [], "collected": []},
            {"id": "notify", "status": "cancelled", "reason": "run cancelled (SIGINT)",
             "duration_seconds": 0.0, "attempts": [], "collected": []},
            {"id": "cleanup", "phase": "cleanup", "status": "failed", "reason": "exit code 1 on host-b",
             "started_at": "2026-08-20T10:15:08Z", "finished_at": "2026-08-20T10:15:08.600Z",
             "duration_seconds": 0.6,
             "attempts": [
               {"attempt": 1, "target": "host-a", "command": "rm -rf /tmp/x", "cwd": "/",
                "started_at": "2026-08-20T10:15:08Z", "finished_at": "2026-08-20T10:15:08.500Z",
                "duration_seconds": 0.5, "exit_code": 0, "outcome": {"kind": "exited", "code": 0},
                "output": {"stdout": 0, "stderr": 0}, "log": "steps/cleanup/host-a/attempt-1.log"},
               {"attempt": 1, "target": "host-b", "command": "rm -rf /tmp/x", "cwd": "/",
                "started_at": "2026-08-20T10:15:08Z", "finished_at": "2026-08-20T10:15:08.600Z",
                "duration_seconds": 0.6, "exit_code": 1, "outcome": {"kind": "exited", "code": 1},
                "error": "exit code 1", "output": {"stdout": 0, "stderr": 40},
                "log": "steps/cleanup/host-b/attempt-1.log"}],
             "collected": []}
          ],
          "notes": [{"at": "2026-08-20T10:15:06.600Z",
                     "message": "step restore failed (exit code 3); logs under steps/restore/"}],
          "secrets": ["token"]
        }"##)
        .expect("json");
        serde_json::from_value(v).expect("manifest from json")
    }

    /// A small succeeded run with one step.
    pub fn succeeded_run(bundle: &Path) -> Manifest {
        let rel = "steps/only/local/attempt-1.log";
        let p = bundle.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(
            &p,
            "2026-08-20T10:00:00.000Z --- $ echo ok\n2026-08-20T10:00:00.010Z out ok\n\
             2026-08-20T10:00:00.020Z --- attempt 1: succeeded\n",
        )
        .expect("write");
        let v = serde_json::json!({
          "format": "runbook-evidence/1", "run_id": "0001", "status": "succeeded",
          "started_at": "2026-08-20T10:00:00Z", "finished_at": "2026-08-20T10:00:00.500Z",
          "duration_seconds": 0.5,
          "runbook": {"name": "ok-book", "refs": [], "path": "ok.toml", "sha256": "00", "copy": "runbook/ok.toml"},
          "params": {}, "param_sources": {},
          "operator": {"user": "bob", "uid": 1001, "host": "ci"},
          "engine": {"name": "runbook", "version": "0.1.0"},
          "workdir": "/w", "command_line": ["runbook", "run", "ok.toml"],
          "summary": {"succeeded": 1},
          "steps": [{"id": "only", "status": "succeeded", "started_at": "2026-08-20T10:00:00Z",
             "finished_at": "2026-08-20T10:00:00.020Z", "duration_seconds": 0.02,
             "attempts": [{"attempt": 1, "target": "local", "command": "echo ok", "cwd": "/w",
               "started_at": "2026-08-20T10:00:00Z", "finished_at": "2026-08-20T10:00:00.020Z",
               "duration_seconds": 0.02, "exit_code": 0, "outcome": {"kind": "exited", "code": 0},
               "output": {"stdout": 3, "stderr": 0}, "log": rel}],
             "collected": []}],
          "notes": [], "secrets": []
        });
        serde_json::from_value(v).expect("manifest from json")
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn report_shows_verdict_failures_and_logs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = failed_run(dir.path());
        let html = render_report(&m, dir.path()).expect("render");
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<header class=\"verdict v-fail\">"));
        assert!(html.contains("<div class=\"badge-big\">FAILED</div>"));
        // Title escaped.
        assert!(html.contains("DB restore drill &lt;prod&gt; &amp; &quot;friends&quot;"));
        assert!(!html.contains("<prod>"));
        // What failed: the failed and cancelled steps, with reasons, linked to their details.
        let failures = &html[html.find("id=\"failures\"").expect("failures")..];
        let failures = &failures[..failures.find("</section>").expect("end")];
        assert!(failures.contains("href=\"#step-restore\""));
        assert!(failures.contains("exit code 3 (after 2 attempts)"));
        assert!(failures.contains("href=\"#step-notify\""));
        assert!(failures.contains("relation &quot;orders&quot; does not exist"));
        assert!(!failures.contains("href=\"#step-fetch\""));
        // Details: failed steps open, logs escaped, stderr marked, control chars made visible.
        assert!(html.contains("<details id=\"step-restore\" class=\"step c-fail\" open>"));
        assert!(html.contains("<details id=\"step-fetch\" class=\"step c-ok\">"));
        assert!(html.contains("&lt;42 MB&gt; &amp; verified"));
        assert!(html.contains("<span class=\"l e\">"));
        assert!(html.contains("café \u{fffd}\u{fffd} ^A^Gbell green ]]&gt; &lt;/pre&gt;"));
        assert!(!html.contains('\x1b'));
        // Timeline bars: restore's first attempt starts at 2.1 s of 10.25 s.
        assert!(html.contains("left:20.488%"));
        // Params (already redacted), collected files, notes, footer.
        assert!(html.contains("[REDACTED:token]"));
        assert!(html.contains(&"cd".repeat(32)));
        assert!(html.contains("No such file or directory"));
        assert!(html.contains("logs under steps/restore/"));
        assert!(html.contains("sha256sum -c SHA256SUMS"));
        assert!(html.contains("@media print"));
        // Nothing is fetched: no external URLs other than the ref link, a CSP forbids loading.
        assert!(html.contains("default-src 'none'"));
        for bad in [
            "src=\"http",
            "url(http",
            "@import",
            "<link rel=\"stylesheet\"",
        ] {
            assert!(!html.contains(bad), "{bad}");
        }
        assert!(!html.contains("id=\"drill\""));
    }

    #[test]
    fn report_for_a_succeeded_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = succeeded_run(dir.path());
        let html = render_report(&m, dir.path()).expect("render");
        assert!(html.contains("<div class=\"badge-big\">SUCCEEDED</div>"));
        assert!(html.contains("1 of 1 steps succeeded."));
        assert!(!html.contains("id=\"failures\""));
        assert!(html.contains("No files were collected."));
    }

    #[test]
    fn missing_logs_are_noted_not_fatal_and_long_logs_are_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = succeeded_run(dir.path());
        m.steps[0].attempts[0].log = "steps/only/local/missing.log".into();
        let html = render_report(&m, dir.path()).expect("render");
        assert!(html.contains("The log file steps/only/local/missing.log is not in the bundle."));

        let m = succeeded_run(dir.path());
        let mut big = String::new();
        for i in 0..3000 {
            big.push_str(&format!("2026-08-20T10:00:00.000Z out line {i}\n"));
        }
        std::fs::write(dir.path().join("steps/only/local/attempt-1.log"), big).expect("w");
        let html = render_report(&m, dir.path()).expect("render");
        assert!(html.contains("only the last 2000 lines"));
        assert!(html.contains("line 2999"));
        assert!(html.contains(">line 1000\n<"));
        assert!(!html.contains(">line 999\n<"));
    }

    #[test]
    fn log_tail_reads_only_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.log");
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!("2026-08-20T10:00:00.000Z err line {i}\n"));
        }
        std::fs::write(&p, &text).expect("w");
        let t = read_log_tail(&p, 10_000, 400).expect("tail");
        assert!(t.truncated);
        assert_eq!(t.total_bytes, text.len() as u64);
        assert_eq!(t.lines.last().expect("line").text, "line 999");
        assert!(t
            .lines
            .iter()
            .all(|l| l.tag == "err" && l.text.starts_with("line ")));
        let t = read_log_tail(&p, 3, 1 << 20).expect("tail");
        assert_eq!(t.lines.len(), 3);
        assert_eq!(t.lines[0].text, "line 997");
    }

    #[test]
    fn clean_text_strips_escapes_and_shows_controls() {
        assert_eq!(clean_text("a\x1b[1;31mred\x1b[0m b"), "ared b");
        assert_eq!(clean_text("\x1b]0;title\x07x"), "x");
        assert_eq!(clean_text("t\tn\r\x00\x08\x7f"), "t\tn^@^H^?");
        assert_eq!(clean_text("\u{fffe}"), "\u{fffd}");
    }

    #[test]
    fn durations_are_readable() {
        assert_eq!(fmt_duration(0.003), "3 ms");
        assert_eq!(fmt_duration(1.04), "1.04 s");
        assert_eq!(fmt_duration(2.5), "2.5 s");
        assert_eq!(fmt_duration(3.0), "3 s");
        assert_eq!(fmt_duration(20.0), "20 s");
        assert_eq!(fmt_duration(10.5), "10.5 s");
        assert_eq!(fmt_duration(123.0), "2 min 03 s");
        assert_eq!(fmt_duration(3723.0), "1 h 02 min 03 s");
    }

    #[test]
    fn extra_manifest_sections_render_when_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = succeeded_run(dir.path());
        let mut v = serde_json::to_value(&m).expect("json");
        v["approvals"] = serde_json::json!([
            {"at": "2026-08-20T10:00:00Z", "step": "only", "by": "carol", "granted": true}
        ]);
        if let Ok(m2) = serde_json::from_value::<Manifest>(v) {
            let html = render_report(&m2, dir.path()).expect("render");
            if serde_json::to_value(&m2)
                .expect("json")
                .get("approvals")
                .is_some()
            {
                assert!(html.contains("<section id=\"approvals\">"));
                assert!(html.contains("carol"));
            }
        }
    }
}
