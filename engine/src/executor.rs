//! The executor: runs a [`Plan`] on tokio. A step starts as soon as everything it needs has
//! succeeded, at most `parallel` attempts run at once, retries follow the step's policy, and
//! every state change is sent as a [`RunEvent`].
//!
//! Failure policy: the first failure (of a step without `continue_on_failure`) halts the run:
//! attempts already running finish, but no new step or retry starts, except `always` steps.
//! Steps whose needs failed or were skipped are skipped with the reason.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::event::{AttemptOutcome, FailureKind, RunEvent, RunStatus, StepStatus, Target};
use crate::expr::ExprHost;
use crate::graph::StepIdx;
use crate::plan::{Plan, RunInfo};
use crate::runbook::{Action, StepSpec};
use crate::runner::{AttemptContext, OutputSink, StepRunner};

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

pub struct Executor {
    plan: Arc<Plan>,
    runner: Arc<dyn StepRunner>,
    host: ExprHost,
    run: RunInfo,
    parallel: usize,
    events: mpsc::Sender<RunEvent>,
    cancel: CancellationToken,
}

/// What a step task hands back to the scheduler loop.
struct StepResult {
    status: StepStatus,
    attempts: u32,
    duration: Duration,
    reason: Option<String>,
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
        }
    }

    pub async fn run(self) -> RunReport {
        let plan = self.plan.clone();
        let steps = &plan.runbook.steps;
        let n = steps.len();
        let started = Instant::now();
        emit(
            &self.events,
            RunEvent::RunStarted {
                at: self.run.started_at,
                run_id: self.run.id.clone(),
                runbook: plan.runbook.meta.name.clone(),
                steps: n,
            },
        )
        .await;

        let mut state = vec![State::Waiting; n];
        // A need is satisfied when it succeeded, was left out by selection, or failed with
        // `continue_on_failure`.
        let mut satisfied = vec![false; n];
        let mut reports: Vec<Option<StepReport>> = vec![None; n];
        let mut unfinished_needs: Vec<usize> =
            (0..n).map(|i| plan.graph.needs(i).count()).collect();
        let mut ready: VecDeque<StepIdx> = (0..n).filter(|&i| unfinished_needs[i] == 0).collect();
        let halted = Arc::new(AtomicBool::new(false));
        let mut halted_by: Option<String> = None;
        let semaphore = Arc::new(Semaphore::new(self.parallel));
        let mut tasks: JoinSet<(StepIdx, StepResult)> = JoinSet::new();

        loop {
            while let Some(i) = ready.pop_front() {
                let step = &steps[i];
                let decision = if !plan.selected[i] {
                    Some((StepStatus::Skipped, "not selected".to_owned(), true))
                } else if self.cancel.is_cancelled() {
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
                    Some((
                        StepStatus::Skipped,
                        format!("not started: the run stopped after `{by}` failed"),
                        false,
                    ))
                } else {
                    None
                };
                if let Some((status, reason, counts_as_satisfied)) = decision {
                    state[i] = State::Done(status);
                    satisfied[i] = counts_as_satisfied;
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
                        },
                    )
                    .await;
                    release(&plan, i, &mut unfinished_needs, &mut ready);
                    continue;
                }
                state[i] = State::Running;
                let task = StepTask {
                    plan: plan.clone(),
                    runner: self.runner.clone(),
                    host: self.host.clone(),
                    run: self.run.clone(),
                    events: self.events.clone(),
                    cancel: self.cancel.clone(),
                    semaphore: semaphore.clone(),
                    halted: halted.clone(),
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
                || (result.status == StepStatus::Failed && step.continue_on_failure);
            if result.status == StepStatus::Failed
                && !step.continue_on_failure
                && halted_by.is_none()
            {
                halted_by = Some(step.id.to_string());
                halted.store(true, Ordering::SeqCst);
            }
            emit(
                &self.events,
                RunEvent::StepFinished {
                    at: Utc::now(),
                    step: step.id.clone(),
                    status: result.status,
                    attempts: result.attempts,
                    duration: result.duration,
                    reason: result.reason.clone(),
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
        let status = if self.cancel.is_cancelled() {
            RunStatus::Cancelled
        } else if failed {
            RunStatus::Failed
        } else {
            RunStatus::Succeeded
        };
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

/// One step's attempts, retries and collection, run as its own task.
struct StepTask {
    plan: Arc<Plan>,
    runner: Arc<dyn StepRunner>,
    host: ExprHost,
    run: RunInfo,
    events: mpsc::Sender<RunEvent>,
    cancel: CancellationToken,
    semaphore: Arc<Semaphore>,
    halted: Arc<AtomicBool>,
    index: StepIdx,
}

/// A step's templates, rendered for one attempt.
struct Rendered {
    command: String,
    env: Vec<(String, String)>,
    cwd: PathBuf,
}

impl StepTask {
    fn step(&self) -> &StepSpec {
        &self.plan.runbook.steps[self.index]
    }

    async fn run(self) -> StepResult {
        let step = self.step();
        let target: Target = Arc::from("local");
        let started = Instant::now();
        let mut attempts = 0;
        let mut last_failure: Option<String> = None;
        let mut cwd_for_collect = self.plan.workdir.clone();
        let max = step.retry.attempts;
        let finish = |status, attempts, reason: Option<String>| StepResult {
            status,
            attempts,
            duration: started.elapsed(),
            reason,
        };

        for attempt in 1..=max {
            let permit = tokio::select! {
                permit = self.semaphore.clone().acquire_owned() => permit.ok(),
                () = self.cancel.cancelled() => None,
            };
            if self.cancel.is_cancelled() || permit.is_none() {
                return self
                    .stopped(
                        attempts,
                        started,
                        "cancelled",
                        StepStatus::Cancelled,
                        last_failure,
                    )
                    .await;
            }
            if self.halted.load(Ordering::SeqCst) && !step.always {
                return self
                    .stopped(
                        attempts,
                        started,
                        "the run stopped after another step failed",
                        StepStatus::Failed,
                        last_failure,
                    )
                    .await;
            }
            if attempt == 1 {
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
            let rendered = self.render();
            let (outcome, counts) = match rendered {
                Err(message) => {
                    emit(
                        &self.events,
                        RunEvent::AttemptStarted {
                            at: Utc::now(),
                            step: step.id.clone(),
                            target: target.clone(),
                            attempt,
                            max_attempts: max,
                            command: self.plan.redactor.redact_str(&raw_command(step)),
                            cwd: self.plan.workdir.clone(),
                        },
                    )
                    .await;
                    let outcome = AttemptOutcome::Failed {
                        failure: FailureKind::Template,
                        message: self.plan.redactor.redact_str(&message),
                    };
                    (outcome, Default::default())
                }
                Ok(r) => {
                    cwd_for_collect = r.cwd.clone();
                    emit(
                        &self.events,
                        RunEvent::AttemptStarted {
                            at: Utc::now(),
                            step: step.id.clone(),
                            target: target.clone(),
                            attempt,
                            max_attempts: max,
                            command: self.plan.redactor.redact_str(&r.command),
                            cwd: r.cwd.clone(),
                        },
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
                    };
                    let mut sink = OutputSink::new(
                        self.events.clone(),
                        step.id.clone(),
                        target.clone(),
                        attempt,
                    );
                    let outcome = self.runner.run(ctx, &mut sink).await;
                    (outcome, sink.counts())
                }
            };
            drop(permit);
            emit(
                &self.events,
                RunEvent::AttemptFinished {
                    at: Utc::now(),
                    step: step.id.clone(),
                    target: target.clone(),
                    attempt,
                    duration: attempt_start.elapsed(),
                    outcome: outcome.clone(),
                    output: counts,
                },
            )
            .await;
            if outcome.succeeded() {
                self.collect(&cwd_for_collect).await;
                return finish(StepStatus::Succeeded, attempts, None);
            }
            if outcome == AttemptOutcome::Cancelled {
                self.collect(&cwd_for_collect).await;
                return finish(
                    StepStatus::Cancelled,
                    attempts,
                    Some("cancelled while running".into()),
                );
            }
            last_failure = Some(outcome.describe());
            if !outcome.retryable() || attempt == max {
                break;
            }
            let delay = step.retry.delay_before(attempt + 1, random_unit());
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
            (Some(f), n) if n > 1 => format!("{f} (after {n} attempts)"),
            (Some(f), _) => f,
            (None, _) => "failed".into(),
        };
        finish(StepStatus::Failed, attempts, Some(reason))
    }

    /// The step ends without starting another attempt.
    async fn stopped(
        &self,
        attempts: u32,
        started: Instant,
        why: &str,
        status_if_started: StepStatus,
        last_failure: Option<String>,
    ) -> StepResult {
        if attempts == 0 {
            return StepResult {
                status: StepStatus::Skipped,
                attempts: 0,
                duration: started.elapsed(),
                reason: Some(format!("not started: {why}")),
            };
        }
        let reason = match last_failure {
            Some(f) => format!("{f}; no retry: {why}"),
            None => why.to_owned(),
        };
        StepResult {
            status: status_if_started,
            attempts,
            duration: started.elapsed(),
            reason: Some(reason),
        }
    }

    fn render(&self) -> Result<Rendered, String> {
        let step = self.step();
        let mut scope = self.plan.scope(&self.run);
        let what = |field: &str, e: crate::template::RenderError| format!("in `{field}`: {e}");
        let command = match &step.action {
            Action::Run { command } => command
                .render(&self.host, &mut scope)
                .map_err(|e| what("run", e))?,
        };
        let mut env = Vec::with_capacity(step.env.len());
        for (name, tpl) in &step.env {
            env.push((
                name.clone(),
                tpl.render(&self.host, &mut scope)
                    .map_err(|e| what(&format!("env.{name}"), e))?,
            ));
        }
        let cwd = match &step.cwd {
            Some(tpl) => self.plan.workdir.join(
                tpl.render(&self.host, &mut scope)
                    .map_err(|e| what("cwd", e))?,
            ),
            None => self.plan.workdir.clone(),
        };
        Ok(Rendered { command, env, cwd })
    }

    async fn collect(&self, cwd: &std::path::Path) {
        let step = self.step();
        let mut scope = self.plan.scope(&self.run);
        for tpl in &step.collect {
            let message = match tpl.render(&self.host, &mut scope) {
                Ok(name) => {
                    emit(
                        &self.events,
                        RunEvent::Collect {
                            at: Utc::now(),
                            step: step.id.clone(),
                            path: cwd.join(&name),
                            name,
                        },
                    )
                    .await;
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

fn raw_command(step: &StepSpec) -> String {
    match &step.action {
        Action::Run { command } => command.raw().to_owned(),
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
