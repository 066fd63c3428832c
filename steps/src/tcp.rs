//! TCP probe steps: can a connection to `host:port` be opened? Nothing is sent; the
//! connection is closed as soon as it is up. Used for "wait until the SSH port answers".
//!
//! Failures are [`ProbeError`]s, shared with the HTTP probe, so runbooks see the same kinds
//! (`dns`, `connect_refused`, `timeout`, …) from both.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use runbook_engine::duration::format_duration;
use runbook_engine::event::Stream;
use runbook_engine::runner::OutputSink;

use crate::http::{probe_timeout, resolve_host, ProbeError};

/// Used when a step gives no `timeout`: a healthy host on a LAN answers in milliseconds; a
/// dropped SYN would otherwise wait for the kernel's minutes-long retry schedule.
pub const DEFAULT_TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// `tcp = { host = "…", port = 22, timeout = "5s" }`, templates resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRequest {
    pub host: String,
    pub port: u16,
    /// Resolution and connect together; [`DEFAULT_TCP_TIMEOUT`] if absent.
    #[serde(default)]
    pub timeout: Option<String>,
}

/// A connection that was opened (and closed again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConnected {
    /// The address that accepted, e.g. `127.0.0.1:22`.
    pub peer: String,
    /// From the start of resolution to the connection being established.
    pub latency: Duration,
}

impl TcpConnected {
    /// The step's `output` for expressions: `peer` and `latency_ms`.
    pub fn to_json(&self) -> Value {
        json!({
            "peer": self.peer,
            "latency_ms": u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// Opens a TCP connection to `host:port`, trying each resolved address in turn, and writes
/// what happened to `out` (stderr).
pub async fn probe_tcp(
    req: &TcpRequest,
    out: &mut OutputSink,
    cancel: &CancellationToken,
) -> Result<TcpConnected, ProbeError> {
    let result = run(req, out, cancel).await;
    let line = match &result {
        Ok(c) => format!(
            "< connected to {} ({})\n",
            c.peer,
            format_duration(c.latency)
        ),
        Err(e) => format!("! {}: {e}\n", e.kind()),
    };
    out.write(Stream::Stderr, Bytes::from(line)).await;
    result
}

async fn run(
    req: &TcpRequest,
    out: &mut OutputSink,
    cancel: &CancellationToken,
) -> Result<TcpConnected, ProbeError> {
    let timeout = probe_timeout(req.timeout.as_deref(), DEFAULT_TCP_TIMEOUT)?;
    if req.host.trim().is_empty() {
        return Err(ProbeError::Config {
            reason: "`host` is empty".into(),
        });
    }
    if req.port == 0 {
        return Err(ProbeError::Config {
            reason: "`port` must be 1-65535".into(),
        });
    }
    let target = display_addr(&req.host, req.port);
    out.write(
        Stream::Stderr,
        Bytes::from(format!(
            "> tcp connect {target} (timeout {})\n",
            format_duration(timeout)
        )),
    )
    .await;
    if cancel.is_cancelled() {
        return Err(ProbeError::Cancelled);
    }
    let started = Instant::now();
    let deadline = started + timeout;
    let attempt = async {
        let addrs = match resolve_host(host_part(&req.host), req.port).await {
            Ok(a) => a,
            Err(source) => {
                return Err(ProbeError::Dns {
                    host: req.host.clone(),
                    source,
                })
            }
        };
        connect_any(&addrs, started).await
    };
    let connected = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(ProbeError::Cancelled),
        r = tokio::time::timeout_at(deadline, attempt) => r,
    };
    match connected {
        Ok(Ok(peer)) => Ok(TcpConnected {
            peer: peer.to_string(),
            latency: started.elapsed(),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProbeError::Timeout {
            after: timeout,
            phase: format!("connecting to {target}"),
        }),
    }
}

/// Tries the addresses in order (as the resolver ranked them); the first that accepts wins.
/// Refused everywhere is `connect_refused`; any other failure is reported for the last address.
async fn connect_any(addrs: &[SocketAddr], started: Instant) -> Result<SocketAddr, ProbeError> {
    let mut refused = Vec::new();
    let mut other: Option<(SocketAddr, io::Error)> = None;
    for &addr in addrs {
        match TcpStream::connect(addr).await {
            // Dropping the stream closes it: the probe only asks whether the port accepts.
            Ok(_stream) => return Ok(addr),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => refused.push(addr),
            Err(e) => other = Some((addr, e)),
        }
    }
    match other {
        Some((addr, e)) if e.kind() == io::ErrorKind::TimedOut => Err(ProbeError::Timeout {
            after: started.elapsed(),
            phase: format!("connecting to {addr} (the system gave up)"),
        }),
        Some((addr, e)) => Err(ProbeError::Io(format!("connecting to {addr}: {e}"))),
        None => Err(ProbeError::ConnectRefused {
            addr: refused
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// `[::1]` → `::1`: runbooks may write IPv6 hosts bracketed, as in URLs.
fn host_part(host: &str) -> &str {
    host.trim()
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host.trim())
}

fn display_addr(host: &str, port: u16) -> String {
    let h = host_part(host);
    if h.contains(':') {
        format!("[{h}]:{port}")
    } else {
        format!("{h}:{port}")
    }
}

/// The `tcp` step kind's runner: the rendered settings, then the probe.
pub(crate) async fn run_attempt(
    ctx: &runbook_engine::runner::AttemptContext,
    out: &mut OutputSink,
) -> runbook_engine::event::AttemptOutcome {
    use crate::dispatch::{details, failed, probe_failure};
    use runbook_engine::event::{AttemptOutcome, FailureKind};
    let req: TcpRequest = match serde_json::from_value(ctx.spec.clone()) {
        Ok(r) => r,
        Err(e) => return failed(FailureKind::Config, format!("tcp: {e}")),
    };
    match probe_tcp(&req, out, &ctx.cancel).await {
        Ok(c) => {
            details(out, c.to_json());
            AttemptOutcome::Exited { code: 0 }
        }
        Err(e) => probe_failure(&e),
    }
}
