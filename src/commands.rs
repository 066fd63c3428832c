//! The subcommands: each loads what it needs, calls the engine, and turns the outcome into
//! output and an exit code. Errors are rendered here and nowhere else.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser;
use runbook_engine::diagnostic::Code;
use runbook_engine::event::RunStatus;
use runbook_engine::expr::ExprHost;
use runbook_engine::graph::StepGraph;
use runbook_engine::params::BoundParams;
use runbook_engine::plan::{Plan, RunInfo, Selection};
use runbook_engine::runner::{Approver, NoApprover};
use runbook_engine::{Diagnostics, Runbook};
use runbook_evidence::manifest::Operator;
use runbook_evidence::{Recorder, RecorderConfig};

use crate::approve::TerminalApprover;
use crate::cli::{
    CheckArgs, Cli, Command, EvidenceCommand, ExecArgs, GraphArgs, GraphFormat, PlanArgs,
    ResumeArgs, RunArgs, Signing, VerifyArgs,
};
use crate::console::Console;
use crate::exit;
use crate::inventory_load::load_inventory;
use crate::lock::{Holder, RunLock};
use crate::render::{self, print_diagnostics, print_load_error, stderr_color};
use crate::session::{self, Session};
use runbook_evidence::sign::{PublicKey, SecretKey};

pub fn main() -> i32 {
    // `run` and `resume` catch stop signals from the first instant, before argument parsing:
    // see `signals`.
    if matches!(std::env::args().nth(1).as_deref(), Some("run" | "resume")) {
        crate::signals::install();
    }
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
        Command::Resume(args) => resume(&args),
        Command::Keygen {
            secret_key,
            public_key,
            force,
            password,
        } => keygen(&secret_key, &public_key, force, password.as_deref()),
        Command::Evidence { command } => evidence(&command),
        Command::Inventory { command } => crate::inventory_cmd::run(&command),
        Command::Completions { shell } => crate::cli::completions(shell),
        Command::Man => crate::cli::man(),
        Command::Schedule { command } => crate::schedule::command(&command),
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
        print_load_error(path, &e);
        exit::USAGE
    })?;
    match runbook_engine::compile(&source, host) {
        Ok((runbook, graph, mut warnings)) => {
            let extra = cli_checks(&runbook);
            let errors = extra.has_errors();
            warnings.extend(extra);
            print_diagnostics(&warnings);
            if errors {
                render::error(&format!("`{}` has errors; nothing was run", path.display()));
                return Err(exit::USAGE);
            }
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

/// Checks of what only this machine can tell: whether a browser exists for `screenshot`
/// steps. (`[notify]` is checked by the analyzer with the rest of the runbook.)
fn cli_checks(runbook: &Runbook) -> Diagnostics {
    use runbook_engine::diagnostic::Diagnostic;
    use runbook_engine::runbook::{Action, RequestKind};
    let mut d = Diagnostics::default();
    let screenshot_step = runbook.steps.iter().find(|s| {
        let direct = matches!(s.action, Action::Request { kind: RequestKind::Screenshot, .. });
        let in_block = matches!(&s.action, Action::Block { steps } if steps.iter().any(|b| matches!(b.action, Action::Request { kind: RequestKind::Screenshot, .. })));
        direct || in_block
    });
    if let Some(step) = screenshot_step {
        if let Err(e) = runbook_steps::screenshot::find_browser(None) {
            d.push(
                Diagnostic::warning(
                    Code::BadValue,
                    format!(
                        "step `{}` takes screenshots but no browser was found: {e}",
                        step.id
                    ),
                )
                .at(&runbook.source, step.id_span.clone(), "needs Chromium")
                .help("Debian: apt-get install chromium (or set RUNBOOK_CHROMIUM to the browser)"),
            );
        }
    }
    d
}

/// A file that cannot be read or is not UTF-8, as an RB0015 diagnostic (with the position of
/// the first bad byte when there is one).
fn bind_params(runbook: &Runbook, sets: &[String]) -> Result<BoundParams, i32> {
    BoundParams::bind(runbook, sets, |var| std::env::var(var).ok()).map_err(|errors| {
        let source = &runbook.source;
        for e in errors {
            // Point at the declaration when there is one, else at least name the runbook.
            let at = match e.param().and_then(|name| runbook.param(name)) {
                Some(spec) => {
                    let lc = source.line_col(spec.span.start);
                    format!("{}:{}:{}", source.path().display(), lc.line, lc.column)
                }
                None => source.path().display().to_string(),
            };
            render::error(&format!("{at}: {e}"));
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

fn make_plan(
    loaded: Loaded,
    params: &crate::cli::ParamArgs,
    sel: &crate::cli::Selection,
) -> Result<Plan, i32> {
    let inventory = load_inventory(&loaded.runbook, params.inventory.as_deref(), true)?;
    let bound = bind_params(&loaded.runbook, &params.set)?;
    let workdir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let mut plan = Plan::new(
        loaded.runbook,
        loaded.graph,
        bound,
        &selection(sel),
        workdir,
    )
    .map_err(|e| {
        render::error(&e.to_string());
        exit::USAGE
    })?;
    if let Some(inv) = inventory {
        plan.set_inventory(inv);
    }
    Ok(plan)
}

fn check(args: &CheckArgs) -> i32 {
    let host = ExprHost::new();
    let mut failed = 0;
    for file in &args.files {
        match load(file, &host) {
            // As strict as `run`: what check accepts, run must not refuse.
            Ok(loaded) => match load_inventory(&loaded.runbook, args.inventory.as_deref(), true) {
                Ok(_) => eprintln!(
                    "{}: ok ({} steps)",
                    file.display(),
                    loaded.runbook.steps.len()
                ),
                Err(_) => failed += 1,
            },
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
    let plan =
        match load(&args.file, &host).and_then(|l| make_plan(l, &args.params, &args.selection)) {
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

fn evidence_dir_for(plan: &Plan, flag: Option<&PathBuf>) -> PathBuf {
    flag.cloned().unwrap_or_else(|| {
        plan.runbook.meta.evidence_dir.as_ref().map_or_else(
            || PathBuf::from("proof"),
            |d| plan.runbook.base_dir().join(d),
        )
    })
}

fn parallelism(flag: Option<usize>) -> usize {
    flag.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, std::num::NonZero::get))
}

fn approver(op: &Operator) -> Arc<dyn Approver> {
    if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        Arc::new(TerminalApprover {
            operator: format!("{}@{}", op.user, op.host),
        })
    } else {
        Arc::new(NoApprover)
    }
}

fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Loads the signing key before anything runs, so a wrong path or password fails early (and
/// checks the metrics textfile directory the same way).
fn load_sign_key(s: &Signing) -> Result<Option<SecretKey>, i32> {
    if let Some(dir) = &s.textfile_dir {
        if !dir.is_dir() {
            render::error(&format!(
                "--textfile-dir `{}` is not a directory; nothing was run",
                dir.display()
            ));
            return Err(exit::USAGE);
        }
    }
    let Some(path) = &s.sign_key else {
        return Ok(None);
    };
    SecretKey::from_file(path, s.sign_password.as_deref())
        .map(Some)
        .map_err(|e| {
            render::error(&format!(
                "signing key `{}`: {e}; nothing was run",
                path.display()
            ));
            exit::USAGE
        })
}

fn keygen(secret: &Path, public: &Path, force: bool, password: Option<&str>) -> i32 {
    let op = crate::context::operator();
    let (sk, pk) =
        runbook_evidence::sign::generate(&format!("runbook key of {}@{}", op.user, op.host));
    let result = sk.to_minisign(password).and_then(|text| {
        runbook_evidence::sign::write_key_pair((secret, &text), (public, &pk.to_minisign()), force)
    });
    match result {
        Ok(()) => {
            eprintln!(
                "secret key: {}{}
public key: {} (give this to assessors)
key id {}; for `minisign -P`: {}",
                secret.display(),
                if password.is_some() {
                    " (encrypted)"
                } else {
                    " (not encrypted: protect the file)"
                },
                public.display(),
                pk.key_id(),
                pk.to_base64()
            );
            exit::OK
        }
        Err(e) => {
            use runbook_evidence::sign::SignError;
            render::error(&match e {
                SignError::SameKeyFile { path } => format!(
                    "`--secret-key` and `--public-key` are the same file `{}`; nothing was written",
                    path.display()
                ),
                SignError::KeyFileExists { path } => format!(
                    "`{}` already exists; pass `--force` to overwrite it (nothing was written)",
                    path.display()
                ),
                e => e.to_string(),
            });
            exit::USAGE
        }
    }
}

/// What `evidence verify` trusts, read from its flags: usage errors exit 2.
struct Trust {
    keys: Vec<PublicKey>,
    tsa_ca: Option<Vec<runbook_evidence::tsa::Certificate>>,
}

impl Trust {
    fn load(args: &VerifyArgs) -> Result<Self, i32> {
        let mut keys = Vec::new();
        if let Some(k) = &args.pubkey {
            let parsed = if Path::new(k).exists() {
                PublicKey::from_file(Path::new(k))
            } else {
                PublicKey::from_base64(k)
            };
            match parsed {
                Ok(key) => keys.push(key),
                Err(e) => {
                    render::error(&format!("public key `{k}`: {e}"));
                    return Err(exit::USAGE);
                }
            }
        }
        if let Some(path) = &args.trusted_keys {
            let text = std::fs::read_to_string(path).map_err(|e| {
                render::error(&format!("trusted-keys file `{}`: {e}", path.display()));
                exit::USAGE
            })?;
            match PublicKey::all_from_text(&text) {
                Ok(more) => keys.extend(more),
                Err((line, e)) => {
                    render::error(&format!(
                        "trusted-keys file `{}` line {line}: {e}",
                        path.display()
                    ));
                    return Err(exit::USAGE);
                }
            }
        }
        let tsa_ca = match &args.tsa_ca {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    render::error(&format!("TSA CA file `{}`: {e}", path.display()));
                    exit::USAGE
                })?;
                Some(runbook_evidence::tsa::load_ca(&pem).map_err(|e| {
                    render::error(&format!("TSA CA file `{}`: {e}", path.display()));
                    exit::USAGE
                })?)
            }
        };
        Ok(Self { keys, tsa_ca })
    }

    fn options(&self) -> runbook_evidence::verify::VerifyOptions<'_> {
        runbook_evidence::verify::VerifyOptions {
            keys: &self.keys,
            tsa_ca: self.tsa_ca.as_deref(),
        }
    }
}

fn verify(args: &VerifyArgs) -> i32 {
    let trust = match Trust::load(args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    if let Some(dir) = &args.chain {
        return verify_chain(dir, &trust, args);
    }
    let Some(bundle) = &args.bundle else {
        render::error("give a bundle directory, or --chain DIR");
        return exit::USAGE;
    };
    // A path that is no bundle is a usage error: exit 3 means a bundle failed its check.
    if let Err(e) = runbook_evidence::verify::check_is_bundle(bundle) {
        render::error(&e.to_string());
        return exit::USAGE;
    }
    let report = runbook_evidence::verify::verify_bundle_with(bundle, &trust.options());
    for p in &report.problems {
        eprintln!("problem: {p}");
    }
    for n in &report.notes {
        eprintln!("note: {n}");
    }
    eprintln!(
        "{} files checked; signature: {}",
        report.files_checked, report.signature
    );
    eprintln!("timestamp: {}", report.timestamp);
    let gaps = report.trust_gaps(args.require_signature);
    for g in &gaps {
        eprintln!("not trusted: {g}");
    }
    if !report.is_ok() {
        render::error(&format!(
            "{}: {} problem(s)",
            bundle.display(),
            report.problems.len()
        ));
        return exit::VERIFY_FAILED;
    }
    if !gaps.is_empty() {
        render::error(&format!(
            "{}: NOT verified: {}",
            bundle.display(),
            if gaps.len() == 1 {
                "see `not trusted` above".to_owned()
            } else {
                format!("{} reasons, see `not trusted` above", gaps.len())
            }
        ));
        return exit::VERIFY_FAILED;
    }
    eprintln!("{}", verdict_line(&bundle.display().to_string(), &report));
    exit::OK
}

/// The last line of a bundle that passed: what was established, and what was not.
fn verdict_line(name: &str, report: &runbook_evidence::verify::VerifyReport) -> String {
    use runbook_evidence::verify::{SignatureState, TimestampState};
    let time = match &report.timestamp {
        TimestampState::Verified(s) => format!(
            "; time-stamped {} by a trusted TSA",
            s.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        _ => String::new(),
    };
    match &report.signature {
        SignatureState::Verified { key_id, .. } => {
            format!("{name}: ok (signed by trusted key {key_id}{time})")
        }
        _ => format!(
            "{name}: ok, but UNSIGNED: only its checksums were checked, which anyone who could \
             write the bundle could have rewritten{time} (--require-signature makes this fail)"
        ),
    }
}

/// `evidence verify --chain`: every bundle of each runbook directory, and the links.
fn verify_chain(dir: &Path, trust: &Trust, args: &VerifyArgs) -> i32 {
    use runbook_evidence::chain;
    let dirs = chain::runbook_dirs(dir);
    if dirs.is_empty() {
        render::error(&format!(
            "`{}`: no evidence bundles in it or in its subdirectories",
            dir.display()
        ));
        return exit::USAGE;
    }
    let mut failed = 0usize;
    let mut total = 0usize;
    for rb_dir in &dirs {
        let mut report = chain::walk(rb_dir, &trust.options());
        if let Some(schedule) = &args.schedule {
            let since = report.entries.iter().filter_map(|e| e.started_at).min();
            match crate::schedule::expected::expected(schedule, rb_dir, since) {
                Ok(expected) => {
                    for at in chain::missed_slots(&report, &expected.slots) {
                        report.problems.push(chain::ChainProblem::MissedSlot { at });
                    }
                    for b in expected.last_bundles_missing {
                        report
                            .problems
                            .push(chain::ChainProblem::LastRunMissing { bundle: b });
                    }
                }
                Err(e) => {
                    render::error(&e);
                    return exit::USAGE;
                }
            }
        }
        eprintln!(
            "chain {}: {} bundle(s)",
            rb_dir.display(),
            report.entries.len()
        );
        for e in &report.entries {
            total += 1;
            let gaps = e.report.trust_gaps(args.require_signature);
            let verdict = if !e.report.is_ok() {
                format!("FAILED ({} problem(s))", e.report.problems.len())
            } else if !gaps.is_empty() {
                "NOT VERIFIED".to_owned()
            } else {
                match &e.report.signature {
                    runbook_evidence::verify::SignatureState::Verified { key_id, .. } => {
                        format!("ok, signed by {key_id}")
                    }
                    _ => "ok, UNSIGNED".to_owned(),
                }
            };
            eprintln!(
                "  {}  {}  {}",
                e.bundle,
                e.status.as_deref().unwrap_or("?"),
                verdict
            );
            for p in &e.report.problems {
                eprintln!("    problem: {p}");
            }
            for g in &gaps {
                eprintln!("    not trusted: {g}");
            }
            if !e.report.is_ok() || !gaps.is_empty() {
                failed += 1;
            }
        }
        for n in &report.notes {
            eprintln!("  note: {n}");
        }
        for p in &report.problems {
            eprintln!("  chain problem: {p}");
        }
        failed += report.problems.len();
    }
    if failed > 0 {
        render::error(&format!(
            "{}: chain NOT verified: {failed} problem(s) in {total} bundle(s)",
            dir.display()
        ));
        exit::VERIFY_FAILED
    } else {
        eprintln!(
            "{}: chain ok: {total} bundle(s), each linked to the one before it",
            dir.display()
        );
        exit::OK
    }
}

/// The secrets a run holds in memory only: the key that signs its bundle and the
/// passphrases of its hosts' encrypted SSH keys.
struct Keys {
    sign_key: Option<SecretKey>,
    passphrases: std::collections::HashMap<PathBuf, String>,
}

impl Keys {
    /// The signing key already loaded, plus the passphrases asked at the terminal for the
    /// plan's encrypted SSH keys (before anything runs).
    fn gather(plan: &Plan, sign_key: Option<SecretKey>) -> Result<Self, i32> {
        match crate::passphrase::ask(plan) {
            Ok(passphrases) => Ok(Self {
                sign_key,
                passphrases,
            }),
            Err(message) => {
                render::error(&message);
                Err(exit::USAGE)
            }
        }
    }
}

/// Runs a plan into a recorder with the options `run` and `resume` share.
fn launch(
    plan: Arc<Plan>,
    host: ExprHost,
    run: RunInfo,
    recorder: Recorder,
    op: &Operator,
    exec: &ExecArgs,
    keys: Keys,
) -> i32 {
    let live = !exec.no_progress && std::io::stderr().is_terminal();
    let console = Console::new(
        live,
        exec.stream,
        stderr_color(),
        plan.params.secrets(),
        &plan.runbook.meta.redact,
    );
    session::execute(Session {
        host,
        run,
        recorder,
        parallel: parallelism(exec.parallel),
        console,
        json: exec.json,
        approver: approver(op),
        sign_key: keys.sign_key,
        textfile_dir: exec.signing.textfile_dir.clone(),
        fail_on_leak: exec.signing.fail_on_leak,
        timestamp_url: exec
            .signing
            .timestamp_url
            .clone()
            .or_else(|| plan.runbook.meta.timestamp_url.clone()),
        passphrases: keys.passphrases,
        durability: exec.durability,
        plan,
    })
}

/// Takes the run lock (see [`RunLock::take`]) and says what it took over; also returns the
/// stale holder it replaced, if any.
fn take_lock(dir: &Path, me: &Holder, break_lock: bool) -> Result<(RunLock, Option<Holder>), i32> {
    match RunLock::take(dir, me, break_lock) {
        Ok(taken) => {
            match (&taken.stale, taken.automatic) {
                (Some(h), true) => eprintln!(
                    "note: the previous run's process is gone (pid {} on this host) and its \
                     bundle has nothing left to resume: taking over its lock",
                    h.pid
                ),
                (Some(h), false) => {
                    eprintln!("note: took over the lock of a run that did not finish: {h}");
                }
                (None, _) => {}
            }
            Ok((taken.lock, taken.stale))
        }
        Err(e) => {
            render::error(&e.to_string());
            Err(exit::USAGE)
        }
    }
}

/// [`crate::lock::stop_stale_run`], each note also on the console.
fn stop_stale_run(stale: Option<&Holder>, mine: &str) -> Vec<String> {
    let notes = crate::lock::stop_stale_run(stale, mine);
    for n in &notes {
        eprintln!("note: {n}");
    }
    notes
}

fn run(args: &RunArgs) -> i32 {
    let host = ExprHost::new();
    let sign_key = match load_sign_key(&args.exec.signing) {
        Ok(k) => k,
        Err(code) => return code,
    };
    let plan =
        match load(&args.file, &host).and_then(|l| make_plan(l, &args.params, &args.selection)) {
            Ok(p) => p,
            Err(code) => return code,
        };
    let mut plan = plan;
    plan.forks = args
        .exec
        .forks
        .unwrap_or(runbook_engine::plan::DEFAULT_FORKS)
        .max(1);
    let run_info = RunInfo::generate();
    if args.dry_run {
        print!("{}", plan.to_text(&host, &run_info));
        let has_plan_commands = plan.any_selected(|s| s.plan.is_some());
        if !has_plan_commands {
            eprintln!("dry run: nothing was run and no evidence was written");
            return exit::OK;
        }
        eprintln!("dry run: running only the steps' `plan` commands; the bundle records them");
        plan.dry_run = true;
    }
    let keys = match Keys::gather(&plan, sign_key) {
        Ok(k) => k,
        Err(code) => return code,
    };
    let plan = Arc::new(plan);
    if crate::signals::received() {
        eprintln!(
            "interrupted before the run started: nothing was run and no evidence was written"
        );
        return exit::INTERRUPTED;
    }
    let evidence_dir = evidence_dir_for(&plan, args.evidence_dir.as_ref());
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
    let op = crate::context::operator();
    let mut context = crate::context::collect(&args.file, &plan.workdir, &plan.runbook.meta.facts);
    context["signing"] = serde_json::json!({
        "key_id": keys.sign_key.as_ref().map(|k| k.key_id().to_string()),
    });
    context[runbook_evidence::chain::CONTEXT_KEY] =
        runbook_evidence::chain::link_to_previous(&evidence_dir.join(&plan.runbook.meta.name));
    // Values from outside the runbook (environment, git, command line) may carry credentials
    // in URLs the run has no secret for: removed, and where from recorded.
    let mut params = plan.params.to_json(true);
    let mut command_line = serde_json::Value::from(std::env::args().collect::<Vec<_>>());
    let mut scrubbed = runbook_evidence::scrub::scrub_json(&mut context, "context");
    scrubbed.extend(runbook_evidence::scrub::scrub_json(&mut params, "params"));
    scrubbed.extend(runbook_evidence::scrub::scrub_json(
        &mut command_line,
        "command_line",
    ));
    context["scrubbed"] = scrubbed.into();
    let command_line: Vec<String> = serde_json::from_value(command_line).unwrap_or_default();
    let mut recorder = match Recorder::create(RecorderConfig {
        evidence_dir: evidence_dir.clone(),
        runbook: plan.runbook.clone(),
        run_id: run_info.id.clone(),
        started_at: run_info.started_at,
        params,
        param_sources,
        secrets: plan.params.secrets(),
        operator: op.clone(),
        engine_version: env!("CARGO_PKG_VERSION").to_owned(),
        workdir: plan.workdir.clone(),
        command_line,
        context,
        inventory: plan.inventory().source.clone(),
    }) {
        Ok(r) => r,
        Err(e) => {
            render::error(&format!("{e}; nothing was run"));
            return exit::USAGE;
        }
    };
    for p in recorder.removed_partials() {
        eprintln!(
            "note: removed `{}`, a bundle a run had died creating (it held no run record)",
            p.display()
        );
    }
    let me = Holder::me(
        &op.host,
        &op.user,
        run_info.started_at.to_rfc3339(),
        &run_info.id,
        canonical(recorder.dir()),
    );
    let lock = match take_lock(
        &evidence_dir.join(&plan.runbook.meta.name),
        &me,
        args.exec.break_lock,
    ) {
        Ok((l, stale)) => {
            for msg in stop_stale_run(stale.as_ref(), &run_info.id) {
                let _ = recorder.note(&msg);
            }
            l
        }
        Err(code) => {
            // Nothing ran: leave no bundle behind that looks like a run.
            let _ = std::fs::remove_dir_all(recorder.dir());
            return code;
        }
    };
    let code = launch(plan, host, run_info, recorder, &op, &args.exec, keys);
    lock.release();
    code
}

/// Hosts the interrupted run added with `inventory.add_host` go back into the inventory: the
/// steps that added them succeeded and are not run again, but later steps run on them.
/// Adds again the hosts the interrupted run added at run time (`inventory.add_host`). Returns
/// the notes to record once the bundle may be written.
fn restore_added_hosts(plan: &mut Plan, recorder: &Recorder) -> Vec<String> {
    let mut notes = Vec::new();
    let mut restored = Vec::new();
    for host in recorder.hosts_added() {
        let message = match host {
            Ok(new) => match plan.add_hosts(std::slice::from_ref(&new)).first() {
                None => {
                    restored.push(new.name);
                    continue;
                }
                Some(e) => format!("resume could not add host `{}` again: {e}", new.name),
            },
            Err(name) => format!(
                "resume cannot add host `{name}` again: its add_host settings held a value \
                 registered with secret() at run time, which is never stored; resume --from the \
                 step that adds it"
            ),
        };
        render::warning(&message);
        notes.push(message);
    }
    if !restored.is_empty() {
        notes.push(format!(
            "resume added the hosts the interrupted run had added: {}",
            restored.join(", ")
        ));
    }
    notes
}

/// `runbook resume`: everything that can refuse is checked first, reading only; the run lock is
/// taken last, right before the first change (the journal's torn line, leftover processes, the
/// notes). A refused resume therefore leaves the bundle, the lock and any leftover processes
/// as they were — stopping processes before owning the lock could even hit a live run's.
fn resume(args: &ResumeArgs) -> i32 {
    let bundle = &args.bundle;
    let host = ExprHost::new();
    let sign_key = match load_sign_key(&args.exec.signing) {
        Ok(k) => k,
        Err(code) => return code,
    };
    let interrupted = match runbook_evidence::resume::Interrupted::open(bundle) {
        Ok(i) => i,
        Err(e) => {
            render::error(&e.to_string());
            return exit::USAGE;
        }
    };
    let evidence_dir = interrupted.evidence_dir();
    // A run still alive is refused first (looking, not locking): nothing below may touch it.
    if let Some(h) = RunLock::live_holder(&evidence_dir) {
        render::error(&crate::lock::LockError::Held(Box::new(h)).to_string());
        return exit::USAGE;
    }
    if let Err(e) = interrupted.check_journal() {
        render::error(&e.to_string());
        return exit::USAGE;
    }
    let path = interrupted.runbook_path();
    let source = match runbook_engine::load_source(&path) {
        Ok(s) => s,
        Err(e) => {
            render::error(&format!("{e} (the runbook this bundle ran)"));
            return exit::USAGE;
        }
    };
    let now = interrupted.runbook_now(source.text());
    let mut changed_note: Option<String> = None;
    if now.changed() {
        if args.allow_changed {
            eprintln!("note: `{}` changed since the run started; resuming with the new version (--allow-changed)", path.display());
            changed_note = Some(format!(
                "resumed with a changed runbook (--allow-changed): `{}` sha256 {} (the run started with {})",
                path.display(),
                now.sha256,
                now.recorded
            ));
        } else {
            render::error(&format!(
                "`{}` changed since this run started (sha256 {} now, {} then); refusing to resume a different runbook — pass `--allow-changed` to do it anyway",
                path.display(),
                &now.sha256[..12],
                &now.recorded[..12.min(now.recorded.len())]
            ));
            return exit::USAGE;
        }
    }
    let loaded = match runbook_engine::compile(&source, &host) {
        Ok((runbook, graph, warnings)) => {
            print_diagnostics(&warnings);
            Loaded { runbook, graph }
        }
        Err(diags) => {
            print_diagnostics(&diags);
            return exit::USAGE;
        }
    };
    // The same params as the first time: recorded values for non-secrets, then any --set.
    // Secrets come from where they came from the first time (environment, --set).
    let mut sets =
        interrupted.recorded_params(|name| loaded.runbook.param(name).is_some_and(|p| !p.secret));
    sets.extend(args.params.set.iter().cloned());
    let params = match bind_params(&loaded.runbook, &sets) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // The bundle as the journal says, read with the secrets so they stay redacted.
    let inspected = match Recorder::inspect(bundle, params.secrets()) {
        Ok(r) => r,
        Err(e) => {
            render::error(&e.to_string());
            return exit::USAGE;
        }
    };
    let previous = inspected.status();
    // The journal says the run ended, but the runner died while sealing (manifest, report,
    // `SHA256SUMS`): seal it now, as the run would have.
    // A run that succeeded has nothing left to do but its sealing; one that failed, was
    // cancelled or awaits approval is resumed as usual (and sealed again at its end).
    let stamped =
        args.exec.signing.timestamp_url.is_some() || loaded.runbook.meta.timestamp_url.is_some();
    if previous == RunStatus::Succeeded
        && interrupted.died_while_sealing(
            previous,
            sign_key.as_ref().map(SecretKey::public_key).as_ref(),
            stamped,
        )
    {
        return seal_interrupted(
            bundle,
            &evidence_dir,
            inspected,
            previous,
            &args.exec,
            loaded.runbook.meta.timestamp_url.as_deref(),
        );
    }
    if previous == RunStatus::Succeeded {
        render::error(&format!(
            "run {} already succeeded; nothing to resume",
            interrupted.manifest.run_id
        ));
        return exit::USAGE;
    }
    let inventory = match load_inventory(&loaded.runbook, args.params.inventory.as_deref(), true) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let mut plan = match Plan::new(
        loaded.runbook,
        loaded.graph,
        params,
        &selection(&args.selection),
        interrupted.workdir(),
    ) {
        Ok(p) => p,
        Err(e) => {
            render::error(&e.to_string());
            return exit::USAGE;
        }
    };
    if let Some(inv) = inventory {
        plan.set_inventory(inv);
    }
    plan.forks = args
        .exec
        .forks
        .unwrap_or(runbook_engine::plan::DEFAULT_FORKS)
        .max(1);

    let op = crate::context::operator();
    let by = format!("{}@{}", op.user, op.host);
    for id in &args.approve {
        if plan.runbook.step(id).is_none_or(|s| s.approve.is_none()) {
            render::error(&format!(
                "`--approve {id}`: no step `{id}` with `approve` in this runbook"
            ));
            return exit::USAGE;
        }
        plan.approved.push((id.clone(), by.clone()));
    }
    // Before the passphrases: the hosts added at run time may need some.
    let host_notes = restore_added_hosts(&mut plan, &inspected);
    let keys = match Keys::gather(&plan, sign_key) {
        Ok(k) => k,
        Err(code) => return code,
    };

    // Everything checked: take the lock (a stale one left by this bundle's run is taken over),
    // then make the first change.
    let me = Holder::me(
        &op.host,
        &op.user,
        chrono::Utc::now().to_rfc3339(),
        &interrupted.manifest.run_id,
        canonical(bundle),
    );
    let (lock, stale) = match take_lock(&evidence_dir, &me, args.exec.break_lock) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let mut recorder = match Recorder::reopen(bundle, plan.params.secrets()) {
        Ok(r) => r,
        Err(e) => {
            lock.give_back(stale.as_ref());
            render::error(&e.to_string());
            return exit::USAGE;
        }
    };
    // Another resume may have finished this run between the look and the lock.
    if recorder.status() != previous
        || recorder.manifest().resumed.len() != inspected.manifest().resumed.len()
    {
        lock.give_back(stale.as_ref());
        render::error(&format!(
            "run {} was resumed by another process meanwhile (it is {} now); look at the bundle, then resume again if needed",
            interrupted.manifest.run_id,
            recorder.status().as_str()
        ));
        return exit::USAGE;
    }
    drop(inspected);
    if let Some(n) = &changed_note {
        let _ = recorder.note(n);
    }
    for msg in stop_stale_run(stale.as_ref(), &interrupted.manifest.run_id) {
        let _ = recorder.note(&msg);
    }
    // A runner killed hard leaves its steps' processes running: stop them before going on —
    // those the journal names, and any other process still carrying this run's id.
    for g in runbook_steps::stop_run_processes(
        &interrupted.manifest.run_id,
        std::time::Duration::from_secs(5),
    ) {
        let msg = format!("stopped process group {g}, left running by the interrupted run");
        eprintln!("note: {msg}");
        let _ = recorder.note(&msg);
    }
    for p in interrupted.unfinished_processes() {
        if runbook_steps::stop_leftover_group(
            p.pid,
            p.start_ticks,
            std::time::Duration::from_secs(5),
        ) {
            let msg = format!(
                "stopped process group {} of step `{}` attempt {}, left running by the interrupted run",
                p.pid, p.step, p.attempt
            );
            eprintln!("note: {msg}");
            let _ = recorder.note(&msg);
        }
    }
    for n in &host_notes {
        let _ = recorder.note(n);
    }
    let prior = recorder.prior_steps();
    for (i, step) in plan.runbook.steps.iter().enumerate() {
        if let Some((_, p)) = prior.iter().find(|(id, _)| id == step.id.as_str()) {
            plan.prior[i] = p.clone();
        }
    }
    plan.resume_of = Some((previous, by));
    plan.rerun_selected = !args.selection.only.is_empty() || args.selection.from.is_some();
    recorder.note_resume(&prior);
    recorder.set_shapes(&plan.runbook.meta.redact);
    let run_info = RunInfo {
        id: interrupted.manifest.run_id.clone(),
        started_at: interrupted.manifest.started_at,
    };
    let code = launch(
        Arc::new(plan),
        host,
        run_info,
        recorder,
        &op,
        &args.exec,
        keys,
    );
    lock.release();
    code
}

/// `evidence repair`, refused while a live run holds the bundle's run lock.
fn repair_locked(
    bundle: &Path,
) -> Result<runbook_evidence::manifest::Manifest, runbook_evidence::EvidenceError> {
    let dir = bundle
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    if let Some(h) = RunLock::live_holder(&dir) {
        return Err(runbook_evidence::EvidenceError::Write {
            path: bundle.to_path_buf(),
            source: std::io::Error::other(format!(
                "a run is in progress ({h}); repair it once it has ended"
            )),
        });
    }
    Recorder::repair(bundle)
}

fn evidence(cmd: &EvidenceCommand) -> i32 {
    match cmd {
        EvidenceCommand::Verify(args) => verify(args),
        EvidenceCommand::List { dir } => match crate::bundles::list(dir) {
            Ok(text) => {
                print!("{text}");
                exit::OK
            }
            Err(e) => {
                render::error(&e);
                exit::USAGE
            }
        },
        EvidenceCommand::Show { bundle } => match crate::bundles::show(bundle) {
            Ok(text) => {
                print!("{text}");
                exit::OK
            }
            Err(e) => {
                render::error(&e);
                exit::USAGE
            }
        },
        EvidenceCommand::Export {
            bundle,
            output,
            force,
        } => match crate::bundles::export(bundle, output.as_deref(), *force) {
            Ok(path) => {
                eprintln!("{}", path.display());
                exit::OK
            }
            Err(e) => {
                render::error(&e);
                exit::USAGE
            }
        },
        EvidenceCommand::Repair {
            bundle,
            force,
            sign_key,
            sign_password,
        } => repair(
            bundle,
            *force,
            sign_key.as_deref(),
            sign_password.as_deref(),
        ),
    }
}

/// `evidence repair`: seals a bundle its runner did not finish. A bundle that is already
/// sealed or verifies is refused without `--force`: rewriting its `SHA256SUMS` would only
/// drop a signature that cannot be made again without the key.
fn repair(bundle: &Path, force: bool, sign_key: Option<&Path>, password: Option<&str>) -> i32 {
    use runbook_evidence::verify::{self, SIGNATURE_FILE};
    let key = match sign_key {
        None => None,
        Some(path) => match SecretKey::from_file(path, password) {
            Ok(k) => Some(k),
            Err(e) => {
                render::error(&format!(
                    "signing key `{}`: {e}; nothing was repaired",
                    path.display()
                ));
                return exit::USAGE;
            }
        },
    };
    let signed = bundle.join(SIGNATURE_FILE).exists();
    if !force {
        let report = verify::verify_bundle(bundle, None);
        if report.sealed || report.is_ok() {
            let why = if report.sealed {
                "its run finished and sealed it (`SHA256SUMS` present, `run_finished` in the journal)"
            } else {
                "it verifies"
            };
            let cost = if signed && key.is_none() {
                "rewrite `SHA256SUMS` and drop the bundle's signature"
            } else {
                "rewrite `SHA256SUMS`"
            };
            render::error(&format!(
                "`{b}` has nothing to repair: {why}; `repair` is for interrupted bundles (the \
                 runner died before sealing them), and here it would only {cost}; \
                 `runbook evidence verify {b}` checks it, `--force` repairs it anyway",
                b = bundle.display()
            ));
            return exit::USAGE;
        }
    }
    let m = match repair_locked(bundle) {
        Ok(m) => m,
        Err(e) => {
            render::error(&e.to_string());
            return exit::USAGE;
        }
    };
    if crate::timestamp::drop_stale(bundle) {
        render::warning(
            "the bundle's RFC 3161 time-stamp was REMOVED: it was for the old `SHA256SUMS`; \
             the repaired bundle has no trusted time",
        );
    }
    if let Some(key) = &key {
        let signed_again = runbook_evidence::sign::default_trusted_comment(bundle)
            .and_then(|comment| runbook_evidence::sign::sign_bundle(bundle, key, &comment));
        if let Err(e) = signed_again {
            // The old signature covers the old checksums: left in place it would only fail.
            let _ = std::fs::remove_file(bundle.join(SIGNATURE_FILE));
            render::error(&if signed {
                format!(
                    "{e}; the bundle was repaired but is now UNSIGNED: its old signature no \
                     longer matched the rewritten `SHA256SUMS` and was removed"
                )
            } else {
                format!("{e}; the bundle was repaired but is not signed")
            });
            return exit::USAGE;
        }
        eprintln!("signed with key {}", key.key_id());
    } else if std::fs::remove_file(bundle.join(SIGNATURE_FILE)).is_ok() {
        render::warning(&format!(
            "the bundle's signature was REMOVED: `SHA256SUMS` was rewritten, so the old \
             `{SIGNATURE_FILE}` no longer matched it, and the bundle is now UNSIGNED; sign it \
             again with `runbook evidence repair {} --force --sign-key KEY`",
            bundle.display()
        ));
    }
    eprintln!(
        "{}: manifest rebuilt from the journal; status {}",
        bundle.display(),
        m.status.as_str()
    );
    exit::OK
}

/// `resume` of a run that ended but whose sealing was interrupted: takes the lock, finishes the
/// bundle (manifest, report, `SHA256SUMS`, signature when a key is given) and exits as the run
/// ended.
fn seal_interrupted(
    bundle: &Path,
    evidence_dir: &Path,
    recorder: Recorder,
    status: RunStatus,
    exec: &crate::cli::ExecArgs,
    runbook_timestamp_url: Option<&str>,
) -> i32 {
    let op = crate::context::operator();
    let me = Holder::me(
        &op.host,
        &op.user,
        chrono::Utc::now().to_rfc3339(),
        &recorder.manifest().run_id,
        bundle.display().to_string(),
    );
    let (lock, _) = match take_lock(evidence_dir, &me, exec.break_lock) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let sign_key = match load_sign_key(&exec.signing) {
        Ok(k) => k,
        Err(code) => {
            lock.give_back(None);
            return code;
        }
    };
    let timestamp_url = exec
        .signing
        .timestamp_url
        .clone()
        .or_else(|| runbook_timestamp_url.map(str::to_owned));
    let sealed = session::seal_bundle(
        recorder,
        sign_key.as_ref(),
        exec.signing.textfile_dir.as_deref(),
        timestamp_url.as_deref(),
    );
    lock.release();
    match sealed {
        Ok((dir, stamp_failed)) => {
            eprintln!(
                "run {} had {} but was interrupted while sealing its bundle; sealed now: {}",
                me.run_id,
                status.as_str(),
                dir.display()
            );
            if let Some(message) = stamp_failed {
                render::error(&message);
                return exit::RUN_FAILED;
            }
            match status {
                RunStatus::Succeeded => exit::OK,
                RunStatus::Cancelled => exit::INTERRUPTED,
                RunStatus::AwaitingApproval => exit::AWAITING_APPROVAL,
                _ => exit::RUN_FAILED,
            }
        }
        Err(e) => {
            render::error(&format!("cannot seal `{}`: {e}", bundle.display()));
            exit::RUN_FAILED
        }
    }
}
