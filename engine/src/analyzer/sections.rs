//! The runbook's tables other than steps: `[runbook]`, `[params]`, `[defaults]` (and the
//! settings steps share with it: `shell`, `env`, `retry`), `[hooks]` and `[drill]`.

use std::path::PathBuf;

use toml::de::DeValue;

use super::keys::{
    DEFAULT_KEYS, DRILL_KEYS, EVIDENCE_KEYS, HOOK_KEYS, PARAM_KEYS, RETRY_KEYS, RUNBOOK_KEYS,
};
use super::reader::{get, is_identifier, ShiftedSpans, Value};
use super::{Analyzer, Defaults};
use crate::diagnostic::{suggest, Code, Diagnostic};
use crate::expr::Context;
use crate::retry::{Backoff, RetryPolicy};
use crate::runbook::{
    default_shell, DrillSpec, Hooks, Meta, Need, ParamSpec, StepId, DEFAULT_KILL_GRACE,
};
use crate::source::Span;
use crate::template::Template;

impl Analyzer<'_> {
    pub(super) fn hooks(&mut self, v: &Value<'_>, params: &[ParamSpec], s: &ShiftedSpans) -> Hooks {
        let mut hooks = Hooks::default();
        let Some(t) = self.r.table(v, "hooks", s) else {
            return hooks;
        };
        self.r.check_keys(t, HOOK_KEYS, "`[hooks]`", s);
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

    pub(super) fn meta(&mut self, v: &Value<'_>, s: &ShiftedSpans) -> Option<Meta> {
        let t = self.r.table(v, "runbook", s)?;
        self.r.check_keys(t, RUNBOOK_KEYS, "`[runbook]`", s);
        let name = match get(t, "name") {
            Some(nv) => {
                let (name, span) = self.r.string(nv, "name", s)?;
                if !StepId::is_valid(&name) {
                    self.r.error(
                        Code::BadId,
                        span,
                        format!("runbook name `{name}` is not a valid name"),
                        "use letters, digits, `-`, `_` and `.`",
                    );
                }
                name
            }
            None => {
                self.r.error(
                    Code::MissingKey,
                    s.span(v.span()),
                    "`[runbook]` has no `name`",
                    "add `name = \"…\"`",
                );
                return None;
            }
        };
        let refs = get(t, "refs")
            .and_then(|v| self.r.string_list(v, "refs", s))
            .unwrap_or_default()
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        Some(Meta {
            name,
            title: self.r.opt_string(t, "title", s),
            description: self.r.opt_string(t, "description", s),
            refs,
            evidence_dir: self.r.opt_string(t, "evidence_dir", s).map(PathBuf::from),
            allow_env: get(t, "allow_env")
                .and_then(|v| self.r.string_list(v, "allow_env", s))
                .unwrap_or_default()
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
            facts: Vec::new(),
            redact: Vec::new(),
            timestamp_url: None,
            inventory: get(t, "inventory")
                .and_then(|v| self.r.string(v, "inventory", s))
                .map(|(text, span)| (PathBuf::from(text), span)),
        })
    }

    pub(super) fn params(&mut self, v: &Value<'_>, s: &ShiftedSpans) -> Vec<ParamSpec> {
        let Some(t) = self.r.table(v, "params", s) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, value) in t.iter() {
            let name = key.get_ref().to_string();
            let span = s.span(key.span());
            if !is_identifier(&name) {
                self.r.error(
                    Code::BadId,
                    span.clone(),
                    format!("parameter name `{name}` is not an identifier"),
                    "use letters, digits and `_`, starting with a letter",
                );
                continue;
            }
            let spec = match value.get_ref() {
                DeValue::Table(pt) => {
                    self.r
                        .check_keys(pt, PARAM_KEYS, &format!("parameter `{name}`"), s);
                    let default = get(pt, "default").and_then(|d| self.r.json(d, s));
                    let secret = self.r.boolean(pt, "secret", s).unwrap_or(false);
                    // The runbook is copied verbatim into every bundle: a secret written here
                    // is in all of them. An empty default (an optional secret) is fine.
                    let written = default.as_ref().is_some_and(
                        |d| !matches!(d, serde_json::Value::String(t) if t.is_empty()),
                    );
                    if let (true, true, Some(dv)) = (secret, written, get(pt, "default")) {
                        // Located in the message, without a snippet: the line holds the
                        // secret, and this warning may end up in a CI log.
                        let lc = self.r.src.line_col(s.span(dv.span()).start);
                        self.r.push(
                            Diagnostic::warning(
                                Code::BadValue,
                                format!(
                                    "{}:{}:{}: secret parameter `{name}` has its value in the runbook, which is copied into every evidence bundle",
                                    self.r.src.path().display(),
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
                        doc: self.r.opt_string(pt, "doc", s),
                        secret,
                        env: self.r.opt_string(pt, "env", s),
                        required: self.r.boolean(pt, "required", s).unwrap_or(false),
                    }
                }
                // `name = value` is shorthand for `name = { default = value }`.
                _ => ParamSpec {
                    name,
                    span,
                    default: self.r.json(value, s),
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

    /// `[evidence]`: the facts to gather, the extra patterns to redact, and the time-stamping
    /// authority that stamps the sealed bundle.
    pub(super) fn evidence(
        &mut self,
        v: &Value<'_>,
        s: &ShiftedSpans,
    ) -> (Vec<String>, Vec<String>, Option<String>) {
        let mut redact = Vec::new();
        let Some(t) = self.r.table(v, "evidence", s) else {
            return (Vec::new(), redact, None);
        };
        let timestamp_url = get(t, "timestamp_url")
            .and_then(|u| self.r.string(u, "timestamp_url", s))
            .and_then(|(text, span)| {
                match crate::request_check::url(
                    &serde_json::Value::String(text.clone()),
                    &["http", "https"],
                ) {
                    Ok(()) => Some(text),
                    Err(e) => {
                        self.r.error(
                            Code::BadValue,
                            span,
                            e.replace("`url`", "`timestamp_url`"),
                            "an http(s) URL of an RFC 3161 time-stamping authority",
                        );
                        None
                    }
                }
            });
        self.r.check_keys(t, EVIDENCE_KEYS, "`[evidence]`", s);
        for (re, span) in get(t, "redact")
            .and_then(|f| self.r.string_list(f, "redact", s))
            .unwrap_or_default()
        {
            match regex::bytes::Regex::new(&re) {
                Ok(_) => redact.push(re),
                Err(e) => {
                    let first = e.to_string().lines().last().unwrap_or("").trim().to_owned();
                    self.r.error(
                        Code::BadValue,
                        span,
                        format!("`redact` pattern is not a valid regular expression: {first}"),
                        "invalid regular expression",
                    );
                }
            }
        }
        let facts = get(t, "facts")
            .and_then(|f| self.r.string_list(f, "facts", s))
            .unwrap_or_default()
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        (facts, redact, timestamp_url)
    }

    /// `[notify]`: the webhook told how the run ended (sent by the CLI); see [`super::notify`].
    pub(super) fn notify(
        &mut self,
        v: &Value<'_>,
        s: &ShiftedSpans,
    ) -> Option<(serde_json::Value, Span)> {
        self.r.notify(v, s).map(|(_, json, span)| (json, span))
    }

    pub(super) fn defaults(
        &mut self,
        v: &Value<'_>,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Defaults {
        let mut d = Defaults::builtin();
        let Some(t) = self.r.table(v, "defaults", s) else {
            return d;
        };
        self.r.check_keys(t, DEFAULT_KEYS, "`[defaults]`", s);
        if let Some(v) = get(t, "timeout") {
            d.timeout = self.r.duration(v, "timeout", s);
        }
        if let Some(v) = get(t, "kill_grace") {
            d.kill_grace = self
                .r
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
        if let Some(v) = get(t, "become_password") {
            d.become_password = self.become_password(v, params, s);
        }
        d
    }

    pub(super) fn shell(&mut self, v: &Value<'_>, s: &ShiftedSpans) -> Option<Vec<String>> {
        let words: Vec<String> = match v.get_ref() {
            DeValue::String(text) => text.split_whitespace().map(String::from).collect(),
            DeValue::Array(_) => self
                .r
                .string_list(v, "shell", s)?
                .into_iter()
                .map(|(w, _)| w)
                .collect(),
            _ => {
                self.r.wrong_type(v, "shell", "a string like `bash -c`", s);
                return None;
            }
        };
        if words.is_empty() || words.iter().any(|w| w.trim().is_empty()) {
            self.r.error(
                Code::BadValue,
                s.span(v.span()),
                "`shell` is empty",
                "expected an interpreter and its flags, like `sh -c`",
            );
            return None;
        }
        Some(words)
    }

    pub(super) fn env(
        &mut self,
        v: &Value<'_>,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Vec<(String, Template)> {
        let Some(t) = self.r.table(v, "env", s) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, value) in t.iter() {
            let name = key.get_ref().to_string();
            if !crate::runbook::valid_env_name(&name) {
                self.r.error(
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

    pub(super) fn retry(
        &mut self,
        v: &Value<'_>,
        base: RetryPolicy,
        s: &ShiftedSpans,
    ) -> RetryPolicy {
        let mut policy = base;
        let t = match v.get_ref() {
            // `retry = 3` is shorthand for `retry = { attempts = 3 }`.
            DeValue::Integer(_) => {
                if let Some(n) = self.r.integer(v, "retry", s) {
                    policy.attempts = self.attempts(n, s.span(v.span()));
                }
                return policy;
            }
            DeValue::Table(t) => t,
            _ => {
                self.r.wrong_type(
                    v,
                    "retry",
                    "a number of attempts (`retry = 3`) or a table like `{ attempts = 3, delay = \"2s\" }`",
                    s,
                );
                return policy;
            }
        };
        self.r.check_keys(t, RETRY_KEYS, "`retry`", s);
        if let Some(v) = get(t, "attempts") {
            if let Some(n) = self.r.integer(v, "attempts", s) {
                policy.attempts = self.attempts(n, s.span(v.span()));
            }
        }
        if let Some(v) = get(t, "delay") {
            policy.delay = self.r.duration(v, "delay", s).unwrap_or(policy.delay);
        }
        if let Some(v) = get(t, "max_delay") {
            policy.max_delay = self
                .r
                .duration(v, "max_delay", s)
                .unwrap_or(policy.max_delay);
        }
        if let Some(v) = get(t, "deadline") {
            policy.deadline = self.r.duration(v, "deadline", s);
        }
        if let Some(v) = get(t, "jitter") {
            match v.get_ref() {
                DeValue::Boolean(b) => policy.jitter = *b,
                _ => self.r.wrong_type(v, "jitter", "`true` or `false`", s),
            }
        }
        let factor = match get(t, "factor") {
            Some(fv) => match self.r.float(fv, "factor", s) {
                Some(f) if (1.0..=100.0).contains(&f) => Some(f),
                Some(_) => {
                    self.r.error(
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
            if let Some((name, span)) = self.r.string(bv, "backoff", s) {
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
                                .at(&self.r.src, span, "expected `fixed` or `exponential`");
                        if let Some(near) = suggest(other, ["fixed", "exponential"]) {
                            d = d.help(format!("did you mean `{near}`?"));
                        }
                        self.r.push(d);
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
            self.r.error(
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

    pub(super) fn attempts(&mut self, n: i64, span: Span) -> u32 {
        match u32::try_from(n) {
            Ok(n @ 1..=10_000) => n,
            _ => {
                self.r.error(
                    Code::BadRetry,
                    span,
                    format!("`attempts` must be between 1 and 10000, found {n}"),
                    "1 means no retry",
                );
                1
            }
        }
    }

    pub(super) fn drill(
        &mut self,
        v: &Value<'_>,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<DrillSpec> {
        let t = self.r.table(v, "drill", s)?;
        self.r.check_keys(t, DRILL_KEYS, "`[drill]`", s);
        let step_ref = |this: &mut Self, key: &str| {
            get(t, key)
                .and_then(|v| this.r.string(v, key, s))
                .map(|(id, span)| Need {
                    id: StepId::new(&id),
                    span,
                })
        };
        let spec = DrillSpec {
            rto: get(t, "rto").and_then(|d| self.r.duration(d, "rto", s)),
            rpo: get(t, "rpo").and_then(|d| self.r.duration(d, "rpo", s)),
            clock_start: step_ref(self, "clock_start"),
            clock_stop: step_ref(self, "clock_stop"),
            restored_data_time: get(t, "restored_data_time").and_then(|e| {
                self.expression(e, "restored_data_time", Context::RunHook, false, params, s)
            }),
        };
        if spec.rto.is_none() && spec.rpo.is_none() {
            self.r.error(
                Code::MissingKey,
                s.span(v.span()),
                "`[drill]` sets no objective",
                "add `rto = \"30m\"` and/or `rpo = \"24h\"`",
            );
        }
        if spec.rpo.is_some() && spec.restored_data_time.is_none() {
            self.r.error(Code::MissingKey, s.span(v.span()), "`rpo` needs `restored_data_time`", "an expression giving the restored data's time, e.g. `steps[\"restore\"].outputs.snapshot_time`");
        }
        Some(spec)
    }
}
