//! Parse + validate: TOML text → [`Runbook`], with every problem reported as a spanned
//! [`Diagnostic`] in one pass. The TOML is read into a spanned value tree (`toml::de::DeTable`)
//! and walked by hand rather than through serde, because serde stops at the first error and
//! knows nothing of "did you mean" suggestions.
//!
//! - [`reader`]: the typed TOML reader (strings, numbers, durations, lists, tables).
//! - [`keys`]: the keys each table takes.
//! - [`expressions`]: templates and Rhai expressions, and their parameter references.
//! - [`sections`]: `[runbook]`, `[params]`, `[defaults]`, `[hooks]`, `[evidence]`, `[drill]`.
//! - [`notify`]: `[notify]`, read alike in runbooks and schedule files.
//! - [`steps`]: `[[steps]]`, their actions (one per step kind), blocks and strategies.
//! - [`references`]: the `params.NAME` and `steps.ID` an expression reads, from Rhai's AST.

mod expressions;
mod keys;
pub mod notify;
pub mod reader;
mod references;
mod sections;
mod steps;
mod targets;

use std::sync::Arc;
use std::time::Duration;

use crate::diagnostic::{Code, Diagnostic, Diagnostics};
use crate::expr::ExprHost;
use crate::retry::RetryPolicy;
use crate::runbook::{default_shell, Hooks, Runbook, DEFAULT_KILL_GRACE};
use crate::source::Source;
use crate::template::Template;

use keys::TOP_KEYS;
use reader::get;
pub use reader::TomlReader;

pub(crate) use references::refs_in;
pub use references::{calls, references, runbook_calls, step_references};
pub use targets::check_targets;

/// Parses and validates a runbook. Returns the runbook whenever its structure could be read —
/// also when there are errors, so that the graph checks can still report theirs in the same
/// pass; callers must not run a runbook whose diagnostics hold errors.
pub fn analyze(source: &Arc<Source>, host: &ExprHost) -> (Option<Runbook>, Diagnostics) {
    let mut analyzer = Analyzer {
        r: TomlReader::new(source.clone()),
        host,
    };
    let runbook = analyzer.runbook();
    let mut diags = analyzer.r.diags;
    diags.sort();
    (runbook, diags)
}

struct Analyzer<'h> {
    r: TomlReader,
    host: &'h ExprHost,
}

/// Defaults that steps inherit.
struct Defaults {
    timeout: Option<Duration>,
    kill_grace: Duration,
    retry: RetryPolicy,
    shell: Vec<String>,
    env: Vec<(String, Template)>,
    cwd: Option<Template>,
    /// `become_password`: sudo's password for the steps that use `sudo`.
    become_password: Option<Template>,
}

impl Defaults {
    /// What steps inherit when the runbook has no `[defaults]`.
    fn builtin() -> Self {
        Self {
            timeout: None,
            kill_grace: DEFAULT_KILL_GRACE,
            retry: RetryPolicy::default(),
            shell: default_shell(),
            env: Vec::new(),
            cwd: None,
            become_password: None,
        }
    }
}

impl Analyzer<'_> {
    fn runbook(&mut self) -> Option<Runbook> {
        let text = self.r.src.text().to_owned();
        let (root, shifted) = self.r.parse(&text)?;
        let bom = shifted.0;
        let root_table = root.get_ref();
        self.r
            .check_keys(root_table, TOP_KEYS, "the top level", &shifted);

        let meta = match get(root_table, "runbook") {
            Some(v) => self.meta(v, &shifted),
            None => {
                let d = Diagnostic::error(Code::MissingKey, "missing `[runbook]` table")
                    .at(
                        &self.r.src,
                        bom..bom,
                        "expected `[runbook]` with at least `name`",
                    )
                    .help("add:\n[runbook]\nname = \"my-runbook\"");
                self.r.push(d);
                None
            }
        };
        let params = get(root_table, "params")
            .map(|v| self.params(v, &shifted))
            .unwrap_or_default();
        let defaults = match get(root_table, "defaults") {
            Some(v) => self.defaults(v, &params, &shifted),
            None => Defaults::builtin(),
        };
        let hooks = match get(root_table, "hooks") {
            Some(v) => self.hooks(v, &params, &shifted),
            None => Hooks::default(),
        };
        let (facts, redact, timestamp_url) = match get(root_table, "evidence") {
            Some(v) => self.evidence(v, &shifted),
            None => (Vec::new(), Vec::new(), None),
        };
        let steps = match get(root_table, "steps") {
            Some(v) => self.steps(v, &defaults, &params, &shifted),
            None => {
                let d = Diagnostic::error(Code::MissingKey, "the runbook has no steps")
                    .at(
                        &self.r.src,
                        bom..bom,
                        "expected at least one `[[steps]]` table",
                    )
                    .help("add:\n[[steps]]\nid = \"hello\"\nrun = \"echo hello\"");
                self.r.push(d);
                Vec::new()
            }
        };
        let drill = get(root_table, "drill").and_then(|v| self.drill(v, &params, &shifted));
        let notify = get(root_table, "notify").and_then(|v| self.notify(v, &shifted));
        let mut meta = meta?;
        meta.facts = facts;
        meta.redact = redact;
        meta.timestamp_url = timestamp_url;
        Some(Runbook {
            source: self.r.src.clone(),
            meta,
            params,
            hooks,
            steps,
            drill,
            notify,
        })
    }
}
