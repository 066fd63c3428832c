//! Routes each attempt to the runner for its kind and place: a shell command here or on a
//! host over SSH, an HTTP or TCP probe, a screenshot, a file upload. The one
//! [`StepRunner`] the CLI hands to the executor.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use runbook_engine::event::{AttemptOutcome, FailureKind, Stream};
use runbook_engine::runbook::RequestKind;
use runbook_engine::runner::{AttemptContext, BoxFuture, OutputSink, StepRunner};

use runbook_engine::inventory::Host;

use crate::http::ProbeError;
use crate::local::LocalRunner;
use crate::ssh::{ExecOutcome, ExecRequest, SshError, SshHost, SshPool, UploadRequest};
use crate::upload::UploadSpec;

/// Runs every kind of attempt; holds what lives longer than one attempt (SSH connections).
#[derive(Default)]
pub struct Dispatcher {
    local: LocalRunner,
    ssh: SshPool,
}

impl Dispatcher {
    pub fn new() -> Self {
        Self::default()
    }

    /// A dispatcher whose SSH connections decrypt these key files with these passphrases.
    pub fn with_passphrases(passphrases: std::collections::HashMap<PathBuf, String>) -> Self {
        Self {
            ssh: SshPool::with_passphrases(passphrases),
            ..Self::default()
        }
    }

    /// Closes every SSH connection (at the end of a run).
    pub async fn close(&self) {
        self.ssh.close_all().await;
    }

    /// TCP connections opened to hosts so far (one per host when all goes well).
    pub fn ssh_connections(&self) -> usize {
        self.ssh.connections_opened()
    }
}

impl StepRunner for Dispatcher {
    fn run<'a>(
        &'a self,
        ctx: AttemptContext,
        out: &'a mut OutputSink,
    ) -> BoxFuture<'a, AttemptOutcome> {
        // Probes and screenshots run here even on a host step (with `host` in their
        // templates): they test the host from where runbook runs.
        Box::pin(async move {
            // Rendered values meet the rules `runbook check` applied to the literal ones.
            if let (Some(kind), Some(spec)) = (ctx.kind, ctx.spec.as_object()) {
                for (key, value) in spec {
                    if let Err(e) = runbook_engine::request_check::check_value(kind, key, value) {
                        return failed(FailureKind::Config, format!("{}: {e}", kind.key()));
                    }
                }
            }
            match (ctx.kind, ctx.host.clone()) {
                (None, None) => self.local.run(ctx, out).await,
                (None, Some(host)) => self.remote(&ctx, &host, out).await,
                (Some(RequestKind::Upload), Some(host)) => self.upload(&ctx, &host, out).await,
                (Some(kind), _) => {
                    let work = crate::local_request(kind, &ctx, out);
                    match ctx.timeout {
                        Some(limit) => tokio::time::timeout(limit, work)
                            .await
                            .unwrap_or(AttemptOutcome::TimedOut { after: limit }),
                        None => work.await,
                    }
                }
            }
        })
    }
}

/// The inventory's host (and its bastions) as the SSH pool takes it, with the attempt's own
/// sudo password (`become_password`) over the inventory's `become_password_env`.
fn ssh_host(host: &Host, ctx: &AttemptContext) -> SshHost {
    let mut target = SshHost::from_inventory(host, &ctx.jumps);
    if let Some(p) = &ctx.become_password {
        target.sudo.password = Some(p.clone());
    }
    target
}

fn ssh_failure(e: &SshError) -> AttemptOutcome {
    let failure = match e.kind() {
        "known_hosts" | "request" | "upload" => FailureKind::Config,
        other => FailureKind::from_name(other),
    };
    match e {
        SshError::Cancelled => AttemptOutcome::Cancelled,
        _ => failed(failure, e.to_string()),
    }
}

impl Dispatcher {
    async fn remote(
        &self,
        ctx: &AttemptContext,
        host: &Host,
        out: &mut OutputSink,
    ) -> AttemptOutcome {
        let target = ssh_host(host, ctx);
        let req = ExecRequest {
            command: ctx.command.clone(),
            sudo: ctx.sudo,
            pty: ctx.pty,
            env: ctx
                .env
                .iter()
                .cloned()
                .chain([
                    ("RUNBOOK_STEP".to_owned(), ctx.step.to_string()),
                    ("RUNBOOK_ATTEMPT".to_owned(), ctx.attempt.to_string()),
                    ("RUNBOOK_RUN_ID".to_owned(), ctx.run_id.clone()),
                ])
                .collect(),
            timeout: ctx.timeout,
            kill_grace: ctx.kill_grace,
        };
        let result = self.ssh.exec(&target, &req, out, &ctx.cancel).await;
        self.record_accepted_keys(out);
        match result {
            Ok(ExecOutcome::Exited(code)) => AttemptOutcome::Exited { code },
            Ok(ExecOutcome::Signaled(name)) => AttemptOutcome::Signaled {
                signal: signal_number(&name),
                name: format!("SIG{name}"),
            },
            Ok(ExecOutcome::TimedOut(after)) => AttemptOutcome::TimedOut { after },
            Ok(ExecOutcome::Cancelled) => AttemptOutcome::Cancelled,
            Err(e) => ssh_failure(&e),
        }
    }

    async fn upload(
        &self,
        ctx: &AttemptContext,
        host: &Host,
        out: &mut OutputSink,
    ) -> AttemptOutcome {
        let spec = match UploadSpec::parse(&ctx.spec) {
            Ok(s) => s,
            Err(m) => return failed(FailureKind::Config, m),
        };
        let (content, mode) = match (spec.bytes(&ctx.base_dir), spec.mode()) {
            (Ok(c), Ok(m)) => (c, m),
            (Err(m), _) | (_, Err(m)) => return failed(FailureKind::Config, m),
        };
        let len = content.len();
        let req = UploadRequest {
            content,
            dest: spec.dest.clone(),
            mode,
            sudo: ctx.sudo,
        };
        let result = self
            .ssh
            .upload(&ssh_host(host, ctx), &req, &ctx.cancel)
            .await;
        self.record_accepted_keys(out);
        match result {
            Ok(()) => {
                let line = format!(
                    "wrote {len} bytes to {}:{}{}\n",
                    host.name,
                    spec.dest,
                    mode.map(|m| format!(" (mode {m:04o})")).unwrap_or_default()
                );
                out.write(Stream::Stdout, Bytes::from(line)).await;
                AttemptOutcome::Exited { code: 0 }
            }
            Err(e) => ssh_failure(&e),
        }
    }

    /// Host keys trusted on first use go into the attempt's details (and so the journal).
    fn record_accepted_keys(&self, out: &mut OutputSink) {
        let keys = self.ssh.take_accepted_keys();
        if !keys.is_empty() {
            out.detail(
                "host_keys_accepted",
                serde_json::Value::Array(
                    keys.iter()
                        .map(|k| {
                            serde_json::json!({
                                "host": k.host,
                                "fingerprint": k.fingerprint,
                                "known_hosts": k.known_hosts.display().to_string(),
                            })
                        })
                        .collect(),
                ),
            );
        }
    }
}

fn signal_number(name: &str) -> i32 {
    match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "SEGV" => 11,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => 0,
    }
}

/// Paths in a probe's settings are the runbook's, like every other path it names.
pub(crate) fn under(base: &Path, p: &mut Option<PathBuf>) {
    if let Some(path) = p {
        if path.is_relative() {
            *path = base.join(&*path);
        }
    }
}

pub(crate) fn probe_failure(e: &ProbeError) -> AttemptOutcome {
    match e {
        ProbeError::Cancelled => AttemptOutcome::Cancelled,
        _ => failed(FailureKind::from_name(e.kind()), e.to_string()),
    }
}

pub(crate) fn details(out: &mut OutputSink, value: serde_json::Value) {
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            out.detail(&k, v);
        }
    }
}

pub(crate) fn failed(failure: FailureKind, message: impl Into<String>) -> AttemptOutcome {
    AttemptOutcome::Failed {
        failure,
        message: message.into(),
    }
}
