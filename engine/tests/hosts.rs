//! Steps on hosts: fan-out, rolling batches, failure budgets, gates, blocks, hosts added at
//! run time and drill clocks — the scheduling, tested with a scripted runner under tokio's
//! paused clock. (The SSH transport itself is tested against a real sshd in `runbook-steps`.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runbook_engine::event::{AttemptOutcome, RunEvent, RunStatus, StepStatus, Verdict};
use runbook_engine::executor::{Executor, RunReport};
use runbook_engine::expr::ExprHost;
use runbook_engine::inventory::Inventory;
use runbook_engine::params::BoundParams;
use runbook_engine::plan::{Plan, RunInfo, Selection};
use runbook_engine::runner::{AttemptContext, BoxFuture, OutputSink, StepRunner};
use runbook_engine::Source;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One attempt as the runner saw it.
#[derive(Debug, Clone)]
struct Seen {
    step: String,
    target: String,
    host: Option<String>,
    command: String,
    start: Duration,
    end: Duration,
}

struct HostRunner {
    /// Exit code per target label (default 0); each attempt takes `took`.
    codes: HashMap<String, i32>,
    took: Duration,
    seen: Arc<Mutex<Vec<Seen>>>,
    running: Arc<Mutex<(usize, usize)>>,
    t0: Instant,
}

impl StepRunner for HostRunner {
    fn run<'a>(
        &'a self,
        ctx: AttemptContext,
        out: &'a mut OutputSink,
    ) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move {
            let start = self.t0.elapsed();
            {
                let mut r = self.running.lock().expect("lock");
                r.0 += 1;
                r.1 = r.1.max(r.0);
            }
            // A command may ask for its own duration: `sleep:<ms>`.
            let took = ctx
                .command
                .strip_prefix("sleep:")
                .and_then(|ms| ms.trim().parse().ok())
                .map_or(self.took, Duration::from_millis);
            let cancelled = tokio::select! {
                () = tokio::time::sleep(took) => false,
                () = ctx.cancel.cancelled() => true,
            };
            if cancelled {
                self.running.lock().expect("lock").0 -= 1;
                return AttemptOutcome::Cancelled;
            }
            out.write(
                runbook_engine::event::Stream::Stdout,
                bytes::Bytes::from(format!("{}\n", ctx.command)),
            )
            .await;
            self.running.lock().expect("lock").0 -= 1;
            self.seen.lock().expect("lock").push(Seen {
                step: ctx.step.to_string(),
                target: ctx.target.to_string(),
                host: ctx.host.as_ref().map(|h| h.name.clone()),
                command: ctx.command.clone(),
                start,
                end: self.t0.elapsed(),
            });
            AttemptOutcome::Exited {
                code: self.codes.get(ctx.target.as_ref()).copied().unwrap_or(0),
            }
        })
    }
}

struct Outcome {
    report: RunReport,
    events: Vec<RunEvent>,
    seen: Vec<Seen>,
    max_running: usize,
}

impl Outcome {
    fn step(&self, id: &str) -> &runbook_engine::executor::StepReport {
        self.report
            .steps
            .iter()
            .find(|s| s.id == id)
            .expect("step in report")
    }

    fn targets(&self, step: &str) -> Vec<String> {
        self.seen
            .iter()
            .filter(|s| s.step == step)
            .map(|s| s.target.clone())
            .collect()
    }

    fn targets_of(&self, step: &str) -> Vec<runbook_engine::event::TargetResult> {
        self.events
            .iter()
            .find_map(|e| match e {
                RunEvent::StepFinished {
                    step: s, targets, ..
                } if s.as_str() == step => Some(targets.clone()),
                _ => None,
            })
            .expect("step finished")
    }
}

fn inventory(n: usize) -> String {
    let mut t = String::from("[defaults]\nuser = \"ops\"\n");
    for i in 1..=n {
        let group = if i <= 3 { "servers" } else { "workers" };
        t.push_str(&format!(
            "[hosts.node-{i:02}]\naddress = \"10.0.0.{i}\"\ngroups = [\"{group}\"]\n"
        ));
    }
    t
}

async fn run(toml: &str, hosts: usize, codes: &[(&str, i32)], forks: usize) -> Outcome {
    run_with(toml, hosts, codes, forks, CancellationToken::new(), &[]).await
}

async fn run_with(
    toml: &str,
    hosts: usize,
    codes: &[(&str, i32)],
    forks: usize,
    cancel: CancellationToken,
    sets: &[String],
) -> Outcome {
    let host = ExprHost::new();
    let source = Source::new("test.toml", toml);
    let (runbook, graph, _) =
        runbook_engine::compile(&source, &host).unwrap_or_else(|d| panic!("{d}"));
    let params = BoundParams::bind(&runbook, sets, |_| None).expect("params");
    let mut plan = Plan::new(
        runbook,
        graph,
        params,
        &Selection::default(),
        std::env::temp_dir(),
    )
    .expect("plan");
    plan.forks = forks;
    let inv = Inventory::parse(&Source::new("inv.toml", inventory(hosts))).expect("inventory");
    plan.set_inventory(inv);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let running = Arc::new(Mutex::new((0usize, 0usize)));
    let runner = HostRunner {
        codes: codes.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        took: Duration::from_secs(1),
        seen: seen.clone(),
        running: running.clone(),
        t0: Instant::now(),
    };
    let (tx, mut rx) = mpsc::channel::<RunEvent>(1024);
    let collector = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            e.acknowledge();
            events.push(e);
        }
        events
    });
    let report = Executor::new(
        Arc::new(plan),
        Arc::new(runner),
        host,
        RunInfo::generate(),
        4,
        tx,
        cancel,
    )
    .run()
    .await;
    let events = collector.await.expect("collector");
    let seen = seen.lock().expect("lock").clone();
    let max_running = running.lock().expect("lock").1;
    Outcome {
        report,
        events,
        seen,
        max_running,
    }
}

#[tokio::test(start_paused = true)]
async fn parallel_fan_out_honours_the_step_limit_and_reports_every_host() {
    let o = run(
        r#"
[runbook]
name = "fan"
[[steps]]
id = "ping"
on = "all"
run = "ping {{ host.name }} at {{ host.address }} as {{ host.user }}"
strategy = { parallel = 5 }
[[steps]]
id = "count"
needs = ["ping"]
script = "let n = steps.ping.hosts.len(); if n != 20 { fail(`saw ${n} hosts`) } #{ n: n, first: steps.ping.hosts[\"node-01\"].stdout }"
"#,
        20,
        &[],
        50,
    )
    .await;
    assert_eq!(o.report.status, RunStatus::Succeeded, "{:?}", o.report);
    assert_eq!(o.targets("ping").len(), 20);
    assert_eq!(o.max_running, 5, "the step's own limit");
    let first = o
        .seen
        .iter()
        .find(|s| s.target == "node-01")
        .expect("node-01");
    assert_eq!(first.command, "ping node-01 at 10.0.0.1 as ops");
    assert_eq!(first.host.as_deref(), Some("node-01"));
    assert_eq!(o.targets_of("ping").len(), 20);
}

#[tokio::test(start_paused = true)]
async fn forks_limit_all_host_attempts() {
    let o = run(
        "[runbook]\nname = \"f\"\n[[steps]]\nid = \"a\"\non = \"all\"\nrun = \"x\"\n",
        12,
        &[],
        3,
    )
    .await;
    assert_eq!(o.report.status, RunStatus::Succeeded);
    assert_eq!(o.max_running, 3);
}

#[tokio::test(start_paused = true)]
async fn rolling_one_at_a_time_is_strictly_host_by_host_in_inventory_order() {
    let o = run(
        r#"
[runbook]
name = "roll"
[[steps]]
id = "upgrade"
on = "all"
run = "upgrade"
strategy = { rolling = 1, pause = "2s" }
"#,
        5,
        &[],
        50,
    )
    .await;
    assert_eq!(o.report.status, RunStatus::Succeeded);
    let spans: Vec<&Seen> = o.seen.iter().filter(|s| s.step == "upgrade").collect();
    let order: Vec<&str> = spans.iter().map(|s| s.target.as_str()).collect();
    assert_eq!(
        order,
        ["node-01", "node-02", "node-03", "node-04", "node-05"]
    );
    for w in spans.windows(2) {
        assert!(
            w[1].start >= w[0].end + Duration::from_secs(2),
            "{} started before {} ended plus the pause",
            w[1].target,
            w[0].target
        );
    }
    let batches = o
        .events
        .iter()
        .filter(|e| matches!(e, RunEvent::Batch { .. }))
        .count();
    assert_eq!(batches, 5);
}

/// `pause = "{{ params.NAME }}"`: the run waits what the operator set, not the default.
#[tokio::test(start_paused = true)]
async fn a_pause_read_from_a_parameter_waits_the_value_the_run_was_given() {
    let toml = r#"
[runbook]
name = "roll"
[params]
batch_pause = { default = "1s" }
[[steps]]
id = "upgrade"
on = "all"
run = "upgrade"
strategy = { rolling = 1, pause = "{{ params.batch_pause }}" }
"#;
    let o = run_with(
        toml,
        3,
        &[],
        50,
        CancellationToken::new(),
        &["batch_pause=90s".to_owned()],
    )
    .await;
    assert_eq!(o.report.status, RunStatus::Succeeded);
    let spans: Vec<&Seen> = o.seen.iter().filter(|s| s.step == "upgrade").collect();
    assert_eq!(spans.len(), 3);
    for w in spans.windows(2) {
        let gap = w[1].start - w[0].end;
        assert!(
            gap >= Duration::from_secs(90) && gap < Duration::from_secs(91),
            "{} started {gap:?} after {} ended, not the 90s pause",
            w[1].target,
            w[0].target
        );
    }

    let source = Source::new("test.toml", toml);
    let (runbook, _, _) =
        runbook_engine::compile(&source, &ExprHost::new()).unwrap_or_else(|d| panic!("{d}"));
    let errors = BoundParams::bind(&runbook, &["batch_pause=soon".to_owned()], |_| None)
        .expect_err("not a duration");
    assert_eq!(
        errors[0].to_string(),
        "parameter `batch_pause` (from --set) must be a duration such as `30s` or `2m` \
         (a step's `pause` reads it), got \"soon\""
    );
}

#[tokio::test(start_paused = true)]
async fn growing_batches_are_sizes_of_the_whole() {
    let o = run(
        "[runbook]\nname = \"g\"\n[[steps]]\nid = \"u\"\non = \"all\"\nrun = \"x\"\nstrategy = { rolling = [1, \"50%\"] }\n",
        6,
        &[],
        50,
    )
    .await;
    let sizes: Vec<usize> = o
        .events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Batch { hosts, .. } => Some(hosts.len()),
            _ => None,
        })
        .collect();
    assert_eq!(sizes, [1, 3, 2]);
}

#[tokio::test(start_paused = true)]
async fn max_failures_counts_over_the_whole_run_and_stops_later_batches() {
    let o = run(
        r#"
[runbook]
name = "budget"
[[steps]]
id = "upgrade"
on = "all"
run = "upgrade"
strategy = { rolling = 2, max_failures = 1 }
"#,
        8,
        // One failure in batch 1 and one in batch 2: two in all, over the budget of one,
        // though no single batch had more than one.
        &[("node-02", 1), ("node-03", 1)],
        50,
    )
    .await;
    let step = o.step("upgrade");
    assert_eq!(step.status, StepStatus::Failed);
    let reason = step.reason.clone().unwrap_or_default();
    assert!(reason.contains("2 of 8 host(s) failed"), "{reason}");
    assert!(reason.contains("4 host(s) not started"), "{reason}");
    assert_eq!(o.targets("upgrade").len(), 4, "batches 3 and 4 never ran");
    let skipped = o
        .targets_of("upgrade")
        .iter()
        .filter(|t| t.status == StepStatus::Skipped)
        .count();
    assert_eq!(skipped, 4);
}

#[tokio::test(start_paused = true)]
async fn failures_within_the_budget_let_the_step_succeed_and_say_so() {
    let o = run(
        "[runbook]\nname = \"b\"\n[[steps]]\nid = \"u\"\non = \"all\"\nrun = \"x\"\nstrategy = { parallel = 4, max_failures = \"25%\" }\n",
        4,
        &[("node-04", 2)],
        50,
    )
    .await;
    let step = o.step("u");
    assert_eq!(step.status, StepStatus::Succeeded);
    assert!(step
        .reason
        .clone()
        .unwrap_or_default()
        .contains("within `max_failures`"));
}

#[tokio::test(start_paused = true)]
async fn a_false_gate_stops_the_rolling_step_before_the_next_batch() {
    let o = run(
        r#"
[runbook]
name = "gate"
[[steps]]
id = "u"
on = "all"
run = "x"
strategy = { rolling = 1, gate = "output.batch < 2" }
"#,
        4,
        &[],
        50,
    )
    .await;
    let step = o.step("u");
    assert_eq!(step.status, StepStatus::Failed);
    assert_eq!(o.targets("u"), ["node-01", "node-02"]);
    assert!(step.reason.clone().unwrap_or_default().contains("gate"));
}

#[tokio::test(start_paused = true)]
async fn a_probe_gate_runs_locally_with_its_own_retries() {
    let o = run(
        r#"
[runbook]
name = "gate"
[[steps]]
id = "u"
on = "servers"
run = "x"
strategy = { rolling = 1, gate = { id = "healthy", run = "check volumes", retry = { attempts = 2, delay = "1s" } } }
"#,
        3,
        &[("gate-1", 1)],
        50,
    )
    .await;
    assert_eq!(o.step("u").status, StepStatus::Failed);
    let gate: Vec<&Seen> = o.seen.iter().filter(|s| s.target == "gate-1").collect();
    assert_eq!(gate.len(), 2, "retried once");
    assert!(gate[0].host.is_none(), "the gate runs locally");
    assert_eq!(o.targets("u"), ["node-01", "gate-1", "gate-1"]);
}

#[tokio::test(start_paused = true)]
async fn a_block_runs_its_steps_in_order_per_host_and_cleanup_always() {
    let o = run(
        r#"
[runbook]
name = "block"
[[steps]]
id = "upgrade"
on = "servers"
strategy = { rolling = 1, max_failures = 1 }
steps = [
  { id = "drain", local = true, run = "kubectl drain {{ host.name }}" },
  { id = "upgrade", run = "install", sudo = true },
  { id = "ready", local = true, run = "wait {{ host.name }}" },
  { id = "uncordon", local = true, run = "kubectl uncordon {{ host.name }}", always = true },
]
"#,
        3,
        &[("node-02/upgrade", 1)],
        50,
    )
    .await;
    let order: Vec<String> = o
        .seen
        .iter()
        .map(|s| format!("{}@{}", s.target, s.host.as_deref().unwrap_or("local")))
        .collect();
    assert_eq!(
        order,
        [
            "node-01/drain@local",
            "node-01/upgrade@node-01",
            "node-01/ready@local",
            "node-01/uncordon@local",
            "node-02/drain@local",
            "node-02/upgrade@node-02",
            // `ready` is skipped after the failure; `uncordon` always runs.
            "node-02/uncordon@local",
            "node-03/drain@local",
            "node-03/upgrade@node-03",
            "node-03/ready@local",
            "node-03/uncordon@local",
        ]
    );
    let drain = &o.seen[0];
    assert_eq!(drain.command, "kubectl drain node-01");
    let step = o.step("upgrade");
    assert_eq!(
        step.status,
        StepStatus::Succeeded,
        "one failure is within the budget"
    );
    let t = o.targets_of("upgrade");
    assert_eq!(t[1].status, StepStatus::Failed);
    assert!(t[1]
        .reason
        .clone()
        .unwrap_or_default()
        .contains("`upgrade`"));
}

#[tokio::test(start_paused = true)]
async fn hosts_added_at_run_time_are_selectable_by_later_steps() {
    let o = run(
        r#"
[runbook]
name = "tf"
[[steps]]
id = "nodes"
run = "terraform output"
after = """
for i in 1..=3 {
  inventory.add_host(`new-${i}`, #{ address: `192.0.2.${i}`, groups: ["fresh"] });
}
"""
[[steps]]
id = "hello"
needs = ["nodes"]
on = "fresh[1:]"
run = "hello {{ host.address }} {{ host.user }}"
"#,
        2,
        &[],
        50,
    )
    .await;
    assert_eq!(o.report.status, RunStatus::Succeeded, "{:?}", o.report);
    let cmds: Vec<&str> = o
        .seen
        .iter()
        .filter(|s| s.step == "hello")
        .map(|s| s.command.as_str())
        .collect();
    assert_eq!(cmds, ["hello 192.0.2.2 ops", "hello 192.0.2.3 ops"]);
    let added = o
        .events
        .iter()
        .filter(|e| matches!(e, RunEvent::HostAdded { .. }))
        .count();
    assert_eq!(added, 3);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_selector_at_run_time_fails_the_step_with_the_reason() {
    let o = run(
        "[runbook]\nname = \"x\"\n[[steps]]\nid = \"a\"\non = \"severs\"\nrun = \"x\"\n",
        3,
        &[],
        50,
    )
    .await;
    let reason = o.step("a").reason.clone().unwrap_or_default();
    assert!(reason.contains("did you mean `servers`"), "{reason}");
}

const DRILL: &str = r#"
[runbook]
name = "drill"
[drill]
rto = "RTO_TARGET"
rpo = "1h"
clock_start = "declare"
clock_stop = "healthy"
restored_data_time = 'steps.restore.outputs.snapshot'
[[steps]]
id = "prepare"
run = "sleep:5000"
[[steps]]
id = "declare"
needs = ["prepare"]
run = "sleep:1000"
[[steps]]
id = "restore"
needs = ["declare"]
run = "sleep:60000"
outputs = { snapshot = "format_time(now() - 1800.0)" }
[[steps]]
id = "healthy"
needs = ["restore"]
run = "sleep:4000"
"#;

#[tokio::test(start_paused = true)]
async fn a_drill_measures_rto_from_clock_start_to_stop() {
    let o = run(&DRILL.replace("RTO_TARGET", "2m"), 0, &[], 50).await;
    let d = o.report.drill.clone().expect("drill report");
    let rto = d.rto.clone().expect("rto");
    // declare (1 s) + restore (60 s) + healthy (4 s); `prepare` is before the clock.
    let measured = rto.measured_seconds.expect("measured");
    assert!((measured - 65.0).abs() < 0.5, "{measured}");
    assert_eq!(rto.verdict, Verdict::Pass);
    assert_eq!(d.verdict, Verdict::Pass, "{d:?}");
    let rpo = d.rpo.clone().expect("rpo");
    assert_eq!(rpo.verdict, Verdict::Pass);
    assert!(rpo.measured_seconds.expect("rpo measured") > 0.0);
    assert!(o
        .events
        .iter()
        .any(|e| matches!(e, RunEvent::DrillMeasured { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_missed_rto_fails_the_drill_though_every_step_succeeded() {
    let o = run(&DRILL.replace("RTO_TARGET", "30s"), 0, &[], 50).await;
    assert_eq!(o.report.status, RunStatus::Succeeded);
    let d = o.report.drill.clone().expect("drill report");
    assert_eq!(d.verdict, Verdict::Fail);
    let why = d.rto.and_then(|r| r.why).unwrap_or_default();
    assert!(why.contains("over the target"), "{why}");
}

#[tokio::test(start_paused = true)]
async fn a_drill_whose_clock_never_stops_is_not_measured_and_says_why() {
    let o = run(&DRILL.replace("RTO_TARGET", "2m"), 0, &[("local", 0)], 50).await;
    assert_eq!(o.report.drill.expect("drill").verdict, Verdict::Pass);
    let failing = DRILL.replace("RTO_TARGET", "2m").replace(
        "run = \"sleep:4000\"",
        "run = \"sleep:4000\"\ncheck = \"false\"",
    );
    let o = run(&failing, 0, &[], 50).await;
    let d = o.report.drill.expect("drill");
    assert_eq!(d.verdict, Verdict::NotMeasured);
    let why = d.rto.and_then(|r| r.why).unwrap_or_default();
    assert!(why.contains("never stopped"), "{why}");
}

/// A gate with `gate_before_first` runs before the first batch too: an unhealthy cluster is
/// not touched at all (the RKE2 upgrade drains no server before etcd is known healthy).
#[tokio::test(start_paused = true)]
async fn a_gate_before_the_first_batch_stops_the_step_before_any_host_runs() {
    let o = run(
        r#"
[runbook]
name = "gated"
[[steps]]
id = "upgrade"
on = "servers"
run = "upgrade {{ host.name }}"
strategy = { rolling = 1, gate = "output.batch > 0", gate_before_first = true }
"#,
        3,
        &[],
        10,
    )
    .await;
    assert!(o.targets("upgrade").is_empty(), "{:?}", o.seen);
    let step = o.step("upgrade");
    assert_eq!(step.status, StepStatus::Failed);
    let reason = step.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("the gate before the first batch was false"),
        "{reason}"
    );

    // Without the flag the same gate first runs after batch 1, where it passes.
    let o = run(
        r#"
[runbook]
name = "gated"
[[steps]]
id = "upgrade"
on = "servers"
run = "upgrade {{ host.name }}"
strategy = { rolling = 1, gate = "output.batch > 0" }
"#,
        3,
        &[],
        10,
    )
    .await;
    assert_eq!(o.targets("upgrade").len(), 3);
}

/// Ctrl-C while a block's first sub-step runs (a drain): the running sub-step is stopped, and
/// the block's `run_on_cancel` sub-step (the uncordon) still runs on that host.
#[tokio::test(start_paused = true)]
async fn a_blocks_run_on_cancel_sub_step_runs_when_the_run_is_cancelled() {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        trigger.cancel();
    });
    let o = run_with(
        r#"
[runbook]
name = "drain"
[[steps]]
id = "cycle"
on = "servers[0]"
steps = [
  { id = "drain", run = "sleep:60000" },
  { id = "upgrade", run = "upgrade" },
  { id = "uncordon", run = "uncordon", always = true, run_on_cancel = true },
]
"#,
        1,
        &[],
        10,
        cancel,
        &[],
    )
    .await;
    let ran = o.targets("cycle");
    assert_eq!(ran, vec!["node-01/uncordon"], "{:?}", o.seen);
    assert_eq!(o.step("cycle").status, StepStatus::Cancelled);
    assert_eq!(o.report.status, runbook_engine::event::RunStatus::Cancelled);
}

/// A sub-step sees the sub-steps before it on the same host as `block.<id>`: a reboot that
/// runs only where the check before it asked for one.
#[tokio::test(start_paused = true)]
async fn a_sub_step_reads_the_earlier_sub_steps_of_its_host() {
    let o = run(
        r#"
[runbook]
name = "patch"
[[steps]]
id = "patch"
on = "servers"
strategy = { rolling = 1 }
steps = [
  { id = "probe", run = "needs-restarting -r", continue_on_failure = true },
  { id = "reboot", run = "reboot after exit {{ block.probe.exit_code }}", when = 'block.probe.status == "failed"' },
  { id = "back", local = true, run = "wait {{ host.name }}", when = '"reboot" in block' },
]
"#,
        3,
        &[("node-02/probe", 1)],
        50,
    )
    .await;
    let order: Vec<String> = o.seen.iter().map(|s| s.target.clone()).collect();
    assert_eq!(
        order,
        [
            "node-01/probe",
            "node-02/probe",
            "node-02/reboot",
            "node-02/back",
            "node-03/probe"
        ]
    );
    assert_eq!(o.seen[2].command, "reboot after exit 1");
    assert_eq!(o.step("patch").status, StepStatus::Succeeded);
}
