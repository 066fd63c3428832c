//! What a manifest says, in words for people: durations, outcomes, attempts per target, when
//! the run ended, and text made safe to show (escape sequences removed, controls visible).
//! Shared by the report, the JUnit file and the metrics.

use chrono::{DateTime, Utc};
use runbook_engine::event::AttemptOutcome;

use crate::manifest::{AttemptRecord, Manifest, StepRecord};

/// What [`safe_text`] does with escape sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escapes {
    /// Removed whole (CSI, OSC, two-character escapes), and carriage returns dropped: for
    /// the report, the JUnit file and metrics labels, where no terminal interprets them.
    Strip,
    /// SGR colour sequences (`ESC [ … m`) pass; every other escape is shown, not obeyed
    /// (`^[` then its characters), and a carriage return is shown as `^M` unless it ends a
    /// line: for the operator's terminal.
    KeepColour,
}

/// Text safe to show: escape sequences treated as `escapes` says; tab and newline pass; other
/// C0 controls and DEL in caret notation like `cat -v` (`^G`, `^?`); C1 controls (U+0080 to
/// U+009F, which some terminals obey as escapes, such as U+009B for CSI) as `\u{9b}`;
/// noncharacters U+FFFE/U+FFFF as U+FFFD. The one rule for text from runs shown to people,
/// in the terminal and in every file made for reading.
pub fn safe_text(text: &str, escapes: Escapes) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\x1b' if escapes == Escapes::KeepColour => {
                if let Some(len) = sgr_len(&text[i..]) {
                    out.push_str(&text[i..i + len]);
                    while chars.peek().is_some_and(|&(j, _)| j < i + len) {
                        chars.next();
                    }
                } else {
                    out.push_str("^[");
                }
            }
            '\x1b' => match chars.peek().map(|&(_, n)| n) {
                // CSI: ESC [ parameters… final byte 0x40–0x7E
                Some('[') => {
                    chars.next();
                    for (_, c) in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: ESC ] … BEL or ESC \
                Some(']') => {
                    chars.next();
                    while let Some((_, c)) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' {
                            if chars.peek().is_some_and(|&(_, n)| n == '\\') {
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
            '\r' if escapes == Escapes::Strip => {}
            '\r' if chars.peek().is_none_or(|&(_, n)| n == '\n') => {}
            '\0'..='\x1f' | '\x7f' => {
                out.push('^');
                out.push(char::from((c as u8) ^ 0x40));
            }
            '\u{80}'..='\u{9f}' => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            '\u{fffe}' | '\u{ffff}' => out.push('\u{fffd}'),
            _ => out.push(c),
        }
    }
    out
}

/// [`safe_text`] for files made for reading (report, JUnit, metrics).
pub(crate) fn clean_text(s: &str) -> String {
    safe_text(s, Escapes::Strip)
}

/// The length of the SGR sequence (`ESC [ params m`) `text` starts with, if it starts with one.
fn sgr_len(text: &str) -> Option<usize> {
    let rest = text.strip_prefix("\x1b[")?;
    let params = rest
        .bytes()
        .take_while(|b| b.is_ascii_digit() || matches!(b, b';' | b':'))
        .count();
    (rest.as_bytes().get(params) == Some(&b'm')).then_some(2 + params + 1)
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

pub(crate) fn secs_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(0) as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_text_strips_escapes_and_shows_controls() {
        assert_eq!(clean_text("a\x1b[1;31mred\x1b[0m b"), "ared b");
        assert_eq!(clean_text("\x1b]0;title\x07x"), "x");
        assert_eq!(clean_text("t\tn\r\x00\x08\x7f"), "t\tn^@^H^?");
        assert_eq!(clean_text("\u{fffe}"), "\u{fffd}");
        assert_eq!(clean_text("a\x1bcb"), "ab");
    }

    /// C1 controls are escapes to some terminals (U+009B is CSI): no output made for people
    /// carries them raw, whatever it is made for.
    #[test]
    fn c1_controls_are_shown_not_passed_in_every_mode() {
        for escapes in [Escapes::Strip, Escapes::KeepColour] {
            assert_eq!(safe_text("\u{9b}2J x\u{85}", escapes), "\\u{9b}2J x\\u{85}");
            assert_eq!(safe_text("bell\x07", escapes), "bell^G");
            assert_eq!(safe_text("\u{ffff}", escapes), "\u{fffd}");
        }
    }

    #[test]
    fn the_terminal_keeps_colour_and_shows_other_escapes() {
        let mode = Escapes::KeepColour;
        assert_eq!(
            safe_text("\x1b[1;31mred\x1b[0m", mode),
            "\x1b[1;31mred\x1b[0m"
        );
        assert_eq!(safe_text("\x1b]0;t\x07x", mode), "^[]0;t^Gx");
        assert_eq!(safe_text("10%\r20%\r", mode), "10%^M20%");
        assert_eq!(safe_text("10%\r20%\r", Escapes::Strip), "10%20%");
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
}
