//! Local steps: a shell command in its own process group on this machine.
//!
//! The group is the unit of control: a timeout or cancel sends TERM to the whole group, waits
//! the step's grace period, then KILLs it, so grandchildren (`sleep 1000 &`) go too. When the
//! step's own process exits, whatever it left running in its group is stopped the same way:
//! a step cannot leak processes past its end. Output is read in chunks as it arrives and sent
//! on with backpressure; it is never collected whole.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{sleep_until, Instant};

use runbook_engine::event::{AttemptOutcome, FailureKind, Stream};
use runbook_engine::runner::{AttemptContext, BoxFuture, OutputSink, StepRunner};

const READ_CHUNK: usize = 64 * 1024;
/// How long to keep reading after the group was killed, for a pipe held open by a process
/// that escaped the group (`setsid`).
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(1);

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
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .arg(&ctx.command)
        .current_dir(&ctx.cwd)
        .envs(ctx.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUNBOOK_STEP", ctx.step.as_str())
        .env("RUNBOOK_ATTEMPT", ctx.attempt.to_string())
        .env("RUNBOOK_RUN_ID", &ctx.run_id)
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
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out_buf = BytesMut::with_capacity(READ_CHUNK);
    let mut err_buf = BytesMut::with_capacity(READ_CHUNK);

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
            r = read_chunk(&mut stdout, &mut out_buf), if stdout.is_some() => {
                match r {
                    Ok(0) => stdout = None,
                    // Copy out exactly what was read: a slice of the read buffer would pin the
                    // whole 64 KiB block for as long as the chunk waits in the event queue.
                    Ok(_) => out.write(Stream::Stdout, Bytes::copy_from_slice(&out_buf.split())).await,
                    Err(e) => { io_error.get_or_insert(format!("reading stdout: {e}")); stdout = None; }
                }
            }
            r = read_chunk(&mut stderr, &mut err_buf), if stderr.is_some() => {
                match r {
                    Ok(0) => stderr = None,
                    Ok(_) => out.write(Stream::Stderr, Bytes::copy_from_slice(&err_buf.split())).await,
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
                // Stop whatever the step left behind in its group, then stop waiting for pipes.
                signal_group(pgid, Signal::SIGTERM);
                kill_at = kill_at.min(Instant::now() + ctx.kill_grace.min(Duration::from_secs(2)));
            }
            () = sleep_until(deadline), if stop.is_none() => {
                stop = Some(Stop::Timeout);
                signal_group(pgid, Signal::SIGTERM);
                kill_at = Instant::now() + ctx.kill_grace;
            }
            () = ctx.force.cancelled(), if !forced => {
                // A second interrupt: no more grace.
                forced = true;
                stop.get_or_insert(Stop::Cancel);
                signal_group(pgid, Signal::SIGKILL);
                kill_at = never;
                give_up_at = Instant::now() + DRAIN_AFTER_KILL;
            }
            () = ctx.cancel.cancelled(), if stop.is_none() => {
                stop = Some(Stop::Cancel);
                signal_group(pgid, Signal::SIGTERM);
                kill_at = Instant::now() + ctx.kill_grace;
            }
            () = sleep_until(kill_at), if kill_at < never => {
                signal_group(pgid, Signal::SIGKILL);
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

    // The main process is gone and the pipes are closed, but something in the group may still
    // run with its output redirected elsewhere: give it the rest of the grace, then KILL.
    if group_alive(pgid) {
        let until = if kill_at < never {
            kill_at
        } else {
            Instant::now() + ctx.kill_grace.min(Duration::from_secs(2))
        };
        while group_alive(pgid) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        signal_group(pgid, Signal::SIGKILL);
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

async fn read_chunk<R: AsyncRead + Unpin>(
    reader: &mut Option<R>,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    match reader {
        Some(r) => {
            buf.reserve(READ_CHUNK);
            r.read_buf(buf).await
        }
        None => std::future::pending().await,
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
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

/// Stops every process that carries `RUNBOOK_RUN_ID=<run_id>` in its environment — what a
/// runner killed hard left behind, including processes started before their group could be
/// recorded — group by group: TERM, up to `grace`, KILL. Returns the groups stopped.
pub fn stop_run_processes(run_id: &str, grace: Duration) -> Vec<u32> {
    let needle = format!("RUNBOOK_RUN_ID={run_id}");
    let me = std::process::id();
    let mut groups: Vec<u32> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !env.split(|&b| b == 0).any(|v| v == needle.as_bytes()) {
            continue;
        }
        let pgid = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(2).map(String::from))
            })
            .and_then(|g| g.parse::<u32>().ok());
        if let Some(g) = pgid {
            if !groups.contains(&g) {
                groups.push(g);
            }
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
