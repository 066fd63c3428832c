//! `manifest.json`: the run record an assessor reads first. It is built only from run events,
//! so it can always be rebuilt from the journal.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use runbook_engine::event::{AttemptOutcome, OutputCounts, RunStatus, StepStatus};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "runbook-evidence/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub run_id: String,
    pub status: RunStatus,
    /// Why the run itself failed (a hook, `--fail-on-leak`), beyond what its steps say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    pub runbook: RunbookInfo,
    /// Parameter values as used, secrets replaced by `[REDACTED:name]`.
    pub params: serde_json::Value,
    pub param_sources: BTreeMap<String, serde_json::Value>,
    pub operator: Operator,
    pub engine: Engine,
    /// Directory steps ran in (when they name no `cwd`).
    pub workdir: String,
    pub command_line: Vec<String>,
    pub summary: BTreeMap<String, usize>,
    pub steps: Vec<StepRecord>,
    pub notes: Vec<Note>,
    /// Names of the secrets redacted from this bundle (values never appear).
    pub secrets: Vec<String>,
    /// How many times each secret had to be redacted from step output.
    #[serde(default)]
    pub redactions: BTreeMap<String, u64>,
    /// Where the runbook came from (git), the clock, the engine build, declared tool facts.
    #[serde(default)]
    pub context: serde_json::Value,
    /// Each time the run was continued with `runbook resume`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resumed: Vec<Resumption>,
    /// Steps approved (or refused) with `approve`: who and when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<ApprovalRecord>,
    /// `[drill]`: objectives, measurements and verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<runbook_engine::event::DrillReport>,
    /// Hosts added to the inventory while the run went on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts_added: Vec<serde_json::Value>,
    /// The inventory the run started with (sha256 and copy in `runbook/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<RunbookInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resumption {
    pub at: DateTime<Utc>,
    pub previous: RunStatus,
    pub operator: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub at: DateTime<Utc>,
    pub step: String,
    pub by: String,
    pub granted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunbookInfo {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub refs: Vec<String>,
    /// Path as given on the command line.
    pub path: String,
    pub sha256: String,
    /// The copy inside the bundle.
    pub copy: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Operator {
    pub user: String,
    pub uid: u32,
    pub host: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Engine {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    pub status: Option<StepStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_seconds: f64,
    pub attempts: Vec<AttemptRecord>,
    pub collected: Vec<Collected>,
    /// Per host, for steps that ran on hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<runbook_engine::event::TargetResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub target: String,
    pub command: String,
    pub cwd: String,
    pub started_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AttemptOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub output: OutputCounts,
    /// Delay before the next attempt, when one was scheduled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_delay_seconds: Option<f64>,
    pub log: String,
    /// Structured results from the runner (HTTP status, TLS peer, host key accepted).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
    /// A probe attempt: its log is dropped (`log` empty) once a later attempt starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compact: bool,
    /// A successful attempt's `outputs` (secrets redacted), for `resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<serde_json::Value>,
    /// Files the attempt produced (screenshots), relative to the bundle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    /// Processes that had left the attempt's process group and were stopped when it ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stopped_processes: Vec<runbook_engine::event::StoppedProcess>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Collected {
    pub name: String,
    pub source: String,
    /// Path inside the bundle, absent when the file could not be copied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Note {
    pub at: DateTime<Utc>,
    pub message: String,
}
