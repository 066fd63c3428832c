//! The recorder: consumes run events in order and writes the bundle. The journal is appended
//! (and synced at attempt and step boundaries) before anything else, so a crash leaves a journal
//! that says what happened; logs stream as output arrives; `manifest.json` is written at the
//! start and the end, and can always be rebuilt from the journal ([`Recorder::reopen`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use runbook_engine::event::{RunEvent, RunStatus, StepStatus};
use runbook_engine::Runbook;

use crate::checksums;
use crate::log::LogWriter;
use crate::manifest::{
    ApprovalRecord, AttemptRecord, Collected, Engine, Manifest, Note, Operator, Resumption,
    RunbookInfo, StepRecord, FORMAT,
};
use crate::redact::{ByteRedactor, RedactFile as _};
use crate::{write_err, EvidenceError};

impl RecorderConfig {
    /// The runbook's `[evidence] redact` patterns with the built-in ones (checked valid
    /// when the runbook was).
    fn runbook_shapes(&self) -> crate::redact::ShapeRules {
        crate::redact::ShapeRules::new(&self.runbook.meta.redact).unwrap_or_default()
    }
}

/// What the recorder needs to know before the first event.
pub struct RecorderConfig {
    /// `<evidence-dir>`: bundles go to `<evidence-dir>/<runbook>/<stamp>-<run id>/`.
    pub evidence_dir: PathBuf,
    pub runbook: Arc<Runbook>,
    pub run_id: String,
    pub started_at: DateTime<Utc>,
    /// Parameter values with secrets already redacted, and where each came from.
    pub params: serde_json::Value,
    pub param_sources: serde_json::Map<String, serde_json::Value>,
    /// (name, value) of every secret: never written, anywhere.
    pub secrets: Vec<(String, String)>,
    pub operator: Operator,
    pub engine_version: String,
    pub workdir: PathBuf,
    pub command_line: Vec<String>,
    /// Run context (git commit, clock, facts): recorded as given, redacted.
    pub context: serde_json::Value,
    /// The inventory file the run started with, copied into `runbook/` with its sha256.
    pub inventory: Option<Arc<runbook_engine::Source>>,
}

type AttemptKey = (String, String, u32);

pub struct Recorder {
    dir: PathBuf,
    journal: File,
    journal_path: PathBuf,
    seq: u64,
    secrets: Vec<(String, String)>,
    redactor: ByteRedactor,
    /// Set when the journal holds boundary events not yet synced.
    unsynced: bool,
    /// `RUNBOOK_CRASH_AFTER_APPEND=N`: abort the process right after the N-th journal record
    /// (counted over the bundle's whole journal), as `kill -9` would at that instant. For the
    /// crash-point tests; documented in docs/operations.md.
    crash_after: Option<u64>,
    /// Half-made bundles of dead runs that `create` removed.
    removed_partials: Vec<PathBuf>,
    logs: HashMap<AttemptKey, LogWriter>,
    casts: HashMap<AttemptKey, crate::cast::CastWriter>,
    /// SHA-256 of closed logs and transcripts, from their writers (relative path → hex), for
    /// `SHA256SUMS`; a file rewritten or removed since is dropped from here and read at sealing.
    digests: HashMap<PathBuf, String>,
    manifest: Manifest,
    step_index: HashMap<String, usize>,
}

impl Recorder {
    /// Creates the bundle directory, copies the runbook into it and opens the journal. Fails
    /// before anything runs when the evidence directory cannot be written.
    ///
    /// The bundle is made under a hidden `.<name>.partial` name and renamed into place once its
    /// manifest is written, so a bundle directory never lacks `manifest.json`: a runner killed
    /// (or a disk that fills) half way leaves only the hidden directory, which the next run of
    /// the runbook removes (see [`Recorder::removed_partials`]).
    pub fn create(cfg: RecorderConfig) -> Result<Self, EvidenceError> {
        let shapes = cfg.runbook_shapes();
        let stamp = cfg.started_at.format("%Y%m%dT%H%M%SZ");
        let parent = cfg.evidence_dir.join(&cfg.runbook.meta.name);
        let name = format!("{stamp}-{}", cfg.run_id);
        let final_dir = parent.join(&name);
        let dir = parent.join(format!(".{name}.partial"));
        std::fs::create_dir_all(&dir).map_err(write_err(&dir))?;
        let removed_partials = remove_stale_partials(&parent, &dir);

        let source = &cfg.runbook.source;
        let file_name = source.path().file_name().map_or_else(
            || "runbook.toml".into(),
            |n| n.to_string_lossy().into_owned(),
        );
        let copy_rel = format!("runbook/{file_name}");
        let copy = dir.join(&copy_rel);
        std::fs::create_dir_all(dir.join("runbook")).map_err(write_err(dir.join("runbook")))?;
        std::fs::write(&copy, source.text()).map_err(write_err(&copy))?;
        let inventory = match &cfg.inventory {
            Some(inv) => {
                let name = inv.path().file_name().map_or_else(
                    || "inventory.toml".into(),
                    |n| n.to_string_lossy().into_owned(),
                );
                // Never overwrite the runbook's copy when both files have the same name.
                let rel = if format!("runbook/{name}") == copy_rel {
                    format!("runbook/inventory-{name}")
                } else {
                    format!("runbook/{name}")
                };
                let path = dir.join(&rel);
                std::fs::write(&path, inv.text()).map_err(write_err(&path))?;
                Some(RunbookInfo {
                    name,
                    title: None,
                    refs: Vec::new(),
                    path: inv.path().display().to_string(),
                    sha256: checksums::sha256_bytes(inv.text().as_bytes()),
                    copy: rel,
                })
            }
            None => None,
        };

        let journal_path = dir.join("journal.jsonl");
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)
            .map_err(write_err(&journal_path))?;

        let rb = &cfg.runbook;
        let steps: Vec<StepRecord> = rb
            .steps
            .iter()
            .map(|s| StepRecord {
                id: s.id.to_string(),
                phase: s.phase.clone(),
                status: None,
                reason: None,
                started_at: None,
                finished_at: None,
                duration_seconds: 0.0,
                attempts: Vec::new(),
                collected: Vec::new(),
                outputs: None,
                targets: Vec::new(),
            })
            .collect();
        let step_index = rb
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.to_string(), i))
            .collect();
        let manifest = Manifest {
            format: FORMAT.to_owned(),
            run_id: cfg.run_id.clone(),
            status: RunStatus::Running,
            reason: None,
            started_at: cfg.started_at,
            finished_at: None,
            duration_seconds: None,
            runbook: RunbookInfo {
                name: rb.meta.name.clone(),
                title: rb.meta.title.clone(),
                refs: rb.meta.refs.clone(),
                path: source.path().display().to_string(),
                sha256: checksums::sha256_bytes(source.text().as_bytes()),
                copy: copy_rel,
            },
            params: cfg.params,
            param_sources: cfg.param_sources.into_iter().collect(),
            operator: cfg.operator,
            engine: Engine {
                name: "runbook".to_owned(),
                version: cfg.engine_version,
            },
            workdir: cfg.workdir.display().to_string(),
            command_line: cfg.command_line,
            summary: Default::default(),
            steps,
            notes: Vec::new(),
            secrets: cfg.secrets.iter().map(|(n, _)| n.clone()).collect(),
            resumed: Vec::new(),
            approvals: Vec::new(),
            drill: None,
            hosts_added: Vec::new(),
            inventory,
            redactions: Default::default(),
            context: cfg.context,
        };
        let recorder = Self {
            dir,
            journal,
            journal_path,
            seq: 0,
            redactor: ByteRedactor::with_counts(&cfg.secrets, Some(Arc::default()))
                .with_shapes(shapes),
            secrets: cfg.secrets,
            unsynced: false,
            crash_after: crate::crash::after_append(),
            logs: HashMap::new(),
            casts: HashMap::new(),
            digests: HashMap::new(),
            manifest,
            step_index,
            removed_partials,
        };
        recorder.write_manifest()?;
        let mut recorder = recorder;
        // The open journal follows the directory's inode through the rename.
        std::fs::rename(&recorder.dir, &final_dir).map_err(write_err(&final_dir))?;
        std::fs::File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(write_err(&parent))?;
        recorder.journal_path = final_dir.join("journal.jsonl");
        recorder.dir = final_dir;
        Ok(recorder)
    }

    /// Half-made bundles of earlier runs that died while creating them (hidden `.partial`
    /// directories more than a minute old), removed by [`Recorder::create`].
    pub fn removed_partials(&self) -> &[PathBuf] {
        &self.removed_partials
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records one event: side effects on disk first (journal line, log files, collected
    /// copies), then the manifest in memory.
    pub fn record(&mut self, event: &RunEvent) -> Result<(), EvidenceError> {
        if let RunEvent::Output {
            at,
            step,
            target,
            attempt,
            stream,
            data,
        } = event
        {
            let key = (step.to_string(), target.to_string(), *attempt);
            // Redacted once, by the log's driver; the transcript shows the same bytes.
            match (self.logs.get_mut(&key), self.casts.get_mut(&key)) {
                (Some(log), cast) => {
                    let released = log.write_output(*at, *stream, data)?;
                    if let Some(cast) = cast {
                        cast.write_redacted(*at, *stream, &released.text)?;
                    }
                }
                (None, Some(cast)) => cast.write(*at, *stream, data)?,
                (None, None) => {}
            }
            return Ok(());
        }
        if let RunEvent::SecretRegistered {
            name, value, step, ..
        } = event
        {
            self.secrets.push((name.clone(), value.clone()));
            self.redactor = ByteRedactor::with_counts(&self.secrets, self.redactor.counts_handle())
                .with_shapes(self.redactor.shapes().clone());
            // Output that showed the value before it was known to be secret (a token printed
            // by the step whose `outputs` call `secret()`) is redacted after the fact.
            for log in self.logs.values_mut() {
                log.redactor = self.redactor.clone();
                log.rewrite_redacted()?;
            }
            for cast in self.casts.values_mut() {
                cast.redactor = self.redactor.uncounted();
                cast.rewrite_redacted()?;
            }
            if let Some(step) = step {
                // A compacted probe attempt has no files left (empty `log`).
                let closed: Vec<String> = self
                    .step_mut(step.as_str())
                    .map(|s| {
                        s.attempts
                            .iter()
                            .filter(|a| a.finished_at.is_some() && !a.log.is_empty())
                            .map(|a| a.log.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for rel in closed {
                    let path = self.dir.join(&rel);
                    self.digests.remove(Path::new(&rel));
                    self.digests
                        .remove(&PathBuf::from(&rel).with_extension("cast"));
                    self.redactor.redact_file(&path).map_err(write_err(&path))?;
                    // The attempt's transcript showed the same output. It is rewritten as a
                    // cast (event by event), uncounted: the log already counted the matches.
                    let cast = path.with_extension("cast");
                    if cast.is_file() {
                        crate::cast::redact_cast_file(&cast, &self.redactor.uncounted())?;
                    }
                }
            }
        }
        self.append_journal(event)?;
        let mut collected = None;
        match event {
            RunEvent::AttemptStarted {
                at,
                step,
                target,
                attempt,
                command,
                compact,
                ..
            } => {
                if *compact {
                    // Only the last probe attempt keeps its files; earlier ones are
                    // summarised by their journal events.
                    if let Some(prev) = self.previous_compact(step.as_str(), target) {
                        for ext in ["log", "cast"] {
                            let rel = prev.replace(".log", &format!(".{ext}"));
                            self.digests.remove(Path::new(&rel));
                            let path = self.dir.join(rel);
                            match std::fs::remove_file(&path) {
                                Ok(()) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                                Err(e) => return Err(write_err(&path)(e)),
                            }
                        }
                    }
                }
                let rel = attempt_log(step.as_str(), target, *attempt);
                let mut log = LogWriter::create(&self.dir.join(&rel), self.redactor.clone())?;
                log.meta(*at, &format!("$ {command}"))?;
                let key = (step.to_string(), target.to_string(), *attempt);
                self.logs.insert(key.clone(), log);
                let cast_path = self.dir.join(rel.replace(".log", ".cast"));
                let title = format!(
                    "{} / {step} [{target}] attempt {attempt}",
                    self.manifest.runbook.name
                );
                // Counted once, in the log; the transcript holds the same bytes.
                let cast = crate::cast::CastWriter::create(
                    &cast_path,
                    *at,
                    &title,
                    command,
                    self.redactor.uncounted(),
                )?;
                self.casts.insert(key, cast);
            }
            RunEvent::AttemptFinished {
                at,
                step,
                target,
                attempt,
                outcome,
                ..
            } => {
                let key = (step.to_string(), target.to_string(), *attempt);
                let closing = format!("attempt {attempt}: {}", outcome.describe());
                let mut cast = self.casts.remove(&key);
                if let Some(mut log) = self.logs.remove(&key) {
                    // What the log's driver still held goes to the transcript too.
                    for (stream, rest) in log.finish_output()? {
                        if let Some(cast) = cast.as_mut() {
                            cast.write_redacted(*at, stream, &rest.text)?;
                        }
                    }
                    let path = log.path().to_owned();
                    let digest = log.close_with(*at, &closing)?;
                    self.remember_digest(&path, digest);
                }
                if let Some(cast) = cast {
                    let path = cast.path().to_owned();
                    let digest = cast.close(*at, &closing)?;
                    self.remember_digest(&path, digest);
                }
            }
            RunEvent::AttemptNote {
                at,
                step,
                target,
                attempt,
                message,
            } => {
                let key = (step.to_string(), target.to_string(), *attempt);
                if let Some(log) = self.logs.get_mut(&key) {
                    log.meta(*at, message)?;
                }
                if let Some(cast) = self.casts.get_mut(&key) {
                    cast.note(*at, message)?;
                }
            }
            RunEvent::ProcessesStopped {
                at,
                step,
                target,
                attempt,
                processes,
            } => {
                let key = (step.to_string(), target.to_string(), *attempt);
                for p in processes {
                    let line = format!(
                        "stopped a process that had left the step's process group: {}",
                        p.describe()
                    );
                    if let Some(log) = self.logs.get_mut(&key) {
                        log.meta(*at, &line)?;
                    }
                    if let Some(cast) = self.casts.get_mut(&key) {
                        cast.note(*at, &line)?;
                    }
                }
            }
            RunEvent::Collect {
                step, name, path, ..
            } => collected = Some(self.collect(step.as_str(), name, path)),
            RunEvent::Artifact {
                step,
                target,
                attempt,
                ext,
                path,
                sidecar,
                ..
            } => {
                let rel = attempt_log(step.as_str(), target, *attempt)
                    .replace(".log", &format!(".{}", safe_ext(ext)));
                let dest = self.dir.join(&rel);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(write_err(parent))?;
                }
                std::fs::copy(path, &dest).map_err(write_err(&dest))?;
                let side = self.dir.join(format!("{rel}.json"));
                let text = serde_json::to_string_pretty(sidecar).unwrap_or_default();
                std::fs::write(&side, self.redactor.redact_str(&text)).map_err(write_err(&side))?;
            }
            _ => {}
        }
        self.apply(event, collected);
        Ok(())
    }

    /// Updates the manifest for one event; no I/O. Replaying a journal through this rebuilds
    /// the manifest (`runbook evidence repair`, `runbook resume`).
    fn apply(&mut self, event: &RunEvent, collected: Option<Collected>) {
        match event {
            RunEvent::RunStarted { .. }
            | RunEvent::Output { .. }
            | RunEvent::Log { .. }
            | RunEvent::Clock { .. }
            | RunEvent::AttemptNote { .. }
            | RunEvent::ProcessStarted { .. } => {}
            RunEvent::Batch {
                at,
                step,
                number,
                hosts,
                failed,
                ..
            } => self.manifest.notes.push(Note {
                at: *at,
                message: format!(
                    "{step}: batch {number} ({}) finished, {failed} failed",
                    hosts.join(", ")
                ),
            }),
            RunEvent::HostAdded {
                at,
                step,
                name,
                address,
                groups,
                spec,
            } => self.manifest.hosts_added.push(serde_json::json!({
                "at": at,
                "step": step,
                "name": name,
                "address": address,
                "groups": groups,
                "spec": spec,
            })),
            RunEvent::DrillMeasured { report, .. } => self.manifest.drill = Some(report.clone()),
            RunEvent::Artifact {
                step,
                target,
                attempt,
                ext,
                ..
            } => {
                let rel = attempt_log(step.as_str(), target, *attempt)
                    .replace(".log", &format!(".{}", safe_ext(ext)));
                if let Some(a) = self.attempt_mut(step.as_str(), target, *attempt) {
                    a.artifacts.push(rel);
                }
            }
            RunEvent::ProcessesStopped {
                step,
                target,
                attempt,
                processes,
                ..
            } => {
                // Redacted like the rest of the manifest when it is written.
                if let Some(a) = self.attempt_mut(step.as_str(), target, *attempt) {
                    a.stopped_processes.extend(processes.iter().cloned());
                }
            }
            RunEvent::SecretRegistered { name, .. } => {
                if !self.manifest.secrets.contains(name) {
                    self.manifest.secrets.push(name.clone());
                }
            }
            RunEvent::StepStarted { at, step } => {
                if let Some(s) = self.step_mut(step.as_str()) {
                    s.started_at.get_or_insert(*at);
                    // Started again (a resume): what an earlier run concluded (skipped while
                    // awaiting approval, failed) no longer holds until it finishes again.
                    s.status = None;
                    s.reason = None;
                }
            }
            RunEvent::AttemptStarted {
                at,
                step,
                target,
                attempt,
                command,
                cwd,
                compact,
                ..
            } => {
                if *compact {
                    if let Some(s) = self.step_mut(step.as_str()) {
                        if let Some(prev) = s
                            .attempts
                            .iter_mut()
                            .rev()
                            .find(|a| a.target == target.as_ref() && a.finished_at.is_some())
                        {
                            if prev.compact {
                                prev.log = String::new();
                            }
                        }
                    }
                }
                let record = AttemptRecord {
                    compact: *compact,
                    attempt: *attempt,
                    target: target.to_string(),
                    command: self.redactor.redact_str(command),
                    cwd: cwd.display().to_string(),
                    started_at: *at,
                    finished_at: None,
                    duration_seconds: None,
                    exit_code: None,
                    outcome: None,
                    error: None,
                    output: Default::default(),
                    retry_delay_seconds: None,
                    log: attempt_log(step.as_str(), target, *attempt),
                    details: serde_json::Map::new(),
                    outputs: None,
                    artifacts: Vec::new(),
                    stopped_processes: Vec::new(),
                };
                if let Some(s) = self.step_mut(step.as_str()) {
                    s.attempts.push(record);
                }
            }
            RunEvent::AttemptFinished {
                at,
                step,
                target,
                attempt,
                duration,
                outcome,
                output,
                details,
                outputs,
            } => {
                let error =
                    (!outcome.succeeded()).then(|| self.redactor.redact_str(&outcome.describe()));
                if let Some(a) = self.attempt_mut(step.as_str(), target, *attempt) {
                    a.finished_at = Some(*at);
                    a.duration_seconds = Some(secs(*duration));
                    a.exit_code = outcome.exit_code();
                    a.outcome = Some(outcome.clone());
                    a.error = error;
                    a.output = *output;
                    a.details.clone_from(details);
                    a.outputs.clone_from(outputs);
                }
            }
            RunEvent::RetryScheduled {
                step,
                target,
                delay,
                next_attempt,
                ..
            } => {
                // The attempt being retried is this target's: with hosts, another host's
                // attempt of the same number may have been recorded after it.
                let retried = next_attempt.saturating_sub(1);
                if let Some(a) = self.attempt_mut(step.as_str(), target, retried) {
                    a.retry_delay_seconds = Some(secs(*delay));
                }
            }
            RunEvent::Collect {
                step, name, path, ..
            } => {
                let record = collected
                    .unwrap_or_else(|| self.collected_in_bundle(step.as_str(), name, path));
                if let Some(s) = self.step_mut(step.as_str()) {
                    s.collected.retain(|c| c.name != record.name);
                    s.collected.push(record);
                }
            }
            RunEvent::TargetFinished { step, result, .. } => {
                let result = runbook_engine::event::TargetResult {
                    reason: result.reason.as_ref().map(|r| self.redactor.redact_str(r)),
                    ..result.clone()
                };
                if let Some(s) = self.step_mut(step.as_str()) {
                    s.targets.retain(|t| t.target != result.target);
                    s.targets.push(result);
                }
            }
            RunEvent::StepFinished {
                at,
                step,
                status,
                duration,
                reason,
                outputs,
                targets,
                ..
            } => {
                let reason = reason.as_ref().map(|r| self.redactor.redact_str(r));
                let targets: Vec<_> = targets
                    .iter()
                    .map(|t| runbook_engine::event::TargetResult {
                        reason: t.reason.as_ref().map(|r| self.redactor.redact_str(r)),
                        ..t.clone()
                    })
                    .collect();
                if let Some(s) = self.step_mut(step.as_str()) {
                    s.outputs.clone_from(outputs);
                    s.targets = targets;
                    s.status = Some(*status);
                    s.reason = reason;
                    s.finished_at = Some(*at);
                    s.duration_seconds = secs(*duration);
                }
            }
            RunEvent::Note { at, message } => {
                let message = self.redactor.redact_str(message);
                self.manifest.notes.push(Note { at: *at, message });
            }
            RunEvent::RunResumed {
                at,
                previous,
                operator,
                ..
            } => {
                self.manifest.status = RunStatus::Running;
                self.manifest.reason = None;
                self.manifest.finished_at = None;
                self.manifest.duration_seconds = None;
                self.manifest.resumed.push(Resumption {
                    at: *at,
                    previous: *previous,
                    operator: operator.clone(),
                });
            }
            RunEvent::Approval {
                at,
                step,
                by,
                granted,
            } => self.manifest.approvals.push(ApprovalRecord {
                at: *at,
                step: step.to_string(),
                by: by.clone(),
                granted: *granted,
            }),
            RunEvent::RunFinished { at, status, reason } => {
                self.manifest.status = *status;
                self.manifest.reason = reason.as_ref().map(|r| self.redactor.redact_str(r));
                self.manifest.finished_at = Some(*at);
                self.manifest.duration_seconds = Some(secs(
                    (*at - self.manifest.started_at)
                        .to_std()
                        .unwrap_or_default(),
                ));
            }
        }
    }

    /// Opens an existing bundle to continue it (resume) or rebuild its manifest (repair): the
    /// manifest is rebuilt from the journal, and a torn last journal line is cut off.
    pub fn reopen(dir: &Path, secrets: Vec<(String, String)>) -> Result<Self, EvidenceError> {
        Self::open_existing(dir, secrets, true)
    }

    /// Reads an existing bundle as [`Recorder::reopen`] does but changes nothing on disk (a torn
    /// last line stays, the journal is opened read-only): for checking a `resume` before it
    /// takes the run lock. Recording into it fails.
    pub fn inspect(dir: &Path, secrets: Vec<(String, String)>) -> Result<Self, EvidenceError> {
        Self::open_existing(dir, secrets, false)
    }

    fn open_existing(
        dir: &Path,
        secrets: Vec<(String, String)>,
        writable: bool,
    ) -> Result<Self, EvidenceError> {
        let manifest_path = dir.join("manifest.json");
        let text = std::fs::read(&manifest_path).map_err(|source| EvidenceError::Read {
            path: manifest_path.clone(),
            source,
        })?;
        let mut manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| EvidenceError::Read {
                path: manifest_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?;
        let journal_path = dir.join("journal.jsonl");
        let read = crate::journal::read(&journal_path)?;
        if writable {
            crate::journal::truncate_torn(&journal_path, &read)?;
        }
        // Start from the skeleton (ids and phases) and replay the journal over it.
        for s in &mut manifest.steps {
            let (id, phase) = (s.id.clone(), s.phase.clone());
            *s = StepRecord {
                id,
                phase,
                status: None,
                reason: None,
                started_at: None,
                finished_at: None,
                duration_seconds: 0.0,
                attempts: Vec::new(),
                collected: Vec::new(),
                outputs: None,
                targets: Vec::new(),
            };
        }
        manifest.notes.clear();
        manifest.hosts_added.clear();
        manifest.drill = None;
        manifest.resumed.clear();
        manifest.approvals.clear();
        manifest.status = RunStatus::Running;
        manifest.reason = None;
        manifest.finished_at = None;
        manifest.duration_seconds = None;
        let step_index = manifest
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let journal = OpenOptions::new()
            .append(writable)
            .read(!writable)
            .open(&journal_path)
            .map_err(write_err(&journal_path))?;
        let mut known = secrets;
        known.retain(|(n, _)| !n.is_empty());
        let mut recorder = Self {
            dir: dir.to_owned(),
            journal,
            journal_path,
            seq: read.last_seq(),
            redactor: ByteRedactor::with_counts(&known, Some(Arc::default())),
            secrets: known,
            unsynced: false,
            crash_after: crate::crash::after_append(),
            removed_partials: Vec::new(),
            logs: HashMap::new(),
            casts: HashMap::new(),
            digests: HashMap::new(),
            manifest,
            step_index,
        };
        for (_, event) in &read.events {
            recorder.apply(event, None);
        }
        if let Some(bytes) = read.torn_bytes {
            recorder.manifest.notes.push(Note {
                at: Utc::now(),
                message: format!("journal.jsonl ended in a torn line ({bytes} bytes, written when the runner died); it was cut off"),
            });
        }
        if writable {
            recorder.close_finished_logs()?;
        }
        if recorder.manifest.status == RunStatus::Running {
            recorder.manifest.status = RunStatus::Interrupted;
            for s in &mut recorder.manifest.steps {
                for a in s.attempts.iter_mut().filter(|a| a.finished_at.is_none()) {
                    a.error = Some("interrupted: the runner stopped during this attempt".into());
                }
            }
        }
        Ok(recorder)
    }

    /// A runner killed between an attempt's `attempt_finished` and the closing record of its log
    /// left the log open-ended: appends the record the journal holds, as the runner would have,
    /// so the log and the journal agree again.
    fn close_finished_logs(&self) -> Result<(), EvidenceError> {
        for a in self.manifest.steps.iter().flat_map(|s| &s.attempts) {
            let (Some(outcome), Some(at)) = (&a.outcome, a.finished_at) else {
                continue;
            };
            if a.log.is_empty() {
                continue;
            }
            let path = self.dir.join(&a.log);
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            let closing = format!("--- attempt {}: ", a.attempt);
            let last = text
                .trim_ascii_end()
                .rsplit(|&b| b == b'\n')
                .next()
                .unwrap_or_default();
            if String::from_utf8_lossy(last).contains(&closing) {
                continue;
            }
            let mut line = Vec::new();
            if !text.is_empty() && !text.ends_with(b"\n") {
                line.push(b'\n');
            }
            line.extend(
                self.redactor.redact(
                    format!(
                        "{} {closing}{}\n",
                        crate::log::stamp(at),
                        outcome.describe()
                    )
                    .as_bytes(),
                ),
            );
            OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(&line))
                .map_err(write_err(&path))?;
        }
        Ok(())
    }

    /// Applies the runbook's `[evidence] redact` patterns (for a reopened bundle).
    pub fn set_shapes(&mut self, patterns: &[String]) {
        if let Ok(shapes) = crate::redact::ShapeRules::new(patterns) {
            self.redactor = self.redactor.clone().with_shapes(shapes);
        }
    }

    /// How often each secret had to be redacted from step output so far.
    pub fn redaction_counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.redactor.counts()
    }

    /// Fails a run that otherwise succeeded (`--fail-on-leak`): recorded in journal and manifest.
    pub fn fail_run(&mut self, message: &str) -> Result<(), EvidenceError> {
        self.note(message)?;
        if self.manifest.status == RunStatus::Succeeded {
            // A second end event, so the journal and the manifest keep agreeing.
            self.record(&RunEvent::RunFinished {
                at: Utc::now(),
                status: RunStatus::Failed,
                reason: Some(message.to_owned()),
            })?;
        }
        Ok(())
    }

    /// The status the journal ends in (`interrupted` when it has no end).
    pub fn status(&self) -> RunStatus {
        self.manifest.status
    }

    /// Rebuilds `manifest.json` and `SHA256SUMS` of a bundle from its journal.
    pub fn repair(dir: &Path) -> Result<Manifest, EvidenceError> {
        let recorder = Self::reopen(dir, Vec::new())?;
        let manifest = recorder.manifest.clone();
        recorder.finish()?;
        Ok(manifest)
    }

    /// A collected file as found in the bundle (when replaying a journal).
    fn collected_in_bundle(&self, step: &str, name: &str, path: &Path) -> Collected {
        let rel = Path::new("collected")
            .join(step)
            .join(safe_relative(&self.redactor.redact_str(name)));
        let dest = self.dir.join(&rel);
        let present = dest.exists();
        Collected {
            name: name.to_owned(),
            source: path.display().to_string(),
            copy: present.then(|| rel.to_string_lossy().into_owned()),
            sha256: if dest.is_file() {
                checksums::sha256_file(&dest).ok()
            } else {
                None
            },
            error: (!present).then(|| "not in the bundle".to_owned()),
        }
    }

    /// Writes the final manifest and `SHA256SUMS`. Returns the bundle directory.
    pub fn finish(mut self) -> Result<PathBuf, EvidenceError> {
        crate::crash::sealing_starts();
        // A sealing that died between writing a file and renaming it into place left the
        // temporary file: it is no part of the record.
        for tmp in crate::fs::leftovers(&self.dir) {
            std::fs::remove_file(&tmp).map_err(write_err(&tmp))?;
        }
        // Logs still open belong to attempts that never reported an end (a crash mid-run).
        for (key, mut log) in std::mem::take(&mut self.logs) {
            let now = Utc::now();
            for (stream, rest) in log.finish_output()? {
                if let Some(cast) = self.casts.get_mut(&key) {
                    cast.write_redacted(now, stream, &rest.text)?;
                }
            }
            let path = log.path().to_owned();
            let digest = log.close()?;
            self.remember_digest(&path, digest);
        }
        for (_, cast) in std::mem::take(&mut self.casts) {
            let path = cast.path().to_owned();
            let digest = cast.close(Utc::now(), "did not finish")?;
            self.remember_digest(&path, digest);
        }
        let mut summary = std::collections::BTreeMap::new();
        for s in &self.manifest.steps {
            let key = s.status.map_or("not run", StepStatus::as_str);
            *summary.entry(key.to_owned()).or_insert(0) += 1;
        }
        self.manifest.summary = summary;
        self.manifest.redactions = self.redactor.counts();
        self.write_manifest()?;
        // The human and machine views of the same record, covered by the checksums.
        let report = crate::report::render_report(&self.manifest, &self.dir)?;
        for (name, text) in [
            ("report.html", report),
            (
                "junit.xml",
                crate::junit::render_junit(&self.manifest, &self.dir),
            ),
            (
                "metrics.prom",
                crate::metrics::render_metrics(&self.manifest),
            ),
        ] {
            let path = self.dir.join(name);
            let text = self.redactor.redact(text.as_bytes());
            crate::fs::write_atomic(&path, &text).map_err(write_err(&path))?;
        }
        self.journal
            .sync_all()
            .map_err(write_err(&self.journal_path))?;
        crate::crash::sealing_step();
        self.unsynced = true;
        self.flush()?;
        checksums::write_with(&self.dir, &self.digests)?;
        Ok(self.dir)
    }

    /// Keeps the digest a writer computed for its file, by path in the bundle.
    fn remember_digest(&mut self, path: &Path, digest: Option<String>) {
        let Ok(rel) = path.strip_prefix(&self.dir) else {
            return;
        };
        match digest {
            Some(d) => {
                self.digests.insert(rel.to_owned(), d);
            }
            None => {
                self.digests.remove(rel);
            }
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn append_journal(&mut self, event: &RunEvent) -> Result<(), EvidenceError> {
        self.seq += 1;
        let mut value = serde_json::to_value(event).unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("seq".into(), self.seq.into());
        }
        // Redact the values before serialising: a secret with `"` or `\` in it looks different
        // once JSON-escaped. The bytes are then redacted again for anything else.
        self.redactor.redact_json(&mut value);
        let mut line = self.redactor.redact(value.to_string().as_bytes());
        line.push(b'\n');
        self.journal
            .write_all(&line)
            .map_err(write_err(&self.journal_path))?;
        if self.crash_after == Some(self.seq) {
            std::process::abort();
        }
        // Sync at the boundaries a resume depends on; output between them may be lost in a
        // power cut but is never reported as done when it is not.
        let boundary = matches!(
            event,
            RunEvent::RunStarted { .. }
                | RunEvent::RunResumed { .. }
                | RunEvent::AttemptStarted { .. }
                | RunEvent::ProcessStarted { .. }
                | RunEvent::AttemptFinished { .. }
                | RunEvent::StepFinished { .. }
                | RunEvent::Approval { .. }
                | RunEvent::RunFinished { .. }
        );
        self.unsynced |= boundary;
        Ok(())
    }

    /// Writes what the open logs and transcripts buffer to the kernel (no sync): called when the
    /// consumer is idle, so the files of a running attempt survive a crash of the runner.
    pub fn flush_buffers(&mut self) -> Result<(), EvidenceError> {
        for log in self.logs.values_mut() {
            log.flush_buffer()?;
        }
        for cast in self.casts.values_mut() {
            cast.flush_buffer()?;
        }
        Ok(())
    }

    /// Whether boundary events wait for [`Recorder::flush`].
    pub fn is_dirty(&self) -> bool {
        self.unsynced
    }

    /// Group commit: makes the journal durable up to here, in one sync for every boundary
    /// event recorded since the last one. The consumer calls it at most every few tens of
    /// milliseconds. Logs and transcripts are left to the kernel's write-back: a crash of the
    /// runner loses nothing (the kernel has the data), and after a power cut `verify` names any
    /// file that did not reach the disk, while the journal says what had happened.
    pub fn flush(&mut self) -> Result<(), EvidenceError> {
        if !self.unsynced {
            return Ok(());
        }
        self.journal
            .sync_data()
            .map_err(write_err(&self.journal_path))?;
        self.unsynced = false;
        Ok(())
    }

    fn write_manifest(&self) -> Result<(), EvidenceError> {
        let path = self.dir.join("manifest.json");
        let mut value = serde_json::to_value(&self.manifest).unwrap_or_default();
        self.redactor.redact_json(&mut value);
        let mut text = serde_json::to_vec_pretty(&value).unwrap_or_default();
        text.push(b'\n');
        let text = self.redactor.redact(&text);
        crate::fs::write_atomic(&path, &text).map_err(write_err(&path))
    }

    fn step_mut(&mut self, id: &str) -> Option<&mut StepRecord> {
        let i = *self.step_index.get(id)?;
        self.manifest.steps.get_mut(i)
    }

    /// The log of the last finished probe attempt of a step on a target, if it still has one.
    fn previous_compact(&mut self, id: &str, target: &str) -> Option<String> {
        let s = self.step_mut(id)?;
        let prev = s
            .attempts
            .iter()
            .rev()
            .find(|a| a.target == target && a.finished_at.is_some())?;
        (prev.compact && !prev.log.is_empty()).then(|| prev.log.clone())
    }

    fn attempt_mut(&mut self, id: &str, target: &str, attempt: u32) -> Option<&mut AttemptRecord> {
        self.step_mut(id)?
            .attempts
            .iter_mut()
            .rev()
            .find(|a| a.attempt == attempt && a.target == target)
    }

    /// Copies a collected file (or directory) into `collected/<step>/`. A missing file is
    /// recorded, not fatal: the step's own outcome decides the run.
    fn collect(&mut self, step: &str, name: &str, path: &Path) -> Collected {
        // A secret in the name would be in the bundle's tree and in `SHA256SUMS`.
        let rel = Path::new("collected")
            .join(step)
            .join(safe_relative(&self.redactor.redact_str(name)));
        let dest = self.dir.join(&rel);
        let mut record = Collected {
            name: name.to_owned(),
            source: path.display().to_string(),
            copy: None,
            sha256: None,
            error: None,
        };
        let result = crate::collect::copy(path, &dest, name, &self.redactor);
        match result {
            Ok(notes) => {
                record.copy = Some(rel.to_string_lossy().into_owned());
                if dest.is_file() {
                    record.sha256 = checksums::sha256_file(&dest).ok();
                }
                for note in notes.into_lines() {
                    self.manifest.notes.push(Note {
                        at: Utc::now(),
                        message: format!("step `{step}`: collect: {note}"),
                    });
                }
            }
            Err(e) => {
                let message = format!("step `{step}`: could not collect `{name}`: {e}");
                record.error = Some(e.to_string());
                self.manifest.notes.push(Note {
                    at: Utc::now(),
                    message,
                });
            }
        }
        record
    }
}

/// Why a bundle cannot be continued where its journal ends: the journal records less than
/// the bundle holds (it was emptied or cut short), so appending to it would number attempts
/// again from what it knows and overwrite their logs.
#[derive(Debug, thiserror::Error)]
pub enum JournalBehind {
    #[error(
        "`{}` records no attempt for {} file(s) in the bundle ({}): the logs on disk are newer \
         than what the journal records (was it emptied or cut short?)",
        journal.display(),
        files.len(),
        shorten_list(files)
    )]
    UnrecordedAttempts {
        journal: PathBuf,
        files: Vec<String>,
    },
    #[error(
        "`{}` has no run_started event (was it emptied or cut short?): there is no run to continue",
        journal.display()
    )]
    NoRunStarted { journal: PathBuf },
    #[error(transparent)]
    Evidence(#[from] EvidenceError),
}

fn shorten_list(items: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut text = items
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}

/// Checks, without writing anything, that the journal of the bundle in `dir` can be continued
/// (`runbook resume`): it has its `run_started`, and every attempt with files under `steps/`
/// has its `attempt_started`. The recorder appends an event before it creates the files, so
/// only a journal that lost lines fails this. Empty files are not counted: a power cut can keep
/// a new log's directory entry and lose the unsynced journal line, and they hold nothing to lose.
pub fn check_journal_covers_bundle(dir: &Path) -> Result<(), JournalBehind> {
    let journal = dir.join("journal.jsonl");
    let read = crate::journal::read(&journal)?;
    let known: std::collections::HashSet<String> = read
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            RunEvent::AttemptStarted {
                step,
                target,
                attempt,
                ..
            } => Some(attempt_stem(step.as_str(), target, *attempt)),
            _ => None,
        })
        .collect();
    let mut unrecorded = Vec::new();
    let mut stack = vec![PathBuf::from("steps")];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let read_err = |source| EvidenceError::Read {
            path: abs.clone(),
            source,
        };
        let entries = match std::fs::read_dir(&abs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(read_err(e).into()),
        };
        for entry in entries {
            let entry = entry.map_err(read_err)?;
            let child = rel.join(entry.file_name());
            let meta = entry.metadata().map_err(read_err)?;
            if meta.is_dir() {
                stack.push(child);
            } else if meta.len() > 0 {
                if let Some(stem) = attempt_stem_of(&child) {
                    if !known.contains(&stem) {
                        unrecorded.push(child.to_string_lossy().into_owned());
                    }
                }
            }
        }
    }
    if !unrecorded.is_empty() {
        unrecorded.sort();
        return Err(JournalBehind::UnrecordedAttempts {
            journal,
            files: unrecorded,
        });
    }
    if !read
        .events
        .iter()
        .any(|(_, e)| matches!(e, RunEvent::RunStarted { .. }))
    {
        return Err(JournalBehind::NoRunStarted { journal });
    }
    Ok(())
}

/// `steps/<step>/<target>/attempt-<n>`: what every file of one attempt starts with.
fn attempt_stem(step: &str, target: &str, attempt: u32) -> String {
    let log = attempt_log(step, target, attempt);
    log.strip_suffix(".log").unwrap_or(&log).to_owned()
}

/// The attempt stem of a file under `steps/` (`attempt-2.log`, `attempt-2.cast`,
/// `attempt-2.png.json`), or `None` for a file that belongs to no attempt.
fn attempt_stem_of(rel: &Path) -> Option<String> {
    let name = rel.file_name()?.to_str()?;
    let digits = name.strip_prefix("attempt-")?;
    let n = digits.split('.').next()?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let stem = rel.with_file_name(format!("attempt-{n}"));
    Some(stem.to_string_lossy().into_owned())
}

/// A file extension from a runner, made safe for a file name.
fn safe_ext(ext: &str) -> String {
    let e: String = ext
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    if e.is_empty() {
        "bin".into()
    } else {
        e
    }
}

fn attempt_log(step: &str, target: &str, attempt: u32) -> String {
    format!("steps/{step}/{target}/attempt-{attempt}.log")
}

fn secs(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// `name` made safe to join under the bundle: no root, no `.`, and `..` kept as a distinct
/// `__` component, so `../x` and `x` do not collide and nothing escapes the bundle. Control
/// characters become `_`: a name with a newline cannot be listed in `SHA256SUMS` as it is.
fn safe_relative(name: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(part) => match crate::collect::sanitized(part) {
                Some(safe) => out.push(safe),
                None => out.push(part),
            },
            Component::ParentDir => out.push("__"),
            _ => {}
        }
    }
    if out.as_os_str().is_empty() {
        out.push("unnamed");
    }
    out
}

impl Recorder {
    /// What each step of this (interrupted) run already did, for `runbook resume`: attempts
    /// made and, for steps that succeeded, the result downstream expressions need. A success
    /// whose outputs were redacted cannot be restored (secrets are never stored) and is run again.
    pub fn prior_steps(&self) -> Vec<(String, runbook_engine::plan::PriorStep)> {
        use runbook_engine::plan::{PriorResult, PriorStep};
        self.manifest
            .steps
            .iter()
            .map(|s| {
                let attempts = s.attempts.iter().map(|a| a.attempt).max().unwrap_or(0);
                // The runner may have died after a local attempt succeeded but before the
                // step's own record: the attempt's success stands (its outputs are in its
                // record). A step on hosts runs again unless the step's record says done.
                let last = s.attempts.last();
                let attempt_succeeded = s.status.is_none()
                    && last.is_some_and(|a| {
                        a.target == "local" && a.outcome.as_ref().is_some_and(|o| o.succeeded())
                    });
                let succeeded = (s.status == Some(StepStatus::Succeeded) && !s.attempts.is_empty())
                    || attempt_succeeded;
                let recorded_outputs = if attempt_succeeded {
                    last.and_then(|a| a.outputs.as_ref())
                } else {
                    s.outputs.as_ref()
                };
                // Outputs redacted with secrets this resume knows again (params) are restored;
                // a value registered with `secret()` at run time is not known, so the step
                // runs again.
                let outputs = match recorded_outputs {
                    Some(o) => self.unredact(o).map(Some),
                    None => Some(None),
                };
                let result = outputs.filter(|_| succeeded).map(|outputs| {
                    let last = s.attempts.last();
                    // The logs are redacted: put back what the params hold, as a rerun
                    // would print it. Other placeholders (pattern matches) stay.
                    let (stdout, stderr) = last
                        .map(|a| read_streams(&self.dir.join(&a.log)))
                        .map(|(o, e)| (self.put_back(o), self.put_back(e)))
                        .unwrap_or_default();
                    PriorResult {
                        exit_code: last.and_then(|a| a.exit_code),
                        json: serde_json::from_str(&stdout).ok(),
                        stdout,
                        stderr,
                        outputs,
                        duration: s.duration_seconds,
                    }
                });
                // Hosts that finished their part with success while the step as a whole did
                // not: each host's result is in the journal as it finishes.
                let done_targets = if s.status == Some(StepStatus::Succeeded) {
                    Vec::new()
                } else {
                    s.targets
                        .iter()
                        .filter(|t| t.status == StepStatus::Succeeded)
                        .map(|t| (t.target.clone(), t.attempts))
                        .collect()
                };
                let mut target_attempts = std::collections::HashMap::new();
                for a in &s.attempts {
                    let n = target_attempts.entry(a.target.clone()).or_insert(0);
                    *n = (*n).max(a.attempt);
                }
                (
                    s.id.clone(),
                    PriorStep {
                        attempts,
                        result,
                        done_targets,
                        target_attempts,
                    },
                )
            })
            .collect()
    }
}

/// Removes `.…partial` bundle directories in `parent` older than a minute (a run still creating
/// its own takes milliseconds), except `mine`. Returns what it removed.
fn remove_stale_partials(parent: &Path, mine: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let old = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(60))
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p != mine
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.') && n.ends_with(".partial"))
                && old(p)
        })
        .filter(|p| std::fs::remove_dir_all(p).is_ok())
        .collect()
}

/// stdout and stderr of an attempt, rebuilt from its log (the last MiB of each).
fn read_streams(log: &Path) -> (String, String) {
    const KEEP: usize = 1024 * 1024;
    let Ok(data) = std::fs::read(log) else {
        return Default::default();
    };
    let mut out: Vec<u8> = Vec::new();
    let mut err: Vec<u8> = Vec::new();
    for line in data.split(|&b| b == b'\n') {
        let Some((_, tag, rest)) = crate::log_tail::split_record(line) else {
            continue;
        };
        let (buf, newline) = match tag {
            "out" => (&mut out, true),
            "out+" => (&mut out, false),
            "err" => (&mut err, true),
            "err+" => (&mut err, false),
            _ => continue,
        };
        buf.extend_from_slice(rest);
        if newline {
            buf.push(b'\n');
        }
    }
    let tail = |v: Vec<u8>| {
        let start = v.len().saturating_sub(KEEP);
        String::from_utf8_lossy(&v[start..]).into_owned()
    };
    (tail(out), tail(err))
}

impl Recorder {
    /// Notes in the manifest which steps a resume takes as done and which it runs again.
    /// The hosts the run added at run time, as `add_host` was given them, for `resume` to add
    /// again; `Err(name)` for one whose settings held a secret this resume does not know (one
    /// registered with `secret()` at run time: never stored, so not restorable).
    pub fn hosts_added(&self) -> Vec<Result<runbook_engine::inventory::NewHost, String>> {
        self.manifest
            .hosts_added
            .iter()
            .filter_map(|h| {
                let name = h["name"].as_str()?.to_owned();
                let spec = h.get("spec").filter(|s| !s.is_null())?;
                Some(match self.unredact(spec) {
                    Some(spec) => Ok(runbook_engine::inventory::NewHost { name, spec }),
                    None => Err(name),
                })
            })
            .collect()
    }

    /// `text` with the placeholders of the secrets this recorder knows replaced by their values.
    fn put_back(&self, mut text: String) -> String {
        if text.contains("[REDACTED:") {
            for (name, secret) in &self.secrets {
                text = text.replace(&format!("[REDACTED:{name}]"), secret);
            }
        }
        text
    }

    /// `value` with every `[REDACTED:NAME]` in its strings put back from the secrets this
    /// recorder knows (the params, bound again by resume); None if any is left, because only
    /// the run that registered it ever knew it.
    fn unredact(&self, value: &serde_json::Value) -> Option<serde_json::Value> {
        use serde_json::Value;
        Some(match value {
            Value::String(text) => {
                let text = self.put_back(text.clone());
                if text.contains("[REDACTED:") {
                    return None;
                }
                Value::String(text)
            }
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|v| self.unredact(v))
                    .collect::<Option<_>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| Some((k.clone(), self.unredact(v)?)))
                    .collect::<Option<_>>()?,
            ),
            other => other.clone(),
        })
    }

    pub fn note_resume(&mut self, prior: &[(String, runbook_engine::plan::PriorStep)]) {
        let rerun: Vec<&str> = self
            .manifest
            .steps
            .iter()
            .filter(|s| s.status == Some(StepStatus::Succeeded))
            .filter(|s| {
                prior
                    .iter()
                    .any(|(id, p)| *id == s.id && p.result.is_none())
            })
            .map(|s| s.id.as_str())
            .collect();
        if !rerun.is_empty() {
            self.manifest.notes.push(Note {
                at: Utc::now(),
                message: format!(
                    "resume runs {} again: their outputs held secrets, which are never stored",
                    rerun.join(", ")
                ),
            });
        }
    }
}

impl Recorder {
    /// Adds a note from outside the run (the CLI), to the journal and the manifest.
    pub fn note(&mut self, message: &str) -> Result<(), EvidenceError> {
        self.record(&RunEvent::Note {
            at: Utc::now(),
            message: message.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_files_map_to_their_attempt() {
        let stem = |p: &str| attempt_stem_of(Path::new(p));
        let a2 = Some("steps/a/local/attempt-2".to_owned());
        assert_eq!(stem("steps/a/local/attempt-2.log"), a2);
        assert_eq!(stem("steps/a/local/attempt-2.cast"), a2);
        assert_eq!(stem("steps/a/local/attempt-2.png.json"), a2);
        assert_eq!(attempt_stem("a", "local", 2), "steps/a/local/attempt-2");
        assert_eq!(stem("steps/a/local/attempt-.log"), None);
        assert_eq!(stem("steps/a/local/attempt-2x.log"), None);
        assert_eq!(stem("steps/a/local/notes.txt"), None);
    }
}
