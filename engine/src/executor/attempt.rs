//! Attempts and retries on one target: slots, the retry policy with its deadline, one
//! attempt of a step's action handed to the [`StepRunner`](crate::runner::StepRunner).

#[allow(clippy::wildcard_imports)]
use super::*;

impl StepTask {
    /// The attempts of one step (or block sub-step) on one target, with retries.
    #[allow(clippy::too_many_lines)]
    pub(super) async fn run_target(
        &self,
        spec: &StepSpec,
        target: Target,
        host: Option<&Arc<Host>>,
        remote: bool,
        offset: u32,
    ) -> TargetRun {
        let step = self.step();
        let mut first_attempt: Option<Instant> = None;
        let mut attempts = offset;
        let mut last_failure: Option<String> = None;
        let mut last_output: Option<Map> = None;
        let mut cwd_for_collect = self.plan.workdir.clone();
        let max = offset + spec.retry.attempts;
        let end = |status, attempts, reason: Option<String>, output: Option<Map>| TargetRun {
            status,
            attempts,
            reason,
            output,
            outputs: None,
        };
        // Hosts share `--forks`; a local step takes a slot of `--parallel`.
        let slots = if host.is_some() {
            &self.forks
        } else {
            &self.semaphore
        };
        for attempt in offset + 1..=max {
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.ok(),
                () = self.cancel.cancelled() => None,
            };
            if self.cancel.is_cancelled() || permit.is_none() {
                if attempts > offset {
                    self.collect(spec, host, &cwd_for_collect).await;
                }
                let r = self.stopped(
                    attempts,
                    offset,
                    "cancelled",
                    StepStatus::Cancelled,
                    last_failure,
                );
                return end(r.status, r.attempts, r.reason, last_output);
            }
            if let (Some(why), false) = (self.halted.get(), step.always) {
                if attempts > offset {
                    self.collect(spec, host, &cwd_for_collect).await;
                }
                let r = self.stopped(attempts, offset, why, StepStatus::Failed, last_failure);
                return end(r.status, r.attempts, r.reason, last_output);
            }
            if self.step_started.set(Instant::now()).is_ok() {
                let is_clock_start = self
                    .plan
                    .runbook
                    .drill
                    .as_ref()
                    .and_then(|d| d.clock_start.as_ref())
                    .is_some_and(|n| n.id == step.id);
                if is_clock_start {
                    self.state.clock(true, Utc::now());
                    emit(
                        &self.events,
                        RunEvent::Clock {
                            at: Utc::now(),
                            start: true,
                            step: Some(step.id.clone()),
                        },
                    )
                    .await;
                }
                emit(
                    &self.events,
                    RunEvent::StepStarted {
                        at: Utc::now(),
                        step: step.id.clone(),
                    },
                )
                .await;
            }
            attempts = attempt;
            let attempt_start = Instant::now();
            // The retry deadline counts from the first attempt, not from the wait for a slot.
            first_attempt.get_or_insert(attempt_start);
            let mut run = self
                .attempt(
                    spec,
                    attempt,
                    max,
                    &target,
                    host,
                    remote,
                    &mut cwd_for_collect,
                )
                .await;
            let mut outputs = None;
            if run.outcome.succeeded() {
                match self.judge(spec, host, &mut run).await {
                    Ok(o) => outputs = o,
                    Err(outcome) => run.outcome = outcome,
                }
            }
            drop(permit);
            let duration = attempt_start.elapsed();
            run.output.insert(
                "duration".into(),
                Dynamic::from_float(duration.as_secs_f64()),
            );
            emit(
                &self.events,
                RunEvent::AttemptFinished {
                    at: Utc::now(),
                    step: step.id.clone(),
                    target: target.clone(),
                    attempt,
                    duration,
                    outcome: run.outcome.clone(),
                    output: run.counts,
                    details: run.details.clone(),
                    outputs: outputs.as_ref().map(|o| outputs_json(o, &self.state)),
                },
            )
            .await;
            last_output = Some(run.output.clone());
            if run.outcome.succeeded() {
                self.collect(spec, host, &cwd_for_collect).await;
                if let Some(o) = &outputs {
                    run.output
                        .insert("outputs".into(), Dynamic::from_map(o.clone()));
                }
                return TargetRun {
                    outputs,
                    ..end(StepStatus::Succeeded, attempts, None, Some(run.output))
                };
            }
            if run.outcome == AttemptOutcome::Cancelled {
                self.collect(spec, host, &cwd_for_collect).await;
                return end(
                    StepStatus::Cancelled,
                    attempts,
                    Some("cancelled while running".into()),
                    last_output,
                );
            }
            last_failure = Some(self.failure_summary(&run));
            if !run.outcome.retryable() || attempt == max {
                break;
            }
            let delay = crate::backoff::delay(&spec.retry, attempt + 1);
            if let Some(deadline) = spec.retry.deadline {
                let since = first_attempt.map_or(Duration::ZERO, |t| t.elapsed());
                if since + delay > deadline {
                    last_failure = Some(format!(
                        "{}; gave up: the retry deadline of {} would pass",
                        last_failure.unwrap_or_default(),
                        crate::duration::format_spec(deadline)
                    ));
                    break;
                }
            }
            emit(
                &self.events,
                RunEvent::RetryScheduled {
                    at: Utc::now(),
                    step: step.id.clone(),
                    target: target.clone(),
                    next_attempt: attempt + 1,
                    delay,
                },
            )
            .await;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.cancel.cancelled() => {
                    self.collect(spec, host, &cwd_for_collect).await;
                    return end(StepStatus::Cancelled, attempts, Some(format!("cancelled while waiting to retry; last attempt: {}", last_failure.unwrap_or_default())), last_output);
                }
            }
        }
        self.collect(spec, host, &cwd_for_collect).await;
        let reason = match (last_failure, attempts) {
            (Some(f), n) if n - offset > 1 => format!("{f} (after {} attempts)", n - offset),
            (Some(f), _) => f,
            (None, _) => "failed".into(),
        };
        end(StepStatus::Failed, attempts, Some(reason), last_output)
    }

    /// Why an attempt failed, for the step's (or host's) reason: the outcome, and for a
    /// command that exited non-zero its last line of output, which is usually the error
    /// (`exit code 1: FAIL os: expected Rocky Linux 9.x; found Debian 12`).
    pub(super) fn failure_summary(&self, run: &AttemptRun) -> String {
        let what = run.outcome.describe();
        if !matches!(run.outcome, AttemptOutcome::Exited { .. }) {
            return what;
        }
        let last_line = |stream: &str| {
            run.output
                .get(stream)
                .and_then(|d| d.clone().into_string().ok())
                .and_then(|text| {
                    let lines: Vec<&str> = text.lines().collect();
                    let n = lines.iter().rposition(|l| !l.trim().is_empty())?;
                    // The end of wrapped base64 is a piece of an encoding, not an error message,
                    // and a piece of a secret's encoding cannot be redacted on its own.
                    if n > 0 && crate::redact::continues_wrapped_base64(lines[n - 1]) {
                        return Some(
                            "(last line not shown: the end of wrapped base64 text)".into(),
                        );
                    }
                    Some(lines[n].trim().chars().take(200).collect::<String>())
                })
        };
        match last_line("stderr").or_else(|| last_line("stdout")) {
            Some(line) => format!("{what}: {}", self.state.redact(&line)),
            None => what,
        }
    }

    /// Runs one attempt of the step's action.
    #[allow(clippy::too_many_lines, clippy::too_many_arguments)]
    pub(super) async fn attempt(
        &self,
        spec: &StepSpec,
        attempt: u32,
        max: u32,
        target: &Target,
        host: Option<&Arc<Host>>,
        remote: bool,
        cwd_for_collect: &mut PathBuf,
    ) -> AttemptRun {
        let step = self.step();
        let mut output = Map::new();
        output.insert("attempt".into(), Dynamic::from_int(i64::from(attempt)));
        let compact = matches!(spec.action, Action::Request { kind, .. } if kind.is_probe())
            && !self.plan.dry_run;
        let started_event = |command: String, cwd: PathBuf, receipt| RunEvent::AttemptStarted {
            at: Utc::now(),
            receipt,
            step: step.id.clone(),
            target: target.clone(),
            attempt,
            max_attempts: max,
            command,
            cwd,
            compact,
        };
        let failed_before_start = |output: Map, failure, message: String| AttemptRun {
            outcome: AttemptOutcome::Failed { failure, message },
            counts: OutputCounts::default(),
            output,
            script_outputs: None,
            details: serde_json::Map::new(),
        };
        // A template that did not render: the attempt is recorded as started (with what it
        // would have run) and failed, before anything ran.
        let not_rendered = |shown: String, output: Map, message: &str| {
            let event = started_event(shown, self.plan.workdir.clone(), Receipt::default());
            let run =
                failed_before_start(output, FailureKind::Template, self.state.redact(message));
            async move {
                emit(&self.events, event).await;
                run
            }
        };
        let mut sink = OutputSink::new(
            self.events.clone(),
            step.id.clone(),
            target.clone(),
            attempt,
        );
        // In `--dry-run`, a step's `plan` command stands in for its action.
        let dry_plan = if self.plan.dry_run {
            spec.plan.as_ref()
        } else {
            None
        };
        let (kind, rendered) = match (&spec.action, dry_plan) {
            (_, Some(plan_cmd)) | (Action::Run { command: plan_cmd }, None) => {
                let mut effects = Effects::default();
                let rendered = self.render(spec, host, plan_cmd, &mut effects);
                apply_effects(&self.state, &self.events, Some(step), effects).await;
                match rendered {
                    Err(message) => {
                        return not_rendered(self.state.redact(plan_cmd.raw()), output, &message)
                            .await;
                    }
                    Ok(r) => (None, r),
                }
            }
            (Action::Request { kind, spec: table }, None) => {
                let mut effects = Effects::default();
                let rendered = self.render_spec(table, host, &mut effects);
                apply_effects(&self.state, &self.events, Some(step), effects).await;
                match rendered {
                    Err(message) => {
                        return not_rendered(
                            format!("{} (settings did not render)", kind.key()),
                            output,
                            &message,
                        )
                        .await;
                    }
                    Ok(value) => (
                        Some(*kind),
                        Rendered {
                            command: kind.describe(&value),
                            env: Vec::new(),
                            cwd: self.plan.workdir.clone(),
                            spec: value,
                        },
                    ),
                }
            }
            (Action::Script { script }, None) => {
                let first = script
                    .expr
                    .text
                    .trim()
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                emit(
                    &self.events,
                    started_event(
                        format!("(rhai) {first}"),
                        self.plan.workdir.clone(),
                        Receipt::default(),
                    ),
                )
                .await;
                let mut scope = self.scope(host);
                let (value, effects) = self.host.eval_with_effects(&script.expr, &mut scope);
                // A script's log lines are its output.
                for line in &effects.logs {
                    sink.write(
                        Stream::Stdout,
                        bytes::Bytes::from(format!("{}\n", self.state.redact(line))),
                    )
                    .await;
                }
                let effects = Effects {
                    logs: Vec::new(),
                    ..effects
                };
                apply_effects(&self.state, &self.events, Some(step), effects).await;
                let (outcome, script_outputs) = match value {
                    Ok(v) => {
                        output.insert("value".into(), v.clone());
                        (AttemptOutcome::Exited { code: 0 }, v.try_cast::<Map>())
                    }
                    Err(e) => (
                        AttemptOutcome::Failed {
                            failure: FailureKind::Script,
                            message: expr_failure(&self.plan, &self.state, "`script`", script, &e),
                        },
                        None,
                    ),
                };
                output.insert(
                    "exit_code".into(),
                    Dynamic::from_int(if outcome.succeeded() { 0 } else { 1 }),
                );
                output.insert("stdout".into(), sink.tail(Stream::Stdout).into());
                output.insert("stderr".into(), "".into());
                return AttemptRun {
                    outcome,
                    counts: sink.counts(),
                    output,
                    script_outputs,
                    details: serde_json::Map::new(),
                };
            }
            (Action::Block { .. }, None) => {
                // Blocks are run sub-step by sub-step in `run_host`; never as one attempt.
                return failed_before_start(
                    output,
                    FailureKind::Config,
                    "a block cannot be run as one attempt".into(),
                );
            }
        };
        cwd_for_collect.clone_from(&rendered.cwd);
        let become_password = match self.render_become(spec, host.filter(|_| remote)) {
            Ok(p) => p,
            Err(message) => {
                return not_rendered(self.state.redact(&rendered.command), output, &message).await;
            }
        };
        // Where it ran is the attempt's target, recorded beside the command.
        let shown = self.state.redact(&rendered.command);
        // Write-ahead: the action starts only once its start is in the journal, so a runner
        // killed at any instant leaves a journal that names everything it started.
        // A remote command runs in the login's home directory on the host, not in this
        // machine's working directory: record that, not a local path.
        let cwd = if remote && host.is_some() {
            PathBuf::from("~")
        } else {
            rendered.cwd.clone()
        };
        if !announce(&self.events, self.barrier, |receipt| {
            started_event(shown, cwd, receipt)
        })
        .await
        {
            return failed_before_start(
                output,
                FailureKind::Evidence,
                "not started: its start could not be recorded in the evidence".into(),
            );
        }
        let ctx = AttemptContext {
            step: step.id.clone(),
            target: target.clone(),
            attempt,
            command: rendered.command,
            shell: spec.shell.clone(),
            env: rendered.env,
            cwd: rendered.cwd,
            timeout: spec.timeout,
            kill_grace: spec.kill_grace,
            cancel: self.cancel.clone(),
            force: self.force.clone(),
            run_id: self.run.id.clone(),
            kind,
            spec: rendered.spec,
            host: if remote { host.cloned() } else { None },
            jumps: if remote {
                host.map(|h| self.state.inventory().jump_chain(h))
                    .unwrap_or_default()
            } else {
                Vec::new()
            },
            sudo: spec.sudo,
            become_password,
            pty: spec.pty,
            secrets: self.state.secret_values(),
            base_dir: self.plan.runbook.base_dir(),
        };
        let outcome = self.runner.run(ctx, &mut sink).await;
        output.insert(
            "exit_code".into(),
            outcome
                .exit_code()
                .map_or(Dynamic::UNIT, |c| Dynamic::from_int(i64::from(c))),
        );
        output.insert("stdout".into(), sink.tail(Stream::Stdout).into());
        output.insert("stderr".into(), sink.tail(Stream::Stderr).into());
        for (k, v) in sink.details() {
            output.insert(k.as_str().into(), crate::expr::json_to_dynamic(v));
        }
        AttemptRun {
            outcome,
            counts: sink.counts(),
            output,
            script_outputs: None,
            details: redact_json(&self.state, sink.details()),
        }
    }

    /// The step ends without starting another attempt.
    pub(super) fn stopped(
        &self,
        attempts: u32,
        offset: u32,
        why: &str,
        status_if_started: StepStatus,
        last_failure: Option<String>,
    ) -> StepResult {
        let (status, reason) = if attempts == offset {
            (StepStatus::Skipped, format!("not started: {why}"))
        } else {
            let reason = match last_failure {
                Some(f) => format!("{f}; no retry: {why}"),
                None => why.to_owned(),
            };
            (status_if_started, reason)
        };
        StepResult {
            status,
            attempts,
            duration: self.time_since_start(),
            reason: Some(reason),
            outputs: None,
            skipped_by_when: false,
            deferred: false,
            targets: Vec::new(),
        }
    }
}
