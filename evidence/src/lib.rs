//! Evidence bundles: the recorder that turns run events into a directory an assessor can check
//! (journal, per-attempt logs, manifest, collected files, checksums).
//!
//! Layout (see docs/evidence.md):
//! ```text
//! <evidence-dir>/<runbook>/<yyyymmddThhmmssZ>-<run id>/
//!   manifest.json  journal.jsonl  runbook/  steps/<id>/<target>/attempt-<n>.log
//!   collected/<step>/…  SHA256SUMS
//! ```

pub mod cast;
pub mod chain;
pub mod checksums;
pub mod collect;
mod crash;
pub mod fs;
pub mod journal;
pub mod junit;
pub mod log;
pub mod log_tail;
pub mod manifest;
pub mod metrics;
pub mod recorder;
pub mod redact;
pub mod report;
pub mod resume;
pub mod run_view;
pub mod scrub;
pub mod sign;
#[cfg(test)]
mod test_support;
pub mod tsa;
pub mod verify;

pub use recorder::{Recorder, RecorderConfig};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("cannot write evidence to `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn write_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EvidenceError {
    let path = path.into();
    move |source| EvidenceError::Write { path, source }
}
