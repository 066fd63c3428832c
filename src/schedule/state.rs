//! The scheduler's state file: per entry the last fire and the last outcome, so that catch-up
//! after downtime and the metrics survive a restart. Written atomically (temporary file in the
//! same directory, synced, renamed), so a crash leaves the old state or the new, never half.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::notify::DrillTarget;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub entries: BTreeMap<String, EntryState>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EntryState {
    /// When the last run was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fire: Option<DateTime<Utc>>,
    /// The scheduled time the last run was for (before jitter); catch-up compares with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_slot: Option<DateTime<Utc>>,
    /// When a run last ended with exit 0 (a drill that met its targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<Outcome>,
}

impl EntryState {
    /// The time catch-up counts missed fires from.
    pub fn fired_for(&self) -> Option<DateTime<Utc>> {
        self.last_slot.or(self.last_fire)
    }
}

/// How one firing ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// One of [`super::child::STATES`].
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub duration_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto: Option<DrillTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo: Option<DrillTarget>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_steps: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the state file `{path}`: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the state file `{path}` is not valid: {source} (move it away to start afresh)")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the state file `{path}`: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl State {
    /// The state in `path`, or an empty one when the file does not exist yet.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        serde_json::from_str(&text).map_err(|source| StateError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: path.display().to_string(),
            source,
        };
        let text = serde_json::to_string_pretty(self).unwrap_or_default() + "\n";
        runbook_evidence::fs::write_atomic(path, text.as_bytes()).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_a_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.json");
        assert!(State::load(&path).expect("empty").entries.is_empty());
        let mut s = State::default();
        s.entries.insert(
            "a".into(),
            EntryState {
                last_fire: Some("2020-01-01T00:00:00Z".parse().expect("t")),
                ..EntryState::default()
            },
        );
        s.save(&path).expect("save");
        let back = State::load(&path).expect("load");
        assert_eq!(
            back.entries["a"].fired_for(),
            Some("2020-01-01T00:00:00Z".parse().expect("t"))
        );
        std::fs::write(&path, "{").expect("write");
        assert!(matches!(State::load(&path), Err(StateError::Parse { .. })));
    }
}
