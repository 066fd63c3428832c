//! The timeline: one row per step (per target when a step ran on several), one bar per attempt
//! on a shared time axis, so that retries, waits and overlaps can be seen at a glance. Plain
//! HTML and CSS positioning: it prints, and needs no script.

use chrono::{DateTime, Utc};
use maud::{html, Markup};

use super::{
    anchor, attempt_class, attempt_outcome_text, fmt_clock, fmt_time, plural, status_class,
    step_status_str,
};
use crate::manifest::{AttemptRecord, Manifest, StepRecord};
use crate::run_view::{attempts_by_target, clean_text, fmt_duration, secs_between};

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

/// Positions on the track: percentages of the run from its start to `end`.
struct Axis {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    total: f64,
    ticks: Vec<f64>,
}

impl Axis {
    fn pct(&self, t: DateTime<Utc>) -> f64 {
        (secs_between(self.start, t) / self.total * 100.0).clamp(0.0, 100.0)
    }
}

pub(super) fn timeline(m: &Manifest, end: DateTime<Utc>) -> Markup {
    let total = secs_between(m.started_at, end).max(1e-3);
    let step = tick_step(total, 6.0);
    let mut ticks = Vec::new();
    let mut t = 0.0;
    while t <= total * 1.0001 {
        ticks.push(t);
        t += step;
    }
    let axis = Axis {
        start: m.started_at,
        end,
        total,
        ticks,
    };
    html! {
        section id="timeline" {
            "\n"
            h2 {
                "Timeline "
                span class="dim small" { "from " (fmt_time(m.started_at)) " · total " (fmt_duration(total)) }
            }
            "\n"
            div class="gantt" {
                "\n"
                div class="glabel gaxis-label" {}
                div class="gtrack gaxis" {
                    @for t in &axis.ticks {
                        @let p = t / total * 100.0;
                        span class=(if p > 92.0 { "tick tick-end" } else { "tick" }) style=(format!("left:{p:.3}%")) {
                            (fmt_offset(*t))
                        }
                    }
                }
                "\n"
                @for s in &m.steps {
                    (step_rows(s, &axis))
                }
            }
            "\n"
            div class="legend" {
                span { i class="g-ok" {} "succeeded" }
                span { i class="g-fail" {} "failed" }
                span { i class="g-warn" {} "timed out / unfinished" }
                span { i class="g-cancel" {} "cancelled" }
                span class="dim" { "one bar per attempt; gaps between bars are retry delays" }
            }
            "\n"
        }
        "\n"
    }
}

/// A step's rows: one per target when it ran on several (they overlap in time).
fn step_rows(s: &StepRecord, axis: &Axis) -> Markup {
    let targets = attempts_by_target(s);
    let rows: Vec<(Option<String>, Vec<&AttemptRecord>)> = if targets.len() > 1 {
        targets.into_iter().map(|(t, a)| (Some(t), a)).collect()
    } else {
        vec![(None, s.attempts.iter().collect())]
    };
    html! {
        @for (target, attempts) in &rows {
            (row(s, target.as_deref(), attempts, axis))
        }
    }
}

fn row(s: &StepRecord, target: Option<&str>, attempts: &[&AttemptRecord], axis: &Axis) -> Markup {
    let st = step_status_str(s);
    html! {
        div class="glabel" {
            a href={ "#" (anchor(&s.id)) } { (s.id) }
            @match (target, &s.phase) {
                (Some(t), _) => span class="gphase" { "@" (t) },
                (None, Some(p)) => span class="gphase" { (p) },
                (None, None) => {},
            }
        }
        div class="gtrack" {
            @for t in &axis.ticks {
                i class="grid" style=(format!("left:{:.3}%", t / axis.total * 100.0)) {}
            }
            @if attempts.is_empty() {
                span class="gnote" {
                    (st)
                    @if let Some(r) = &s.reason { " — " (clean_text(r)) }
                }
            }
            @for a in attempts {
                (bar(s, a, attempts.len(), axis))
            }
            @if let Some(last) = attempts.last() {
                (bar_label(s, target, last, attempts, axis))
            }
        }
        "\n"
    }
}

fn bar(s: &StepRecord, a: &AttemptRecord, of: usize, axis: &Axis) -> Markup {
    let start = axis.pct(a.started_at);
    let stop = axis.pct(a.finished_at.unwrap_or(axis.end));
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
    let style = format!("left:{start:.3}%;width:{:.3}%", (stop - start).max(0.0));
    html! {
        span class={ "bar g-" (attempt_class(a)) } style=(style) title=(clean_text(&tip)) {
            @if of > 1 && stop - start > 4.0 { (a.attempt) }
        }
    }
}

/// Per target: how its last attempt ended; per step: the step's status.
fn bar_label(
    s: &StepRecord,
    target: Option<&str>,
    last: &AttemptRecord,
    attempts: &[&AttemptRecord],
    axis: &Axis,
) -> Markup {
    let st = step_status_str(s);
    let (state, class, secs) = match target {
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
            plural(attempts.len()),
            fmt_duration(secs)
        )
    };
    let bars: Vec<(f64, f64)> = attempts
        .iter()
        .map(|a| {
            (
                axis.pct(a.started_at),
                axis.pct(a.finished_at.unwrap_or(axis.end)),
            )
        })
        .collect();
    let style = label_position(&bars, label.chars().count());
    html! {
        span class={ "glab t-" (class) } style=(style) { (clean_text(&label)) }
    }
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
