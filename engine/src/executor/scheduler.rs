//! The DAG loop: which step starts when, what is skipped and why, the run's hooks and its
//! end (`run_started` … `run_finished`). Steps themselves run in [`super::step`].

#[allow(clippy::wildcard_imports)]
use super::*;

/// Marks step `i` finished for its dependents; those with no unfinished needs become ready.
fn release(plan: &Plan, i: StepIdx, unfinished: &mut [usize], ready: &mut VecDeque<StepIdx>) {
    for d in plan.graph.dependents(i) {
        unfinished[d] -= 1;
        if unfinished[d] == 0 {
            ready.push_back(d);
        }
    }
}

impl Executor {
    #[allow(clippy::too_many_lines)]
    pub async fn run(self) -> RunReport {
        let plan = self.plan.clone();
        let steps = &plan.runbook.steps;
        let n = steps.len();
        let started = Instant::now();
        // Write-ahead: no step starts before the run's start is in the journal.
        let run_recorded = announce(&self.events, self.barrier, |receipt| {
            match &plan.resume_of {
                Some((previous, operator)) => RunEvent::RunResumed {
                    at: Utc::now(),
                    receipt,
                    previous: *previous,
                    operator: operator.clone(),
                },
                None => RunEvent::RunStarted {
                    at: self.run.started_at,
                    receipt,
                    run_id: self.run.id.clone(),
                    runbook: plan.runbook.meta.name.clone(),
                    steps: n,
                },
            }
        })
        .await;

        let results: Results = Arc::new(Mutex::new(vec![None; n]));
        let mut state = vec![State::Waiting; n];
        // A need is satisfied when it succeeded, was left out by selection or its `when`, or
        // failed with `continue_on_failure`.
        let mut satisfied = vec![false; n];
        let mut reports: Vec<Option<StepReport>> = vec![None; n];
        let mut unfinished_needs: Vec<usize> =
            (0..n).map(|i| plan.graph.needs(i).count()).collect();
        let mut ready: VecDeque<StepIdx> = (0..n).filter(|&i| unfinished_needs[i] == 0).collect();
        // Why the run stopped starting steps, once it did: shared with the step tasks.
        let halted: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
        let mut halted_by: Option<String> = None;
        let mut awaiting: Option<String> = None;
        let semaphore = Arc::new(Semaphore::new(self.parallel));
        let forks = Arc::new(Semaphore::new(plan.forks.max(1)));
        let mut tasks: JoinSet<(StepIdx, StepResult)> = JoinSet::new();

        let mut run_failure: Option<String> = None;
        if let Some(hook) = &plan.runbook.hooks.before_run {
            let mut scope = self.state.scope(&plan, &self.run);
            if let Err(message) = run_hook(
                &self.host,
                &plan,
                &self.state,
                &self.events,
                "before_run",
                hook,
                &mut scope,
                None,
            )
            .await
            {
                halted_by = Some("before_run".into());
                let _ = halted.set("the `before_run` hook failed".into());
                run_failure = Some(format!("the `before_run` hook failed: {message}"));
            }
        }

        loop {
            while let Some(i) = ready.pop_front() {
                let step = &steps[i];
                // On resume, a success is kept — unless the operator picked the step again
                // (`--only`/`--from`) or it is an `always` step (cleanup runs again after the
                // rest of the run).
                let keep_earlier = !plan.selected[i] || !(plan.rerun_selected || step.always);
                if keep_earlier {
                    if let Some(report) = self.restore_prior(i, &results).await {
                        state[i] = State::Done(StepStatus::Succeeded);
                        satisfied[i] = true;
                        reports[i] = Some(report);
                        release(&plan, i, &mut unfinished_needs, &mut ready);
                        continue;
                    }
                }
                let failed_earlier = plan.prior[i].attempts > 0;
                let decision = if !run_recorded {
                    // Not even `always` or `run_on_cancel` steps: nothing may run that the
                    // evidence cannot show.
                    Some((
                        StepStatus::Skipped,
                        "not started: the run's start could not be recorded in the evidence"
                            .to_owned(),
                        false,
                    ))
                } else if !plan.selected[i] && failed_earlier {
                    // Left out of a resume: its earlier failure stands.
                    Some((
                        StepStatus::Failed,
                        "not run again (not selected); it failed earlier".to_owned(),
                        false,
                    ))
                } else if !plan.selected[i] {
                    Some((StepStatus::Skipped, "not selected".to_owned(), true))
                } else if self.cancel.is_cancelled() && !(step.always && step.run_on_cancel) {
                    Some((
                        StepStatus::Skipped,
                        "not started: the run was cancelled".to_owned(),
                        false,
                    ))
                } else if let Some(bad) = plan
                    .graph
                    .needs(i)
                    .find(|&d| !satisfied[d])
                    .filter(|_| !step.always)
                {
                    let why = match state[bad] {
                        State::Done(StepStatus::Skipped) => "was skipped",
                        State::Done(StepStatus::Cancelled) => "was cancelled",
                        _ => "failed",
                    };
                    Some((
                        StepStatus::Skipped,
                        format!("needs `{}`, which {why}", steps[bad].id),
                        false,
                    ))
                } else if let (Some(by), false) = (&halted_by, step.always) {
                    let reason = if run_failure.is_some() && by == "before_run" {
                        "not started: the `before_run` hook failed".to_owned()
                    } else if awaiting.as_deref() == Some(by.as_str()) {
                        format!("not started: the run is waiting for approval of `{by}`")
                    } else {
                        format!("not started: the run stopped after `{by}` failed")
                    };
                    Some((StepStatus::Skipped, reason, false))
                } else {
                    None
                };
                if let Some((status, reason, counts_as_satisfied)) = decision {
                    state[i] = State::Done(status);
                    satisfied[i] = counts_as_satisfied;
                    record_result(
                        &results,
                        i,
                        step,
                        status,
                        0,
                        Duration::ZERO,
                        None,
                        Some(&reason),
                    );
                    reports[i] = Some(StepReport {
                        id: step.id.to_string(),
                        status,
                        attempts: 0,
                        duration: Duration::ZERO,
                        reason: Some(reason.clone()),
                    });
                    emit(
                        &self.events,
                        RunEvent::StepFinished {
                            at: Utc::now(),
                            step: step.id.clone(),
                            status,
                            attempts: 0,
                            duration: Duration::ZERO,
                            reason: Some(reason),
                            outputs: None,
                            targets: Vec::new(),
                        },
                    )
                    .await;
                    release(&plan, i, &mut unfinished_needs, &mut ready);
                    continue;
                }
                state[i] = State::Running;
                // A `run_on_cancel` step must not inherit the cancel that is stopping the run;
                // only a second interrupt (force) stops it.
                let (cancel, force) = if step.run_on_cancel {
                    (self.abort.clone(), self.abort.clone())
                } else {
                    (self.cancel.clone(), self.force.clone())
                };
                let task = StepTask {
                    plan: plan.clone(),
                    state: self.state.clone(),
                    runner: self.runner.clone(),
                    host: self.host.clone(),
                    run: self.run.clone(),
                    events: self.events.clone(),
                    cancel,
                    force,
                    abort: self.abort.clone(),
                    approver: self.approver.clone(),
                    barrier: self.barrier,
                    semaphore: semaphore.clone(),
                    forks: forks.clone(),
                    halted: halted.clone(),
                    results: results.clone(),
                    index: i,
                    step_started: Arc::default(),
                    block: None,
                };
                tasks.spawn(async move { (i, task.run().await) });
            }

            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let (i, result) = match joined {
                Ok(r) => r,
                // A panicking step task is a bug; fail loudly rather than hang.
                Err(e) => panic!("step task failed: {e}"),
            };
            let step = &steps[i];
            state[i] = State::Done(result.status);
            satisfied[i] = result.status == StepStatus::Succeeded
                || result.skipped_by_when
                || (result.status == StepStatus::Failed && step.continue_on_failure);
            if result.deferred && halted_by.is_none() {
                awaiting = Some(step.id.to_string());
                halted_by = Some(step.id.to_string());
                let _ = halted.set(format!("the run is waiting for approval of `{}`", step.id));
            }
            if result.status == StepStatus::Failed
                && !step.continue_on_failure
                && halted_by.is_none()
            {
                halted_by = Some(step.id.to_string());
                let _ = halted.set(format!("the run stopped after `{}` failed", step.id));
            }
            let is_clock_stop = plan
                .runbook
                .drill
                .as_ref()
                .and_then(|d| d.clock_stop.as_ref())
                .is_some_and(|n| n.id == step.id);
            if is_clock_stop && result.status == StepStatus::Succeeded {
                self.state.clock(false, Utc::now());
                emit(
                    &self.events,
                    RunEvent::Clock {
                        at: Utc::now(),
                        start: false,
                        step: Some(step.id.clone()),
                    },
                )
                .await;
            }
            // Not waited for: dependents released below start nothing before their own
            // attempt's start is recorded (`announce`), and the journal is written in the
            // order events are sent, so this record is in it first. Waiting here cost every
            // step of a chain one more round trip to the evidence thread.
            emit(
                &self.events,
                RunEvent::StepFinished {
                    at: Utc::now(),
                    step: step.id.clone(),
                    status: result.status,
                    attempts: result.attempts,
                    duration: result.duration,
                    reason: result.reason.clone(),
                    outputs: result.outputs.clone(),
                    targets: result.targets.clone(),
                },
            )
            .await;
            reports[i] = Some(StepReport {
                id: step.id.to_string(),
                status: result.status,
                attempts: result.attempts,
                duration: result.duration,
                reason: result.reason,
            });
            release(&plan, i, &mut unfinished_needs, &mut ready);
        }

        let steps_report: Vec<StepReport> = reports.into_iter().flatten().collect();
        let failed = steps_report
            .iter()
            .zip(steps.iter())
            .any(|(r, s)| r.status == StepStatus::Failed && !s.continue_on_failure);
        let mut status = if self.cancel.is_cancelled() {
            RunStatus::Cancelled
        } else if failed || run_failure.is_some() {
            RunStatus::Failed
        } else if awaiting.is_some() {
            RunStatus::AwaitingApproval
        } else {
            RunStatus::Succeeded
        };
        if let Some(hook) = &plan.runbook.hooks.after_run {
            let mut scope = self.state.scope(&plan, &self.run);
            let all: Vec<StepIdx> = (0..n).collect();
            push_steps(&mut scope, &plan, &results, &all);
            scope.push_constant("run", run_map(&plan, &self.run, Some(status)));
            if let Err(message) = run_hook(
                &self.host,
                &plan,
                &self.state,
                &self.events,
                "after_run",
                hook,
                &mut scope,
                None,
            )
            .await
            {
                if status == RunStatus::Succeeded {
                    status = RunStatus::Failed;
                }
                // Kept even when steps failed too: it is a failure of its own.
                run_failure.get_or_insert(format!("the `after_run` hook failed: {message}"));
            }
        }
        let drill = match &plan.runbook.drill {
            Some(spec) => {
                let mut scope = self.state.scope(&plan, &self.run);
                let all: Vec<StepIdx> = (0..n).collect();
                push_steps(&mut scope, &plan, &results, &all);
                scope.push_constant("run", run_map(&plan, &self.run, Some(status)));
                let report = measure_drill(
                    &self.host,
                    &plan,
                    &self.state,
                    spec,
                    &mut scope,
                    status,
                    self.run.started_at,
                );
                emit(
                    &self.events,
                    RunEvent::DrillMeasured {
                        at: Utc::now(),
                        report: report.clone(),
                    },
                )
                .await;
                Some(report)
            }
            None => None,
        };
        let finished_at = Utc::now();
        emit(
            &self.events,
            RunEvent::RunFinished {
                at: finished_at,
                status,
                reason: run_failure,
            },
        )
        .await;
        RunReport {
            run_id: self.run.id.clone(),
            runbook: plan.runbook.meta.name.clone(),
            status,
            started_at: self.run.started_at,
            finished_at,
            duration: started.elapsed(),
            steps: steps_report,
            drill,
        }
    }

    /// A step the resumed run already finished successfully: its result is restored and it is
    /// recorded as done without running again.
    pub(super) async fn restore_prior(&self, i: StepIdx, results: &Results) -> Option<StepReport> {
        let prior = &self.plan.prior[i];
        let earlier = prior.result.as_ref()?;
        let step = &self.plan.runbook.steps[i];
        let mut m = Map::new();
        m.insert(
            "exit_code".into(),
            earlier
                .exit_code
                .map_or(Dynamic::UNIT, |c| Dynamic::from_int(i64::from(c))),
        );
        m.insert("stdout".into(), earlier.stdout.clone().into());
        m.insert("stderr".into(), earlier.stderr.clone().into());
        m.insert(
            "json".into(),
            earlier
                .json
                .as_ref()
                .map_or(Dynamic::UNIT, crate::expr::json_to_dynamic),
        );
        m.insert(
            "outputs".into(),
            earlier.outputs.as_ref().map_or_else(
                || Dynamic::from_map(Map::new()),
                crate::expr::json_to_dynamic,
            ),
        );
        let duration = Duration::from_secs_f64(earlier.duration.max(0.0));
        let reason = "succeeded earlier".to_owned();
        record_result(
            results,
            i,
            step,
            StepStatus::Succeeded,
            prior.attempts,
            duration,
            Some(&m),
            None,
        );
        emit(
            &self.events,
            RunEvent::StepFinished {
                at: Utc::now(),
                step: step.id.clone(),
                status: StepStatus::Succeeded,
                attempts: prior.attempts,
                duration,
                reason: Some(reason.clone()),
                outputs: earlier.outputs.clone(),
                targets: Vec::new(),
            },
        )
        .await;
        Some(StepReport {
            id: step.id.to_string(),
            status: StepStatus::Succeeded,
            attempts: prior.attempts,
            duration,
            reason: Some(reason),
        })
    }
}
