//! The executor: runs a [`Plan`] on tokio. A step starts as soon as everything it needs has
//! succeeded, at most `parallel` attempts run at once, retries follow the step's policy, and
//! every state change is sent as a [`RunEvent`].
//!
//! Failure policy: the first failure (of a step without `continue_on_failure`) halts the run:
//! attempts already running finish, but no new step or retry starts, except `always` steps.
//! Steps whose needs failed or were skipped are skipped with the reason; a step skipped by its
//! own `when` counts as done for its dependents.
//!
//! Expressions (`when`, `until`, `check`, `outputs`, hooks, `script` steps) run here, between
//! attempts, with the results of earlier steps in scope as `steps.<id>`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use rhai::{Dynamic, Map, Scope};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::event::TargetResult;
use crate::event::{
    AttemptOutcome, FailureKind, OutputCounts, RunEvent, RunStatus, StepStatus, Stream, Target,
};
use crate::expr::{display_value, dynamic_to_json, truthy, Effects, EvalError, ExprHost};
use crate::graph::StepIdx;
use crate::inventory::{Host, Selector};
use crate::plan::{Plan, RunInfo};
use crate::runbook::{
    Action, Budget, Capture, Gate, RequestKind, SpannedExpr, Spec, StepSpec, StrategyKind,
};
use crate::runner::{Approval, Approver, AttemptContext, NoApprover, OutputSink, StepRunner};
use crate::template::{RenderError, Template};

/// How one step ended, as the summary and `--json` report it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    pub id: String,
    pub status: StepStatus,
    pub attempts: u32,
    #[serde(with = "crate::serde_duration")]
    pub duration: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub runbook: String,
    pub status: RunStatus,
    pub started_at: chrono::DateTime<Utc>,
    pub finished_at: chrono::DateTime<Utc>,
    #[serde(with = "crate::serde_duration")]
    pub duration: Duration,
    pub steps: Vec<StepReport>,
    /// `[drill]`: what was measured and the verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drill: Option<crate::event::DrillReport>,
}

/// Results of finished steps as expressions see them (`steps.<id>`), shared by step tasks.
type Results = Arc<Mutex<Vec<Option<Map>>>>;

pub struct Executor {
    plan: Arc<Plan>,
    runner: Arc<dyn StepRunner>,
    host: ExprHost,
    run: RunInfo,
    parallel: usize,
    events: mpsc::Sender<RunEvent>,
    cancel: CancellationToken,
    force: CancellationToken,
    abort: CancellationToken,
    approver: Arc<dyn Approver>,
    barrier: bool,
}

/// What a step task hands back to the scheduler loop.
struct StepResult {
    status: StepStatus,
    attempts: u32,
    duration: Duration,
    reason: Option<String>,
    outputs: Option<serde_json::Value>,
    /// Skipped by its own `when`: dependents go ahead.
    skipped_by_when: bool,
    /// Not run because its `approve` question is still open: the run stops, awaiting approval.
    deferred: bool,
    /// Per host, for steps with `on`.
    targets: Vec<TargetResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Done(StepStatus),
}

impl Executor {
    pub fn new(
        plan: Arc<Plan>,
        runner: Arc<dyn StepRunner>,
        host: ExprHost,
        run: RunInfo,
        parallel: usize,
        events: mpsc::Sender<RunEvent>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            plan,
            runner,
            host,
            run,
            parallel: parallel.max(1),
            events,
            cancel,
            force: CancellationToken::new(),
            abort: CancellationToken::new(),
            approver: Arc::new(NoApprover),
            barrier: false,
        }
    }

    /// Cancelled on a second interrupt: running processes are killed without a grace period
    /// (except `run_on_cancel` steps, which only a third interrupt stops).
    #[must_use]
    pub fn with_force(mut self, force: CancellationToken) -> Self {
        self.force = force;
        self
    }

    /// Cancelled on a third interrupt: even `run_on_cancel` steps are killed.
    #[must_use]
    pub fn with_abort(mut self, abort: CancellationToken) -> Self {
        self.abort = abort;
        self
    }

    /// Wait for the consumer to acknowledge each step's record (and collected files) before
    /// going on: a run whose evidence can no longer be written starts nothing new. The consumer
    /// must call [`RunEvent::acknowledge`] (or drop the events).
    #[must_use]
    pub fn with_record_barrier(mut self) -> Self {
        self.barrier = true;
        self
    }

    /// Who answers `approve` questions (by default nobody: the run stops awaiting approval).
    #[must_use]
    pub fn with_approver(mut self, approver: Arc<dyn Approver>) -> Self {
        self.approver = approver;
        self
    }

    #[allow(clippy::too_many_lines)]
    pub async fn run(self) -> RunReport {
        let plan = self.plan.clone();
        let steps = &plan.runbook.steps;
        let n = steps.len();
        let started = Instant::now();
        let first = match &plan.resume_of {
            Some((previous, operator)) => RunEvent::RunResumed {
                at: Utc::now(),
                previous: *previous,
                operator: operator.clone(),
            },
            None => RunEvent::RunStarted {
                at: self.run.started_at,
                run_id: self.run.id.clone(),
                runbook: plan.runbook.meta.name.clone(),
                steps: n,
            },
        };
        emit(&self.events, first).await;

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
            let mut scope = plan.scope(&self.run);
            if let Err(message) = run_hook(
                &self.host,
                &plan,
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
                let decision = if !plan.selected[i] && failed_earlier {
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
                            receipt: crate::event::Receipt::default(),
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
                    runner: self.runner.clone(),
                    host: self.host.clone(),
                    run: self.run.clone(),
                    events: self.events.clone(),
                    cancel,
                    force,
                    approver: self.approver.clone(),
                    barrier: self.barrier,
                    semaphore: semaphore.clone(),
                    forks: forks.clone(),
                    halted: halted.clone(),
                    results: results.clone(),
                    index: i,
                    step_started: Arc::default(),
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
                plan.clock(false, Utc::now());
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
            let (receipt, recorded) = crate::event::Receipt::new();
            emit(
                &self.events,
                RunEvent::StepFinished {
                    at: Utc::now(),
                    receipt,
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
            // Completes when the consumer has written the step's record (or gone away).
            if self.barrier {
                let _ = recorded.await;
            }
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
            let mut scope = plan.scope(&self.run);
            let all: Vec<StepIdx> = (0..n).collect();
            push_steps(&mut scope, &plan, &results, &all);
            scope.push_constant("run", run_map(&plan, &self.run, Some(status)));
            if let Err(message) = run_hook(
                &self.host,
                &plan,
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
                let mut scope = plan.scope(&self.run);
                let all: Vec<StepIdx> = (0..n).collect();
                push_steps(&mut scope, &plan, &results, &all);
                scope.push_constant("run", run_map(&plan, &self.run, Some(status)));
                let report = measure_drill(
                    &self.host,
                    &plan,
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
}

impl Executor {
    /// A step the resumed run already finished successfully: its result is restored and it is
    /// recorded as done without running again.
    async fn restore_prior(&self, i: StepIdx, results: &Results) -> Option<StepReport> {
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
                receipt: crate::event::Receipt::default(),
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

/// Marks step `i` finished for its dependents; those with no unfinished needs become ready.
fn release(plan: &Plan, i: StepIdx, unfinished: &mut [usize], ready: &mut VecDeque<StepIdx>) {
    for d in plan.graph.dependents(i) {
        unfinished[d] -= 1;
        if unfinished[d] == 0 {
            ready.push_back(d);
        }
    }
}

async fn emit(events: &mpsc::Sender<RunEvent>, event: RunEvent) {
    // Consumers only go away when the process is shutting down; nothing to do then.
    let _ = events.send(event).await;
}

/// `run` as expressions see it; `status` appears once the run has one (in `after_run`).
fn run_map(plan: &Plan, run: &RunInfo, status: Option<RunStatus>) -> Map {
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
fn push_steps(scope: &mut Scope<'_>, plan: &Plan, results: &Results, which: &[StepIdx]) {
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
fn record_result(
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

/// Sends what an evaluation asked for as events; registers secrets first so that nothing
/// emitted after them can carry them.
async fn apply_effects(
    plan: &Plan,
    events: &mpsc::Sender<RunEvent>,
    step: Option<&StepSpec>,
    effects: Effects,
) {
    if !effects.secrets.is_empty() {
        plan.add_secrets(&effects.secrets);
        for (name, value) in effects.secrets {
            emit(
                events,
                RunEvent::SecretRegistered {
                    at: Utc::now(),
                    step: step.map(|s| s.id.clone()),
                    name,
                    value,
                },
            )
            .await;
        }
    }
    for message in effects.logs {
        emit(
            events,
            RunEvent::Log {
                at: Utc::now(),
                step: step.map(|s| s.id.clone()),
                message: plan.redact(&message),
            },
        )
        .await;
    }
    for new in &effects.new_hosts {
        let errors = plan.add_hosts(std::slice::from_ref(new));
        let added = plan.inventory().host(&new.name).cloned();
        match (errors.first(), added) {
            (None, Some(h)) => {
                emit(
                    events,
                    RunEvent::HostAdded {
                        at: Utc::now(),
                        step: step.map(|s| s.id.clone()),
                        name: h.name.clone(),
                        address: plan.redact(&h.address),
                        groups: h.groups.clone(),
                        spec: serde_json::from_str(&plan.redact(&new.spec.to_string()))
                            .unwrap_or_default(),
                    },
                )
                .await;
            }
            (error, _) => {
                emit(
                    events,
                    RunEvent::Note {
                        at: Utc::now(),
                        message: format!(
                            "inventory.add_host(`{}`) failed: {}",
                            new.name,
                            error.map_or("unknown error", String::as_str)
                        ),
                    },
                )
                .await;
            }
        }
    }
    for start in effects.clock {
        plan.clock(start, Utc::now());
        emit(
            events,
            RunEvent::Clock {
                at: Utc::now(),
                start,
                step: step.map(|s| s.id.clone()),
            },
        )
        .await;
    }
    for message in effects.notes {
        let message = match step {
            Some(s) => format!("{}: {}", s.id, plan.redact(&message)),
            None => plan.redact(&message),
        };
        emit(
            events,
            RunEvent::Note {
                at: Utc::now(),
                message,
            },
        )
        .await;
    }
}

/// Describes an expression failure with the file position of the expression.
fn expr_failure(plan: &Plan, what: &str, e: &SpannedExpr, err: &EvalError) -> String {
    if err.failed {
        return plan.redact(&err.message);
    }
    let loc =
        e.at.describe(&plan.runbook.source, &e.expr.text, err.line, err.column);
    let shown = shown_text(e);
    plan.redact(&format!("{what}{shown} failed at {loc}: {}", err.message))
}

/// `` `text` `` of a short one-line expression, to quote in a message; nothing for a long one
/// (its position is given instead).
fn shown_text(e: &SpannedExpr) -> String {
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
fn condition(
    plan: &Plan,
    what: &str,
    e: &SpannedExpr,
    value: Result<Dynamic, EvalError>,
) -> Result<bool, String> {
    let value = value.map_err(|err| expr_failure(plan, what, e, &err))?;
    truthy(&value).map_err(|got| {
        let loc =
            e.at.describe(&plan.runbook.source, &e.expr.text, None, None);
        let shown = shown_text(e);
        plan.redact(&format!(
            "{what}{shown} at {loc} must be true or false; {got}"
        ))
    })
}

/// Runs a hook script; `Err` carries a message for people.
async fn run_hook(
    host: &ExprHost,
    plan: &Plan,
    events: &mpsc::Sender<RunEvent>,
    what: &str,
    hook: &SpannedExpr,
    scope: &mut Scope<'_>,
    step: Option<&StepSpec>,
) -> Result<Dynamic, String> {
    let (result, effects) = host.eval_with_effects(&hook.expr, scope);
    apply_effects(plan, events, step, effects).await;
    result
        .map_err(|err| {
            let message = expr_failure(plan, &format!("`{what}` hook"), hook, &err);
            message
        })
        .inspect_err(|message| {
            let _ = events.try_send(RunEvent::Note {
                at: Utc::now(),
                message: message.clone(),
            });
        })
}

/// One step's attempts, retries and collection, run as its own task.
#[derive(Clone)]
struct StepTask {
    plan: Arc<Plan>,
    runner: Arc<dyn StepRunner>,
    host: ExprHost,
    run: RunInfo,
    events: mpsc::Sender<RunEvent>,
    cancel: CancellationToken,
    force: CancellationToken,
    approver: Arc<dyn Approver>,
    barrier: bool,
    semaphore: Arc<Semaphore>,
    /// Host attempts at once, over all steps (`--forks`).
    forks: Arc<Semaphore>,
    halted: Arc<OnceLock<String>>,
    results: Results,
    index: StepIdx,
    /// When the first attempt on any target started (and `StepStarted` was sent): the step's
    /// duration counts from here, not from when it began to wait for a `--parallel` slot.
    step_started: Arc<OnceLock<Instant>>,
}

/// A step's templates, rendered for one attempt.
struct Rendered {
    command: String,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    /// A step kind's rendered settings (`Null` for a shell command).
    spec: serde_json::Value,
}

/// How a step went on one target.
struct TargetRun {
    status: StepStatus,
    attempts: u32,
    reason: Option<String>,
    /// The last attempt's `output` (what `steps.<id>` shows).
    output: Option<Map>,
    outputs: Option<Map>,
}

impl TargetRun {
    fn not_started(attempts: u32, why: &str) -> Self {
        TargetRun {
            status: StepStatus::Skipped,
            attempts,
            reason: Some(format!("not started: {why}")),
            output: None,
            outputs: None,
        }
    }

    /// Outputs as recorded in evidence, secrets redacted.
    fn outputs_json(&self, plan: &Plan) -> Option<serde_json::Value> {
        self.outputs.as_ref().map(|m| {
            let j = serde_json::Value::Object(
                m.iter()
                    .map(|(k, v)| (k.to_string(), dynamic_to_json(v)))
                    .collect(),
            );
            serde_json::from_str(&plan.redact(&j.to_string())).unwrap_or(j)
        })
    }
}

/// Rolling batches: sizes as written, the last size repeating until every host has one.
fn split_batches(hosts: &[Arc<Host>], sizes: &[Budget]) -> Vec<Vec<Arc<Host>>> {
    let total = hosts.len();
    let mut out = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < total {
        let size = sizes
            .get(k)
            .or(sizes.last())
            .map_or(1, |b| b.of(total))
            .max(1);
        // A growing list (`[1, "25%", "100%"]`) gives sizes of the whole, not increments.
        let n = size.min(total - i);
        out.push(hosts[i..i + n].to_vec());
        i += n;
        k += 1;
    }
    out
}

/// One line for the journal and console: what a step kind's attempt does.
fn describe_request(kind: RequestKind, spec: &serde_json::Value) -> String {
    let s = |k: &str| {
        spec.get(k).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    match kind {
        RequestKind::Http => format!(
            "{} {}",
            s("method").unwrap_or_else(|| "GET".into()).to_uppercase(),
            s("url").unwrap_or_default()
        ),
        RequestKind::Tcp => format!(
            "tcp {}:{}",
            s("host").unwrap_or_default(),
            s("port").unwrap_or_default()
        ),
        RequestKind::Screenshot => format!("screenshot {}", s("url").unwrap_or_default()),
        RequestKind::Upload => format!(
            "upload {} → {}",
            s("src").unwrap_or_else(|| "(content)".into()),
            s("dest").unwrap_or_default()
        ),
    }
}

/// A runner's details with every known secret redacted, for the journal.
fn redact_json(
    plan: &Plan,
    details: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    let text = serde_json::Value::Object(details.clone()).to_string();
    match serde_json::from_str(&plan.redact(&text)) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

/// How an attempt went, before the result expressions looked at it.
struct AttemptRun {
    outcome: AttemptOutcome,
    counts: OutputCounts,
    output: Map,
    /// A `script` step's returned map.
    script_outputs: Option<Map>,
    /// Structured results the runner reported.
    details: serde_json::Map<String, serde_json::Value>,
}

impl StepTask {
    fn step(&self) -> &StepSpec {
        &self.plan.runbook.steps[self.index]
    }

    /// The scope for this step's expressions: params, run, env and the steps it reads.
    fn scope(&self, host: Option<&Arc<Host>>) -> Scope<'static> {
        let mut scope = self.plan.scope(&self.run);
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
        scope
    }

    /// The scope for the run-wide step hooks, with `step` describing this step.
    fn hook_scope(&self, step_map: Map, output: Option<&Map>) -> Scope<'static> {
        let mut scope = self.plan.scope(&self.run);
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

    fn step_map(&self) -> Map {
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

    async fn run(self) -> StepResult {
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
    async fn run_inner(&self) -> StepResult {
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
            apply_effects(&self.plan, &self.events, Some(step), effects).await;
            match condition(&self.plan, "`when`", when, value) {
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
                let outputs = t.outputs_json(&self.plan);
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
    fn time_since_start(&self) -> Duration {
        self.step_started
            .get()
            .map_or(Duration::ZERO, Instant::elapsed)
    }

    /// Stores what downstream expressions see as `steps.<id>` (before the step's record).
    fn store(&self, output: Option<Map>) {
        if let (Some(o), Ok(mut r)) = (output, self.results.lock()) {
            r[self.index] = Some(o);
        }
    }

    /// Runs a step with `on` on each selected host, as its strategy says.
    #[allow(clippy::too_many_lines)]
    async fn fan_out(&self, step: &StepSpec, selector: &Selector, offset: u32) -> StepResult {
        let result = |status, attempts, reason: Option<String>| StepResult {
            status,
            attempts,
            duration: Duration::ZERO,
            reason,
            outputs: None,
            skipped_by_when: false,
            deferred: false,
            targets: Vec::new(),
        };
        let hosts = match self.plan.inventory().select(selector) {
            Ok(h) => h,
            Err(e) => {
                return result(
                    StepStatus::Failed,
                    offset,
                    Some(format!("`on = \"{selector}\"`: {e}")),
                )
            }
        };
        if hosts.is_empty() {
            return StepResult {
                skipped_by_when: true,
                ..result(
                    StepStatus::Skipped,
                    offset,
                    Some(format!("no host matches `on = \"{selector}\"`")),
                )
            };
        }
        let total = hosts.len();
        let budget = step.strategy.max_failures.of(total);
        let (batches, limit, pause, gate) = match &step.strategy.kind {
            StrategyKind::Parallel { limit } => (vec![hosts.clone()], *limit, None, None),
            StrategyKind::Rolling {
                batches,
                pause,
                gate,
            } => (split_batches(&hosts, batches), None, *pause, gate.as_ref()),
        };
        let step_limit = Arc::new(Semaphore::new(limit.unwrap_or(total).max(1)));
        let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut done: Vec<(Arc<Host>, TargetRun)> = Vec::with_capacity(total);
        let mut stop: Option<String> = None;
        for (b, batch) in batches.iter().enumerate() {
            if stop.is_none() && b > 0 {
                if let Some(p) = pause {
                    tokio::select! {
                        () = tokio::time::sleep(p) => {}
                        () = self.cancel.cancelled() => {}
                    }
                }
                if let Some(gate) = gate {
                    if let Err(why) = self.gate(step, gate, b, &done).await {
                        stop = Some(why);
                    }
                }
            }
            if self.cancel.is_cancelled() && stop.is_none() {
                stop = Some("the run was cancelled".into());
            }
            if let Some(why) = &stop {
                for h in batch {
                    done.push((h.clone(), TargetRun::not_started(offset, why)));
                }
                continue;
            }
            let mut tasks = JoinSet::new();
            for (pos, h) in batch.iter().enumerate() {
                let me = self.clone();
                let h = h.clone();
                let step_limit = step_limit.clone();
                let failed = failed.clone();
                tasks.spawn(async move {
                    let permit = step_limit.acquire_owned().await.ok();
                    let so_far = failed.load(std::sync::atomic::Ordering::SeqCst);
                    if permit.is_none() || so_far > budget {
                        let why = format!(
                            "{so_far} host(s) failed, more than `max_failures` ({budget}) allows"
                        );
                        return (pos, h, TargetRun::not_started(offset, &why));
                    }
                    let step = me.step();
                    let run = me.run_host(step, &h, offset).await;
                    if run.status == StepStatus::Failed {
                        failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    (pos, h, run)
                });
            }
            let mut in_batch: Vec<(usize, Arc<Host>, TargetRun)> = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok(r) => in_batch.push(r),
                    Err(e) => panic!("host task failed: {e}"),
                }
            }
            in_batch.sort_by_key(|(pos, _, _)| *pos);
            let batch_failed = in_batch
                .iter()
                .filter(|(_, _, r)| r.status == StepStatus::Failed)
                .count();
            done.extend(in_batch.into_iter().map(|(_, h, r)| (h, r)));
            let failed_now = failed.load(std::sync::atomic::Ordering::SeqCst);
            if matches!(step.strategy.kind, StrategyKind::Rolling { .. }) {
                emit(
                    &self.events,
                    RunEvent::Batch {
                        at: Utc::now(),
                        step: step.id.clone(),
                        number: b + 1,
                        hosts: batch.iter().map(|h| h.name.clone()).collect(),
                        failed: batch_failed,
                        gate: None,
                    },
                )
                .await;
            }
            if failed_now > budget && stop.is_none() {
                stop = Some(format!(
                    "{failed_now} host(s) failed, more than `max_failures` ({budget}) allows"
                ));
            }
        }
        // Selection order, whatever order hosts finished in.
        done.sort_by_key(|(h, _)| hosts.iter().position(|x| x.name == h.name));
        let mut hosts_map = Map::new();
        let mut targets = Vec::with_capacity(done.len());
        let mut attempts = offset;
        let mut failures = Vec::new();
        let mut cancelled = false;
        for (h, r) in &done {
            attempts = attempts.max(r.attempts);
            let mut m = r.output.clone().unwrap_or_default();
            m.insert("status".into(), r.status.as_str().into());
            m.insert(
                "reason".into(),
                r.reason.clone().map_or(Dynamic::UNIT, Into::into),
            );
            m.entry("outputs".into())
                .or_insert_with(|| Dynamic::from_map(Map::new()));
            hosts_map.insert(h.name.as_str().into(), Dynamic::from_map(m));
            match r.status {
                StepStatus::Failed => {
                    failures.push((h.name.as_str(), r.reason.as_deref().unwrap_or("failed")));
                }
                StepStatus::Cancelled => cancelled = true,
                _ => {}
            }
            targets.push(TargetResult {
                target: h.name.clone(),
                status: r.status,
                attempts: r.attempts,
                reason: r.reason.clone(),
            });
        }
        // `steps.<id>` is the first host's result, with every host's under `hosts`.
        let first = done.iter().find(|(_, r)| r.output.is_some());
        let mut output = first
            .and_then(|(_, r)| r.output.clone())
            .unwrap_or_default();
        output.insert("hosts".into(), Dynamic::from_map(hosts_map));
        self.store(Some(output));
        let outputs = first.and_then(|(_, r)| r.outputs_json(&self.plan));
        let ran = done
            .iter()
            .filter(|(_, r)| r.status != StepStatus::Skipped)
            .count();
        let (status, reason) = if cancelled || (self.cancel.is_cancelled() && ran < total) {
            (
                StepStatus::Cancelled,
                Some("cancelled while running".into()),
            )
        } else if failures.len() > budget || stop.is_some() {
            let mut why = if failures.is_empty() {
                String::new()
            } else {
                format!(
                    "{} of {total} host(s) failed: {}",
                    failures.len(),
                    hosts_by_reason(&failures)
                )
            };
            if let Some(s) = &stop {
                if ran < total {
                    if !why.is_empty() {
                        why.push_str("; ");
                    }
                    why.push_str(&format!("{} host(s) not started: {s}", total - ran));
                }
            }
            (StepStatus::Failed, Some(why))
        } else if !failures.is_empty() {
            (
                StepStatus::Succeeded,
                Some(format!(
                    "{} of {total} host(s) failed, within `max_failures` ({budget}): {}",
                    failures.len(),
                    hosts_by_reason(&failures)
                )),
            )
        } else if done.iter().all(|(_, r)| r.status == StepStatus::Skipped) {
            (StepStatus::Skipped, Some("skipped on every host".into()))
        } else {
            (StepStatus::Succeeded, None)
        };
        StepResult {
            outputs,
            targets,
            ..result(status, attempts, reason)
        }
    }

    /// Between two batches of a rolling step: what must hold before the next starts.
    async fn gate(
        &self,
        step: &StepSpec,
        gate: &Gate,
        batch: usize,
        done: &[(Arc<Host>, TargetRun)],
    ) -> Result<(), String> {
        let outcome = match gate {
            Gate::Expr(e) => {
                let mut scope = self.scope(None);
                let mut info = Map::new();
                info.insert("batch".into(), Dynamic::from_int(batch as i64));
                info.insert(
                    "hosts".into(),
                    Dynamic::from_array(
                        done.iter()
                            .map(|(h, _)| Dynamic::from(h.name.clone()))
                            .collect(),
                    ),
                );
                info.insert(
                    "failed".into(),
                    Dynamic::from_int(
                        done.iter()
                            .filter(|(_, r)| r.status == StepStatus::Failed)
                            .count() as i64,
                    ),
                );
                scope.push_constant("output", info);
                let (value, effects) = self.host.eval_with_effects(&e.expr, &mut scope);
                apply_effects(&self.plan, &self.events, Some(step), effects).await;
                match condition(&self.plan, "`gate`", e, value) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "the gate after batch {batch} was false: {}",
                        e.expr.text.trim()
                    )),
                    Err(m) => Err(m),
                }
            }
            Gate::Step(probe) => {
                let label: Target = Arc::from(format!("gate-{batch}").as_str());
                let r = self.run_target(probe, label, None, false, 0).await;
                if r.status == StepStatus::Succeeded {
                    Ok(())
                } else {
                    Err(format!(
                        "the gate after batch {batch} failed: {}",
                        r.reason.as_deref().unwrap_or("failed")
                    ))
                }
            }
        };
        emit(
            &self.events,
            RunEvent::Note {
                at: Utc::now(),
                message: match &outcome {
                    Ok(()) => format!("{}: gate after batch {batch} passed", step.id),
                    Err(why) => format!("{}: {why}", step.id),
                },
            },
        )
        .await;
        outcome
    }

    /// A step (or block) on one host.
    async fn run_host(&self, step: &StepSpec, host: &Arc<Host>, offset: u32) -> TargetRun {
        let label: Target = Arc::from(host.name.as_str());
        let Action::Block { steps } = &step.action else {
            return self
                .run_target(step, label, Some(host), !step.local, offset)
                .await;
        };
        let mut failed: Option<(StepStatus, String)> = None;
        let mut attempts = 0;
        let mut block = Map::new();
        for sub in steps {
            if failed.is_some() && !sub.always {
                continue;
            }
            let sub_label: Target = Arc::from(format!("{}/{}", host.name, sub.id).as_str());
            if let Some(when) = &sub.when {
                let (value, effects) = self
                    .host
                    .eval_with_effects(&when.expr, &mut self.scope(Some(host)));
                apply_effects(&self.plan, &self.events, Some(step), effects).await;
                match condition(&self.plan, "`when`", when, value) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(m) => {
                        failed.get_or_insert((StepStatus::Failed, format!("`{}`: {m}", sub.id)));
                        continue;
                    }
                }
            }
            let r = self
                .run_target(sub, sub_label, Some(host), !sub.local, 0)
                .await;
            attempts += r.attempts;
            let mut m = r.output.clone().unwrap_or_default();
            m.insert("status".into(), r.status.as_str().into());
            block.insert(sub.id.as_str().into(), Dynamic::from_map(m));
            if r.status != StepStatus::Succeeded
                && !(sub.continue_on_failure && r.status == StepStatus::Failed)
            {
                failed.get_or_insert((
                    r.status,
                    format!("`{}`: {}", sub.id, r.reason.as_deref().unwrap_or("failed")),
                ));
            }
        }
        let mut output = Map::new();
        output.insert("steps".into(), Dynamic::from_map(block));
        let (status, reason) = match failed {
            None => (StepStatus::Succeeded, None),
            Some((StepStatus::Cancelled, why)) => (StepStatus::Cancelled, Some(why)),
            Some((_, why)) => (StepStatus::Failed, Some(why)),
        };
        TargetRun {
            status,
            attempts: offset + attempts,
            reason,
            output: Some(output),
            outputs: None,
        }
    }

    /// The attempts of one step (or block sub-step) on one target, with retries.
    #[allow(clippy::too_many_lines)]
    async fn run_target(
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
                    self.plan.clock(true, Utc::now());
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
            let delay = spec.retry.delay_before(attempt + 1, random_unit());
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
    fn failure_summary(&self, run: &AttemptRun) -> String {
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
            Some(line) => format!("{what}: {}", self.plan.redact(&line)),
            None => what,
        }
    }

    /// Runs one attempt of the step's action.
    #[allow(clippy::too_many_lines, clippy::too_many_arguments)]
    async fn attempt(
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
        let compact = matches!(
            spec.action,
            Action::Request {
                kind: RequestKind::Http | RequestKind::Tcp,
                ..
            }
        ) && !self.plan.dry_run;
        let started_event = |command: String, cwd: PathBuf| RunEvent::AttemptStarted {
            at: Utc::now(),
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
                apply_effects(&self.plan, &self.events, Some(step), effects).await;
                match rendered {
                    Err(message) => {
                        emit(
                            &self.events,
                            started_event(
                                self.plan.redact(plan_cmd.raw()),
                                self.plan.workdir.clone(),
                            ),
                        )
                        .await;
                        return failed_before_start(
                            output,
                            FailureKind::Template,
                            self.plan.redact(&message),
                        );
                    }
                    Ok(r) => (None, r),
                }
            }
            (Action::Request { kind, spec: table }, None) => {
                let mut effects = Effects::default();
                let rendered = self.render_spec(table, host, &mut effects);
                apply_effects(&self.plan, &self.events, Some(step), effects).await;
                match rendered {
                    Err(message) => {
                        emit(
                            &self.events,
                            started_event(
                                format!("{} (settings did not render)", kind.key()),
                                self.plan.workdir.clone(),
                            ),
                        )
                        .await;
                        return failed_before_start(
                            output,
                            FailureKind::Template,
                            self.plan.redact(&message),
                        );
                    }
                    Ok(value) => (
                        Some(*kind),
                        Rendered {
                            command: describe_request(*kind, &value),
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
                    started_event(format!("(rhai) {first}"), self.plan.workdir.clone()),
                )
                .await;
                let mut scope = self.scope(host);
                let (value, effects) = self.host.eval_with_effects(&script.expr, &mut scope);
                // A script's log lines are its output.
                for line in &effects.logs {
                    sink.write(
                        Stream::Stdout,
                        bytes::Bytes::from(format!("{}\n", self.plan.redact(line))),
                    )
                    .await;
                }
                let effects = Effects {
                    logs: Vec::new(),
                    ..effects
                };
                apply_effects(&self.plan, &self.events, Some(step), effects).await;
                let (outcome, script_outputs) = match value {
                    Ok(v) => {
                        output.insert("value".into(), v.clone());
                        (AttemptOutcome::Exited { code: 0 }, v.try_cast::<Map>())
                    }
                    Err(e) => (
                        AttemptOutcome::Failed {
                            failure: FailureKind::Script,
                            message: expr_failure(&self.plan, "`script`", script, &e),
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
        // Where it ran is the attempt's target, recorded beside the command.
        let shown = self.plan.redact(&rendered.command);
        emit(&self.events, started_event(shown, rendered.cwd.clone())).await;
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
                host.map(|h| self.plan.inventory().jump_chain(h))
                    .unwrap_or_default()
            } else {
                Vec::new()
            },
            sudo: spec.sudo,
            pty: spec.pty,
            secrets: self.plan.secret_values(),
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
            details: redact_json(&self.plan, sink.details()),
        }
    }

    /// After an attempt that exited 0: capture, `until`, `check`, `outputs`, `after`. Returns
    /// the step's outputs, or the outcome that replaces success.
    async fn judge(
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
            apply_effects(&self.plan, &self.events, Some(step), effects).await;
            match condition(&self.plan, what, cond, value) {
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
            apply_effects(&self.plan, &self.events, Some(step), effects).await;
            match value {
                Ok(v) => {
                    outputs
                        .get_or_insert_with(Map::new)
                        .insert(name.as_str().into(), v);
                }
                Err(err) => {
                    return Err(fail(
                        FailureKind::Hook,
                        expr_failure(&self.plan, &format!("`outputs.{name}`"), e, &err),
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
            apply_effects(&self.plan, &self.events, Some(step), effects).await;
            if let Err(err) = value {
                return Err(fail(
                    FailureKind::Hook,
                    expr_failure(&self.plan, "`after` hook", after, &err),
                ));
            }
        }
        Ok(outputs)
    }

    /// The step ends without starting another attempt.
    fn stopped(
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

    fn render(
        &self,
        step: &StepSpec,
        host: Option<&Arc<Host>>,
        command: &Template,
        effects: &mut Effects,
    ) -> Result<Rendered, String> {
        let mut scope = self.scope(host);
        let source = &self.plan.runbook.source;
        let what = |field: &str, tpl: &Template, e: RenderError| match &tpl.at {
            Some(at) => {
                let lc = source.line_col(at.at(e.offset).start);
                format!(
                    "in `{field}` at {}:{}:{}: {e}",
                    source.path().display(),
                    lc.line,
                    lc.column
                )
            }
            None => format!("in `{field}`: {e}"),
        };
        let command = command
            .render_with_effects(&self.host, &mut scope, effects)
            .map_err(|e| what("run", command, e))?;
        let mut env = Vec::with_capacity(step.env.len());
        for (name, tpl) in &step.env {
            env.push((
                name.clone(),
                tpl.render_with_effects(&self.host, &mut scope, effects)
                    .map_err(|e| what(&format!("env.{name}"), tpl, e))?,
            ));
        }
        let cwd = match &step.cwd {
            Some(tpl) => self.plan.workdir.join(
                tpl.render_with_effects(&self.host, &mut scope, effects)
                    .map_err(|e| what("cwd", tpl, e))?,
            ),
            None => self.plan.workdir.clone(),
        };
        Ok(Rendered {
            command,
            env,
            cwd,
            spec: serde_json::Value::Null,
        })
    }

    /// Renders a step kind's settings. A string that is one whole `{{ expr }}` keeps the
    /// expression's type (`port = "{{ params.port }}"` stays a number).
    fn render_spec(
        &self,
        table: &Spec,
        host: Option<&Arc<Host>>,
        effects: &mut Effects,
    ) -> Result<serde_json::Value, String> {
        let mut scope = self.scope(host);
        let source = &self.plan.runbook.source;
        fn go(
            this: &StepTask,
            spec: &Spec,
            key: &str,
            scope: &mut Scope<'static>,
            effects: &mut Effects,
            source: &crate::source::Source,
        ) -> Result<serde_json::Value, String> {
            Ok(match spec {
                Spec::Value(v) => v.clone(),
                Spec::Array(items) => serde_json::Value::Array(
                    items
                        .iter()
                        .map(|i| go(this, i, key, scope, effects, source))
                        .collect::<Result<_, _>>()?,
                ),
                Spec::Table(entries) => serde_json::Value::Object(
                    entries
                        .iter()
                        .map(|(k, v)| Ok((k.clone(), go(this, v, k, scope, effects, source)?)))
                        .collect::<Result<_, String>>()?,
                ),
                Spec::Template(t) => {
                    let place = |offset: usize| match &t.at {
                        Some(at) => {
                            let lc = source.line_col(at.at(offset).start);
                            format!(" at {}:{}:{}", source.path().display(), lc.line, lc.column)
                        }
                        None => String::new(),
                    };
                    if let [crate::template::Part::Expr { expr, offset }] = t.parts() {
                        let (value, more) = this.host.eval_with_effects(expr, scope);
                        effects.merge(more);
                        let v = value.map_err(|e| {
                            format!(
                                "in `{key}`{}: expression `{}` failed: {}",
                                place(*offset),
                                expr.text.trim(),
                                e.message
                            )
                        })?;
                        dynamic_to_json(&v)
                    } else {
                        serde_json::Value::String(
                            t.render_with_effects(&this.host, scope, effects)
                                .map_err(|e| format!("in `{key}`{}: {e}", place(e.offset)))?,
                        )
                    }
                }
            })
        }
        go(self, table, "", &mut scope, effects, source)
    }

    async fn collect(&self, spec: &StepSpec, host: Option<&Arc<Host>>, cwd: &std::path::Path) {
        let step = self.step();
        let mut scope = self.scope(host);
        for tpl in &spec.collect {
            let message = match tpl.render(&self.host, &mut scope) {
                Ok(name) => {
                    let (receipt, copied) = crate::event::Receipt::new();
                    emit(
                        &self.events,
                        RunEvent::Collect {
                            at: Utc::now(),
                            receipt,
                            step: step.id.clone(),
                            path: cwd.join(&name),
                            name,
                        },
                    )
                    .await;
                    // Completes when the recorder has copied the file.
                    if self.barrier {
                        let _ = copied.await;
                    }
                    continue;
                }
                Err(e) => format!("step `{}`: could not collect `{}`: {e}", step.id, tpl.raw()),
            };
            emit(
                &self.events,
                RunEvent::Note {
                    at: Utc::now(),
                    message,
                },
            )
            .await;
        }
    }
}

/// A drill's objectives against what the run measured. The clock runs from the first start
/// to the first stop after it; the RPO is the restored data's age when the clock started.
fn measure_drill(
    host: &ExprHost,
    plan: &Plan,
    spec: &crate::runbook::DrillSpec,
    scope: &mut Scope<'_>,
    status: RunStatus,
    run_started: chrono::DateTime<Utc>,
) -> crate::event::DrillReport {
    use crate::event::{DrillReport, Objective, Verdict};
    let clock = plan.clock.lock().map(|c| c.clone()).unwrap_or_default();
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
                    Err(err) => Err(expr_failure(plan, "`restored_data_time`", e, &err)),
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

/// A random number in [0, 1) for retry jitter.
fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Failed hosts grouped by why, in the order they first appear: `a, b (exit code 1: FAIL os:
/// …); c (refused)`. Fifty hosts failing the same way make one short line, not fifty. Reasons
/// that differ only by naming their own host (``connection to `a` (10.0.0.1:22) refused``)
/// count as the same: the group says ``connection to each host refused``.
fn hosts_by_reason(failures: &[(&str, &str)]) -> String {
    const NAMES_SHOWN: usize = 8;
    // (generic reason, first host's own reason, hosts)
    let mut groups: Vec<(String, &str, Vec<&str>)> = Vec::new();
    for (host, reason) in failures {
        let generic = generic_reason(reason, host);
        match groups.iter_mut().find(|(g, _, _)| *g == generic) {
            Some((_, _, hosts)) => hosts.push(host),
            None => groups.push((generic, reason, vec![host])),
        }
    }
    groups
        .iter()
        .map(|(generic, own, hosts)| {
            let mut names = hosts
                .iter()
                .take(NAMES_SHOWN)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            if hosts.len() > NAMES_SHOWN {
                names.push_str(&format!(" and {} more", hosts.len() - NAMES_SHOWN));
            }
            let reason: &str = if hosts.len() == 1 { own } else { generic };
            format!("{names} ({reason})")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `reason` with its own host's name, and the address in parentheses right after it, replaced
/// by "each host".
fn generic_reason(reason: &str, host: &str) -> String {
    let quoted = format!("`{host}`");
    let Some(at) = reason.find(&quoted) else {
        return reason.to_string();
    };
    let mut rest = &reason[at + quoted.len()..];
    if let Some(inner) = rest.strip_prefix(" (") {
        if let Some(end) = inner.find(')') {
            if !inner[..end].contains(char::is_whitespace) {
                rest = &inner[end + 1..];
            }
        }
    }
    format!(
        "{}each host{}",
        &reason[..at],
        rest.replace(&quoted, "the host")
    )
}

#[cfg(test)]
mod tests {
    use super::hosts_by_reason;

    #[test]
    fn failed_hosts_are_grouped_by_reason_and_long_groups_are_cut() {
        let many: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
        let mut failures: Vec<(&str, &str)> =
            vec![("s1", "refused"), ("s2", "exit code 1: FAIL os")];
        failures.extend(many.iter().map(|h| (h.as_str(), "exit code 1: FAIL os")));
        failures.push(("s3", "refused"));
        assert_eq!(
            hosts_by_reason(&failures),
            "s1, s3 (refused); s2, w0, w1, w2, w3, w4, w5, w6 and 3 more (exit code 1: FAIL os)"
        );
    }

    #[test]
    fn reasons_that_only_name_their_own_host_are_one_group() {
        let failures = [
            (
                "n1",
                "connection to `n1` (10.0.0.1:22) refused (after 3 attempts)",
            ),
            (
                "n2",
                "connection to `n2` ([fd00::2]:2222) refused (after 3 attempts)",
            ),
            (
                "n3",
                "authentication as `root` on `n3` failed; tried: agent",
            ),
            ("n4", "connecting to `n4` timed out after 10.0s"),
        ];
        assert_eq!(
            hosts_by_reason(&failures),
            "n1, n2 (connection to each host refused (after 3 attempts)); \
             n3 (authentication as `root` on `n3` failed; tried: agent); \
             n4 (connecting to `n4` timed out after 10.0s)"
        );
        let same = [
            (
                "n1",
                "no key exchange algorithm in common with `n1`: the server offers a",
            ),
            (
                "n2",
                "no key exchange algorithm in common with `n2`: the server offers a",
            ),
        ];
        assert_eq!(
            hosts_by_reason(&same),
            "n1, n2 (no key exchange algorithm in common with each host: the server offers a)"
        );
    }
}
