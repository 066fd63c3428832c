//! `report.html`: one self-contained page an assessor can open (or print to PDF) to see the
//! verdict, what failed, when each step ran, and the logs — without any tool.
//!
//! Everything comes from the manifest and the attempt logs in the bundle; nothing is fetched
//! (inline CSS, a few lines of inline JS, a Content-Security-Policy that forbids loading
//! anything). Links to logs and collected files are relative: they work when the page sits at
//! the bundle root (`<bundle>/report.html`).
//!
//! The page is written with `maud`: every value spliced in is HTML-escaped unless it is wrapped
//! in `PreEscaped`, which only the stylesheet and the script are. The markup spells out its
//! newlines (`"\n"`), so the bytes are those of the page as it always was.
//!
//! - this module: the page, section by section;
//! - [`timeline`]: the Gantt-style timeline of attempts;
//! - [`screenshot`]: an attempt's screenshot, embedded;
//! - `report.css`, `report.js`: the page's style and its few lines of script.

mod screenshot;
mod timeline;

use std::fmt::Write as _;
use std::path::Path;

use maud::{html, Markup, PreEscaped, DOCTYPE};
use runbook_engine::event::StepStatus;

use crate::log_tail::{excerpt, read_log_tail, LogLine, LogTail};
use crate::manifest::{AttemptRecord, Manifest, StepRecord};
use crate::run_view::{
    attempts_by_target, clean_text, fmt_duration, outcome_kind, run_duration, run_end,
};
use crate::EvidenceError;

/// Most of an attempt log shown in the report: the last lines/bytes.
const MAX_LOG_LINES: usize = 2000;
const MAX_LOG_BYTES: u64 = 1024 * 1024;
/// All logs in one page together (beyond it, each log gets only its last `MIN_LOG_BYTES`).
const MAX_TOTAL_LOG_BYTES: u64 = 24 * 1024 * 1024;
const MIN_LOG_BYTES: u64 = 64 * 1024;
/// Lines of output shown for a failed step in "What failed".
const FAILURE_EXCERPT_LINES: usize = 8;

const CSS: &str = include_str!("report.css");
const JS: &str = include_str!("report.js");

// ---------------------------------------------------------------------------------------------
// Words and classes for the page
// ---------------------------------------------------------------------------------------------

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

fn fmt_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn fmt_clock(t: chrono::DateTime<chrono::Utc>) -> String {
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
    out
}

fn json_inline(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
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

fn fmt_bytes(n: u64) -> String {
    if n >= 1024 * 1024 {
        format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
    } else if n >= 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// An attempt's log as the page shows it: its end, or why it is not shown.
type ShownLog = Result<LogTail, String>;

/// Renders the report for a bundle; `bundle` is the bundle directory (attempt logs are read
/// from it). A missing log is noted in the page, not an error; other read errors are.
pub fn render_report(manifest: &Manifest, bundle: &Path) -> Result<String, EvidenceError> {
    let m = manifest;
    let logs = read_logs(m, bundle)?;
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
    let status = m.status.as_str();
    let page = html! {
        (DOCTYPE) "\n"
        html lang="en" {
            "\n"
            head {
                "\n" meta charset="utf-8";
                "\n" meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:";
                "\n" meta name="viewport" content="width=device-width, initial-scale=1";
                "\n" meta name="generator" content={ (m.engine.name) " " (m.engine.version) };
                "\n" link rel="icon" href="data:,";
                "\n" title { (status.to_uppercase()) " — " (m.runbook.name) " — run " (m.run_id) }
                "\n" style { "\n" (PreEscaped(CSS)) }
                "\n"
            }
            "\n"
            body {
                "\n"
                (verdict(m, &failed))
                main {
                    "\n"
                    @if let Some(d) = &m.drill { (drill(d)) }
                    @if !failed.is_empty() { (failures(&failed, &logs)) }
                    (run_facts(m))
                    (timeline::timeline(m, run_end(m)))
                    (steps_table(m))
                    (parameters(m))
                    (step_details_section(m, &logs, bundle))
                    (collected(m))
                    (notes(m))
                    (extra_sections(m))
                }
                "\n"
                (footer(m, bundle))
                "\n"
                script { "\n" (PreEscaped(JS)) }
                "\n"
            }
            "\n"
        }
        "\n"
    };
    Ok(page.into_string())
}

/// Logs, read once: per step, per attempt, its tail or a note. Steps that did not succeed get
/// their share of the page's log budget first.
fn read_logs(m: &Manifest, bundle: &Path) -> Result<Vec<Vec<ShownLog>>, EvidenceError> {
    let mut logs: Vec<Vec<Option<ShownLog>>> = m
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
    Ok(logs
        .into_iter()
        .map(|per| per.into_iter().flatten().collect())
        .collect())
}

// ---- Verdict banner ---------------------------------------------------------------------------

fn verdict(m: &Manifest, failed: &[(usize, &StepRecord)]) -> Markup {
    let status = m.status.as_str();
    let title = m.runbook.title.as_deref().unwrap_or(&m.runbook.name);
    html! {
        header class={ "verdict v-" (status_class(status)) } {
            "\n" div class="badge-big" { (status.replace('_', " ").to_uppercase()) }
            "\n"
            div class="vtext" {
                "\n" h1 { (title) }
                "\n"
                div class="vsub" {
                    "runbook " b { (m.runbook.name) } " · run " b { (m.run_id) } " · "
                    (fmt_time(m.started_at)) " · " (fmt_duration(run_duration(m)))
                }
                "\n"
                @if let Some(reason) = &m.reason {
                    // A run can fail with every step green (a hook, `--fail-on-leak`): say why
                    // first.
                    div class="vline" { "Run " (status.replace('_', " ")) ": " (clean_text(reason)) }
                    "\n"
                }
                div class="vline" { (verdict_line(m, failed)) }
                "\n"
            }
            "\n"
        }
        "\n"
    }
}

fn verdict_line(m: &Manifest, failed: &[(usize, &StepRecord)]) -> Markup {
    let n = m.steps.len();
    let count = |status: StepStatus| m.steps.iter().filter(|s| s.status == Some(status)).count();
    let (succeeded, skipped) = (count(StepStatus::Succeeded), count(StepStatus::Skipped));
    if failed.is_empty() {
        let mut line = format!("{succeeded} of {n} steps succeeded");
        if skipped > 0 {
            let _ = write!(line, ", {skipped} skipped");
        }
        let not_run = n - succeeded - skipped;
        if not_run > 0 {
            let _ = write!(line, ", {not_run} not run");
        }
        return html! { (line) "." };
    }
    html! {
        (failed.len()) " of " (n) " step" (plural(n)) " did not succeed: "
        @for (k, (_, s)) in failed.iter().enumerate() {
            @if k > 0 { "; " }
            a href={ "#" (anchor(&s.id)) } { (s.id) }
            @if let Some(r) = &s.reason { " — " (clean_text(r)) }
        }
    }
}

// ---- Drill verdict ----------------------------------------------------------------------------

/// The drill's objectives, measurements and verdict, first thing after the header.
fn drill(d: &runbook_engine::event::DrillReport) -> Markup {
    use runbook_engine::event::Verdict;
    let class = match d.verdict {
        Verdict::Pass => "succeeded",
        Verdict::Fail => "failed",
        Verdict::NotMeasured => "cancelled",
    };
    html! {
        section id="drill" {
            "\n"
            h2 { "Drill " span class={ "badge b-" (class) } { (d.verdict.as_str().replace('_', " ")) } }
            "\n"
            table class="drill" {
                tr { th { "Objective" } th { "Target" } th { "Measured" } th { "Verdict" } th { "Why" } }
                "\n"
                @for (name, o) in [("RTO (recovery time)", &d.rto), ("RPO (data age)", &d.rpo)] {
                    @if let Some(o) = o {
                        tr {
                            td { (name) }
                            td { (fmt_duration(o.target_seconds)) }
                            td { (o.measured_seconds.map_or("—".to_owned(), fmt_duration)) }
                            td { (o.verdict.as_str().replace('_', " ")) }
                            td { (o.why.as_deref().unwrap_or("")) }
                        }
                        "\n"
                    }
                }
            }
            "\n"
            p class="dim" {
                @if let Some(t) = d.clock_started_at { "clock started " (fmt_time(t)) " " }
                @if let Some(t) = d.clock_stopped_at { "· stopped " (fmt_time(t)) " " }
                @if let Some(t) = d.restored_data_time { "· restored data from " (fmt_time(t)) }
            }
            "\n"
        }
        "\n"
    }
}

// ---- What failed ------------------------------------------------------------------------------

fn failures(failed: &[(usize, &StepRecord)], logs: &[Vec<ShownLog>]) -> Markup {
    html! {
        section id="failures" {
            "\n" h2 { "What failed" } "\n"
            @for (i, s) in failed {
                (failure(s, &logs[*i]))
            }
        }
        "\n"
    }
}

fn failure(s: &StepRecord, logs: &[ShownLog]) -> Markup {
    let st = step_status_str(s);
    let class = status_class(st);
    // The last attempt that did not succeed (on any target), else the last one.
    let pick = s
        .attempts
        .iter()
        .enumerate()
        .rev()
        .find(|(_, a)| !a.outcome.as_ref().is_some_and(|o| o.succeeded()))
        .or_else(|| s.attempts.iter().enumerate().next_back());
    html! {
        div class={ "fcard c-" (class) } {
            "\n"
            div class="fhead" {
                span class={ "badge b-" (class) } { (st) } " "
                a href={ "#" (anchor(&s.id)) } class="fstep" { (s.id) }
                @if let Some(p) = &s.phase { " " span class="phase" { (p) } }
                span class="fmeta" {
                    (s.attempts.len()) " attempt" (plural(s.attempts.len())) " · "
                    (fmt_duration(s.duration_seconds))
                }
            }
            "\n"
            @if let Some(r) = &s.reason {
                div class="freason" { (clean_text(r)) }
                "\n"
            }
            @if let Some((ai, a)) = pick {
                div class="fcmd" {
                    "Last "
                    @if s.attempts.len() > 1 && attempt_class(a) != "ok" { "failed " }
                    "attempt " (a.attempt) " on " b { (a.target) } ": "
                    b { (attempt_outcome_text(a)) } " — " code { (first_line(&a.command)) }
                }
                "\n"
                @if let Some(Ok(tail)) = logs.get(ai) {
                    (failure_excerpt(tail))
                }
            }
        }
        "\n"
    }
}

/// The end of a failed attempt's output, with its last stderr lines wherever they are.
fn failure_excerpt(tail: &LogTail) -> Markup {
    let out: Vec<&LogLine> = tail.lines.iter().filter(|l| !l.is_meta()).collect();
    if out.is_empty() {
        return html! {};
    }
    let keep = excerpt(&out, FAILURE_EXCERPT_LINES, FAILURE_EXCERPT_LINES);
    let errs = keep.iter().filter(|&&k| out[k].is_err()).count();
    html! {
        div class="excerpt-title" {
            "End of the output"
            @if errs > 0 {
                " — " span class="errkey" { "stderr" } " lines marked red"
            } @else {
                " (nothing on stderr)"
            }
            ":"
        }
        "\n"
        pre class="log excerpt" {
            "\n"
            @for (n, &k) in keep.iter().enumerate() {
                @if (n > 0 && keep[n - 1] + 1 != k) || (n == 0 && k > 0) {
                    span class="l gap" { "        ⋯\n" }
                }
                (log_line(out[k]))
            }
        }
        "\n"
    }
}

fn log_line(l: &LogLine) -> Markup {
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
    html! {
        span class={ "l " (class) } {
            span class="lt" { (time) } span class="lg" { (tag) } (clean_text(&l.text)) "\n"
        }
    }
}

// ---- Run facts --------------------------------------------------------------------------------

fn fact(name: &str, value: Markup) -> Markup {
    html! { dt { (name) } dd { (value) } "\n" }
}

/// The Run section's facts from `context` that tell an assessor who ran it, where, with which
/// binary, how good the clock was, which key signs it, and which drill came before it.
fn trust_facts(ctx: &serde_json::Value) -> Markup {
    let id = &ctx["identity"];
    let host = &ctx["host"];
    let sync = &ctx["time"]["sync"];
    let bin = &ctx["engine"]["binary"];
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    html! {
        @if !id.is_null() {
            (fact("Behind the operator", html! {
                @let sudo = text(&id["sudo_user"]);
                @let login = (text(&id["login_user"]), id["login_uid"].as_u64());
                @if sudo.is_none() && login.1.is_none() {
                    span class="dim" { "no sudo, no login session recorded" }
                }
                @if let Some(u) = &sudo {
                    "sudo from " code { (u) }
                    @if let Some(n) = id["sudo_uid"].as_u64() { " " span class="dim" { "(uid " (n) ")" } }
                }
                @if sudo.is_some() && login.1.is_some() { " · " }
                @match login {
                    (Some(u), Some(n)) => { "login " code { (u) } " " span class="dim" { "(uid " (n) ")" } },
                    (None, Some(n)) => { "login uid " (n) },
                    _ => {},
                }
            }))
        }
        @if !host.is_null() {
            (fact("Host", html! {
                @match text(&host["fqdn"]) {
                    Some(f) => code { (f) },
                    None => span class="dim" { "FQDN unknown" },
                }
                " · " span class="dim" { "machine-id" } " "
                @match text(&host["machine_id"]) {
                    Some(f) => code { (f) },
                    None => span class="dim" { "unknown" },
                }
            }))
        }
        @if !sync.is_null() {
            (fact("Clock", html! {
                @match sync["synchronized"].as_bool() {
                    Some(true) => "synchronised",
                    Some(false) => b { "NOT synchronised" },
                    None => "unknown",
                }
                " " span class="dim" { "(from " (sync["source"].as_str().unwrap_or("?")) ")" }
                @if let Some(t) = sync["system_time"].as_str() { " · " (t) }
                @if let Some(why) = sync["why"].as_str() { br; span class="dim" { (why) } }
            }))
        }
        @if !bin.is_null() {
            (fact("Binary", html! {
                @match text(&bin["path"]) {
                    Some(p) => code { (p) },
                    None => span class="dim" { "unknown" },
                }
                " " (ctx["engine"]["version"].as_str().unwrap_or("")) br;
                span class="dim" { "sha256" } " "
                @match text(&bin["sha256"]) {
                    Some(h) => code class="hash" { (h) },
                    None => span class="dim" { (bin["error"].as_str().unwrap_or("unknown")) },
                }
            }))
        }
        @if let Some(signing) = ctx.get("signing") {
            (fact("Signing key", html! {
                @match text(&signing["key_id"]) {
                    Some(k) => code { (k) },
                    None => span class="dim" { "not signed" },
                }
            }))
        }
        @if let Some(chain) = ctx.get("chain") {
            @let prev = &chain["previous"];
            (fact("Previous drill", html! {
                @if prev.is_null() {
                    span class="dim" { "none: the first run of this runbook in this evidence directory" }
                } @else {
                    code { (prev["bundle"].as_str().unwrap_or("")) } " "
                    (prev["status"].as_str().unwrap_or("")) " "
                    span class="dim" { (prev["started_at"].as_str().unwrap_or("")) } br;
                    span class="dim" { "its SHA256SUMS sha256" } " "
                    code class="hash" { (prev["sha256"].as_str().unwrap_or("")) }
                }
            }))
        }
    }
}

/// A file the run read, and its copy in the bundle.
fn file_fact(path: &str, copy: &str, sha256: &str) -> Markup {
    html! {
        code { (path) } " " span class="dim" { "(copy: " a href=(href(copy)) { (copy) } ")" } br;
        span class="dim" { "sha256" } " " code class="hash" { (sha256) }
    }
}

fn run_facts(m: &Manifest) -> Markup {
    let status = m.status.as_str();
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
    html! {
        section id="facts" {
            "\n" h2 { "Run" } "\n"
            dl class="facts" {
                "\n"
                (fact("Status", html! { span class={ "badge b-" (status_class(status)) } { (status) } }))
                (fact("Run ID", html! { code { (m.run_id) } }))
                (fact("Runbook", html! {
                    b { (m.runbook.name) }
                    @if let Some(t) = &m.runbook.title { " — " (t) }
                }))
                (fact("Operator", html! {
                    code { (m.operator.user) "@" (m.operator.host) } " "
                    span class="dim" { "(uid " (m.operator.uid) ")" }
                }))
                (trust_facts(&m.context))
                (fact("Started", html! { (fmt_time(m.started_at)) }))
                (fact("Finished", html! {
                    @match m.finished_at {
                        Some(t) => (fmt_time(t)),
                        None => span class="dim" { "not recorded" },
                    }
                }))
                (fact("Duration", html! { (fmt_duration(run_duration(m))) }))
                (fact("Refs", html! {
                    @if m.runbook.refs.is_empty() {
                        span class="dim" { "none" }
                    }
                    @for (k, r) in m.runbook.refs.iter().enumerate() {
                        @if k > 0 { " " }
                        @if r.starts_with("https://") || r.starts_with("http://") {
                            a class="ref" href=(r) { (r) }
                        } @else {
                            span class="ref" { (r) }
                        }
                    }
                }))
                (fact("Runbook file", file_fact(&m.runbook.path, &m.runbook.copy, &m.runbook.sha256)))
                @if let Some(inv) = &m.inventory {
                    (fact("Inventory file", file_fact(&inv.path, &inv.copy, &inv.sha256)))
                }
                (fact("Command", html! { code { (clean_text(&m.command_line.join(" "))) } }))
                (fact("Working dir", html! { code { (m.workdir) } }))
                (fact("Engine", html! {
                    (m.engine.name) " " (m.engine.version) " "
                    span class="dim" { "· evidence format " (m.format) }
                }))
                @if !m.secrets.is_empty() {
                    (fact("Secrets redacted", html! {
                        @for (k, s) in m.secrets.iter().enumerate() {
                            @if k > 0 { " " }
                            code { (s) }
                        }
                    }))
                }
            }
            "\n"
            div class="counts" {
                span class="count" { b { (m.steps.len()) } " steps" }
                @for (k, n) in &counts {
                    span class={ "count b-" (status_class(k)) } { b { (n) } " " (k) }
                }
            }
            "\n"
        }
        "\n"
    }
}

// ---- Steps table ------------------------------------------------------------------------------

fn steps_table(m: &Manifest) -> Markup {
    html! {
        section id="steps" {
            "\n" h2 { "Steps" } "\n"
            table class="steps" {
                "\n"
                thead {
                    tr {
                        th { "#" } th { "Step" } th { "Phase" } th { "Status" }
                        th class="num" { "Attempts" } th class="num" { "Duration" }
                        th { "Started" } th { "Reason / result" }
                    }
                }
                "\n"
                tbody {
                    "\n"
                    @for (n, s) in m.steps.iter().enumerate() {
                        (step_row(n, s))
                    }
                }
                "\n"
            }
            "\n"
        }
        "\n"
    }
}

fn step_row(n: usize, s: &StepRecord) -> Markup {
    let st = step_status_str(s);
    let targets: Vec<String> = attempts_by_target(s).into_iter().map(|t| t.0).collect();
    let result = match (&s.reason, s.attempts.last()) {
        (Some(r), _) => clean_text(r),
        (None, Some(a)) if s.status == Some(StepStatus::Succeeded) => {
            if s.attempts.len() > 1 {
                format!("succeeded on attempt {}", a.attempt)
            } else {
                String::new()
            }
        }
        (None, Some(a)) => attempt_outcome_text(a),
        (None, None) => String::new(),
    };
    html! {
        tr class={ "r-" (status_class(st)) } {
            td class="num dim" { (n + 1) }
            td {
                a href={ "#" (anchor(&s.id)) } { b { (s.id) } }
                @if !(targets.is_empty() || targets == ["local"]) {
                    " " span class="dim" { "[" (targets.join(", ")) "]" }
                }
            }
            td { (s.phase.as_deref().unwrap_or_default()) }
            td { span class={ "badge b-" (status_class(st)) } { (st) } }
            td class="num" { (s.attempts.len()) }
            td class="num" {
                @if s.attempts.is_empty() && s.started_at.is_none() {
                    "–"
                } @else {
                    (fmt_duration(s.duration_seconds))
                }
            }
            td class="dim" { (s.started_at.map(fmt_clock).unwrap_or_default()) }
            td { (result) }
        }
        "\n"
    }
}

// ---- Parameters -------------------------------------------------------------------------------

fn parameters(m: &Manifest) -> Markup {
    html! {
        section id="params" {
            "\n" h2 { "Parameters" } "\n"
            @match &m.params {
                serde_json::Value::Object(map) if !map.is_empty() => {
                    table class="kv" {
                        "\n"
                        thead { tr { th { "Name" } th { "Value" } th { "Source" } } }
                        "\n"
                        tbody {
                            "\n"
                            @for (k, v) in map {
                                tr {
                                    td { code { (k) } }
                                    td { code class="val" { (clean_text(&json_inline(v))) } }
                                    td class="dim" { (m.param_sources.get(k).map(param_source).unwrap_or_default()) }
                                }
                                "\n"
                            }
                        }
                        "\n"
                    }
                    "\n"
                }
                serde_json::Value::Object(_) | serde_json::Value::Null => {
                    p class="dim" { "This runbook takes no parameters." }
                    "\n"
                }
                other => {
                    pre class="json" { (other.to_string()) }
                    "\n"
                }
            }
            // The claim names what was searched and what was not: no more than redaction does.
            p class="dim small" {
                "Secret values are shown as " code { "[REDACTED:name]" } ". Searched for in everything \
                 the run wrote (logs, transcripts, journal, manifest, collected text files, this \
                 report; the copy of the runbook is kept verbatim), for each value: "
                (crate::redact::SEARCHED_FORMS) ". Not searched: " (crate::redact::NOT_SEARCHED) "."
            }
            "\n"
        }
        "\n"
    }
}

// ---- Step details -----------------------------------------------------------------------------

fn step_details_section(m: &Manifest, logs: &[Vec<ShownLog>], bundle: &Path) -> Markup {
    html! {
        section id="details" {
            "\n"
            h2 {
                "Step details and logs "
                span class="tools no-print" {
                    button type="button" onclick="setAll(true)" { "Expand all" }
                    button type="button" onclick="setAll(false)" { "Collapse all" }
                }
            }
            "\n"
            @for (i, s) in m.steps.iter().enumerate() {
                (step_details(s, &logs[i], bundle))
            }
        }
        "\n"
    }
}

fn step_details(s: &StepRecord, logs: &[ShownLog], bundle: &Path) -> Markup {
    let st = step_status_str(s);
    let class = status_class(st);
    let open = matches!(st, "failed" | "cancelled" | "unfinished");
    html! {
        details id=(anchor(&s.id)) class={ "step c-" (class) } open[open] {
            "\n"
            summary {
                span class={ "badge b-" (class) } { (st) } " " b { (s.id) }
                @if let Some(p) = &s.phase { " " span class="phase" { (p) } }
                span class="smeta" {
                    (s.attempts.len()) " attempt" (plural(s.attempts.len())) " · "
                    @if s.attempts.is_empty() && s.started_at.is_none() {
                        "did not run"
                    } @else {
                        (fmt_duration(s.duration_seconds))
                    }
                }
            }
            "\n"
            div class="sbody" {
                "\n"
                @if let Some(r) = &s.reason {
                    p class="reason" { b { "Reason:" } " " (clean_text(r)) }
                    "\n"
                }
                @if !s.targets.is_empty() {
                    table class="hosts" {
                        tr { th { "Host" } th { "Status" } th { "Attempts" } th { "Reason" } }
                        "\n"
                        @for t in &s.targets {
                            tr {
                                td { (t.target) }
                                td { span class={ "badge b-" (status_class(t.status.as_str())) } { (t.status.as_str()) } }
                                td { (t.attempts) }
                                td { (clean_text(t.reason.as_deref().unwrap_or(""))) }
                            }
                            "\n"
                        }
                    }
                    "\n"
                }
                @for (ai, a) in s.attempts.iter().enumerate() {
                    (attempt(a, logs.get(ai), bundle))
                }
                @if let Some(outputs) = &s.outputs {
                    div class="cmdlabel" { "Step outputs" }
                    pre class="json" { (clean_text(&serde_json::to_string_pretty(outputs).unwrap_or_default())) }
                    "\n"
                }
                @if !s.collected.is_empty() {
                    div class="cmdlabel" { "Collected" }
                    ul class="plain" {
                        "\n"
                        @for c in &s.collected {
                            li {
                                code { (c.source) } " "
                                @match (&c.copy, &c.error) {
                                    (_, Some(e)) => span class="errtext" { "— " (e) },
                                    (Some(p), None) => { "→ " a href=(href(p)) { code { (p) } } },
                                    (None, None) => {},
                                }
                            }
                            "\n"
                        }
                    }
                    "\n"
                }
                @if s.attempts.is_empty() && s.reason.is_none() {
                    p class="dim" { "No attempt was made." }
                    "\n"
                }
            }
            "\n"
        }
        "\n"
    }
}

fn attempt(a: &AttemptRecord, log: Option<&ShownLog>, bundle: &Path) -> Markup {
    let class = attempt_class(a);
    let outcome = attempt_outcome_text(a);
    html! {
        div class="attempt" {
            "\n"
            div class="ahead" {
                span class={ "dot d-" (class) } {}
                b { "Attempt " (a.attempt) } " on " b { (a.target) } " · "
                span class={ "t-" (class) } { (clean_text(&outcome)) }
                @if let Some(c) = a.exit_code.filter(|_| !outcome.contains("exit code")) {
                    " " span class="dim" { "(exit code " (c) ")" }
                }
                " · " (a.duration_seconds.map(fmt_duration).unwrap_or_else(|| "–".into()))
                " · started " (fmt_clock(a.started_at))
                @if let Some(d) = a.retry_delay_seconds { " · retried after " (fmt_duration(d)) }
            }
            "\n"
            div class="cmdlabel" { "Command " span class="dim" { "in " code { (a.cwd) } } }
            pre class="cmd" { (clean_text(a.command.trim_end())) }
            "\n"
            div class="cmdlabel" {
                "Log " a href=(href(&a.log)) { code { (a.log) } } " "
                span class="dim" { "· " (a.output.stdout) " B stdout, " (a.output.stderr) " B stderr" }
            }
            "\n"
            @match log {
                Some(Ok(tail)) => (attempt_log(a, tail)),
                Some(Err(note)) => { p class="trunc" { (note) } "\n" },
                None => {},
            }
            @if let Some(shot) = screenshot::markup(bundle, a) { (shot) }
        }
        "\n"
    }
}

fn attempt_log(a: &AttemptRecord, tail: &LogTail) -> Markup {
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
    html! {
        @if tail.truncated {
            p class="trunc" {
                "The log is longer than shown (" (fmt_bytes(tail.total_bytes)) " in all): only the last "
                (tail.lines.len()) " lines are included here. The complete log is " code { (a.log) }
                " in the bundle."
            }
            "\n"
        }
        pre class="log" {
            @for l in &tail.lines[skip..] {
                (log_line(l))
            }
        }
        "\n"
    }
}

// ---- Collected files --------------------------------------------------------------------------

fn collected(m: &Manifest) -> Markup {
    let collected: Vec<(&StepRecord, &crate::manifest::Collected)> = m
        .steps
        .iter()
        .flat_map(|s| s.collected.iter().map(move |c| (s, c)))
        .collect();
    html! {
        section id="collected" {
            "\n" h2 { "Collected files" } "\n"
            @if collected.is_empty() {
                p class="dim" { "No files were collected." }
                "\n"
            } @else {
                table class="kv" {
                    "\n"
                    thead { tr { th { "Step" } th { "File" } th { "In the bundle" } th { "SHA-256" } } }
                    "\n"
                    tbody {
                        "\n"
                        @for (s, c) in &collected {
                            tr {
                                td { a href={ "#" (anchor(&s.id)) } { (s.id) } }
                                td { code { (c.source) } }
                                td {
                                    @match &c.copy {
                                        Some(p) => a href=(href(p)) { code { (p) } },
                                        None => span class="dim" { "not copied" },
                                    }
                                }
                                td {
                                    @match (&c.sha256, &c.error) {
                                        (_, Some(e)) => span class="errtext" { (e) },
                                        (Some(h), None) => code class="hash" { (h) },
                                        (None, None) => span class="dim" { "directory" },
                                    }
                                }
                            }
                            "\n"
                        }
                    }
                    "\n"
                }
                "\n"
            }
        }
        "\n"
    }
}

// ---- Notes ------------------------------------------------------------------------------------

fn notes(m: &Manifest) -> Markup {
    html! {
        section id="notes" {
            "\n" h2 { "Notes" } "\n"
            @if m.notes.is_empty() {
                p class="dim" { "No notes were recorded." }
                "\n"
            } @else {
                ul class="notes" {
                    "\n"
                    @for n in &m.notes {
                        li { span class="ts" { (fmt_clock(n.at)) } " " (clean_text(&n.message)) }
                        "\n"
                    }
                }
                "\n"
            }
        }
        "\n"
    }
}

// ---- Fields other parts of the engine may add (rendered only when present) --------------------

fn extra_sections(m: &Manifest) -> Markup {
    let value = serde_json::to_value(m).unwrap_or_default();
    // Placeholder for drill results (RTO/RPO…): shown as a generic table, whatever its shape.
    let drill = value.get("drill").filter(|d| !d.is_null());
    html! {
        @for (key, id, heading) in [("approvals", "approvals", "Approvals"), ("resumed", "resumed", "Resumptions")] {
            @if let Some(serde_json::Value::Array(rows)) = value.get(key) {
                @if !rows.is_empty() {
                    section id=(id) { "\n" h2 { (heading) } "\n" (json_rows(rows)) }
                    "\n"
                }
            }
        }
        @if let Some(drill) = drill {
            section id="drill" {
                "\n" h2 { "Drill" } "\n"
                @match drill {
                    serde_json::Value::Object(map) => {
                        table class="kv" {
                            "\n"
                            tbody {
                                "\n"
                                @for (k, v) in map {
                                    tr { th { (k) } td { code { (clean_text(&json_inline(v))) } } }
                                    "\n"
                                }
                            }
                            "\n"
                        }
                        "\n"
                    }
                    serde_json::Value::Array(rows) => (json_rows(rows)),
                    other => { pre class="json" { (other.to_string()) } "\n" },
                }
            }
            "\n"
        }
    }
}

fn json_rows(rows: &[serde_json::Value]) -> Markup {
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
    html! {
        table class="kv" {
            "\n"
            thead { tr { @for c in &cols { th { (c) } } } }
            "\n"
            tbody {
                "\n"
                @for r in rows {
                    tr {
                        @for c in &cols {
                            td { (clean_text(&r.get(c).map(json_inline).unwrap_or_default())) }
                        }
                    }
                    "\n"
                }
            }
            "\n"
        }
        "\n"
    }
}

// ---- Footer -----------------------------------------------------------------------------------

fn footer(m: &Manifest, bundle: &Path) -> Markup {
    let bundle_name = bundle
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| bundle.display().to_string());
    html! {
        footer {
            "\n" h2 { "Verifying this evidence" } "\n"
            p {
                "This page is a view of the evidence bundle " code { (bundle_name) }
                "; the bundle is the record. Check that no file in it was changed since the run:"
            }
            "\n"
            pre class="cmd" { "cd " (shell_quote(&bundle_name)) "\nsha256sum -c SHA256SUMS" }
            "\n"
            p {
                "Every line must end in " code { "OK" } ". " code { "manifest.json" }
                " holds the data shown here; " code { "journal.jsonl" }
                " is the event-by-event record it was built from; "
                code { "steps/<step>/<target>/attempt-<n>.log" }
                " are the complete logs (this page shows at most the last " (MAX_LOG_LINES)
                " lines / " (MAX_LOG_BYTES / (1024 * 1024)) " MiB of each). The runbook as run is "
                code { (m.runbook.copy) } ", sha256 " code class="hash" { (m.runbook.sha256) } "."
            }
            "\n"
            p class="dim" {
                "Generated by " (m.engine.name) " " (m.engine.version) " from evidence format "
                (m.format) " · run " (m.run_id) " · " (m.operator.user) "@" (m.operator.host)
            }
            "\n"
        }
    }
}

#[cfg(test)]
use crate::test_support;

#[cfg(test)]
mod tests;
