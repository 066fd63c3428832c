//! Which `params.NAME` and `steps.ID` an expression reads, found in Rhai's syntax tree: a
//! mention inside a string literal or a comment is not a read, and `p.params.x` (a property
//! named `params`) is not the parameters.

use std::sync::LazyLock;

use rhai::{ASTNode, Engine, Expr, OptimizationLevel, AST};

use crate::runbook::{Action, Gate, Located, Need, Runbook, StepId, StepSpec, StrategyKind};
use crate::template::Template;

/// Only the syntax tree is needed: the expression was compiled with the runbook's engine
/// (functions, limits, variables) before. No optimisation, so that `if false { steps.a }`
/// still reads `steps.a` as written.
static PARSER: LazyLock<Engine> = LazyLock::new(|| {
    let mut engine = Engine::new_raw();
    engine
        .set_optimization_level(OptimizationLevel::None)
        .set_max_expr_depths(0, 0);
    engine
});

fn parse(code: &str) -> Option<AST> {
    PARSER
        .compile_expression(code)
        .or_else(|_| PARSER.compile(code))
        .ok()
}

/// Character offset of a Rhai position (1-based line and column) in `code`.
fn offset(code: &str, pos: rhai::Position) -> Option<usize> {
    Some(Located::offset_of(code, pos.line()?, pos.position()?))
}

/// The first link of a chain: `a` in `a.b.c` or `a[1].b`.
fn first_link(e: &Expr) -> &Expr {
    match e {
        Expr::Dot(x, ..) | Expr::Index(x, ..) => first_link(&x.lhs),
        other => other,
    }
}

/// Each `ROOT.NAME` and `ROOT["NAME"]` in `code` where `ROOT` is a variable: the name and the
/// offset of `ROOT`, in order.
fn reads_of(code: &str, root: &str) -> Vec<(String, usize)> {
    parse(code).map_or_else(Vec::new, |ast| reads_in(code, &ast, root))
}

/// As [`reads_of`], in an already compiled `ast` of `code`.
fn reads_in(code: &str, ast: &AST, root: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        let Some(ASTNode::Expr(e)) = path.last() else {
            return true;
        };
        let name = match e {
            Expr::Dot(x, ..) => match first_link(&x.rhs) {
                Expr::Property(p, _) => Some(p.2.to_string()),
                _ => None,
            },
            Expr::Index(x, ..) => match first_link(&x.rhs) {
                Expr::StringConstant(s, _) => Some(s.to_string()),
                _ => None,
            },
            _ => None,
        };
        let (Some(name), Expr::Dot(x, ..) | Expr::Index(x, ..)) = (name, e) else {
            return true;
        };
        if let Expr::Variable(v, _, pos) = &x.lhs {
            if v.1.as_str() == root && v.2.is_empty() && !name.is_empty() {
                if let Some(at) = offset(code, *pos) {
                    out.push((name, at));
                }
            }
        }
        true
    });
    out.sort_by_key(|(_, at)| *at);
    out.dedup();
    out
}

/// `ROOT.NAME` and `ROOT["NAME"]` references in a compiled expression.
pub(super) fn expr_references(expr: &crate::expr::Expr, root: &str) -> Vec<(String, usize)> {
    reads_in(&expr.text, &expr.ast, root)
}

/// `ROOT.NAME` and `ROOT["NAME"]` references in an expression (`params`, `steps`), with the
/// offset of each.
pub fn references(code: &str, root: &str) -> Vec<(String, usize)> {
    reads_of(code, root)
}

/// Offsets of each `ROOT.PROP` read in a compiled expression (`output.json`), `ROOT` being a
/// variable.
pub(super) fn property_paths(expr: &crate::expr::Expr, root: &str, prop: &str) -> Vec<usize> {
    expr_references(expr, root)
        .into_iter()
        .filter(|(name, _)| name == prop)
        .map(|(_, at)| at)
        .collect()
}

/// The `steps.<id>` an expression at `offset` inside a located string reads, each with the
/// span of its mention (the whole string when escapes blur positions).
pub(crate) fn refs_in(code: &str, offset: usize, at: &Located) -> Vec<Need> {
    needs(step_references(code), offset, at)
}

fn needs(reads: Vec<(String, usize)>, offset: usize, at: &Located) -> Vec<Need> {
    needs_of(reads, offset, at, "steps")
}

fn needs_of(reads: Vec<(String, usize)>, offset: usize, at: &Located, root: &str) -> Vec<Need> {
    reads
        .into_iter()
        .map(|(name, pos)| {
            let span = match at.origin {
                Some(_) => {
                    let start = at.at(offset + pos).start;
                    start..start + root.len() + 1 + name.len()
                }
                None => at.span.clone(),
            };
            Need {
                id: StepId::new(&name),
                span,
            }
        })
        .collect()
}

/// [`refs_in`] for a compiled expression: its syntax tree is walked, not parsed again.
pub(super) fn expr_refs_in(expr: &crate::expr::Expr, offset: usize, at: &Located) -> Vec<Need> {
    needs(expr_references(expr, "steps"), offset, at)
}

/// The `ROOT.NAME` an expression reads (`block.drain` in a sub-step), each with where.
pub(super) fn expr_reads_of(
    expr: &crate::expr::Expr,
    offset: usize,
    at: &Located,
    root: &str,
) -> Vec<Need> {
    needs_of(expr_references(expr, root), offset, at, root)
}

/// `steps.ID` and `steps["ID"]` references in an expression, with their offsets.
pub fn step_references(code: &str) -> Vec<(String, usize)> {
    references(code, "steps")
}

/// Whether a script calls `NAME(…)` or `x.NAME(…)` (`add_host`).
pub fn calls(code: &str, name: &str) -> bool {
    let Some(ast) = parse(code) else {
        // It compiled with the runbook's engine, so this is not expected; cannot tell, so
        // assume it may.
        return code.contains(name);
    };
    let mut found = false;
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(Expr::FnCall(f, _) | Expr::MethodCall(f, _))) = path.last() {
            found |= f.name.as_str() == name;
        }
        !found
    });
    found
}

/// Whether any expression or template of the runbook calls `NAME` (`add_host`: a runbook
/// that adds hosts at run time is checked against an inventory that is not complete yet).
pub fn runbook_calls(runbook: &Runbook, name: &str) -> bool {
    let h = &runbook.hooks;
    let top = [
        &h.before_run,
        &h.after_run,
        &h.before_step,
        &h.after_step,
        &h.on_failure,
    ]
    .into_iter()
    .flatten()
    .chain(
        runbook
            .drill
            .iter()
            .flat_map(|d| d.restored_data_time.iter()),
    )
    .any(|e| calls(&e.expr.text, name));
    top || runbook.steps.iter().any(|s| step_calls(s, name))
}

fn step_calls(step: &StepSpec, name: &str) -> bool {
    let exprs = [
        &step.when,
        &step.until,
        &step.check,
        &step.before,
        &step.after,
    ]
    .into_iter()
    .flatten()
    .chain(step.outputs.iter().map(|(_, e)| e));
    let mut templates: Vec<&Template> = step
        .env
        .iter()
        .map(|(_, t)| t)
        .chain(step.cwd.iter())
        .chain(step.collect.iter())
        .chain(step.plan.iter())
        .collect();
    let mut found = false;
    match &step.action {
        Action::Run { command } => templates.push(command),
        Action::Script { script } => found |= calls(&script.expr.text, name),
        Action::Request { spec, .. } => templates.extend(spec.templates()),
        Action::Block { steps } => found |= steps.iter().any(|s| step_calls(s, name)),
    }
    if let StrategyKind::Rolling {
        gate: Some(gate), ..
    } = &step.strategy.kind
    {
        found |= match gate {
            Gate::Step(probe) => step_calls(probe, name),
            Gate::Expr(e) => calls(&e.expr.text, name),
        };
    }
    found
        || exprs.into_iter().any(|e| calls(&e.expr.text, name))
        || templates
            .into_iter()
            .any(|t| t.expressions().any(|(e, _)| calls(&e.text, name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_param_references() {
        let refs = references(
            "params.a + params[\"b\"] + xparams.c + p.params.d",
            "params",
        );
        assert_eq!(refs, vec![("a".into(), 0), ("b".into(), 11)]);
    }

    #[test]
    fn reads_in_chains_and_scripts() {
        assert_eq!(
            step_references("steps.a.outputs.x + steps[\"b-c\"].outputs.y"),
            vec![("a".into(), 0), ("b-c".into(), 20)]
        );
        assert_eq!(
            step_references("let v = steps.a.rc;\nif v == 0 { steps[\"b\"][\"rc\"] } else { 1 }"),
            vec![("a".into(), 8), ("b".into(), 32)]
        );
    }

    #[test]
    fn reads_inside_closures_count() {
        assert_eq!(
            references("steps.a.outputs.list.filter(|x| x > params.min)", "params"),
            vec![("min".into(), 36)]
        );
    }

    #[test]
    fn strings_and_comments_are_not_reads() {
        // The substring scanner this replaced took both for reads of step `x`.
        assert_eq!(
            step_references("\"steps.x\" + steps.a // steps.y\n"),
            vec![("a".into(), 12)]
        );
        assert!(step_references("`was ${steps.b.rc}`")
            .iter()
            .any(|(n, _)| n == "b"));
        let host = crate::expr::ExprHost::new();
        let e = host
            .compile_expression(
                "output.json.a + \"output.json\"",
                crate::expr::Context::Result,
            )
            .expect("compiles");
        assert_eq!(property_paths(&e, "output", "json"), vec![0]);
    }

    #[test]
    fn calls_are_found_as_calls() {
        assert!(calls("inventory.add_host(\"n\", #{})", "add_host"));
        assert!(calls("let x = 1;\nadd_host(\"n\", #{})", "add_host"));
        assert!(!calls("print(\"add_host\") // add_host(", "add_host"));
    }
}
