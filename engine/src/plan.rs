//! Planning: a compiled graph + bound parameters + the operator's selection (`--only`,
//! `--skip`, `--from`) → the [`Plan`] the executor runs and `runbook plan` prints.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use rhai::Scope;

use crate::diagnostic::suggest;
use crate::expr::{json_to_dynamic, ExprHost};
use crate::graph::{StepGraph, StepIdx};
use crate::inventory::Inventory;
use crate::params::BoundParams;
use crate::redact::Redactor;
use crate::runbook::{Action, Runbook};

/// A step kind's settings as one line, templates unrendered (`{url = "…", port = 22}`).
fn spec_text(spec: &crate::runbook::Spec) -> String {
    use crate::runbook::Spec;
    match spec {
        Spec::Template(t) => format!("{:?}", t.raw()),
        Spec::Value(v) => v.to_string(),
        Spec::Array(items) => format!(
            "[{}]",
            items.iter().map(spec_text).collect::<Vec<_>>().join(", ")
        ),
        Spec::Table(entries) => format!(
            "{{ {} }}",
            entries
                .iter()
                .map(|(k, v)| format!("{k} = {}", spec_text(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Host attempts at once when `--forks` is not given (Ansible's default is 5; SSH to many
/// hosts is I/O-bound, so runbook goes wider).
pub const DEFAULT_FORKS: usize = 50;

/// Which steps the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Run only these steps; their needs are taken as already done.
    pub only: Vec<String>,
    /// Leave these steps out; steps that need them do not wait for them.
    pub skip: Vec<String>,
    /// Run this step and everything that (transitively) needs it.
    pub from: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no step `{id}` in this runbook (given to `{flag}`){}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownStep {
        flag: &'static str,
        id: String,
        suggestion: Option<String>,
    },
}

/// Run identity and start time, visible to expressions as `run`.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub id: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
}

impl RunInfo {
    /// A fresh run: 8 random hex digits, unique enough beside the timestamp in bundle names.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 4];
        // Without randomness fall back to the clock: still unique per process start.
        if getrandom::fill(&mut bytes).is_err() {
            bytes = chrono::Utc::now().timestamp_subsec_nanos().to_le_bytes();
        }
        Self {
            id: bytes.iter().map(|b| format!("{b:02x}")).collect(),
            started_at: chrono::Utc::now(),
        }
    }
}

#[derive(Debug)]
pub struct Plan {
    pub runbook: Arc<Runbook>,
    pub graph: StepGraph,
    pub params: BoundParams,
    /// `selected[i]`: whether step i runs in this plan.
    pub selected: Vec<bool>,
    /// Where steps run when they name no `cwd`, and what relative `cwd`s resolve against.
    pub workdir: PathBuf,
    /// The secret params, for what the plan shows (`runbook plan`); a run's [`RunState`]
    /// adds the secrets registered while it runs.
    ///
    /// [`RunState`]: crate::run_state::RunState
    redactor: Redactor,
    /// `env` as expressions see it: only the variables `[runbook] allow_env` lists.
    pub env: serde_json::Value,
    /// Per step: the steps its expressions read (`steps.<id>`).
    pub step_refs: Vec<Vec<StepIdx>>,
    /// The steps the run-wide step hooks read.
    pub hook_refs: Vec<StepIdx>,
    /// What an earlier, interrupted run of this plan already did (`runbook resume`).
    pub prior: Vec<PriorStep>,
    /// Set when this plan continues an earlier run: the status it ended in and who resumes.
    pub resume_of: Option<(crate::event::RunStatus, String)>,
    /// Steps whose `approve` question was answered yes in advance (`--approve STEP`), by whom.
    pub approved: Vec<(String, String)>,
    /// On resume with `--only`/`--from`: selected steps run again even if they succeeded.
    pub rerun_selected: bool,
    /// The hosts remote steps run on, as loaded (and, on resume, as an earlier run grew them);
    /// a run's [`RunState`](crate::run_state::RunState) grows its own copy.
    inventory: Arc<Inventory>,
    /// At most this many host attempts at once, over all steps (`--forks`).
    pub forks: usize,
    /// `--dry-run`: only `plan` commands run; every other step is reported, not run.
    pub dry_run: bool,
}

/// A step as an earlier run of the same bundle left it.
#[derive(Debug, Clone, Default)]
pub struct PriorStep {
    /// Attempts already made; new attempts are numbered after them.
    pub attempts: u32,
    /// Set when the step succeeded and can be taken as done.
    pub result: Option<PriorResult>,
    /// For a step on hosts that did not finish (or failed): the hosts that finished their
    /// part with success, with their attempts. They are not run again.
    pub done_targets: Vec<(String, u32)>,
    /// The highest attempt recorded per target (`host`, or `host/sub-step` in a block), so
    /// that attempts made again are numbered after them and never overwrite their logs.
    pub target_attempts: std::collections::HashMap<String, u32>,
}

/// What downstream expressions need of an earlier success.
#[derive(Debug, Clone, Default)]
pub struct PriorResult {
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub json: Option<serde_json::Value>,
    pub outputs: Option<serde_json::Value>,
    pub duration: f64,
}

impl Plan {
    /// Whether any step this run will run matches `pred`.
    pub fn any_selected(&self, pred: impl Fn(&crate::runbook::StepSpec) -> bool) -> bool {
        self.runbook
            .steps
            .iter()
            .zip(&self.selected)
            .any(|(s, &selected)| selected && pred(s))
    }

    pub fn new(
        runbook: Arc<Runbook>,
        graph: StepGraph,
        params: BoundParams,
        selection: &Selection,
        workdir: PathBuf,
    ) -> Result<Self, PlanError> {
        let n = runbook.steps.len();
        let find = |flag: &'static str, id: &str| -> Result<StepIdx, PlanError> {
            runbook
                .steps
                .iter()
                .position(|s| s.id.as_str() == id)
                .ok_or_else(|| PlanError::UnknownStep {
                    flag,
                    id: id.to_owned(),
                    suggestion: suggest(id, runbook.steps.iter().map(|s| s.id.as_str()))
                        .map(String::from),
                })
        };
        let mut selected = vec![true; n];
        if let Some(from) = &selection.from {
            selected = graph.descendants(find("--from", from)?);
        }
        if !selection.only.is_empty() {
            let mut only = vec![false; n];
            for id in &selection.only {
                only[find("--only", id)?] = true;
            }
            for (s, o) in selected.iter_mut().zip(only) {
                *s = *s && o;
            }
        }
        for id in &selection.skip {
            selected[find("--skip", id)?] = false;
        }
        let redactor = Redactor::new(params.secrets());
        let env = serde_json::Value::Object(
            runbook
                .meta
                .allow_env
                .iter()
                .filter_map(|name| std::env::var(name).ok().map(|v| (name.clone(), v.into())))
                .collect(),
        );
        let index: HashMap<&str, StepIdx> = runbook
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let step_refs = runbook
            .steps
            .iter()
            .map(|s| {
                let mut refs: Vec<StepIdx> = s
                    .refs
                    .iter()
                    .filter_map(|r| index.get(r.id.as_str()).copied())
                    .collect();
                refs.sort_unstable();
                refs.dedup();
                refs
            })
            .collect();
        let hooks = &runbook.hooks;
        let mut hook_refs: Vec<StepIdx> =
            [&hooks.before_step, &hooks.after_step, &hooks.on_failure]
                .into_iter()
                .flatten()
                .flat_map(|h| crate::analyzer::step_references(&h.expr.text))
                .filter_map(|(id, _)| index.get(id.as_str()).copied())
                .collect();
        hook_refs.sort_unstable();
        hook_refs.dedup();
        let n = runbook.steps.len();
        let runbook_dir = runbook.base_dir();
        Ok(Self {
            runbook,
            graph,
            params,
            selected,
            workdir,
            redactor,
            env,
            step_refs,
            hook_refs,
            prior: vec![PriorStep::default(); n],
            resume_of: None,
            approved: Vec::new(),
            rerun_selected: false,
            inventory: Arc::new(Inventory::empty(&runbook_dir)),
            forks: DEFAULT_FORKS,
            dry_run: false,
        })
    }

    /// The inventory the plan starts from.
    pub fn inventory(&self) -> Arc<Inventory> {
        self.inventory.clone()
    }

    /// Replaces the inventory (the CLI sets the one it loaded).
    pub fn set_inventory(&mut self, inventory: Inventory) {
        self.inventory = Arc::new(inventory);
    }

    /// Adds hosts an earlier run added with `inventory.add_host` (resume); each error says
    /// which host and why.
    pub fn add_hosts(&mut self, hosts: &[crate::inventory::NewHost]) -> Vec<String> {
        let inv = Arc::make_mut(&mut self.inventory);
        hosts
            .iter()
            .filter_map(|h| inv.add_host(h).err().map(|e| e.to_string()))
            .collect()
    }

    /// Redacts the secret params (what `runbook plan` shows).
    pub fn redact(&self, text: &str) -> String {
        self.redactor.redact_str(text)
    }

    /// The scope every expression starts from: `params`, `run` and `env`. The executor adds
    /// `steps` with the results an expression may read.
    pub fn scope(&self, run: &RunInfo) -> Scope<'static> {
        let mut scope = Scope::new();
        scope.push_constant("params", json_to_dynamic(&self.params.to_json(false)));
        scope.push_constant("env", json_to_dynamic(&self.env));
        scope.push_constant(
            "run",
            json_to_dynamic(&serde_json::json!({
                "id": run.id,
                "runbook": self.runbook.meta.name,
                "started_at": run.started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            })),
        );
        scope.push_constant("evidence", crate::expr::EvidenceApi);
        scope.push_constant("drill", crate::expr::DrillApi);
        scope.push_constant("inventory", crate::expr::InventoryApi(self.inventory()));
        scope
    }

    /// `runbook plan`: the steps level by level with their resolved commands (secrets shown as
    /// `[REDACTED:name]`). Expressions that fail now (they may need results of earlier steps)
    /// are shown unrendered.
    pub fn to_text(&self, host: &ExprHost, run: &RunInfo) -> String {
        let rb = &self.runbook;
        let mut out = String::new();
        let title = rb.meta.title.as_deref().unwrap_or(&rb.meta.name);
        let _ = writeln!(out, "runbook {} — {title}", rb.meta.name);
        if !self.params.0.is_empty() {
            let _ = writeln!(out, "params:");
            for p in &self.params.0 {
                let v = if p.secret {
                    crate::redact::placeholder(&p.name)
                } else {
                    p.value.to_string()
                };
                let _ = writeln!(out, "  {} = {v}", p.name);
            }
        }
        let mut scope = self.scope(run);
        scope.push_constant("steps", rhai::Map::new());
        for (n, level) in self.graph.levels().iter().enumerate() {
            let _ = writeln!(out, "level {n}:");
            for &i in level {
                let step = &rb.steps[i];
                let mut flags = Vec::new();
                if !self.selected[i] {
                    flags.push("not selected".to_owned());
                }
                if let Some(p) = &step.phase {
                    flags.push(format!("phase {p}"));
                }
                if step.retry.attempts > 1 {
                    flags.push(format!("{} attempts", step.retry.attempts));
                }
                if let Some(t) = step.timeout {
                    flags.push(format!("timeout {}", crate::duration::format_spec(t)));
                }
                if step.always {
                    flags.push("always".into());
                }
                if step.continue_on_failure {
                    flags.push("continue on failure".into());
                }
                if step.run_on_cancel {
                    flags.push("runs on cancel".into());
                }
                if step.approve.is_some() {
                    flags.push("needs approval".into());
                }
                let needs: Vec<&str> = step.needs.iter().map(|n| n.id.as_str()).collect();
                let _ = write!(out, "  {}", step.id);
                if !needs.is_empty() {
                    let _ = write!(out, " (needs {})", needs.join(", "));
                }
                if !flags.is_empty() {
                    let _ = write!(out, " [{}]", flags.join(", "));
                }
                out.push('\n');
                if let Some(when) = &step.when {
                    let _ = writeln!(out, "      when {}", when.expr.text.trim());
                }
                if let Some((selector, _)) = &step.on {
                    let inv = self.inventory();
                    let hosts = match inv.select(selector) {
                        Ok(h) if h.is_empty() => {
                            "no host yet (hosts added at run time?)".to_owned()
                        }
                        Ok(h) => h
                            .iter()
                            .map(|h| h.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        Err(e) => format!("unresolved: {e}"),
                    };
                    let strategy = match &step.strategy.kind {
                        crate::runbook::StrategyKind::Parallel { limit: Some(n) } => {
                            format!("parallel {n}")
                        }
                        crate::runbook::StrategyKind::Parallel { limit: None } => {
                            "parallel".to_owned()
                        }
                        crate::runbook::StrategyKind::Rolling {
                            batches,
                            pause,
                            gate,
                            gate_before_first,
                        } => {
                            let sizes: Vec<String> =
                                batches.iter().map(ToString::to_string).collect();
                            let mut s = format!("rolling [{}]", sizes.join(", "));
                            match pause {
                                Some(crate::runbook::Pause::Fixed(p)) => {
                                    let _ =
                                        write!(s, ", pause {}", crate::duration::format_spec(*p));
                                }
                                Some(p @ crate::runbook::Pause::Param(name)) => {
                                    let _ = match p.resolve(&self.params) {
                                        Some(d) => write!(
                                            s,
                                            ", pause {} (params.{name})",
                                            crate::duration::format_spec(d)
                                        ),
                                        None => write!(s, ", pause params.{name}"),
                                    };
                                }
                                None => {}
                            }
                            if gate.is_some() && *gate_before_first {
                                s.push_str(", gated before the first batch and between batches");
                            } else if gate.is_some() {
                                s.push_str(", gated");
                            }
                            s
                        }
                    };
                    let _ = writeln!(
                        out,
                        "      on {selector} → {hosts} ({strategy}, max_failures {})",
                        step.strategy.max_failures
                    );
                }
                if let Some(p) = &step.plan {
                    let _ = writeln!(out, "      dry-run: $ {}", self.redact(p.raw()));
                }
                match &step.action {
                    Action::Run { command } => {
                        let text = command
                            .render(host, &mut scope)
                            .unwrap_or_else(|_| command.raw().to_owned());
                        for line in self.redact(&text).lines() {
                            let _ = writeln!(out, "      $ {line}");
                        }
                    }
                    Action::Script { script } => {
                        for line in script.expr.text.trim().lines() {
                            let _ = writeln!(out, "      rhai> {line}");
                        }
                    }
                    Action::Request { kind, spec } => {
                        let _ = writeln!(
                            out,
                            "      {} {}",
                            kind.key(),
                            self.redact(&spec_text(spec))
                        );
                    }
                    Action::Block { steps } => {
                        for sub in steps {
                            let what = match &sub.action {
                                Action::Run { command } => {
                                    format!("$ {}", self.redact(command.raw()))
                                }
                                Action::Script { .. } => "rhai script".to_owned(),
                                Action::Request { kind, spec } => {
                                    format!("{} {}", kind.key(), self.redact(&spec_text(spec)))
                                }
                                Action::Block { .. } => String::new(),
                            };
                            let mut flags = Vec::new();
                            if sub.local {
                                flags.push("local");
                            }
                            if sub.sudo {
                                flags.push(if sub.become_password.is_some() {
                                    "sudo with password"
                                } else {
                                    "sudo"
                                });
                            }
                            if sub.always {
                                flags.push("always");
                            }
                            let flags = if flags.is_empty() {
                                String::new()
                            } else {
                                format!(" [{}]", flags.join(", "))
                            };
                            let _ = writeln!(out, "      - {}{flags}: {what}", sub.id);
                        }
                    }
                }
                if let Some(until) = &step.until {
                    let _ = writeln!(out, "      until {}", until.expr.text.trim());
                }
                if let Some(check) = &step.check {
                    let _ = writeln!(out, "      check {}", check.expr.text.trim());
                }
            }
        }
        out
    }
}
