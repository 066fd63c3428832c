//! What can go wrong talking to a host, classified so the scheduler can decide whether a retry
//! can help (`retryable`) and evidence can record a stable `kind`.

use std::path::PathBuf;
use std::time::Duration;

/// Every failure of the SSH transport. Clone, because callers waiting on the same connection
/// attempt all receive its failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SshError {
    #[error("cannot resolve `{host}`: {reason}")]
    Dns { host: String, reason: String },

    #[error("connection to `{host}` ({addr}) refused")]
    ConnectRefused { host: String, addr: String },

    #[error("connecting to `{host}` timed out after {}", humantime_secs(*after))]
    ConnectTimeout { host: String, after: Duration },

    #[error(
        "authentication as `{user}` on `{host}` failed; tried: {}",
        if tried.is_empty() { "nothing (no keys and no agent)".to_string() } else { tried.join(", ") }
    )]
    Auth {
        host: String,
        user: String,
        /// Each method or key offered, e.g. `key /root/.ssh/id_ed25519 (ED25519 SHA256:…)`.
        tried: Vec<String>,
    },

    #[error(
        "host key of `{host}` changed: {known_hosts_line} has {expected_fingerprint}, \
         the server presented {got_fingerprint}"
    )]
    HostKeyMismatch {
        host: String,
        /// `path:line` of the entry that no longer matches.
        known_hosts_line: String,
        expected_fingerprint: String,
        got_fingerprint: String,
    },

    #[error(
        "host key of `{host}` ({fingerprint}) is not in `{}` and host key checking is strict",
        known_hosts.display()
    )]
    HostKeyUnknown {
        host: String,
        fingerprint: String,
        known_hosts: PathBuf,
    },

    #[error("host certificate of `{host}` (key id `{key_id}`) is refused: {reason}")]
    HostCertificate {
        host: String,
        key_id: String,
        reason: String,
    },

    #[error("`{host}`: sudo refused: {message}")]
    SudoRefused { host: String, message: String },

    #[error("known hosts file `{}`: {reason}", path.display())]
    KnownHosts { path: PathBuf, reason: String },

    #[error("channel on `{host}`: {reason}")]
    Channel { host: String, reason: String },

    #[error("key `{}`: {reason}", path.display())]
    Key { path: PathBuf, reason: String },

    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },

    #[error(
        "upload to `{host}:{dest}` failed ({}){}",
        status.map_or_else(|| "no exit status".to_string(), |s| format!("exit status {s}")),
        if stderr.trim().is_empty() { String::new() } else { format!(": {}", stderr.trim()) }
    )]
    Upload {
        host: String,
        dest: String,
        status: Option<i32>,
        stderr: String,
    },

    /// The server and runbook share no algorithm of one kind (key exchange, host key, cipher,
    /// MAC): a crypto policy on either side has to change, so a retry cannot help.
    #[error(
        "no {what} algorithm in common with `{host}`: the server offers {}; runbook offers {}",
        theirs.join(", "),
        ours.join(", ")
    )]
    Negotiation {
        host: String,
        /// `key exchange`, `host key`, `cipher`, `MAC` or `compression`.
        what: &'static str,
        theirs: Vec<String>,
        ours: Vec<String>,
    },

    #[error("cancelled")]
    Cancelled,

    #[error("connection to `{host}`: {reason}")]
    Io { host: String, reason: String },
}

impl SshError {
    /// A stable name for evidence and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SshError::Dns { .. } => "dns",
            SshError::ConnectRefused { .. } => "connect_refused",
            SshError::ConnectTimeout { .. } => "connect_timeout",
            SshError::Auth { .. } => "auth",
            SshError::HostKeyMismatch { .. } => "host_key_mismatch",
            SshError::HostKeyUnknown { .. } => "host_key_unknown",
            SshError::HostCertificate { .. } => "host_key_mismatch",
            SshError::SudoRefused { .. } => "sudo_refused",
            SshError::KnownHosts { .. } => "known_hosts",
            SshError::Channel { .. } => "channel",
            SshError::Key { .. } => "key",
            SshError::InvalidRequest { .. } => "request",
            SshError::Upload { .. } => "upload",
            SshError::Negotiation { .. } => "negotiation",
            SshError::Cancelled => "cancelled",
            SshError::Io { .. } => "io",
        }
    }

    /// Whether trying again later can succeed without someone changing configuration: network
    /// trouble yes; credentials, host keys and malformed requests no.
    pub fn retryable(&self) -> bool {
        match self {
            SshError::Dns { .. }
            | SshError::ConnectRefused { .. }
            | SshError::ConnectTimeout { .. }
            | SshError::Channel { .. }
            | SshError::Io { .. } => true,
            SshError::Auth { .. }
            | SshError::HostKeyMismatch { .. }
            | SshError::HostKeyUnknown { .. }
            | SshError::HostCertificate { .. }
            | SshError::SudoRefused { .. }
            | SshError::KnownHosts { .. }
            | SshError::Key { .. }
            | SshError::InvalidRequest { .. }
            | SshError::Upload { .. }
            | SshError::Negotiation { .. }
            | SshError::Cancelled => false,
        }
    }
}

fn humantime_secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
