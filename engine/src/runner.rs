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

use crate::event::{AttemptOutcome, OutputCounts, RunEvent, Stream, Target};
use crate::runbook::StepId;

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
