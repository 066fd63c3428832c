//! The checked, typed runbook: what the analyzer produces and every later stage consumes.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::expr::Expr;
use crate::model::Selector;
pub use crate::model::{Located, StepId};
use crate::retry::RetryPolicy;
use crate::source::{Source, Span};
use crate::template::Template;

#[derive(Debug)]
pub struct Runbook {
    pub source: Arc<Source>,
    pub meta: Meta,
    pub params: Vec<ParamSpec>,
    pub hooks: Hooks,
    pub steps: Vec<StepSpec>,
    /// `[drill]`: recovery objectives this run measures.
    pub drill: Option<DrillSpec>,
    /// `[notify]`: the webhook told how the run ended (checked by the analyzer, sent by the
    /// CLI).
    pub notify: Option<(serde_json::Value, Span)>,
}

/// `[drill]`: a disaster-recovery drill's objectives and how to measure them.
#[derive(Debug, Clone, Default)]
pub struct DrillSpec {
    /// Recovery time objective: the longest the clock may run.
    pub rto: Option<Duration>,
    /// Recovery point objective: the oldest the restored data may be when the clock starts.
    pub rpo: Option<Duration>,
    /// The step whose start starts the clock (or `drill.start_clock()` in a hook).
    pub clock_start: Option<Need>,
    /// The step whose success stops the clock (or `drill.stop_clock()`).
    pub clock_stop: Option<Need>,
    /// An expression giving the restored data's time (RFC 3339 or Unix seconds), evaluated
    /// when the run ends: `steps["restore"].outputs.snapshot_time`.
    pub restored_data_time: Option<SpannedExpr>,
}

/// A compiled Rhai expression or script and where it is written.
#[derive(Debug, Clone)]
pub struct SpannedExpr {
    pub expr: Expr,
    pub at: Located,
}

/// Run-level hooks (`[hooks]`).
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub before_run: Option<SpannedExpr>,
    pub after_run: Option<SpannedExpr>,
    pub before_step: Option<SpannedExpr>,
    pub after_step: Option<SpannedExpr>,
    pub on_failure: Option<SpannedExpr>,
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
    /// Environment variables expressions may read as `env.NAME`.
    pub allow_env: Vec<String>,
    /// Commands whose output is recorded in the manifest as run context
    /// (`[evidence] facts = ["terraform version"]`).
    pub facts: Vec<String>,
    /// Regular expressions for secrets recognised by shape (`[evidence] redact`); a group named
    /// `v` limits the redaction to that group.
    pub redact: Vec<String>,
    /// `[evidence] timestamp_url`: the RFC 3161 authority that time-stamps the sealed bundle
    /// (`--timestamp-url` overrides).
    pub timestamp_url: Option<String>,
    /// The inventory file, relative to the runbook's directory (`--inventory` overrides), and
    /// where the runbook names it.
    pub inventory: Option<(PathBuf, Span)>,
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
    /// A Rhai script run by the engine; a returned map becomes the step's outputs.
    Script { script: SpannedExpr },
    /// A step kind other than a shell command (`http`, `tcp`, `screenshot`, `upload`): its
    /// settings table, with templates in its strings, rendered per attempt and handed to the
    /// runner for that kind.
    Request { kind: RequestKind, spec: Spec },
    /// `steps = [ … ]`: sub-steps run in order on each selected host, so that drain → upgrade
    /// → uncordon happens host by host.
    Block { steps: Vec<StepSpec> },
}

pub use crate::step_kind::RequestKind;

/// A settings value as written: strings are templates, rendered when the attempt starts.
#[derive(Debug, Clone)]
pub enum Spec {
    Template(Template),
    /// A number, boolean or date: used as written.
    Value(serde_json::Value),
    Array(Vec<Spec>),
    Table(Vec<(String, Spec)>),
}

impl Spec {
    /// Every template inside, for reference checks.
    pub fn templates(&self) -> Vec<&Template> {
        match self {
            Spec::Template(t) => vec![t],
            Spec::Value(_) => Vec::new(),
            Spec::Array(items) => items.iter().flat_map(Spec::templates).collect(),
            Spec::Table(entries) => entries.iter().flat_map(|(_, v)| v.templates()).collect(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Spec> {
        match self {
            Spec::Table(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// How a step on several hosts goes through them.
#[derive(Debug, Clone, Default)]
pub struct Strategy {
    pub kind: StrategyKind,
    /// Host failures tolerated over the whole step (not per batch) before it stops and fails.
    pub max_failures: Budget,
}

#[derive(Debug, Clone)]
pub enum StrategyKind {
    /// All selected hosts at once, at most `limit` at a time (and at most `--forks`).
    Parallel { limit: Option<usize> },
    /// Batches one after another: sizes as written, the last repeating until every host ran.
    Rolling {
        batches: Vec<Budget>,
        pause: Option<Pause>,
        gate: Option<Gate>,
        /// The gate also runs before the first batch: nothing starts on an unhealthy cluster.
        gate_before_first: bool,
    },
}

impl Default for StrategyKind {
    fn default() -> Self {
        StrategyKind::Parallel { limit: None }
    }
}

/// The wait between two batches: written in the runbook, or a parameter's value, so that an
/// operator can set it per run (`--set batch_pause=2m`) without editing the runbook.
#[derive(Debug, Clone, PartialEq)]
pub enum Pause {
    Fixed(Duration),
    /// `pause = "{{ params.NAME }}"`: the parameter is checked as a duration when it is bound.
    Param(String),
}

impl Pause {
    /// The wait this run uses; `None` when a parameter's value is not a duration (binding
    /// refuses such a value, so a run never sees it).
    pub fn resolve(&self, params: &crate::params::BoundParams) -> Option<Duration> {
        match self {
            Pause::Fixed(d) => Some(*d),
            Pause::Param(name) => params
                .get(name)
                .and_then(|p| p.value.as_str())
                .and_then(|text| crate::duration::parse_duration(text).ok()),
        }
    }
}

/// A number of hosts, absolute or a percentage of those selected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Count(usize),
    Percent(f64),
}

impl Default for Budget {
    fn default() -> Self {
        Budget::Count(0)
    }
}

impl Budget {
    /// The number of hosts out of `total`; a percentage rounds down, but a batch is never empty.
    pub fn of(self, total: usize) -> usize {
        match self {
            Budget::Count(n) => n,
            Budget::Percent(p) => ((total as f64) * p / 100.0).floor() as usize,
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Count(n) => write!(f, "{n}"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What must hold between two batches of a rolling step before the next starts.
#[derive(Debug, Clone)]
pub enum Gate {
    /// A Rhai condition (it may read `steps.<id>` and `batch`).
    Expr(SpannedExpr),
    /// A probe run locally (an `http`/`tcp`/`run` step with its own retry and `until`).
    Step(Box<StepSpec>),
}

/// How a step's stdout is offered to expressions besides as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Capture {
    #[default]
    Text,
    /// stdout is parsed as JSON into `output.json` / `steps.<id>.json`.
    Json,
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
    /// Run the step only when true (evaluated when its needs are done).
    pub when: Option<SpannedExpr>,
    /// After a successful attempt: retry (within the retry policy) while false.
    pub until: Option<SpannedExpr>,
    /// After success: an assertion; false fails the step.
    pub check: Option<SpannedExpr>,
    /// Named values computed after success, visible downstream as `steps.<id>.outputs.<name>`.
    pub outputs: Vec<(String, SpannedExpr)>,
    pub capture: Capture,
    /// Per-step hooks: `before` the first attempt, `after` success.
    pub before: Option<SpannedExpr>,
    pub after: Option<SpannedExpr>,
    /// Steps whose results the step's expressions read (`steps.<id>`), with where.
    pub refs: Vec<Need>,
    /// Earlier sub-steps of the same block a sub-step reads (`block.<id>`), with where.
    pub block_reads: Vec<Need>,
    /// An `always` step that also runs when the run is cancelled (uncordon after Ctrl-C).
    pub run_on_cancel: bool,
    /// A question a person must answer yes to before the step runs.
    pub approve: Option<String>,
    /// `on = "<selector>"`: the hosts it runs on (none: the machine running `runbook`).
    pub on: Option<(Selector, Span)>,
    pub strategy: Strategy,
    /// On hosts: run the command through `sudo` (`-n`, or answering its prompt with
    /// `become_password`).
    pub sudo: bool,
    /// sudo's password for this step (`become_password`, itself or from `[defaults]`),
    /// rendered per attempt and given to sudo on the channel, never on a command line.
    pub become_password: Option<Template>,
    /// On hosts: ask for a terminal.
    pub pty: bool,
    /// In a block: run on the machine running `runbook` (with `host` still in scope).
    pub local: bool,
    /// `plan = "…"`: a side-effect-free command `--dry-run` runs instead of `run`.
    pub plan: Option<Template>,
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

    /// The parameters a step reads as a duration (`pause = "{{ params.NAME }}"`).
    pub fn duration_params(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().filter_map(|s| match &s.strategy.kind {
            StrategyKind::Rolling {
                pause: Some(Pause::Param(name)),
                ..
            } => Some(name.as_str()),
            _ => None,
        })
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

/// A name every shell can export: a letter or `_`, then letters, digits and `_`. Names with
/// spaces or dashes are accepted by `execve` but unusable in `export NAME=…` (remote steps) and
/// unreadable as `$NAME`.
pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
