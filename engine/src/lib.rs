//! The runbook engine: everything between a runbook file and a stream of run events, with no
//! process, network or file-writing code of its own.
//!
//! Pipeline: [`analyzer::analyze`] (parse + validate, spanned diagnostics) → [`graph::StepGraph`]
//! (compile) → [`plan::Plan`] (params bound, selection applied) → [`executor::Executor`]
//! (schedule attempts on a [`runner::StepRunner`]) → [`event::RunEvent`]s for consumers such as
//! the evidence recorder.

pub mod analyzer;
pub mod backoff;
pub mod diagnostic;
pub mod duration;
pub mod event;
pub mod executor;
pub mod expr;
pub mod fs;
pub mod graph;
pub mod inventory;
pub mod model;
pub mod params;
pub mod plan;
pub mod redact;
pub mod request_check;
pub mod retry;
pub mod run_state;
pub mod runbook;
pub mod runner;
pub mod serde_duration;
pub mod source;
pub mod step_kind;
pub mod template;

use std::path::Path;
use std::sync::Arc;

pub use diagnostic::{Diagnostic, Diagnostics};
pub use runbook::Runbook;
pub use source::Source;

/// Reading a runbook failed before it could be checked.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { path: String, offset: usize },
}

/// Reads a file into a [`Source`].
pub fn load_source(path: &Path) -> Result<Arc<Source>, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| LoadError::NotUtf8 {
        path: path.display().to_string(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    Ok(Source::new(path, text))
}

/// Parse, validate and compile in one call: the runbook and its graph, or every diagnostic.
pub fn compile(
    source: &Arc<Source>,
    host: &expr::ExprHost,
) -> Result<(Arc<Runbook>, graph::StepGraph, Diagnostics), Diagnostics> {
    let (runbook, mut diags) = analyzer::analyze(source, host);
    let Some(runbook) = runbook else {
        return Err(diags);
    };
    // Graph problems (unknown needs, cycles) are reported in the same pass as the rest.
    match graph::StepGraph::compile(&runbook) {
        Ok(graph) if !diags.has_errors() => Ok((Arc::new(runbook), graph, diags)),
        Ok(_) => Err(diags),
        Err(more) => {
            diags.extend(more);
            diags.sort();
            Err(diags)
        }
    }
}
