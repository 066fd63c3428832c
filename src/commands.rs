//! The subcommands: each loads what it needs, calls the engine, and turns the outcome into
//! output and an exit code. Errors are rendered here and nowhere else.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser;
use runbook_engine::diagnostic::Code;
use runbook_engine::event::{RunEvent, RunStatus};
use runbook_engine::executor::{Executor, RunReport};
use runbook_engine::expr::ExprHost;
use runbook_engine::graph::StepGraph;
use runbook_engine::params::BoundParams;
use runbook_engine::plan::{Plan, RunInfo, Selection};
use runbook_engine::{Diagnostics, Runbook};
use runbook_evidence::manifest::Operator;
use runbook_evidence::{Recorder, RecorderConfig};
use runbook_steps::LocalRunner;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::{exit, CheckArgs, Cli, Command, GraphArgs, GraphFormat, PlanArgs, RunArgs};
use crate::console::{summary_table, Console};
use crate::render::{self, diagnostics_to_string, stderr_color};

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    init_tracing();
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Check(args) => check(&args),
        Command::Plan(args) => plan(&args),
        Command::Graph(args) => graph(&args),
        Command::Explain { code } => explain(&code),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(stderr_color())
        .try_init();
}

/// A runbook that loaded and compiled, with its warnings already printed.
struct Loaded {
    runbook: Arc<Runbook>,
    graph: StepGraph,
}

/// Loads and compiles, printing diagnostics. `Err` carries the exit code.
fn load(path: &Path, host: &ExprHost) -> Result<Loaded, i32> {
    let source = runbook_engine::load_source(path).map_err(|e| {
        render::error(&e.to_string());
        exit::USAGE
    })?;
    match runbook_engine::compile(&source, host) {
        Ok((runbook, graph, warnings)) => {
            print_diagnostics(&warnings);
            Ok(Loaded { runbook, graph })
        }
        Err(diags) => {
            print_diagnostics(&diags);
            let n = diags.error_count();
            render::error(&format!(
                "`{}` has {n} error{}; nothing was run",
                path.display(),
                if n == 1 { "" } else { "s" }
            ));
            Err(exit::USAGE)
        }
    }
}

fn print_diagnostics(diags: &Diagnostics) {
    if !diags.0.is_empty() {
        eprint!("{}", diagnostics_to_string(&diags.0, stderr_color()));
    }
}

fn bind_params(runbook: &Runbook, sets: &[String]) -> Result<BoundParams, i32> {
    BoundParams::bind(runbook, sets, |var| std::env::var(var).ok()).map_err(|errors| {
        for e in errors {
            render::error(&e.to_string());
        }
        exit::USAGE
    })
}

fn selection(s: &crate::cli::Selection) -> Selection {
    Selection {
        only: s.only.clone(),
        skip: s.skip.clone(),
        from: s.from.clone(),
    }
}

fn make_plan(loaded: Loaded, sets: &[String], sel: &crate::cli::Selection) -> Result<Plan, i32> {
    let params = bind_params(&loaded.runbook, sets)?;
    let workdir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    Plan::new(
        loaded.runbook,
        loaded.graph,
        params,
        &selection(sel),
        workdir,
    )
    .map_err(|e| {
        render::error(&e.to_string());
        exit::USAGE
    })
}

fn check(args: &CheckArgs) -> i32 {
    let host = ExprHost::new();
    let mut failed = 0;
    for file in &args.files {
        match load(file, &host) {
            Ok(loaded) => eprintln!(
                "{}: ok ({} steps)",
                file.display(),
                loaded.runbook.steps.len()
            ),
            Err(_) => failed += 1,
        }
    }
    if failed > 0 {
        exit::USAGE
    } else {
        exit::OK
    }
}

fn plan(args: &PlanArgs) -> i32 {
    let host = ExprHost::new();
    let plan = match load(&args.file, &host)
        .and_then(|l| make_plan(l, &args.params.set, &args.selection))
    {
        Ok(p) => p,
        Err(code) => return code,
    };
    print!("{}", plan.to_text(&host, &RunInfo::generate()));
    exit::OK
}

fn graph(args: &GraphArgs) -> i32 {
    let host = ExprHost::new();
    let loaded = match load(&args.file, &host) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let text = match args.format {
        GraphFormat::Text => loaded.graph.to_text(&loaded.runbook),
        GraphFormat::Dot => loaded.graph.to_dot(&loaded.runbook),
        GraphFormat::Mermaid => loaded.graph.to_mermaid(&loaded.runbook),
    };
    print!("{text}");
    exit::OK
}

fn explain(code: &str) -> i32 {
    match Code::parse(code) {
        Some(c) => {
            println!("{c}: {}", c.explain());
            exit::OK
        }
        None => {
            render::error(&format!(
                "unknown code `{code}`; codes run from RB0001 to RB{:04}",
                Code::ALL.len()
            ));
            exit::USAGE
        }
    }
}

fn operator() -> Operator {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| uid.to_string());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into());
    Operator {
        user,
        uid: uid.as_raw(),
        host,
    }
}

fn run(args: &RunArgs) -> i32 {
    let host = ExprHost::new();
    let plan = match load(&args.file, &host)
        .and_then(|l| make_plan(l, &args.params.set, &args.selection))
    {
        Ok(p) => p,
        Err(code) => return code,
    };
    let run_info = RunInfo::generate();
    if args.dry_run {
        print!("{}", plan.to_text(&host, &run_info));
        eprintln!("dry run: nothing was run and no evidence was written");
        return exit::OK;
    }
    let plan = Arc::new(plan);
    let evidence_dir = args.evidence_dir.clone().unwrap_or_else(|| {
        plan.runbook.meta.evidence_dir.as_ref().map_or_else(
            || PathBuf::from("proof"),
            |d| plan.runbook.base_dir().join(d),
        )
    });
    let param_sources = plan
        .params
        .0
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                serde_json::to_value(&p.source).unwrap_or_default(),
            )
        })
        .collect();
    let recorder = match Recorder::create(RecorderConfig {
        evidence_dir: evidence_dir.clone(),
        runbook: plan.runbook.clone(),
        run_id: run_info.id.clone(),
        started_at: run_info.started_at,
        params: plan.params.to_json(true),
        param_sources,
        secrets: plan.params.secrets(),
        operator: operator(),
        engine_version: env!("CARGO_PKG_VERSION").to_owned(),
        workdir: plan.workdir.clone(),
        command_line: std::env::args().collect(),
    }) {
        Ok(r) => r,
        Err(e) => {
            render::error(&format!("{e}; nothing was run"));
            return exit::USAGE;
        }
    };
    let bundle = recorder.dir().to_path_buf();
    let parallel = args
        .parallel
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, std::num::NonZero::get));
    let live = !args.no_progress && std::io::stderr().is_terminal();
    let console = Console::new(live, args.stream, stderr_color(), plan.params.secrets());

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            render::error(&format!("cannot start the async runtime: {e}"));
            return exit::RUN_FAILED;
        }
    };
    let cancel = CancellationToken::new();
    let (tx, rx) = mpsc::channel::<RunEvent>(1024);
    let consumer = spawn_consumer(rx, recorder, console, cancel.clone());

    let report: RunReport = runtime.block_on(async {
        let signals = tokio::spawn(watch_signals(cancel.clone()));
        let executor = Executor::new(
            plan.clone(),
            Arc::new(LocalRunner),
            host.clone(),
            run_info,
            parallel,
            tx,
            cancel.clone(),
        );
        let report = executor.run().await;
        signals.abort();
        report
    });
    let (recorder, mut console, evidence_error) = match consumer.join() {
        Ok(parts) => parts,
        Err(_) => {
            render::error("the evidence writer crashed");
            return exit::RUN_FAILED;
        }
    };
    console.finish();
    let mut code = match report.status {
        RunStatus::Succeeded => exit::OK,
        RunStatus::Failed | RunStatus::Running => exit::RUN_FAILED,
        RunStatus::Cancelled => exit::INTERRUPTED,
    };
    eprint!("\n{}", console.redact(&summary_table(&report)));
    print_failure_tails(&report, &bundle);
    let finished = recorder.map(Recorder::finish);
    match (evidence_error, finished) {
        (None, Some(Ok(dir))) => {
            eprintln!(
                "\nrun {} {} in {} — evidence: {}",
                report.run_id,
                report.status.as_str(),
                runbook_engine::duration::format_duration(report.duration),
                dir.display()
            );
        }
        (Some(e), _) | (None, Some(Err(e))) => {
            render::error(&format!(
                "{e}; the run was stopped; what was written so far is in `{}`",
                bundle.display()
            ));
            code = exit::RUN_FAILED;
        }
        (None, None) => {}
    }
    if args.json {
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("bundle".into(), bundle.display().to_string().into());
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    }
    code
}

/// For each failed step, where its last log is and how it ends: the first thing an operator
/// needs when a run fails.
fn print_failure_tails(report: &RunReport, bundle: &Path) {
    for s in report
        .steps
        .iter()
        .filter(|s| s.status == runbook_engine::event::StepStatus::Failed)
    {
        if s.attempts == 0 {
            continue;
        }
        let log = bundle.join(format!("steps/{}/local/attempt-{}.log", s.id, s.attempts));
        let Ok(text) = std::fs::read_to_string(&log) else {
            continue;
        };
        let lines: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest))
            .filter(|l| !l.starts_with("--- "))
            .collect();
        eprintln!(
            "\n{} failed: {}",
            s.id,
            s.reason.as_deref().unwrap_or("failed")
        );
        eprintln!("  log: {}", log.display());
        for l in &lines[lines.len().saturating_sub(10)..] {
            eprintln!("  | {l}");
        }
    }
}

type ConsumerResult = (
    Option<Recorder>,
    Console,
    Option<runbook_evidence::EvidenceError>,
);

/// One thread consumes every event: evidence first, then the console, so nothing interleaves.
/// If evidence cannot be written the run is cancelled: a run that cannot be recorded must stop.
fn spawn_consumer(
    mut rx: mpsc::Receiver<RunEvent>,
    recorder: Recorder,
    mut console: Console,
    cancel: CancellationToken,
) -> std::thread::JoinHandle<ConsumerResult> {
    std::thread::spawn(move || {
        let mut recorder = Some(recorder);
        let mut error = None;
        while let Some(event) = rx.blocking_recv() {
            if let Some(r) = recorder.as_mut() {
                if let Err(e) = r.record(&event) {
                    error = Some(e);
                    cancel.cancel();
                    recorder = None;
                }
            }
            console.event(&event);
        }
        (recorder, console, error)
    })
}

async fn watch_signals(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    eprintln!("\nstopping: sending TERM to running steps (KILL after their grace period)");
    cancel.cancel();
}
