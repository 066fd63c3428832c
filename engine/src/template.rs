//! `{{ expr }}` templates inside runbook strings. A template is parsed and its expressions
//! compiled when the runbook is checked, so a broken expression is reported before anything
//! runs; it is rendered just before the attempt that uses it.

use rhai::Scope;

use crate::expr::{display_value, Context, Effects, Expr, ExprHost, ExprSyntaxError};

#[derive(Debug, Clone)]
pub enum Part {
    Literal(String),
    Expr {
        expr: Expr,
        /// Byte offset of the expression text inside the template string.
        offset: usize,
    },
}

/// A string field that may contain `{{ … }}` expressions.
#[derive(Debug, Clone)]
pub struct Template {
    raw: String,
    parts: Vec<Part>,
    /// Where the string is written in the runbook, for errors found while rendering.
    pub at: Option<crate::model::Located>,
}

/// A template that does not parse: the message and the byte offset inside the template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub message: String,
    pub offset: usize,
}

impl Template {
    /// A template with no expressions, for strings built by the engine itself.
    pub fn literal(text: impl Into<String>) -> Self {
        let raw = text.into();
        Self {
            parts: vec![Part::Literal(raw.clone())],
            raw,
            at: None,
        }
    }

    pub fn parse(raw: &str, host: &ExprHost, context: Context) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = raw;
        let mut pos = 0;
        while let Some(i) = rest.find("{{") {
            // `\{{` is a literal `{{`.
            if rest[..i].ends_with('\\') {
                literal.push_str(&rest[..i - 1]);
                literal.push_str("{{");
                rest = &rest[i + 2..];
                pos += i + 2;
                continue;
            }
            literal.push_str(&rest[..i]);
            let open = pos + i;
            let after = &rest[i + 2..];
            let Some(close) = after.find("}}") else {
                return Err(TemplateError {
                    message: "`{{` is never closed by `}}`".into(),
                    offset: open,
                });
            };
            let code = &after[..close];
            let code_offset = open + 2;
            if code.trim().is_empty() {
                return Err(TemplateError {
                    message: "empty expression `{{ }}`".into(),
                    offset: open,
                });
            }
            let expr = host
                .compile_expression(code, context)
                .map_err(|e| TemplateError {
                    message: e.message.clone(),
                    offset: code_offset + offset_in(code, &e),
                })?;
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Expr {
                expr,
                offset: code_offset,
            });
            rest = &after[close + 2..];
            pos = code_offset + close + 2;
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self {
            raw: raw.to_owned(),
            parts,
            at: None,
        })
    }

    pub fn raw(&self) -> &str {
        &self.raw
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    pub fn expressions(&self) -> impl Iterator<Item = (&Expr, usize)> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr { expr, offset } => Some((expr, *offset)),
            Part::Literal(_) => None,
        })
    }

    /// Renders the template; the error names the failing expression.
    pub fn render(&self, host: &ExprHost, scope: &mut Scope<'_>) -> Result<String, RenderError> {
        self.render_with_effects(host, scope, &mut Effects::default())
    }

    /// Renders, adding what the expressions asked for (`secret(…)`, `log(…)`) to `effects`.
    pub fn render_with_effects(
        &self,
        host: &ExprHost,
        scope: &mut Scope<'_>,
        effects: &mut Effects,
    ) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Expr { expr, offset } => {
                    let (value, more) = host.eval_with_effects(expr, scope);
                    effects.merge(more);
                    let value = value.map_err(|e| RenderError {
                        expression: expr.text.trim().to_owned(),
                        offset: *offset + e.column.map_or(0, |c| c.saturating_sub(1)),
                        message: e.message,
                    })?;
                    out.push_str(&display_value(&value));
                }
            }
        }
        Ok(out)
    }
}

/// An expression failed while rendering.
#[derive(Debug, Clone, thiserror::Error)]
#[error("expression `{expression}` failed: {message}")]
pub struct RenderError {
    pub expression: String,
    pub offset: usize,
    pub message: String,
}

/// Byte offset inside `code` of a 1-based line/column position.
fn offset_in(code: &str, err: &ExprSyntaxError) -> usize {
    let mut line = 1;
    let mut col = 1;
    for (i, ch) in code.char_indices() {
        if line == err.line && col == err.column {
            return i;
        }
        if ch == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    code.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::json_to_dynamic;

    fn render(raw: &str) -> String {
        let host = ExprHost::new();
        let t = Template::parse(raw, &host, Context::Step).expect("parses");
        let mut scope = Scope::new();
        scope.push_constant(
            "params",
            json_to_dynamic(&serde_json::json!({"v": "v1.31", "n": 3})),
        );
        t.render(&host, &mut scope).expect("renders")
    }

    #[test]
    fn renders_expressions_and_leaves_shell_alone() {
        assert_eq!(
            render("echo {{ params.v }} $HOME ${X}"),
            "echo v1.31 $HOME ${X}"
        );
        assert_eq!(render("{{params.n * 2}}x"), "6x");
        assert_eq!(render(r"a \{{ b }}"), "a {{ b }}");
        assert_eq!(render("plain"), "plain");
    }

    #[test]
    fn errors_point_into_the_string() {
        let host = ExprHost::new();
        let e = Template::parse("echo {{ params.v", &host, Context::Step).expect_err("unclosed");
        assert_eq!(e.offset, 5);
        let e = Template::parse("echo {{ }}", &host, Context::Step).expect_err("empty");
        assert_eq!(e.offset, 5);
        let e = Template::parse("echo {{ 1 + }}", &host, Context::Step).expect_err("bad expr");
        assert!(e.offset >= 8, "{e:?}");
    }
}
