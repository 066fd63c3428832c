//! Run events: everything the executor reports, in order, on one channel. The evidence
//! recorder and the console are consumers; neither can influence the run except by cancelling.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::runbook::StepId;

pub type Timestamp = DateTime<Utc>;

/// Where an attempt ran: `local`, or a host name once remote steps exist.
pub type Target = Arc<str>;

fn local_target() -> Target {
    Arc::from("local")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn tag(self) -> &'static str {
        match self {
            Stream::Stdout => "out",
            Stream::Stderr => "err",
        }
    }
}

/// Why an attempt failed without an exit status of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The process could not be started (missing shell, bad cwd).
    Spawn,
    /// A template in the step could not be rendered.
    Template,
    /// Reading the step's output failed.
    Io,
    /// A `script` step raised an error.
    Script,
    /// `capture = "json"` and stdout was not JSON.
    Capture,
    /// `until` stayed false (or failed to evaluate).
    Until,
    /// `check` was false (or failed to evaluate).
    Check,
    /// An `outputs` expression or an `after`/`before` hook failed.
    Hook,
    /// The host name did not resolve.
    Dns,
    /// Nothing listens at the address (connection refused).
    Refused,
    /// Connecting (or the SSH/TLS handshake) took longer than allowed.
    ConnectTimeout,
    /// The server refused every credential offered.
    Auth,
    /// The host's key is unknown or differs from `known_hosts`: nothing was sent.
    HostKey,
    /// The connection or channel closed before the command's exit status arrived.
    Channel,
    /// The attempt's start could not be written to the journal, so it was not started:
    /// nothing runs that the evidence cannot show (a full disk, a failed write).
    Evidence,
    /// TLS certificate verification failed.
    Tls,
    /// An HTTP response had a status the step does not expect.
    Status,
    /// The browser for a `screenshot` step is missing or failed.
    Browser,
    /// The step's settings are unusable (a CA file that does not parse, a bad URL).
    Config,
    /// Client and server share no algorithm (key exchange, host key, cipher, MAC).
    Negotiation,
    /// sudo refused the command (wrong or missing password, a rule that does not allow it,
    /// `requiretty`): retrying cannot change that.
    Sudo,
}

impl FailureKind {
    /// Maps the error kinds runners report (`"connect_refused"`, `"auth"`, …) to a kind.
    pub fn from_name(name: &str) -> FailureKind {
        match name {
            "dns" => FailureKind::Dns,
            "connect_refused" | "refused" => FailureKind::Refused,
            "connect_timeout" | "timeout" => FailureKind::ConnectTimeout,
            "auth" | "key" => FailureKind::Auth,
            "host_key_mismatch" | "host_key_unknown" | "host_key" => FailureKind::HostKey,
            "channel" => FailureKind::Channel,
            "tls" => FailureKind::Tls,
            "unexpected_status" | "status" => FailureKind::Status,
            "browser" | "browser_missing" | "navigation" | "protocol" | "wait_timeout" => {
                FailureKind::Browser
            }
            "config" => FailureKind::Config,
            "negotiation" => FailureKind::Negotiation,
            "sudo_refused" | "sudo" => FailureKind::Sudo,
            "template" => FailureKind::Template,
            "spawn" => FailureKind::Spawn,
            _ => FailureKind::Io,
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AttemptOutcome {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
        name: String,
    },
    TimedOut {
        #[serde(with = "crate::serde_duration")]
        after: Duration,
    },
    Cancelled,
    Failed {
        failure: FailureKind,
        message: String,
    },
}

impl AttemptOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, AttemptOutcome::Exited { code: 0 })
    }

    /// Whether another attempt could turn out differently. A template error or a cancel will
    /// not change on retry; a non-zero exit or a timeout may.
    pub fn retryable(&self) -> bool {
        match self {
            AttemptOutcome::Exited { code } => *code != 0,
            AttemptOutcome::Signaled { .. } | AttemptOutcome::TimedOut { .. } => true,
            AttemptOutcome::Failed { failure, .. } => {
                matches!(
                    failure,
                    FailureKind::Io
                        | FailureKind::Until
                        | FailureKind::Capture
                        | FailureKind::Dns
                        | FailureKind::Refused
                        | FailureKind::ConnectTimeout
                        | FailureKind::Channel
                        | FailureKind::Status
                        | FailureKind::Browser
                )
            }
            AttemptOutcome::Cancelled => false,
        }
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self {
            AttemptOutcome::Exited { code } => Some(*code),
            _ => None,
        }
    }

    /// One line for people: `exit code 2`, `timed out after 10s`, …
    pub fn describe(&self) -> String {
        match self {
            AttemptOutcome::Exited { code: 0 } => "succeeded".into(),
            AttemptOutcome::Exited { code } => match died_of_signal(*code) {
                Some(why) => format!("exit code {code} ({why})"),
                None => format!("exit code {code}"),
            },
            AttemptOutcome::Signaled { name, .. } => format!("killed by {name}"),
            AttemptOutcome::TimedOut { after } => {
                format!("timed out after {}", crate::duration::format_spec(*after))
            }
            AttemptOutcome::Cancelled => "cancelled".into(),
            AttemptOutcome::Failed { message, .. } => message.clone(),
        }
    }
}

/// What a shell's exit code above 128 says: 128 + N is how a shell reports that a command it
/// ran was killed by signal N. An operator reading "exit code 141" should not have to know
/// that it is SIGPIPE, which under the default shell's `pipefail` is most often a pipe's
/// reader (`head`, `grep -q`) that stopped reading early.
fn died_of_signal(code: i32) -> Option<String> {
    let n = code.checked_sub(128).filter(|n| (1..=64).contains(n))?;
    let name = match n {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return Some(format!("128 + {n}: a command was killed by signal {n}")),
    };
    Some(if n == 13 {
        format!(
            "128 + 13: a command was killed by {name}, usually a pipe whose reader stopped \
             early, failing the step under pipefail"
        )
    } else {
        format!("128 + {n}: a command was killed by {name}")
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// The runner died (crash, `kill -9`, power loss): found when a bundle is read later.
    Interrupted,
    /// Stopped before a step with `approve` that nobody approved yet.
    AwaitingApproval,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
            RunStatus::AwaitingApproval => "awaiting_approval",
        }
    }
}

/// A drill's verdict on one objective, or on the whole drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    NotMeasured,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::NotMeasured => "not_measured",
        }
    }
}

/// One recovery objective: the target, what was measured, and the verdict with why.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Objective {
    pub target_seconds: f64,
    pub measured_seconds: Option<f64>,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// What a drill measured (`[drill]`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DrillReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto: Option<Objective>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo: Option<Objective>,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_stopped_at: Option<Timestamp>,
    /// The restored data's time, as the `restored_data_time` expression gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_data_time: Option<Timestamp>,
}

/// How a step went on one host.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TargetResult {
    pub target: String,
    pub status: StepStatus,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A process that had left a local attempt's process group (`setsid`, `set -m`) but still
/// carried the attempt's id, or the run's, in its environment when it was stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoppedProcess {
    pub pid: u32,
    /// Its command line as `/proc` showed it (arguments joined by spaces).
    pub command: String,
    /// TERM was not enough: it was killed (SIGKILL) after the grace period.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub killed: bool,
}

impl StoppedProcess {
    /// One line for people: `pid 4242 (SIGTERM): sleep 301`.
    pub fn describe(&self) -> String {
        format!(
            "pid {} ({}): {}",
            self.pid,
            if self.killed { "SIGKILL" } else { "SIGTERM" },
            self.command
        )
    }
}

/// Bytes an attempt wrote, per stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputCounts {
    pub stdout: u64,
    pub stderr: u64,
}

type Ack = std::sync::Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<bool>>>>;

/// Lets the sender of an event wait until a consumer is done with it: the receiver from
/// [`Receipt::new`] gets `true` when the consumer calls [`RunEvent::acknowledge`] (the event is
/// recorded), `false` when it calls [`RunEvent::refuse`] (it could not be), and an error when
/// every copy of the event is dropped (nobody keeps receipts; [`recorded`] counts that as
/// recorded).
#[derive(Debug, Clone, Default)]
pub struct Receipt(Option<Ack>);

/// Waits for a receipt's answer: whether the event was recorded.
pub async fn recorded(rx: tokio::sync::oneshot::Receiver<bool>) -> bool {
    rx.await.unwrap_or(true)
}

impl Receipt {
    pub fn new() -> (Self, tokio::sync::oneshot::Receiver<bool>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            Self(Some(std::sync::Arc::new(std::sync::Mutex::new(Some(tx))))),
            rx,
        )
    }

    fn answer(&self, recorded: bool) {
        if let Some(slot) = &self.0 {
            if let Some(tx) = slot.lock().ok().and_then(|mut s| s.take()) {
                let _ = tx.send(recorded);
            }
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum RunEvent {
    RunStarted {
        at: Timestamp,
        /// Answered once the record is in the journal: no step starts before that.
        #[serde(skip)]
        receipt: Receipt,
        run_id: String,
        runbook: String,
        steps: usize,
    },
    StepStarted {
        at: Timestamp,
        step: StepId,
    },
    AttemptStarted {
        at: Timestamp,
        /// Answered once the record is in the journal: the attempt's action (a process, an SSH
        /// channel, a request) starts only after that (write-ahead).
        #[serde(skip)]
        receipt: Receipt,
        step: StepId,
        target: Target,
        attempt: u32,
        max_attempts: u32,
        /// The command as run, secrets redacted.
        command: String,
        cwd: PathBuf,
        /// A probe attempt (`http`, `tcp`): when the next attempt starts, this one's log is
        /// dropped and only its outcome and details stay (polling can make hundreds).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        compact: bool,
    },
    #[serde(skip)]
    Output {
        at: Timestamp,
        step: StepId,
        target: Target,
        attempt: u32,
        stream: Stream,
        data: Bytes,
    },
    AttemptFinished {
        at: Timestamp,
        step: StepId,
        target: Target,
        attempt: u32,
        #[serde(with = "crate::serde_duration")]
        duration: Duration,
        outcome: AttemptOutcome,
        output: OutputCounts,
        /// Structured results the runner reported (HTTP status, TLS peer, accepted host key).
        #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
        details: serde_json::Map<String, serde_json::Value>,
        /// A successful attempt's `outputs` (secrets redacted): what `resume` restores when the
        /// runner died before the step's own record.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outputs: Option<serde_json::Value>,
    },
    /// A file an attempt produced (a screenshot); the recorder copies it into the bundle.
    Artifact {
        at: Timestamp,
        #[serde(skip)]
        receipt: Receipt,
        step: StepId,
        target: Target,
        attempt: u32,
        ext: String,
        path: PathBuf,
        sidecar: serde_json::Value,
    },
    RetryScheduled {
        at: Timestamp,
        step: StepId,
        /// Whose attempt is retried: on a step with hosts, each host retries on its own.
        /// Journals written before this field existed read as `local`.
        #[serde(default = "local_target")]
        target: Target,
        next_attempt: u32,
        #[serde(with = "crate::serde_duration")]
        delay: Duration,
    },
    /// A file the step asked to keep; the recorder copies it into the bundle.
    Collect {
        at: Timestamp,
        /// Dropped by the consumer once the file is copied: the executor waits for that before
        /// the step counts as finished, so a cleanup step cannot delete the file first.
        #[serde(skip)]
        receipt: Receipt,
        step: StepId,
        /// As written in the runbook (rendered).
        name: String,
        /// Resolved against the step's working directory.
        path: PathBuf,
    },
    /// Not acknowledged: a dependent's first effect waits for its own `attempt_started`
    /// record, and records are written in the order they are sent, so this one is in the
    /// journal first (and a run that can no longer be recorded starts nothing new).
    StepFinished {
        at: Timestamp,
        step: StepId,
        status: StepStatus,
        attempts: u32,
        #[serde(with = "crate::serde_duration")]
        duration: Duration,
        /// Why it failed, was skipped or was cancelled.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Values from `outputs` (or a `script` step's returned map).
        #[serde(skip_serializing_if = "Option::is_none")]
        outputs: Option<serde_json::Value>,
        /// Per host, for steps that ran on hosts.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<TargetResult>,
    },
    /// One host finished its part of a step on hosts (its attempts, or its block's
    /// sub-steps), before the step as a whole: `resume` does not run a host again that
    /// finished with success.
    TargetFinished {
        at: Timestamp,
        step: StepId,
        result: TargetResult,
    },
    /// A rolling step finished a batch (and passed or failed its gate).
    Batch {
        at: Timestamp,
        step: StepId,
        number: usize,
        hosts: Vec<String>,
        failed: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        gate: Option<String>,
    },
    /// A drill's clock started or stopped.
    Clock {
        at: Timestamp,
        start: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<StepId>,
    },
    /// A host was added to the inventory at run time.
    HostAdded {
        at: Timestamp,
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<StepId>,
        name: String,
        address: String,
        groups: Vec<String>,
        /// The map given to `add_host`, secrets redacted: what `resume` adds again.
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        spec: serde_json::Value,
    },
    /// `log(msg)` from an expression or hook.
    Log {
        at: Timestamp,
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<StepId>,
        message: String,
    },
    /// A value became secret at run time (`secret()`): redacted from here on. The value itself
    /// is never serialised.
    SecretRegistered {
        at: Timestamp,
        /// The step whose expression registered it: its earlier output is redacted too.
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<StepId>,
        name: String,
        #[serde(skip, default)]
        value: String,
    },
    Note {
        at: Timestamp,
        message: String,
    },
    /// A local attempt's process started: its process group id, so that a later `resume` can
    /// stop what a crashed runner left running.
    ProcessStarted {
        at: Timestamp,
        step: StepId,
        target: Target,
        attempt: u32,
        pid: u32,
        /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22), to tell the
        /// process from a later one that reuses its id.
        #[serde(skip_serializing_if = "Option::is_none")]
        start_ticks: Option<u64>,
    },
    /// A message from the engine about one attempt, not the step's output (its output was
    /// cut short, …): written to the attempt's log as an engine record (`---`).
    AttemptNote {
        at: Timestamp,
        step: StepId,
        target: Target,
        attempt: u32,
        message: String,
    },
    /// Processes that had left a local attempt's process group but still carried its id
    /// (`RUNBOOK_ATTEMPT_ID`) when the attempt ended: they were stopped with it.
    ProcessesStopped {
        at: Timestamp,
        step: StepId,
        target: Target,
        attempt: u32,
        processes: Vec<StoppedProcess>,
    },
    /// `runbook resume` continues this run in the same bundle.
    RunResumed {
        at: Timestamp,
        /// Answered once the record is in the journal: no step starts before that.
        #[serde(skip)]
        receipt: Receipt,
        previous: RunStatus,
        operator: String,
    },
    /// A step with `approve` was approved (or refused) — who and when.
    Approval {
        at: Timestamp,
        step: StepId,
        by: String,
        granted: bool,
    },
    /// The drill's measurements and verdict, just before the run finishes.
    DrillMeasured {
        at: Timestamp,
        report: DrillReport,
    },
    RunFinished {
        at: Timestamp,
        status: RunStatus,
        /// Why the run failed when the run itself failed, not (only) a step: a `before_run` or
        /// `after_run` hook, `--fail-on-leak`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl RunEvent {
    fn receipt(&self) -> Option<&Receipt> {
        match self {
            RunEvent::RunStarted { receipt, .. }
            | RunEvent::RunResumed { receipt, .. }
            | RunEvent::AttemptStarted { receipt, .. }
            | RunEvent::Collect { receipt, .. }
            | RunEvent::Artifact { receipt, .. } => Some(receipt),
            _ => None,
        }
    }

    /// Tells the executor this event has been dealt with (recorded): see [`Receipt`].
    pub fn acknowledge(&self) {
        if let Some(r) = self.receipt() {
            r.answer(true);
        }
    }

    /// Tells the executor this event could not be recorded: what it announces must not happen.
    pub fn refuse(&self) {
        if let Some(r) = self.receipt() {
            r.answer(false);
        }
    }

    /// Whether the executor acts on this event once it is recorded (it announces a process, a
    /// connection or a request, or the run itself): the record must reach the journal first.
    pub fn announces_effect(&self) -> bool {
        matches!(
            self,
            RunEvent::RunStarted { .. }
                | RunEvent::RunResumed { .. }
                | RunEvent::AttemptStarted { .. }
        )
    }

    pub fn at(&self) -> Timestamp {
        match self {
            RunEvent::RunStarted { at, .. }
            | RunEvent::StepStarted { at, .. }
            | RunEvent::AttemptStarted { at, .. }
            | RunEvent::Output { at, .. }
            | RunEvent::AttemptFinished { at, .. }
            | RunEvent::RetryScheduled { at, .. }
            | RunEvent::Collect { at, .. }
            | RunEvent::StepFinished { at, .. }
            | RunEvent::Note { at, .. }
            | RunEvent::Log { at, .. }
            | RunEvent::SecretRegistered { at, .. }
            | RunEvent::RunResumed { at, .. }
            | RunEvent::ProcessStarted { at, .. }
            | RunEvent::AttemptNote { at, .. }
            | RunEvent::ProcessesStopped { at, .. }
            | RunEvent::Approval { at, .. }
            | RunEvent::Artifact { at, .. }
            | RunEvent::Batch { at, .. }
            | RunEvent::TargetFinished { at, .. }
            | RunEvent::Clock { at, .. }
            | RunEvent::HostAdded { at, .. }
            | RunEvent::DrillMeasured { at, .. }
            | RunEvent::RunFinished { at, .. } => *at,
        }
    }
}

#[cfg(test)]
mod failure_kind_tests {
    use super::{AttemptOutcome, FailureKind};

    /// A refused sudo has its own kind, and `retry` does not run it again for nothing.
    #[test]
    fn a_refused_sudo_is_its_own_kind_and_not_retried() {
        let kind = FailureKind::from_name("sudo_refused");
        assert_eq!(kind, FailureKind::Sudo);
        let outcome = AttemptOutcome::Failed {
            failure: kind,
            message: "sudo refused: a password is required".into(),
        };
        assert!(!outcome.retryable());
        assert_eq!(
            serde_json::to_value(kind).expect("json"),
            serde_json::json!("sudo")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::AttemptOutcome;

    #[test]
    fn exit_codes_above_128_name_the_signal_that_killed_a_command() {
        let said = |code| AttemptOutcome::Exited { code }.describe();
        assert_eq!(said(3), "exit code 3");
        assert_eq!(said(128), "exit code 128");
        assert_eq!(
            said(137),
            "exit code 137 (128 + 9: a command was killed by SIGKILL)"
        );
        assert!(said(141).starts_with("exit code 141 (128 + 13: a command was killed by SIGPIPE, usually a pipe whose reader stopped early"), "{}", said(141));
        assert_eq!(
            said(170),
            "exit code 170 (128 + 42: a command was killed by signal 42)"
        );
        assert_eq!(said(255), "exit code 255");
    }
}
