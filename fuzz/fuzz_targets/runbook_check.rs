//! Arbitrary text through everything `runbook check` and `runbook plan` do with a file:
//! parse + validate + graph compile, the CLI's own diagnostic rendering (`src/render.rs`,
//! included as is), and for a runbook that compiles: default params, a plan with the default
//! selection, its text, and the graph in every format.
//!
//! Properties besides "no panic, no hang": a failed compile has at least one error, every
//! diagnostic has a primary position that starts inside the file (`file:line:col`), and each
//! error shows up in the rendered text.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use runbook_engine::expr::ExprHost;
use runbook_engine::params::BoundParams;
use runbook_engine::plan::{Plan, RunInfo, Selection};
use runbook_engine::Source;

#[allow(dead_code)]
#[path = "../../src/render.rs"]
mod render;

fn host() -> &'static ExprHost {
    static HOST: OnceLock<ExprHost> = OnceLock::new();
    HOST.get_or_init(ExprHost::new)
}

fuzz_target!(|text: &str| {
    let source = Source::new("fuzz.toml", text);
    let host = host();
    match runbook_engine::compile(&source, host) {
        Ok((runbook, graph, warnings)) => {
            let _ = render::diagnostics_to_string(&warnings.0, false);
            let _ = graph.to_text(&runbook);
            let _ = graph.to_dot(&runbook);
            let _ = graph.to_mermaid(&runbook);
            let Ok(params) = BoundParams::bind(&runbook, &[], |_| None) else {
                return;
            };
            let Ok(plan) = Plan::new(
                runbook,
                graph,
                params,
                &Selection::default(),
                PathBuf::from("/nonexistent"),
            ) else {
                return;
            };
            let run = RunInfo {
                id: "0badf00d".into(),
                started_at: chrono::DateTime::UNIX_EPOCH,
            };
            let _ = plan.to_text(host, &run);
        }
        Err(diags) => {
            assert!(diags.has_errors(), "compile failed without an error: {diags:?}");
            for d in diags.iter() {
                let label = d
                    .primary
                    .as_ref()
                    .unwrap_or_else(|| panic!("diagnostic without a position: {d}"));
                // An error at the very end of the file may reach one byte past it (a
                // one-character caret after the last character); the renderer copes with that,
                // and the rendering below is the real check.
                assert!(
                    label.span.start <= label.span.end && label.span.start <= text.len(),
                    "span {:?} outside the file ({} bytes): {d}",
                    label.span,
                    text.len()
                );
                let _ = d.to_string();
            }
            let rendered = render::diagnostics_to_string(&diags.0, false);
            for d in diags.iter().filter(|d| d.is_error()) {
                let header = format!("error[{}]: {}", d.code, d.message);
                assert!(
                    rendered.contains(&header),
                    "diagnostic missing from the rendered output: {header}\n--- rendered\n{rendered}"
                );
            }
        }
    }
});
