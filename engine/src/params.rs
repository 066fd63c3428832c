//! Binding parameters: declared `[params]` + `--set` overrides + environment → the values a run
//! uses. Secret values are kept here and nowhere else in the engine's records.

use crate::diagnostic::suggest;
use crate::runbook::Runbook;

/// Where a parameter's value came from (recorded in the manifest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "from", content = "name")]
pub enum ParamSource {
    Default,
    Set,
    Env(String),
}

#[derive(Debug, Clone)]
pub struct BoundParam {
    pub name: String,
    pub value: serde_json::Value,
    pub source: ParamSource,
    pub secret: bool,
}

#[derive(Debug, Clone, Default)]
pub struct BoundParams(pub Vec<BoundParam>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("`--set {name}=…` names no parameter of this runbook{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    Unknown {
        name: String,
        suggestion: Option<String>,
    },
    #[error("`--set {0}` must have the form `name=value`")]
    Malformed(String),
    #[error("parameter `{name}` is required: pass `--set {name}=…`{}", env.as_ref().map(|e| format!(" or set the environment variable `{e}`")).unwrap_or_default())]
    Missing { name: String, env: Option<String> },
    /// A required secret given as the empty string (an unset variable expanded to ""), which
    /// would also switch off its redaction.
    #[error("parameter `{name}` is a required secret, but the value {from} is empty")]
    EmptySecret { name: String, from: String },
    /// `got` is the value as given, or `[REDACTED:name]` for a secret.
    #[error("parameter `{name}` ({from}) must be {expected}, got {got}")]
    BadValue {
        name: String,
        /// `from --set` or ``from `$VAR` ``.
        from: String,
        expected: &'static str,
        got: String,
    },
}

impl ParamError {
    /// The declared parameter the error is about, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            ParamError::Missing { name, .. }
            | ParamError::BadValue { name, .. }
            | ParamError::EmptySecret { name, .. } => Some(name),
            ParamError::Unknown { .. } | ParamError::Malformed(_) => None,
        }
    }
}

impl BoundParams {
    /// Binds every declared parameter. `sets` are raw `name=value` strings from the command
    /// line; `env` looks up environment variables (injected so tests need not touch the
    /// process environment). All problems are returned, not just the first.
    pub fn bind(
        runbook: &Runbook,
        sets: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Vec<ParamError>> {
        let mut errors = Vec::new();
        let mut given: Vec<(String, String)> = Vec::new();
        for set in sets {
            match set.split_once('=') {
                Some((name, value)) if !name.trim().is_empty() => {
                    let name = name.trim();
                    if runbook.param(name).is_none() {
                        errors.push(ParamError::Unknown {
                            name: name.to_owned(),
                            suggestion: suggest(
                                name,
                                runbook.params.iter().map(|p| p.name.as_str()),
                            )
                            .map(String::from),
                        });
                    } else {
                        given.retain(|(n, _)| n != name);
                        given.push((name.to_owned(), value.to_owned()));
                    }
                }
                _ => errors.push(ParamError::Malformed(set.clone())),
            }
        }
        let durations: Vec<&str> = runbook.duration_params().collect();
        let mut bound = Vec::with_capacity(runbook.params.len());
        for spec in &runbook.params {
            let from_set = given
                .iter()
                .find(|(n, _)| *n == spec.name)
                .map(|(_, v)| v.clone());
            let from_env = spec
                .env
                .as_ref()
                .and_then(|var| env(var).map(|v| (var.clone(), v)));
            let (raw, source) = match (from_set, from_env) {
                (Some(v), _) => (Some(v), ParamSource::Set),
                (None, Some((var, v))) => (Some(v), ParamSource::Env(var)),
                (None, None) => (None, ParamSource::Default),
            };
            let from = match &source {
                ParamSource::Env(var) => format!("from `${var}`"),
                _ => "from --set".to_owned(),
            };
            if spec.secret && spec.default.is_none() && raw.as_deref() == Some("") {
                errors.push(ParamError::EmptySecret {
                    name: spec.name.clone(),
                    from,
                });
                continue;
            }
            let value = match raw {
                Some(raw) => match coerce(&raw, spec.default.as_ref()) {
                    Ok(v) => v,
                    Err(expected) => {
                        errors.push(ParamError::BadValue {
                            name: spec.name.clone(),
                            from,
                            expected,
                            got: if spec.secret {
                                crate::redact::placeholder(&spec.name)
                            } else {
                                format!("`{raw}`")
                            },
                        });
                        continue;
                    }
                },
                None => match &spec.default {
                    Some(d) => d.clone(),
                    None if spec.required || spec.secret => {
                        errors.push(ParamError::Missing {
                            name: spec.name.clone(),
                            env: spec.env.clone(),
                        });
                        continue;
                    }
                    None => serde_json::Value::String(String::new()),
                },
            };
            if durations.contains(&spec.name.as_str()) {
                let ok = value
                    .as_str()
                    .is_some_and(|t| crate::duration::parse_duration(t).is_ok());
                if !ok {
                    errors.push(ParamError::BadValue {
                        name: spec.name.clone(),
                        from: match &source {
                            ParamSource::Default => "its default".to_owned(),
                            _ => from,
                        },
                        expected: "a duration such as `30s` or `2m` (a step's `pause` reads it)",
                        got: if spec.secret {
                            crate::redact::placeholder(&spec.name)
                        } else {
                            value.to_string()
                        },
                    });
                    continue;
                }
            }
            bound.push(BoundParam {
                name: spec.name.clone(),
                value,
                source,
                secret: spec.secret,
            });
        }
        if errors.is_empty() {
            Ok(Self(bound))
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, name: &str) -> Option<&BoundParam> {
        self.0.iter().find(|p| p.name == name)
    }

    /// Values as a JSON object, with secrets replaced by `[REDACTED:name]` when `redact`.
    pub fn to_json(&self, redact: bool) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|p| {
                    let v = if redact && p.secret {
                        serde_json::Value::String(crate::redact::placeholder(&p.name))
                    } else {
                        p.value.clone()
                    };
                    (p.name.clone(), v)
                })
                .collect(),
        )
    }

    /// Secret values with their names, longest first (so that a secret containing another is
    /// replaced whole).
    pub fn secrets(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .0
            .iter()
            .filter(|p| p.secret)
            .filter_map(|p| {
                let text = match &p.value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (!text.is_empty()).then(|| (p.name.clone(), text))
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.1.len()));
        out
    }
}

/// Converts a command-line string to the type of the parameter's default; on failure, what
/// was expected.
fn coerce(
    raw: &str,
    default: Option<&serde_json::Value>,
) -> Result<serde_json::Value, &'static str> {
    use serde_json::Value;
    Ok(match default {
        Some(Value::Bool(_)) => match raw {
            "true" | "yes" | "1" => Value::Bool(true),
            "false" | "no" | "0" => Value::Bool(false),
            _ => return Err("`true` or `false`"),
        },
        Some(Value::Number(n)) if n.is_i64() => {
            Value::from(raw.trim().parse::<i64>().map_err(|_| "an integer")?)
        }
        Some(Value::Number(_)) => {
            // `nan` and `inf` parse, but JSON (the manifest, expressions) has no such numbers.
            let f = raw
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or("a finite number")?;
            Value::from(f)
        }
        Some(Value::Array(_)) => match serde_json::from_str(raw) {
            Ok(v @ Value::Array(_)) => v,
            _ => return Err("a JSON array, like `[\"a\", \"b\"]`"),
        },
        Some(Value::Object(_)) => match serde_json::from_str(raw) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Err("a JSON object, like `{\"key\": \"value\"}`"),
        },
        _ => Value::String(raw.to_owned()),
    })
}
