//! Remote steps over SSH: a pool that keeps one authenticated connection per inventory host
//! and runs commands and uploads on channels of it.
//!
//! The pool owns connections, not scheduling: callers (the step dispatcher) decide what runs
//! when; the pool makes sure that however many steps target a host, it is connected to once,
//! lazily, and reconnected on the next use after the connection died. Host keys are checked
//! against an OpenSSH `known_hosts` file before any credential is offered. See `docs/ssh.md`.

pub mod config;
mod connect;
mod error;
mod exec;
mod known_hosts;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use runbook_engine::retry::RetryPolicy;
use runbook_engine::runner::{BecomePassword, OutputSink};

pub use connect::{key_is_encrypted, passphrase_opens};
pub use error::SshError;
pub use known_hosts::default_known_hosts;

use connect::SshHandle;

/// What to do with a server key that `known_hosts` does not list. There is deliberately no
/// "accept anything": a changed key is always refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostKeyCheck {
    /// Unknown keys are refused ([`SshError::HostKeyUnknown`]).
    #[default]
    Strict,
    /// Unknown keys are appended to `known_hosts` and reported by
    /// [`SshPool::take_accepted_keys`] (trust on first use). Changed keys are still refused.
    AcceptNew,
}

/// One resolved inventory host.
#[derive(Debug, Clone)]
pub struct SshHost {
    /// The inventory name: the pool keeps one connection per name.
    pub name: String,
    /// What to connect to (and the name looked up in `known_hosts`).
    pub address: String,
    pub port: u16,
    pub user: String,
    /// Private keys (ed25519, ECDSA, RSA) offered in order. Empty: `~/.ssh/id_ed25519`,
    /// `id_ecdsa`, `id_rsa` when they exist (plus the agent when `use_agent`).
    pub identity_files: Vec<PathBuf>,
    /// Environment variable holding the passphrase of encrypted key files.
    pub passphrase_env: Option<String>,
    /// Also offer the keys of the agent at `SSH_AUTH_SOCK` (after the key files).
    pub use_agent: bool,
    pub known_hosts: PathBuf,
    pub host_key_check: HostKeyCheck,
    /// A bastion to connect through: the pool connects to it (sharing that connection with
    /// anything else using it) and tunnels this host's SSH session in a `direct-tcpip` channel.
    pub proxy_jump: Option<Box<SshHost>>,
    /// Bound on TCP connect, handshake and authentication together.
    pub connect_timeout: Duration,
    /// Interval of SSH keepalives; after three unanswered the connection counts as dead.
    pub keepalive: Option<Duration>,
    /// OpenSSH user certificates (`CertificateFile`) to offer with the matching keys, besides
    /// the `<key>-cert.pub` found beside each key file.
    pub certificate_files: Vec<PathBuf>,
    /// Handshakes in flight at once to this address and port (shared by every host behind
    /// it): below sshd's `MaxStartups` start value (10), which drops further unauthenticated
    /// connections.
    pub handshake_limit: usize,
    /// How `sudo` is run for requests that ask for it.
    pub sudo: SudoSettings,
}

/// How commands that ask for `sudo` run it (Ansible's `become`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SudoSettings {
    /// `sudo -u USER`; None: root.
    pub user: Option<String>,
    /// Environment variable holding the sudo password. Without it sudo runs with `-n` and
    /// fails instead of asking. With it, sudo is given a unique prompt and the password is
    /// written to the channel's stdin when (and only when) that prompt appears.
    pub password_env: Option<String>,
    /// The step's own password (`become_password`, from a secret param); wins over
    /// `password_env`. Given the same way: only when sudo's prompt appears.
    pub password: Option<BecomePassword>,
    /// Run the command text as sudo's own arguments (`sudo -- systemctl restart x`) instead
    /// of `sudo -- env … sh -c '…'`, so sudoers rules restricted to commands match. `env`
    /// is then not exported (the step's text is the whole command).
    pub direct: bool,
}

/// The default of [`SshHost::handshake_limit`]: under OpenSSH's `MaxStartups` default start
/// (10), with room for other clients.
pub const DEFAULT_HANDSHAKE_LIMIT: usize = 8;

impl SshHost {
    /// The inventory's host, reached through `jumps` (outermost first).
    pub fn from_inventory(
        host: &runbook_engine::inventory::Host,
        jumps: &[Arc<runbook_engine::inventory::Host>],
    ) -> SshHost {
        use runbook_engine::inventory::HostKeyPolicy;
        let one = |h: &runbook_engine::inventory::Host, via: Option<Box<SshHost>>| SshHost {
            name: h.name.clone(),
            address: h.address.clone(),
            port: h.port,
            user: h.user.clone(),
            identity_files: h.identity_files.clone(),
            passphrase_env: h.passphrase_env.clone(),
            use_agent: h.use_agent,
            known_hosts: h.known_hosts.clone(),
            host_key_check: match h.host_key_check {
                HostKeyPolicy::Strict => HostKeyCheck::Strict,
                HostKeyPolicy::AcceptNew => HostKeyCheck::AcceptNew,
            },
            proxy_jump: via,
            connect_timeout: h.connect_timeout,
            keepalive: h.keepalive,
            certificate_files: h.certificate_files.clone(),
            handshake_limit: h.handshake_limit,
            sudo: SudoSettings {
                user: h.become_user.clone(),
                password_env: h.become_password_env.clone(),
                password: None,
                direct: h.become_direct,
            },
        };
        let mut via: Option<Box<SshHost>> = None;
        for j in jumps {
            via = Some(Box::new(one(j, via)));
        }
        one(host, via)
    }
}

/// A command to run.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Shell text, interpreted by the remote user's login shell (by `sh` under `sudo`).
    pub command: String,
    /// Run as root through `sudo -n` (never prompts: fails if a password would be needed).
    pub sudo: bool,
    /// Allocate a pseudo-terminal (stdout and stderr then arrive merged on stdout).
    pub pty: bool,
    /// Exported to the command (names must be valid shell identifiers).
    pub env: Vec<(String, String)>,
    pub timeout: Option<Duration>,
    /// After a timeout or cancel: how long to wait after TERM before sending KILL.
    pub kill_grace: Duration,
}

impl Default for ExecRequest {
    fn default() -> Self {
        Self {
            command: String::new(),
            sudo: false,
            pty: false,
            env: Vec::new(),
            timeout: None,
            kill_grace: Duration::from_secs(5),
        }
    }
}

/// A file to write on the host.
#[derive(Debug, Clone)]
pub struct UploadRequest {
    pub content: Bytes,
    /// Absolute path (or relative to the login directory) of the file to replace.
    pub dest: String,
    /// Permission bits, e.g. `0o640`. None: `0666` minus the remote umask.
    pub mode: Option<u32>,
    pub sudo: bool,
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    Exited(i32),
    /// Killed by a signal, named as SSH names them (`TERM`, `KILL`, `SEGV`, ...).
    Signaled(String),
    TimedOut(Duration),
    Cancelled,
}

/// A host key trusted on first use under [`HostKeyCheck::AcceptNew`], for evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedKey {
    pub host: String,
    /// `SHA256:…`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    pub known_hosts: PathBuf,
}

/// Below OpenSSH's default `MaxSessions` (10), which refuses more concurrent session channels
/// on one connection: further callers wait for a free one instead. The headroom leaves room
/// for reaper channels and for sessions the server has not finished freeing.
const MAX_SESSIONS_PER_CONNECTION: usize = 8;

/// An authenticated connection.
pub(crate) struct Connection {
    handle: SshHandle,
    /// No session channel was opened on it yet (see `exec::open_first_channel`).
    first_channel: std::sync::atomic::AtomicBool,
    sessions: Arc<Semaphore>,
    /// Keeps the bastion connection in use while this one tunnels through it.
    _bastion: Option<Arc<Connection>>,
}

impl Connection {
    fn is_alive(&self) -> bool {
        !self.handle.is_closed()
    }
}

/// The per-host-name state. The async mutex makes concurrent callers wait for one connect.
#[derive(Default)]
struct Slot {
    /// Connect attempts finished so far; lets a waiter tell that the attempt it waited for
    /// failed (and report that failure) rather than trying again at once.
    attempts: AtomicU64,
    state: tokio::sync::Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    conn: Option<Arc<Connection>>,
    last_error: Option<SshError>,
}

#[derive(Default)]
struct PoolInner {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    opened: AtomicUsize,
    accepted: Arc<Mutex<Vec<AcceptedKey>>>,
    agent_socket: Option<PathBuf>,
    /// Passphrases of encrypted key files given up front (asked at the terminal), by path.
    passphrases: HashMap<PathBuf, String>,
    /// Handshakes in flight per `address:port` (see [`SshHost::handshake_limit`]).
    handshakes: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// One lazily opened connection per host name, shared by every exec and upload. Cheap to
/// clone.
#[derive(Clone, Default)]
pub struct SshPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for SshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshPool")
            .field("connections_opened", &self.connections_opened())
            .finish_non_exhaustive()
    }
}

impl SshPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// A pool that talks to the agent at `socket` instead of `$SSH_AUTH_SOCK` (for hosts with
    /// `use_agent`).
    pub fn with_agent_socket(socket: impl Into<PathBuf>) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                agent_socket: Some(socket.into()),
                ..PoolInner::default()
            }),
        }
    }

    /// A pool that decrypts the key files in `passphrases` with the passphrase given there
    /// (when the host's `passphrase_env` does not provide one).
    pub fn with_passphrases(passphrases: HashMap<PathBuf, String>) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                passphrases,
                ..PoolInner::default()
            }),
        }
    }

    /// Runs a command on the host over an exec channel, streaming stdout/stderr into `out` as
    /// it arrives.
    pub async fn exec(
        &self,
        host: &SshHost,
        req: &ExecRequest,
        out: &mut OutputSink,
        cancel: &CancellationToken,
    ) -> Result<ExecOutcome, SshError> {
        let exec_id = exec::new_exec_id();
        let sudo = exec::SudoRun::new(req.sudo, &host.sudo, &exec_id);
        let command = exec::build_command(req, &exec_id, sudo.as_ref())?;
        let session = tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(ExecOutcome::Cancelled),
            s = self.open_session(host) => s?,
        };
        let reconnect: exec::Reconnect = {
            let pool = self.clone();
            let host = host.clone();
            Arc::new(move || {
                let pool = pool.clone();
                let host = host.clone();
                Box::pin(async move { pool.open(&host).await.map(Arc::new) })
            })
        };
        exec::run(
            &host.name,
            session,
            &command,
            &exec_id,
            sudo,
            Some(reconnect),
            req,
            out,
            cancel,
        )
        .await
    }

    /// Writes the file atomically (temp file in the same directory, chmod, rename), with sudo
    /// if asked.
    pub async fn upload(
        &self,
        host: &SshHost,
        req: &UploadRequest,
        cancel: &CancellationToken,
    ) -> Result<(), SshError> {
        let exec_id = exec::new_exec_id();
        let sudo = exec::SudoRun::new(req.sudo, &host.sudo, &exec_id);
        let command = exec::upload_command(req, &exec_id, sudo.as_ref());
        let session = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(SshError::Cancelled),
            s = self.open_session(host) => s?,
        };
        exec::upload(&host.name, session, &command, &exec_id, sudo, req, cancel).await
    }

    /// Total transport connections opened so far (TCP, or tunnels through a bastion).
    pub fn connections_opened(&self) -> usize {
        self.inner.opened.load(Ordering::SeqCst)
    }

    /// Host keys trusted on first use since the last call.
    pub fn take_accepted_keys(&self) -> Vec<AcceptedKey> {
        std::mem::take(
            &mut *self
                .inner
                .accepted
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Disconnects every host; later uses reconnect.
    pub async fn close_all(&self) {
        let slots: Vec<Arc<Slot>> = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for slot in slots {
            let conn = slot.state.lock().await.conn.take();
            if let Some(conn) = conn {
                let _ = conn
                    .handle
                    .disconnect(russh::Disconnect::ByApplication, "", "en")
                    .await;
            }
        }
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// The host's connection, opening it if there is none or it died.
    fn connection<'a>(
        &'a self,
        host: &'a SshHost,
    ) -> connect::BoxFuture<'a, Result<(Arc<Connection>, bool), SshError>> {
        Box::pin(async move {
            let slot = self.slot(&host.name);
            let seen = slot.attempts.load(Ordering::SeqCst);
            let mut state = slot.state.lock().await;
            if let Some(conn) = state.conn.as_ref().filter(|c| c.is_alive()) {
                return Ok((conn.clone(), false));
            }
            if slot.attempts.load(Ordering::SeqCst) > seen {
                if let Some(e) = &state.last_error {
                    return Err(e.clone());
                }
            }
            let result = self.open(host).await;
            slot.attempts.fetch_add(1, Ordering::SeqCst);
            match result {
                Ok(conn) => {
                    let conn = Arc::new(conn);
                    state.conn = Some(conn.clone());
                    state.last_error = None;
                    Ok((conn, true))
                }
                Err(e) => {
                    state.conn = None;
                    state.last_error = Some(e.clone());
                    Err(e)
                }
            }
        })
    }

    /// Forgets `conn` as the host's connection (it turned out dead).
    async fn discard(&self, host: &SshHost, conn: &Arc<Connection>) {
        let slot = self.slot(&host.name);
        let mut state = slot.state.lock().await;
        if state.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            state.conn = None;
        }
    }

    /// A session channel on the host's connection. A cached connection that fails to open a
    /// channel is presumed dead (the server went away since) and replaced once.
    async fn open_session(&self, host: &SshHost) -> Result<exec::Session, SshError> {
        let (conn, fresh) = self.connection(host).await?;
        match exec::Session::open(&host.name, conn.clone()).await {
            Ok(s) => Ok(s),
            // The server answered (e.g. refused the channel): the connection is fine.
            Err(e) if fresh || conn.is_alive() => Err(e),
            Err(e) => {
                tracing::debug!(host = %host.name, error = %e, "connection died; reconnecting");
                self.discard(host, &conn).await;
                let (conn, _) = self.connection(host).await?;
                exec::Session::open(&host.name, conn).await
            }
        }
    }

    /// Connects, verifies the host key and authenticates, within `connect_timeout`.
    async fn open(&self, host: &SshHost) -> Result<Connection, SshError> {
        // A host reached through itself would wait forever on its own slot.
        let mut seen = vec![host.name.as_str()];
        let mut hop = host.proxy_jump.as_deref();
        while let Some(bastion) = hop {
            if seen.contains(&bastion.name.as_str()) {
                return Err(SshError::InvalidRequest {
                    reason: format!(
                        "`{}` is reached through itself (proxy_jump: {} -> {})",
                        bastion.name,
                        seen.join(" -> "),
                        bastion.name
                    ),
                });
            }
            seen.push(&bastion.name);
            hop = bastion.proxy_jump.as_deref();
        }
        let timeout = host.connect_timeout;
        let attempt = async {
            let bastion = match &host.proxy_jump {
                None => None,
                Some(bastion) => Some(self.connection(bastion).await?.0),
            };
            let gate = self.handshake_gate(host);
            // Held until authenticated: sshd's MaxStartups counts unauthenticated connections.
            let _permit = gate.acquire_owned().await.map_err(|_| SshError::Io {
                host: host.name.clone(),
                reason: "the pool is closing".into(),
            })?;
            let mut tries = 1;
            loop {
                match self.open_once(host, bastion.as_ref()).await {
                    Ok(handle) => {
                        return Ok(Connection {
                            handle,
                            first_channel: std::sync::atomic::AtomicBool::new(true),
                            sessions: Arc::new(Semaphore::new(MAX_SESSIONS_PER_CONNECTION)),
                            _bastion: bastion,
                        })
                    }
                    Err(e) if dropped_before_auth(&e) && tries < HANDSHAKE_ATTEMPTS => {
                        tracing::debug!(host = %host.name, error = %e, tries, "handshake dropped; retrying");
                        tokio::time::sleep(handshake_backoff(tries)).await;
                        tries += 1;
                    }
                    Err(e) if dropped_before_auth(&e) => return Err(max_startups_hint(e, tries)),
                    Err(e) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(SshError::ConnectTimeout {
                host: host.name.clone(),
                after: timeout,
            }),
        }
    }

    /// One transport + handshake + authentication.
    async fn open_once(
        &self,
        host: &SshHost,
        bastion: Option<&Arc<Connection>>,
    ) -> Result<SshHandle, SshError> {
        let mut handle = match (bastion, &host.proxy_jump) {
            (Some(via), Some(jump)) => {
                let tunnel = connect::tunnel(host, jump, via).await?;
                self.inner.opened.fetch_add(1, Ordering::SeqCst);
                connect::handshake(host, tunnel, self.inner.accepted.clone()).await?
            }
            _ => {
                let tcp = connect::tcp(host).await?;
                self.inner.opened.fetch_add(1, Ordering::SeqCst);
                connect::handshake(host, tcp, self.inner.accepted.clone()).await?
            }
        };
        connect::authenticate(
            &mut handle,
            host,
            self.inner.agent_socket.as_deref(),
            &self.inner.passphrases,
        )
        .await?;
        Ok(handle)
    }

    /// The limit on handshakes in flight to the host's address and port (through its
    /// bastion, if any: the same address seen from another place is another server).
    fn handshake_gate(&self, host: &SshHost) -> Arc<Semaphore> {
        let via = host
            .proxy_jump
            .as_ref()
            .map(|b| format!("{} -> ", b.name))
            .unwrap_or_default();
        let key = format!("{via}{}:{}", host.address, host.port);
        self.inner
            .handshakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(host.handshake_limit.max(1))))
            .clone()
    }
}

/// Tries of a handshake the server dropped before authentication.
const HANDSHAKE_ATTEMPTS: u32 = 8;

/// Whether the server closed or reset the connection before we were authenticated: what
/// sshd does to connections beyond `MaxStartups` (and while it restarts).
fn dropped_before_auth(e: &SshError) -> bool {
    match e {
        SshError::Io { reason, .. } => {
            let r = reason.to_ascii_lowercase();
            (r.starts_with("handshake") || r.starts_with("authentication"))
                && (r.contains("reset by peer")
                    || r.contains("connection reset")
                    || r.contains("broken pipe")
                    || r.contains("disconnected")
                    || r.contains("eof")
                    || r.contains("hung up")
                    || r.contains("hup"))
        }
        _ => false,
    }
}

/// 150 ms doubling, at most 2.4 s, each spread over its lower half (the engine's jitter) so
/// that connections the server dropped together do not come back together.
fn handshake_backoff(tries: u32) -> Duration {
    const POLICY: RetryPolicy = runbook_engine::backoff::doubling(
        HANDSHAKE_ATTEMPTS,
        Duration::from_millis(150),
        Duration::from_millis(2400),
        true,
    );
    runbook_engine::backoff::delay(&POLICY, tries + 1)
}

fn max_startups_hint(e: SshError, tries: u32) -> SshError {
    match e {
        SshError::Io { host, reason } => SshError::Io {
            host,
            reason: format!(
                "{reason} (dropped {tries} times before authentication: the server may be \
                 refusing connections beyond its `MaxStartups` (sshd_config); hosts behind \
                 one address share `handshake_limit` handshakes at once)"
            ),
        },
        other => other,
    }
}
