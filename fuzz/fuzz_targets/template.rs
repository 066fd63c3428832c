//! Arbitrary text as a `{{ … }}` template in a step field: parse, then render with a small
//! scope like the one a step sees. Properties: no panic or hang; a parse error's offset is a
//! character boundary inside the text; each expression's offset points at its own text.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rhai::Scope;
use runbook_engine::expr::{json_to_dynamic, Context, ExprHost};
use runbook_engine::template::Template;

fn host() -> &'static ExprHost {
    static HOST: OnceLock<ExprHost> = OnceLock::new();
    HOST.get_or_init(ExprHost::new)
}

fn scope() -> Scope<'static> {
    let mut scope = Scope::new();
    scope.push_constant(
        "params",
        json_to_dynamic(&serde_json::json!({
            "v": "v1.31", "n": 3, "f": 0.5, "yes": true,
            "hosts": ["a", "b"], "map": {"k": "v"}, "token": "s3cr3t"
        })),
    );
    scope.push_constant(
        "run",
        json_to_dynamic(&serde_json::json!({
            "id": "0badf00d", "runbook": "fuzz", "started_at": "2026-01-01T00:00:00Z"
        })),
    );
    scope.push_constant("env", json_to_dynamic(&serde_json::json!({"HOME": "/root"})));
    scope.push_constant(
        "steps",
        json_to_dynamic(&serde_json::json!({
            "a": {"status": "succeeded", "exit_code": 0, "stdout": "out\n", "stderr": "",
                  "attempts": 1, "outputs": {"x": 1}}
        })),
    );
    scope
}

fuzz_target!(|text: &str| {
    let host = host();
    match Template::parse(text, host, Context::Step) {
        Ok(t) => {
            for (e, offset) in t.expressions() {
                assert_eq!(
                    text.get(offset..offset + e.text.len()),
                    Some(e.text.as_str()),
                    "expression offset {offset} does not point at its text"
                );
            }
            let _ = t.render(host, &mut scope());
        }
        Err(e) => {
            assert!(
                e.offset <= text.len() && text.is_char_boundary(e.offset),
                "error offset {} not a character boundary of the {}-byte text: {e:?}",
                e.offset,
                text.len()
            );
        }
    }
});
