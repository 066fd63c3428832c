//! The Rhai host: one sandboxed engine configuration shared by templates (and, later, conditions,
//! hooks and script steps). Rhai gets no file, process or network access, and every evaluation
//! is bounded in operations, call depth and data size, so a runaway expression ends with an
//! error instead of hanging a run.

use std::sync::Arc;

use rhai::{Dynamic, Engine, Map, Scope, AST};

/// Limits applied to every evaluation.
const MAX_OPERATIONS: u64 = 1_000_000;
const MAX_CALL_LEVELS: usize = 32;
const MAX_EXPR_DEPTH: usize = 64;
const MAX_STRING: usize = 16 * 1024 * 1024;
const MAX_ARRAY: usize = 100_000;
const MAX_MAP: usize = 100_000;

/// A compiled expression and the text it came from.
#[derive(Debug, Clone)]
pub struct Expr {
    pub text: String,
    pub ast: Arc<AST>,
}

/// Where in the expression text a parse error sits (1-based), and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprSyntaxError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone)]
pub struct ExprHost {
    engine: Arc<Engine>,
}

impl Default for ExprHost {
    fn default() -> Self {
        Self::new()
    }
}

impl ExprHost {
    pub fn new() -> Self {
        let mut engine = Engine::new();
        engine
            .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new())
            .set_max_operations(MAX_OPERATIONS)
            .set_max_call_levels(MAX_CALL_LEVELS)
            .set_max_expr_depths(MAX_EXPR_DEPTH, MAX_EXPR_DEPTH)
            .set_max_string_size(MAX_STRING)
            .set_max_array_size(MAX_ARRAY)
            .set_max_map_size(MAX_MAP)
            .on_print(|s| tracing::info!(target: "runbook::rhai", "{s}"))
            .on_debug(|s, _, _| tracing::debug!(target: "runbook::rhai", "{s}"));
        // `eval` would let a template compile code the checker never saw.
        engine.disable_symbol("eval");
        Self {
            engine: Arc::new(engine),
        }
    }

    pub fn compile_expression(&self, text: &str) -> Result<Expr, ExprSyntaxError> {
        match self.engine.compile_expression(text) {
            Ok(ast) => Ok(Expr {
                text: text.to_owned(),
                ast: Arc::new(ast),
            }),
            Err(err) => Err(ExprSyntaxError {
                message: err.err_type().to_string(),
                line: err.position().line().unwrap_or(1),
                column: err.position().position().unwrap_or(1),
            }),
        }
    }

    /// Evaluates an expression in a scope. Errors come back as text (Rhai's own wording, which
    /// names the function or variable at fault).
    pub fn eval(&self, expr: &Expr, scope: &mut Scope<'_>) -> Result<Dynamic, String> {
        self.engine
            .eval_ast_with_scope::<Dynamic>(scope, &expr.ast)
            .map_err(|e| e.to_string())
    }
}

/// Converts JSON (params, step results) into Rhai values.
pub fn json_to_dynamic(value: &serde_json::Value) -> Dynamic {
    use serde_json::Value;
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(items) => Dynamic::from_array(items.iter().map(json_to_dynamic).collect()),
        Value::Object(map) => {
            let m: Map = map
                .iter()
                .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                .collect();
            Dynamic::from_map(m)
        }
    }
}

/// How a value appears when substituted into a string: strings as they are, `()` as nothing,
/// everything else in Rhai's display form.
pub fn display_value(value: &Dynamic) -> String {
    if value.is_unit() {
        String::new()
    } else if let Ok(s) = value.clone().into_immutable_string() {
        s.to_string()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluates_with_scope() {
        let host = ExprHost::new();
        let expr = host.compile_expression("params.a + 1").expect("compiles");
        let mut scope = Scope::new();
        scope.push_constant("params", json_to_dynamic(&serde_json::json!({"a": 41})));
        let v = host.eval(&expr, &mut scope).expect("evaluates");
        assert_eq!(display_value(&v), "42");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = ExprHost::new()
            .compile_expression("params.a +")
            .expect_err("must fail");
        assert_eq!(err.line, 1);
        assert!(err.column >= 10, "{err:?}");
    }

    #[test]
    fn runaway_loops_are_stopped() {
        let host = ExprHost::new();
        let expr = host
            .compile_expression("{ let x = 0; loop { x += 1; } }")
            .or_else(|_| host.compile_expression("(|| { let x = 0; loop { x += 1; } })()"));
        if let Ok(expr) = expr {
            let err = host.eval(&expr, &mut Scope::new()).expect_err("must stop");
            assert!(err.to_lowercase().contains("too many operations"), "{err}");
        }
    }
}
