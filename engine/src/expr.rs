//! The Rhai host: one sandboxed engine shared by templates, conditions, hooks and script steps.
//!
//! Rhai gets no file, process or network access (no module loading, no `eval`), and every
//! evaluation is bounded in operations, call depth and data size, so a runaway loop ends with an
//! error instead of hanging a run. Variables are strict: an expression may only use the names its
//! context provides (`params`, `run`, `steps`, `env`, and `output`/`step` where they exist), so a
//! misspelt variable is an error of `runbook check`, not of the run.
//!
//! Functions that have effects on the run (`log`, `evidence.note`, `secret`, `fail`) record them
//! in the evaluation's [`Effects`]; the executor turns those into run events.

use std::cell::RefCell;
use std::sync::Arc;

use rhai::{
    Dynamic, Engine, EvalAltResult, ImmutableString, Map, OptimizationLevel, Position, Scope, AST,
};
use sha2::Digest;

/// Limits applied to every evaluation.
const MAX_OPERATIONS: u64 = 1_000_000;
const MAX_CALL_LEVELS: usize = 32;
const MAX_EXPR_DEPTH: usize = 64;
const MAX_STRING: usize = 16 * 1024 * 1024;
const MAX_ARRAY: usize = 100_000;
const MAX_MAP: usize = 100_000;

/// Where an expression sits decides which variables it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `{{ … }}` in step fields, and `when`.
    Step,
    /// `until`, `check`, `outputs`, per-step `after`: the attempt's `output` is visible.
    Result,
    /// `before_step`, `after_step`, `on_failure` hooks and per-step `before`: `step` is visible.
    StepHook,
    /// `before_run` and `after_run`.
    RunHook,
}

impl Context {
    /// The variables as a diagnostic lists them: `` `params`, `run`, … ``.
    pub fn describe(self) -> String {
        self.variables()
            .iter()
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn variables(self) -> &'static [&'static str] {
        match self {
            Context::Step => &[
                "params",
                "run",
                "steps",
                "env",
                "evidence",
                "host",
                "block",
                "inventory",
                "drill",
            ],
            Context::Result => &[
                "params",
                "run",
                "steps",
                "env",
                "evidence",
                "host",
                "block",
                "inventory",
                "drill",
                "output",
            ],
            Context::StepHook => &[
                "params",
                "run",
                "steps",
                "env",
                "evidence",
                "host",
                "inventory",
                "drill",
                "step",
                "output",
            ],
            Context::RunHook => &[
                "params",
                "run",
                "steps",
                "env",
                "evidence",
                "inventory",
                "drill",
            ],
        }
    }
}

/// A compiled expression or script and the text it came from.
#[derive(Debug, Clone)]
pub struct Expr {
    pub text: String,
    pub ast: Arc<AST>,
}

/// A parse error (1-based line and column inside the expression text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprSyntaxError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

/// An evaluation error with its position inside the expression text, when Rhai knows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EvalError {
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Set when the error is a deliberate `fail(msg)`.
    pub failed: bool,
}

/// What an evaluation asked the run to do besides returning a value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// `log(msg)`: shown on the console and in the journal.
    pub logs: Vec<String>,
    /// `evidence.note(msg)`: kept in the journal, the manifest and the report.
    pub notes: Vec<String>,
    /// `secret(value)` / `secret(name, value)`: redacted from then on.
    pub secrets: Vec<(String, String)>,
    /// `inventory.add_host(name, #{ … })`: hosts for later steps.
    pub new_hosts: Vec<crate::inventory::NewHost>,
    /// `drill.start_clock()` / `drill.stop_clock()`, in call order (true = start).
    pub clock: Vec<bool>,
}

impl Effects {
    /// Adds what another evaluation asked for.
    pub fn merge(&mut self, more: Effects) {
        self.logs.extend(more.logs);
        self.notes.extend(more.notes);
        self.secrets.extend(more.secrets);
        self.new_hosts.extend(more.new_hosts);
        self.clock.extend(more.clock);
    }
}

/// Wall-clock bound per evaluation: the operation limit alone does not bound an expression
/// whose few operations are each expensive (building large strings in a nested loop).
const MAX_EVAL_TIME: std::time::Duration = std::time::Duration::from_secs(3);

thread_local! {
    /// When the evaluation running on this thread must stop.
    static DEADLINE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    /// Effects of the evaluation running on this thread. Evaluation is synchronous, so the
    /// slot is set just before and taken just after each one.
    static EFFECTS: RefCell<Option<Effects>> = const { RefCell::new(None) };
}

fn with_effects(f: impl FnOnce(&mut Effects)) {
    EFFECTS.with(|slot| {
        if let Some(e) = slot.borrow_mut().as_mut() {
            f(e);
        }
    });
}

/// The value of `evidence` in scope: `evidence.note(msg)`.
#[derive(Debug, Clone, Copy)]
pub struct EvidenceApi;

/// The value of `drill` in scope: `drill.start_clock()`, `drill.stop_clock()`.
#[derive(Debug, Clone, Copy)]
pub struct DrillApi;

/// The value of `inventory` in scope: the hosts known when the expression started, and
/// `add_host` for hosts later steps run on.
#[derive(Debug, Clone)]
pub struct InventoryApi(pub Arc<crate::inventory::Inventory>);

#[derive(Debug, Clone)]
pub struct ExprHost {
    engine: Arc<Engine>,
}

impl Default for ExprHost {
    fn default() -> Self {
        Self::new()
    }
}

type FnResult<T> = Result<T, Box<EvalAltResult>>;

fn runtime_error(message: impl Into<String>) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(message.into()),
        Position::NONE,
    ))
}

/// Marks the message of a deliberate `fail()` so it can be told apart from other errors.
const FAIL_MARK: &str = "\u{1}runbook-fail\u{1}";

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
            .set_strict_variables(true)
            .set_fail_on_invalid_map_property(true)
            // Compile-time scopes hold placeholders; constant folding must never see them.
            .set_optimization_level(OptimizationLevel::None)
            .on_progress(|_| {
                let late =
                    DEADLINE.with(|d| d.get().is_some_and(|t| std::time::Instant::now() > t));
                late.then(|| {
                    Dynamic::from(format!(
                        "evaluation took longer than {}s",
                        MAX_EVAL_TIME.as_secs()
                    ))
                })
            })
            .on_print(|s| with_effects(|e| e.logs.push(s.to_owned())))
            .on_debug(|s, _, _| with_effects(|e| e.logs.push(s.to_owned())));
        // `eval` would let an expression run code the checker never saw.
        engine.disable_symbol("eval");
        register_functions(&mut engine);
        Self {
            engine: Arc::new(engine),
        }
    }

    fn declared(context: Context) -> Scope<'static> {
        let mut scope = Scope::new();
        for name in context.variables() {
            scope.push(*name, Dynamic::UNIT);
        }
        scope
    }

    /// Compiles a single expression (templates, conditions, outputs).
    pub fn compile_expression(
        &self,
        text: &str,
        context: Context,
    ) -> Result<Expr, ExprSyntaxError> {
        self.engine
            .compile_expression_with_scope(&Self::declared(context), text)
            .map(|ast| Expr {
                text: text.to_owned(),
                ast: Arc::new(ast),
            })
            .map_err(|e| syntax_error(&e))
    }

    /// Compiles a script: statements, `let`, loops (hooks and `script` steps).
    pub fn compile_script(&self, text: &str, context: Context) -> Result<Expr, ExprSyntaxError> {
        self.engine
            .compile_with_scope(&Self::declared(context), text)
            .map(|ast| Expr {
                text: text.to_owned(),
                ast: Arc::new(ast),
            })
            .map_err(|e| syntax_error(&e))
    }

    /// Evaluates, discarding effects (for rendering where effects make no sense, like `plan`).
    pub fn eval(&self, expr: &Expr, scope: &mut Scope<'_>) -> Result<Dynamic, EvalError> {
        self.eval_with_effects(expr, scope).0
    }

    /// Evaluates and returns what the evaluation asked the run to do.
    pub fn eval_with_effects(
        &self,
        expr: &Expr,
        scope: &mut Scope<'_>,
    ) -> (Result<Dynamic, EvalError>, Effects) {
        EFFECTS.with(|slot| *slot.borrow_mut() = Some(Effects::default()));
        DEADLINE.with(|d| d.set(Some(std::time::Instant::now() + MAX_EVAL_TIME)));
        if !scope.contains("evidence") {
            scope.push_constant("evidence", EvidenceApi);
        }
        if !scope.contains("drill") {
            scope.push_constant("drill", DrillApi);
        }
        if !scope.contains("inventory") {
            scope.push_constant(
                "inventory",
                InventoryApi(Arc::new(crate::inventory::Inventory::default())),
            );
        }
        if !scope.contains("host") {
            scope.push_constant("host", Dynamic::UNIT);
        }
        let result = self
            .engine
            .eval_ast_with_scope::<Dynamic>(scope, &expr.ast)
            .map_err(|e| eval_error(&e));
        let effects = EFFECTS
            .with(|slot| slot.borrow_mut().take())
            .unwrap_or_default();
        DEADLINE.with(|d| d.set(None));
        (result, effects)
    }
}

fn syntax_error(e: &rhai::ParseError) -> ExprSyntaxError {
    ExprSyntaxError {
        message: e.err_type().to_string(),
        line: e.position().line().unwrap_or(1),
        column: e.position().position().unwrap_or(1),
    }
}

fn eval_error(e: &EvalAltResult) -> EvalError {
    // Errors inside functions are wrapped; the innermost one says what went wrong.
    let inner = e.unwrap_inner();
    let pos = if e.position().is_none() {
        inner.position()
    } else {
        e.position()
    };
    let (message, failed) = match inner {
        EvalAltResult::ErrorRuntime(d, _) => {
            let text = d.to_string();
            match text.strip_prefix(FAIL_MARK) {
                Some(msg) => (msg.to_owned(), true),
                None => (text, false),
            }
        }
        EvalAltResult::ErrorTerminated(d, _) => (d.to_string(), false),
        other => {
            // Rhai appends " (line l, position p)"; the caller reports positions itself.
            let text = other.to_string();
            let text = match text.rfind(" (line ") {
                Some(i) if text.ends_with(')') => text[..i].to_owned(),
                _ => text,
            };
            (text, false)
        }
    };
    EvalError {
        message,
        line: pos.line(),
        column: pos.position(),
        failed,
    }
}

fn register_functions(engine: &mut Engine) {
    // Rhai's own `trim` trims in place and returns nothing, which makes
    // `output.stdout.trim()` silently `()`. Runbooks always want the value.
    engine.register_fn("trim", |s: ImmutableString| -> ImmutableString {
        s.trim().into()
    });
    // Likewise `replace`.
    engine.register_fn(
        "replace",
        |s: ImmutableString, from: ImmutableString, to: ImmutableString| -> String {
            s.replace(from.as_str(), to.as_str())
        },
    );
    engine.register_fn("log", |msg: Dynamic| {
        with_effects(|e| e.logs.push(display_value(&msg)))
    });
    engine.register_type_with_name::<EvidenceApi>("Evidence");
    engine.register_fn("note", |_: &mut EvidenceApi, msg: Dynamic| {
        with_effects(|e| e.notes.push(display_value(&msg)));
    });
    engine.register_type_with_name::<DrillApi>("Drill");
    engine.register_fn("start_clock", |_: &mut DrillApi| {
        with_effects(|e| e.clock.push(true));
    });
    engine.register_fn("stop_clock", |_: &mut DrillApi| {
        with_effects(|e| e.clock.push(false));
    });
    engine.register_type_with_name::<InventoryApi>("Inventory");
    engine.register_fn(
        "add_host",
        |_: &mut InventoryApi, name: ImmutableString, spec: Dynamic| -> FnResult<()> {
            let new = crate::inventory::NewHost {
                name: name.to_string(),
                spec: dynamic_to_json(&spec),
            };
            // Checked now, so that a bad host fails the expression that added it.
            crate::inventory::Inventory::default()
                .add_host(&new)
                .map_err(|e| runtime_error(e.to_string()))?;
            with_effects(|e| e.new_hosts.push(new));
            Ok(())
        },
    );
    engine.register_fn(
        "hosts",
        |inv: &mut InventoryApi, selector: ImmutableString| -> FnResult<rhai::Array> {
            let sel = crate::model::Selector::parse(&selector).map_err(runtime_error)?;
            let hosts = inv.0.select(&sel).map_err(runtime_error)?;
            Ok(hosts
                .iter()
                .map(|h| json_to_dynamic(&h.to_json()))
                .collect())
        },
    );
    engine.register_fn("fail", |msg: Dynamic| -> FnResult<Dynamic> {
        Err(runtime_error(format!("{FAIL_MARK}{}", display_value(&msg))))
    });
    engine.register_fn("secret", |value: Dynamic| -> Dynamic {
        let text = display_value(&value);
        with_effects(|e| e.secrets.push(("secret".into(), text)));
        value
    });
    engine.register_fn(
        "secret",
        |name: ImmutableString, value: Dynamic| -> Dynamic {
            let text = display_value(&value);
            with_effects(|e| e.secrets.push((name.to_string(), text)));
            value
        },
    );
    engine.register_fn("parse_json", |text: ImmutableString| -> FnResult<Dynamic> {
        serde_json::from_str::<serde_json::Value>(&text)
            .map(|v| json_to_dynamic(&v))
            .map_err(|e| runtime_error(format!("parse_json: {e}")))
    });
    engine.register_fn("to_json", |value: Dynamic| -> String {
        dynamic_to_json(&value).to_string()
    });
    engine.register_fn("sha256", |text: ImmutableString| -> String {
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    });
    // Time: instants are Unix seconds (floats), durations are seconds.
    engine.register_fn("now", || -> f64 { unix_now() });
    engine.register_fn("timestamp", |text: ImmutableString| -> FnResult<f64> {
        parse_timestamp(&text).ok_or_else(|| {
            runtime_error(format!(
                "timestamp: `{text}` is not an RFC 3339 time or Unix seconds"
            ))
        })
    });
    engine.register_fn("age", |text: ImmutableString| -> FnResult<f64> {
        parse_timestamp(&text)
            .map(|t| unix_now() - t)
            .ok_or_else(|| {
                runtime_error(format!(
                    "age: `{text}` is not an RFC 3339 time or Unix seconds"
                ))
            })
    });
    engine.register_fn("duration", |text: ImmutableString| -> FnResult<f64> {
        crate::duration::parse_duration(&text)
            .map(|d| d.as_secs_f64())
            .map_err(|e| runtime_error(format!("duration: {e}")))
    });
    engine.register_fn("format_duration", |secs: f64| -> String {
        crate::duration::format_spec(std::time::Duration::from_secs_f64(secs.max(0.0)))
    });
    engine.register_fn("format_duration", |secs: i64| -> String {
        crate::duration::format_spec(std::time::Duration::from_secs(
            u64::try_from(secs).unwrap_or(0),
        ))
    });
    engine.register_fn("format_time", |secs: f64| -> String {
        chrono::DateTime::from_timestamp_millis((secs * 1000.0) as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default()
    });
}

fn unix_now() -> f64 {
    let now = chrono::Utc::now();
    now.timestamp() as f64 + f64::from(now.timestamp_subsec_millis()) / 1000.0
}

pub fn parse_timestamp(text: &str) -> Option<f64> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return Some(secs);
    }
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.timestamp() as f64 + f64::from(d.timestamp_subsec_millis()) / 1000.0)
}

/// Converts JSON (params, captured output) into Rhai values.
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

/// Converts a Rhai value to JSON (outputs in evidence, `to_json`).
pub fn dynamic_to_json(value: &Dynamic) -> serde_json::Value {
    use serde_json::Value;
    if value.is_unit() {
        Value::Null
    } else if let Ok(b) = value.as_bool() {
        Value::Bool(b)
    } else if let Ok(i) = value.as_int() {
        Value::from(i)
    } else if let Ok(f) = value.as_float() {
        serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
    } else if let Some(s) = value.clone().try_cast::<ImmutableString>() {
        Value::String(s.to_string())
    } else if let Some(a) = value.clone().try_cast::<rhai::Array>() {
        Value::Array(a.iter().map(dynamic_to_json).collect())
    } else if let Some(m) = value.clone().try_cast::<Map>() {
        Value::Object(
            m.iter()
                .map(|(k, v)| (k.to_string(), dynamic_to_json(v)))
                .collect(),
        )
    } else {
        Value::String(value.to_string())
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

/// Whether a condition's value counts as true. Only booleans are accepted: `when = "1"` is
/// more likely a mistake than a wish.
pub fn truthy(value: &Dynamic) -> Result<bool, String> {
    value
        .as_bool()
        .map_err(|t| format!("got a value of type {t}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(code: &str) -> Result<Dynamic, EvalError> {
        let host = ExprHost::new();
        let expr = host
            .compile_expression(code, Context::Result)
            .expect("compiles");
        let mut scope = Scope::new();
        scope.push_constant("params", json_to_dynamic(&serde_json::json!({"a": 41})));
        scope.push_constant(
            "output",
            json_to_dynamic(&serde_json::json!({"stdout": "  tok \n"})),
        );
        host.eval(&expr, &mut scope)
    }

    #[test]
    fn evaluates_with_scope() {
        assert_eq!(display_value(&eval("params.a + 1").expect("ok")), "42");
        assert_eq!(
            display_value(&eval("output.stdout.trim()").expect("ok")),
            "tok"
        );
        assert_eq!(
            display_value(&eval("sha256(\"abc\")").expect("ok")).len(),
            64
        );
        assert_eq!(
            display_value(&eval("to_json(parse_json(`{\"x\":[1,2]}`))").expect("ok")),
            "{\"x\":[1,2]}"
        );
        assert_eq!(
            display_value(&eval("duration(\"1h30m\")").expect("ok")),
            "5400.0"
        );
    }

    #[test]
    fn unknown_variables_and_properties_are_errors() {
        let host = ExprHost::new();
        let err = host
            .compile_expression("parms.a", Context::Step)
            .expect_err("strict");
        assert!(err.message.contains("parms"), "{err:?}");
        assert!(
            host.compile_expression("output.stdout", Context::Step)
                .is_err(),
            "no output before the attempt"
        );
        let err = eval("params.b").expect_err("missing property");
        assert!(err.message.contains("not found"), "{err:?}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = ExprHost::new()
            .compile_expression("params.a +", Context::Step)
            .expect_err("must fail");
        assert_eq!(err.line, 1);
        assert!(err.column >= 10, "{err:?}");
    }

    #[test]
    fn effects_are_collected_and_fail_is_recognised() {
        let host = ExprHost::new();
        let script = host
            .compile_script("log(\"hi\"); evidence.note(\"noted\"); let t = secret(\"tok\", \"abc\"); fail(`bad ${t}`)", Context::RunHook)
            .expect("compiles");
        let mut scope = Scope::new();
        let (result, effects) = host.eval_with_effects(&script, &mut scope);
        let err = result.expect_err("fail() fails");
        assert!(err.failed && err.message == "bad abc", "{err:?}");
        assert_eq!(effects.logs, vec!["hi"]);
        assert_eq!(effects.notes, vec!["noted"]);
        assert_eq!(effects.secrets, vec![("tok".to_owned(), "abc".to_owned())]);
    }

    #[test]
    fn runaway_loops_are_stopped_quickly() {
        let host = ExprHost::new();
        let script = host
            .compile_script("let x = 0; loop { x += 1; }", Context::RunHook)
            .expect("compiles");
        let started = std::time::Instant::now();
        let err = host
            .eval(&script, &mut Scope::new())
            .expect_err("must stop");
        assert!(
            err.message.to_lowercase().contains("too many operations"),
            "{err:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
