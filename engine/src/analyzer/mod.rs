//! Parse + validate: TOML text → [`Runbook`], with every problem reported as a spanned
//! [`Diagnostic`] in one pass. The TOML is read into a spanned value tree (`toml::de::DeTable`)
//! and walked by hand rather than through serde, because serde stops at the first error and
//! knows nothing of "did you mean" suggestions.
//!
//! - [`reader`]: the typed TOML reader (strings, numbers, durations, lists, tables).
//! - [`keys`]: the keys each table takes.
//! - [`expressions`]: templates and Rhai expressions, and their parameter references.
//! - [`sections`]: `[runbook]`, `[params]`, `[defaults]`, `[hooks]`, `[evidence]`, `[drill]`.
//! - [`steps`]: `[[steps]]`, their actions (one per step kind), blocks and strategies.
//! - [`references`]: the `params.NAME` and `steps.ID` an expression reads, from Rhai's AST.

mod expressions;
mod keys;
mod reader;
mod references;
mod sections;
mod steps;
mod targets;

use std::sync::Arc;
use std::time::Duration;

use toml::de::DeTable;

use crate::diagnostic::{Code, Diagnostic, Diagnostics};
use crate::expr::ExprHost;
use crate::retry::RetryPolicy;
use crate::runbook::{default_shell, Hooks, Runbook, DEFAULT_KILL_GRACE};
use crate::source::{Source, Span};
use crate::template::Template;

use keys::TOP_KEYS;
use reader::{get, ShiftedSpans};

pub(crate) use references::refs_in;
pub use references::{calls, references, runbook_calls, step_references};
pub use targets::check_targets;

/// Parses and validates a runbook. Returns the runbook whenever its structure could be read —
/// also when there are errors, so that the graph checks can still report theirs in the same
/// pass; callers must not run a runbook whose diagnostics hold errors.
pub fn analyze(source: &Arc<Source>, host: &ExprHost) -> (Option<Runbook>, Diagnostics) {
    let mut analyzer = Analyzer {
        src: source.clone(),
        host,
        diags: Diagnostics::default(),
    };
    let runbook = analyzer.runbook();
    let mut diags = analyzer.diags;
    diags.sort();
    (runbook, diags)
}

struct Analyzer<'h> {
    src: Arc<Source>,
    host: &'h ExprHost,
    diags: Diagnostics,
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
    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn error(&mut self, code: Code, span: Span, message: impl Into<String>, label: &str) {
        let d = Diagnostic::error(code, message).at(&self.src, span, label);
        self.push(d);
    }

    fn runbook(&mut self) -> Option<Runbook> {
        let text = self.src.text().to_owned();
        // A UTF-8 byte-order mark is harmless; skip it rather than failing the first key.
        let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let bom = text.len() - body.len();
        let root = match DeTable::parse(body) {
            Ok(root) => root,
            Err(err) => {
                let span = err
                    .span()
                    .map_or(bom..bom, |s| s.start + bom..s.end.max(s.start + 1) + bom);
                let message = err.message().trim().to_owned();
                let first = message.lines().next().unwrap_or("invalid TOML").to_owned();
                let mut d = Diagnostic::error(Code::TomlSyntax, format!("invalid TOML: {first}"))
                    .at(&self.src, span, first);
                for extra in message.lines().skip(1).filter(|l| !l.trim().is_empty()) {
                    d = d.note(extra.trim().to_owned());
                }
                self.push(d);
                return None;
            }
        };
        let root_table = root.get_ref();
        // Spans from the parser are relative to `body`; shift them past the BOM.
        let shifted = ShiftedSpans(bom);
        self.check_keys(root_table, TOP_KEYS, "the top level", &shifted);

        let meta = match get(root_table, "runbook") {
            Some(v) => self.meta(v, &shifted),
            None => {
                let d = Diagnostic::error(Code::MissingKey, "missing `[runbook]` table")
                    .at(
                        &self.src,
                        bom..bom,
                        "expected `[runbook]` with at least `name`",
                    )
                    .help("add:\n[runbook]\nname = \"my-runbook\"");
                self.push(d);
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
                        &self.src,
                        bom..bom,
                        "expected at least one `[[steps]]` table",
                    )
                    .help("add:\n[[steps]]\nid = \"hello\"\nrun = \"echo hello\"");
                self.push(d);
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
            source: self.src.clone(),
            meta,
            params,
            hooks,
            steps,
            drill,
            notify,
        })
    }
}
