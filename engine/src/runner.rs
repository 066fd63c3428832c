//! The seam between the scheduler and the things that do work. A [`StepRunner`] gets one
//! resolved attempt and an [`OutputSink`]; it knows nothing of graphs, retries or evidence.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{AttemptOutcome, OutputCounts, Receipt, RunEvent, Stream, Target};
use crate::inventory::Host;
use crate::runbook::{RequestKind, StepId};
use std::sync::Arc;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Everything a runner needs for one attempt, with templates already rendered.
#[derive(Debug, Clone)]
pub struct AttemptContext {
    pub step: StepId,
    pub target: Target,
    pub attempt: u32,
    /// The run's id: exported to the process so that a later `resume` can find whatever a
    /// crashed runner left running.
    pub run_id: String,
    /// The rendered command (secrets included: this is what runs).
    pub command: String,
    pub shell: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub timeout: Option<Duration>,
    /// Time between TERM and KILL when the attempt is stopped.
    pub kill_grace: Duration,
    /// Cancelled when the run is being stopped (signal, evidence failure): TERM, grace, KILL.
    pub cancel: CancellationToken,
    /// Cancelled on a second interrupt: KILL now, no grace.
    pub force: CancellationToken,
    /// `None` for a shell command (`command`, `shell`, `env`, `cwd`); otherwise the step
    /// kind whose settings are in `spec`.
    pub kind: Option<RequestKind>,
    /// The step kind's settings table, templates rendered (`Null` for shell commands).
    pub spec: serde_json::Value,
    /// The host to run on; `None` runs on this machine.
    pub host: Option<Arc<Host>>,
    /// The bastions to go through to reach `host`, outermost first (`proxy_jump`).
    pub jumps: Vec<Arc<Host>>,
    pub sudo: bool,
    /// The password sudo asks for (`become_password`); None: sudo runs with `-n`, or the
    /// inventory's `become_password_env` supplies it.
    pub become_password: Option<BecomePassword>,
    pub pty: bool,
    /// Secret values a runner must keep out of what it writes (headers it echoes, URLs).
    pub secrets: Vec<String>,
    /// The runbook's directory: relative files named in `spec` (`src`, `ca_file`) resolve here.
    pub base_dir: PathBuf,
}

/// sudo's password for one attempt. It is written only to sudo's prompt on the channel; its
/// `Debug` form never shows it, so no log or error can carry it by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct BecomePassword(String);

impl BecomePassword {
    pub fn new(password: String) -> Self {
        Self(password)
    }

    /// The password itself, for the one place that answers sudo's prompt.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BecomePassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BecomePassword([REDACTED])")
    }
}

/// The answer to a step's `approve` question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    Granted {
        by: String,
    },
    Refused {
        by: String,
    },
    /// Nobody can answer now (no terminal): the run stops, awaiting approval.
    Deferred,
}

/// Asks a person whether a step may run (the CLI asks on a terminal).
pub trait Approver: Send + Sync {
    fn ask<'a>(&'a self, step: &'a StepId, text: &'a str) -> BoxFuture<'a, Approval>;
}

/// For runs with no one to ask: every approval is deferred to `runbook resume --approve`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoApprover;

impl Approver for NoApprover {
    fn ask<'a>(&'a self, _step: &'a StepId, _text: &'a str) -> BoxFuture<'a, Approval> {
        Box::pin(async { Approval::Deferred })
    }
}

pub trait StepRunner: Send + Sync {
    fn run<'a>(
        &'a self,
        ctx: AttemptContext,
        out: &'a mut OutputSink,
    ) -> BoxFuture<'a, AttemptOutcome>;
}

/// How much of each stream the engine keeps in memory for expressions (`steps.x.stdout`).
pub const DEFAULT_TAIL_BYTES: usize = 1024 * 1024;

/// Where a runner sends output. Sending waits when the consumers are behind, so a step that
/// prints faster than evidence can be written is slowed down instead of buffered in memory.
pub struct OutputSink {
    events: mpsc::Sender<RunEvent>,
    step: StepId,
    target: Target,
    attempt: u32,
    counts: OutputCounts,
    tail_limit: usize,
    stdout_tail: VecDeque<u8>,
    stderr_tail: VecDeque<u8>,
    details: serde_json::Map<String, serde_json::Value>,
}

impl OutputSink {
    pub fn new(events: mpsc::Sender<RunEvent>, step: StepId, target: Target, attempt: u32) -> Self {
        Self {
            events,
            step,
            target,
            attempt,
            counts: OutputCounts::default(),
            tail_limit: DEFAULT_TAIL_BYTES,
            stdout_tail: VecDeque::new(),
            stderr_tail: VecDeque::new(),
            details: serde_json::Map::new(),
        }
    }

    pub async fn write(&mut self, stream: Stream, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let (count, tail) = match stream {
            Stream::Stdout => (&mut self.counts.stdout, &mut self.stdout_tail),
            Stream::Stderr => (&mut self.counts.stderr, &mut self.stderr_tail),
        };
        *count += data.len() as u64;
        let keep = data.len().min(self.tail_limit);
        tail.extend(&data[data.len() - keep..]);
        let excess = tail.len().saturating_sub(self.tail_limit);
        tail.drain(..excess);
        // A closed channel means the run is being torn down; output has nowhere to go.
        let _ = self
            .events
            .send(RunEvent::Output {
                at: chrono::Utc::now(),
                step: self.step.clone(),
                target: self.target.clone(),
                attempt: self.attempt,
                stream,
                data,
            })
            .await;
    }

    /// Records the process group of a local attempt (see [`RunEvent::ProcessStarted`]).
    pub async fn process_started(&mut self, pid: u32, start_ticks: Option<u64>) {
        let _ = self
            .events
            .send(RunEvent::ProcessStarted {
                at: chrono::Utc::now(),
                step: self.step.clone(),
                target: self.target.clone(),
                attempt: self.attempt,
                pid,
                start_ticks,
            })
            .await;
    }

    /// A message from the engine about this attempt (not the step's output): recorded in the
    /// attempt's log as an engine record, apart from what the process wrote.
    pub async fn note(&mut self, message: &str) {
        let _ = self
            .events
            .send(RunEvent::AttemptNote {
                at: chrono::Utc::now(),
                step: self.step.clone(),
                target: self.target.clone(),
                attempt: self.attempt,
                message: message.to_owned(),
            })
            .await;
    }

    /// Processes that left the attempt's process group and were stopped when it ended.
    pub async fn processes_stopped(&mut self, processes: Vec<crate::event::StoppedProcess>) {
        let _ = self
            .events
            .send(RunEvent::ProcessesStopped {
                at: chrono::Utc::now(),
                step: self.step.clone(),
                target: self.target.clone(),
                attempt: self.attempt,
                processes,
            })
            .await;
    }

    /// Structured results of the attempt (an HTTP status, a TLS certificate, a key accepted
    /// on first use): offered to expressions as `output.<key>` and kept in the journal.
    pub fn detail(&mut self, key: &str, value: serde_json::Value) {
        self.details.insert(key.to_owned(), value);
    }

    pub fn details(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.details
    }

    /// Hands a file the attempt produced (a screenshot) to the evidence recorder, which stores
    /// it as `steps/<id>/<target>/attempt-<n>.<ext>` with `sidecar` as `….<ext>.json`. Returns
    /// once the file is copied, so the runner may delete its copy.
    pub async fn artifact(&mut self, ext: &str, path: PathBuf, sidecar: serde_json::Value) {
        let (receipt, done) = Receipt::new();
        let sent = self
            .events
            .send(RunEvent::Artifact {
                at: chrono::Utc::now(),
                receipt,
                step: self.step.clone(),
                target: self.target.clone(),
                attempt: self.attempt,
                ext: ext.to_owned(),
                path,
                sidecar,
            })
            .await;
        if sent.is_ok() {
            let _ = done.await;
        }
    }

    pub fn counts(&self) -> OutputCounts {
        self.counts
    }

    /// The last bytes of a stream (at most the tail limit), lossily decoded.
    pub fn tail(&self, stream: Stream) -> String {
        let tail = match stream {
            Stream::Stdout => &self.stdout_tail,
            Stream::Stderr => &self.stderr_tail,
        };
        let (a, b) = tail.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
