//! The typed TOML reader: spanned values read as strings, numbers, durations, lists and
//! tables, each mistake reported at its span with what was expected. The one reader of
//! spanned TOML: the runbook analyzer and the CLI's schedule file both read through it, so a
//! mistake reads the same in either.

use std::sync::Arc;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::keys::{list, NONZERO_DURATIONS};
use crate::diagnostic::{suggest, Code, Diagnostic, Diagnostics};
use crate::duration::parse_duration;
use crate::source::{Source, Span};

/// A spanned TOML value.
pub type Value<'i> = Spanned<DeValue<'i>>;

pub fn type_name(v: &DeValue<'_>) -> &'static str {
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

/// The value of `key` in `table`.
pub fn get<'a, 'i>(table: &'a DeTable<'i>, key: &str) -> Option<&'a Value<'i>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| v)
}

/// Reads one TOML file's values, collecting every mistake as a spanned diagnostic so that a
/// file's problems are all reported in one pass.
pub struct TomlReader {
    pub src: Arc<Source>,
    pub diags: Diagnostics,
}

impl TomlReader {
    pub fn new(src: Arc<Source>) -> Self {
        Self {
            src,
            diags: Diagnostics::default(),
        }
    }

    /// Parses `text` (the source's text; a UTF-8 byte-order mark is skipped, as harmless),
    /// or reports its syntax error. The spans of the tree are shifted back with the
    /// [`ShiftedSpans`] returned.
    pub fn parse<'t>(&mut self, text: &'t str) -> Option<(Spanned<DeTable<'t>>, ShiftedSpans)> {
        let body = text.strip_prefix('\u{feff}').unwrap_or(text);
        let bom = text.len() - body.len();
        match DeTable::parse(body) {
            Ok(root) => Some((root, ShiftedSpans(bom))),
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
                None
            }
        }
    }

    pub fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    pub fn error(&mut self, code: Code, span: Span, message: impl Into<String>, label: &str) {
        let d = Diagnostic::error(code, message).at(&self.src, span, label);
        self.push(d);
    }

    /// `key`'s value `got` (at `span`) is none of `allowed`.
    pub fn bad_choice(&mut self, span: Span, key: &str, got: &str, allowed: &[&str]) {
        let choices = allowed
            .iter()
            .map(|a| format!("`{a}`"))
            .collect::<Vec<_>>()
            .join(" or ");
        self.error(
            Code::BadValue,
            span,
            format!("`{key}` must be {choices}, found `{got}`"),
            "not allowed here",
        );
    }

    /// The string `key` of `table` (which starts at `table_span`), reported when missing.
    pub fn required_string(
        &mut self,
        table: &DeTable<'_>,
        key: &str,
        table_span: Span,
        s: &ShiftedSpans,
    ) -> Option<(String, Span)> {
        match get(table, key) {
            Some(v) => self.string(v, key, s),
            None => {
                let start = s.span(table_span).start;
                self.error(
                    Code::MissingKey,
                    start..start,
                    format!("missing `{key}`"),
                    &format!("this table needs `{key}`"),
                );
                None
            }
        }
    }

    pub fn check_keys(
        &mut self,
        table: &DeTable<'_>,
        allowed: &[&str],
        what: &str,
        s: &ShiftedSpans,
    ) {
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

    pub fn wrong_type(&mut self, v: &Value<'_>, key: &str, expected: &str, s: &ShiftedSpans) {
        let found = type_name(v.get_ref());
        self.error(
            Code::WrongType,
            s.span(v.span()),
            format!("`{key}` must be {expected}, found {found}"),
            &format!("expected {expected}"),
        );
    }

    pub fn table<'a, 'i>(
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

    pub fn string(&mut self, v: &Value<'_>, key: &str, s: &ShiftedSpans) -> Option<(String, Span)> {
        match v.get_ref() {
            DeValue::String(text) => Some((text.to_string(), s.span(v.span()))),
            _ => {
                self.wrong_type(v, key, "a string", s);
                None
            }
        }
    }

    pub fn opt_string(&mut self, t: &DeTable<'_>, key: &str, s: &ShiftedSpans) -> Option<String> {
        get(t, key)
            .and_then(|v| self.string(v, key, s))
            .map(|(text, _)| text)
    }

    pub fn boolean(&mut self, t: &DeTable<'_>, key: &str, s: &ShiftedSpans) -> Option<bool> {
        let v = get(t, key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(v, key, "`true` or `false`", s);
                None
            }
        }
    }

    pub fn integer(&mut self, v: &Value<'_>, key: &str, s: &ShiftedSpans) -> Option<i64> {
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

    pub fn float(&mut self, v: &Value<'_>, key: &str, s: &ShiftedSpans) -> Option<f64> {
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

    pub fn duration(&mut self, v: &Value<'_>, key: &str, s: &ShiftedSpans) -> Option<Duration> {
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

    pub fn string_list(
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

    pub fn json(&mut self, v: &Value<'_>, s: &ShiftedSpans) -> Option<serde_json::Value> {
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
}

/// Parser spans are relative to the text after any BOM; this shifts them back.
pub struct ShiftedSpans(pub(super) usize);

impl ShiftedSpans {
    pub fn span(&self, s: Span) -> Span {
        s.start + self.0..s.end + self.0
    }
}

/// Where the value's characters start inside its TOML string token, when the token holds them
/// verbatim (no escapes), so positions inside templates map exactly onto the file.
pub(super) fn string_origin(token: &str, value: &str) -> Option<usize> {
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

pub(super) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether a settings value has a `{{ … }}` anywhere in it, so it is known only when rendered.
pub(super) fn holds_template(v: &Value<'_>) -> bool {
    match v.get_ref() {
        DeValue::String(text) => text.contains("{{"),
        DeValue::Array(items) => items.iter().any(holds_template),
        DeValue::Table(t) => t.iter().any(|(_, v)| holds_template(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_origin_handles_quote_styles() {
        assert_eq!(string_origin("\"abc\"", "abc"), Some(1));
        assert_eq!(string_origin("'''\nabc'''", "abc"), Some(4));
        assert_eq!(string_origin("\"a\\tb\"", "a\tb"), None);
    }
}
