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
use runbook_engine::retry::RetryPolicy;
use runbook_engine::runner::{BecomePassword, OutputSink};

use super::connect::russh_error;
use super::{Connection, ExecOutcome, ExecRequest, SshError, SudoSettings, UploadRequest};

/// How long to wait for the server to confirm the channel closed after we closed it.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Bound on one reaper run.
const REAPER_WAIT: Duration = Duration::from_secs(10);
/// Attempts to open a session channel the server refused. OpenSSH frees a closed session's
/// slot only on its next main-loop pass, so right after many channels closed at once an open
/// can be refused although we stay under `MaxSessions`.
const OPEN_ATTEMPTS: u32 = 20;
/// 50 ms doubling, at most 1 s, between tries to open a channel the server refused (its
/// sessions are all taken until one ends).
const OPEN_BACKOFF: RetryPolicy = runbook_engine::backoff::doubling(
    OPEN_ATTEMPTS,
    Duration::from_millis(50),
    Duration::from_secs(1),
    false,
);

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
                tokio::time::sleep(runbook_engine::backoff::delay(&OPEN_BACKOFF, attempt + 1))
                    .await;
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

/// Opens another connection to the same host, for a reaper the command's connection has no
/// session left for (`MaxSessions 1`).
pub(crate) type Reconnect = Arc<
    dyn Fn() -> super::connect::BoxFuture<'static, Result<Arc<Connection>, SshError>> + Send + Sync,
>;

/// Signals every process whose environment carries `exec_id`, on a channel of its own (on a
/// second connection when the server allows one session per connection). Runs as a task so
/// the command's channel keeps being read meanwhile (an unread channel would stall the whole
/// connection); the handle tells whether it could run.
fn reap(
    conn: Arc<Connection>,
    reconnect: Option<Reconnect>,
    exec_id: String,
    signal: &'static str,
    sudo: Option<SudoRun>,
    pty: bool,
) -> tokio::task::JoinHandle<Result<(), String>> {
    let script = format!(
        "for f in $(grep -lsaF {marker} /proc/[0-9]*/environ); do \
         p=${{f#/proc/}}; kill -{signal} \"${{p%/environ}}\" 2>/dev/null; done; true",
        marker = quote(&format!("RUNBOOK_EXEC_ID={exec_id}")),
    );
    // The password, if any, goes on stdin unasked: `sh -c` here never reads it.
    let (command, password) = match &sudo {
        Some(sudo) => (
            format!("{} sh -c {}", sudo.reaper_prefix(), quote(&script)),
            sudo.password(),
        ),
        None => (format!("sh -c {}", quote(&script)), None),
    };
    tokio::spawn(async move {
        let run = async {
            let (channel, _second) = match conn.handle.channel_open_session().await {
                Ok(channel) => (channel, None),
                Err(russh::Error::ChannelOpenFailure(f)) => {
                    let Some(reconnect) = &reconnect else {
                        return Err(format!("the server refused a second session ({f:?})"));
                    };
                    let second = reconnect().await.map_err(|e| {
                        format!("the server refused a second session ({f:?}) and a second connection failed: {e}")
                    })?;
                    let channel = second
                        .handle
                        .channel_open_session()
                        .await
                        .map_err(|e| format!("second connection: {e}"))?;
                    (channel, Some(second))
                }
                Err(e) => return Err(e.to_string()),
            };
            let fail = |e: russh::Error| e.to_string();
            if pty {
                // `Defaults requiretty` refuses sudo without one.
                channel
                    .request_pty(false, "xterm", 80, 24, 0, 0, &[])
                    .await
                    .map_err(fail)?;
            }
            channel.exec(false, command).await.map_err(fail)?;
            if let Some(password) = password {
                channel
                    .data(format!("{password}\n").as_bytes())
                    .await
                    .map_err(fail)?;
            }
            let mut channel = channel;
            while channel.wait().await.is_some() {}
            if let Some(second) = _second {
                let _ = second
                    .handle
                    .disconnect(russh::Disconnect::ByApplication, "", "en")
                    .await;
            }
            Ok::<_, String>(())
        };
        match tokio::time::timeout(REAPER_WAIT, run).await {
            Ok(result) => result,
            Err(_) => Err("stopping remote processes timed out".into()),
        }
    })
}

/// Single-quotes `s` for a POSIX shell.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How one request runs `sudo`.
#[derive(Debug, Clone)]
pub(crate) struct SudoRun {
    user: Option<String>,
    /// The prompt sudo is given (`-S -p`) when a password can be supplied; None: `-n`.
    prompt: Option<String>,
    password_env: Option<String>,
    password: Option<BecomePassword>,
    direct: bool,
}

impl SudoRun {
    pub(crate) fn new(asked: bool, settings: &SudoSettings, exec_id: &str) -> Option<SudoRun> {
        asked.then(|| SudoRun {
            user: settings.user.clone(),
            prompt: (settings.password.is_some() || settings.password_env.is_some()).then(|| {
                format!(
                    "[runbook sudo {}] password:",
                    &exec_id[..exec_id.len().min(12)]
                )
            }),
            password_env: settings.password_env.clone(),
            password: settings.password.clone(),
            direct: settings.direct,
        })
    }

    fn user_args(&self) -> String {
        self.user
            .as_ref()
            .map(|u| format!("-u {} ", quote(u)))
            .unwrap_or_default()
    }

    /// `sudo -n --`, or `sudo -S -p '<prompt>' --` when a password can be given.
    fn prefix(&self) -> String {
        match &self.prompt {
            None => format!("sudo -n {}--", self.user_args()),
            Some(prompt) => format!("sudo -S -p {} {}--", quote(prompt), self.user_args()),
        }
    }

    fn reaper_prefix(&self) -> String {
        match &self.prompt {
            None => format!("sudo -n {}--", self.user_args()),
            Some(_) => format!("sudo -S -p '' {}--", self.user_args()),
        }
    }

    /// The password, read when needed (never kept in the request).
    fn password(&self) -> Option<String> {
        match &self.password {
            Some(p) => Some(p.expose().to_owned()),
            None => self
                .password_env
                .as_ref()
                .and_then(|var| std::env::var(var).ok()),
        }
    }

    /// What to tell the operator along with sudo's refusal.
    fn hint(&self, message: &str) -> &'static str {
        let m = message.to_ascii_lowercase();
        if m.contains("tty") || m.contains("terminal is required") {
            " (the host's sudoers has `requiretty`: set `pty = true` on the step)"
        } else if m.contains("password is required") && self.prompt.is_none() && !self.direct {
            " (give the password with `become_password = \"{{ params.NAME }}\"` on the step or \
             `become_password_env` in the inventory; or, if the sudoers rule allows only \
             specific commands, use `become_method = \"direct\"`)"
        } else if m.contains("password is required") && self.prompt.is_none() {
            " (give the password with `become_password = \"{{ params.NAME }}\"` on the step or \
             `become_password_env` in the inventory)"
        } else if m.contains("not allowed to execute") && !self.direct {
            " (a sudoers rule for specific commands matches only `become_method = \"direct\"`, \
             which runs the step's text as sudo's own arguments)"
        } else {
            ""
        }
    }
}

fn refused(host: &str, sudo: &SudoRun, ending: &Ending, message: &str) -> SshError {
    // Asked again after the password was given: it was wrong (sudo then reports the end of
    // input we sent rather than the wrong password).
    let wrong = if ending.prompts > 1 {
        "incorrect password (sudo asked again); "
    } else {
        ""
    };
    SshError::SudoRefused {
        host: host.to_string(),
        message: format!("{wrong}{message}{}", sudo.hint(message)),
    }
}

/// Lines of sudo's own refusals (sudo 1.9 wording): the command never ran.
fn sudo_refusal(text: &str) -> Option<String> {
    const SIGNS: &[&str] = &[
        "is not in the sudoers file",
        "is not allowed to execute",
        "is not allowed to run sudo",
        "a password is required",
        "incorrect password attempt",
        "no password was provided",
        "you must have a tty",
        "a terminal is required",
        "no tty present",
        "sudo: unknown user",
    ];
    text.lines()
        .map(str::trim)
        .find(|l| {
            let l = l.to_ascii_lowercase();
            SIGNS.iter().any(|s| l.contains(s))
        })
        .map(str::to_owned)
}

/// The command line sent in the exec request: `sh` runs the script, with `RUNBOOK_EXEC_ID` in
/// its environment from the start (`exec env …`), so the reaper finds the shell itself and
/// not only its children. The user's environment is exported inside the script rather than
/// sent as SSH `env` requests, which sshd drops unless `AcceptEnv` lists each name. In
/// `direct` sudo mode the command text is sudo's own argument list and nothing is exported.
pub(crate) fn build_command(
    req: &ExecRequest,
    exec_id: &str,
    sudo: Option<&SudoRun>,
) -> Result<String, SshError> {
    if let Some(sudo) = sudo.filter(|s| s.direct) {
        return Ok(format!(
            "exec env RUNBOOK_EXEC_ID={exec_id} {} {}",
            sudo.prefix(),
            req.command
        ));
    }
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
    Ok(wrap(&script, exec_id, sudo))
}

/// Without a password, `sudo -n`: never prompt, fail instead. The id is passed again inside
/// sudo, whose `env_reset` would drop it.
fn wrap(script: &str, exec_id: &str, sudo: Option<&SudoRun>) -> String {
    let id = format!("RUNBOOK_EXEC_ID={exec_id}");
    match sudo {
        Some(sudo) => format!(
            "exec env {id} {} env {id} sh -c {}",
            sudo.prefix(),
            quote(script)
        ),
        None => format!("exec env {id} sh -c {}", quote(script)),
    }
}

/// Printed by an upload script once sudo let it start, so the content is not sent before a
/// password sudo may still read from stdin.
fn ready_marker(exec_id: &str) -> String {
    format!("[runbook ready {}]", &exec_id[..exec_id.len().min(12)])
}

/// A shell script that writes stdin to a temporary file next to `dest`, sets its mode and
/// renames it over `dest`, so readers see the old file or the new one, never a partial one.
pub(crate) fn upload_command(req: &UploadRequest, exec_id: &str, sudo: Option<&SudoRun>) -> String {
    let mode = match req.mode {
        Some(mode) => format!("{:o}", mode & 0o7777),
        // What a plain `cat > dest` would have produced.
        None => "$(printf %o $(( 0666 & ~$(umask) )))".to_string(),
    };
    let ready = match sudo {
        Some(s) if s.prompt.is_some() => {
            format!("printf '%s\\n' {} >&2; ", quote(&ready_marker(exec_id)))
        }
        _ => String::new(),
    };
    let script = format!(
        "{ready}set -e; dest={dest}; dir=$(dirname -- \"$dest\"); base=$(basename -- \"$dest\"); \
         tmp=$(mktemp \"$dir/.$base.runbook.XXXXXX\"); \
         trap 'rm -f -- \"$tmp\"' EXIT; trap 'exit 143' TERM INT HUP; \
         cat > \"$tmp\"; chmod {mode} \"$tmp\"; mv -f -- \"$tmp\" \"$dest\"; trap - EXIT",
        dest = quote(&req.dest),
    );
    // Direct sudo mode is for commands; an upload always needs its script.
    let sudo = sudo.map(|s| SudoRun {
        direct: false,
        ..s.clone()
    });
    wrap(&script, exec_id, sudo.as_ref())
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
    /// Times sudo's prompt appeared, and times it was answered.
    prompts: u32,
    answered: u32,
    /// The upload script's ready marker appeared.
    ready: bool,
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

/// Removes every `marker` from `data`, returning how many there were.
fn strip(data: &mut Vec<u8>, marker: &str) -> u32 {
    let m = marker.as_bytes();
    let mut count = 0;
    while let Some(at) = data.windows(m.len()).position(|w| w == m) {
        data.drain(at..at + m.len());
        count += 1;
    }
    count
}

/// Markers to watch for in the output: sudo's prompt and the upload's ready line.
#[derive(Default, Clone, Copy)]
struct Watch<'a> {
    prompt: Option<&'a str>,
    ready: Option<&'a str>,
}

impl Watch<'_> {
    fn scan(&self, data: &[u8], ending: &mut Ending) -> Option<Bytes> {
        if self.prompt.is_none() && self.ready.is_none() {
            return None;
        }
        let mut data = data.to_vec();
        if let Some(p) = self.prompt {
            ending.prompts += strip(&mut data, p);
        }
        if let Some(r) = self.ready {
            if strip(&mut data, &format!("{r}\n")) + strip(&mut data, r) > 0 {
                ending.ready = true;
            }
        }
        Some(Bytes::from(data))
    }
}

/// Handles one channel message; returns false once the channel is gone.
async fn handle_msg(
    msg: Option<ChannelMsg>,
    ending: &mut Ending,
    out: &mut Option<&mut OutputSink>,
    stderr: &mut Vec<u8>,
    watch: Watch<'_>,
) -> bool {
    match msg {
        Some(ChannelMsg::Data { data }) => {
            let data = watch.scan(&data, ending).unwrap_or(data);
            if let Some(out) = out.as_mut().filter(|_| !data.is_empty()) {
                out.write(Stream::Stdout, data).await;
            }
        }
        Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
            let data = watch.scan(&data, ending).unwrap_or(data);
            match out {
                Some(out) if !data.is_empty() => out.write(Stream::Stderr, data).await,
                Some(_) => {}
                None => stderr.extend_from_slice(&data),
            }
        }
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

/// Answers sudo's prompt: the password the first time, end of input after that (a wrong
/// password: sudo then gives up instead of waiting).
async fn answer_prompt(
    channel: &russh::Channel<russh::client::Msg>,
    sudo: Option<&SudoRun>,
    ending: &mut Ending,
) {
    if ending.prompts <= ending.answered {
        return;
    }
    let password = sudo.and_then(SudoRun::password);
    match password {
        Some(password) if ending.answered == 0 => {
            let _ = channel.data(format!("{password}\n").as_bytes()).await;
        }
        _ => {
            let _ = channel.eof().await;
        }
    }
    ending.answered = ending.prompts;
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    host: &str,
    session: Session,
    command: &str,
    exec_id: &str,
    sudo: Option<SudoRun>,
    reconnect: Option<Reconnect>,
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
    let watch = Watch {
        prompt: sudo.as_ref().and_then(|s| s.prompt.as_deref()),
        ready: None,
    };
    let mut sink = Some(out);
    let mut unused = Vec::new();
    let stop = loop {
        tokio::select! {
            msg = channel.wait() => {
                let alive = handle_msg(msg, &mut ending, &mut sink, &mut unused, watch).await;
                answer_prompt(&channel, sudo.as_ref(), &mut ending).await;
                if !alive {
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
            reconnect,
            exec_id: exec_id.to_string(),
            sudo: sudo.clone(),
            pty: req.pty,
        };
        let not_stopped = stop_remote(
            &mut channel,
            &reaper,
            &mut ending,
            &mut sink,
            req.kill_grace,
        )
        .await;
        if let (Some(reason), Some(out)) = (not_stopped, sink.as_mut()) {
            // Part of the attempt's result (details and output), not only a log line.
            tracing::warn!(%host, %reason, "the remote command could not be stopped");
            out.detail(
                "remote_not_stopped",
                serde_json::Value::String(reason.clone()),
            );
            out.write(
                Stream::Stderr,
                Bytes::from(format!(
                    "runbook: the remote command on {host} could not be stopped and may still be running: {reason}\n"
                )),
            )
            .await;
        }
        return Ok(match stop {
            Stop::Timeout => ExecOutcome::TimedOut(req.timeout.unwrap_or_default()),
            Stop::Cancel => ExecOutcome::Cancelled,
        });
    }
    if let (Some(sudo), Some(1)) = (&sudo, ending.status) {
        let said = sink
            .as_ref()
            .map(|o| format!("{}\n{}", o.tail(Stream::Stderr), o.tail(Stream::Stdout)))
            .unwrap_or_default();
        if let Some(message) = sudo_refusal(&said) {
            return Err(refused(host, sudo, &ending, &message));
        }
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
    reconnect: Option<Reconnect>,
    exec_id: String,
    sudo: Option<SudoRun>,
    pty: bool,
}

impl Reaper {
    async fn signal(
        &self,
        channel: &russh::Channel<russh::client::Msg>,
        sig: Sig,
    ) -> tokio::task::JoinHandle<Result<(), String>> {
        let name = if matches!(sig, Sig::KILL) {
            "KILL"
        } else {
            "TERM"
        };
        // Errors mean the channel is already gone, which is the goal.
        let _ = channel.signal(sig).await;
        reap(
            self.conn.clone(),
            self.reconnect.clone(),
            self.exec_id.clone(),
            name,
            self.sudo.clone(),
            self.pty,
        )
    }
}

/// TERM, up to `grace` for the command to go, KILL, then close the channel. Output that
/// arrives meanwhile still goes to the sink. Returns why the command may still be running
/// when it did not end and the reapers could not run.
async fn stop_remote(
    channel: &mut russh::Channel<russh::client::Msg>,
    reaper: &Reaper,
    ending: &mut Ending,
    sink: &mut Option<&mut OutputSink>,
    grace: Duration,
) -> Option<String> {
    let mut unused = Vec::new();
    let watch = Watch::default();
    if ending.closed {
        return None;
    }
    let mut reapers = vec![reaper.signal(channel, Sig::TERM).await];
    let kill_at = Instant::now() + grace;
    while !ending.exited() {
        tokio::select! {
            msg = channel.wait() => {
                if !handle_msg(msg, ending, sink, &mut unused, watch).await {
                    return None;
                }
            }
            () = sleep_until(kill_at) => {
                reapers.push(reaper.signal(channel, Sig::KILL).await);
                break;
            }
        }
    }
    let mut not_stopped = None;
    if !ending.exited() {
        let mut reasons = Vec::new();
        for r in reapers {
            match tokio::time::timeout(REAPER_WAIT, r).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => reasons.push(e),
                Ok(Err(e)) => reasons.push(e.to_string()),
                Err(_) => reasons.push("the reaper did not finish".into()),
            }
        }
        if !reasons.is_empty() {
            reasons.dedup();
            not_stopped = Some(reasons.join("; "));
        }
    }
    let _ = channel.eof().await;
    let _ = channel.close().await;
    let close_by = Instant::now() + CLOSE_WAIT;
    while !ending.closed {
        tokio::select! {
            msg = channel.wait() => {
                if !handle_msg(msg, ending, sink, &mut unused, watch).await {
                    break;
                }
            }
            () = sleep_until(close_by) => break,
        }
    }
    not_stopped
}

pub(crate) async fn upload(
    host: &str,
    session: Session,
    command: &str,
    exec_id: &str,
    sudo: Option<SudoRun>,
    req: &UploadRequest,
    cancel: &CancellationToken,
) -> Result<(), SshError> {
    let Session {
        mut channel,
        _permit,
        conn,
    } = session;
    let marker = ready_marker(exec_id);
    let prompt = sudo.as_ref().and_then(|s| s.prompt.clone());
    let watch = Watch {
        prompt: prompt.as_deref(),
        ready: prompt.as_ref().map(|_| marker.as_str()),
    };
    let work = async {
        start(host, &mut channel, command, false).await?;
        let mut ending = Ending::default();
        let mut stderr = Vec::new();
        let mut no_sink = None;
        // With a sudo password: answer its prompt, and send the file only once the script
        // says it runs (so sudo cannot take the content for the password).
        let mut alive = true;
        if watch.ready.is_some() {
            while alive && !ending.ready {
                alive = handle_msg(
                    channel.wait().await,
                    &mut ending,
                    &mut no_sink,
                    &mut stderr,
                    watch,
                )
                .await;
                answer_prompt(&channel, sudo.as_ref(), &mut ending).await;
            }
        }
        if alive {
            let content: Bytes = req.content.clone();
            channel
                .data(&content[..])
                .await
                .map_err(|e| russh_error(host, "sending the file", e))?;
            channel
                .eof()
                .await
                .map_err(|e| russh_error(host, "sending the file", e))?;
            while handle_msg(
                channel.wait().await,
                &mut ending,
                &mut no_sink,
                &mut stderr,
                watch,
            )
            .await
            {}
        }
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
            reconnect: None,
            exec_id: exec_id.to_string(),
            sudo: sudo.clone(),
            pty: false,
        };
        drop(reaper.signal(&channel, Sig::TERM).await);
        let _ = channel.close().await;
        return Err(SshError::Cancelled);
    };
    let (ending, stderr) = finished?;
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    if let (Some(sudo), Some(1)) = (&sudo, ending.status) {
        if let Some(message) = sudo_refusal(&stderr) {
            return Err(refused(host, sudo, &ending, &message));
        }
    }
    match ending.status {
        Some(0) => Ok(()),
        status => Err(SshError::Upload {
            host: host.to_string(),
            dest: req.dest.clone(),
            status: status.and_then(|s| i32::try_from(s).ok()),
            stderr,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        let sudo = SudoRun::new(true, &SudoSettings::default(), "id");
        assert_eq!(
            wrap("echo 'a b'", "id", sudo.as_ref()),
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
            build_command(&req, "id", None),
            Err(SshError::InvalidRequest { .. })
        ));
    }
}
