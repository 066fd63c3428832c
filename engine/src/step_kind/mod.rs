//! One descriptor per step kind: the key that introduces it, whether it is a probe, the keys
//! its table takes and which are required, how a literal value is checked, its help text and
//! its compact form. The analyzer's step-key tables, `runbook check`'s "add one of …" help, the
//! one-line description of an attempt and whether earlier attempts' logs are compacted are
//! derived from these (docs/architecture.md, "Adding a step kind", lists what else a kind needs).
//!
//! A kind with a settings table is its module plus one line in `request_kinds!` below, which
//! declares the module, its `RequestKind` variant, its place in `RequestKind::ALL` and its arm in
//! `RequestKind::spec`: nothing to keep in step by hand.

pub mod run;
pub mod script;

use serde_json::Value;

/// Declares the kinds with a settings table: `Variant => module`, in the order help text and
/// `RequestKind::ALL` list them. Each module has a `pub const SPEC: StepKindSpec`.
macro_rules! request_kinds {
    ($($variant:ident => $module:ident),+ $(,)?) => {
        $(pub mod $module;)+

        /// The step kinds that take a settings table; each one's descriptor is its module's
        /// `SPEC`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum RequestKind {
            $($variant,)+
        }

        impl RequestKind {
            /// Every kind, in declaration order.
            pub const ALL: [RequestKind; [$(stringify!($variant)),+].len()] =
                [$(RequestKind::$variant,)+];

            /// The kind's descriptor.
            pub fn spec(self) -> &'static StepKindSpec {
                match self {
                    $(RequestKind::$variant => &$module::SPEC,)+
                }
            }
        }
    };
}

request_kinds! {
    Http => http,
    Tcp => tcp,
    Screenshot => screenshot,
    Upload => upload,
}

/// Keys of a settings table that cannot go together (or one that needs another).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub message: String,
    /// Under the span of the table.
    pub label: &'static str,
}

/// What the engine knows about a step kind before anything runs.
#[derive(Debug)]
pub struct StepKindSpec {
    /// The step key that introduces it (`tcp = { … }`).
    pub key: &'static str,
    /// A probe: asks a service whether it is ready, typically many times under `until`/`retry`.
    /// Only its last attempts keep their logs; earlier ones are compacted into the journal.
    pub probe: bool,
    /// The shortest useful form, as `runbook check` suggests it.
    pub example: &'static str,
    /// The keys its settings table takes (none for kinds written as one string).
    pub keys: &'static [&'static str],
    /// Keys that must be present.
    pub required: &'static [&'static str],
    /// Checks one literal value of its table; `Err` says what was expected.
    pub check: fn(key: &str, value: &Value) -> Result<(), String>,
    /// Checks which keys the table has together.
    pub combination: fn(present: &[&str]) -> Result<(), Conflict>,
    /// One line for the journal and console: what an attempt with these (rendered) settings
    /// does.
    pub compact: fn(settings: &Value) -> String,
}

impl RequestKind {
    /// The step key that introduces it.
    pub fn key(self) -> &'static str {
        self.spec().key
    }

    /// The keys its table takes (checked before anything runs).
    pub fn keys(self) -> &'static [&'static str] {
        self.spec().keys
    }

    /// Keys that must be present.
    pub fn required(self) -> &'static [&'static str] {
        self.spec().required
    }

    /// Whether attempts of this kind are probes (see [`StepKindSpec::probe`]).
    pub fn is_probe(self) -> bool {
        self.spec().probe
    }

    /// One line for the journal and console: what an attempt with `settings` does.
    pub fn describe(self, settings: &Value) -> String {
        (self.spec().compact)(settings)
    }
}

/// Every kind a step can be, in the order help text lists them: a command, a script, then the
/// kinds with a settings table.
pub fn all() -> impl Iterator<Item = &'static StepKindSpec> {
    [&run::SPEC, &script::SPEC]
        .into_iter()
        .chain(RequestKind::ALL.into_iter().map(RequestKind::spec))
}

/// `runbook check`'s help for a step with no action.
pub fn help_add_one() -> String {
    let forms: Vec<String> = all().map(|k| format!("`{}`", k.example)).collect();
    format!("add one of {} or a block `steps = [ … ]`", forms.join(", "))
}

/// A settings value as text: strings as written, anything else as JSON.
pub(crate) fn text(settings: &Value, key: &str) -> Option<String> {
    settings.get(key).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// For kinds whose every value is judged by its runner.
pub(crate) fn any_value(_key: &str, _value: &Value) -> Result<(), String> {
    Ok(())
}

/// For kinds whose keys combine freely.
pub(crate) fn any_combination(_present: &[&str]) -> Result<(), Conflict> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_distinct_key_and_its_required_keys_are_keys() {
        let mut seen = Vec::new();
        for kind in all() {
            assert!(!seen.contains(&kind.key), "{} twice", kind.key);
            seen.push(kind.key);
            for r in kind.required {
                assert!(
                    kind.keys.contains(r),
                    "{}: `{r}` required but not a key",
                    kind.key
                );
            }
            assert!(kind.example.starts_with(kind.key), "{}", kind.example);
        }
    }

    #[test]
    fn help_lists_every_kind() {
        assert_eq!(
            help_add_one(),
            "add one of `run = \"<shell command>\"`, `script = \"<Rhai>\"`, `http = { url = \"…\" }`, `tcp = { host = \"…\", port = 22 }`, `screenshot = { url = \"…\" }`, `upload = { dest = \"…\", content = \"…\" }` or a block `steps = [ … ]`"
        );
    }
}
