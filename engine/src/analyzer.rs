//! Parse + validate: TOML text → [`Runbook`], with every problem reported as a spanned
//! [`Diagnostic`] in one pass. The TOML is read into a spanned value tree (`toml::de::DeTable`)
//! and walked by hand rather than through serde, because serde stops at the first error and
//! knows nothing of "did you mean" suggestions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

use crate::diagnostic::{suggest, Code, Diagnostic, Diagnostics};
use crate::duration::parse_duration;
use crate::expr::{Context, ExprHost};
use crate::inventory::Selector;
use crate::retry::{Backoff, RetryPolicy};
use crate::runbook::{
    default_shell, Action, Budget, Capture, DrillSpec, Gate, Hooks, Located, Meta, Need, ParamSpec,
    RequestKind, Runbook, SpannedExpr, Spec, StepId, StepSpec, Strategy, StrategyKind,
    DEFAULT_KILL_GRACE,
};
use crate::source::{Source, Span};
use crate::template::Template;

type Value<'i> = Spanned<DeValue<'i>>;

const TOP_KEYS: &[&str] = &[
    "runbook", "params", "defaults", "hooks", "evidence", "steps", "drill", "notify",
];
const DRILL_KEYS: &[&str] = &[
    "rto",
    "rpo",
    "clock_start",
    "clock_stop",
    "restored_data_time",
];
const STRATEGY_KEYS: &[&str] = &["parallel", "rolling", "max_failures", "pause", "gate"];
/// Keys a sub-step of a block takes: no `needs`, `on` or nested blocks of its own.
const BLOCK_STEP_KEYS: &[&str] = &[
    "id",
    "title",
    "description",
    "run",
    "env",
    "cwd",
    "shell",
    "timeout",
    "kill_grace",
    "retry",
    "continue_on_failure",
    "always",
    "script",
    "when",
    "until",
    "check",
    "outputs",
    "capture",
    "before",
    "after",
    "sudo",
    "pty",
    "local",
    "http",
    "tcp",
    "screenshot",
    "upload",
    "plan",
];
const EVIDENCE_KEYS: &[&str] = &["facts", "redact"];
const RUNBOOK_KEYS: &[&str] = &[
    "name",
    "title",
    "description",
    "refs",
    "evidence_dir",
    "allow_env",
    "inventory",
];
const HOOK_KEYS: &[&str] = &[
    "before_run",
    "after_run",
    "before_step",
    "after_step",
    "on_failure",
];
const PARAM_KEYS: &[&str] = &["default", "doc", "secret", "env", "required"];
const DEFAULT_KEYS: &[&str] = &["timeout", "retry", "shell", "env", "cwd", "kill_grace"];
/// Durations that limit something, where zero can only be a mistake.
const NONZERO_DURATIONS: &[&str] = &["timeout", "deadline", "max_delay", "rto", "rpo"];
const RETRY_KEYS: &[&str] = &[
    "attempts",
    "backoff",
    "delay",
    "max_delay",
    "factor",
    "jitter",
    "deadline",
];
const STEP_KEYS: &[&str] = &[
    "id",
    "title",
    "description",
    "phase",
    "needs",
    "run",
    "env",
    "cwd",
    "shell",
    "timeout",
    "kill_grace",
    "retry",
    "continue_on_failure",
    "always",
    "collect",
    "script",
    "when",
    "until",
    "check",
    "outputs",
    "capture",
    "before",
    "after",
    "run_on_cancel",
    "approve",
    "on",
    "strategy",
    "steps",
    "sudo",
    "pty",
    "http",
    "tcp",
    "screenshot",
    "upload",
    "plan",
];

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
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn get<'a, 'i>(table: &'a DeTable<'i>, key: &str) -> Option<&'a Value<'i>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| v)
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
            None => Defaults {
                timeout: None,
                kill_grace: DEFAULT_KILL_GRACE,
                retry: RetryPolicy::default(),
                shell: default_shell(),
                env: Vec::new(),
                cwd: None,
            },
        };
        let hooks = match get(root_table, "hooks") {
            Some(v) => self.hooks(v, &params, &shifted),
            None => Hooks::default(),
        };
        let mut redact = Vec::new();
        let facts = match get(root_table, "evidence") {
            Some(v) => match self.table(v, "evidence", &shifted) {
                Some(t) => {
                    self.check_keys(t, EVIDENCE_KEYS, "`[evidence]`", &shifted);
                    for (re, span) in get(t, "redact")
                        .and_then(|f| self.string_list(f, "redact", &shifted))
                        .unwrap_or_default()
                    {
                        match regex::bytes::Regex::new(&re) {
                            Ok(_) => redact.push(re),
                            Err(e) => {
                                let first =
                                    e.to_string().lines().last().unwrap_or("").trim().to_owned();
                                self.error(
                                    Code::BadValue,
                                    span,
                                    format!("`redact` pattern is not a valid regular expression: {first}"),
                                    "invalid regular expression",
                                );
                            }
                        }
                    }
                    get(t, "facts")
                        .and_then(|f| self.string_list(f, "facts", &shifted))
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(f, _)| f)
                        .collect()
                }
                None => Vec::new(),
            },
            None => Vec::new(),
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
        let notify = get(root_table, "notify").and_then(|v| {
            self.table(v, "notify", &shifted)?;
            Some((self.json(v, &shifted)?, shifted.span(v.span())))
        });
        let mut meta = meta?;
        meta.facts = facts;
        meta.redact = redact;
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

    fn check_keys(&mut self, table: &DeTable<'_>, allowed: &[&str], what: &str, s: &ShiftedSpans) {
        for (key, _) in table.iter() {
            let name = key.get_ref().as_ref();
            if allowed.contains(&name) {
                continue;
            }
            let mut d = Diagnostic::error(
                Code::UnknownKey,
                format!("unknown key `{name}` in {what}"),
            )
            .at(&self.src, s.span(key.span()), "unknown key");
            d = match suggest(name, allowed.iter().copied()) {
                Some(near) => d.help(format!("did you mean `{near}`?")),
                None => d.help(format!("valid keys here: {}", list(allowed))),
            };
            self.push(d);
        }
    }

    fn wrong_type(&mut self, v: &Value<'_>, key: &str, expected: &str, s: &ShiftedSpans) {
        let found = type_name(v.get_ref());
        self.error(
            Code::WrongType,
            s.span(v.span()),
            format!("`{key}` must be {expected}, found {found}"),
            &format!("expected {expected}"),
        );
    }

    fn table<'a, 'i>(
        &mut self,
        v: &'a Value<'i>,
        key: &str,
        s: &ShiftedSpans,
    ) -> Option<&'a DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.wrong_type(v, key, "a table", s);
                None
            }
        }
    }

    fn string(&mut self, v: &Value<'_>, key: &str, s: &ShiftedSpans) -> Option<(String, Span)> {
        match v.get_ref() {
            DeValue::String(text) => Some((text.to_string(), s.span(v.span()))),
            _ => {
                self.wrong_type(v, key, "a string", s);
                None
            }
        }
    }

    fn opt_string(&mut self, t: &DeTable<'_>, key: &str, s: &ShiftedSpans) -> Option<String> {
        get(t, key)
            .and_then(|v| self.string(v, key, s))
            .map(|(text, _)| text)
    }

    fn boolean(&mut self, t: &DeTable<'_>, key: &str, s: &ShiftedSpans) -> Option<bool> {
        let v = get(t, key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(v, key, "`true` or `false`", s);
                None
            }
        }
    }

    fn integer(&mut self, v: &Value<'_>, key: &str, s: &ShiftedSpans) -> Option<i64> {
        match v.get_ref() {
            DeValue::Integer(i) => {
                let parsed = i64::from_str_radix(i.as_str(), i.radix()).ok();
                if parsed.is_none() {
                    self.error(
                        Code::BadValue,
                        s.span(v.span()),
                        format!("`{key}` is out of range"),
                        "too large",
                    );
                }
                parsed
            }
            _ => {
                self.wrong_type(v, key, "an integer", s);
                None
            }
        }
    }

    fn float(&mut self, v: &Value<'_>, key: &str, s: &ShiftedSpans) -> Option<f64> {
        match v.get_ref() {
            DeValue::Float(f) => f.as_str().parse().ok(),
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .map(|i| i as f64),
            _ => {
                self.wrong_type(v, key, "a number", s);
                None
            }
        }
    }

    fn duration(&mut self, v: &Value<'_>, key: &str, s: &ShiftedSpans) -> Option<Duration> {
        match v.get_ref() {
            DeValue::String(text) => match parse_duration(text) {
                // A zero limit would fail every attempt (or every drill) at once.
                Ok(d) if d.is_zero() && NONZERO_DURATIONS.contains(&key) => {
                    let d = Diagnostic::error(
                        Code::BadDuration,
                        format!("`{key}` must be more than zero"),
                    )
                    .at(&self.src, s.span(v.span()), "zero")
                    .help(format!("leave `{key}` out for no limit"));
                    self.push(d);
                    None
                }
                Ok(d) => Some(d),
                Err(why) => {
                    let d = Diagnostic::error(
                        Code::BadDuration,
                        format!("invalid duration for `{key}`: {why}"),
                    )
                    .at(
                        &self.src,
                        s.span(v.span()),
                        "expected a duration like `90s`, `10m` or `1h30m`",
                    );
                    self.push(d);
                    None
                }
            },
            DeValue::Integer(i) => {
                let n = i.as_str().trim_start_matches(['+', '-']);
                let d = Diagnostic::error(
                    Code::BadDuration,
                    format!(
                        "`{key}` must be a duration string, found the number {}",
                        i.as_str()
                    ),
                )
                .at(&self.src, s.span(v.span()), "a bare number has no unit")
                .help(if i.as_str().starts_with('-') {
                    format!("a duration cannot be negative: write `{key} = \"{n}s\"` for seconds")
                } else {
                    format!("write `{key} = \"{n}s\"` for seconds")
                });
                self.push(d);
                None
            }
            _ => {
                self.wrong_type(v, key, "a duration string like `90s`", s);
                None
            }
        }
    }

    fn string_list(
        &mut self,
        v: &Value<'_>,
        key: &str,
        s: &ShiftedSpans,
    ) -> Option<Vec<(String, Span)>> {
        match v.get_ref() {
            DeValue::Array(items) => Some(
                items
                    .iter()
                    .filter_map(|item| self.string(item, key, s))
                    .collect(),
            ),
            DeValue::String(text) => {
                let d = Diagnostic::error(
                    Code::WrongType,
                    format!("`{key}` must be a list of strings, found a string"),
                )
                .at(&self.src, s.span(v.span()), "expected a list")
                .help(format!("write `{key} = [\"{text}\"]`"));
                self.push(d);
                None
            }
            _ => {
                self.wrong_type(v, key, "a list of strings", s);
                None
            }
        }
    }

    fn template(
        &mut self,
        v: &Value<'_>,
        key: &str,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<Template> {
        let (text, span) = self.string(v, key, s)?;
        // No command, argument, variable or path can carry a NUL byte: execve would refuse.
        if text.contains('\0') {
            self.error(
                Code::BadValue,
                span,
                format!("`{key}` contains a NUL byte"),
                "no command, variable or path can hold one",
            );
            return None;
        }
        if key == "cwd" && text.trim().is_empty() {
            self.error(
                Code::BadValue,
                span,
                "`cwd` is empty",
                "a directory, or leave `cwd` out for the runbook's directory",
            );
            return None;
        }
        self.template_text(&text, span, params)
    }

    fn locate(&self, text: &str, span: Span) -> Located {
        let origin = string_origin(self.src.slice(&span), text).map(|o| span.start + o);
        Located { span, origin }
    }

    /// Reports `params.NAME` references to undeclared parameters in one expression.
    fn check_param_refs(&mut self, code: &str, offset: usize, at: &Located, params: &[ParamSpec]) {
        for (name, at_name) in references(code, "params") {
            if !params.iter().any(|p| p.name == name) {
                // Exact when the string holds its text verbatim; the whole string otherwise.
                let here = match at.origin {
                    Some(_) => {
                        let start = at.at(offset + at_name).start;
                        start..start + "params.".len() + name.len()
                    }
                    None => at.span.clone(),
                };
                let mut d =
                    Diagnostic::error(Code::UnknownParam, format!("unknown parameter `{name}`"))
                        .at(&self.src, here, "not declared under `[params]`");
                if let Some(near) = suggest(&name, params.iter().map(|p| p.name.as_str())) {
                    d = d.help(format!("did you mean `params.{near}`?"));
                } else {
                    d = d.help(format!(
                        "declare it:\n[params]\n{name} = {{ default = \"…\" }}"
                    ));
                }
                self.push(d);
            }
        }
    }

    /// Parses a template whose text is `text` and whose TOML string token is at `span`.
    fn template_text(&mut self, text: &str, span: Span, params: &[ParamSpec]) -> Option<Template> {
        let at = self.locate(text, span);
        match Template::parse(text, self.host, Context::Step) {
            Ok(mut t) => {
                let exprs: Vec<(String, usize)> =
                    t.expressions().map(|(e, o)| (e.text.clone(), o)).collect();
                for (code, offset) in exprs {
                    self.check_param_refs(&code, offset, &at, params);
                }
                t.at = Some(at);
                Some(t)
            }
            Err(e) => {
                let mut d = Diagnostic::error(
                    Code::TemplateSyntax,
                    format!("template does not parse: {}", e.message),
                )
                .at(&self.src, at.at(e.offset), e.message.clone())
                .help("`{{ expr }}` holds a Rhai expression; write a literal `{{` as `\\{{`");
                if e.message.contains("Undefined variable") {
                    d = d.note(format!("templates can use: {}", Context::Step.describe()));
                }
                self.push(d);
                None
            }
        }
    }

    /// A Rhai expression (or, with `script`, statements) written as a TOML string.
    fn expression(
        &mut self,
        v: &Value<'_>,
        key: &str,
        context: Context,
        script: bool,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<SpannedExpr> {
        let (text, span) = self.string(v, key, s)?;
        let at = self.locate(&text, span);
        let compiled = if script {
            self.host.compile_script(&text, context)
        } else {
            self.host.compile_expression(&text, context)
        };
        match compiled {
            Ok(expr) => {
                self.check_param_refs(&text, 0, &at, params);
                Some(SpannedExpr { expr, at })
            }
            Err(e) => {
                let offset = Located::offset_of(&text, e.line, e.column);
                let mut d = Diagnostic::error(
                    Code::TemplateSyntax,
                    format!("`{key}` does not parse: {}", e.message),
                )
                .at(&self.src, at.at(offset), e.message.clone());
                if e.message.contains("Undefined variable") {
                    d = d.help(format!("`{key}` can use: {}", context.describe()));
                }
                self.push(d);
                None
            }
        }
    }

    fn hooks(&mut self, v: &Value<'_>, params: &[ParamSpec], s: &ShiftedSpans) -> Hooks {
        let mut hooks = Hooks::default();
        let Some(t) = self.table(v, "hooks", s) else {
            return hooks;
        };
        self.check_keys(t, HOOK_KEYS, "`[hooks]`", s);
        let mut hook = |name: &str, context: Context| {
            get(t, name).and_then(|hv| self.expression(hv, name, context, true, params, s))
        };
        hooks.before_run = hook("before_run", Context::RunHook);
        hooks.after_run = hook("after_run", Context::RunHook);
        hooks.before_step = hook("before_step", Context::StepHook);
        hooks.after_step = hook("after_step", Context::StepHook);
        hooks.on_failure = hook("on_failure", Context::StepHook);
        hooks
    }

    fn meta(&mut self, v: &Value<'_>, s: &ShiftedSpans) -> Option<Meta> {
        let t = self.table(v, "runbook", s)?;
        self.check_keys(t, RUNBOOK_KEYS, "`[runbook]`", s);
        let name = match get(t, "name") {
            Some(nv) => {
                let (name, span) = self.string(nv, "name", s)?;
                if !StepId::is_valid(&name) {
                    self.error(
                        Code::BadId,
                        span,
                        format!("runbook name `{name}` is not a valid name"),
                        "use letters, digits, `-`, `_` and `.`",
                    );
                }
                name
            }
            None => {
                self.error(
                    Code::MissingKey,
                    s.span(v.span()),
                    "`[runbook]` has no `name`",
                    "add `name = \"…\"`",
                );
                return None;
            }
        };
        let refs = get(t, "refs")
            .and_then(|v| self.string_list(v, "refs", s))
            .unwrap_or_default()
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        Some(Meta {
            name,
            title: self.opt_string(t, "title", s),
            description: self.opt_string(t, "description", s),
            refs,
            evidence_dir: self.opt_string(t, "evidence_dir", s).map(PathBuf::from),
            allow_env: get(t, "allow_env")
                .and_then(|v| self.string_list(v, "allow_env", s))
                .unwrap_or_default()
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
            facts: Vec::new(),
            redact: Vec::new(),
            inventory: get(t, "inventory")
                .and_then(|v| self.string(v, "inventory", s))
                .map(|(text, span)| (PathBuf::from(text), span)),
        })
    }

    fn params(&mut self, v: &Value<'_>, s: &ShiftedSpans) -> Vec<ParamSpec> {
        let Some(t) = self.table(v, "params", s) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, value) in t.iter() {
            let name = key.get_ref().to_string();
            let span = s.span(key.span());
            if !is_identifier(&name) {
                self.error(
                    Code::BadId,
                    span.clone(),
                    format!("parameter name `{name}` is not an identifier"),
                    "use letters, digits and `_`, starting with a letter",
                );
                continue;
            }
            let spec = match value.get_ref() {
                DeValue::Table(pt) => {
                    self.check_keys(pt, PARAM_KEYS, &format!("parameter `{name}`"), s);
                    let default = get(pt, "default").and_then(|d| self.json(d, s));
                    let secret = self.boolean(pt, "secret", s).unwrap_or(false);
                    // The runbook is copied verbatim into every bundle: a secret written here
                    // is in all of them. An empty default (an optional secret) is fine.
                    let written = default.as_ref().is_some_and(
                        |d| !matches!(d, serde_json::Value::String(t) if t.is_empty()),
                    );
                    if let (true, true, Some(dv)) = (secret, written, get(pt, "default")) {
                        // Located in the message, without a snippet: the line holds the
                        // secret, and this warning may end up in a CI log.
                        let lc = self.src.line_col(s.span(dv.span()).start);
                        self.push(
                            Diagnostic::warning(
                                Code::BadValue,
                                format!(
                                    "{}:{}:{}: secret parameter `{name}` has its value in the runbook, which is copied into every evidence bundle",
                                    self.src.path().display(),
                                    lc.line,
                                    lc.column
                                ),
                            )
                            .help("give it with `env = \"VAR\"` or `--set` at run time, and leave `default` out (or `\"\"` for an optional secret)"),
                        );
                    }
                    ParamSpec {
                        name,
                        span,
                        default,
                        doc: self.opt_string(pt, "doc", s),
                        secret,
                        env: self.opt_string(pt, "env", s),
                        required: self.boolean(pt, "required", s).unwrap_or(false),
                    }
                }
                // `name = value` is shorthand for `name = { default = value }`.
                _ => ParamSpec {
                    name,
                    span,
                    default: self.json(value, s),
                    doc: None,
                    secret: false,
                    env: None,
                    required: false,
                },
            };
            out.push(spec);
        }
        out
    }

    fn json(&mut self, v: &Value<'_>, s: &ShiftedSpans) -> Option<serde_json::Value> {
        use serde_json::Value as J;
        Some(match v.get_ref() {
            DeValue::String(text) => J::String(text.to_string()),
            DeValue::Integer(_) => J::from(self.integer(v, "default", s)?),
            DeValue::Float(_) => J::from(self.float(v, "default", s)?),
            DeValue::Boolean(b) => J::Bool(*b),
            DeValue::Datetime(d) => J::String(d.to_string()),
            DeValue::Array(items) => {
                J::Array(items.iter().filter_map(|i| self.json(i, s)).collect())
            }
            DeValue::Table(t) => J::Object(
                t.iter()
                    .filter_map(|(k, v)| Some((k.get_ref().to_string(), self.json(v, s)?)))
                    .collect(),
            ),
        })
    }

    fn defaults(&mut self, v: &Value<'_>, params: &[ParamSpec], s: &ShiftedSpans) -> Defaults {
        let mut d = Defaults {
            timeout: None,
            kill_grace: DEFAULT_KILL_GRACE,
            retry: RetryPolicy::default(),
            shell: default_shell(),
            env: Vec::new(),
            cwd: None,
        };
        let Some(t) = self.table(v, "defaults", s) else {
            return d;
        };
        self.check_keys(t, DEFAULT_KEYS, "`[defaults]`", s);
        if let Some(v) = get(t, "timeout") {
            d.timeout = self.duration(v, "timeout", s);
        }
        if let Some(v) = get(t, "kill_grace") {
            d.kill_grace = self
                .duration(v, "kill_grace", s)
                .unwrap_or(DEFAULT_KILL_GRACE);
        }
        if let Some(v) = get(t, "retry") {
            d.retry = self.retry(v, RetryPolicy::default(), s);
        }
        if let Some(v) = get(t, "shell") {
            d.shell = self.shell(v, s).unwrap_or_else(default_shell);
        }
        if let Some(v) = get(t, "env") {
            d.env = self.env(v, params, s);
        }
        if let Some(v) = get(t, "cwd") {
            d.cwd = self.template(v, "cwd", params, s);
        }
        d
    }

    fn shell(&mut self, v: &Value<'_>, s: &ShiftedSpans) -> Option<Vec<String>> {
        let words: Vec<String> = match v.get_ref() {
            DeValue::String(text) => text.split_whitespace().map(String::from).collect(),
            DeValue::Array(_) => self
                .string_list(v, "shell", s)?
                .into_iter()
                .map(|(w, _)| w)
                .collect(),
            _ => {
                self.wrong_type(v, "shell", "a string like `bash -c`", s);
                return None;
            }
        };
        if words.is_empty() || words.iter().any(|w| w.trim().is_empty()) {
            self.error(
                Code::BadValue,
                s.span(v.span()),
                "`shell` is empty",
                "expected an interpreter and its flags, like `sh -c`",
            );
            return None;
        }
        Some(words)
    }

    fn env(
        &mut self,
        v: &Value<'_>,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Vec<(String, Template)> {
        let Some(t) = self.table(v, "env", s) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, value) in t.iter() {
            let name = key.get_ref().to_string();
            if !crate::runbook::valid_env_name(&name) {
                self.error(
                    Code::BadValue,
                    s.span(key.span()),
                    format!(
                        "`{}` is not a valid environment variable name",
                        name.escape_debug()
                    ),
                    "a letter or `_`, then letters, digits and `_`",
                );
                continue;
            }
            if let Some(tpl) = self.template(value, &format!("env.{name}"), params, s) {
                out.push((name, tpl));
            }
        }
        out
    }

    fn retry(&mut self, v: &Value<'_>, base: RetryPolicy, s: &ShiftedSpans) -> RetryPolicy {
        let mut policy = base;
        let t = match v.get_ref() {
            // `retry = 3` is shorthand for `retry = { attempts = 3 }`.
            DeValue::Integer(_) => {
                if let Some(n) = self.integer(v, "retry", s) {
                    policy.attempts = self.attempts(n, s.span(v.span()));
                }
                return policy;
            }
            DeValue::Table(t) => t,
            _ => {
                self.wrong_type(
                    v,
                    "retry",
                    "a number of attempts (`retry = 3`) or a table like `{ attempts = 3, delay = \"2s\" }`",
                    s,
                );
                return policy;
            }
        };
        self.check_keys(t, RETRY_KEYS, "`retry`", s);
        if let Some(v) = get(t, "attempts") {
            if let Some(n) = self.integer(v, "attempts", s) {
                policy.attempts = self.attempts(n, s.span(v.span()));
            }
        }
        if let Some(v) = get(t, "delay") {
            policy.delay = self.duration(v, "delay", s).unwrap_or(policy.delay);
        }
        if let Some(v) = get(t, "max_delay") {
            policy.max_delay = self.duration(v, "max_delay", s).unwrap_or(policy.max_delay);
        }
        if let Some(v) = get(t, "deadline") {
            policy.deadline = self.duration(v, "deadline", s);
        }
        if let Some(v) = get(t, "jitter") {
            match v.get_ref() {
                DeValue::Boolean(b) => policy.jitter = *b,
                _ => self.wrong_type(v, "jitter", "`true` or `false`", s),
            }
        }
        let factor = match get(t, "factor") {
            Some(fv) => match self.float(fv, "factor", s) {
                Some(f) if (1.0..=100.0).contains(&f) => Some(f),
                Some(_) => {
                    self.error(
                        Code::BadRetry,
                        s.span(fv.span()),
                        "`factor` must be between 1 and 100",
                        "out of range",
                    );
                    None
                }
                None => None,
            },
            None => None,
        };
        if let Some(bv) = get(t, "backoff") {
            if let Some((name, span)) = self.string(bv, "backoff", s) {
                match name.as_str() {
                    "fixed" => policy.backoff = Backoff::Fixed,
                    "exponential" => {
                        policy.backoff = Backoff::Exponential {
                            factor: factor.unwrap_or(2.0),
                        };
                    }
                    other => {
                        let mut d =
                            Diagnostic::error(Code::BadRetry, format!("unknown backoff `{other}`"))
                                .at(&self.src, span, "expected `fixed` or `exponential`");
                        if let Some(near) = suggest(other, ["fixed", "exponential"]) {
                            d = d.help(format!("did you mean `{near}`?"));
                        }
                        self.push(d);
                    }
                }
            }
        } else if let Some(f) = factor {
            policy.backoff = Backoff::Exponential { factor: f };
        }
        // Only an explicit `max_delay` can conflict with `delay`; the default cap rises to it.
        if get(t, "max_delay").is_none() {
            policy.max_delay = policy.max_delay.max(policy.delay);
        }
        if policy.max_delay < policy.delay {
            let span = get(t, "max_delay").map_or_else(|| s.span(v.span()), |v| s.span(v.span()));
            self.error(
                Code::BadRetry,
                span,
                format!(
                    "`max_delay` ({}) is shorter than `delay` ({})",
                    crate::duration::format_spec(policy.max_delay),
                    crate::duration::format_spec(policy.delay)
                ),
                "must be at least `delay`",
            );
        }
        policy
    }

    fn attempts(&mut self, n: i64, span: Span) -> u32 {
        match u32::try_from(n) {
            Ok(n @ 1..=10_000) => n,
            _ => {
                self.error(
                    Code::BadRetry,
                    span,
                    format!("`attempts` must be between 1 and 10000, found {n}"),
                    "1 means no retry",
                );
                1
            }
        }
    }

    fn steps(
        &mut self,
        v: &Value<'_>,
        defaults: &Defaults,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Vec<StepSpec> {
        let items: &DeArray<'_> = match v.get_ref() {
            DeValue::Array(a) => a,
            DeValue::Table(_) => {
                let d = Diagnostic::error(Code::WrongType, "`steps` must be an array of tables")
                    .at(&self.src, s.span(v.span()), "this is a single table")
                    .help("write each step as `[[steps]]` (double brackets), not `[steps]`");
                self.push(d);
                return Vec::new();
            }
            _ => {
                self.wrong_type(v, "steps", "an array of tables (`[[steps]]`)", s);
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(items.len());
        let mut seen: HashMap<String, (StepId, Span)> = HashMap::with_capacity(items.len());
        for item in items.iter() {
            let Some(step) = self.step(item, defaults, params, s, false) else {
                continue;
            };
            let norm = step.id.normalized();
            if let Some((first, first_span)) = seen.get(&norm) {
                let message = if first.as_str() == step.id.as_str() {
                    format!("duplicate step id `{}`", step.id)
                } else {
                    format!("step id `{}` collides with `{first}`", step.id)
                };
                let d = Diagnostic::error(Code::DuplicateStep, message)
                    .at(&self.src, step.id_span.clone(), "defined again here")
                    .also(&self.src, first_span.clone(), "first defined here")
                    .note("ids are compared ignoring case and treating `-` and `_` alike");
                self.push(d);
                continue;
            }
            seen.insert(norm, (step.id.clone(), step.id_span.clone()));
            out.push(step);
        }
        out
    }

    /// What a step does: exactly one of `run`, `script`, `http`, `tcp`, `screenshot`, `upload`
    /// or a block of `steps`.
    #[allow(clippy::too_many_arguments)]
    fn action(
        &mut self,
        t: &DeTable<'_>,
        id: &StepId,
        id_span: &Span,
        defaults: &Defaults,
        params: &[ParamSpec],
        s: &ShiftedSpans,
        in_block: bool,
    ) -> Option<Action> {
        let mut keys: Vec<&str> = vec!["run", "script"];
        keys.extend(RequestKind::ALL.iter().map(|k| k.key()));
        if !in_block {
            keys.push("steps");
        }
        let present: Vec<(&str, &Value<'_>)> = keys
            .iter()
            .filter_map(|k| get(t, k).map(|v| (*k, v)))
            .collect();
        match present.as_slice() {
            [] => {
                let d = Diagnostic::error(Code::StepAction, format!("step `{id}` has nothing to do"))
                    .at(&self.src, id_span.clone(), "no action in this step")
                    .help("add one of `run = \"<shell command>\"`, `script = \"<Rhai>\"`, `http = { url = \"…\" }`, `tcp = { host = \"…\", port = 22 }`, `screenshot = { url = \"…\" }`, `upload = { dest = \"…\", content = \"…\" }` or a block `steps = [ … ]`");
                self.push(d);
                None
            }
            [(key, v)] => match *key {
                "run" => self
                    .template(v, "run", params, s)
                    .map(|command| Action::Run { command }),
                "script" => self
                    .expression(v, "script", Context::Step, true, params, s)
                    .map(|script| Action::Script { script }),
                "steps" => self.block(v, defaults, params, s),
                other => {
                    let kind = RequestKind::ALL.into_iter().find(|k| k.key() == other)?;
                    self.request(kind, v, params, s)
                }
            },
            [(first, _), (second, v2), ..] => {
                let d = Diagnostic::error(
                    Code::StepAction,
                    format!("step `{id}` has both `{first}` and `{second}`"),
                )
                .at(&self.src, s.span(v2.span()), "second action")
                .help("a step does one thing: split it into two steps");
                self.push(d);
                None
            }
        }
    }

    fn block(
        &mut self,
        v: &Value<'_>,
        defaults: &Defaults,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<Action> {
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(
                v,
                "steps",
                "an array of step tables (`steps = [ { id = \"…\", run = \"…\" }, … ]`)",
                s,
            );
            return None;
        };
        let mut steps: Vec<StepSpec> = Vec::new();
        for item in items.iter() {
            let Some(sub) = self.step(item, defaults, params, s, true) else {
                continue;
            };
            if let Some(first) = steps
                .iter()
                .find(|o| o.id.normalized() == sub.id.normalized())
            {
                let d = Diagnostic::error(
                    Code::DuplicateStep,
                    format!("duplicate step id `{}` in the block", sub.id),
                )
                .at(&self.src, sub.id_span.clone(), "defined again here")
                .also(&self.src, first.id_span.clone(), "first defined here");
                self.push(d);
                continue;
            }
            steps.push(sub);
        }
        if steps.is_empty() && items.is_empty() {
            self.error(
                Code::StepAction,
                s.span(v.span()),
                "the block has no steps",
                "add `{ id = \"…\", run = \"…\" }` entries",
            );
            return None;
        }
        Some(Action::Block { steps })
    }

    /// `http = { … }` and friends: keys checked against the kind, strings read as templates.
    fn request(
        &mut self,
        kind: RequestKind,
        v: &Value<'_>,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<Action> {
        let t = self.table(v, kind.key(), s)?;
        self.check_keys(t, kind.keys(), &format!("`{}`", kind.key()), s);
        let mut ok = true;
        // Literal values are judged now; templated ones when the step renders them.
        for (key, value) in t.iter() {
            let key = key.get_ref().as_ref();
            if !kind.keys().contains(&key) || holds_template(value) {
                continue;
            }
            let Some(json) = self.json(value, s) else {
                continue;
            };
            if let Err(expected) = crate::request_check::check_value(kind, key, &json) {
                self.error(
                    Code::BadValue,
                    s.span(value.span()),
                    format!("`{}` {expected}", kind.key()),
                    "not valid here",
                );
                ok = false;
            }
        }
        for required in kind.required() {
            if get(t, required).is_none() {
                self.error(
                    Code::MissingKey,
                    s.span(v.span()),
                    format!("`{}` needs `{required}`", kind.key()),
                    &format!("add `{required} = …`"),
                );
                ok = false;
            }
        }
        if kind == RequestKind::Upload && (get(t, "src").is_some() == get(t, "content").is_some()) {
            self.error(
                Code::BadValue,
                s.span(v.span()),
                "`upload` needs exactly one of `src` (a file, relative to the runbook) and `content` (text, templates rendered)",
                "one of `src` or `content`",
            );
            ok = false;
        }
        if kind == RequestKind::Http {
            let bodies: Vec<&str> = ["body", "json", "form"]
                .into_iter()
                .filter(|k| get(t, k).is_some())
                .collect();
            if bodies.len() > 1 {
                self.error(
                    Code::BadValue,
                    s.span(v.span()),
                    format!("`http` has both `{}` and `{}`", bodies[0], bodies[1]),
                    "a request has one body",
                );
                ok = false;
            }
        }
        let spec = self.spec(v, params, s)?;
        ok.then_some(Action::Request { kind, spec })
    }

    fn spec(&mut self, v: &Value<'_>, params: &[ParamSpec], s: &ShiftedSpans) -> Option<Spec> {
        Some(match v.get_ref() {
            DeValue::String(text) => {
                Spec::Template(self.template_text(text, s.span(v.span()), params)?)
            }
            DeValue::Array(items) => Spec::Array(
                items
                    .iter()
                    .filter_map(|i| self.spec(i, params, s))
                    .collect(),
            ),
            DeValue::Table(t) => Spec::Table(
                t.iter()
                    .filter_map(|(k, v)| Some((k.get_ref().to_string(), self.spec(v, params, s)?)))
                    .collect(),
            ),
            _ => Spec::Value(self.json(v, s)?),
        })
    }

    fn budget(&mut self, v: &Value<'_>, key: &str, s: &ShiftedSpans) -> Option<Budget> {
        match v.get_ref() {
            DeValue::Integer(_) => {
                let n = self.integer(v, key, s)?;
                match usize::try_from(n) {
                    Ok(n) => Some(Budget::Count(n)),
                    Err(_) => {
                        self.error(
                            Code::BadValue,
                            s.span(v.span()),
                            format!("`{key}` cannot be negative"),
                            "a number of hosts or a percentage like \"25%\"",
                        );
                        None
                    }
                }
            }
            DeValue::String(text) => {
                let parsed = text
                    .trim()
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<f64>().ok())
                    .filter(|p| (0.0..=100.0).contains(p));
                match parsed {
                    Some(p) => Some(Budget::Percent(p)),
                    None => {
                        self.error(
                            Code::BadValue,
                            s.span(v.span()),
                            format!("`{key} = \"{text}\"` is not a percentage"),
                            "a number of hosts or a percentage from \"0%\" to \"100%\"",
                        );
                        None
                    }
                }
            }
            _ => {
                self.wrong_type(v, key, "a number of hosts or a percentage like \"25%\"", s);
                None
            }
        }
    }

    fn strategy(
        &mut self,
        v: &Value<'_>,
        defaults: &Defaults,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Strategy {
        let mut out = Strategy::default();
        let Some(t) = self.table(v, "strategy", s) else {
            return out;
        };
        self.check_keys(t, STRATEGY_KEYS, "`strategy`", s);
        if let Some(mv) = get(t, "max_failures") {
            if let Some(b) = self.budget(mv, "max_failures", s) {
                out.max_failures = b;
            }
        }
        match (get(t, "parallel"), get(t, "rolling")) {
            (Some(pv), None) => {
                let limit = self.integer(pv, "parallel", s).and_then(|n| {
                    if n < 1 {
                        self.error(
                            Code::BadValue,
                            s.span(pv.span()),
                            "`parallel` must be at least 1",
                            "how many hosts at a time",
                        );
                        None
                    } else {
                        usize::try_from(n).ok()
                    }
                });
                for key in ["pause", "gate"] {
                    if let Some(x) = get(t, key) {
                        self.error(
                            Code::BadValue,
                            s.span(x.span()),
                            format!("`{key}` applies to `rolling`"),
                            "batches only exist with `rolling`",
                        );
                    }
                }
                out.kind = StrategyKind::Parallel { limit };
            }
            (None, Some(rv)) => {
                let batches = match rv.get_ref() {
                    DeValue::Array(items) => items
                        .iter()
                        .filter_map(|i| self.budget(i, "rolling", s))
                        .collect(),
                    _ => self
                        .budget(rv, "rolling", s)
                        .into_iter()
                        .collect::<Vec<_>>(),
                };
                if batches.contains(&Budget::Count(0)) {
                    self.error(
                        Code::BadValue,
                        s.span(rv.span()),
                        "a rolling batch of 0 hosts",
                        "batch sizes are at least 1 (or a percentage)",
                    );
                }
                let pause = get(t, "pause").and_then(|p| self.duration(p, "pause", s));
                let gate = get(t, "gate").and_then(|g| match g.get_ref() {
                    DeValue::String(_) => self
                        .expression(g, "gate", Context::Result, false, params, s)
                        .map(Gate::Expr),
                    DeValue::Table(_) => self
                        .step(g, defaults, params, s, true)
                        .map(|st| Gate::Step(Box::new(st))),
                    _ => {
                        self.wrong_type(g, "gate", "a Rhai condition or a probe step table", s);
                        None
                    }
                });
                out.kind = StrategyKind::Rolling {
                    batches: if batches.is_empty() {
                        vec![Budget::Count(1)]
                    } else {
                        batches
                    },
                    pause,
                    gate,
                };
            }
            (Some(_), Some(rv)) => {
                self.error(
                    Code::BadValue,
                    s.span(rv.span()),
                    "`strategy` has both `parallel` and `rolling`",
                    "choose one",
                );
            }
            (None, None) => {}
        }
        out
    }

    fn drill(
        &mut self,
        v: &Value<'_>,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<DrillSpec> {
        let t = self.table(v, "drill", s)?;
        self.check_keys(t, DRILL_KEYS, "`[drill]`", s);
        let step_ref = |this: &mut Self, key: &str| {
            get(t, key)
                .and_then(|v| this.string(v, key, s))
                .map(|(id, span)| Need {
                    id: StepId::new(&id),
                    span,
                })
        };
        let spec = DrillSpec {
            rto: get(t, "rto").and_then(|d| self.duration(d, "rto", s)),
            rpo: get(t, "rpo").and_then(|d| self.duration(d, "rpo", s)),
            clock_start: step_ref(self, "clock_start"),
            clock_stop: step_ref(self, "clock_stop"),
            restored_data_time: get(t, "restored_data_time").and_then(|e| {
                self.expression(e, "restored_data_time", Context::RunHook, false, params, s)
            }),
        };
        if spec.rto.is_none() && spec.rpo.is_none() {
            self.error(
                Code::MissingKey,
                s.span(v.span()),
                "`[drill]` sets no objective",
                "add `rto = \"30m\"` and/or `rpo = \"24h\"`",
            );
        }
        if spec.rpo.is_some() && spec.restored_data_time.is_none() {
            self.error(Code::MissingKey, s.span(v.span()), "`rpo` needs `restored_data_time`", "an expression giving the restored data's time, e.g. `steps[\"restore\"].outputs.snapshot_time`");
        }
        Some(spec)
    }

    fn step(
        &mut self,
        v: &Value<'_>,
        defaults: &Defaults,
        params: &[ParamSpec],
        s: &ShiftedSpans,
        in_block: bool,
    ) -> Option<StepSpec> {
        let t = self.table(v, "steps", s)?;
        self.check_keys(
            t,
            if in_block { BLOCK_STEP_KEYS } else { STEP_KEYS },
            if in_block {
                "a step in a block"
            } else {
                "a step"
            },
            s,
        );
        let (id, id_span) = match get(t, "id") {
            Some(iv) => {
                let (id, span) = self.string(iv, "id", s)?;
                if !StepId::is_valid(&id) {
                    self.error(
                        Code::BadId,
                        span.clone(),
                        format!("step id `{}` is not valid", id.escape_debug()),
                        "use letters, digits, `-`, `_` and `.` (at most 64), starting with a letter or digit",
                    );
                    return None;
                }
                (StepId::new(&id), span)
            }
            None => {
                let span = s.span(v.span());
                let span = span.start..(span.start + 1).min(self.src.text().len());
                self.error(
                    Code::MissingKey,
                    span,
                    "step has no `id`",
                    "every step needs `id = \"…\"`",
                );
                return None;
            }
        };
        let needs = match get(t, "needs") {
            Some(nv) => self
                .string_list(nv, "needs", s)
                .unwrap_or_default()
                .into_iter()
                .map(|(n, span)| Need {
                    id: StepId::new(&n),
                    span,
                })
                .collect(),
            None => Vec::new(),
        };
        let action = self.action(t, &id, &id_span, defaults, params, s, in_block);
        let mut expr = |key: &str, context: Context, script: bool| {
            get(t, key).and_then(|v| self.expression(v, key, context, script, params, s))
        };
        let when = expr("when", Context::Step, false);
        let until = expr("until", Context::Result, false);
        let check = expr("check", Context::Result, false);
        let before = expr("before", Context::StepHook, true);
        let after = expr("after", Context::Result, true);
        let mut outputs = Vec::new();
        if let Some(ov) = get(t, "outputs") {
            if let Some(ot) = self.table(ov, "outputs", s) {
                for (key, value) in ot.iter() {
                    let name = key.get_ref().to_string();
                    if !is_identifier(&name) {
                        self.error(
                            Code::BadId,
                            s.span(key.span()),
                            format!("output name `{name}` is not an identifier"),
                            "use letters, digits and `_`",
                        );
                        continue;
                    }
                    if let Some(e) = self.expression(
                        value,
                        &format!("outputs.{name}"),
                        Context::Result,
                        false,
                        params,
                        s,
                    ) {
                        outputs.push((name, e));
                    }
                }
            }
        }
        let capture = match get(t, "capture") {
            Some(cv) => match self.string(cv, "capture", s) {
                Some((c, _)) if c == "text" => Capture::Text,
                Some((c, _)) if c == "json" => Capture::Json,
                Some((c, span)) => {
                    self.error(
                        Code::BadValue,
                        span,
                        format!("unknown capture `{c}`"),
                        "expected `text` or `json`",
                    );
                    Capture::Text
                }
                None => Capture::Text,
            },
            None => Capture::Text,
        };
        let mut env = defaults.env.clone();
        if let Some(ev) = get(t, "env") {
            for (k, tpl) in self.env(ev, params, s) {
                env.retain(|(existing, _)| existing != &k);
                env.push((k, tpl));
            }
        }
        let cwd = match get(t, "cwd") {
            Some(cv) => self.template(cv, "cwd", params, s),
            None => defaults.cwd.clone(),
        };
        let shell = match get(t, "shell") {
            Some(sv) => self.shell(sv, s).unwrap_or_else(|| defaults.shell.clone()),
            None => defaults.shell.clone(),
        };
        let timeout = match get(t, "timeout") {
            Some(tv) => self.duration(tv, "timeout", s),
            None => defaults.timeout,
        };
        let kill_grace = match get(t, "kill_grace") {
            Some(kv) => self
                .duration(kv, "kill_grace", s)
                .unwrap_or(defaults.kill_grace),
            None => defaults.kill_grace,
        };
        let retry = match get(t, "retry") {
            Some(rv) => self.retry(rv, defaults.retry, s),
            None => defaults.retry,
        };
        let collect = match get(t, "collect") {
            Some(cv) => self
                .string_list(cv, "collect", s)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(text, span)| self.template_text(&text, span, params))
                .collect(),
            None => Vec::new(),
        };
        let plan = get(t, "plan").and_then(|pv| self.template(pv, "plan", params, s));
        let mut refs = Vec::new();
        {
            let mut scan = |code: &str, offset: usize, at: &Located| {
                refs.extend(refs_in(code, offset, at));
            };
            let templates: Vec<&Template> = match &action {
                Some(Action::Run { command }) => vec![command],
                Some(Action::Request { spec, .. }) => spec.templates(),
                _ => Vec::new(),
            };
            for tpl in templates
                .into_iter()
                .chain(env.iter().map(|(_, t)| t))
                .chain(cwd.iter())
                .chain(collect.iter())
                .chain(plan.iter())
            {
                if let Some(at) = &tpl.at {
                    for (e, offset) in tpl.expressions() {
                        scan(&e.text, offset, at);
                    }
                }
            }
            let script = match &action {
                Some(Action::Script { script }) => Some(script),
                _ => None,
            };
            for e in [&when, &until, &check, &before, &after, &script.cloned()]
                .into_iter()
                .flatten()
                .chain(outputs.iter().map(|(_, e)| e))
            {
                scan(&e.expr.text, 0, &e.at);
            }
        }
        let run_on_cancel = self.boolean(t, "run_on_cancel", s).unwrap_or(false);
        let always = self.boolean(t, "always", s).unwrap_or(false);
        if run_on_cancel && !always {
            if let Some(v) = get(t, "run_on_cancel") {
                self.error(
                    Code::BadValue,
                    s.span(v.span()),
                    "`run_on_cancel` needs `always = true`",
                    "only `always` steps run after a cancel",
                );
            }
        }
        let approve = self.opt_string(t, "approve", s);
        if approve.as_deref().is_some_and(|a| a.trim().is_empty()) {
            if let Some(av) = get(t, "approve") {
                self.error(
                    Code::BadValue,
                    s.span(av.span()),
                    "`approve` is empty",
                    "the question the approver answers, e.g. \"Drain node-3?\"",
                );
            }
        }
        let on = get(t, "on").and_then(|ov| {
            let (text, span) = self.string(ov, "on", s)?;
            match Selector::parse(&text) {
                Ok(sel) => Some((sel, span)),
                Err(e) => {
                    self.error(
                        Code::UnknownTarget,
                        span,
                        format!("`on` does not parse: {e}"),
                        "expected hosts or groups, e.g. `servers[0]`, `workers`, `all,!bastion`",
                    );
                    None
                }
            }
        });
        let strategy = match get(t, "strategy") {
            Some(sv) => self.strategy(sv, defaults, params, s),
            None => Strategy::default(),
        };
        if on.is_none() {
            if let Some(sv) = get(t, "strategy") {
                self.error(
                    Code::BadValue,
                    s.span(sv.span()),
                    "`strategy` needs `on`",
                    "a step without `on` runs once, locally",
                );
            }
            if let Some(Action::Block { .. }) = &action {
                self.error(
                    Code::StepAction,
                    id_span.clone(),
                    format!("step `{id}` has a block of `steps` but no `on`"),
                    "a block runs its steps on each host `on` selects",
                );
            }
        }
        // What sub-steps and gates read counts as read by the step (ordering checks).
        if let Some(Action::Block { steps }) = &action {
            refs.extend(steps.iter().flat_map(|sub| sub.refs.iter().cloned()));
        }
        if let StrategyKind::Rolling {
            gate: Some(gate), ..
        } = &strategy.kind
        {
            match gate {
                Gate::Step(probe) => refs.extend(probe.refs.iter().cloned()),
                Gate::Expr(e) => refs.extend(refs_in(&e.expr.text, 0, &e.at)),
            }
        }
        // A command's stdout becomes `output.json` only with `capture = "json"` (probes fill
        // it themselves); without it the expression fails at run time with Rhai's own words.
        if capture == Capture::Text && matches!(action, Some(Action::Run { .. })) {
            let exprs = [&until, &check, &after]
                .into_iter()
                .flatten()
                .chain(outputs.iter().map(|(_, e)| e));
            for e in exprs {
                if let Some(pos) = e.expr.text.find("output.json") {
                    let here = e.at.at(pos);
                    let here = match e.at.origin {
                        Some(_) => here.start..here.start + "output.json".len(),
                        None => here,
                    };
                    let d = Diagnostic::error(
                        Code::BadValue,
                        "`output.json` is only set when the step has `capture = \"json\"`",
                    )
                    .at(&self.src, here, "needs `capture = \"json\"`")
                    .help("add `capture = \"json\"` to the step (stdout must then be JSON), or read `output.stdout`");
                    self.push(d);
                }
            }
        }
        Some(StepSpec {
            on,
            strategy,
            sudo: self.boolean(t, "sudo", s).unwrap_or(false),
            pty: self.boolean(t, "pty", s).unwrap_or(false),
            local: self.boolean(t, "local", s).unwrap_or(false),
            plan,
            run_on_cancel,
            approve,
            when,
            until,
            check,
            outputs,
            capture,
            before,
            after,
            refs,
            title: self.opt_string(t, "title", s),
            description: self.opt_string(t, "description", s),
            phase: self.opt_string(t, "phase", s),
            continue_on_failure: self.boolean(t, "continue_on_failure", s).unwrap_or(false),
            always,
            id,
            id_span,
            needs,
            // A step whose action did not parse stays in the (never runnable) runbook, so that
            // steps needing it are not also reported as needing a missing step.
            action: action.unwrap_or_else(|| Action::Run {
                command: Template::literal(""),
            }),
            env,
            cwd,
            shell,
            timeout,
            kill_grace,
            retry,
            collect,
        })
    }
}

/// Parser spans are relative to the text after any BOM; this shifts them back.
struct ShiftedSpans(usize);

impl ShiftedSpans {
    fn span(&self, s: Span) -> Span {
        s.start + self.0..s.end + self.0
    }
}

/// Where the value's characters start inside its TOML string token, when the token holds them
/// verbatim (no escapes), so positions inside templates map exactly onto the file.
fn string_origin(token: &str, value: &str) -> Option<usize> {
    for quote in ["\"\"\"", "'''", "\"", "'"] {
        if let Some(inner) = token.strip_prefix(quote) {
            let mut start = quote.len();
            // A newline right after an opening triple quote is not part of the value.
            if quote.len() == 3 {
                if inner.starts_with("\r\n") {
                    start += 2;
                } else if inner.starts_with('\n') {
                    start += 1;
                }
            }
            return token
                .get(start..)
                .filter(|rest| rest.starts_with(value))
                .map(|_| start);
        }
    }
    None
}

/// `ROOT.NAME` and `ROOT["NAME"]` references in an expression (`params`, `steps`), with the
/// offset of each.
pub fn references(code: &str, root: &str) -> Vec<(String, usize)> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find(root) {
        let at = from + i;
        from = at + root.len();
        let preceded = at > 0
            && (bytes[at - 1].is_ascii_alphanumeric()
                || bytes[at - 1] == b'_'
                || bytes[at - 1] == b'.');
        if preceded {
            continue;
        }
        let rest = &code[from..];
        let name: String = if let Some(r) = rest.strip_prefix('.') {
            r.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        } else if let Some(r) = rest.strip_prefix("[\"") {
            match r.find('"') {
                Some(end) => r[..end].to_owned(),
                None => continue,
            }
        } else {
            continue;
        };
        if !name.is_empty() {
            out.push((name, at));
        }
    }
    out
}

/// The `steps.<id>` an expression at `offset` inside a located string reads, each with the
/// span of its mention (the whole string when escapes blur positions).
pub(crate) fn refs_in(code: &str, offset: usize, at: &Located) -> Vec<Need> {
    step_references(code)
        .into_iter()
        .map(|(name, pos)| {
            let span = match at.origin {
                Some(_) => {
                    let start = at.at(offset + pos).start;
                    start..start + "steps.".len() + name.len()
                }
                None => at.span.clone(),
            };
            Need {
                id: StepId::new(&name),
                span,
            }
        })
        .collect()
}

/// `steps.ID` and `steps["ID"]` references in an expression, with their offsets.
pub fn step_references(code: &str) -> Vec<(String, usize)> {
    references(code, "steps")
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn list(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_param_references() {
        let refs = references(
            "params.a + params[\"b\"] + xparams.c + p.params.d",
            "params",
        );
        assert_eq!(refs, vec![("a".into(), 0), ("b".into(), 11)]);
    }

    #[test]
    fn string_origin_handles_quote_styles() {
        assert_eq!(string_origin("\"abc\"", "abc"), Some(1));
        assert_eq!(string_origin("'''\nabc'''", "abc"), Some(4));
        assert_eq!(string_origin("\"a\\tb\"", "a\tb"), None);
    }
}

/// Whether a settings value has a `{{ … }}` anywhere in it, so it is known only when rendered.
fn holds_template(v: &Value<'_>) -> bool {
    match v.get_ref() {
        DeValue::String(text) => text.contains("{{"),
        DeValue::Array(items) => items.iter().any(holds_template),
        DeValue::Table(t) => t.iter().any(|(_, v)| holds_template(v)),
        _ => false,
    }
}
