//! Property tests of the scheduler, the graph compiler and the retry policy (proptest).
//!
//! - Random DAGs (each step needs a random subset of earlier steps) with a random parallel
//!   limit, run by a scripted fake runner (random attempt durations and exit codes) on a paused
//!   tokio clock: no step starts before its needs finished and were satisfied (succeeded, or
//!   failed with `continue_on_failure`; `always` steps only wait), no more than `parallel`
//!   attempts run at once, every step is reported exactly once, attempts follow the retry
//!   policy and the script, and when no step is bound to fail the outcome is exactly the
//!   scripted one.
//! - Random graphs that may have back edges and self-loops: `runbook_engine::compile` rejects
//!   exactly the cyclic ones (compared with a cycle check written here), with one RB0007 per
//!   cyclic strongly connected component whose printed path is made of real `needs` edges;
//!   the levels of an acyclic graph order every need before its dependent.
//! - `RetryPolicy::delay_before` stays within its documented bounds for random policies.
//!
//! Case counts are small (see `config`) so the file runs in a few seconds; raise them with
//! `PROPTEST_CASES=…` for a longer search.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config;
use runbook_engine::event::{AttemptOutcome, RunEvent, RunStatus, StepStatus};
use runbook_engine::executor::{Executor, RunReport};
use runbook_engine::expr::ExprHost;
use runbook_engine::params::BoundParams;
use runbook_engine::plan::{Plan, RunInfo, Selection};
use runbook_engine::retry::{Backoff, RetryPolicy};
use runbook_engine::runner::{AttemptContext, BoxFuture, OutputSink, StepRunner};
use runbook_engine::Source;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const HEAD: &str = "[runbook]\nname = \"props\"\n";

fn config(cases: u32) -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(cases),
        // Failures are reported with their minimal input; no regression files in the tree.
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Scheduler

/// One generated step: what it needs and how its attempts go.
#[derive(Debug, Clone)]
struct GenStep {
    needs: Vec<usize>,
    attempts: u32,
    /// (milliseconds, exit code) of attempt 1, 2, …; the last entry repeats.
    script: Vec<(u64, i32)>,
    continue_on_failure: bool,
    always: bool,
    /// `retry` keys besides `attempts`: delay (ms), exponential factor, jitter.
    delay_ms: u64,
    factor: Option<u32>,
    jitter: bool,
}

impl GenStep {
    fn code(&self, attempt: u32) -> i32 {
        let i = (attempt as usize - 1).min(self.script.len() - 1);
        self.script[i].1
    }

    /// The attempt that succeeds, if one within `attempts` does.
    fn succeeds_at(&self) -> Option<u32> {
        (1..=self.attempts).find(|&a| self.code(a) == 0)
    }
}

fn gen_step(i: usize) -> impl Strategy<Value = GenStep> {
    let earlier: Vec<usize> = (0..i).collect();
    (
        proptest::sample::subsequence(earlier, 0..=i.min(3)),
        1u32..=3,
        proptest::collection::vec(
            (
                1u64..300,
                prop_oneof![5 => Just(0), 2 => Just(1), 1 => Just(7)],
            ),
            1..=3,
        ),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.15),
        (1u64..=50, prop::option::of(1u32..=4), any::<bool>()),
    )
        .prop_map(
            |(needs, attempts, script, continue_on_failure, always, (delay_ms, factor, jitter))| {
                GenStep {
                    needs,
                    attempts,
                    script,
                    continue_on_failure,
                    always,
                    delay_ms,
                    factor,
                    jitter,
                }
            },
        )
}

fn gen_dag() -> impl Strategy<Value = (Vec<GenStep>, usize)> {
    (1usize..=10).prop_flat_map(|n| ((0..n).map(gen_step).collect::<Vec<_>>(), 1usize..=4))
}

fn dag_toml(steps: &[GenStep]) -> String {
    let mut toml = HEAD.to_owned();
    for (i, s) in steps.iter().enumerate() {
        toml.push_str(&format!("[[steps]]\nid = \"s{i}\"\nrun = \"x\"\n"));
        if !s.needs.is_empty() {
            let needs: Vec<String> = s.needs.iter().map(|n| format!("\"s{n}\"")).collect();
            toml.push_str(&format!("needs = [{}]\n", needs.join(", ")));
        }
        let factor = s
            .factor
            .map(|f| format!(", backoff = \"exponential\", factor = {f}"))
            .unwrap_or_default();
        toml.push_str(&format!(
            "retry = {{ attempts = {}, delay = \"{}ms\", max_delay = \"120ms\", jitter = {}{factor} }}\n",
            s.attempts, s.delay_ms, s.jitter
        ));
        if s.continue_on_failure {
            toml.push_str("continue_on_failure = true\n");
        }
        if s.always {
            toml.push_str("always = true\n");
        }
    }
    toml
}

#[derive(Default)]
struct Observed {
    running: usize,
    max_running: usize,
    /// (step index, attempt, start, end) in virtual time.
    spans: Vec<(usize, u32, Duration, Duration)>,
}

struct FakeRunner {
    steps: Vec<GenStep>,
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
            let i: usize = ctx.step.as_str()[1..].parse().expect("step index");
            let s = &self.steps[i];
            let idx = (ctx.attempt as usize - 1).min(s.script.len() - 1);
            let (ms, code) = s.script[idx];
            let start = self.t0.elapsed();
            {
                let mut o = self.observed.lock().expect("lock");
                o.running += 1;
                o.max_running = o.max_running.max(o.running);
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let mut o = self.observed.lock().expect("lock");
            o.running -= 1;
            o.spans.push((i, ctx.attempt, start, self.t0.elapsed()));
            AttemptOutcome::Exited { code }
        })
    }
}

fn execute(
    steps: &[GenStep],
    parallel: usize,
) -> (RunReport, Vec<RunEvent>, Observed, Vec<RetryPolicy>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let host = ExprHost::new();
        let source = Source::new("props.toml", dag_toml(steps));
        let (runbook, graph, _) =
            runbook_engine::compile(&source, &host).unwrap_or_else(|d| panic!("{d}"));
        let params = BoundParams::bind(&runbook, &[], |_| None).expect("params");
        let policies: Vec<RetryPolicy> = runbook.steps.iter().map(|s| s.retry).collect();
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
            steps: steps.to_vec(),
            observed: observed.clone(),
            t0: Instant::now(),
        };
        let (tx, mut rx) = mpsc::channel(64);
        let collector = tokio::spawn(async move {
            let mut events = Vec::new();
            while let Some(e) = rx.recv().await {
                events.push(e);
            }
            events
        });
        let exec = Executor::new(
            Arc::new(plan),
            Arc::new(runner),
            host,
            RunInfo::generate(),
            parallel,
            tx,
            CancellationToken::new(),
        );
        // A scheduler that never finishes fails the case instead of hanging the suite.
        // A scheduler that never finishes fails the case instead of hanging the suite.
        let report = tokio::time::timeout(Duration::from_secs(24 * 3600), exec.run())
            .await
            .expect("the run finished");
        let events = collector.await.expect("collector");
        let observed = std::mem::take(&mut *observed.lock().expect("lock"));
        (report, events, observed, policies)
    })
}

fn check_run(steps: &[GenStep], parallel: usize) -> Result<(), TestCaseError> {
    let n = steps.len();
    let (report, events, observed, policies) = execute(steps, parallel);

    // Every step is reported exactly once, in the report and as `step_finished`.
    prop_assert_eq!(report.steps.len(), n);
    let index = |id: &str| -> usize { id[1..].parse().expect("step index") };
    let mut status = vec![None; n];
    let mut attempts = vec![0u32; n];
    let mut reasons: Vec<Option<String>> = vec![None; n];
    for r in &report.steps {
        let i = index(&r.id);
        prop_assert!(status[i].is_none(), "step {} reported twice", r.id);
        status[i] = Some(r.status);
        attempts[i] = r.attempts;
        reasons[i] = r.reason.clone();
    }
    let status: Vec<StepStatus> = status.into_iter().map(|s| s.expect("reported")).collect();
    let mut finished = vec![0; n];
    let mut started = vec![0; n];
    for e in &events {
        match e {
            RunEvent::StepFinished { step, .. } => finished[index(step.as_str())] += 1,
            RunEvent::StepStarted { step, .. } => started[index(step.as_str())] += 1,
            _ => {}
        }
    }
    prop_assert!(
        finished.iter().all(|&c| c == 1),
        "step_finished per step: {finished:?}"
    );
    prop_assert!(
        started.iter().all(|&c| c <= 1),
        "step_started per step: {started:?}"
    );

    // The parallel limit holds.
    prop_assert!(
        observed.max_running <= parallel,
        "{} attempts ran at once with --parallel {parallel}",
        observed.max_running
    );

    let mut spans: Vec<Vec<(u32, Duration, Duration)>> = vec![Vec::new(); n];
    for &(i, a, s, e) in &observed.spans {
        spans[i].push((a, s, e));
    }
    for s in &mut spans {
        s.sort_by_key(|x| x.0);
    }
    let failed_hard = |j: usize| status[j] == StepStatus::Failed && !steps[j].continue_on_failure;
    let satisfied = |j: usize| {
        status[j] == StepStatus::Succeeded
            || (status[j] == StepStatus::Failed && steps[j].continue_on_failure)
    };

    for i in 0..n {
        let s = &steps[i];
        let ran = &spans[i];
        // Attempts are 1, 2, … in order, never overlapping, as many as reported.
        for (k, w) in ran.iter().enumerate() {
            prop_assert_eq!(w.0, k as u32 + 1, "attempt numbers of s{}", i);
            if k > 0 {
                prop_assert!(ran[k - 1].2 <= w.1, "attempts of s{i} overlap");
            }
        }
        prop_assert_eq!(ran.len() as u32, attempts[i], "attempts of s{}", i);
        prop_assert!(
            attempts[i] <= s.attempts,
            "s{i} ran more attempts than allowed"
        );

        if let Some(first) = ran.first() {
            // Needs finished first, and (unless `always`) were satisfied.
            for &j in &s.needs {
                let end = spans[j].last().map(|x| x.2);
                prop_assert!(
                    spans[j].is_empty() || end.is_some_and(|e| e <= first.1),
                    "s{i} started at {:?} before its need s{j} finished at {end:?}",
                    first.1
                );
                if !s.always {
                    prop_assert!(
                        satisfied(j),
                        "s{i} ran although its need s{j} ended {:?}",
                        status[j]
                    );
                }
            }
        }

        match status[i] {
            StepStatus::Succeeded => {
                prop_assert_eq!(Some(attempts[i]), s.succeeds_at(), "s{} succeeded", i);
            }
            StepStatus::Failed => {
                prop_assert!(!ran.is_empty(), "s{i} failed without running");
                prop_assert!(
                    (1..=attempts[i]).all(|a| s.code(a) != 0),
                    "s{i} failed although an attempt exited 0"
                );
                if attempts[i] < s.attempts {
                    // Retries stop early only because another step halted the run.
                    prop_assert!(!s.always, "an `always` step stopped retrying");
                    prop_assert!(
                        (0..n).any(|j| j != i && failed_hard(j)),
                        "s{i} stopped after {} of {} attempts without a halt",
                        attempts[i],
                        s.attempts
                    );
                }
            }
            StepStatus::Skipped => {
                prop_assert!(ran.is_empty(), "skipped s{i} ran");
                prop_assert!(!s.always, "`always` step s{i} was skipped");
                let reason = reasons[i].clone().unwrap_or_default();
                let unsatisfied = s.needs.iter().find(|&&j| !satisfied(j));
                match unsatisfied {
                    // The first need that is not satisfied is named.
                    Some(_) => prop_assert!(
                        reason.starts_with("needs `s"),
                        "s{i} skipped with {reason:?}"
                    ),
                    None => {
                        // A step still waiting for a `--parallel` slot when the run halted says
                        // "not started: the run stopped"; one not yet handed to a task names the
                        // step that failed.
                        prop_assert!(
                            reason.starts_with("not started: the run stopped"),
                            "s{i} skipped with {reason:?}"
                        );
                        prop_assert!((0..n).any(failed_hard), "halted without a failure");
                    }
                }
            }
            StepStatus::Cancelled => prop_assert!(false, "s{i} cancelled without a cancel"),
        }
    }

    // Every scheduled retry waits what the step's policy allows, and the next attempt starts
    // no earlier than that after the previous one ended.
    for e in &events {
        if let RunEvent::RetryScheduled {
            step,
            next_attempt,
            delay,
            ..
        } = e
        {
            let i = index(step.as_str());
            let p = policies[i];
            let base = RetryPolicy { jitter: false, ..p }.delay_before(*next_attempt, 0.0);
            if p.jitter {
                prop_assert!(
                    *delay <= base && *delay + Duration::from_micros(1) >= base / 2,
                    "s{i}: {delay:?} outside [{:?}, {base:?}]",
                    base / 2
                );
            } else {
                prop_assert_eq!(*delay, base, "s{} retry {}", i, next_attempt);
            }
            let k = *next_attempt as usize - 1;
            if let (Some(prev), Some(next)) = (spans[i].get(k - 1), spans[i].get(k)) {
                prop_assert!(next.1 >= prev.2 + *delay, "s{i} retried before its delay");
            }
        }
    }

    // The run's status follows the steps'.
    let want = if (0..n).any(failed_hard) {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    };
    prop_assert_eq!(report.status, want);

    // When no step is bound to fail for good, the outcome is exactly the script's.
    let doomed = steps
        .iter()
        .any(|s| s.succeeds_at().is_none() && !s.continue_on_failure);
    if !doomed {
        for (i, s) in steps.iter().enumerate() {
            match s.succeeds_at() {
                Some(a) => {
                    prop_assert_eq!(status[i], StepStatus::Succeeded, "s{}", i);
                    prop_assert_eq!(attempts[i], a, "s{}", i);
                }
                None => {
                    prop_assert_eq!(status[i], StepStatus::Failed, "s{}", i);
                    prop_assert_eq!(attempts[i], s.attempts, "s{}", i);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn the_scheduler_respects_needs_limits_and_retry_policy((steps, parallel) in gen_dag()) {
        check_run(&steps, parallel)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Graph compile

/// Per step, the steps it needs (any index, itself included).
fn gen_graph() -> impl Strategy<Value = Vec<BTreeSet<usize>>> {
    (1usize..=8).prop_flat_map(|n| {
        proptest::collection::vec(proptest::collection::btree_set(0..n, 0..=2), n)
    })
}

/// `reach[a][b]`: b can be reached from a by following `needs` (one or more edges).
fn reachability(needs: &[BTreeSet<usize>]) -> Vec<Vec<bool>> {
    let n = needs.len();
    let mut reach = vec![vec![false; n]; n];
    for (a, ns) in needs.iter().enumerate() {
        for &b in ns {
            reach[a][b] = true;
        }
    }
    for k in 0..n {
        let through_k = reach[k].clone();
        for row in &mut reach {
            if row[k] {
                for (cell, &r) in row.iter_mut().zip(&through_k) {
                    *cell |= r;
                }
            }
        }
    }
    reach
}

fn graph_toml(needs: &[BTreeSet<usize>]) -> String {
    let mut toml = HEAD.to_owned();
    for (i, ns) in needs.iter().enumerate() {
        let list: Vec<String> = ns.iter().map(|n| format!("\"g{n}\"")).collect();
        toml.push_str(&format!(
            "[[steps]]\nid = \"g{i}\"\nneeds = [{}]\nrun = \"true\"\n",
            list.join(", ")
        ));
    }
    toml
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn compile_rejects_exactly_the_cyclic_graphs(needs in gen_graph()) {
        let n = needs.len();
        let reach = reachability(&needs);
        let cyclic = (0..n).any(|i| reach[i][i]);
        // Cyclic strongly connected components: classes of mutually reachable steps on a cycle.
        let mut components: BTreeSet<Vec<usize>> = BTreeSet::new();
        for i in (0..n).filter(|&i| reach[i][i]) {
            components.insert((0..n).filter(|&j| reach[i][j] && reach[j][i]).collect());
        }
        let host = ExprHost::new();
        let source = Source::new("graph.toml", graph_toml(&needs));
        match runbook_engine::compile(&source, &host) {
            Ok((runbook, graph, _)) => {
                prop_assert!(!cyclic, "a cyclic graph compiled: {needs:?}");
                let mut level = vec![usize::MAX; n];
                for (l, steps) in graph.levels().iter().enumerate() {
                    for &s in steps {
                        prop_assert_eq!(level[s], usize::MAX, "step in two levels");
                        level[s] = l;
                    }
                }
                prop_assert!(level.iter().all(|&l| l != usize::MAX), "a step has no level");
                for (i, ns) in needs.iter().enumerate() {
                    let id = runbook.steps[i].id.as_str();
                    prop_assert_eq!(id, format!("g{i}"));
                    for &j in ns {
                        prop_assert!(level[j] < level[i], "need g{j} not before g{i}");
                    }
                    let got: BTreeSet<usize> = graph.needs(i).collect();
                    prop_assert_eq!(&got, ns);
                }
            }
            Err(diags) => {
                prop_assert!(cyclic, "an acyclic graph was rejected: {needs:?}\n{diags}");
                let cycles: Vec<_> = diags.iter().collect();
                prop_assert!(
                    cycles.iter().all(|d| d.code.as_str() == "RB0007"),
                    "only cycle errors expected:\n{diags}"
                );
                prop_assert_eq!(cycles.len(), components.len(), "one error per cycle:\n{}", diags);
                for d in cycles {
                    let path = d
                        .message
                        .strip_prefix("dependency cycle: ")
                        .expect("cycle message");
                    let ids: Vec<usize> = path
                        .split(" → ")
                        .map(|id| id[1..].parse().expect("index"))
                        .collect();
                    prop_assert!(ids.len() >= 2 && ids.first() == ids.last(), "{path}");
                    for w in ids.windows(2) {
                        prop_assert!(
                            needs[w[0]].contains(&w[1]),
                            "`{path}`: g{} does not need g{}", w[0], w[1]
                        );
                    }
                    prop_assert!(d.primary.is_some(), "cycle without a position");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Retry policy

fn gen_policy() -> impl Strategy<Value = RetryPolicy> {
    (
        1u32..=10_000,
        prop_oneof![
            Just(Backoff::Fixed),
            (1.0f64..=100.0).prop_map(|factor| Backoff::Exponential { factor }),
        ],
        0u64..=10_000_000_000,
        0u64..=10_000_000_000,
        any::<bool>(),
    )
        .prop_map(
            |(attempts, backoff, delay_us, extra_us, jitter)| RetryPolicy {
                attempts,
                backoff,
                delay: Duration::from_micros(delay_us),
                // The analyzer guarantees `max_delay >= delay`.
                max_delay: Duration::from_micros(delay_us + extra_us),
                jitter,
                deadline: None,
            },
        )
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn retry_delays_stay_within_their_bounds(
        policy in gen_policy(),
        next in prop_oneof![2u32..=12, any::<u32>()],
        unit in 0.0f64..1.0,
    ) {
        let plain = RetryPolicy { jitter: false, ..policy };
        let base = plain.delay_before(next, unit);
        let got = policy.delay_before(next, unit);
        let tolerance = Duration::from_micros(1);
        prop_assert!(base <= policy.max_delay, "{base:?} above max_delay {:?}", policy.max_delay);
        match policy.backoff {
            Backoff::Fixed => prop_assert_eq!(base, policy.delay),
            Backoff::Exponential { factor } => {
                prop_assert!(base + tolerance >= policy.delay, "{base:?} below delay {:?}", policy.delay);
                // min(delay × factor^(k−1), max_delay) for retry k = next − 1.
                let k = next.saturating_sub(1).max(1);
                let want = (policy.delay.as_secs_f64() * factor.powi(i32::try_from(k - 1).unwrap_or(i32::MAX)))
                    .min(policy.max_delay.as_secs_f64());
                let diff = (base.as_secs_f64() - want).abs();
                prop_assert!(diff <= 1e-6 + want * 1e-12, "{base:?} vs {want}s for retry {k}");
                // Later retries never wait less.
                if next < u32::MAX {
                    prop_assert!(plain.delay_before(next + 1, unit) + tolerance >= base);
                }
            }
        }
        if policy.jitter {
            // Between half the delay and the delay.
            prop_assert!(got + tolerance >= base / 2, "{got:?} below half of {base:?}");
            prop_assert!(got <= base, "{got:?} above {base:?}");
        } else {
            prop_assert_eq!(got, base);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions

/// Found with the corpus (tests/bad-runbooks/69-when-endless-loop.toml): closures called by
/// array methods ran outside the 1,000,000-operation limit, so this `when` ran 10^8 closure
/// calls (77 s in a debug build) instead of failing. Any evaluation must end quickly.
#[test]
fn an_endless_expression_is_stopped_quickly() {
    let y = r#""y".replace("y", "yyyyyyyyyy").replace("y", "yyyyyyyyyy").replace("y", "yyyyyyyyyy").replace("y", "y,y,y,y,y,y,y,y,y,y").split(",")"#;
    let text = format!("{y}.all(|a| {y}.all(|b| b != \"z\"))");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let host = ExprHost::new();
        let expr = host
            .compile_expression(&text, runbook_engine::expr::Context::Step)
            .expect("compiles");
        let started = std::time::Instant::now();
        let result = host.eval(&expr, &mut rhai::Scope::new());
        let _ = tx.send((result.map(|v| v.to_string()), started.elapsed()));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok((result, took)) => {
            assert!(result.is_err(), "the evaluation finished with {result:?}");
            assert!(
                took < Duration::from_secs(10),
                "stopped only after {took:?}"
            );
        }
        Err(_) => panic!("the evaluation was still running after 20 s"),
    }
}
