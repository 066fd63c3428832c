//! Rendering a step's templates for one attempt (command, env, cwd, a kind's settings) and
//! describing what the attempt does, secrets redacted.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A runner's details with every known secret redacted, for the journal.
pub(super) fn redact_json(
    state: &RunState,
    details: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut value = serde_json::Value::Object(details.clone());
    state.redact_json(&mut value);
    match value {
        serde_json::Value::Object(m) => m,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The state of a run whose secret param `pw` is `secret`.
    fn state_with(secret: &str) -> RunState {
        let host = ExprHost::new();
        let source = crate::Source::new(
            "t.toml",
            "[runbook]\nname = \"t\"\n[params]\npw = { secret = true }\n\
             [[steps]]\nid = \"a\"\nrun = \"true\"\n",
        );
        let (runbook, graph, _) = crate::compile(&source, &host).expect("compiles");
        let params =
            crate::params::BoundParams::bind(&runbook, &[format!("pw={secret}")], |_| None)
                .expect("params");
        let plan = Plan::new(
            runbook,
            graph,
            params,
            &crate::plan::Selection::default(),
            std::env::temp_dir(),
        )
        .expect("plan");
        RunState::new(&plan)
    }

    /// Regression: the details were redacted as JSON text, where a secret holding `"` or `\`
    /// is escaped and its form as written can match the text's own escapes: `C:\nightly`
    /// matched the `C:\n` of a value holding `C:` and a line break, which was then redacted.
    #[test]
    fn a_secret_with_json_special_characters_is_redacted_in_the_details() {
        for secret in [
            r#"pa"ss\word-0123"#,
            r"trailing-pw\",
            r#"pw-ends-in-quote":"#,
            r"C:\nightly",
        ] {
            let state = state_with(secret);
            let details = serde_json::json!({
                "body": format!("token={secret}"),
                "json": { "seen": secret, secret: [secret] },
                "other": "C:\nightly two",
            });
            let serde_json::Value::Object(details) = details else {
                unreachable!("an object")
            };
            let redacted = serde_json::Value::Object(redact_json(&state, &details));
            let text = redacted.to_string();
            assert_eq!(redacted["body"], "token=[REDACTED:pw]", "{secret}: {text}");
            assert_eq!(
                redacted["json"]["seen"], "[REDACTED:pw]",
                "{secret}: {text}"
            );
            assert_eq!(
                redacted["json"]["[REDACTED:pw]"][0], "[REDACTED:pw]",
                "{secret}: {text}"
            );
            assert_eq!(redacted["other"], "C:\nightly two", "{secret}: {text}");
        }
    }
}
