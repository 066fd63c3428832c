//! One firing: a `runbook run` child process for an entry, supervised until it ends — stopped
//! past `max_duration` or when the scheduler cancels it — and what it left behind (exit code,
//! bundle, the manifest's status and drill verdict).
//!
//! Stopping follows the runbook's own signal ladder: SIGTERM (it cancels its steps and seals
//! the bundle), after `kill_grace` SIGTERM again (it kills its steps now), after as long again
//! SIGKILL.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio_util::sync::CancellationToken;

use super::file::Entry;
use super::state::Outcome;
use crate::exit as code;
use crate::notify::NotifyPayload;

/// Every value of the `status` of an [`Outcome`] (the states of `runbook_run_last_status`).
pub const STATES: [&str; 7] = [
    "succeeded",
    "failed",
    "drill_failed",
    "cancelled",
    "awaiting_approval",
    "error",
    "timed_out",
];

/// What a firing produced.
#[derive(Debug, Clone)]
pub struct Finished {
    pub outcome: Outcome,
    /// The bundle's `manifest.json`, when there is a bundle.
    pub manifest: Option<serde_json::Value>,
    /// The bundle's `metrics.prom` (step durations and statuses).
    pub bundle_metrics: Option<String>,
    /// The child's last lines of stderr, for the log when it failed before running.
    pub tail: Vec<String>,
}

impl Finished {
    pub fn payload(
        &self,
        schedule: &str,
        runbook: &str,
        params: &[(String, String)],
    ) -> NotifyPayload {
        let bundle = self.outcome.bundle.as_ref().map(PathBuf::from);
        let mut p = match &self.manifest {
            Some(m) => NotifyPayload::from_manifest(m, bundle.as_deref()),
            None => NotifyPayload::default(),
        };
        if p.runbook.is_empty() {
            p.runbook = runbook.to_owned();
        }
        p.schedule = Some(schedule.to_owned());
        p.exit_code = self.outcome.exit_code;
        if self.manifest.is_none() || self.outcome.status == "timed_out" {
            p.status = self.outcome.status.clone();
        }
        p.started_at
            .get_or_insert_with(|| self.outcome.started.to_rfc3339());
        p.finished_at
            .get_or_insert_with(|| self.outcome.finished.to_rfc3339());
        p.duration_seconds
            .get_or_insert(self.outcome.duration_seconds);
        p.params = params.iter().cloned().collect();
        if p.host.is_none() {
            p.host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok());
        }
        if self.manifest.is_none() {
            p.message = self.tail.last().cloned();
        }
        p
    }
}

/// Runs the entry's runbook once. `cancel` stops it (SIGTERM ladder); so does `max_duration`.
pub async fn run_once(
    entry: &Entry,
    exe: &Path,
    workdir: &Path,
    kill_grace: Duration,
    cancel: CancellationToken,
) -> Finished {
    let started = Utc::now();
    let clock = std::time::Instant::now();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("run")
        .arg(&entry.runbook)
        .args(entry.set_args())
        .arg("--evidence-dir")
        .arg(&entry.evidence_dir)
        .args(["--no-progress", "--json"])
        .current_dir(workdir)
        .env("NO_COLOR", "1")
        // The scheduler publishes metrics for its entries itself; a per-run textfile written
        // as well would duplicate series in the same collector directory.
        .env_remove("RUNBOOK_TEXTFILE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl-C in the scheduler's terminal reaches the scheduler
        // only, which then stops its drills per the shutdown policy.
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let finished = Utc::now();
            return Finished {
                outcome: Outcome {
                    status: "error".into(),
                    started,
                    finished,
                    ..Outcome::default()
                },
                manifest: None,
                bundle_metrics: None,
                tail: vec![format!("cannot start `{}`: {e}", exe.display())],
            };
        }
    };
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);

    let stdout = child.stdout.take();
    let stdout_task = tokio::spawn(async move {
        let mut text = String::new();
        if let Some(out) = stdout {
            // Bounded: only the final JSON report is wanted.
            let _ = out.take(8 << 20).read_to_string(&mut text).await;
        }
        text
    });
    let stderr = child.stderr.take();
    let name = entry.name.clone();
    let stderr_task = tokio::spawn(async move {
        let mut bundle = None;
        let mut tail: Vec<String> = Vec::new();
        if let Some(err) = stderr {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(schedule = %name, "{line}");
                if let Some(b) = bundle_from_stderr(&line) {
                    bundle = Some(b);
                }
                if !line.trim().is_empty() {
                    if tail.len() == 20 {
                        tail.remove(0);
                    }
                    tail.push(line);
                }
            }
        }
        (bundle, tail)
    });

    let deadline = async {
        match entry.max_duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let mut timed_out = false;
    let status = tokio::select! {
        s = child.wait() => s,
        () = deadline => {
            timed_out = true;
            stop(&mut child, pid, kill_grace).await
        }
        () = cancel.cancelled() => stop(&mut child, pid, kill_grace).await,
    };
    let exit_code = status.ok().and_then(|s| s.code());
    let stdout = stdout_task.await.unwrap_or_default();
    let (stderr_bundle, tail) = stderr_task.await.unwrap_or_default();
    let bundle = stderr_bundle.or_else(|| bundle_from_json(&stdout));
    let manifest = bundle.as_ref().and_then(|b| {
        std::fs::read(b.join("manifest.json"))
            .ok()
            .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok())
    });
    let bundle_metrics = bundle
        .as_ref()
        .and_then(|b| std::fs::read_to_string(b.join("metrics.prom")).ok());
    let finished = Utc::now();

    let status = if timed_out {
        "timed_out"
    } else {
        match exit_code {
            Some(code::OK) => "succeeded",
            Some(code::RUN_FAILED) => "failed",
            Some(code::DRILL_FAILED) => "drill_failed",
            Some(code::AWAITING_APPROVAL) => "awaiting_approval",
            Some(code::INTERRUPTED) => "cancelled",
            Some(code::USAGE) => "error",
            None if cancel.is_cancelled() => "cancelled",
            _ => "failed",
        }
    };
    let drill = manifest.as_ref().map(|m| &m["drill"]);
    let target = |key: &str| {
        drill
            .map(|d| &d[key])
            .filter(|v| v.is_object())
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    };
    let outcome = Outcome {
        status: status.into(),
        exit_code,
        bundle: bundle.as_ref().map(|b| b.display().to_string()),
        started,
        finished,
        duration_seconds: manifest
            .as_ref()
            .and_then(|m| m["duration_seconds"].as_f64())
            .unwrap_or_else(|| clock.elapsed().as_secs_f64()),
        verdict: drill.and_then(|d| d["verdict"].as_str()).map(str::to_owned),
        rto: target("rto"),
        rpo: target("rpo"),
        failed_steps: manifest
            .as_ref()
            .and_then(|m| m["steps"].as_array())
            .map(|steps| {
                steps
                    .iter()
                    .filter(|s| s["status"] == "failed")
                    .filter_map(|s| s["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    };
    Finished {
        outcome,
        manifest,
        bundle_metrics,
        tail,
    }
}

/// The SIGTERM ladder. Returns the child's exit status.
async fn stop(
    child: &mut tokio::process::Child,
    pid: Option<Pid>,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    for _ in 0..2 {
        if let Some(pid) = pid {
            let _ = kill(pid, Signal::SIGTERM);
        }
        if let Ok(s) = tokio::time::timeout(grace, child.wait()).await {
            return s;
        }
    }
    let _ = child.start_kill();
    child.wait().await
}

/// `run … — evidence: DIR` (the end of every run), or the path named when evidence could not be
/// finished (`… what was written so far is in `DIR``).
fn bundle_from_stderr(line: &str) -> Option<PathBuf> {
    if let Some(i) = line.rfind("evidence: ") {
        let path = line[i + "evidence: ".len()..].trim();
        if !path.is_empty() {
            return Some(PathBuf::from(path));
        }
    }
    let marker = "what was written so far is in `";
    line.find(marker).and_then(|i| {
        let rest = &line[i + marker.len()..];
        rest.find('`').map(|end| PathBuf::from(&rest[..end]))
    })
}

/// `--json` output: one JSON document, or JSON lines whose last has the bundle.
fn bundle_from_json(stdout: &str) -> Option<PathBuf> {
    let from = |v: serde_json::Value| v.get("bundle").and_then(|b| b.as_str()).map(PathBuf::from);
    serde_json::from_str::<serde_json::Value>(stdout)
        .ok()
        .and_then(from)
        .or_else(|| {
            stdout
                .lines()
                .rev()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find_map(from)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bundle_in_stderr_and_json() {
        assert_eq!(
            bundle_from_stderr("run 1a2b succeeded in 1.2s — evidence: /p/x/20260101T000000Z-1a2b"),
            Some(PathBuf::from("/p/x/20260101T000000Z-1a2b"))
        );
        assert_eq!(
            bundle_from_stderr(
                "error: disk full; the run was stopped; what was written so far is in `/p/b`"
            ),
            Some(PathBuf::from("/p/b"))
        );
        assert_eq!(bundle_from_stderr("step a succeeded"), None);
        assert_eq!(
            bundle_from_json("{\n  \"bundle\": \"/p/b\"\n}"),
            Some(PathBuf::from("/p/b"))
        );
        assert_eq!(
            bundle_from_json(
                "{\"event\":\"x\"}\n{\"event\":\"run_finished\",\"bundle\":\"/p/c\"}\n"
            ),
            Some(PathBuf::from("/p/c"))
        );
    }
}
