//! A `[drill]`'s objectives (RTO, RPO) measured against the run's clock.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A drill's objectives against what the run measured. The clock runs from the first start
/// to the first stop after it; the RPO is the restored data's age when the clock started.
pub(super) fn measure_drill(
    host: &ExprHost,
    plan: &Plan,
    state: &RunState,
    spec: &crate::runbook::DrillSpec,
    scope: &mut Scope<'_>,
    status: RunStatus,
    run_started: chrono::DateTime<Utc>,
) -> crate::event::DrillReport {
    use crate::event::{DrillReport, Objective, Verdict};
    let clock = state.clock_marks();
    let start_mark = clock.iter().find(|c| c.start).copied();
    let stop_mark = start_mark.and_then(|st| {
        clock
            .iter()
            .find(|c| !c.start && c.instant >= st.instant)
            .copied()
    });
    let started = start_mark.map(|c| c.at);
    let stopped = stop_mark.map(|c| c.at);
    let judge = |target: Duration, measured: Result<f64, String>| -> Objective {
        let target_seconds = target.as_secs_f64();
        match measured {
            Ok(m) => Objective {
                target_seconds,
                measured_seconds: Some((m * 1000.0).round() / 1000.0),
                verdict: if m <= target_seconds {
                    Verdict::Pass
                } else {
                    Verdict::Fail
                },
                why: (m > target_seconds).then(|| {
                    format!(
                        "{} over the target",
                        crate::duration::format_spec(Duration::from_secs_f64(m - target_seconds))
                    )
                }),
            },
            Err(why) => Objective {
                target_seconds,
                measured_seconds: None,
                verdict: Verdict::NotMeasured,
                why: Some(why),
            },
        }
    };
    let rto = spec.rto.map(|target| {
        let measured = match (start_mark, stop_mark) {
            (Some(a), Some(b)) => Ok((b.instant - a.instant).as_secs_f64()),
            (None, _) => Err(match &spec.clock_start {
                Some(n) => format!("the clock never started: `{}` did not start", n.id),
                None => {
                    "the clock never started: no `clock_start` step and no `drill.start_clock()`"
                        .into()
                }
            }),
            (Some(_), None) => Err(match &spec.clock_stop {
                Some(n) => format!(
                    "the clock never stopped: `{}` did not succeed (run {})",
                    n.id,
                    status.as_str()
                ),
                None => "the clock never stopped: no `clock_stop` step and no `drill.stop_clock()`"
                    .into(),
            }),
        };
        judge(target, measured)
    });
    let mut restored_at = None;
    let rpo = spec.rpo.map(|target| {
        let measured = match &spec.restored_data_time {
            None => Err("no `restored_data_time` expression".to_owned()),
            Some(e) => {
                let (value, _) = host.eval_with_effects(&e.expr, scope);
                match value {
                    Err(err) => Err(expr_failure(plan, state, "`restored_data_time`", e, &err)),
                    Ok(v) if v.is_unit() => Err("`restored_data_time` gave no value (the step that reports it did not run?)".to_owned()),
                    Ok(v) => {
                        let text = display_value(&v);
                        match crate::expr::parse_timestamp(&text) {
                            None => Err(format!(
                                "`restored_data_time` gave `{text}`, not an RFC 3339 time or Unix seconds"
                            )),
                            Some(t) => {
                                restored_at = chrono::DateTime::from_timestamp_millis((t * 1000.0) as i64);
                                // The data's age when the disaster was declared; the
                                // wall clock is all a timestamp from elsewhere can be
                                // compared with.
                                let reference = started.unwrap_or(run_started);
                                Ok(reference.timestamp_millis() as f64 / 1000.0 - t)
                            }
                        }
                    }
                }
            }
        };
        judge(target, measured)
    });
    let verdicts: Vec<Verdict> = [&rto, &rpo]
        .into_iter()
        .flatten()
        .map(|o| o.verdict)
        .collect();
    let verdict = if verdicts.contains(&Verdict::Fail) {
        Verdict::Fail
    } else if verdicts.contains(&Verdict::NotMeasured) || verdicts.is_empty() {
        Verdict::NotMeasured
    } else {
        Verdict::Pass
    };
    DrillReport {
        rto,
        rpo,
        verdict,
        clock_started_at: started,
        clock_stopped_at: stopped,
        restored_data_time: restored_at,
    }
}
