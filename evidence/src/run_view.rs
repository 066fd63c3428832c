//! What a manifest says, in words for people: durations, outcomes, attempts per target, when
//! the run ended, and text made safe to show (escape sequences removed, controls visible).
//! Shared by the report, the JUnit file and the metrics.

use chrono::{DateTime, Utc};
use runbook_engine::event::AttemptOutcome;

use crate::manifest::{AttemptRecord, Manifest, StepRecord};

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
