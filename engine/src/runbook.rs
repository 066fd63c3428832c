//! The checked, typed runbook: what the analyzer produces and every later stage consumes.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::retry::RetryPolicy;
use crate::source::{Source, Span};
use crate::template::Template;

/// A step id: letters, digits, `-`, `_`, `.`; it names a directory in the evidence bundle.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct StepId(Arc<str>);

impl StepId {
    pub fn new(id: &str) -> Self {
        Self(Arc::from(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The form used to detect ids that collide in practice (`Build_Image` vs `build-image`).
    pub fn normalized(&self) -> String {
        self.0.to_lowercase().replace('_', "-")
    }

    /// Whether `id` is acceptable as a step id or runbook name.
    pub fn is_valid(id: &str) -> bool {
        let mut chars = id.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
            && id.len() <= 64
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug)]
pub struct Runbook {
    pub source: Arc<Source>,
    pub meta: Meta,
    pub params: Vec<ParamSpec>,
    pub steps: Vec<StepSpec>,
}

#[derive(Debug, Clone)]
pub struct Meta {
    pub name: String,
    pub title: Option<String>,
    pub description: Option<String>,
    /// Decision records or tickets the runbook implements; copied into evidence.
    pub refs: Vec<String>,
    /// Where bundles go, relative to the runbook's directory (`--evidence-dir` overrides).
    pub evidence_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub span: Span,
    pub default: Option<serde_json::Value>,
    pub doc: Option<String>,
    /// Secret values are never printed or written to evidence.
    pub secret: bool,
    /// Environment variable the value is read from when not given with `--set`.
    pub env: Option<String>,
    pub required: bool,
}

/// What a step does.
#[derive(Debug, Clone)]
pub enum Action {
    /// A shell command run on the machine running `runbook`.
    Run { command: Template },
}

#[derive(Debug, Clone)]
pub struct Need {
    pub id: StepId,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct StepSpec {
    pub id: StepId,
    pub id_span: Span,
    pub title: Option<String>,
    pub description: Option<String>,
    pub phase: Option<String>,
    pub needs: Vec<Need>,
    pub action: Action,
    pub env: Vec<(String, Template)>,
    pub cwd: Option<Template>,
    /// The interpreter and its flags; the command is appended as the last argument.
    pub shell: Vec<String>,
    pub timeout: Option<Duration>,
    /// How long a cancelled or timed-out step gets between TERM and KILL.
    pub kill_grace: Duration,
    pub retry: RetryPolicy,
    /// A failure is recorded but does not stop the run or its dependents.
    pub continue_on_failure: bool,
    /// Runs once its needs have finished, whatever their outcome and even after a failure
    /// stopped the run: cleanup and evidence collection.
    pub always: bool,
    /// Files copied into the bundle's `collected/<step>/` after the step, relative to its cwd.
    pub collect: Vec<Template>,
}

/// The shell used when neither the step nor `[defaults]` names one: bash with errexit and
/// pipefail, as CI systems do, so a failing command in a pipeline fails the step.
pub fn default_shell() -> Vec<String> {
    ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c"]
        .map(String::from)
        .to_vec()
}

pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

impl Runbook {
    pub fn step(&self, id: &str) -> Option<&StepSpec> {
        self.steps.iter().find(|s| s.id.as_str() == id)
    }

    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The directory the runbook file is in; relative paths in the runbook resolve against it.
    pub fn base_dir(&self) -> PathBuf {
        match self.source.path().parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}
