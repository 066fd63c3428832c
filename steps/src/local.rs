//! Local steps: a shell command in its own process group on this machine.
//!
//! The group is the unit of control: a timeout or cancel sends TERM to the whole group, waits
//! the step's grace period, then KILLs it, so grandchildren (`sleep 1000 &`) go too. When the
//! step's own process exits, whatever it left running in its group is stopped the same way.
//! A process can leave the group (`setsid`, `set -m` job control), so every process of an
//! attempt also carries the attempt's id in its environment (`RUNBOOK_ATTEMPT_ID`, inherited by
//! children): those found outside the group are signalled with it and reported. A step cannot
//! leak processes past its end — unless one clears its environment (`env -i`) or is started
//! by someone else (`systemd-run`, a service manager). Output is read in chunks as it arrives
//! and sent on with backpressure; it is never collected whole.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{sleep_until, Instant};

use runbook_engine::event::{AttemptOutcome, FailureKind, StoppedProcess, Stream};
use runbook_engine::runner::{AttemptContext, BoxFuture, OutputSink, StepRunner};

const READ_CHUNK: usize = 64 * 1024;
/// Output of one attempt read but not yet consumed (written to the bundle, shown): reading
/// pauses while this much is in flight, so a step printing faster than its evidence is written
/// waits on its full pipe instead of the runner's memory filling with queued chunks (the event
/// queue alone would hold 256 of them).
const IN_FLIGHT: usize = 2 * 1024 * 1024;
/// A consumer that keeps chunks (none should) cannot stall a step: past this wait, reading
/// goes on.
const IN_FLIGHT_WAIT: Duration = Duration::from_millis(200);
/// How long to keep reading after the group was killed, for a pipe held open by a process
/// that escaped the group (`setsid`).
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(1);
/// How often to look again whether processes outside the group are gone: finding them reads
/// every process's environment, so less often than the group check.
const STRAY_POLL: Duration = Duration::from_millis(100);

/// Makes each attempt's id unique within this runner, whatever its step and number.
static ATTEMPT_SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default, Clone, Copy)]
pub struct LocalRunner;

impl StepRunner for LocalRunner {
    fn run<'a>(
        &'a self,
        ctx: AttemptContext,
        out: &'a mut OutputSink,
    ) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(run(ctx, out))
    }
}

/// Why the runner stopped the group itself.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Timeout,
    Cancel,
    /// The step's main process exited; leftovers in its group are being stopped.
    Exited,
}

async fn run(ctx: AttemptContext, out: &mut OutputSink) -> AttemptOutcome {
    let Some((program, args)) = ctx.shell.split_first() else {
        return AttemptOutcome::Failed {
            failure: FailureKind::Spawn,
            message: "no shell configured".into(),
        };
    };
    // The run id already marks the run's processes (for `resume`); this one marks the
    // attempt's, so its end can stop those that left the group without touching other steps'.
    let attempt_id = format!(
        "{}:{}:{}:{}:{}",
        ctx.run_id,
        ctx.step,
        ctx.target,
        ctx.attempt,
        ATTEMPT_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let mut cmd = tokio::process::Command::new(resolve_program(program, &ctx.env));
    // argv[0] stays the name as configured: it is the shell's `$0` and prefixes its messages.
    cmd.arg0(program)
        .args(args)
        .arg(&ctx.command)
        .current_dir(&ctx.cwd)
        .envs(ctx.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUNBOOK_STEP", ctx.step.as_str())
        .env("RUNBOOK_ATTEMPT", ctx.attempt.to_string())
        .env("RUNBOOK_RUN_ID", &ctx.run_id)
        .env("RUNBOOK_ATTEMPT_ID", &attempt_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let message = if ctx.cwd.is_dir() {
                format!("cannot start `{program}`: {e}")
            } else {
                format!("working directory `{}` does not exist", ctx.cwd.display())
            };
            return AttemptOutcome::Failed {
                failure: FailureKind::Spawn,
                message,
            };
        }
    };
    let Some(pgid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
    else {
        return AttemptOutcome::Failed {
            failure: FailureKind::Spawn,
            message: "the process exited before its id could be read".into(),
        };
    };
    if let Ok(pid) = u32::try_from(pgid.as_raw()) {
        out.process_started(pid, process_start_ticks(pid)).await;
    }
    let mut strays = Strays::new(
        format!("RUNBOOK_ATTEMPT_ID={attempt_id}"),
        u32::try_from(pgid.as_raw()).ok(),
    );
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out_buf = BytesMut::with_capacity(READ_CHUNK);
    let mut err_buf = BytesMut::with_capacity(READ_CHUNK);
    let budget = Arc::new(Budget::default());

    let started = Instant::now();
    // Far enough in the future to never fire; avoids Option juggling in `select!`.
    let never = started + Duration::from_secs(100 * 365 * 24 * 3600);
    let deadline = ctx.timeout.map_or(never, |t| started + t);
    let mut status: Option<ExitStatus> = None;
    let mut stop: Option<Stop> = None;
    let mut kill_at = never;
    let mut give_up_at = never;
    let mut io_error: Option<String> = None;
    let mut forced = false;

    loop {
        let streams_open = stdout.is_some() || stderr.is_some();
        if status.is_some() && !streams_open {
            break;
        }
        tokio::select! {
            r = read_chunk(&mut stdout, &mut out_buf, &budget), if stdout.is_some() => {
                match r {
                    Ok(0) => stdout = None,
                    // Copy out exactly what was read: a slice of the read buffer would pin the
                    // whole 64 KiB block for as long as the chunk waits in the event queue.
                    Ok(_) => out.write(Stream::Stdout, budget.chunk(&out_buf.split())).await,
                    Err(e) => { io_error.get_or_insert(format!("reading stdout: {e}")); stdout = None; }
                }
            }
            r = read_chunk(&mut stderr, &mut err_buf, &budget), if stderr.is_some() => {
                match r {
                    Ok(0) => stderr = None,
                    Ok(_) => out.write(Stream::Stderr, budget.chunk(&err_buf.split())).await,
                    Err(e) => { io_error.get_or_insert(format!("reading stderr: {e}")); stderr = None; }
                }
            }
            r = child.wait(), if status.is_none() => {
                match r {
                    Ok(s) => status = Some(s),
                    Err(e) => {
                        io_error.get_or_insert(format!("waiting for the process: {e}"));
                        status = Some(ExitStatus::from_raw(0x7f00));
                    }
                }
                if stop.is_none() {
                    stop = Some(Stop::Exited);
                }
                // Stop whatever the step left behind, in its group or not, then stop waiting
                // for pipes. With both pipes already closed the loop ends now, and the look
                // for strays just after it is this one: made once, there.
                signal_group(pgid, Signal::SIGTERM);
                if stdout.is_some() || stderr.is_some() {
                    strays.signal(Signal::SIGTERM);
                }
                kill_at = kill_at.min(Instant::now() + ctx.kill_grace.min(Duration::from_secs(2)));
            }
            () = sleep_until(deadline), if stop.is_none() => {
                stop = Some(Stop::Timeout);
                signal_group(pgid, Signal::SIGTERM);
                strays.signal(Signal::SIGTERM);
                kill_at = Instant::now() + ctx.kill_grace;
            }
            () = ctx.force.cancelled(), if !forced => {
                // A second interrupt: no more grace.
                forced = true;
                stop.get_or_insert(Stop::Cancel);
                signal_group(pgid, Signal::SIGKILL);
                strays.signal(Signal::SIGKILL);
                kill_at = never;
                give_up_at = Instant::now() + DRAIN_AFTER_KILL;
            }
            () = ctx.cancel.cancelled(), if stop.is_none() => {
                stop = Some(Stop::Cancel);
                signal_group(pgid, Signal::SIGTERM);
                strays.signal(Signal::SIGTERM);
                kill_at = Instant::now() + ctx.kill_grace;
            }
            () = sleep_until(kill_at), if kill_at < never => {
                signal_group(pgid, Signal::SIGKILL);
                strays.signal(Signal::SIGKILL);
                kill_at = never;
                give_up_at = Instant::now() + DRAIN_AFTER_KILL;
            }
            () = sleep_until(give_up_at), if give_up_at < never => {
                if status.is_some() {
                    // A process outside the group still holds the pipe: stop reading. Said as
                    // the engine, not on stderr, so nobody takes it for the step's own output.
                    out.note("output truncated: a process outside the step's process group kept its output open").await;
                    break;
                }
                give_up_at = never;
            }
        }
    }

    // The main process is gone and the pipes are closed, but something in the group, or out
    // of it with the attempt's id, may still run with its output redirected elsewhere (or may
    // have been started since the last look): give it the rest of the grace, then KILL.
    strays.signal(Signal::SIGTERM);
    if group_alive(pgid) || strays.alive() {
        let until = if kill_at < never {
            kill_at
        } else {
            Instant::now() + ctx.kill_grace.min(Duration::from_secs(2))
        };
        while Instant::now() < until && (group_alive(pgid) || strays.alive()) {
            tokio::time::sleep(strays.poll_interval()).await;
        }
        signal_group(pgid, Signal::SIGKILL);
        // Whatever still carries the attempt's id had its grace (or came too late for one).
        // With nothing found just above there is nothing to look for: the end of the run
        // sweeps what might start in between.
        strays.signal(Signal::SIGKILL);
    }
    let stopped = strays.into_stopped();
    if !stopped.is_empty() {
        out.processes_stopped(stopped).await;
    }

    match stop {
        Some(Stop::Timeout) => AttemptOutcome::TimedOut {
            after: ctx.timeout.unwrap_or_default(),
        },
        Some(Stop::Cancel) => AttemptOutcome::Cancelled,
        _ => {
            if let Some(message) = io_error {
                return AttemptOutcome::Failed {
                    failure: FailureKind::Io,
                    message,
                };
            }
            let status = status.unwrap_or_else(|| ExitStatus::from_raw(0x7f00));
            match (status.code(), status.signal()) {
                (Some(code), _) => AttemptOutcome::Exited { code },
                (None, Some(signal)) => AttemptOutcome::Signaled {
                    signal,
                    name: Signal::try_from(signal)
                        .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned()),
                },
                (None, None) => AttemptOutcome::Exited { code: -1 },
            }
        }
    }
}

/// Where a program named without a `/` was found, per `PATH` value: the shell is looked up once
/// per run instead of by every spawn (`execvp` tries each `PATH` entry in turn, one failed
/// `execve` per entry before the one that holds it). A shell removed or replaced by another
/// earlier on `PATH` while a run goes on is not noticed: the spawn fails, or runs the one found.
type Resolved = HashMap<(String, OsString), PathBuf>;

static RESOLVED: OnceLock<Mutex<Resolved>> = OnceLock::new();

/// `program` as the spawn should name it: as given when it holds a `/` or is not found on the
/// `PATH` the process will get (the spawn then reports the error), otherwise its full path.
fn resolve_program(program: &str, env: &[(String, String)]) -> OsString {
    if program.contains('/') {
        return program.into();
    }
    // The step's own PATH, when it sets one, is where the program is looked for.
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| OsString::from(v))
        .or_else(|| std::env::var_os("PATH"));
    let Some(path) = path else {
        return program.into();
    };
    let cache = RESOLVED.get_or_init(Mutex::default);
    let key = (program.to_owned(), path);
    if let Some(found) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return found.into_os_string();
    }
    // An empty or relative entry is looked up from the working directory by execvp: such a
    // PATH is left to it.
    if std::env::split_paths(&key.1).any(|dir| !dir.is_absolute()) {
        return program.into();
    }
    let found = std::env::split_paths(&key.1)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    match found {
        Some(found) => {
            if let Ok(mut c) = cache.lock() {
                c.insert(key, found.clone());
            }
            found.into_os_string()
        }
        None => program.into(),
    }
}

/// Bytes of an attempt's output handed on and not yet dropped by their consumers.
#[derive(Default)]
struct Budget {
    in_flight: AtomicUsize,
    freed: tokio::sync::Notify,
}

impl Budget {
    /// A copy of `data` that gives its bytes back to the budget when the last consumer drops it.
    fn chunk(self: &Arc<Self>, data: &[u8]) -> Bytes {
        self.in_flight.fetch_add(data.len(), Ordering::AcqRel);
        Bytes::from_owner(Counted {
            data: data.to_vec(),
            budget: Arc::clone(self),
        })
    }

    /// Waits while [`IN_FLIGHT`] bytes or more are in flight (at most [`IN_FLIGHT_WAIT`] per
    /// look, see there).
    async fn wait_for_room(&self) {
        while self.in_flight.load(Ordering::Acquire) >= IN_FLIGHT {
            let freed = self.freed.notified();
            if self.in_flight.load(Ordering::Acquire) < IN_FLIGHT {
                return;
            }
            if tokio::time::timeout(IN_FLIGHT_WAIT, freed).await.is_err() {
                return;
            }
        }
    }
}

struct Counted {
    data: Vec<u8>,
    budget: Arc<Budget>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.budget
            .in_flight
            .fetch_sub(self.data.len(), Ordering::AcqRel);
        self.budget.freed.notify_one();
    }
}

async fn read_chunk<R: AsyncRead + Unpin>(
    reader: &mut Option<R>,
    buf: &mut BytesMut,
    budget: &Budget,
) -> std::io::Result<usize> {
    match reader {
        Some(r) => {
            budget.wait_for_room().await;
            buf.reserve(READ_CHUNK);
            r.read_buf(buf).await
        }
        None => std::future::pending().await,
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = read_proc(&format!("/proc/{pid}/stat"), 1024)?;
    let stat = String::from_utf8_lossy(&stat);
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A `/proc` file read whole in (usually) one `read`: these files report a size of 0, so
/// `std::fs::read` would `statx` and `lseek` first, then start from a 32-byte buffer and
/// double it, one system call each time (8 reads for an ordinary environment), on a path
/// taken after every attempt.
fn read_proc(path: &str, expected: usize) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; expected.max(64)];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    buf.truncate(len);
    Some(buf)
}

/// Stops a process group left running by a runner that died: only when its leader is still
/// the same process (same start time), TERM, up to `grace`, then KILL. Returns whether it did.
pub fn stop_leftover_group(pid: u32, start_ticks: Option<u64>, grace: Duration) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    let pgid = Pid::from_raw(raw);
    if !group_alive(pgid) {
        return false;
    }
    if let (Some(expected), Some(now)) = (start_ticks, process_start_ticks(pid)) {
        if expected != now {
            return false;
        }
    }
    signal_group(pgid, Signal::SIGTERM);
    let until = std::time::Instant::now() + grace;
    while group_alive(pgid) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_group(pgid, Signal::SIGKILL);
    true
}

/// A process found by an entry of its environment.
#[derive(Debug, Clone)]
struct Found {
    pid: u32,
    pgid: Option<u32>,
    start_ticks: Option<u64>,
    command: String,
}

/// Every live process but this one whose environment holds `entry` (`NAME=value`) exactly.
/// Processes of other users whose environment cannot be read are not found; neither are
/// zombies (their environment reads empty) nor processes that cleared theirs (`env -i`).
fn processes_with_env(entry: &str, since: Option<u32>) -> Vec<Found> {
    let me = std::process::id();
    // Pids are handed out in increasing order until they wrap: what an attempt started has a
    // pid from its main process's up to the last one given out. Reading only those keeps the
    // look cheap on a machine with thousands of processes (it runs after every attempt).
    // After a wrap, or when the counter cannot be read, every process is looked at.
    let window = since.and_then(|first| {
        let last = read_proc("/proc/sys/kernel/ns_last_pid", 32)?;
        let last = std::str::from_utf8(&last)
            .ok()?
            .trim()
            .parse::<u32>()
            .ok()?;
        (last >= first).then_some(first..=last)
    });
    // A short window is probed pid by pid (a failed open for each pid no longer there) rather
    // than listed: listing `/proc` walks every process of the machine, and was the largest
    // single cost of a no-op step's own work in a profile of a 1000-step run.
    let (pids, probed): (Vec<u32>, bool) = match &window {
        Some(w) if w.end() - w.start() < DIRECT_PROBE => (w.clone().collect(), true),
        _ => (
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|d| d.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| window.as_ref().is_none_or(|w| w.contains(pid)))
                .collect(),
            false,
        ),
    };
    let mut found = Vec::new();
    for pid in pids {
        if pid == me {
            continue;
        }
        let dir = format!("/proc/{pid}");
        let Some(env) = read_proc(&format!("{dir}/environ"), ENVIRON_GUESS) else {
            continue;
        };
        if !env.split(|&b| b == 0).any(|v| v == entry.as_bytes()) {
            continue;
        }
        // A probed pid can be a thread's id (`/proc/<tid>` exists, unlisted): its process
        // is the one to report and signal, and it has a pid of its own in the window.
        if probed && !is_process(&dir, pid) {
            continue;
        }
        let stat = read_proc(&format!("{dir}/stat"), 1024)
            .map(|s| String::from_utf8_lossy(&s).into_owned())
            .unwrap_or_default();
        // After the command name (in parentheses, may hold spaces): state, ppid, pgrp, …
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let cmdline = read_proc(&format!("{dir}/cmdline"), 1024).unwrap_or_default();
        let mut command = String::from_utf8_lossy(&cmdline)
            .trim_end_matches('\0')
            .replace('\0', " ");
        if command.is_empty() {
            command = stat
                .split_once('(')
                .and_then(|(_, rest)| rest.rsplit_once(')'))
                .map(|(name, _)| format!("[{name}]"))
                .unwrap_or_default();
        }
        found.push(Found {
            pid,
            pgid: fields.get(2).and_then(|g| g.parse().ok()),
            start_ticks: fields.get(19).and_then(|t| t.parse().ok()),
            command,
        });
    }
    found
}

/// Below this many pids given out since an attempt's start, they are probed one by one
/// instead of listing `/proc`.
const DIRECT_PROBE: u32 = 256;

/// Room for a typical environment in one read (it grows when one is larger).
const ENVIRON_GUESS: usize = 16 * 1024;

/// Whether `pid` is a process (its thread group's leader), not another thread of one.
fn is_process(dir: &str, pid: u32) -> bool {
    read_proc(&format!("{dir}/status"), 2048).is_some_and(|status| {
        String::from_utf8_lossy(&status)
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|t| t.trim().parse::<u32>().ok())
            == Some(pid)
    })
}

/// Processes marked with an id (an attempt's, a run's) that are not in the process group the
/// runner controls: looked up again each time they are signalled, so a pid is only signalled
/// while it still carries the id, and remembered for the record.
struct Strays {
    entry: String,
    /// The attempt's own group, signalled as a group; `None` at the end of a run.
    except_pgid: Option<u32>,
    seen: Vec<(Found, bool)>,
}

impl Strays {
    fn new(entry: String, except_pgid: Option<u32>) -> Self {
        Self {
            entry,
            except_pgid,
            seen: Vec::new(),
        }
    }

    fn current(&self) -> Vec<Found> {
        // An attempt's own group leader is its first process: nothing it started is older.
        processes_with_env(&self.entry, self.except_pgid)
            .into_iter()
            .filter(|f| self.except_pgid.is_none() || f.pgid != self.except_pgid)
            .collect()
    }

    /// Sends `signal` to every such process now running — TERM only once to each (a second
    /// TERM means "quit now" to some programs) — and remembers it; a KILL marks it as killed.
    fn signal(&mut self, signal: Signal) {
        let killing = signal == Signal::SIGKILL;
        for f in self.current() {
            let seen = self
                .seen
                .iter_mut()
                .find(|(s, _)| s.pid == f.pid && s.start_ticks == f.start_ticks);
            if seen.is_some() && !killing {
                continue;
            }
            let Ok(raw) = i32::try_from(f.pid) else {
                continue;
            };
            // ESRCH: it ended since the look; nothing to do.
            let _ = kill(Pid::from_raw(raw), signal);
            match seen {
                Some((_, killed)) => *killed = true,
                None => self.seen.push((f, killing)),
            }
        }
    }

    /// Whether one that was signalled still runs (no look at `/proc` when none was).
    fn alive(&self) -> bool {
        !self.seen.is_empty() && !self.current().is_empty()
    }

    /// How long to wait between looks: reading every process's environment costs more than
    /// checking a group.
    fn poll_interval(&self) -> Duration {
        if self.seen.is_empty() {
            Duration::from_millis(20)
        } else {
            STRAY_POLL
        }
    }

    fn into_stopped(self) -> Vec<StoppedProcess> {
        self.seen
            .into_iter()
            .map(|(f, killed)| StoppedProcess {
                pid: f.pid,
                command: f.command,
                killed,
            })
            .collect()
    }
}

/// Stops every process still carrying `RUNBOOK_RUN_ID=<run_id>` when a run ends — one by one,
/// not by group: TERM, up to `grace`, KILL. Attempts stop their own; this catches what slipped
/// past them (a process started while its attempt was being stopped). Returns what it stopped.
pub fn stop_processes_left_by_run(run_id: &str, grace: Duration) -> Vec<StoppedProcess> {
    let mut strays = Strays::new(format!("RUNBOOK_RUN_ID={run_id}"), None);
    strays.signal(Signal::SIGTERM);
    let until = std::time::Instant::now() + grace;
    while std::time::Instant::now() < until && strays.alive() {
        std::thread::sleep(STRAY_POLL);
    }
    strays.signal(Signal::SIGKILL);
    strays.into_stopped()
}

/// Stops every process that carries `RUNBOOK_RUN_ID=<run_id>` in its environment — what a
/// runner killed hard left behind, including processes started before their group could be
/// recorded — group by group: TERM, up to `grace`, KILL. Returns the groups stopped.
pub fn stop_run_processes(run_id: &str, grace: Duration) -> Vec<u32> {
    let mut groups: Vec<u32> = Vec::new();
    for g in processes_with_env(&format!("RUNBOOK_RUN_ID={run_id}"), None)
        .into_iter()
        .filter_map(|f| f.pgid)
    {
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    for &g in &groups {
        if let Ok(raw) = i32::try_from(g) {
            signal_group(Pid::from_raw(raw), Signal::SIGTERM);
        }
    }
    let until = std::time::Instant::now() + grace;
    while std::time::Instant::now() < until
        && groups
            .iter()
            .any(|&g| i32::try_from(g).is_ok_and(|raw| group_alive(Pid::from_raw(raw))))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &g in &groups {
        if let Ok(raw) = i32::try_from(g) {
            signal_group(Pid::from_raw(raw), Signal::SIGKILL);
        }
    }
    groups
}

/// Whether any process of the group is still there (signal 0 checks without sending).
fn group_alive(pgid: Pid) -> bool {
    killpg(pgid, None).is_ok()
}

fn signal_group(pgid: Pid, signal: Signal) {
    // ESRCH (group already gone) is the normal case after a clean exit.
    let _ = killpg(pgid, signal);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process with threads, marked with `entry`: its threads' ids are in the window too
    /// (`/proc/<tid>` opens), and must not be reported as processes of their own.
    #[test]
    fn a_probed_window_finds_the_process_once_not_its_threads() {
        let entry = format!("RUNBOOK_TEST_MARK={}", std::process::id());
        let (name, value) = entry.split_once('=').unwrap_or_default();
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import threading, time, sys\n\
                 ts = [threading.Thread(target=time.sleep, args=(30,), daemon=True) for _ in range(3)]\n\
                 [t.start() for t in ts]\n\
                 print('up', flush=True)\n\
                 sys.stdin.read()",
            ])
            .env(name, value)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("python3 says it is up");
        assert_eq!(line.trim(), "up");
        let pid = child.id();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("its threads")
            .count();
        assert!(
            tasks >= 4,
            "expected the threads to run, found {tasks} tasks"
        );

        let probed = processes_with_env(&entry, Some(pid));
        let listed = processes_with_env(&entry, None);
        let ticks = process_start_ticks(pid);
        drop(child.stdin.take());
        let _ = child.kill();
        let _ = child.wait();

        let pids = |found: &[Found]| found.iter().map(|f| f.pid).collect::<Vec<_>>();
        assert_eq!(pids(&probed), vec![pid], "probed: {probed:?}");
        assert_eq!(pids(&listed), vec![pid], "listed: {listed:?}");
        assert!(probed[0].command.contains("python3"), "{probed:?}");
        assert!(ticks.is_some());
        assert_eq!(probed[0].start_ticks, ticks);
    }
}
