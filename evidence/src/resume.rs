//! What `runbook resume` reads from an interrupted bundle before it continues it: the manifest,
//! the runbook the run started with (and whether it changed since), the params it was given,
//! whether it died while sealing, and the processes its attempts left running; and whether a
//! dead run's bundle leaves anything to resume at all (the lock's takeover policy). Reading only:
//! the CLI decides, takes the lock and reopens the recorder.

use std::path::{Path, PathBuf};

use runbook_engine::event::{RunEvent, RunStatus};

use crate::checksums::sha256_bytes;
use crate::manifest::Manifest;
use crate::recorder::{check_journal_covers_bundle, JournalBehind};
use crate::sign::PublicKey;
use crate::verify::{verify_bundle, Problem};

/// Why a bundle cannot be resumed.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("`{path}` is not a runbook bundle: {reason}")]
    NotABundle { path: PathBuf, reason: String },
    /// A journal that lost lines (emptied, cut short) would number attempts again from what
    /// it knows and overwrite logs already written.
    #[error(
        "cannot resume `{bundle}`: {source}; resuming would overwrite evidence already written, \
         so nothing was changed"
    )]
    JournalBehind {
        bundle: PathBuf,
        #[source]
        source: JournalBehind,
    },
}

/// An interrupted bundle, as far as resuming it needs.
#[derive(Debug)]
pub struct Interrupted {
    pub bundle: PathBuf,
    pub manifest: Manifest,
}

/// The runbook a bundle ran, compared with the file as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunbookNow {
    /// Where the file is (relative paths resolve against the run's work directory).
    pub path: PathBuf,
    /// sha256 of the file now.
    pub sha256: String,
    /// sha256 the run started with.
    pub recorded: String,
}

impl RunbookNow {
    pub fn changed(&self) -> bool {
        self.sha256 != self.recorded
    }
}

impl Interrupted {
    /// Reads the bundle's manifest. Writes nothing.
    pub fn open(bundle: &Path) -> Result<Interrupted, ResumeError> {
        let path = bundle.join("manifest.json");
        let manifest: Manifest = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|d| serde_json::from_slice(&d).map_err(|e| e.to_string()))
            .map_err(|reason| ResumeError::NotABundle {
                path: path.clone(),
                reason,
            })?;
        Ok(Interrupted {
            bundle: bundle.to_path_buf(),
            manifest,
        })
    }

    /// Checks that the journal covers every file the bundle holds (call it once no live run
    /// holds the bundle: a live one writes files right after their journal lines).
    pub fn check_journal(&self) -> Result<(), ResumeError> {
        check_journal_covers_bundle(&self.bundle).map_err(|source| ResumeError::JournalBehind {
            bundle: self.bundle.clone(),
            source,
        })
    }

    /// The run's work directory (relative paths of the run resolve against it).
    pub fn workdir(&self) -> PathBuf {
        PathBuf::from(&self.manifest.workdir)
    }

    /// The directory the bundle sits in (where the run lock lives).
    pub fn evidence_dir(&self) -> PathBuf {
        self.bundle
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }

    /// The path of the runbook the run started with.
    pub fn runbook_path(&self) -> PathBuf {
        let recorded = PathBuf::from(&self.manifest.runbook.path);
        if recorded.is_absolute() {
            recorded
        } else {
            self.workdir().join(recorded)
        }
    }

    /// The runbook's text now against the digest the run recorded.
    pub fn runbook_now(&self, text: &str) -> RunbookNow {
        RunbookNow {
            path: self.runbook_path(),
            sha256: sha256_bytes(text.as_bytes()),
            recorded: self.manifest.runbook.sha256.clone(),
        }
    }

    /// The params the run was given, as `NAME=VALUE` for `--set`, for those `public` accepts
    /// (the CLI passes declared, non-secret params). Secrets are never recorded: they come
    /// from where they came the first time (environment, `--set`).
    pub fn recorded_params(&self, public: impl Fn(&str) -> bool) -> Vec<String> {
        let serde_json::Value::Object(params) = &self.manifest.params else {
            return Vec::new();
        };
        params
            .iter()
            .filter(|(name, _)| public(name))
            .map(|(name, value)| {
                let text = match value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                format!("{name}={text}")
            })
            .collect()
    }

    /// The journal says the run ended (`status`), but the runner died while sealing:
    /// `SHA256SUMS` is missing or disagrees with the files or the manifest, a temporary file
    /// of sealing is left, or what this resume is asked to add is not there yet — the
    /// signature of `signed_by` (missing, or over other checksums) or the RFC 3161 token
    /// (`stamped`).
    pub fn died_while_sealing(
        &self,
        status: RunStatus,
        signed_by: Option<&PublicKey>,
        stamped: bool,
    ) -> bool {
        if matches!(status, RunStatus::Running | RunStatus::Interrupted) {
            return false;
        }
        if crate::fs::has_leftovers(&self.bundle) {
            return true;
        }
        let report = verify_bundle(&self.bundle, signed_by);
        let unsealed = report.problems.iter().any(|p| {
            matches!(
                p,
                Problem::SumsMissing
                    | Problem::Modified { .. }
                    | Problem::Missing { .. }
                    | Problem::Extra { .. }
                    | Problem::MalformedSums { .. }
                    | Problem::ManifestDisagrees { .. }
            )
        });
        let unsigned = signed_by.is_some() && !report.problems.is_empty();
        let unstamped = stamped && !self.bundle.join("SHA256SUMS.tsr").is_file();
        unsealed || unsigned || unstamped
    }

    /// Local processes the journal says were started and never reported ended.
    pub fn unfinished_processes(&self) -> Vec<LeftoverProcess> {
        crate::journal::read(&self.bundle.join("journal.jsonl"))
            .map(|read| unfinished_processes(&read.events))
            .unwrap_or_default()
    }
}

/// A step's process a killed runner may have left running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftoverProcess {
    pub step: String,
    pub attempt: u32,
    /// The process (and process group) id.
    pub pid: u32,
    /// Its start time in clock ticks since boot, to tell it from a later process with the same
    /// pid.
    pub start_ticks: Option<u64>,
}

/// Local attempts that started a process but never reported an end.
pub fn unfinished_processes(events: &[(u64, RunEvent)]) -> Vec<LeftoverProcess> {
    let mut open: Vec<(String, String, LeftoverProcess)> = Vec::new();
    for (_, e) in events {
        match e {
            RunEvent::ProcessStarted {
                step,
                target,
                attempt,
                pid,
                start_ticks,
                ..
            } => open.push((
                step.to_string(),
                target.to_string(),
                LeftoverProcess {
                    step: step.to_string(),
                    attempt: *attempt,
                    pid: *pid,
                    start_ticks: *start_ticks,
                },
            )),
            RunEvent::AttemptFinished {
                step,
                target,
                attempt,
                ..
            } => open.retain(|(s, t, p)| {
                !(s == step.as_str() && t == &**target && p.attempt == *attempt)
            }),
            _ => {}
        }
    }
    open.into_iter().map(|(_, _, p)| p).collect()
}

/// Whether a dead run's bundle leaves nothing for `resume` to do: it is gone, its journal
/// records no attempt, or its last start or resume ended with `run_finished` (perhaps unsealed:
/// `runbook resume` seals it). The lock's takeover policy asks this of a dead holder's bundle.
pub fn nothing_to_resume(bundle: &Path) -> bool {
    let Ok(journal) = crate::journal::read(&bundle.join("journal.jsonl")) else {
        return true;
    };
    let (mut attempted, mut finished) = (false, false);
    for (_, event) in &journal.events {
        match event {
            RunEvent::RunStarted { .. } | RunEvent::RunResumed { .. } => finished = false,
            RunEvent::AttemptStarted { .. } => attempted = true,
            RunEvent::RunFinished { .. } => finished = true,
            _ => {}
        }
    }
    finished || !attempted
}
