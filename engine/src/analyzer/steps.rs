//! `[[steps]]`: one step's keys, its action (one step kind, or a block of sub-steps), its
//! strategy, and the checks that span several of its keys.

use toml::de::{DeArray, DeTable, DeValue};

use std::collections::HashMap;

use super::keys::{step_keys, STRATEGY_KEYS};
use super::reader::{get, holds_template, is_identifier, ShiftedSpans, Value};
use super::references::{expr_reads_of, expr_references, expr_refs_in, property_paths};
use super::{Analyzer, Defaults};
use crate::diagnostic::{suggest, Code, Diagnostic};
use crate::expr::Context;
use crate::model::Selector;
use crate::retry::RetryPolicy;
use crate::runbook::{
    Action, Budget, Capture, Gate, Need, ParamSpec, Pause, RequestKind, SpannedExpr, Spec, StepId,
    StepSpec, Strategy, StrategyKind,
};
use crate::source::Span;
use crate::step_kind;
use crate::template::Template;

impl Analyzer<'_> {
    pub(super) fn steps(
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
                    .at(&self.r.src, s.span(v.span()), "this is a single table")
                    .help("write each step as `[[steps]]` (double brackets), not `[steps]`");
                self.r.push(d);
                return Vec::new();
            }
            _ => {
                self.r
                    .wrong_type(v, "steps", "an array of tables (`[[steps]]`)", s);
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
                    .at(&self.r.src, step.id_span.clone(), "defined again here")
                    .also(&self.r.src, first_span.clone(), "first defined here")
                    .note("ids are compared ignoring case and treating `-` and `_` alike");
                self.r.push(d);
                continue;
            }
            seen.insert(norm, (step.id.clone(), step.id_span.clone()));
            out.push(step);
        }
        out
    }

    /// What a step does: exactly one of the step kinds ([`crate::step_kind`]) or a block of
    /// `steps`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn action(
        &mut self,
        t: &DeTable<'_>,
        id: &StepId,
        id_span: &Span,
        defaults: &Defaults,
        params: &[ParamSpec],
        s: &ShiftedSpans,
        in_block: bool,
    ) -> Option<Action> {
        let mut keys: Vec<&str> = step_kind::all().map(|k| k.key).collect();
        if !in_block {
            keys.push("steps");
        }
        let present: Vec<(&str, &Value<'_>)> = keys
            .iter()
            .filter_map(|k| get(t, k).map(|v| (*k, v)))
            .collect();
        match present.as_slice() {
            [] => {
                let d =
                    Diagnostic::error(Code::StepAction, format!("step `{id}` has nothing to do"))
                        .at(&self.r.src, id_span.clone(), "no action in this step")
                        .help(step_kind::help_add_one());
                self.r.push(d);
                None
            }
            [(key, v)] => match *key {
                k if k == step_kind::run::SPEC.key => self
                    .template(v, k, params, s)
                    .map(|command| Action::Run { command }),
                k if k == step_kind::script::SPEC.key => self
                    .expression(v, k, Context::Step, true, params, s)
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
                .at(&self.r.src, s.span(v2.span()), "second action")
                .help("a step does one thing: split it into two steps");
                self.r.push(d);
                None
            }
        }
    }

    pub(super) fn block(
        &mut self,
        v: &Value<'_>,
        defaults: &Defaults,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<Action> {
        let DeValue::Array(items) = v.get_ref() else {
            self.r.wrong_type(
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
                .at(&self.r.src, sub.id_span.clone(), "defined again here")
                .also(&self.r.src, first.id_span.clone(), "first defined here");
                self.r.push(d);
                continue;
            }
            // A sub-step sees the sub-steps before it on the same host (`block.<id>`).
            for r in &sub.block_reads {
                if !steps.iter().any(|earlier| earlier.id == r.id) {
                    let later = items.len() > steps.len() + 1;
                    self.r.push(
                        Diagnostic::error(
                            Code::UnknownStepRef,
                            format!(
                                "`block.{}`: no earlier sub-step `{}` in this block",
                                r.id, r.id
                            ),
                        )
                        .at(
                            &self.r.src,
                            r.span.clone(),
                            "not a sub-step before this one",
                        )
                        .help(if later {
                            "a sub-step sees only those before it in the block, on the same host"
                        } else {
                            "name a sub-step listed before this one in the same block"
                        }),
                    );
                }
            }
            steps.push(sub);
        }
        if steps.is_empty() && items.is_empty() {
            self.r.error(
                Code::StepAction,
                s.span(v.span()),
                "the block has no steps",
                "add `{ id = \"…\", run = \"…\" }` entries",
            );
            return None;
        }
        Some(Action::Block { steps })
    }

    /// `http = { … }` and friends: keys, required keys, literal values and combinations
    /// checked against the kind's descriptor; strings read as templates.
    pub(super) fn request(
        &mut self,
        kind: RequestKind,
        v: &Value<'_>,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<Action> {
        let spec = kind.spec();
        let t = self.r.table(v, spec.key, s)?;
        self.r
            .check_keys(t, spec.keys, &format!("`{}`", spec.key), s);
        let mut ok = true;
        // Literal values are judged now; templated ones when the step renders them.
        for (key, value) in t.iter() {
            let key = key.get_ref().as_ref();
            if !spec.keys.contains(&key) || holds_template(value) {
                continue;
            }
            let Some(json) = self.r.json(value, s) else {
                continue;
            };
            if let Err(expected) = (spec.check)(key, &json) {
                self.r.error(
                    Code::BadValue,
                    s.span(value.span()),
                    format!("`{}` {expected}", spec.key),
                    "not valid here",
                );
                ok = false;
            }
        }
        for required in spec.required {
            if get(t, required).is_none() {
                self.r.error(
                    Code::MissingKey,
                    s.span(v.span()),
                    format!("`{}` needs `{required}`", spec.key),
                    &format!("add `{required} = …`"),
                );
                ok = false;
            }
        }
        let present: Vec<&str> = t.iter().map(|(k, _)| k.get_ref().as_ref()).collect();
        if let Err(conflict) = (spec.combination)(&present) {
            let span = s.span(v.span());
            self.r
                .error(Code::BadValue, span, conflict.message, conflict.label);
            ok = false;
        }
        let settings = self.spec(v, params, s)?;
        ok.then_some(Action::Request {
            kind,
            spec: settings,
        })
    }

    pub(super) fn spec(
        &mut self,
        v: &Value<'_>,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<Spec> {
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
            _ => Spec::Value(self.r.json(v, s)?),
        })
    }

    pub(super) fn budget(&mut self, v: &Value<'_>, key: &str, s: &ShiftedSpans) -> Option<Budget> {
        match v.get_ref() {
            DeValue::Integer(_) => {
                let n = self.r.integer(v, key, s)?;
                match usize::try_from(n) {
                    Ok(n) => Some(Budget::Count(n)),
                    Err(_) => {
                        self.r.error(
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
                        self.r.error(
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
                self.r
                    .wrong_type(v, key, "a number of hosts or a percentage like \"25%\"", s);
                None
            }
        }
    }

    /// `pause`: a duration, or `"{{ params.NAME }}"` naming a parameter whose default (if it
    /// has one) is a duration; the value a run binds is checked by [`crate::params`].
    fn pause(&mut self, v: &Value<'_>, params: &[ParamSpec], s: &ShiftedSpans) -> Option<Pause> {
        let DeValue::String(text) = v.get_ref() else {
            return self.r.duration(v, "pause", s).map(Pause::Fixed);
        };
        if !text.contains("{{") {
            return self.r.duration(v, "pause", s).map(Pause::Fixed);
        }
        let name = text
            .trim()
            .strip_prefix("{{")
            .and_then(|t| t.strip_suffix("}}"))
            .and_then(|t| t.trim().strip_prefix("params."))
            .filter(|n| is_identifier(n));
        let Some(name) = name else {
            self.r.error(
                Code::BadDuration,
                s.span(v.span()),
                "`pause` is a duration or one parameter",
                "write `pause = \"30s\"` or `pause = \"{{ params.NAME }}\"`",
            );
            return None;
        };
        let Some(spec) = params.iter().find(|p| p.name == name) else {
            let mut d =
                Diagnostic::error(Code::UnknownParam, format!("unknown parameter `{name}`")).at(
                    &self.r.src,
                    s.span(v.span()),
                    "not declared under `[params]`",
                );
            if let Some(near) = suggest(name, params.iter().map(|p| p.name.as_str())) {
                d = d.help(format!("did you mean `params.{near}`?"));
            }
            self.r.push(d);
            return None;
        };
        let default_ok = spec.default.as_ref().is_none_or(|d| {
            d.as_str()
                .is_some_and(|t| crate::duration::parse_duration(t).is_ok())
        });
        if !default_ok {
            let d = Diagnostic::error(
                Code::BadDuration,
                format!(
                    "the default of parameter `{name}` is not a duration, and `pause` reads it"
                ),
            )
            .at(
                &self.r.src,
                spec.span.clone(),
                "expected a duration such as \"30s\"",
            );
            self.r.push(d);
            return None;
        }
        Some(Pause::Param(name.to_owned()))
    }

    pub(super) fn strategy(
        &mut self,
        v: &Value<'_>,
        defaults: &Defaults,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Strategy {
        let mut out = Strategy::default();
        let Some(t) = self.r.table(v, "strategy", s) else {
            return out;
        };
        self.r.check_keys(t, STRATEGY_KEYS, "`strategy`", s);
        if let Some(mv) = get(t, "max_failures") {
            if let Some(b) = self.budget(mv, "max_failures", s) {
                out.max_failures = b;
            }
        }
        match (get(t, "parallel"), get(t, "rolling")) {
            (Some(pv), None) => {
                let limit = self.r.integer(pv, "parallel", s).and_then(|n| {
                    if n < 1 {
                        self.r.error(
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
                for key in ["pause", "gate", "gate_before_first"] {
                    if let Some(x) = get(t, key) {
                        self.r.error(
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
                    self.r.error(
                        Code::BadValue,
                        s.span(rv.span()),
                        "a rolling batch of 0 hosts",
                        "batch sizes are at least 1 (or a percentage)",
                    );
                }
                let pause = get(t, "pause").and_then(|p| self.pause(p, params, s));
                let gate = get(t, "gate").and_then(|g| match g.get_ref() {
                    DeValue::String(_) => self
                        .expression(g, "gate", Context::Result, false, params, s)
                        .map(Gate::Expr),
                    DeValue::Table(_) => self
                        .step(g, defaults, params, s, true)
                        .map(|st| Gate::Step(Box::new(st))),
                    _ => {
                        self.r
                            .wrong_type(g, "gate", "a Rhai condition or a probe step table", s);
                        None
                    }
                });
                let gate_before_first = get(t, "gate_before_first")
                    .and_then(|g| self.r.boolean(t, "gate_before_first", s).map(|b| (g, b)));
                if let (Some((g, true)), None) = (gate_before_first, &gate) {
                    self.r.error(
                        Code::BadValue,
                        s.span(g.span()),
                        "`gate_before_first` without a `gate`",
                        "add the `gate` to run before the first batch",
                    );
                }
                out.kind = StrategyKind::Rolling {
                    batches: if batches.is_empty() {
                        vec![Budget::Count(1)]
                    } else {
                        batches
                    },
                    pause,
                    gate,
                    gate_before_first: gate_before_first.is_some_and(|(_, b)| b),
                };
            }
            (Some(_), Some(rv)) => {
                self.r.error(
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

    /// One `[[steps]]` table (or a step in a block, or a rolling gate's probe step).
    pub(super) fn step(
        &mut self,
        v: &Value<'_>,
        defaults: &Defaults,
        params: &[ParamSpec],
        s: &ShiftedSpans,
        in_block: bool,
    ) -> Option<StepSpec> {
        let t = self.r.table(v, "steps", s)?;
        self.r.check_keys(
            t,
            step_keys(in_block),
            if in_block {
                "a step in a block"
            } else {
                "a step"
            },
            s,
        );
        let (id, id_span) = self.step_id(t, v, s)?;
        let needs = self.needs(t, s);
        let action = self.action(t, &id, &id_span, defaults, params, s, in_block);
        let exprs = self.step_exprs(t, params, s);
        let capture = self.capture(t, s);
        let settings = self.step_settings(t, defaults, params, s);
        let collect = match get(t, "collect") {
            Some(cv) => self
                .r
                .string_list(cv, "collect", s)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(text, span)| self.template_text(&text, span, params))
                .collect(),
            None => Vec::new(),
        };
        let plan = get(t, "plan").and_then(|pv| self.template(pv, "plan", params, s));
        let sudo = self.r.boolean(t, "sudo", s).unwrap_or(false);
        if let (false, Some(bv)) = (sudo, get(t, "become_password")) {
            self.r.error(
                Code::BadValue,
                s.span(bv.span()),
                "`become_password` on a step without `sudo = true`",
                "only sudo asks for it",
            );
        }
        let (run_on_cancel, always) = self.cancel_flags(t, s);
        let approve = self.approve(t, s);
        let on = self.on(t, s);
        let strategy = match get(t, "strategy") {
            Some(sv) => self.strategy(sv, defaults, params, s),
            None => Strategy::default(),
        };
        if on.is_none() {
            self.without_on(t, action.as_ref(), &id, &id_span, s);
        }
        if capture == Capture::Text && matches!(action, Some(Action::Run { .. })) {
            self.json_without_capture(&exprs);
        }
        let refs = reads(
            action.as_ref(),
            &settings,
            &collect,
            plan.as_ref(),
            &exprs,
            &strategy,
        );
        // `block.<sub>` is set only for a block's sub-steps (checked against the earlier
        // sub-steps by `block()`); anywhere else it is a mistake.
        let block_reads = own_reads(
            action.as_ref(),
            &settings,
            &collect,
            plan.as_ref(),
            &exprs,
            "block",
        );
        if !in_block {
            for r in &block_reads {
                self.r.error(
                    Code::UnknownStepRef,
                    r.span.clone(),
                    format!(
                        "`block.{}`: `block` is only set in a block's sub-steps",
                        r.id
                    ),
                    "not in a block",
                );
            }
        }
        let StepExprs {
            when,
            until,
            check,
            before,
            after,
            outputs,
        } = exprs;
        let StepSettings {
            env,
            cwd,
            shell,
            timeout,
            kill_grace,
            retry,
            become_password,
        } = settings;
        Some(StepSpec {
            on,
            strategy,
            sudo,
            become_password: if sudo { become_password } else { None },
            pty: self.r.boolean(t, "pty", s).unwrap_or(false),
            local: self.r.boolean(t, "local", s).unwrap_or(false),
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
            title: self.r.opt_string(t, "title", s),
            description: self.r.opt_string(t, "description", s),
            phase: self.r.opt_string(t, "phase", s),
            continue_on_failure: self.r.boolean(t, "continue_on_failure", s).unwrap_or(false),
            always,
            block_reads,
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

    fn step_id(
        &mut self,
        t: &DeTable<'_>,
        v: &Value<'_>,
        s: &ShiftedSpans,
    ) -> Option<(StepId, Span)> {
        match get(t, "id") {
            Some(iv) => {
                let (id, span) = self.r.string(iv, "id", s)?;
                if !StepId::is_valid(&id) {
                    self.r.error(
                        Code::BadId,
                        span.clone(),
                        format!("step id `{}` is not valid", id.escape_debug()),
                        "use letters, digits, `-`, `_` and `.` (at most 64), starting with a letter or digit",
                    );
                    return None;
                }
                Some((StepId::new(&id), span))
            }
            None => {
                let span = s.span(v.span());
                let span = span.start..(span.start + 1).min(self.r.src.text().len());
                self.r.error(
                    Code::MissingKey,
                    span,
                    "step has no `id`",
                    "every step needs `id = \"…\"`",
                );
                None
            }
        }
    }

    fn needs(&mut self, t: &DeTable<'_>, s: &ShiftedSpans) -> Vec<Need> {
        match get(t, "needs") {
            Some(nv) => self
                .r
                .string_list(nv, "needs", s)
                .unwrap_or_default()
                .into_iter()
                .map(|(n, span)| Need {
                    id: StepId::new(&n),
                    span,
                })
                .collect(),
            None => Vec::new(),
        }
    }

    /// `when`, `until`, `check`, `before`, `after` and `outputs`, each compiled for the
    /// variables it can read.
    fn step_exprs(&mut self, t: &DeTable<'_>, params: &[ParamSpec], s: &ShiftedSpans) -> StepExprs {
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
            if let Some(ot) = self.r.table(ov, "outputs", s) {
                for (key, value) in ot.iter() {
                    let name = key.get_ref().to_string();
                    if !is_identifier(&name) {
                        self.r.error(
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
        StepExprs {
            when,
            until,
            check,
            before,
            after,
            outputs,
        }
    }

    fn capture(&mut self, t: &DeTable<'_>, s: &ShiftedSpans) -> Capture {
        match get(t, "capture") {
            Some(cv) => match self.r.string(cv, "capture", s) {
                Some((c, _)) if c == "text" => Capture::Text,
                Some((c, _)) if c == "json" => Capture::Json,
                Some((c, span)) => {
                    self.r.error(
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
        }
    }

    /// The settings a step inherits from `[defaults]` and may override.
    fn step_settings(
        &mut self,
        t: &DeTable<'_>,
        defaults: &Defaults,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> StepSettings {
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
            Some(tv) => self.r.duration(tv, "timeout", s),
            None => defaults.timeout,
        };
        let kill_grace = match get(t, "kill_grace") {
            Some(kv) => self
                .r
                .duration(kv, "kill_grace", s)
                .unwrap_or(defaults.kill_grace),
            None => defaults.kill_grace,
        };
        let retry = match get(t, "retry") {
            Some(rv) => self.retry(rv, defaults.retry, s),
            None => defaults.retry,
        };
        let become_password = match get(t, "become_password") {
            Some(bv) => self.become_password(bv, params, s),
            None => defaults.become_password.clone(),
        };
        StepSettings {
            env,
            cwd,
            shell,
            timeout,
            kill_grace,
            retry,
            become_password,
        }
    }

    /// `become_password = "{{ params.NAME }}"`: a template that reads a secret param. A
    /// password written as text would be in version control and in every bundle (the runbook
    /// is copied into each), so a literal is refused; one that reads no secret param is
    /// warned about, since only secret params are redacted wherever they appear.
    pub(super) fn become_password(
        &mut self,
        v: &Value<'_>,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<Template> {
        let tpl = self.template(v, "become_password", params, s)?;
        let span = s.span(v.span());
        if tpl.is_literal() {
            // No snippet: the line may hold the password.
            let lc = self.r.src.line_col(span.start);
            self.r.push(
                Diagnostic::error(
                    Code::BadValue,
                    format!(
                        "{}:{}:{}: `become_password` is written in the runbook",
                        self.r.src.path().display(),
                        lc.line,
                        lc.column
                    ),
                )
                .help("declare a param with `secret = true` (given by `env = \"VAR\"` or `--set`) and write `become_password = \"{{ params.NAME }}\"`"),
            );
            return None;
        }
        let secret_read = tpl.expressions().any(|(e, _)| {
            expr_references(e, "params")
                .iter()
                .any(|(name, _)| params.iter().any(|p| p.secret && p.name == *name))
        });
        if !secret_read {
            self.r.push(
                Diagnostic::warning(
                    Code::BadValue,
                    "`become_password` reads no secret param, so the password is not redacted where it appears",
                )
                .at(&self.r.src, span, "not a `secret = true` param")
                .help("declare the param with `secret = true`"),
            );
        }
        Some(tpl)
    }

    /// `run_on_cancel` and `always`; the first needs the second.
    fn cancel_flags(&mut self, t: &DeTable<'_>, s: &ShiftedSpans) -> (bool, bool) {
        let run_on_cancel = self.r.boolean(t, "run_on_cancel", s).unwrap_or(false);
        let always = self.r.boolean(t, "always", s).unwrap_or(false);
        if run_on_cancel && !always {
            if let Some(v) = get(t, "run_on_cancel") {
                self.r.error(
                    Code::BadValue,
                    s.span(v.span()),
                    "`run_on_cancel` needs `always = true`",
                    "only `always` steps run after a cancel",
                );
            }
        }
        (run_on_cancel, always)
    }

    fn approve(&mut self, t: &DeTable<'_>, s: &ShiftedSpans) -> Option<String> {
        let approve = self.r.opt_string(t, "approve", s);
        if approve.as_deref().is_some_and(|a| a.trim().is_empty()) {
            if let Some(av) = get(t, "approve") {
                self.r.error(
                    Code::BadValue,
                    s.span(av.span()),
                    "`approve` is empty",
                    "the question the approver answers, e.g. \"Drain node-3?\"",
                );
            }
        }
        approve
    }

    fn on(&mut self, t: &DeTable<'_>, s: &ShiftedSpans) -> Option<(Selector, Span)> {
        let ov = get(t, "on")?;
        let (text, span) = self.r.string(ov, "on", s)?;
        match Selector::parse(&text) {
            Ok(sel) => Some((sel, span)),
            Err(e) => {
                self.r.error(
                    Code::UnknownTarget,
                    span,
                    format!("`on` does not parse: {e}"),
                    "expected hosts or groups, e.g. `servers[0]`, `workers`, `all,!bastion`",
                );
                None
            }
        }
    }

    /// What a step without `on` cannot have: a strategy, or a block.
    fn without_on(
        &mut self,
        t: &DeTable<'_>,
        action: Option<&Action>,
        id: &StepId,
        id_span: &Span,
        s: &ShiftedSpans,
    ) {
        if let Some(sv) = get(t, "strategy") {
            self.r.error(
                Code::BadValue,
                s.span(sv.span()),
                "`strategy` needs `on`",
                "a step without `on` runs once, locally",
            );
        }
        if let Some(Action::Block { .. }) = action {
            self.r.error(
                Code::StepAction,
                id_span.clone(),
                format!("step `{id}` has a block of `steps` but no `on`"),
                "a block runs its steps on each host `on` selects",
            );
        }
    }

    /// A command's stdout becomes `output.json` only with `capture = "json"` (probes fill it
    /// themselves); without it the expression fails at run time with Rhai's own words.
    fn json_without_capture(&mut self, exprs: &StepExprs) {
        let read = [&exprs.until, &exprs.check, &exprs.after]
            .into_iter()
            .flatten()
            .chain(exprs.outputs.iter().map(|(_, e)| e));
        for e in read {
            // The first mention is enough to say what is missing.
            for pos in property_paths(&e.expr, "output", "json")
                .into_iter()
                .take(1)
            {
                let here = e.at.at(pos);
                let here = match e.at.origin {
                    Some(_) => here.start..here.start + "output.json".len(),
                    None => here,
                };
                let d = Diagnostic::error(
                    Code::BadValue,
                    "`output.json` is only set when the step has `capture = \"json\"`",
                )
                .at(&self.r.src, here, "needs `capture = \"json\"`")
                .help("add `capture = \"json\"` to the step (stdout must then be JSON), or read `output.stdout`");
                self.r.push(d);
            }
        }
    }
}

/// A step's Rhai: its conditions, hooks and outputs.
struct StepExprs {
    when: Option<SpannedExpr>,
    until: Option<SpannedExpr>,
    check: Option<SpannedExpr>,
    before: Option<SpannedExpr>,
    after: Option<SpannedExpr>,
    outputs: Vec<(String, SpannedExpr)>,
}

/// The settings a step inherits from `[defaults]`.
struct StepSettings {
    env: Vec<(String, Template)>,
    cwd: Option<Template>,
    shell: Vec<String>,
    timeout: Option<std::time::Duration>,
    kill_grace: std::time::Duration,
    retry: RetryPolicy,
    become_password: Option<Template>,
}

/// The `steps.ID` a step reads, for ordering checks: in its templates and expressions, and in
/// what its sub-steps and rolling gate read.
fn reads(
    action: Option<&Action>,
    settings: &StepSettings,
    collect: &[Template],
    plan: Option<&Template>,
    exprs: &StepExprs,
    strategy: &Strategy,
) -> Vec<Need> {
    let mut refs = own_reads(action, settings, collect, plan, exprs, "steps");
    // What sub-steps and gates read counts as read by the step (ordering checks).
    if let Some(Action::Block { steps }) = action {
        refs.extend(steps.iter().flat_map(|sub| sub.refs.iter().cloned()));
    }
    if let StrategyKind::Rolling {
        gate: Some(gate), ..
    } = &strategy.kind
    {
        match gate {
            Gate::Step(probe) => refs.extend(probe.refs.iter().cloned()),
            Gate::Expr(e) => refs.extend(expr_refs_in(&e.expr, 0, &e.at)),
        }
    }
    refs
}

/// The `ROOT.NAME` a step's own templates and expressions read (not its sub-steps').
fn own_reads(
    action: Option<&Action>,
    settings: &StepSettings,
    collect: &[Template],
    plan: Option<&Template>,
    exprs: &StepExprs,
    root: &str,
) -> Vec<Need> {
    let mut refs = Vec::new();
    let templates: Vec<&Template> = match action {
        Some(Action::Run { command }) => vec![command],
        Some(Action::Request { spec, .. }) => spec.templates(),
        _ => Vec::new(),
    };
    for tpl in templates
        .into_iter()
        .chain(settings.env.iter().map(|(_, t)| t))
        .chain(settings.cwd.iter())
        .chain(settings.become_password.iter())
        .chain(collect.iter())
        .chain(plan)
    {
        if let Some(at) = &tpl.at {
            for (e, offset) in tpl.expressions() {
                refs.extend(expr_reads_of(e, offset, at, root));
            }
        }
    }
    let script = match action {
        Some(Action::Script { script }) => Some(script),
        _ => None,
    };
    for e in [
        exprs.when.as_ref(),
        exprs.until.as_ref(),
        exprs.check.as_ref(),
        exprs.before.as_ref(),
        exprs.after.as_ref(),
        script,
    ]
    .into_iter()
    .flatten()
    .chain(exprs.outputs.iter().map(|(_, e)| e))
    {
        refs.extend(expr_reads_of(&e.expr, 0, &e.at, root));
    }
    refs
}
