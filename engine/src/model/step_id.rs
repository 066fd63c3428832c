//! Step ids: the names steps, hosts and groups share, and the directories they name in a
//! bundle.

use std::fmt;
use std::sync::Arc;

/// A step id: letters, digits, `-`, `_`, `.`; it names a directory in the evidence bundle.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct StepId(Arc<str>);

impl StepId {
    pub fn new(id: &str) -> Self {
        Self(Arc::from(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The form used to detect ids that collide in practice (`Build_Image` vs `build-image`).
    pub fn normalized(&self) -> String {
        self.0.to_lowercase().replace('_', "-")
    }

    /// Whether `id` is acceptable as a step id or runbook name.
    pub fn is_valid(id: &str) -> bool {
        let mut chars = id.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
            && id.len() <= 64
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
