//! `runbook schedule run`: the long-running scheduler. One task per entry sleeps until the
//! entry's next fire time, starts a `runbook run` child (see [`super::child`]), applies the
//! overlap policy while one is running, and records every firing in the state file, the log,
//! the metrics and (per `[notify]`) a webhook. A run that fails affects only its own entry.
//!
//! Shutdown (SIGTERM, SIGINT or `--stop-after`): no new firings, queued runs are dropped,
//! running drills get `shutdown_grace` to finish and are then cancelled (they seal their
//! bundles as cancelled); a second signal cancels them at once. Then exit 0.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use runbook_engine::redact::Redactor;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::child::{self, Finished};
use super::file::{CatchUp, Overlap, ScheduleFile};
use super::metrics::{self, Live};
use super::state::State;
use crate::notify;

/// Prints one log line: UTC time, entry, message.
pub fn log(entry: Option<&str>, msg: &str) {
    let now = Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
    match entry {
        Some(e) => eprintln!("{now} {e}: {msg}"),
        None => eprintln!("{now} {msg}"),
    }
}

pub struct Options {
    pub metrics_addr: Option<String>,
    /// Stop firing this long after start (then shut down as on SIGTERM).
    pub stop_after: Option<Duration>,
}

struct Shared {
    file: ScheduleFile,
    /// (entry name, runbook name) per entry.
    names: Vec<(String, String)>,
    exe: PathBuf,
    state: Mutex<State>,
    live: Mutex<Vec<Live>>,
    /// The latest metrics text, for the HTTP endpoint.
    text: Arc<Mutex<String>>,
    /// Webhook deliveries still going: awaited (briefly) at shutdown.
    notifications: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn save_state(&self) {
        let result = match self.state.lock() {
            Ok(s) => s.save(&self.file.state_file),
            Err(_) => return,
        };
        if let Err(e) = result {
            log(None, &format!("warning: {e}"));
        }
    }

    /// Renders the metrics and publishes them (textfile and HTTP).
    fn publish(&self) {
        let text = {
            let (Ok(live), Ok(state)) = (self.live.lock(), self.state.lock()) else {
                return;
            };
            metrics::render(&self.names, &live, &state)
        };
        if let Some(dir) = &self.file.textfile_dir {
            if let Err(e) =
                runbook_evidence::metrics::write_textfile(dir, &self.file.textfile_name(), &text)
            {
                log(
                    None,
                    &format!("warning: cannot write metrics to `{}`: {e}", dir.display()),
                );
            }
        }
        if let Ok(mut t) = self.text.lock() {
            *t = text;
        }
    }

    fn with_live(&self, i: usize, f: impl FnOnce(&mut Live)) {
        if let Ok(mut live) = self.live.lock() {
            if let Some(l) = live.get_mut(i) {
                f(l);
            }
        }
    }
}

pub fn run(file: ScheduleFile, names: Vec<String>, opts: Options) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            crate::render::error(&format!("cannot start the async runtime: {e}"));
            return crate::exit::RUN_FAILED;
        }
    };
    runtime.block_on(run_async(file, names, opts))
}

async fn run_async(file: ScheduleFile, names: Vec<String>, opts: Options) -> i32 {
    use crate::exit;
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            crate::render::error(&format!("cannot find the runbook executable: {e}"));
            return exit::RUN_FAILED;
        }
    };
    let state = match State::load(&file.state_file) {
        Ok(s) => s,
        Err(e) => {
            crate::render::error(&e.to_string());
            return exit::USAGE;
        }
    };
    if let Some(dir) = &file.textfile_dir {
        if !dir.is_dir() {
            crate::render::error(&format!(
                "`textfile_dir` `{}` is not a directory",
                dir.display()
            ));
            return exit::USAGE;
        }
    }
    let listener = match &opts.metrics_addr {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                crate::render::error(&format!("cannot listen on `{addr}`: {e}"));
                return exit::USAGE;
            }
        },
        None => None,
    };
    let entries = file.entries.len();
    let shared = Arc::new(Shared {
        names: file
            .entries
            .iter()
            .zip(names)
            .map(|(e, rb)| (e.name.clone(), rb))
            .collect(),
        live: Mutex::new(vec![Live::default(); entries]),
        state: Mutex::new(state),
        exe,
        text: Arc::new(Mutex::new(String::new())),
        notifications: Mutex::new(Vec::new()),
        file,
    });
    shared.publish();

    let stop_firing = CancellationToken::new();
    let cancel_runs = CancellationToken::new();
    let stop_server = CancellationToken::new();
    if let Some(l) = listener {
        if let Ok(addr) = l.local_addr() {
            log(None, &format!("metrics: http://{addr}/metrics"));
        }
        tokio::spawn(metrics::serve(l, shared.text.clone(), stop_server.clone()));
    }
    log(
        None,
        &format!(
            "scheduler started: {} entr{} from `{}`; state in `{}`",
            entries,
            if entries == 1 { "y" } else { "ies" },
            shared.file.source.path().display(),
            shared.file.state_file.display()
        ),
    );
    tokio::spawn(watch_signals(stop_firing.clone(), cancel_runs.clone()));
    if let Some(d) = opts.stop_after {
        let stop = stop_firing.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            if !stop.is_cancelled() {
                log(None, "stopping: --stop-after reached");
                stop.cancel();
            }
        });
    }
    // Once firing stops, running drills have `shutdown_grace` before they are cancelled.
    {
        let (stop, cancel, grace) = (
            stop_firing.clone(),
            cancel_runs.clone(),
            shared.file.shutdown_grace,
        );
        tokio::spawn(async move {
            stop.cancelled().await;
            tokio::time::sleep(grace).await;
            if !cancel.is_cancelled() {
                log(None, "shutdown grace is over: cancelling running drills");
                cancel.cancel();
            }
        });
    }

    let tasks: Vec<JoinHandle<()>> = (0..entries)
        .map(|i| {
            tokio::spawn(entry_loop(
                shared.clone(),
                i,
                stop_firing.clone(),
                cancel_runs.clone(),
            ))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let pending: Vec<JoinHandle<()>> = shared
        .notifications
        .lock()
        .map(|mut n| std::mem::take(&mut *n))
        .unwrap_or_default();
    for n in pending {
        let _ = tokio::time::timeout(Duration::from_secs(15), n).await;
    }
    shared.save_state();
    shared.publish();
    stop_server.cancel();
    log(None, "scheduler stopped");
    exit::OK
}

/// First SIGTERM/SIGINT: stop firing (running drills get the grace). Second: cancel them now.
async fn watch_signals(stop_firing: CancellationToken, cancel_runs: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    for n in 0..2 {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        if n == 0 {
            log(None, "stopping: no new firings; running drills may finish within the shutdown grace (signal again to cancel them now)");
            stop_firing.cancel();
        } else {
            log(None, "cancelling running drills now");
            cancel_runs.cancel();
        }
    }
}

fn until(t: DateTime<Utc>) -> tokio::time::Instant {
    let wait = (t - Utc::now()).to_std().unwrap_or_default();
    tokio::time::Instant::now() + wait
}

/// The overlap decision for a fire time that comes while a run is going.
#[derive(Debug, PartialEq, Eq)]
pub enum WhileRunning {
    Skip(&'static str),
    Queue,
}

pub fn while_running(overlap: Overlap, already_queued: bool) -> WhileRunning {
    match (overlap, already_queued) {
        (Overlap::Skip, _) => WhileRunning::Skip("skipped: previous still running"),
        (Overlap::Queue, true) => {
            WhileRunning::Skip("skipped: previous still running and one run already queued")
        }
        (Overlap::Queue, false) => WhileRunning::Queue,
    }
}

enum Event {
    Stop,
    RunEnded,
    FireTime,
}

async fn entry_loop(
    shared: Arc<Shared>,
    i: usize,
    stop_firing: CancellationToken,
    cancel_runs: CancellationToken,
) {
    let entry = shared.file.entries[i].clone();
    let name = entry.name.clone();
    let mut running: Option<JoinHandle<()>> = None;
    let mut queued: Option<DateTime<Utc>> = None;
    let now = Utc::now();

    if entry.catch_up == CatchUp::Latest {
        let last = shared
            .state
            .lock()
            .ok()
            .and_then(|s| s.entries.get(&name).and_then(|e| e.fired_for()));
        let missed = entry.cron.latest_at_or_before(now);
        if let (Some(last), Some(missed)) = (last, missed) {
            if missed > last {
                log(
                    Some(&name),
                    &format!(
                        "catching up: fire time {} was missed (last fire for {}); firing once now",
                        local(missed, &entry.cron.tz),
                        local(last, &entry.cron.tz)
                    ),
                );
                running = Some(start(&shared, i, missed, cancel_runs.clone()));
            }
        }
    }

    let mut cursor = now;
    loop {
        let next = entry.cron.next_after(cursor);
        shared.with_live(i, |l| l.next_fire = next);
        shared.publish();
        let fire_at = next.map(|n| n + runbook_engine::backoff::spread(entry.jitter));
        let event = {
            let sleep = async {
                match fire_at {
                    Some(t) => tokio::time::sleep_until(until(t)).await,
                    None => std::future::pending().await,
                }
            };
            let finished = async {
                match running.as_mut() {
                    Some(h) => {
                        let _ = h.await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = stop_firing.cancelled() => Event::Stop,
                () = finished => Event::RunEnded,
                () = sleep => Event::FireTime,
            }
        };
        match event {
            Event::Stop => break,
            Event::RunEnded => {
                running = None;
                if let Some(slot) = queued.take() {
                    log(Some(&name), "starting the queued run");
                    running = Some(start(&shared, i, slot, cancel_runs.clone()));
                }
                continue;
            }
            Event::FireTime => {}
        }
        let Some(slot) = next else { continue };
        // A fire time long past (the machine slept): go on from now, not through every one.
        cursor = if Utc::now() - slot > chrono::Duration::seconds(60) {
            Utc::now()
        } else {
            slot
        };
        if running.is_some() {
            match while_running(entry.overlap, queued.is_some()) {
                WhileRunning::Skip(why) => {
                    log(Some(&name), why);
                    shared.with_live(i, |l| l.skipped += 1);
                    shared.publish();
                }
                WhileRunning::Queue => {
                    log(Some(&name), "queued: previous still running");
                    queued = Some(slot);
                }
            }
        } else {
            running = Some(start(&shared, i, slot, cancel_runs.clone()));
        }
    }
    if queued.is_some() {
        log(Some(&name), "dropped the queued run: shutting down");
    }
    if let Some(h) = running {
        let _ = h.await;
    }
}

fn local(t: DateTime<Utc>, tz: &chrono_tz::Tz) -> String {
    t.with_timezone(tz)
        .format("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// Starts a firing for `slot`: state and metrics first, then the child, then its outcome.
fn start(
    shared: &Arc<Shared>,
    i: usize,
    slot: DateTime<Utc>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    let entry = shared.file.entries[i].clone();
    let runbook_name = shared.names[i].1.clone();
    let now = Utc::now();
    if let Ok(mut s) = shared.state.lock() {
        let e = s.entries.entry(entry.name.clone()).or_default();
        e.last_fire = Some(now);
        e.last_slot = Some(slot);
    }
    shared.save_state();
    shared.with_live(i, |l| {
        l.firings += 1;
        l.running = true;
    });
    shared.publish();
    log(
        Some(&entry.name),
        &format!(
            "firing `{}` (fire time {})",
            entry.runbook.display(),
            local(slot, &entry.cron.tz)
        ),
    );
    let shared = shared.clone();
    tokio::spawn(async move {
        let done = child::run_once(
            &entry,
            &shared.exe,
            &shared.file.dir,
            shared.file.kill_grace,
            cancel,
        )
        .await;
        report(&shared, i, &entry, &runbook_name, done);
    })
}

fn report(
    shared: &Arc<Shared>,
    i: usize,
    entry: &super::file::Entry,
    runbook_name: &str,
    done: Finished,
) {
    let o = &done.outcome;
    let mut line = format!(
        "finished: {} (exit {}) in {:.1}s",
        o.status,
        o.exit_code
            .map_or_else(|| "by signal".to_owned(), |c| c.to_string()),
        o.duration_seconds
    );
    if let Some(v) = &o.verdict {
        line.push_str(&format!(", drill {v}"));
    }
    for (k, t) in [("RTO", &o.rto), ("RPO", &o.rpo)] {
        if let Some(t) = t {
            match (t.measured_seconds, t.target_seconds) {
                (Some(m), Some(g)) => line.push_str(&format!(", {k} {m:.1}s/{g:.1}s")),
                _ => line.push_str(&format!(", {k} {}", t.verdict)),
            }
        }
    }
    if !o.failed_steps.is_empty() {
        line.push_str(&format!(", failed steps: {}", o.failed_steps.join(", ")));
    }
    match &o.bundle {
        Some(b) => line.push_str(&format!(", evidence: {b}")),
        None => line.push_str(", no evidence bundle"),
    }
    log(Some(&entry.name), &line);
    if done.manifest.is_none() {
        for t in done.tail.iter().rev().take(5).rev() {
            log(Some(&entry.name), &format!("  | {t}"));
        }
    }
    if let Ok(mut s) = shared.state.lock() {
        let e = s.entries.entry(entry.name.clone()).or_default();
        if o.status == "succeeded" {
            e.last_success = Some(o.finished);
        }
        e.last_outcome = Some(o.clone());
    }
    shared.save_state();
    shared.with_live(i, |l| {
        l.running = false;
        if done.bundle_metrics.is_some() {
            l.bundle_metrics.clone_from(&done.bundle_metrics);
        }
    });
    shared.publish();

    let Some(spec) = entry.notify.clone() else {
        return;
    };
    let payload = done.payload(&entry.name, runbook_name, &entry.params);
    if !spec.wants(&payload) {
        return;
    }
    let redactor = secrets_of(entry, &spec);
    let name = entry.name.clone();
    let handle = tokio::spawn(async move {
        let redact = |s: &str| redactor.redact_str(s);
        match notify::send(&spec, &payload, &redact).await {
            Ok(()) => log(Some(&name), "notified"),
            Err(e) => log(Some(&name), &format!("warning: notification failed: {e}")),
        }
    });
    if let Ok(mut n) = shared.notifications.lock() {
        n.retain(|h| !h.is_finished());
        n.push(handle);
    }
}

/// The values a notification must not contain: the runbook's secret parameters as this
/// entry binds them (from `params` and the environment), and the webhook's header values.
fn secrets_of(entry: &super::file::Entry, spec: &notify::NotifySpec) -> Redactor {
    let mut secrets: Vec<(String, String)> = spec
        .headers
        .iter()
        .map(|(k, v)| (format!("header {k}"), v.clone()))
        .collect();
    let host = runbook_engine::expr::ExprHost::new();
    if let Ok(source) = runbook_engine::load_source(&entry.runbook) {
        if let Ok((runbook, _, _)) = runbook_engine::compile(&source, &host) {
            let sets: Vec<String> = entry
                .params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if let Ok(bound) = runbook_engine::params::BoundParams::bind(&runbook, &sets, |var| {
                std::env::var(var).ok()
            }) {
                secrets.extend(bound.secrets());
            }
        }
    }
    Redactor::new(secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_decisions() {
        assert_eq!(
            while_running(Overlap::Skip, false),
            WhileRunning::Skip("skipped: previous still running")
        );
        assert_eq!(while_running(Overlap::Queue, false), WhileRunning::Queue);
        assert!(matches!(
            while_running(Overlap::Queue, true),
            WhileRunning::Skip(_)
        ));
    }
}
