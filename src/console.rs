//! What the operator sees while a run goes on. On a terminal: a live line per running step
//! (attempt n/m, elapsed, retry countdown) with finished steps printed above it; elsewhere
//! (Jenkins, pipes): one plain timestamped line per event. Step output is shown only with
//! `--stream`, prefixed with the step id, and always whole lines, so it never garbles.
//! Everything printed is redacted like evidence (terminal output ends up in CI logs), and made
//! safe for the terminal: control sequences from steps other than SGR colours (a title change,
//! an OSC hyperlink or clipboard write, cursor movement, a screen clear) are shown escaped, not
//! obeyed. Evidence keeps the raw bytes.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use runbook_engine::duration::format_duration;
use runbook_engine::event::{RunEvent, StepStatus, Stream};
use runbook_engine::executor::RunReport;
use runbook_engine::redact::{ByteRedactor, ShapeRules};
use runbook_evidence::redact::StreamRedactor;

pub struct Console {
    live: Option<MultiProgress>,
    bars: HashMap<String, ProgressBar>,
    stream_output: bool,
    /// Output being shown, per step, host and stream (the hosts of a step run at once): the
    /// redaction driver (holding back what a secret cut between reads needs) and the redacted
    /// start of the unfinished line.
    partial: HashMap<(String, String, Stream), (StreamRedactor, Vec<u8>)>,
    /// The end of the output of each running attempt (per step and host): the stream that
    /// wrote last and the last bytes it wrote, whose last non-empty line is shown when the
    /// attempt fails. Kept raw and redacted as a whole when shown, so a secret's base64 form
    /// wrapped over the last lines is found.
    last_output: HashMap<(String, String), (Stream, Vec<u8>)>,
    /// Probe attempts being polled, per step and host: their repeated failures are summed up
    /// rather than printed one by one (a wait can take hundreds of attempts).
    polling: HashMap<(String, String), Polling>,
    color: bool,
    secrets: Vec<(String, String)>,
    redactor: ByteRedactor,
}

impl Console {
    pub fn new(
        live: bool,
        stream_output: bool,
        color: bool,
        secrets: Vec<(String, String)>,
        patterns: &[String],
    ) -> Self {
        let shapes = ShapeRules::new(patterns).unwrap_or_default();
        Self {
            live: live
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10))),
            bars: HashMap::new(),
            stream_output,
            partial: HashMap::new(),
            last_output: HashMap::new(),
            polling: HashMap::new(),
            color,
            redactor: ByteRedactor::new(&secrets).with_shapes(shapes),
            secrets,
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn line(&self, text: &str) {
        let now = chrono::Local::now().format("%H:%M:%S");
        let line = format!(
            "{} {}",
            self.paint("2", &now.to_string()),
            terminal_safe(&self.redactor.redact_str(text))
        );
        match &self.live {
            Some(mp) => {
                let _ = mp.println(line);
            }
            None => {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
        }
    }

    pub fn event(&mut self, event: &RunEvent) {
        match event {
            RunEvent::RunStarted {
                runbook,
                run_id,
                steps,
                ..
            } => {
                self.line(&format!("run {run_id} of {runbook}: {steps} steps"));
            }
            RunEvent::StepStarted { .. }
            | RunEvent::Collect { .. }
            | RunEvent::Artifact { .. }
            | RunEvent::Clock { .. }
            | RunEvent::ProcessStarted { .. }
            | RunEvent::TargetFinished { .. }
            | RunEvent::RunFinished { .. } => {}
            RunEvent::Batch {
                step,
                number,
                hosts,
                failed,
                ..
            } => self.line(&format!(
                "▣ {step} batch {number} done ({}){}",
                hosts.join(", "),
                if *failed > 0 {
                    format!(", {failed} failed")
                } else {
                    String::new()
                }
            )),
            RunEvent::HostAdded {
                name,
                address,
                groups,
                ..
            } => self.line(&format!(
                "+ host {name} ({address}) added to {}",
                if groups.is_empty() {
                    "the inventory".to_owned()
                } else {
                    groups.join(", ")
                }
            )),
            RunEvent::DrillMeasured { report, .. } => {
                let part = |name: &str, o: &Option<runbook_engine::event::Objective>| {
                    o.as_ref().map(|o| {
                        format!(
                            "{name} {} (target {}){}",
                            o.measured_seconds.map_or("not measured".to_owned(), |m| {
                                runbook_engine::duration::format_spec(Duration::from_secs_f64(m))
                            }),
                            runbook_engine::duration::format_spec(Duration::from_secs_f64(
                                o.target_seconds
                            )),
                            o.why.as_ref().map(|w| format!(": {w}")).unwrap_or_default()
                        )
                    })
                };
                let parts: Vec<String> = [part("RTO", &report.rto), part("RPO", &report.rpo)]
                    .into_iter()
                    .flatten()
                    .collect();
                self.line(&format!(
                    "drill {}: {}",
                    report.verdict.as_str().to_uppercase(),
                    parts.join("; ")
                ));
            }
            RunEvent::AttemptStarted {
                step,
                target,
                attempt,
                max_attempts,
                command,
                compact,
                ..
            } => {
                let key = (step.to_string(), target.to_string());
                // A wait shows its first attempt; later ones only when they fail differently.
                let quiet = self.polling.contains_key(&key);
                if *compact && !quiet {
                    self.polling.insert(key, Polling::new());
                }
                let first = command.lines().next().unwrap_or("");
                let cmd: String = first.chars().take(80).collect();
                let more = if cmd.len() < command.trim_end().len() {
                    " …"
                } else {
                    ""
                };
                if let Some(mp) = &self.live {
                    let bar = self.bars.entry(step.to_string()).or_insert_with(|| {
                        let bar = mp.add(ProgressBar::new_spinner());
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{spinner:.cyan} {prefix:.bold} {msg} {elapsed:.dim}",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        );
                        bar.set_prefix(step.to_string());
                        bar.enable_steady_tick(Duration::from_millis(100));
                        bar
                    });
                    bar.set_message(format!("attempt {attempt}/{max_attempts}: {cmd}{more}"));
                } else if !quiet {
                    self.line(&format!(
                        "▶ {step}{} attempt {attempt}/{max_attempts}: {cmd}{more}",
                        on_target(target)
                    ));
                }
            }
            RunEvent::Output {
                step,
                target,
                stream,
                data,
                ..
            } => {
                let key = (step.to_string(), target.to_string());
                let last = self
                    .last_output
                    .entry(key)
                    .or_insert_with(|| (*stream, Vec::new()));
                if last.0 != *stream {
                    *last = (*stream, Vec::new());
                }
                last.1.extend_from_slice(data);
                let keep = LAST_OUTPUT.max(2 * self.redactor.overlap());
                if last.1.len() > keep {
                    last.1.drain(..last.1.len() - keep);
                }
                if self.stream_output {
                    self.output(step.as_str(), target, *stream, data);
                }
            }
            RunEvent::AttemptFinished {
                step,
                target,
                attempt,
                outcome,
                duration,
                ..
            } => {
                self.flush_partial(step.as_str(), target);
                let last = self
                    .last_output
                    .remove(&(step.to_string(), target.to_string()))
                    .and_then(|(_, tail)| self.last_line(&tail));
                if !outcome.succeeded() {
                    let what = outcome.describe();
                    // A probe's transcript ends with `! kind: <the same message>`.
                    let last = last
                        .filter(|l| !l.contains(&what))
                        .map(|l| format!(" — {l}"))
                        .unwrap_or_default();
                    let took = match outcome {
                        runbook_engine::event::AttemptOutcome::TimedOut { .. } => String::new(),
                        _ => format!(" after {}", format_duration(*duration)),
                    };
                    let key = (step.to_string(), target.to_string());
                    let text = match self.polling.get_mut(&key) {
                        Some(p) => p.failed(&format!("{what}{last}"), std::time::Instant::now()),
                        None => Some(String::new()),
                    };
                    match text {
                        Some(waited) => self.line(&format!(
                            "{} {step}{} attempt {attempt}: {what}{took}{last}{waited}",
                            self.paint("33", "!"),
                            on_target(target),
                        )),
                        None => {
                            if let Some(bar) = self.bars.get(step.as_str()) {
                                bar.set_message(format!("attempt {attempt}: {what}"));
                            }
                        }
                    }
                }
            }
            RunEvent::RetryScheduled {
                step,
                target,
                next_attempt,
                delay,
                ..
            } => {
                let text = format!(
                    "retrying{} in {} (attempt {next_attempt} next)",
                    on_target(target),
                    format_duration(*delay)
                );
                let quiet = self
                    .polling
                    .get(&(step.to_string(), target.to_string()))
                    .is_some_and(|p| p.quiet);
                match self.bars.get(step.as_str()) {
                    Some(bar) => bar.set_message(text),
                    None if quiet => {}
                    None => self.line(&format!("  {step} {text}")),
                }
            }
            RunEvent::StepFinished {
                step,
                status,
                attempts,
                duration,
                reason,
                ..
            } => {
                let mut left: Vec<String> = self
                    .partial
                    .keys()
                    .filter(|(s, _, _)| s == step.as_str())
                    .map(|(_, t, _)| t.clone())
                    .collect();
                left.sort();
                left.dedup();
                for target in left {
                    self.flush_partial(step.as_str(), &target);
                }
                self.last_output.retain(|(s, _), _| s != step.as_str());
                self.partial.retain(|(s, _, _), _| s != step.as_str());
                self.polling.retain(|(s, _), _| s != step.as_str());
                if let Some(bar) = self.bars.remove(step.as_str()) {
                    bar.finish_and_clear();
                    if let Some(mp) = &self.live {
                        mp.remove(&bar);
                    }
                }
                let (mark, color) = match status {
                    StepStatus::Succeeded => ("✓", "32"),
                    StepStatus::Failed => ("✗", "31"),
                    StepStatus::Skipped => ("-", "2"),
                    StepStatus::Cancelled => ("■", "33"),
                };
                let tries = if *attempts > 1 {
                    format!(", {attempts} attempts")
                } else {
                    String::new()
                };
                let why = reason
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                let text = match status {
                    StepStatus::Skipped => {
                        format!("{} {step} skipped{why}", self.paint(color, mark))
                    }
                    _ => format!(
                        "{} {step} {} in {}{tries}{why}",
                        self.paint(color, mark),
                        status.as_str(),
                        format_duration(*duration)
                    ),
                };
                self.line(&text);
            }
            RunEvent::AttemptNote {
                step,
                target,
                message,
                ..
            } => self.line(&format!(
                "{} {step}{}: {message}",
                self.paint("33", "!"),
                on_target(target)
            )),
            RunEvent::ProcessesStopped {
                step,
                target,
                processes,
                ..
            } => {
                for p in processes {
                    self.line(&format!(
                        "{} {step}{}: stopped a process that had left the step's process group: {}",
                        self.paint("33", "!"),
                        on_target(target),
                        p.describe()
                    ));
                }
            }
            RunEvent::Log { step, message, .. } => {
                let who = step.as_ref().map(|s| format!("[{s}] ")).unwrap_or_default();
                self.line(&format!("log: {who}{message}"));
            }
            RunEvent::SecretRegistered { name, value, .. } => {
                self.secrets.push((name.clone(), value.clone()));
                self.redactor =
                    ByteRedactor::new(&self.secrets).with_shapes(self.redactor.shapes().clone());
            }
            RunEvent::Note { message, .. } => self.line(&format!("note: {message}")),
            RunEvent::RunResumed {
                previous, operator, ..
            } => {
                self.line(&format!(
                    "resuming a run that ended {} (by {operator})",
                    previous.as_str()
                ));
            }
            RunEvent::Approval {
                step, by, granted, ..
            } => {
                let what = if *granted { "approved" } else { "refused" };
                self.line(&format!("{step} {what} by {by}"));
            }
        }
    }

    /// The last non-empty line of an attempt's last output, redacted, at most 160 characters.
    fn last_line(&self, tail: &[u8]) -> Option<String> {
        let text = self.redactor.redact(tail);
        String::from_utf8_lossy(&text)
            .split('\n')
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| l.chars().take(160).collect())
    }

    fn output(&mut self, step: &str, target: &str, stream: Stream, data: &[u8]) {
        let key = (step.to_owned(), target.to_owned(), stream);
        let (driver, line) = self
            .partial
            .entry(key)
            .or_insert_with(|| (StreamRedactor::lines(), Vec::new()));
        let released = driver.push(&self.redactor, (), data);
        let lines = complete_lines(line, &released);
        for l in lines {
            self.print_output(step, target, stream, &String::from_utf8_lossy(&l));
        }
    }

    /// Prints one line of step output, already redacted.
    fn print_output(&self, step: &str, target: &str, stream: Stream, line: &str) {
        let line = terminal_safe(line);
        let who = if target == "local" {
            step.to_owned()
        } else {
            format!("{step}@{target}")
        };
        let prefix = match stream {
            Stream::Stdout => format!("[{who}]"),
            Stream::Stderr => format!("[{who}!]"),
        };
        let text = format!("{} {line}", self.paint("36", &prefix));
        match &self.live {
            Some(mp) => {
                let _ = mp.println(text);
            }
            None => {
                let _ = writeln!(std::io::stderr().lock(), "{text}");
            }
        }
    }

    fn flush_partial(&mut self, step: &str, target: &str) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let key = (step.to_owned(), target.to_owned(), stream);
            let Some((mut driver, mut line)) = self.partial.remove(&key) else {
                continue;
            };
            let released = driver.finish(&self.redactor);
            let mut lines = complete_lines(&mut line, &released);
            if !line.is_empty() {
                lines.push(line);
            }
            for l in lines {
                self.print_output(step, target, stream, &String::from_utf8_lossy(&l));
            }
        }
    }

    pub fn finish(&mut self) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
        }
        if let Some(mp) = &self.live {
            let _ = mp.clear();
        }
    }

    /// `text` redacted and made safe for the terminal (see [`terminal_safe`]).
    pub fn redact(&self, text: &str) -> String {
        terminal_safe(&self.redactor.redact_str(text))
    }
}

/// The lines `released` completes, the first one joined to the start kept in `line`; the
/// start of an unfinished line is kept there.
fn complete_lines(
    line: &mut Vec<u8>,
    released: &runbook_evidence::redact::Released<()>,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for piece in released.pieces() {
        line.extend_from_slice(piece.text);
        if piece.line_end {
            out.push(std::mem::take(line));
        }
    }
    out
}

/// `text` as it may reach the operator's terminal: SGR sequences (colours, `ESC [ … m`), tabs
/// and line breaks pass; every other control character is shown in caret notation (`^[` for
/// ESC, `^G` for BEL, `^M` for a carriage return that is not at the end), and C1 controls as
/// `\u{9b}`. So an OSC title change reads `^[]0;title^G`: visible, not obeyed.
pub fn terminal_safe(text: &str) -> String {
    runbook_evidence::run_view::safe_text(text, runbook_evidence::run_view::Escapes::KeepColour)
}

/// How much of an attempt's last output is kept for the line shown when it fails.
const LAST_OUTPUT: usize = 4096;

/// How often a probe that keeps failing the same way says it is still waiting.
const STILL_WAITING_EVERY: Duration = Duration::from_secs(30);

/// The console side of a wait: which failure was last shown, and since when.
struct Polling {
    started: std::time::Instant,
    last_shown: std::time::Instant,
    last_failure: Option<String>,
    /// Failures like the last one shown that were not printed.
    repeats: u32,
    /// The last failure was not printed, so neither is the retry line after it.
    quiet: bool,
}

impl Polling {
    fn new() -> Self {
        let now = std::time::Instant::now();
        Self {
            started: now,
            last_shown: now,
            last_failure: None,
            repeats: 0,
            quiet: false,
        }
    }

    /// A failed attempt: `None` to stay quiet (the same failure as the last one shown, shown
    /// recently), else the suffix for the printed line (how long it has been waiting).
    fn failed(&mut self, failure: &str, now: std::time::Instant) -> Option<String> {
        let same = self.last_failure.as_deref() == Some(failure);
        if same && now.duration_since(self.last_shown) < STILL_WAITING_EVERY {
            self.repeats += 1;
            self.quiet = true;
            return None;
        }
        let suffix = if same {
            format!(
                " (still waiting after {}; {} more like it not shown)",
                format_duration(now.duration_since(self.started)),
                self.repeats
            )
        } else {
            String::new()
        };
        self.last_failure = Some(failure.to_owned());
        self.last_shown = now;
        self.repeats = 0;
        self.quiet = false;
        Some(suffix)
    }
}

/// ` on <host>` for an attempt on a host (or a block sub-step, `host/sub`); nothing for a local
/// one, whose line the step id already identifies.
fn on_target(target: &str) -> String {
    if target == "local" {
        String::new()
    } else {
        format!(" on {target}")
    }
}

/// The table printed after a run.
pub fn summary_table(report: &RunReport) -> String {
    let width = report
        .steps
        .iter()
        .map(|s| s.id.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!(
        "{:<width$}  {:<9}  {:>8}  {:>8}  NOTE\n",
        "STEP", "STATUS", "ATTEMPTS", "DURATION"
    );
    for s in &report.steps {
        let note = s.reason.as_deref().unwrap_or("");
        let duration = if s.attempts == 0 {
            "-".to_owned()
        } else {
            format_duration(s.duration)
        };
        out.push_str(&format!(
            "{:<width$}  {:<9}  {:>8}  {:>8}  {note}\n",
            s.id,
            s.status.as_str(),
            s.attempts,
            duration
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_colours_reach_the_terminal() {
        // Colours pass as they are.
        let red = "\x1b[31mred\x1b[0m \x1b[1;38;5;208mbold\x1b[m";
        assert_eq!(terminal_safe(red), red);
        // A title change (OSC 0, BEL- and ST-terminated), a hyperlink, a clipboard write.
        assert_eq!(terminal_safe("\x1b]0;pwned\x07after"), "^[]0;pwned^Gafter");
        assert_eq!(terminal_safe("\x1b]2;t\x1b\\x"), "^[]2;t^[\\x");
        assert_eq!(terminal_safe("\x1b]52;c;aGk=\x07"), "^[]52;c;aGk=^G");
        // Cursor movement, screen clear, a private mode, a lone ESC, 8-bit CSI.
        assert_eq!(terminal_safe("a\x1b[2J\x1b[Hb"), "a^[[2J^[[Hb");
        assert_eq!(terminal_safe("\x1b[?1049h\x1b[5A"), "^[[?1049h^[[5A");
        assert_eq!(terminal_safe("x\x1bcy"), "x^[cy");
        assert_eq!(terminal_safe("\u{9b}2J"), "\\u{9b}2J");
        // Carriage returns: a CRLF line end goes, one inside a line would overwrite it.
        assert_eq!(terminal_safe("done\r"), "done");
        assert_eq!(terminal_safe("10%\r20%"), "10%^M20%");
        assert_eq!(terminal_safe("tab\tok\x08\x00"), "tab\tok^H^@");
        assert_eq!(terminal_safe("plain ✓ text"), "plain ✓ text");
    }

    #[test]
    fn a_wait_prints_changes_and_a_still_waiting_line_every_30_seconds() {
        let mut p = Polling::new();
        let t0 = p.started;
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(p.failed("refused", at(0)).as_deref(), Some(""));
        assert_eq!(p.failed("refused", at(5)), None);
        assert!(p.quiet);
        assert_eq!(p.failed("refused", at(10)), None);
        // Another failure is shown at once.
        assert_eq!(p.failed("status 503", at(12)).as_deref(), Some(""));
        assert!(!p.quiet);
        assert_eq!(p.failed("status 503", at(20)), None);
        let line = p.failed("status 503", at(45)).expect("30 s passed");
        assert!(line.contains("still waiting after 45.0s"), "{line}");
        assert!(line.contains("1 more like it not shown"), "{line}");
    }
}
