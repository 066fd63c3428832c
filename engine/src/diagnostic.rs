//! Diagnostics: what `runbook check` reports about a runbook. The engine only produces them as
//! data (code, message, labelled spans, help); the CLI decides how to render them.

use std::fmt;
use std::sync::Arc;

use crate::source::{LineCol, Source, Span};

/// Stable diagnostic codes. Each has a paragraph of explanation (`runbook explain RB0007`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    TomlSyntax,
    UnknownKey,
    WrongType,
    MissingKey,
    DuplicateStep,
    UnknownNeed,
    Cycle,
    BadDuration,
    BadRetry,
    BadId,
    TemplateSyntax,
    UnknownParam,
    StepAction,
    BadValue,
    Unreadable,
    UnknownStepRef,
    UnorderedStepRef,
    Inventory,
    UnknownTarget,
}

impl Code {
    pub const ALL: [Code; 19] = [
        Code::TomlSyntax,
        Code::UnknownKey,
        Code::WrongType,
        Code::MissingKey,
        Code::DuplicateStep,
        Code::UnknownNeed,
        Code::Cycle,
        Code::BadDuration,
        Code::BadRetry,
        Code::BadId,
        Code::TemplateSyntax,
        Code::UnknownParam,
        Code::StepAction,
        Code::BadValue,
        Code::Unreadable,
        Code::UnknownStepRef,
        Code::UnorderedStepRef,
        Code::Inventory,
        Code::UnknownTarget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::TomlSyntax => "RB0001",
            Code::UnknownKey => "RB0002",
            Code::WrongType => "RB0003",
            Code::MissingKey => "RB0004",
            Code::DuplicateStep => "RB0005",
            Code::UnknownNeed => "RB0006",
            Code::Cycle => "RB0007",
            Code::BadDuration => "RB0008",
            Code::BadRetry => "RB0009",
            Code::BadId => "RB0010",
            Code::TemplateSyntax => "RB0011",
            Code::UnknownParam => "RB0012",
            Code::StepAction => "RB0013",
            Code::BadValue => "RB0014",
            Code::Unreadable => "RB0015",
            Code::UnknownStepRef => "RB0016",
            Code::UnorderedStepRef => "RB0017",
            Code::Inventory => "RB0018",
            Code::UnknownTarget => "RB0019",
        }
    }

    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// A paragraph for `runbook explain`: what the problem is and how to fix it.
    pub fn explain(self) -> &'static str {
        match self {
            Code::TomlSyntax => "The file is not valid TOML. The position points at the first character the TOML parser could not accept. Common causes: a missing closing quote, a bare string without quotes, a key defined twice in one table, or `[[steps]]` written as `[steps]`.",
            Code::UnknownKey => "A table contains a key runbook does not know. Unknown keys are errors rather than warnings because a misspelt `timout` or `neds` would otherwise be ignored silently and the step would run without the setting you meant. The message suggests the nearest valid key.",
            Code::WrongType => "A key has a value of the wrong type, for example `needs = \"build\"` where a list of step ids (`needs = [\"build\"]`) is expected, or `always = \"yes\"` where a boolean is expected.",
            Code::MissingKey => "A required key is absent: every runbook needs `[runbook] name`, every step needs an `id`.",
            Code::DuplicateStep => "Two steps have the same `id`. Step ids name directories in the evidence bundle and targets of `needs`, so they must be unique. Ids are compared case-insensitively with `-` and `_` treated alike, so `Build_Image` and `build-image` collide.",
            Code::UnknownNeed => "A step's `needs` names a step id that does not exist. The message suggests the nearest existing id.",
            Code::Cycle => "The `needs` relations form a cycle, so no step in it could ever start. The message prints the cycle path `a → b → c → a`; remove one of those edges.",
            Code::BadDuration => "A duration could not be read. Durations are strings made of a number and a unit, optionally repeated: `500ms`, `90s`, `10m`, `1h30m`, `2d`. Units: ms, s, m, h, d.",
            Code::BadRetry => "A `retry` table is inconsistent: `attempts` must be at least 1, `backoff` must be `fixed` or `exponential`, `factor` must be ≥ 1, and `max_delay` cannot be shorter than `delay`.",
            Code::BadId => "A step id may contain letters, digits, `-`, `_` and `.`, must start with a letter or digit, and be at most 64 characters: it names a directory in the evidence bundle.",
            Code::TemplateSyntax => "A Rhai expression does not parse: a `{{ … }}` template (unclosed `{{`, empty expression, invalid Rhai), or a `when`, `until`, `check`, `outputs`, hook or `script` value. A variable the context does not provide (`output` outside `until`/`check`/`outputs`/`after`, a misspelt `parms`) is reported here too. Write a literal `{{` as `\\{{`.",
            Code::UnknownParam => "A template refers to `params.NAME` but the runbook declares no such parameter under `[params]`, or `--set NAME=…` names an undeclared parameter.",
            Code::StepAction => "A step must say what it does: `run = \"…\"` (a shell command) or `script = \"…\"` (Rhai). A step may not have more than one action.",
            Code::BadValue => "A key has a value outside the allowed set, for example `shell = \"\"` or a `parallel` of 0. The message lists what is allowed.",
            Code::Unreadable => "A file could not be read, or is not UTF-8 text.",
            Code::UnknownStepRef => "An expression reads `steps.ID` (or `steps[\"ID\"]`) but no step has that id. Ids containing `-` or `.` must be written `steps[\"facts-os\"]`: in Rhai `steps.facts-os` means `steps.facts - os`.",
            Code::UnorderedStepRef => "An expression reads the result of a step that is not guaranteed to have finished first. A step may only read `steps.ID` when ID is among its `needs` (directly or through other steps); add it to `needs`.",
            Code::Inventory => "The inventory file is not valid: a TOML error, an unknown key (the message lists the keys a host, group or `[defaults]` table takes), a host name that cannot name a directory in the evidence bundle, a group listing a host that does not exist, or a `proxy_jump` naming an unknown host. See docs/inventory.md.",
            Code::UnknownTarget => "A step's `on` selector does not parse, or names a host or group the inventory does not have. Selectors are comma-separated terms: `all`, a host, a group, an index or slice of one (`servers[0]`, `servers[1:]`, `workers[-1]`), `&group` to intersect and `!name` to exclude (`all,!bastion`). Hosts added at run time with `inventory.add_host` are only known once the step that adds them ran, so a runbook that adds hosts is checked without this test.",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// A span in a particular file, with a short text that explains it.
#[derive(Debug, Clone)]
pub struct Label {
    pub source: Arc<Source>,
    pub span: Span,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub code: Code,
    pub severity: Severity,
    pub message: String,
    pub primary: Option<Label>,
    pub secondary: Vec<Label>,
    pub notes: Vec<String>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            severity: Severity::Error,
            message: message.into(),
            primary: None,
            secondary: Vec::new(),
            notes: Vec::new(),
            help: None,
        }
    }

    pub fn warning(code: Code, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(code, message)
        }
    }

    #[must_use]
    pub fn at(mut self, source: &Arc<Source>, span: Span, label: impl Into<String>) -> Self {
        self.primary = Some(Label {
            source: source.clone(),
            span,
            message: label.into(),
        });
        self
    }

    #[must_use]
    pub fn also(mut self, source: &Arc<Source>, span: Span, label: impl Into<String>) -> Self {
        self.secondary.push(Label {
            source: source.clone(),
            span,
            message: label.into(),
        });
        self
    }

    #[must_use]
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    #[must_use]
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// `path:line:col` of the primary label, when there is one.
    pub fn location(&self) -> Option<(String, LineCol)> {
        self.primary.as_ref().map(|l| {
            (
                l.source.path().display().to_string(),
                l.source.line_col(l.span.start),
            )
        })
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((path, lc)) = self.location() {
            write!(f, "{path}:{}:{}: ", lc.line, lc.column)?;
        }
        write!(f, "{} [{}]", self.message, self.code)
    }
}

/// Every problem found in one pass, in source order.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }

    pub fn error_count(&self) -> usize {
        self.0.iter().filter(|d| d.is_error()).count()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }

    /// Stable order for output: by file, then position, then code.
    pub fn sort(&mut self) {
        self.0.sort_by_key(|d| {
            (
                d.primary
                    .as_ref()
                    .map(|l| (l.source.path().to_path_buf(), l.span.start)),
                d.code.as_str(),
            )
        });
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The nearest candidate to `word`, if one is close enough to be a plausible typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // Case is compared loosely: `--only Build` should find `build` even for one-letter ids,
    // where a case difference is the whole word to the edit-distance measure.
    let word = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(&word, &c.to_lowercase()), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_keys_only() {
        assert_eq!(suggest("timout", ["timeout", "needs"]), Some("timeout"));
        assert_eq!(suggest("neds", ["timeout", "needs"]), Some("needs"));
        assert_eq!(suggest("zzz", ["timeout", "needs"]), None);
        assert_eq!(suggest("A", ["a", "b"]), Some("a"));
    }

    #[test]
    fn codes_round_trip() {
        for c in Code::ALL {
            assert_eq!(Code::parse(c.as_str()), Some(c));
            assert!(!c.explain().is_empty());
        }
    }
}
