//! Templates and Rhai expressions written as TOML strings: compiled against the context they
//! run in, located in the file, and their `params.NAME` references checked.

use super::reader::{string_origin, ShiftedSpans, Value};
use super::references::expr_references;
use super::Analyzer;
use crate::diagnostic::{suggest, Code, Diagnostic};
use crate::expr::Context;
use crate::runbook::{Located, ParamSpec, SpannedExpr};
use crate::source::Span;
use crate::template::Template;

impl Analyzer<'_> {
    pub(super) fn template(
        &mut self,
        v: &Value<'_>,
        key: &str,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<Template> {
        let (text, span) = self.r.string(v, key, s)?;
        // No command, argument, variable or path can carry a NUL byte: execve would refuse.
        if text.contains('\0') {
            self.r.error(
                Code::BadValue,
                span,
                format!("`{key}` contains a NUL byte"),
                "no command, variable or path can hold one",
            );
            return None;
        }
        if key == "cwd" && text.trim().is_empty() {
            self.r.error(
                Code::BadValue,
                span,
                "`cwd` is empty",
                "a directory, or leave `cwd` out for the runbook's directory",
            );
            return None;
        }
        self.template_text(&text, span, params)
    }

    pub(super) fn locate(&self, text: &str, span: Span) -> Located {
        let origin = string_origin(self.r.src.slice(&span), text).map(|o| span.start + o);
        Located { span, origin }
    }

    /// Reports the `params.NAME` an expression reads (`reads`, from
    /// [`expr_references`]) that name undeclared parameters.
    pub(super) fn check_param_refs(
        &mut self,
        reads: Vec<(String, usize)>,
        offset: usize,
        at: &Located,
        params: &[ParamSpec],
    ) {
        for (name, at_name) in reads {
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
                        .at(&self.r.src, here, "not declared under `[params]`");
                if let Some(near) = suggest(&name, params.iter().map(|p| p.name.as_str())) {
                    d = d.help(format!("did you mean `params.{near}`?"));
                } else {
                    d = d.help(format!(
                        "declare it:\n[params]\n{name} = {{ default = \"…\" }}"
                    ));
                }
                self.r.push(d);
            }
        }
    }

    /// Parses a template whose text is `text` and whose TOML string token is at `span`.
    pub(super) fn template_text(
        &mut self,
        text: &str,
        span: Span,
        params: &[ParamSpec],
    ) -> Option<Template> {
        let at = self.locate(text, span);
        match Template::parse(text, self.host, Context::Step) {
            Ok(mut t) => {
                let reads: Vec<(Vec<(String, usize)>, usize)> = t
                    .expressions()
                    .map(|(e, o)| (expr_references(e, "params"), o))
                    .collect();
                for (names, offset) in reads {
                    self.check_param_refs(names, offset, &at, params);
                }
                t.at = Some(at);
                Some(t)
            }
            Err(e) => {
                let mut d = Diagnostic::error(
                    Code::TemplateSyntax,
                    format!("template does not parse: {}", e.message),
                )
                .at(&self.r.src, at.at(e.offset), e.message.clone())
                .help("`{{ expr }}` holds a Rhai expression; write a literal `{{` as `\\{{`");
                if e.message.contains("Undefined variable") {
                    d = d.note(format!("templates can use: {}", Context::Step.describe()));
                }
                self.r.push(d);
                None
            }
        }
    }

    /// A Rhai expression (or, with `script`, statements) written as a TOML string.
    pub(super) fn expression(
        &mut self,
        v: &Value<'_>,
        key: &str,
        context: Context,
        script: bool,
        params: &[ParamSpec],
        s: &ShiftedSpans,
    ) -> Option<SpannedExpr> {
        let (text, span) = self.r.string(v, key, s)?;
        let at = self.locate(&text, span);
        let compiled = if script {
            self.host.compile_script(&text, context)
        } else {
            self.host.compile_expression(&text, context)
        };
        match compiled {
            Ok(expr) => {
                self.check_param_refs(expr_references(&expr, "params"), 0, &at, params);
                Some(SpannedExpr { expr, at })
            }
            Err(e) => {
                let offset = Located::offset_of(&text, e.line, e.column);
                let mut d = Diagnostic::error(
                    Code::TemplateSyntax,
                    format!("`{key}` does not parse: {}", e.message),
                )
                .at(&self.r.src, at.at(offset), e.message.clone());
                if e.message.contains("Undefined variable") {
                    d = d.help(format!("`{key}` can use: {}", context.describe()));
                }
                self.r.push(d);
                None
            }
        }
    }
}
