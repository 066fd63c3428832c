//! Expressions as the executor evaluates them: the `steps`/`run` scope, conditions that must
//! be booleans, hooks, and failure messages that point at the expression's position.

#[allow(clippy::wildcard_imports)]
use super::*;

/// `run` as expressions see it; `status` appears once the run has one (in `after_run`).
pub(super) fn run_map(plan: &Plan, run: &RunInfo, status: Option<RunStatus>) -> Map {
    let mut m = Map::new();
    m.insert("id".into(), run.id.clone().into());
    m.insert("runbook".into(), plan.runbook.meta.name.clone().into());
    m.insert(
        "started_at".into(),
        run.started_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            .into(),
    );
    if let Some(s) = status {
        m.insert("status".into(), s.as_str().into());
    }
    m
}

/// Puts the results of `which` (those finished) into the scope as `steps`.
pub(super) fn push_steps(scope: &mut Scope<'_>, plan: &Plan, results: &Results, which: &[StepIdx]) {
    let mut steps = Map::new();
    if let Ok(r) = results.lock() {
        for &i in which {
            if let Some(m) = &r[i] {
                steps.insert(
                    plan.runbook.steps[i].id.as_str().into(),
                    Dynamic::from_map(m.clone()),
                );
            }
        }
    }
    scope.push_constant("steps", steps);
}

#[allow(clippy::too_many_arguments)]
pub(super) fn record_result(
    results: &Results,
    i: StepIdx,
    step: &StepSpec,
    status: StepStatus,
    attempts: u32,
    duration: Duration,
    output: Option<&Map>,
    reason: Option<&str>,
) {
    let mut m = output.cloned().unwrap_or_default();
    m.remove("attempt");
    m.insert("id".into(), step.id.as_str().into());
    m.insert("status".into(), status.as_str().into());
    m.insert("attempts".into(), Dynamic::from_int(i64::from(attempts)));
    m.insert(
        "duration".into(),
        Dynamic::from_float(duration.as_secs_f64()),
    );
    m.insert(
        "reason".into(),
        reason.map_or(Dynamic::UNIT, |r| r.to_owned().into()),
    );
    for key in ["exit_code", "stdout", "stderr", "json"] {
        m.entry(key.into()).or_insert(Dynamic::UNIT);
    }
    m.entry("outputs".into())
        .or_insert_with(|| Dynamic::from_map(Map::new()));
    if let Ok(mut r) = results.lock() {
        r[i] = Some(m);
    }
}

/// Describes an expression failure with the file position of the expression.
pub(super) fn expr_failure(
    plan: &Plan,
    state: &RunState,
    what: &str,
    e: &SpannedExpr,
    err: &EvalError,
) -> String {
    if err.failed {
        return state.redact(&err.message);
    }
    let loc =
        e.at.describe(&plan.runbook.source, &e.expr.text, err.line, err.column);
    let shown = shown_text(e);
    state.redact(&format!("{what}{shown} failed at {loc}: {}", err.message))
}

/// `` `text` `` of a short one-line expression, to quote in a message; nothing for a long one
/// (its position is given instead).
pub(super) fn shown_text(e: &SpannedExpr) -> String {
    let text = e.expr.text.trim();
    if text.lines().count() > 1 || text.len() > 60 {
        String::new()
    } else {
        format!(" `{text}`")
    }
}

/// The value of a condition (`when`, `until`, `check`, `gate`) as a boolean. An evaluation
/// error, or a value that is not a boolean, is a message naming the condition, its text and
/// where it is written.
pub(super) fn condition(
    plan: &Plan,
    state: &RunState,
    what: &str,
    e: &SpannedExpr,
    value: Result<Dynamic, EvalError>,
) -> Result<bool, String> {
    let value = value.map_err(|err| expr_failure(plan, state, what, e, &err))?;
    truthy(&value).map_err(|got| {
        let loc =
            e.at.describe(&plan.runbook.source, &e.expr.text, None, None);
        let shown = shown_text(e);
        state.redact(&format!(
            "{what}{shown} at {loc} must be true or false; {got}"
        ))
    })
}

/// Runs a hook script; `Err` carries a message for people.
#[allow(clippy::too_many_arguments)] // the hook, its scope and where its effects go
pub(super) async fn run_hook(
    host: &ExprHost,
    plan: &Plan,
    state: &RunState,
    events: &mpsc::Sender<RunEvent>,
    what: &str,
    hook: &SpannedExpr,
    scope: &mut Scope<'_>,
    step: Option<&StepSpec>,
) -> Result<Dynamic, String> {
    let (result, effects) = host.eval_with_effects(&hook.expr, scope);
    apply_effects(state, events, step, effects).await;
    result
        .map_err(|err| {
            let message = expr_failure(plan, state, &format!("`{what}` hook"), hook, &err);
            message
        })
        .inspect_err(|message| {
            let _ = events.try_send(RunEvent::Note {
                at: Utc::now(),
                message: message.clone(),
            });
        })
}
