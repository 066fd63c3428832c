//! Running one command or upload on a session channel: building the remote command line
//! (quoting, `sudo`, environment), streaming output, and stopping the remote process on
//! timeout or cancel.
//!
//! Stopping cannot rely on the SSH `signal` request alone: OpenSSH refuses it for root logins
//! (no privilege separation after auth) and never delivers it to processes that left the
//! session's process group. So every command runs with a unique `RUNBOOK_EXEC_ID` in its
//! environment, which its children inherit; to stop it we send the signal request *and*
//! run a small "reaper" on a second channel that signals every process carrying that id
//! (found through `/proc/*/environ`, i.e. Linux hosts), TERM first and KILL after the grace
//! period, then close the channel.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use russh::{ChannelMsg, Pty, Sig};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use runbook_engine::event::Stream;
use runbook_engine::runner::OutputSink;

use super::connect::russh_error;
use super::{Connection, ExecOutcome, ExecRequest, SshError, UploadRequest};

/// How long to wait for the server to confirm the channel closed after we closed it.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Bound on one reaper run.
const REAPER_WAIT: Duration = Duration::from_secs(10);
/// Attempts to open a session channel the server refused. OpenSSH frees a closed session's
/// slot only on its next main-loop pass, so right after many channels closed at once an open
/// can be refused although we stay under `MaxSessions`.
const OPEN_ATTEMPTS: u32 = 20;
const OPEN_BACKOFF: Duration = Duration::from_millis(50);

/// An open session channel, holding its share of the connection's session limit.
pub(crate) struct Session {
    channel: russh::Channel<russh::client::Msg>,
    _permit: OwnedSemaphorePermit,
    conn: Arc<Connection>,
}

impl Session {
    pub(crate) async fn open(host: &str, conn: Arc<Connection>) -> Result<Self, SshError> {
        let permit =
            conn.sessions
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| SshError::Channel {
                    host: host.to_string(),
                    reason: "the connection is closing".into(),
                })?;
        let channel = open_channel(host, &conn).await?;
        Ok(Self {
            channel,
            _permit: permit,
            conn,
        })
    }
}

/// Nudges sent while the first channel open of a connection is unanswered: after 1, 2, 4, …
/// ms, at most this many.
const NUDGES: u32 = 6;

/// Opens a session channel; on a connection's first one, nudges the server along.
///
/// Until its first session starts, OpenSSH's sshd has Nagle on. After authentication it sends
/// a few packets (the host keys announcement), and its answer to our first channel open then
/// waits until we acknowledge the last of them — which Linux (and most stacks) delay by
/// 40 ms when the receiver has nothing to send: 40 ms lost on every fresh connection. A
/// no-op packet from us (a `keepalive@openssh.com` global request without reply, which every
/// server ignores) carries that ACK. Sent at doubling intervals, so that on a slow link the
/// nudge that arrives after the server's packets does it.
async fn open_first_channel(
    conn: &Connection,
) -> Result<russh::Channel<russh::client::Msg>, russh::Error> {
    let open = conn.handle.channel_open_session();
    tokio::pin!(open);
    let mut wait = Duration::from_millis(1);
    for _ in 0..NUDGES {
        tokio::select! {
            r = &mut open => return r,
            () = tokio::time::sleep(wait) => {
                let _ = conn.handle.send_keepalive(false).await;
                wait *= 2;
            }
        }
    }
    open.await
}

async fn open_channel(
    host: &str,
    conn: &Connection,
) -> Result<russh::Channel<russh::client::Msg>, SshError> {
    let mut attempt = 1;
    loop {
        let opened = if conn
            .first_channel
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            open_first_channel(conn).await
        } else {
            conn.handle.channel_open_session().await
        };
        match opened {
            Ok(channel) => return Ok(channel),
            Err(russh::Error::ChannelOpenFailure(_)) if attempt < OPEN_ATTEMPTS => {
                tokio::time::sleep(OPEN_BACKOFF * attempt).await;
                attempt += 1;
            }
            Err(e) => return Err(russh_error(host, "opening a session channel", e)),
        }
    }
}

/// A fresh id for one remote command, unguessable enough not to collide with another.
pub(crate) fn new_exec_id() -> String {
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::SeqCst).to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(now.as_nanos().to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Signals every process whose environment carries `exec_id`, on a channel of its own.
/// Runs as a task so the command's channel keeps being read meanwhile (an unread channel
/// would stall the whole connection).
fn reap(conn: Arc<Connection>, host: String, exec_id: String, signal: &'static str, sudo: bool) {
    let script = format!(
        "for f in $(grep -lsaF {marker} /proc/[0-9]*/environ); do \
         p=${{f#/proc/}}; kill -{signal} \"${{p%/environ}}\" 2>/dev/null; done; true",
        marker = quote(&format!("RUNBOOK_EXEC_ID={exec_id}")),
    );
    let command = if sudo {
        format!("sudo -n -- sh -c {}", quote(&script))
    } else {
        format!("sh -c {}", quote(&script))
    };
    tokio::spawn(async move {
        let run = async {
            let channel = conn.handle.channel_open_session().await?;
            channel.exec(false, command).await?;
            let mut channel = channel;
            while channel.wait().await.is_some() {}
            Ok::<_, russh::Error>(())
        };
        match tokio::time::timeout(REAPER_WAIT, run).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(%host, error = %e, "could not stop remote processes"),
            Err(_) => tracing::warn!(%host, "stopping remote processes timed out"),
        }
    });
}

/// Single-quotes `s` for a POSIX shell.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command line sent in the exec request: `sh` runs the script, with `RUNBOOK_EXEC_ID` in
/// its environment from the start (`exec env …`), so the reaper finds the shell itself and
/// not only its children. The user's environment is exported inside the script rather than
/// sent as SSH `env` requests, which sshd drops unless `AcceptEnv` lists each name.
pub(crate) fn build_command(req: &ExecRequest, exec_id: &str) -> Result<String, SshError> {
    let mut script = String::new();
    for (name, value) in &req.env {
        if !runbook_engine::runbook::valid_env_name(name) {
            return Err(SshError::InvalidRequest {
                reason: format!("`{name}` is not a valid environment variable name"),
            });
        }
        script.push_str(&format!("export {name}={}; ", quote(value)));
    }
    script.push_str(&req.command);
    Ok(wrap(&script, exec_id, req.sudo))
}

/// `sudo -n`: never prompt (there is nobody to answer), fail instead. The id is passed again
/// inside sudo, whose `env_reset` would drop it.
fn wrap(script: &str, exec_id: &str, sudo: bool) -> String {
    let id = format!("RUNBOOK_EXEC_ID={exec_id}");
    if sudo {
        format!("exec env {id} sudo -n -- env {id} sh -c {}", quote(script))
    } else {
        format!("exec env {id} sh -c {}", quote(script))
    }
}

/// A shell script that writes stdin to a temporary file next to `dest`, sets its mode and
/// renames it over `dest`, so readers see the old file or the new one, never a partial one.
pub(crate) fn upload_command(req: &UploadRequest, exec_id: &str) -> String {
    let mode = match req.mode {
        Some(mode) => format!("{:o}", mode & 0o7777),
        // What a plain `cat > dest` would have produced.
        None => "$(printf %o $(( 0666 & ~$(umask) )))".to_string(),
    };
    let script = format!(
        "set -e; dest={dest}; dir=$(dirname -- \"$dest\"); base=$(basename -- \"$dest\"); \
         tmp=$(mktemp \"$dir/.$base.runbook.XXXXXX\"); \
         trap 'rm -f -- \"$tmp\"' EXIT; trap 'exit 143' TERM INT HUP; \
         cat > \"$tmp\"; chmod {mode} \"$tmp\"; mv -f -- \"$tmp\" \"$dest\"; trap - EXIT",
        dest = quote(&req.dest),
    );
    wrap(&script, exec_id, req.sudo)
}

/// Why we are stopping the remote command.
#[derive(Clone, Copy)]
enum Stop {
    Timeout,
    Cancel,
}

/// What the channel told us about the command's end.
#[derive(Default)]
struct Ending {
    status: Option<u32>,
    signal: Option<String>,
    closed: bool,
}

impl Ending {
    fn exited(&self) -> bool {
        self.status.is_some() || self.signal.is_some() || self.closed
    }
}

fn signal_name(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(name) => name.clone(),
    }
}

/// Handles one channel message; returns false once the channel is gone.
async fn handle_msg(
    msg: Option<ChannelMsg>,
    ending: &mut Ending,
    out: &mut Option<&mut OutputSink>,
    stderr: &mut Vec<u8>,
) -> bool {
    match msg {
        Some(ChannelMsg::Data { data }) => {
            if let Some(out) = out {
                out.write(Stream::Stdout, data).await;
            }
        }
        Some(ChannelMsg::ExtendedData { data, ext: 1 }) => match out {
            Some(out) => out.write(Stream::Stderr, data).await,
            None => stderr.extend_from_slice(&data),
        },
        Some(ChannelMsg::ExitStatus { exit_status }) => ending.status = Some(exit_status),
        Some(ChannelMsg::ExitSignal { signal_name: s, .. }) => {
            ending.signal = Some(signal_name(&s));
        }
        Some(ChannelMsg::Close) | None => {
            ending.closed = true;
            return false;
        }
        Some(_) => {}
    }
    true
}

/// Sends `exec` (after a pty request if asked), failing if the server refuses either.
async fn start(
    host: &str,
    channel: &mut russh::Channel<russh::client::Msg>,
    command: &str,
    pty: bool,
) -> Result<(), SshError> {
    let refused = |what: &str| SshError::Channel {
        host: host.to_string(),
        reason: format!("the server refused the {what} request"),
    };
    let failed = |e| russh_error(host, "starting the command", e);
    if pty {
        // ONLCR off: output keeps plain `\n` line ends, as it would without a terminal.
        channel
            .request_pty(true, "xterm", 200, 50, 0, 0, &[(Pty::ONLCR, 0)])
            .await
            .map_err(failed)?;
        expect_reply(channel).await.map_err(|()| refused("pty"))?;
    }
    channel.exec(true, command).await.map_err(failed)?;
    expect_reply(channel).await.map_err(|()| refused("exec"))
}

/// Waits for the success/failure reply to a request (nothing else arrives before it).
async fn expect_reply(channel: &mut russh::Channel<russh::client::Msg>) -> Result<(), ()> {
    loop {
        match channel.wait().await {
            Some(ChannelMsg::Success) => return Ok(()),
            Some(ChannelMsg::Failure) | Some(ChannelMsg::Close) | None => return Err(()),
            Some(_) => {}
        }
    }
}

pub(crate) async fn run(
    host: &str,
    session: Session,
    command: &str,
    exec_id: &str,
    req: &ExecRequest,
    out: &mut OutputSink,
    cancel: &CancellationToken,
) -> Result<ExecOutcome, SshError> {
    let Session {
        mut channel,
        _permit,
        conn,
    } = session;
    start(host, &mut channel, command, req.pty).await?;

    let started = Instant::now();
    // Far enough in the future to never fire; avoids Option juggling in `select!`.
    let never = started + Duration::from_secs(100 * 365 * 24 * 3600);
    let deadline = req.timeout.map_or(never, |t| started + t);
    let mut ending = Ending::default();
    let mut sink = Some(out);
    let mut unused = Vec::new();
    let stop = loop {
        tokio::select! {
            msg = channel.wait() => {
                if !handle_msg(msg, &mut ending, &mut sink, &mut unused).await {
                    break None;
                }
            }
            () = sleep_until(deadline) => break Some(Stop::Timeout),
            () = cancel.cancelled() => break Some(Stop::Cancel),
        }
    };

    if let Some(stop) = stop {
        let reaper = Reaper {
            conn,
            host: host.to_string(),
            exec_id: exec_id.to_string(),
            sudo: req.sudo,
        };
        stop_remote(
            &mut channel,
            &reaper,
            &mut ending,
            &mut sink,
            req.kill_grace,
        )
        .await;
        return Ok(match stop {
            Stop::Timeout => ExecOutcome::TimedOut(req.timeout.unwrap_or_default()),
            Stop::Cancel => ExecOutcome::Cancelled,
        });
    }
    match (ending.status, ending.signal) {
        (Some(status), _) => Ok(ExecOutcome::Exited(
            i32::try_from(status).unwrap_or(i32::MAX),
        )),
        (None, Some(signal)) => Ok(ExecOutcome::Signaled(signal)),
        (None, None) => Err(SshError::Channel {
            host: host.to_string(),
            reason: "the channel closed without an exit status".into(),
        }),
    }
}

/// Where and how to run the reaper for one command.
struct Reaper {
    conn: Arc<Connection>,
    host: String,
    exec_id: String,
    sudo: bool,
}

impl Reaper {
    async fn signal(&self, channel: &russh::Channel<russh::client::Msg>, sig: Sig) {
        let name = if matches!(sig, Sig::KILL) {
            "KILL"
        } else {
            "TERM"
        };
        // Errors mean the channel is already gone, which is the goal.
        let _ = channel.signal(sig).await;
        reap(
            self.conn.clone(),
            self.host.clone(),
            self.exec_id.clone(),
            name,
            self.sudo,
        );
    }
}

/// TERM, up to `grace` for the command to go, KILL, then close the channel. Output that
/// arrives meanwhile still goes to the sink.
async fn stop_remote(
    channel: &mut russh::Channel<russh::client::Msg>,
    reaper: &Reaper,
    ending: &mut Ending,
    sink: &mut Option<&mut OutputSink>,
    grace: Duration,
) {
    let mut unused = Vec::new();
    if ending.closed {
        return;
    }
    reaper.signal(channel, Sig::TERM).await;
    let kill_at = Instant::now() + grace;
    while !ending.exited() {
        tokio::select! {
            msg = channel.wait() => {
                if !handle_msg(msg, ending, sink, &mut unused).await {
                    return;
                }
            }
            () = sleep_until(kill_at) => {
                reaper.signal(channel, Sig::KILL).await;
                break;
            }
        }
    }
    let _ = channel.eof().await;
    let _ = channel.close().await;
    let close_by = Instant::now() + CLOSE_WAIT;
    while !ending.closed {
        tokio::select! {
            msg = channel.wait() => {
                if !handle_msg(msg, ending, sink, &mut unused).await {
                    return;
                }
            }
            () = sleep_until(close_by) => return,
        }
    }
}

pub(crate) async fn upload(
    host: &str,
    session: Session,
    command: &str,
    exec_id: &str,
    req: &UploadRequest,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    let Session {
        mut channel,
        _permit,
        conn,
    } = session;
    let work = async {
        start(host, &mut channel, command, false).await?;
        let content: Bytes = req.content.clone();
        channel
            .data(&content[..])
            .await
            .map_err(|e| russh_error(host, "sending the file", e))?;
        channel
            .eof()
            .await
            .map_err(|e| russh_error(host, "sending the file", e))?;
        let mut ending = Ending::default();
        let mut stderr = Vec::new();
        let mut no_sink = None;
        while handle_msg(channel.wait().await, &mut ending, &mut no_sink, &mut stderr).await {}
        Ok::<_, SshError>((ending, stderr))
    };
    let finished = tokio::select! {
        r = work => Some(r),
        () = cancel.cancelled() => None,
    };
    let Some(finished) = finished else {
        // The script removes its temporary file on TERM (traps); `dest` is untouched.
        let reaper = Reaper {
            conn,
            host: host.to_string(),
            exec_id: exec_id.to_string(),
            sudo: req.sudo,
        };
        reaper.signal(&channel, Sig::TERM).await;
        let _ = channel.close().await;
        return Err(SshError::Cancelled);
    };
    let (ending, stderr) = finished?;
    match ending.status {
        Some(0) => Ok(()),
        status => Err(SshError::Upload {
            host: host.to_string(),
            dest: req.dest.clone(),
            status: status.and_then(|s| i32::try_from(s).ok()),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(
            wrap("echo 'a b'", "id", true),
            r"exec env RUNBOOK_EXEC_ID=id sudo -n -- env RUNBOOK_EXEC_ID=id sh -c 'echo '\''a b'\'''"
        );
    }

    #[test]
    fn env_names_are_checked() {
        let req = ExecRequest {
            command: "true".into(),
            env: vec![("BAD-NAME".into(), "x".into())],
            ..ExecRequest::default()
        };
        assert!(matches!(
            build_command(&req, "id"),
            Err(SshError::InvalidRequest { .. })
        ));
    }
}
