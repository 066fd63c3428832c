//! Running a plan with a recorder: the part `run` and `resume` share. Owns the async runtime,
//! the event consumer thread, signal handling and the end-of-run report.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use runbook_engine::event::{RunEvent, RunStatus, StepStatus};
use runbook_engine::executor::{Executor, RunReport};
use runbook_engine::expr::ExprHost;
use runbook_engine::plan::{Plan, RunInfo};
use runbook_engine::runner::Approver;
use runbook_evidence::Recorder;
use runbook_steps::Dispatcher;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::console::{summary_table, Console};
use crate::exit;
use crate::render;

/// Writes to stderr, ignoring errors: a closed stderr (`runbook run … 2>&1 | head`) must not
/// stop the runner before the bundle is sealed.
fn say(text: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
}

macro_rules! sayln {
    ($($arg:tt)*) => { say(&format!("{}\n", format!($($arg)*))) };
}

pub struct Session {
    pub plan: Arc<Plan>,
    pub host: ExprHost,
    pub run: RunInfo,
    pub recorder: Recorder,
    pub parallel: usize,
    pub console: Console,
    pub json: bool,
    pub approver: Arc<dyn Approver>,
    /// Signs the bundle when it is sealed.
    pub sign_key: Option<runbook_evidence::sign::SecretKey>,
    /// node_exporter textfile directory for metrics.
    pub textfile_dir: Option<std::path::PathBuf>,
    /// `--fail-on-leak`: a secret found in step output fails the run.
    pub fail_on_leak: bool,
    /// `--timestamp-url`: the RFC 3161 time-stamping authority for the sealed bundle.
    pub timestamp_url: Option<String>,
    /// Passphrases of encrypted SSH key files, asked at the terminal.
    pub passphrases: std::collections::HashMap<std::path::PathBuf, String>,
    /// Whether records that announce an action are synced to disk before it starts.
    pub durability: crate::cli::Durability,
}

pub fn execute(s: Session) -> i32 {
    let bundle = s.recorder.dir().to_path_buf();
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
    let force = CancellationToken::new();
    let abort = CancellationToken::new();
    // Bounded: output waits for the evidence writer instead of piling up (at most this many
    // chunks of at most 64 KiB are ever in flight).
    let (tx, rx) = mpsc::channel::<RunEvent>(256);
    let consumer = spawn_consumer(
        rx,
        s.recorder,
        s.console,
        cancel.clone(),
        runtime.handle().clone(),
        s.durability == crate::cli::Durability::Power,
    );

    let report: RunReport = runtime.block_on(async {
        // A file-size limit (ulimit -f) must surface as a write error the recorder reports, not
        // kill the runner with SIGXFSZ and lose the end of the bundle.
        let _xfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(
            nix::sys::signal::Signal::SIGXFSZ as i32,
        ));
        let signals = tokio::spawn(watch_signals(cancel.clone(), force.clone(), abort.clone()));
        let dispatcher = Arc::new(Dispatcher::with_passphrases(s.passphrases));
        let executor = Executor::new(
            s.plan.clone(),
            dispatcher.clone(),
            s.host.clone(),
            s.run,
            s.parallel,
            tx,
            cancel.clone(),
        )
        .with_record_barrier()
        .with_force(force.clone())
        .with_abort(abort.clone())
        .with_approver(s.approver);
        let report = executor.run().await;
        signals.abort();
        dispatcher.close().await;
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
    // A step's processes end with it (each attempt stops those that left its group); this
    // catches what slipped through, so nothing with this run's id outlives the run.
    let grace = s
        .plan
        .runbook
        .steps
        .iter()
        .map(|st| st.kill_grace)
        .max()
        .unwrap_or(runbook_engine::runbook::DEFAULT_KILL_GRACE);
    let mut recorder = recorder;
    for p in runbook_steps::stop_processes_left_by_run(&report.run_id, grace) {
        let msg = format!(
            "stopped a process still running with this run's id at the end of the run: {}",
            p.describe()
        );
        sayln!("note: {}", console.redact(&msg));
        if let Some(r) = recorder.as_mut() {
            let _ = r.note(&msg);
        }
    }
    let mut code = match report.status {
        RunStatus::Succeeded => exit::OK,
        RunStatus::Failed | RunStatus::Running | RunStatus::Interrupted => exit::RUN_FAILED,
        RunStatus::Cancelled => exit::INTERRUPTED,
        RunStatus::AwaitingApproval => exit::AWAITING_APPROVAL,
    };
    // Every step succeeded but an objective was missed (or could not be measured): the drill
    // failed, and says so with its own exit code.
    if let (exit::OK, Some(d)) = (code, &report.drill) {
        if d.verdict != runbook_engine::event::Verdict::Pass {
            render::error(&format!(
                "drill {}: the steps succeeded but the recovery objectives were not met (see the drill section of the report)",
                d.verdict.as_str().replace('_', " ")
            ));
            code = exit::DRILL_FAILED;
        }
    }
    say(&format!("\n{}", console.redact(&summary_table(&report))));
    print_failure_tails(&report, &bundle, &console);
    if let (true, Some(r)) = (s.fail_on_leak, recorder.as_mut()) {
        let leaks: Vec<String> = r
            .redaction_counts()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("`{name}` {n} time(s)"))
            .collect();
        if !leaks.is_empty() {
            let msg = format!(
                "--fail-on-leak: secrets appeared in step output and were redacted: {} (forms searched: {})",
                leaks.join(", "),
                runbook_engine::redact::SEARCHED_FORMS
            );
            render::error(&msg);
            if r.fail_run(&msg).is_ok() && code == exit::OK {
                code = exit::RUN_FAILED;
            }
        }
    }
    let mut stamp_failed = None;
    let finished = recorder.map(|r| {
        let (dir, failed) = seal_bundle(
            r,
            s.sign_key.as_ref(),
            s.textfile_dir.as_deref(),
            s.timestamp_url.as_deref(),
        )?;
        stamp_failed = failed;
        Ok(dir)
    });
    if let Some(message) = stamp_failed {
        render::error(&message);
        if code == exit::OK {
            code = exit::RUN_FAILED;
        }
    }
    let finished_dir: Option<std::path::PathBuf> =
        finished.as_ref().and_then(|r| r.as_ref().ok().cloned());
    let notify = s
        .plan
        .runbook
        .notify
        .as_ref()
        .and_then(|(v, _)| serde_json::from_value::<crate::notify::NotifySpec>(v.clone()).ok());
    match (evidence_error, finished) {
        (None, Some(Ok(dir))) => {
            sayln!(
                "\nrun {} {} in {} — evidence: {}",
                report.run_id,
                report.status.as_str(),
                runbook_engine::duration::format_duration(report.duration),
                dir.display()
            );
            if report.status == RunStatus::AwaitingApproval {
                sayln!(
                    "continue with: runbook resume {} --approve STEP",
                    dir.display()
                );
            }
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
    if let (Some(spec), Some(dir)) = (&notify, finished_dir.as_ref()) {
        notify_end(&runtime, spec, dir, code, &console);
    }
    if s.json {
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("bundle".into(), bundle.display().to_string().into());
        }
        let _ = writeln!(
            std::io::stdout().lock(),
            "{}",
            console.redact(&serde_json::to_string_pretty(&value).unwrap_or_default())
        );
    }
    code
}

/// Seals a bundle whose run has ended: the manifest, reports and `SHA256SUMS` (the
/// recorder's `finish`), then the signature, the metrics textfile and the RFC 3161 time-stamp,
/// each when asked for. The same for a run that ends and for one `resume` seals after the
/// runner died while sealing. Returns the bundle and why its time-stamp failed, if it did.
pub(crate) fn seal_bundle(
    recorder: Recorder,
    key: Option<&runbook_evidence::sign::SecretKey>,
    textfile_dir: Option<&Path>,
    timestamp_url: Option<&str>,
) -> Result<(std::path::PathBuf, Option<String>), runbook_evidence::EvidenceError> {
    let dir = recorder.finish()?;
    seal(&dir, key, textfile_dir)?;
    let stamp_failed = stamp(&dir, timestamp_url);
    Ok((dir, stamp_failed))
}

/// Gets the sealed bundle's RFC 3161 time-stamp when asked to; a token left from before
/// `SHA256SUMS` was rewritten (resume) is removed either way. Returns why it failed.
fn stamp(dir: &Path, url: Option<&str>) -> Option<String> {
    let stale = crate::timestamp::drop_stale(dir);
    let Some(url) = url else {
        if stale {
            sayln!("note: the bundle's old time-stamp was removed: its checksums changed; stamp again with --timestamp-url");
        }
        return None;
    };
    match crate::timestamp::stamp(dir, url) {
        Ok(time) => {
            sayln!(
                "time-stamped by {}: {} (SHA256SUMS.tsr)",
                crate::timestamp::shown_url(url),
                time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            None
        }
        Err(e) => Some(format!(
            "{e}; the bundle is sealed{} but has NO trusted time-stamp",
            if dir.join("SHA256SUMS.minisig").exists() {
                " and signed"
            } else {
                ""
            }
        )),
    }
}

/// Signs the sealed bundle and publishes its metrics, when asked to.
fn seal(
    dir: &Path,
    key: Option<&runbook_evidence::sign::SecretKey>,
    textfile_dir: Option<&Path>,
) -> Result<(), runbook_evidence::EvidenceError> {
    // A resumed bundle's old signature covers old checksums: replace or remove it.
    let sig = dir.join("SHA256SUMS.minisig");
    match key {
        Some(key) => {
            let comment = runbook_evidence::sign::default_trusted_comment(dir)?;
            runbook_evidence::sign::sign_bundle(dir, key, &comment)?;
        }
        None if sig.exists() => {
            let _ = std::fs::remove_file(&sig);
            sayln!("note: the bundle's old signature was removed: its checksums changed; sign again with --sign-key");
        }
        None => {}
    }
    if let Some(t) = textfile_dir {
        let text = std::fs::read_to_string(dir.join("metrics.prom")).unwrap_or_default();
        let name = dir.parent().and_then(|p| p.file_name()).map_or_else(
            || "runbook".to_owned(),
            |n| format!("runbook_{}", n.to_string_lossy()),
        );
        runbook_evidence::metrics::write_textfile(t, &format!("{name}.prom"), &text).map_err(
            |source| runbook_evidence::EvidenceError::Write {
                path: t.to_path_buf(),
                source,
            },
        )?;
    }
    Ok(())
}

/// For each failed step, where its last logs are and how they end, under its reason: the
/// first thing an operator needs when a run fails. A step on hosts shows each failed host (at
/// most three, then how many more). The logs are redacted on disk already; the reason comes
/// from the engine and is redacted here, like every other line the console prints.
fn print_failure_tails(report: &RunReport, bundle: &Path, console: &Console) {
    const SHOWN: usize = 3;
    for s in report
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::Failed)
    {
        if s.attempts == 0 {
            continue;
        }
        let tails = runbook_evidence::log_tail::failed_tails(bundle, s.id.as_str(), 10);
        if tails.is_empty() {
            continue;
        }
        sayln!(
            "\n{} failed: {}",
            s.id,
            console.redact(s.reason.as_deref().unwrap_or("failed"))
        );
        for t in tails.iter().take(SHOWN) {
            if tails.len() > 1 || t.target != "local" {
                sayln!("  {}:", console.redact(&t.target));
            }
            sayln!("  log: {}", t.log.display());
            for l in &t.lines {
                sayln!("  | {}", console.redact(l));
            }
        }
        if tails.len() > SHOWN {
            sayln!(
                "  … and {} more failed host(s): see the report",
                tails.len() - SHOWN
            );
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
///
/// Write-ahead: an event that announces an action (the run's start, an attempt's start) is
/// acknowledged only once its record is in the journal file (the journal is written with one
/// `write` per record, no user-space buffer), and with `sync_announcements` also synced to
/// disk. The executor starts the action only after that. Announcements that arrive together
/// share one sync (group commit). Once evidence has failed, every receipt is refused, so
/// nothing more starts, `run_on_cancel` cleanups included.
fn spawn_consumer(
    mut rx: mpsc::Receiver<RunEvent>,
    recorder: Recorder,
    mut console: Console,
    cancel: CancellationToken,
    runtime: tokio::runtime::Handle,
    sync_announcements: bool,
) -> std::thread::JoinHandle<ConsumerResult> {
    std::thread::spawn(move || {
        let mut recorder = Some(recorder);
        let mut error = None;
        let mut last_flush = std::time::Instant::now();
        // Announcements recorded but waiting for the group's sync before their receipts.
        let mut unsynced: Vec<RunEvent> = Vec::new();
        loop {
            let dirty = recorder.as_ref().is_some_and(Recorder::is_dirty);
            let event = if dirty {
                // Wait for more only until the commit window closes, then sync.
                let left = COMMIT_WINDOW.saturating_sub(last_flush.elapsed());
                match runtime.block_on(async { tokio::time::timeout(left, rx.recv()).await }) {
                    Ok(Some(e)) => Some(e),
                    Ok(None) => break,
                    Err(_) => None,
                }
            } else {
                match rx.blocking_recv() {
                    Some(e) => Some(e),
                    None => break,
                }
            };
            let mut result = Ok(());
            if let (Some(r), Some(e)) = (recorder.as_mut(), event.as_ref()) {
                result = r.record(e);
            }
            let mut synced = false;
            if let (Some(r), true) = (recorder.as_mut(), result.is_ok()) {
                let group_done = rx.is_empty() || unsynced.len() >= ANNOUNCEMENT_GROUP;
                let announced = event.as_ref().is_some_and(RunEvent::announces_effect);
                if (r.is_dirty() && last_flush.elapsed() >= COMMIT_WINDOW)
                    || (sync_announcements && group_done && (announced || !unsynced.is_empty()))
                {
                    result = r.flush();
                    last_flush = std::time::Instant::now();
                    synced = result.is_ok();
                }
                if result.is_ok() && rx.is_empty() {
                    result = r.flush_buffers();
                }
            }
            if let Err(e) = result {
                render::error(&format!(
                    "{}: stopping the run, no new step will start",
                    describe_write_error(&e)
                ));
                error = Some(e);
                cancel.cancel();
                recorder = None;
            }
            if recorder.is_none() {
                for e in unsynced.drain(..) {
                    e.refuse();
                }
            } else if synced {
                for e in unsynced.drain(..) {
                    e.acknowledge();
                }
            }
            if let Some(e) = event {
                if recorder.is_none() {
                    // Not recorded: what it announces must not happen.
                    e.refuse();
                } else if sync_announcements && e.announces_effect() && !synced {
                    unsynced.push(e.clone());
                } else {
                    e.acknowledge();
                }
                console.event(&e);
            }
        }
        for e in unsynced.drain(..) {
            e.refuse();
        }
        (recorder, console, error)
    })
}

/// With `--durability power`, at most this many announcements wait for one sync.
const ANNOUNCEMENT_GROUP: usize = 64;

/// A failed evidence write as the operator needs it: the path, and the free space when the
/// disk is full.
fn describe_write_error(e: &runbook_evidence::EvidenceError) -> String {
    let text = e.to_string();
    let runbook_evidence::EvidenceError::Write { path, source } = e else {
        return text;
    };
    if source.raw_os_error() != Some(nix::libc::ENOSPC) {
        return text;
    }
    match nix::sys::statvfs::statvfs(path.parent().unwrap_or(path)) {
        Ok(st) => format!(
            "{text} ({} bytes free on the evidence file system)",
            st.blocks_available() * st.fragment_size()
        ),
        Err(_) => text,
    }
}

/// Group commit: boundary events are made durable at most this long after they are recorded,
/// in one sync for everything recorded meanwhile (a crash of the runner itself loses nothing:
/// the kernel has the data; this bounds what a power cut can take).
const COMMIT_WINDOW: std::time::Duration = std::time::Duration::from_millis(50);

/// First SIGINT/SIGTERM: stop scheduling, TERM running steps, KILL after their grace. Second:
/// KILL now (`run_on_cancel` cleanup steps still run). Third: stop those too.
async fn watch_signals(
    cancel: CancellationToken,
    force: CancellationToken,
    abort: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    // SIGHUP (the operator's SSH session dropped) stops the run like SIGTERM, cleanly.
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return;
    };
    for n in 0..3 {
        // A signal that came before this watcher (while the lock and bundle were being made)
        // counts as the first.
        if n > 0 || !crate::signals::received() {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        }
        if n == 0 {
            sayln!("\nstopping: TERM sent to running steps, KILL after their grace period (interrupt again to kill now)");
            cancel.cancel();
        } else if n == 1 {
            sayln!("\nkilling running steps now (`run_on_cancel` steps still run; interrupt again to stop them)");
            force.cancel();
        } else {
            sayln!("\nstopping `run_on_cancel` steps too");
            abort.cancel();
        }
    }
}

/// Tells the runbook's `[notify]` webhook how the run ended (failures to deliver are reported,
/// never fatal: the run and its evidence are already complete).
fn notify_end(
    runtime: &tokio::runtime::Runtime,
    spec: &crate::notify::NotifySpec,
    dir: &std::path::Path,
    code: i32,
    console: &Console,
) {
    let Ok(text) = std::fs::read(dir.join("manifest.json")) else {
        return;
    };
    let Ok(manifest) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return;
    };
    let mut payload = crate::notify::NotifyPayload::from_manifest(&manifest, Some(dir));
    payload.exit_code = Some(code);
    if !spec.wants(&payload) {
        return;
    }
    let redact = |t: &str| console.redact(t);
    match runtime.block_on(crate::notify::send(spec, &payload, &redact)) {
        Ok(()) => sayln!("notified {}", host_of(&spec.url)),
        Err(e) => render::error(&format!("[notify]: {e}")),
    }
}

fn host_of(url: &str) -> String {
    url.split("://")
        .nth(1)
        .and_then(|r| r.split(['/', '?']).next())
        .unwrap_or(url)
        .to_owned()
}
