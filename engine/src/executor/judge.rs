//! Whether an attempt that exited 0 succeeded: `capture`, `until`, `check`, `outputs`, `after`.

#[allow(clippy::wildcard_imports)]
use super::*;

impl StepTask {
    /// After an attempt that exited 0: capture, `until`, `check`, `outputs`, `after`. Returns
    /// the step's outputs, or the outcome that replaces success.
    pub(super) async fn judge(
        &self,
        spec: &StepSpec,
        host: Option<&Arc<Host>>,
        run: &mut AttemptRun,
    ) -> Result<Option<Map>, AttemptOutcome> {
        let step = self.step();
        let fail = |failure, message: String| AttemptOutcome::Failed { failure, message };
        if spec.capture == Capture::Json {
            let stdout = display_value(run.output.get("stdout").unwrap_or(&Dynamic::UNIT));
            if run.counts.stdout as usize > stdout.len() {
                return Err(fail(FailureKind::Capture, format!(
                    "`capture = \"json\"`: stdout ({} bytes) is larger than the {} bytes kept for expressions",
                    run.counts.stdout,
                    stdout.len()
                )));
            }
            match serde_json::from_str::<serde_json::Value>(&stdout) {
                Ok(v) => {
                    run.output
                        .insert("json".into(), crate::expr::json_to_dynamic(&v));
                }
                Err(e) => {
                    return Err(fail(
                        FailureKind::Capture,
                        format!("`capture = \"json\"`: stdout is not JSON ({e})"),
                    ));
                }
            }
        } else {
            // An HTTP step's parsed body (from the runner's details) stays.
            run.output.entry("json".into()).or_insert(Dynamic::UNIT);
        }
        let mut scope = self.scope(host);
        scope.push_constant("output", Dynamic::from_map(run.output.clone()));
        let eval = |e: &SpannedExpr, scope: &mut Scope<'static>| {
            self.host.eval_with_effects(&e.expr, scope)
        };

        // `until` false is retried (the polling idiom); `check` false is final.
        let conditions = [
            (
                &spec.until,
                "`until`",
                FailureKind::Until,
                "`until` is still false",
            ),
            (&spec.check, "`check`", FailureKind::Check, "check failed"),
        ];
        for (cond, what, kind, when_false) in conditions {
            let Some(cond) = cond else { continue };
            let (value, effects) = eval(cond, &mut scope);
            apply_effects(&self.state, &self.events, Some(step), effects).await;
            match condition(&self.plan, &self.state, what, cond, value) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(fail(
                        kind,
                        format!("{when_false}: {}", cond.expr.text.trim()),
                    ))
                }
                Err(m) => return Err(fail(FailureKind::Check, m)),
            }
        }
        let mut outputs = run.script_outputs.take();
        for (name, e) in &spec.outputs {
            let (value, effects) = eval(e, &mut scope);
            apply_effects(&self.state, &self.events, Some(step), effects).await;
            match value {
                Ok(v) => {
                    outputs
                        .get_or_insert_with(Map::new)
                        .insert(name.as_str().into(), v);
                }
                Err(err) => {
                    return Err(fail(
                        FailureKind::Hook,
                        expr_failure(
                            &self.plan,
                            &self.state,
                            &format!("`outputs.{name}`"),
                            e,
                            &err,
                        ),
                    ))
                }
            }
        }
        if let Some(after) = &spec.after {
            let mut o = run.output.clone();
            if let Some(outs) = &outputs {
                o.insert("outputs".into(), Dynamic::from_map(outs.clone()));
            }
            scope.push_constant("output", o);
            let (value, effects) = eval(after, &mut scope);
            apply_effects(&self.state, &self.events, Some(step), effects).await;
            if let Err(err) = value {
                return Err(fail(
                    FailureKind::Hook,
                    expr_failure(&self.plan, &self.state, "`after` hook", after, &err),
                ));
            }
        }
        Ok(outputs)
    }
}
