//! One step's lifecycle as a task: `when`, `approve`, the before/after hooks, then its
//! attempts — locally, or on hosts through [`super::fan_out`].

#[allow(clippy::wildcard_imports)]
use super::*;

impl StepTask {
    pub(super) fn step(&self) -> &StepSpec {
        &self.plan.runbook.steps[self.index]
    }

    /// The scope for this step's expressions: params, run, env and the steps it reads.
    pub(super) fn scope(&self, host: Option<&Arc<Host>>) -> Scope<'static> {
        let mut scope = self.state.scope(&self.plan, &self.run);
        scope.push_constant(
            "host",
            host.map_or(Dynamic::UNIT, |h| {
                crate::expr::json_to_dynamic(&h.to_json())
            }),
        );
        push_steps(
            &mut scope,
            &self.plan,
            &self.results,
            &self.plan.step_refs[self.index],
        );
        scope.push_constant(
            "block",
            self.block.clone().map_or(Dynamic::UNIT, Dynamic::from_map),
        );
        scope
    }

    /// The scope for the run-wide step hooks, with `step` describing this step.
    pub(super) fn hook_scope(&self, step_map: Map, output: Option<&Map>) -> Scope<'static> {
        let mut scope = self.state.scope(&self.plan, &self.run);
        scope.push_constant("host", Dynamic::UNIT);
        let mut which = self.plan.hook_refs.clone();
        which.extend(self.plan.step_refs[self.index].iter().copied());
        push_steps(&mut scope, &self.plan, &self.results, &which);
        scope.push_constant("step", step_map);
        scope.push_constant(
            "output",
            output.cloned().map_or(Dynamic::UNIT, Dynamic::from_map),
        );
        scope
    }

    pub(super) fn step_map(&self) -> Map {
        let step = self.step();
        let mut m = Map::new();
        m.insert("id".into(), step.id.as_str().into());
        m.insert(
            "phase".into(),
            step.phase.clone().map_or(Dynamic::UNIT, Into::into),
        );
        m.insert(
            "title".into(),
            step.title.clone().map_or(Dynamic::UNIT, Into::into),
        );
        m.insert("status".into(), "running".into());
        m
    }

    pub(super) async fn run(self) -> StepResult {
        let step = self.step();
        let result = self.run_inner().await;
        let output = self.results.lock().ok().and_then(|r| r[self.index].clone());
        // Store what downstream expressions see, then run the after/failure hooks with it.
        let last_output = output.clone();
        record_result(
            &self.results,
            self.index,
            step,
            result.status,
            result.attempts,
            result.duration,
            last_output.as_ref(),
            result.reason.as_deref(),
        );
        let mut result = result;
        if result.skipped_by_when {
            return result;
        }
        let hooks = &self.plan.runbook.hooks;
        let recorded = self
            .results
            .lock()
            .ok()
            .and_then(|r| r[self.index].clone())
            .unwrap_or_default();
        for (name, hook, applies) in [
            ("after_step", &hooks.after_step, true),
            (
                "on_failure",
                &hooks.on_failure,
                result.status == StepStatus::Failed,
            ),
        ] {
            if let (Some(hook), true) = (hook, applies) {
                let mut scope = self.hook_scope(recorded.clone(), last_output.as_ref());
                if let Err(message) = run_hook(
                    &self.host,
                    &self.plan,
                    &self.state,
                    &self.events,
                    name,
                    hook,
                    &mut scope,
                    Some(step),
                )
                .await
                {
                    if result.status == StepStatus::Succeeded {
                        result.status = StepStatus::Failed;
                        result.reason = Some(message);
                    }
                }
            }
        }
        result
    }

    #[allow(clippy::too_many_lines)]
    pub(super) async fn run_inner(&self) -> StepResult {
        let step = self.step();
        let finish = |status, attempts, reason: Option<String>| StepResult {
            status,
            attempts,
            duration: self.time_since_start(),
            reason,
            outputs: None,
            skipped_by_when: false,
            deferred: false,
            targets: Vec::new(),
        };

        if let Some(when) = &step.when {
            let (value, effects) = self
                .host
                .eval_with_effects(&when.expr, &mut self.scope(None));
            apply_effects(&self.state, &self.events, Some(step), effects).await;
            match condition(&self.plan, &self.state, "`when`", when, value) {
                Ok(true) => {}
                Ok(false) => {
                    return StepResult {
                        skipped_by_when: true,
                        ..finish(
                            StepStatus::Skipped,
                            0,
                            Some(format!("`when` was false: {}", when.expr.text.trim())),
                        )
                    };
                }
                Err(message) => return finish(StepStatus::Failed, 0, Some(message)),
            }
        }
        if let Some(question) = &step.approve {
            let pre = self
                .plan
                .approved
                .iter()
                .find(|(id, _)| id == step.id.as_str())
                .map(|(_, by)| by.clone());
            let answer = match pre {
                Some(by) => Approval::Granted { by },
                None => tokio::select! {
                    a = self.approver.ask(&step.id, question) => a,
                    () = self.cancel.cancelled() => {
                        return finish(StepStatus::Skipped, self.plan.prior[self.index].attempts, Some("not started: the run was cancelled while asking for approval".into()));
                    }
                },
            };
            let (granted, by) = match answer {
                Approval::Granted { by } => (true, by),
                Approval::Refused { by } => (false, by),
                Approval::Deferred => {
                    return StepResult {
                        deferred: true,
                        ..finish(
                            StepStatus::Skipped,
                            self.plan.prior[self.index].attempts,
                            Some(format!(
                                "awaiting approval: {question} (continue with `runbook resume BUNDLE --approve {}`)",
                                step.id
                            )),
                        )
                    };
                }
            };
            emit(
                &self.events,
                RunEvent::Approval {
                    at: Utc::now(),
                    step: step.id.clone(),
                    by: by.clone(),
                    granted,
                },
            )
            .await;
            if !granted {
                return finish(
                    StepStatus::Failed,
                    self.plan.prior[self.index].attempts,
                    Some(format!("approval refused by {by}")),
                );
            }
        }
        for (name, hook, global) in [
            ("before_step", &self.plan.runbook.hooks.before_step, true),
            ("before", &step.before, false),
        ] {
            if let Some(hook) = hook {
                let mut scope = if global {
                    self.hook_scope(self.step_map(), None)
                } else {
                    self.scope(None)
                };
                if !global {
                    scope.push_constant("step", self.step_map());
                    scope.push_constant("output", Dynamic::UNIT);
                }
                if let Err(message) = run_hook(
                    &self.host,
                    &self.plan,
                    &self.state,
                    &self.events,
                    name,
                    hook,
                    &mut scope,
                    Some(step),
                )
                .await
                {
                    return finish(StepStatus::Failed, 0, Some(message));
                }
            }
        }

        // Attempts of an earlier (resumed) run keep their numbers and logs.
        let offset = self.plan.prior[self.index].attempts;
        if self.plan.dry_run && step.plan.is_none() {
            return StepResult {
                skipped_by_when: true,
                ..finish(
                    StepStatus::Skipped,
                    offset,
                    Some("dry run: not run (the step has no `plan` command)".into()),
                )
            };
        }
        match &step.on {
            None => {
                let t = self
                    .run_target(step, Arc::from("local"), None, false, offset)
                    .await;
                self.store(t.output.clone());
                let outputs = t.outputs_json(&self.state);
                StepResult {
                    outputs,
                    ..finish(t.status, t.attempts, t.reason)
                }
            }
            Some((selector, _)) => {
                let mut r = self.fan_out(step, selector, offset).await;
                r.duration = self.time_since_start();
                r
            }
        }
    }

    /// How long the step has been running: from its first attempt's start, so that waiting
    /// for a slot, a `when` or an approval does not count; zero if no attempt started.
    pub(super) fn time_since_start(&self) -> Duration {
        self.step_started
            .get()
            .map_or(Duration::ZERO, Instant::elapsed)
    }

    /// Stores what downstream expressions see as `steps.<id>` (before the step's record).
    pub(super) fn store(&self, output: Option<Map>) {
        if let (Some(o), Ok(mut r)) = (output, self.results.lock()) {
            r[self.index] = Some(o);
        }
    }
}
