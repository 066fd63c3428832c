//! Rendering a step's templates for one attempt (command, env, cwd, a kind's settings) and
//! describing what the attempt does, secrets redacted.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A runner's details with every known secret redacted, for the journal.
pub(super) fn redact_json(
    state: &RunState,
    details: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    let text = serde_json::Value::Object(details.clone()).to_string();
    match serde_json::from_str(&state.redact(&text)) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

impl StepTask {
    pub(super) fn render(
        &self,
        step: &StepSpec,
        host: Option<&Arc<Host>>,
        command: &Template,
        effects: &mut Effects,
    ) -> Result<Rendered, String> {
        let mut scope = self.scope(host);
        let what = |field: &str, tpl: &Template, e: RenderError| self.render_error(field, tpl, &e);
        let command = command
            .render_with_effects(&self.host, &mut scope, effects)
            .map_err(|e| what("run", command, e))?;
        let mut env = Vec::with_capacity(step.env.len());
        for (name, tpl) in &step.env {
            env.push((
                name.clone(),
                tpl.render_with_effects(&self.host, &mut scope, effects)
                    .map_err(|e| what(&format!("env.{name}"), tpl, e))?,
            ));
        }
        let cwd = match &step.cwd {
            Some(tpl) => self.plan.workdir.join(
                tpl.render_with_effects(&self.host, &mut scope, effects)
                    .map_err(|e| what("cwd", tpl, e))?,
            ),
            None => self.plan.workdir.clone(),
        };
        Ok(Rendered {
            command,
            env,
            cwd,
            spec: serde_json::Value::Null,
        })
    }

    /// Where and why a template did not render, as the attempt's failure reason.
    fn render_error(&self, field: &str, tpl: &Template, e: &RenderError) -> String {
        let source = &self.plan.runbook.source;
        match &tpl.at {
            Some(at) => {
                let lc = source.line_col(at.at(e.offset).start);
                format!(
                    "in `{field}` at {}:{}:{}: {e}",
                    source.path().display(),
                    lc.line,
                    lc.column
                )
            }
            None => format!("in `{field}`: {e}"),
        }
    }

    /// sudo's password for a `sudo` step on a host, when it has `become_password`. An empty
    /// value (an optional secret left unset) means none: sudo then runs with `-n`.
    pub(super) fn render_become(
        &self,
        step: &StepSpec,
        host: Option<&Arc<Host>>,
    ) -> Result<Option<BecomePassword>, String> {
        let (true, Some(tpl), Some(_)) = (step.sudo, &step.become_password, host) else {
            return Ok(None);
        };
        let mut scope = self.scope(host);
        let value = tpl
            .render(&self.host, &mut scope)
            .map_err(|e| self.render_error("become_password", tpl, &e))?;
        Ok((!value.is_empty()).then(|| BecomePassword::new(value)))
    }

    /// Renders a step kind's settings. A string that is one whole `{{ expr }}` keeps the
    /// expression's type (`port = "{{ params.port }}"` stays a number).
    pub(super) fn render_spec(
        &self,
        table: &Spec,
        host: Option<&Arc<Host>>,
        effects: &mut Effects,
    ) -> Result<serde_json::Value, String> {
        let mut scope = self.scope(host);
        let source = &self.plan.runbook.source;
        fn go(
            this: &StepTask,
            spec: &Spec,
            key: &str,
            scope: &mut Scope<'static>,
            effects: &mut Effects,
            source: &crate::source::Source,
        ) -> Result<serde_json::Value, String> {
            Ok(match spec {
                Spec::Value(v) => v.clone(),
                Spec::Array(items) => serde_json::Value::Array(
                    items
                        .iter()
                        .map(|i| go(this, i, key, scope, effects, source))
                        .collect::<Result<_, _>>()?,
                ),
                Spec::Table(entries) => serde_json::Value::Object(
                    entries
                        .iter()
                        .map(|(k, v)| Ok((k.clone(), go(this, v, k, scope, effects, source)?)))
                        .collect::<Result<_, String>>()?,
                ),
                Spec::Template(t) => {
                    let place = |offset: usize| match &t.at {
                        Some(at) => {
                            let lc = source.line_col(at.at(offset).start);
                            format!(" at {}:{}:{}", source.path().display(), lc.line, lc.column)
                        }
                        None => String::new(),
                    };
                    if let [crate::template::Part::Expr { expr, offset }] = t.parts() {
                        let (value, more) = this.host.eval_with_effects(expr, scope);
                        effects.merge(more);
                        let v = value.map_err(|e| {
                            format!(
                                "in `{key}`{}: expression `{}` failed: {}",
                                place(*offset),
                                expr.text.trim(),
                                e.message
                            )
                        })?;
                        dynamic_to_json(&v)
                    } else {
                        serde_json::Value::String(
                            t.render_with_effects(&this.host, scope, effects)
                                .map_err(|e| format!("in `{key}`{}: {e}", place(e.offset)))?,
                        )
                    }
                }
            })
        }
        go(self, table, "", &mut scope, effects, source)
    }
}
