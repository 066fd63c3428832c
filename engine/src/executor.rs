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

use crate::event::{
    AttemptOutcome, FailureKind, OutputCounts, RunEvent, RunStatus, StepStatus, Stream, Target,
};
use crate::expr::{display_value, dynamic_to_json, truthy, Effects, EvalError, ExprHost};
use crate::graph::StepIdx;
use crate::plan::{Plan, RunInfo};
use crate::runbook::{Action, Capture, SpannedExpr, StepSpec};
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
                run_failure = Some(message);
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
                    halted: halted.clone(),
                    results: results.clone(),
                    index: i,
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
            if run_hook(
                &self.host,
                &plan,
                &self.events,
                "after_run",
                hook,
                &mut scope,
                None,
            )
            .await
            .is_err()
                && status == RunStatus::Succeeded
            {
                status = RunStatus::Failed;
            }
        }
        let finished_at = Utc::now();
        emit(
            &self.events,
            RunEvent::RunFinished {
                at: finished_at,
                status,
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
    let text = e.expr.text.trim();
    let shown = if text.lines().count() > 1 || text.len() > 60 {
        String::new()
    } else {
        format!(" `{text}`")
    };
    plan.redact(&format!("{what}{shown} failed at {loc}: {}", err.message))
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
    halted: Arc<OnceLock<String>>,
    results: Results,
    index: StepIdx,
}

/// A step's templates, rendered for one attempt.
struct Rendered {
    command: String,
    env: Vec<(String, String)>,
    cwd: PathBuf,
}

/// How an attempt went, before the result expressions looked at it.
struct AttemptRun {
    outcome: AttemptOutcome,
    counts: OutputCounts,
    output: Map,
    /// A `script` step's returned map.
    script_outputs: Option<Map>,
}

impl StepTask {
    fn step(&self) -> &StepSpec {
        &self.plan.runbook.steps[self.index]
    }

    /// The scope for this step's expressions: params, run, env and the steps it reads.
    fn scope(&self) -> Scope<'static> {
        let mut scope = self.plan.scope(&self.run);
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
        let started = Instant::now();
        let result = self.run_inner(started).await;
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
    async fn run_inner(&self, started: Instant) -> StepResult {
        let step = self.step();
        let target: Target = Arc::from("local");
        let finish = |status, attempts, reason: Option<String>| StepResult {
            status,
            attempts,
            duration: started.elapsed(),
            reason,
            outputs: None,
            skipped_by_when: false,
            deferred: false,
        };

        if let Some(when) = &step.when {
            let (value, effects) = self.host.eval_with_effects(&when.expr, &mut self.scope());
            apply_effects(&self.plan, &self.events, Some(step), effects).await;
            match value
                .map_err(|e| expr_failure(&self.plan, "`when`", when, &e))
                .and_then(|v| truthy(&v).map_err(|e| format!("`when` must be true or false: {e}")))
            {
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
                    self.scope()
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
        let mut attempts = offset;
        let mut last_failure: Option<String> = None;
        let mut cwd_for_collect = self.plan.workdir.clone();
        let max = offset + step.retry.attempts;
        for attempt in offset + 1..=max {
            let permit = tokio::select! {
                permit = self.semaphore.clone().acquire_owned() => permit.ok(),
                () = self.cancel.cancelled() => None,
            };
            if self.cancel.is_cancelled() || permit.is_none() {
                if attempts > offset {
                    self.collect(&cwd_for_collect).await;
                }
                return self.stopped(
                    attempts,
                    offset,
                    started,
                    "cancelled",
                    StepStatus::Cancelled,
                    last_failure,
                );
            }
            if let (Some(why), false) = (self.halted.get(), step.always) {
                if attempts > offset {
                    self.collect(&cwd_for_collect).await;
                }
                return self.stopped(
                    attempts,
                    offset,
                    started,
                    why,
                    StepStatus::Failed,
                    last_failure,
                );
            }
            if attempt == offset + 1 {
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
            let mut run = self
                .attempt(attempt, max, &target, &mut cwd_for_collect)
                .await;
            let mut outputs = None;
            if run.outcome.succeeded() {
                match self.judge(&mut run).await {
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
                },
            )
            .await;
            // Keep the latest attempt's output for downstream expressions and hooks.
            if let Ok(mut r) = self.results.lock() {
                r[self.index] = Some(run.output.clone());
            }
            if run.outcome.succeeded() {
                self.collect(&cwd_for_collect).await;
                let outputs_json = outputs.as_ref().map(|m| {
                    serde_json::Value::Object(
                        m.iter()
                            .map(|(k, v)| (k.to_string(), dynamic_to_json(v)))
                            .collect(),
                    )
                });
                if let Some(o) = outputs {
                    run.output.insert("outputs".into(), Dynamic::from_map(o));
                    if let Ok(mut r) = self.results.lock() {
                        r[self.index] = Some(run.output.clone());
                    }
                }
                return StepResult {
                    outputs: outputs_json.map(|j| {
                        serde_json::from_str(&self.plan.redact(&j.to_string())).unwrap_or(j)
                    }),
                    ..finish(StepStatus::Succeeded, attempts, None)
                };
            }
            if run.outcome == AttemptOutcome::Cancelled {
                self.collect(&cwd_for_collect).await;
                return finish(
                    StepStatus::Cancelled,
                    attempts,
                    Some("cancelled while running".into()),
                );
            }
            last_failure = Some(run.outcome.describe());
            if !run.outcome.retryable() || attempt == max {
                break;
            }
            let delay = step.retry.delay_before(attempt + 1, random_unit());
            if let Some(deadline) = step.retry.deadline {
                if started.elapsed() + delay > deadline {
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
                    next_attempt: attempt + 1,
                    delay,
                },
            )
            .await;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.cancel.cancelled() => {
                    self.collect(&cwd_for_collect).await;
                    return finish(StepStatus::Cancelled, attempts, Some(format!("cancelled while waiting to retry; last attempt: {}", last_failure.unwrap_or_default())));
                }
            }
        }
        self.collect(&cwd_for_collect).await;
        let reason = match (last_failure, attempts) {
            (Some(f), n) if n - offset > 1 => format!("{f} (after {} attempts)", n - offset),
            (Some(f), _) => f,
            (None, _) => "failed".into(),
        };
        finish(StepStatus::Failed, attempts, Some(reason))
    }

    /// Runs one attempt of the step's action.
    async fn attempt(
        &self,
        attempt: u32,
        max: u32,
        target: &Target,
        cwd_for_collect: &mut PathBuf,
    ) -> AttemptRun {
        let step = self.step();
        let mut output = Map::new();
        output.insert("attempt".into(), Dynamic::from_int(i64::from(attempt)));
        let started_event = |command: String, cwd: PathBuf| RunEvent::AttemptStarted {
            at: Utc::now(),
            step: step.id.clone(),
            target: target.clone(),
            attempt,
            max_attempts: max,
            command,
            cwd,
        };
        match &step.action {
            Action::Script { script } => {
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
                let mut sink = OutputSink::new(
                    self.events.clone(),
                    step.id.clone(),
                    target.clone(),
                    attempt,
                );
                let mut scope = self.scope();
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
                AttemptRun {
                    outcome,
                    counts: sink.counts(),
                    output,
                    script_outputs,
                }
            }
            Action::Run { command } => {
                let mut effects = Effects::default();
                let rendered = self.render(command, &mut effects);
                apply_effects(&self.plan, &self.events, Some(step), effects).await;
                match rendered {
                    Err(message) => {
                        emit(
                            &self.events,
                            started_event(
                                self.plan.redact(command.raw()),
                                self.plan.workdir.clone(),
                            ),
                        )
                        .await;
                        let outcome = AttemptOutcome::Failed {
                            failure: FailureKind::Template,
                            message: self.plan.redact(&message),
                        };
                        AttemptRun {
                            outcome,
                            counts: OutputCounts::default(),
                            output,
                            script_outputs: None,
                        }
                    }
                    Ok(r) => {
                        cwd_for_collect.clone_from(&r.cwd);
                        emit(
                            &self.events,
                            started_event(self.plan.redact(&r.command), r.cwd.clone()),
                        )
                        .await;
                        let ctx = AttemptContext {
                            step: step.id.clone(),
                            target: target.clone(),
                            attempt,
                            command: r.command,
                            shell: step.shell.clone(),
                            env: r.env,
                            cwd: r.cwd,
                            timeout: step.timeout,
                            kill_grace: step.kill_grace,
                            cancel: self.cancel.clone(),
                            force: self.force.clone(),
                            run_id: self.run.id.clone(),
                        };
                        let mut sink = OutputSink::new(
                            self.events.clone(),
                            step.id.clone(),
                            target.clone(),
                            attempt,
                        );
                        let outcome = self.runner.run(ctx, &mut sink).await;
                        output.insert(
                            "exit_code".into(),
                            outcome
                                .exit_code()
                                .map_or(Dynamic::UNIT, |c| Dynamic::from_int(i64::from(c))),
                        );
                        output.insert("stdout".into(), sink.tail(Stream::Stdout).into());
                        output.insert("stderr".into(), sink.tail(Stream::Stderr).into());
                        AttemptRun {
                            outcome,
                            counts: sink.counts(),
                            output,
                            script_outputs: None,
                        }
                    }
                }
            }
        }
    }

    /// After an attempt that exited 0: capture, `until`, `check`, `outputs`, `after`. Returns
    /// the step's outputs, or the outcome that replaces success.
    async fn judge(&self, run: &mut AttemptRun) -> Result<Option<Map>, AttemptOutcome> {
        let step = self.step();
        let fail = |failure, message: String| AttemptOutcome::Failed { failure, message };
        if step.capture == Capture::Json {
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
            run.output.insert("json".into(), Dynamic::UNIT);
        }
        let mut scope = self.scope();
        scope.push_constant("output", Dynamic::from_map(run.output.clone()));
        let eval = |e: &SpannedExpr, scope: &mut Scope<'static>| {
            self.host.eval_with_effects(&e.expr, scope)
        };

        // `until` false is retried (the polling idiom); `check` false is final.
        let conditions = [
            (
                &step.until,
                "`until`",
                FailureKind::Until,
                "`until` is still false",
            ),
            (&step.check, "`check`", FailureKind::Check, "check failed"),
        ];
        for (cond, what, kind, when_false) in conditions {
            let Some(cond) = cond else { continue };
            let (value, effects) = eval(cond, &mut scope);
            apply_effects(&self.plan, &self.events, Some(step), effects).await;
            match value
                .map_err(|e| expr_failure(&self.plan, what, cond, &e))
                .and_then(|v| truthy(&v))
            {
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
        for (name, e) in &step.outputs {
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
        if let Some(after) = &step.after {
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
        started: Instant,
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
            duration: started.elapsed(),
            reason: Some(reason),
            outputs: None,
            skipped_by_when: false,
            deferred: false,
        }
    }

    fn render(&self, command: &Template, effects: &mut Effects) -> Result<Rendered, String> {
        let step = self.step();
        let mut scope = self.scope();
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
        Ok(Rendered { command, env, cwd })
    }

    async fn collect(&self, cwd: &std::path::Path) {
        let step = self.step();
        let mut scope = self.scope();
        for tpl in &step.collect {
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

/// A random number in [0, 1) for retry jitter.
fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}
