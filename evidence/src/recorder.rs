//! The recorder: consumes run events in order and keeps the bundle on disk current. The journal
//! is appended (and synced at attempt and step boundaries) before anything else is updated, so
//! that a crash leaves a journal that says what happened.

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
    AttemptRecord, Collected, Engine, Manifest, Note, Operator, RunbookInfo, StepRecord, FORMAT,
};
use crate::redact::ByteRedactor;
use crate::{write_err, EvidenceError};

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
}

type AttemptKey = (String, String, u32);

pub struct Recorder {
    dir: PathBuf,
    journal: File,
    journal_path: PathBuf,
    seq: u64,
    secrets: Vec<(String, String)>,
    redactor: ByteRedactor,
    logs: HashMap<AttemptKey, LogWriter>,
    manifest: Manifest,
    step_index: HashMap<String, usize>,
}

impl Recorder {
    /// Creates the bundle directory, copies the runbook into it and opens the journal. Fails
    /// before anything runs when the evidence directory cannot be written.
    pub fn create(cfg: RecorderConfig) -> Result<Self, EvidenceError> {
        let stamp = cfg.started_at.format("%Y%m%dT%H%M%SZ");
        let dir = cfg
            .evidence_dir
            .join(&cfg.runbook.meta.name)
            .join(format!("{stamp}-{}", cfg.run_id));
        std::fs::create_dir_all(&dir).map_err(write_err(&dir))?;

        let source = &cfg.runbook.source;
        let file_name = source.path().file_name().map_or_else(
            || "runbook.toml".into(),
            |n| n.to_string_lossy().into_owned(),
        );
        let copy_rel = format!("runbook/{file_name}");
        let copy = dir.join(&copy_rel);
        std::fs::create_dir_all(dir.join("runbook")).map_err(write_err(dir.join("runbook")))?;
        std::fs::write(&copy, source.text()).map_err(write_err(&copy))?;

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
            })
            .collect();
        let step_index = rb
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.to_string(), i))
            .collect();
        let manifest = Manifest {
            format: FORMAT,
            run_id: cfg.run_id.clone(),
            status: RunStatus::Running,
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
                name: "runbook",
                version: cfg.engine_version,
            },
            workdir: cfg.workdir.display().to_string(),
            command_line: cfg.command_line,
            summary: Default::default(),
            steps,
            notes: Vec::new(),
            secrets: cfg.secrets.iter().map(|(n, _)| n.clone()).collect(),
        };
        let recorder = Self {
            dir,
            journal,
            journal_path,
            seq: 0,
            redactor: ByteRedactor::new(&cfg.secrets),
            secrets: cfg.secrets,
            logs: HashMap::new(),
            manifest,
            step_index,
        };
        recorder.write_manifest()?;
        Ok(recorder)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

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
            if let Some(log) = self.logs.get_mut(&key) {
                log.write(*at, *stream, data)?;
            }
            return Ok(());
        }
        if let RunEvent::SecretRegistered {
            name, value, step, ..
        } = event
        {
            self.secrets.push((name.clone(), value.clone()));
            self.redactor = ByteRedactor::new(&self.secrets);
            // Output that showed the value before it was known to be secret (a token printed
            // by the step whose `outputs` call `secret()`) is redacted after the fact.
            for log in self.logs.values_mut() {
                log.redactor = self.redactor.clone();
                log.rewrite_redacted()?;
            }
            if let Some(step) = step {
                let closed: Vec<String> = self
                    .step_mut(step.as_str())
                    .map(|s| {
                        s.attempts
                            .iter()
                            .filter(|a| a.finished_at.is_some())
                            .map(|a| a.log.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for rel in closed {
                    let path = self.dir.join(&rel);
                    self.redactor.redact_file(&path).map_err(write_err(&path))?;
                }
            }
            if !self.manifest.secrets.contains(name) {
                self.manifest.secrets.push(name.clone());
            }
        }
        self.append_journal(event)?;
        match event {
            RunEvent::RunStarted { .. }
            | RunEvent::Output { .. }
            | RunEvent::Log { .. }
            | RunEvent::SecretRegistered { .. } => {}
            RunEvent::StepStarted { at, step } => {
                if let Some(s) = self.step_mut(step.as_str()) {
                    s.started_at = Some(*at);
                }
            }
            RunEvent::AttemptStarted {
                at,
                step,
                target,
                attempt,
                command,
                cwd,
                ..
            } => {
                let rel = format!("steps/{step}/{target}/attempt-{attempt}.log");
                let mut log = LogWriter::create(&self.dir.join(&rel), self.redactor.clone())?;
                log.meta(*at, &format!("$ {command}"))?;
                self.logs
                    .insert((step.to_string(), target.to_string(), *attempt), log);
                let record = AttemptRecord {
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
                    log: rel,
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
            } => {
                if let Some(log) =
                    self.logs
                        .remove(&(step.to_string(), target.to_string(), *attempt))
                {
                    log.finish_with(*at, &format!("attempt {attempt}: {}", outcome.describe()))?;
                }
                let error =
                    (!outcome.succeeded()).then(|| self.redactor.redact_str(&outcome.describe()));
                if let Some(a) = self.attempt_mut(step.as_str(), target, *attempt) {
                    a.finished_at = Some(*at);
                    a.duration_seconds = Some(secs(*duration));
                    a.exit_code = outcome.exit_code();
                    a.outcome = Some(outcome.clone());
                    a.error = error;
                    a.output = *output;
                }
            }
            RunEvent::RetryScheduled {
                step,
                delay,
                next_attempt,
                ..
            } => {
                if let Some(s) = self.step_mut(step.as_str()) {
                    if let Some(a) = s
                        .attempts
                        .iter_mut()
                        .rev()
                        .find(|a| a.attempt + 1 == *next_attempt)
                    {
                        a.retry_delay_seconds = Some(secs(*delay));
                    }
                }
            }
            RunEvent::Collect {
                step, name, path, ..
            } => {
                let collected = self.collect(step.as_str(), name, path);
                if let Some(s) = self.step_mut(step.as_str()) {
                    s.collected.push(collected);
                }
            }
            RunEvent::StepFinished {
                at,
                step,
                status,
                duration,
                reason,
                outputs,
                ..
            } => {
                let reason = reason.as_ref().map(|r| self.redactor.redact_str(r));
                if let Some(s) = self.step_mut(step.as_str()) {
                    s.outputs.clone_from(outputs);
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
            RunEvent::RunFinished { at, status } => {
                self.manifest.status = *status;
                self.manifest.finished_at = Some(*at);
                self.manifest.duration_seconds = Some(secs(
                    (*at - self.manifest.started_at)
                        .to_std()
                        .unwrap_or_default(),
                ));
            }
        }
        Ok(())
    }

    /// Writes the final manifest and `SHA256SUMS`. Returns the bundle directory.
    pub fn finish(mut self) -> Result<PathBuf, EvidenceError> {
        // Logs still open belong to attempts that never reported an end (a crash mid-run).
        for (_, log) in self.logs.drain() {
            log.finish()?;
        }
        let mut summary = std::collections::BTreeMap::new();
        for s in &self.manifest.steps {
            let key = s.status.map_or("not run", StepStatus::as_str);
            *summary.entry(key).or_insert(0) += 1;
        }
        self.manifest.summary = summary;
        self.write_manifest()?;
        self.journal
            .sync_all()
            .map_err(write_err(&self.journal_path))?;
        checksums::write(&self.dir)?;
        Ok(self.dir)
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
        let mut line = self.redactor.redact(value.to_string().as_bytes());
        line.push(b'\n');
        self.journal
            .write_all(&line)
            .map_err(write_err(&self.journal_path))?;
        // Sync at the boundaries a resume depends on; output between them may be lost in a
        // power cut but is never reported as done when it is not.
        let boundary = matches!(
            event,
            RunEvent::RunStarted { .. }
                | RunEvent::AttemptStarted { .. }
                | RunEvent::AttemptFinished { .. }
                | RunEvent::StepFinished { .. }
                | RunEvent::RunFinished { .. }
        );
        if boundary {
            self.journal
                .sync_data()
                .map_err(write_err(&self.journal_path))?;
        }
        Ok(())
    }

    fn write_manifest(&self) -> Result<(), EvidenceError> {
        let path = self.dir.join("manifest.json");
        let mut text = serde_json::to_vec_pretty(&self.manifest).unwrap_or_default();
        text.push(b'\n');
        let text = self.redactor.redact(&text);
        write_atomic(&path, &text).map_err(write_err(&path))
    }

    fn step_mut(&mut self, id: &str) -> Option<&mut StepRecord> {
        let i = *self.step_index.get(id)?;
        self.manifest.steps.get_mut(i)
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
        let rel = Path::new("collected").join(step).join(safe_relative(name));
        let dest = self.dir.join(&rel);
        let mut record = Collected {
            name: name.to_owned(),
            source: path.display().to_string(),
            copy: None,
            sha256: None,
            error: None,
        };
        let result = copy_redacted(path, &dest, &self.redactor);
        match result {
            Ok(()) => {
                record.copy = Some(rel.to_string_lossy().into_owned());
                if dest.is_file() {
                    record.sha256 = checksums::sha256_file(&dest).ok();
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

fn secs(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// `name` without root, `.` or `..` components, so a collected path cannot escape the bundle.
fn safe_relative(name: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in Path::new(name).components() {
        if let Component::Normal(part) = c {
            out.push(part);
        }
    }
    if out.as_os_str().is_empty() {
        out.push("unnamed");
    }
    out
}

/// Copies a file or a directory tree. Text files pass through the redactor; binary files (with a
/// NUL byte) are copied as they are.
fn copy_redacted(src: &Path, dest: &Path, redactor: &ByteRedactor) -> std::io::Result<()> {
    let meta = std::fs::metadata(src)?;
    if meta.is_dir() {
        std::fs::create_dir_all(dest)?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            copy_redacted(&entry.path(), &dest.join(entry.file_name()), redactor)?;
        }
        return Ok(());
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let data = std::fs::read(src)?;
    let data = if redactor.is_empty() || data.contains(&0) {
        data
    } else {
        redactor.redact(&data)
    };
    std::fs::write(dest, data)
}

/// Writes a file by writing a temporary sibling, syncing it and renaming it over the target,
/// so readers never see half a manifest.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
