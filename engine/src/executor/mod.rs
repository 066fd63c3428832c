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
use crate::event::{Receipt, TargetResult};
use crate::expr::{display_value, dynamic_to_json, truthy, Effects, EvalError, ExprHost};
use crate::graph::StepIdx;
use crate::inventory::Host;
use crate::model::Selector;
use crate::plan::{Plan, RunInfo};
use crate::run_state::RunState;
use crate::runbook::{Action, Budget, Capture, Gate, SpannedExpr, Spec, StepSpec, StrategyKind};
use crate::runner::{
    Approval, Approver, AttemptContext, BecomePassword, NoApprover, OutputSink, StepRunner,
};
use crate::template::{RenderError, Template};

mod attempt;
mod collect;
mod drill;
mod effects;
mod expressions;
mod fan_out;
mod judge;
mod render;
mod scheduler;
mod step;

use drill::measure_drill;
use effects::apply_effects;
use expressions::{condition, expr_failure, push_steps, record_result, run_hook, run_map};
use render::redact_json;

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
    /// What changes as the run goes: runtime secrets, added hosts, the drill clock.
    state: Arc<RunState>,
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

/// One step's attempts, retries and collection, run as its own task.
#[derive(Clone)]
struct StepTask {
    plan: Arc<Plan>,
    state: Arc<RunState>,
    runner: Arc<dyn StepRunner>,
    host: ExprHost,
    run: RunInfo,
    events: mpsc::Sender<RunEvent>,
    cancel: CancellationToken,
    force: CancellationToken,
    /// The third interrupt: what stops `run_on_cancel` work (block sub-steps included).
    abort: CancellationToken,
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
    /// In a block's sub-step: the sub-steps before it on the same host (`block.<id>`).
    block: Option<Map>,
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

    /// A host an earlier run of the bundle finished with success (resume).
    fn succeeded_earlier(attempts: u32) -> Self {
        TargetRun {
            status: StepStatus::Succeeded,
            attempts,
            reason: Some("succeeded earlier".into()),
            output: None,
            outputs: None,
        }
    }

    /// Outputs as recorded in evidence, secrets redacted.
    fn outputs_json(&self, state: &RunState) -> Option<serde_json::Value> {
        self.outputs.as_ref().map(|m| outputs_json(m, state))
    }
}

/// A step's outputs as evidence records them, secrets redacted.
pub(super) fn outputs_json(outputs: &Map, state: &RunState) -> serde_json::Value {
    let j = serde_json::Value::Object(
        outputs
            .iter()
            .map(|(k, v)| (k.to_string(), dynamic_to_json(v)))
            .collect(),
    );
    serde_json::from_str(&state.redact(&j.to_string())).unwrap_or(j)
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

/// Sends an event that announces an effect and, with the record barrier, waits until the
/// consumer has it in the journal (write-ahead). `false`: it could not be recorded, and what it
/// announces must not happen.
pub(super) async fn announce(
    events: &mpsc::Sender<RunEvent>,
    barrier: bool,
    event: impl FnOnce(crate::event::Receipt) -> RunEvent,
) -> bool {
    let (receipt, answer) = crate::event::Receipt::new();
    emit(events, event(receipt)).await;
    !barrier || crate::event::recorded(answer).await
}

pub(super) async fn emit(events: &mpsc::Sender<RunEvent>, event: RunEvent) {
    // Consumers only go away when the process is shutting down; nothing to do then.
    let _ = events.send(event).await;
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
            state: Arc::new(RunState::new(&plan)),
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
}
