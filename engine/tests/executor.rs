//! Scheduler behaviour, tested with a scripted fake runner under tokio's paused clock: these
//! tests are about ordering, limits, retries and failure policy, not about processes (the
//! process runner is tested against real processes in the root crate's tests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runbook_engine::event::{AttemptOutcome, RunEvent, RunStatus, StepStatus};
use runbook_engine::executor::{Executor, RunReport};
use runbook_engine::expr::ExprHost;
use runbook_engine::params::BoundParams;
use runbook_engine::plan::{Plan, RunInfo, Selection};
use runbook_engine::runner::{AttemptContext, BoxFuture, OutputSink, StepRunner};
use runbook_engine::Source;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Per step: how long each attempt takes and what it returns, in order (the last entry repeats).
#[derive(Default)]
struct Script {
    steps: HashMap<String, Vec<(Duration, i32)>>,
}

#[derive(Default)]
struct Observed {
    running: usize,
    max_running: usize,
    /// (step, attempt, start, end) in virtual time since the test began.
    spans: Vec<(String, u32, Duration, Duration)>,
}

struct FakeRunner {
    script: Script,
    observed: Arc<Mutex<Observed>>,
    t0: Instant,
}

impl StepRunner for FakeRunner {
    fn run<'a>(
        &'a self,
        ctx: AttemptContext,
        _out: &'a mut OutputSink,
    ) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move {
            let plan = self
                .script
                .steps
                .get(ctx.step.as_str())
                .cloned()
                .unwrap_or_default();
            let idx = (ctx.attempt as usize - 1).min(plan.len().saturating_sub(1));
            let (took, code) = plan
                .get(idx)
                .copied()
                .unwrap_or((Duration::from_millis(10), 0));
            let start = self.t0.elapsed();
            {
                let mut o = self.observed.lock().expect("lock");
                o.running += 1;
                o.max_running = o.max_running.max(o.running);
            }
            let outcome = tokio::select! {
                () = tokio::time::sleep(took) => AttemptOutcome::Exited { code },
                () = ctx.cancel.cancelled() => AttemptOutcome::Cancelled,
            };
            let mut o = self.observed.lock().expect("lock");
            o.running -= 1;
            o.spans
                .push((ctx.step.to_string(), ctx.attempt, start, self.t0.elapsed()));
            outcome
        })
    }
}

struct Outcome {
    report: RunReport,
    events: Vec<RunEvent>,
    observed: Observed,
}

impl Outcome {
    fn step(&self, id: &str) -> &runbook_engine::executor::StepReport {
        self.report
            .steps
            .iter()
            .find(|s| s.id == id)
            .expect("step in report")
    }

    fn span(&self, id: &str) -> (Duration, Duration) {
        let spans: Vec<_> = self.observed.spans.iter().filter(|s| s.0 == id).collect();
        (spans.first().expect("ran").2, spans.last().expect("ran").3)
    }
}

async fn run(
    toml: &str,
    script: &[(&str, &[(u64, i32)])],
    parallel: usize,
    cancel_after: Option<Duration>,
) -> Outcome {
    let host = ExprHost::new();
    let source = Source::new("test.toml", toml);
    let (runbook, graph, _) =
        runbook_engine::compile(&source, &host).unwrap_or_else(|d| panic!("{d}"));
    let params = BoundParams::bind(&runbook, &[], |_| None).expect("params");
    let plan = Plan::new(
        runbook,
        graph,
        params,
        &Selection::default(),
        std::env::temp_dir(),
    )
    .expect("plan");
    let observed = Arc::new(Mutex::new(Observed::default()));
    let runner = FakeRunner {
        script: Script {
            steps: script
                .iter()
                .map(|(id, s)| {
                    (
                        id.to_string(),
                        s.iter()
                            .map(|(ms, c)| (Duration::from_millis(*ms), *c))
                            .collect(),
                    )
                })
                .collect(),
        },
        observed: observed.clone(),
        t0: Instant::now(),
    };
    let (tx, mut rx) = mpsc::channel::<RunEvent>(16);
    let collector = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            e.acknowledge();
            events.push(e);
        }
        events
    });
    let cancel = CancellationToken::new();
    if let Some(after) = cancel_after {
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            c.cancel();
        });
    }
    let exec = Executor::new(
        Arc::new(plan),
        Arc::new(runner),
        host,
        RunInfo::generate(),
        parallel,
        tx,
        cancel,
    );
    let report = exec.run().await;
    let events = collector.await.expect("collector");
    let observed = Arc::try_unwrap(observed)
        .ok()
        .expect("sole owner")
        .into_inner()
        .expect("lock");
    Outcome {
        report,
        events,
        observed,
    }
}

const HEAD: &str = "[runbook]\nname = \"t\"\n";

#[tokio::test(start_paused = true)]
async fn dependent_waits_and_independent_steps_overlap() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"x\"\n[[steps]]\nid = \"b\"\nrun = \"x\"\n[[steps]]\nid = \"c\"\nneeds = [\"a\", \"b\"]\nrun = \"x\"\n"
    );
    let out = run(
        &toml,
        &[("a", &[(1000, 0)]), ("b", &[(1500, 0)]), ("c", &[(100, 0)])],
        4,
        None,
    )
    .await;
    assert_eq!(out.report.status, RunStatus::Succeeded);
    let (a0, a1) = out.span("a");
    let (b0, b1) = out.span("b");
    let (c0, _) = out.span("c");
    assert!(
        a0 < b1 && b0 < a1,
        "a and b overlap: {a0:?}-{a1:?} vs {b0:?}-{b1:?}"
    );
    assert!(c0 >= a1 && c0 >= b1, "c starts after both needs finished");
    assert_eq!(out.observed.max_running, 2);
}

#[tokio::test(start_paused = true)]
async fn parallel_limit_is_never_exceeded() {
    let mut toml = HEAD.to_owned();
    let mut script = Vec::new();
    for i in 0..12 {
        toml.push_str(&format!("[[steps]]\nid = \"s{i}\"\nrun = \"x\"\n"));
        script.push(format!("s{i}"));
    }
    let timings: &[(u64, i32)] = &[(1000, 0)];
    let script: Vec<(&str, &[(u64, i32)])> = script.iter().map(|s| (s.as_str(), timings)).collect();
    let out = run(&toml, &script, 3, None).await;
    assert_eq!(out.report.status, RunStatus::Succeeded);
    assert_eq!(out.observed.max_running, 3);
    assert_eq!(out.observed.spans.len(), 12, "every step ran exactly once");
}

#[tokio::test(start_paused = true)]
async fn retries_follow_the_backoff_policy() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"flaky\"\nrun = \"x\"\nretry = {{ attempts = 4, backoff = \"exponential\", delay = \"1s\", max_delay = \"10s\" }}\n"
    );
    let out = run(&toml, &[("flaky", &[(10, 1), (10, 1), (10, 0)])], 2, None).await;
    let s = out.step("flaky");
    assert_eq!((s.status, s.attempts), (StepStatus::Succeeded, 3));
    let delays: Vec<Duration> = out
        .events
        .iter()
        .filter_map(|e| match e {
            RunEvent::RetryScheduled { delay, .. } => Some(*delay),
            _ => None,
        })
        .collect();
    assert_eq!(delays, vec![Duration::from_secs(1), Duration::from_secs(2)]);
    // The retry really waited: attempt 3 starts ≥ 1s + 2s after attempt 1.
    let starts: Vec<Duration> = out.observed.spans.iter().map(|s| s.2).collect();
    assert!(
        starts[2] - starts[0] >= Duration::from_secs(3),
        "{starts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_halts_the_run_but_always_steps_still_run() {
    let toml = format!(
        "{HEAD}
[[steps]]
id = \"bad\"
run = \"x\"
[[steps]]
id = \"slow\"
run = \"x\"
[[steps]]
id = \"after-bad\"
needs = [\"bad\"]
run = \"x\"
[[steps]]
id = \"after-slow\"
needs = [\"slow\"]
run = \"x\"
[[steps]]
id = \"cleanup\"
needs = [\"after-bad\"]
always = true
run = \"x\"
"
    );
    let out = run(
        &toml,
        &[("bad", &[(100, 2)]), ("slow", &[(1000, 0)])],
        4,
        None,
    )
    .await;
    assert_eq!(out.report.status, RunStatus::Failed);
    assert_eq!(out.step("bad").status, StepStatus::Failed);
    assert_eq!(
        out.step("slow").status,
        StepStatus::Succeeded,
        "running steps finish"
    );
    let after_bad = out.step("after-bad");
    assert_eq!(after_bad.status, StepStatus::Skipped);
    assert_eq!(
        after_bad.reason.as_deref(),
        Some("needs `bad`, which failed")
    );
    let after_slow = out.step("after-slow");
    assert_eq!(after_slow.status, StepStatus::Skipped);
    assert_eq!(
        after_slow.reason.as_deref(),
        Some("not started: the run stopped after `bad` failed")
    );
    assert_eq!(
        out.step("cleanup").status,
        StepStatus::Succeeded,
        "always runs"
    );
}

#[tokio::test(start_paused = true)]
async fn continue_on_failure_lets_dependents_run() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"optional\"\nrun = \"x\"\ncontinue_on_failure = true\n[[steps]]\nid = \"next\"\nneeds = [\"optional\"]\nrun = \"x\"\n"
    );
    let out = run(&toml, &[("optional", &[(10, 3)])], 2, None).await;
    assert_eq!(out.step("optional").status, StepStatus::Failed);
    assert_eq!(out.step("next").status, StepStatus::Succeeded);
    assert_eq!(out.report.status, RunStatus::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn no_retry_starts_after_the_run_halted() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"bad\"\nrun = \"x\"\n[[steps]]\nid = \"flaky\"\nrun = \"x\"\nretry = {{ attempts = 5, delay = \"1s\" }}\n"
    );
    let out = run(
        &toml,
        &[("bad", &[(500, 1)]), ("flaky", &[(100, 1)])],
        4,
        None,
    )
    .await;
    let flaky = out.step("flaky");
    assert_eq!(flaky.status, StepStatus::Failed);
    assert_eq!(flaky.attempts, 1, "the retry after the halt never started");
    assert!(
        flaky.reason.as_deref().unwrap_or("").contains("no retry"),
        "{flaky:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_stops_running_and_pending_steps() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"long\"\nrun = \"x\"\n[[steps]]\nid = \"later\"\nneeds = [\"long\"]\nrun = \"x\"\n"
    );
    let out = run(
        &toml,
        &[("long", &[(60_000, 0)])],
        2,
        Some(Duration::from_secs(1)),
    )
    .await;
    assert_eq!(out.report.status, RunStatus::Cancelled);
    assert_eq!(out.step("long").status, StepStatus::Cancelled);
    assert_eq!(out.step("later").status, StepStatus::Skipped);
    let (_, end) = out.span("long");
    assert!(
        end < Duration::from_secs(2),
        "cancel reached the attempt promptly: {end:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn every_step_is_reported_once_in_a_wide_dag() {
    let mut toml = HEAD.to_owned();
    for i in 0..200 {
        let needs = if i >= 10 {
            format!("needs = [\"s{}\", \"s{}\"]\n", i - 10, i - 7)
        } else {
            String::new()
        };
        toml.push_str(&format!("[[steps]]\nid = \"s{i}\"\n{needs}run = \"x\"\n"));
    }
    let out = run(&toml, &[], 8, None).await;
    assert_eq!(out.report.steps.len(), 200);
    assert!(out
        .report
        .steps
        .iter()
        .all(|s| s.status == StepStatus::Succeeded && s.attempts == 1));
    let finished = out
        .events
        .iter()
        .filter(|e| matches!(e, RunEvent::StepFinished { .. }))
        .count();
    assert_eq!(finished, 200);
}

/// Regression: a step's duration counted from when its task began to wait for a `--parallel`
/// slot, so a 10 ms step queued behind a 500 ms one reported 0.5 s while its `started_at` and
/// `finished_at` were 10 ms apart. Real time: the executor measures with the wall clock.
#[tokio::test]
async fn duration_does_not_count_the_wait_for_a_parallel_slot() {
    let toml =
        format!("{HEAD}[[steps]]\nid = \"a\"\nrun = \"x\"\n[[steps]]\nid = \"d\"\nrun = \"x\"\n");
    let out = run(&toml, &[("a", &[(500, 0)]), ("d", &[(10, 0)])], 1, None).await;
    assert_eq!(out.report.status, RunStatus::Succeeded);
    let (a0, a1) = out.span("a");
    let (d0, _) = out.span("d");
    assert!(a0 < d0 && d0 >= a1, "d waited for a's slot");
    let d = out.step("d").duration;
    assert!(d < Duration::from_millis(400), "d took {d:?}");
    // The same span as the step's start and end events.
    let at = |want_start: bool| {
        out.events
            .iter()
            .find_map(|e| match e {
                RunEvent::StepStarted { at, step } if want_start && step.as_str() == "d" => {
                    Some(*at)
                }
                RunEvent::StepFinished { at, step, .. } if !want_start && step.as_str() == "d" => {
                    Some(*at)
                }
                _ => None,
            })
            .expect("event")
    };
    let between = (at(false) - at(true)).to_std().expect("ordered");
    assert!(
        between.abs_diff(d) < Duration::from_millis(100),
        "started_at..finished_at {between:?} vs duration {d:?}"
    );
}

/// The retry deadline is measured from the first attempt: a step that waited for a slot still
/// gets its retries.
#[tokio::test]
async fn the_retry_deadline_does_not_count_the_wait_for_a_slot() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"x\"\n[[steps]]\nid = \"d\"\nrun = \"x\"\nretry = {{ attempts = 3, delay = \"50ms\", deadline = \"300ms\" }}\n"
    );
    let out = run(
        &toml,
        &[("a", &[(500, 0)]), ("d", &[(10, 1), (10, 0)])],
        1,
        None,
    )
    .await;
    assert_eq!(
        out.report.status,
        RunStatus::Succeeded,
        "{:?}",
        out.step("d")
    );
    assert_eq!(out.step("d").attempts, 2);
}
