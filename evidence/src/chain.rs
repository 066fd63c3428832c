//! The chain of drills: each run records, in its manifest (`context.chain`), the SHA-256 of the
//! `SHA256SUMS` of the bundle before it for the same runbook in the same evidence directory,
//! or that it is the first. Because `SHA256SUMS` lists `manifest.json`, and is what the
//! signature covers, each bundle vouches for the one before it: walking the history finds a
//! bundle deleted, edited after the next one was recorded, or moved in the order.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::checksums;
use crate::verify::{self, VerifyOptions, VerifyReport, MANIFEST_FILE, SUMS_FILE};

/// Where in the manifest's `context` the link is recorded.
pub const CONTEXT_KEY: &str = "chain";

/// The bundle directories directly under `runbook_dir`, in the order the runs started. Names
/// begin with the UTC start second (`20261125T101500Z-<run id>`), so the name orders them;
/// runs started in the same second are ordered by their manifest's `started_at` (only those
/// manifests are read: this runs before every run).
fn bundles_in(runbook_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(runbook_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| verify::check_is_bundle(&e.path()).is_ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let stamp = |n: &str| n.split('-').next().unwrap_or(n).to_owned();
    let mut i = 0;
    while i < names.len() {
        let s = stamp(&names[i]);
        let mut j = i + 1;
        while j < names.len() && stamp(&names[j]) == s {
            j += 1;
        }
        if j - i > 1 {
            names[i..j].sort_by_cached_key(|n| {
                (started_at(&read_manifest(&runbook_dir.join(n))), n.clone())
            });
        }
        i = j;
    }
    names
}

fn started_at(manifest: &Value) -> Option<DateTime<Utc>> {
    manifest["started_at"]
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn read_manifest(bundle: &Path) -> Value {
    std::fs::read(bundle.join(MANIFEST_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn sums_digest(bundle: &Path) -> Option<String> {
    std::fs::read(bundle.join(SUMS_FILE))
        .ok()
        .map(|b| checksums::sha256_bytes(&b))
}

/// What a new run of the runbook whose bundles live in `runbook_dir` records about its
/// predecessor: the last sealed bundle there (`previous`, with the SHA-256 of its
/// `SHA256SUMS`), or `previous: null` for the first. Bundles after it that are not sealed
/// (running, or died before sealing) are named in `unsealed`: they cannot be vouched for yet.
pub fn link_to_previous(runbook_dir: &Path) -> Value {
    let names = bundles_in(runbook_dir);
    let mut unsealed = Vec::new();
    for name in names.iter().rev() {
        let dir = runbook_dir.join(name);
        match sums_digest(&dir) {
            Some(sha256) => {
                let m = read_manifest(&dir);
                unsealed.reverse();
                return json!({
                    "previous": {
                        "bundle": name,
                        "run_id": m["run_id"],
                        "status": m["status"],
                        "started_at": m["started_at"],
                        "sha256": sha256,
                    },
                    "unsealed": unsealed,
                });
            }
            None => unsealed.push(name.clone()),
        }
    }
    unsealed.reverse();
    json!({ "previous": null, "unsealed": unsealed })
}

/// One bundle of the history, as found.
#[derive(Debug)]
pub struct Entry {
    pub bundle: String,
    pub run_id: Option<String>,
    pub status: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub report: VerifyReport,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainProblem {
    /// `by` links to `bundle`, which is not in the directory.
    Missing {
        by: String,
        bundle: String,
        run_id: String,
        started_at: String,
    },
    /// `bundle`'s `SHA256SUMS` is not the one `by` recorded.
    Edited {
        by: String,
        bundle: String,
        recorded: String,
        actual: String,
    },
    /// `by` links to `links_to`, but the bundle before it is `expected`.
    OutOfOrder {
        by: String,
        links_to: String,
        expected: String,
    },
    /// `bundle` says it is the first, but chained bundles come before it.
    NotFirst { bundle: String, before: usize },
    /// A scheduled fire time with no bundle for it.
    MissedSlot { at: DateTime<Utc> },
    /// The scheduler's state names a bundle for its last run that is not there.
    LastRunMissing { bundle: String },
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainProblem::Missing {
                by,
                bundle,
                run_id,
                started_at,
            } => write!(
                f,
                "{bundle}: MISSING: {by} records it as the bundle before it (run {run_id}, \
                 started {started_at}), but it is not in the directory (deleted or moved)"
            ),
            ChainProblem::Edited {
                by,
                bundle,
                recorded,
                actual,
            } => write!(
                f,
                "{bundle}: EDITED after {by} was recorded: its {SUMS_FILE} has SHA-256 \
                 {actual}, {by} recorded {recorded}"
            ),
            ChainProblem::OutOfOrder {
                by,
                links_to,
                expected,
            } => write!(
                f,
                "{by}: OUT OF ORDER: it records {links_to} as the bundle before it, but the \
                 bundle before it here is {expected} (re-ordered, renamed or inserted)"
            ),
            ChainProblem::NotFirst { bundle, before } => write!(
                f,
                "{bundle}: says it is the first run in this directory, but {before} chained \
                 bundle(s) come before it (the history was restarted, or bundles re-ordered)"
            ),
            ChainProblem::MissedSlot { at } => write!(
                f,
                "GAP: no bundle for the drill scheduled at {}",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            ChainProblem::LastRunMissing { bundle } => write!(
                f,
                "{bundle}: MISSING: the scheduler's state records it as the last run's bundle, \
                 but it is not there"
            ),
        }
    }
}

#[derive(Debug)]
pub struct ChainReport {
    pub dir: PathBuf,
    pub entries: Vec<Entry>,
    pub problems: Vec<ChainProblem>,
    pub notes: Vec<String>,
}

/// Walks the bundles of one runbook (`runbook_dir` = `<evidence dir>/<runbook name>`): checks
/// each bundle as `evidence verify` does, and each link to the one before it.
pub fn walk(runbook_dir: &Path, opts: &VerifyOptions<'_>) -> ChainReport {
    let names = bundles_in(runbook_dir);
    let mut report = ChainReport {
        dir: runbook_dir.to_owned(),
        entries: Vec::new(),
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let present: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    // The sealed bundles seen so far, by name, in order.
    let mut sealed_before: Vec<&str> = Vec::new();
    let mut chained_before = 0usize;
    for name in &names {
        let dir = runbook_dir.join(name);
        let m = read_manifest(&dir);
        let sealed = dir.join(SUMS_FILE).exists();
        let link = &m["context"][CONTEXT_KEY];
        let unsealed_skipped: BTreeSet<&str> = link["unsealed"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if link.is_null() {
            report.notes.push(format!(
                "{name}: records no link to the bundle before it (written before chaining, or \
                 by another version)"
            ));
        } else if link["previous"].is_null() {
            if chained_before > 0 {
                report.problems.push(ChainProblem::NotFirst {
                    bundle: name.clone(),
                    before: chained_before,
                });
            } else if let Some(p) = sealed_before.last() {
                report.notes.push(format!(
                    "{name}: starts the chain; {p} and the bundles before it predate chaining"
                ));
            }
        } else {
            let prev = &link["previous"];
            let links_to = prev["bundle"].as_str().unwrap_or("?").to_owned();
            let recorded = prev["sha256"].as_str().unwrap_or("?").to_owned();
            if !present.contains(links_to.as_str()) {
                report.problems.push(ChainProblem::Missing {
                    by: name.clone(),
                    bundle: links_to.clone(),
                    run_id: prev["run_id"].as_str().unwrap_or("?").to_owned(),
                    started_at: prev["started_at"].as_str().unwrap_or("?").to_owned(),
                });
            } else {
                let actual = sums_digest(&runbook_dir.join(&links_to))
                    .unwrap_or_else(|| format!("(no {SUMS_FILE})"));
                if !actual.eq_ignore_ascii_case(&recorded) {
                    report.problems.push(ChainProblem::Edited {
                        by: name.clone(),
                        bundle: links_to.clone(),
                        recorded,
                        actual,
                    });
                }
                // Bundles that were not sealed when this run started are not linked to; one
                // sealed later (resumed, repaired) is skipped over rightly.
                let expected = sealed_before
                    .iter()
                    .rev()
                    .find(|n| !unsealed_skipped.contains(**n))
                    .copied();
                if expected != Some(links_to.as_str()) {
                    report.problems.push(ChainProblem::OutOfOrder {
                        by: name.clone(),
                        links_to: links_to.clone(),
                        expected: expected.unwrap_or("(none)").to_owned(),
                    });
                }
            }
        }
        if !link.is_null() {
            chained_before += 1;
        }
        if sealed {
            sealed_before.push(name.as_str());
        } else {
            report.notes.push(format!(
                "{name}: not sealed (running, or the runner died): later runs do not vouch for it"
            ));
        }
        let report_one = verify::verify_bundle_with(&dir, opts);
        report.entries.push(Entry {
            bundle: name.clone(),
            run_id: m["run_id"].as_str().map(str::to_owned),
            status: m["status"].as_str().map(str::to_owned),
            started_at: started_at(&m),
            report: report_one,
        });
    }
    report
}

/// Scheduled fire times the history has no bundle for. `slots` are (fire time, end of its
/// window: the next fire time); a bundle started inside a window is that drill. Only slots
/// after the first bundle count: the history says nothing about the time before it.
pub fn missed_slots(
    report: &ChainReport,
    slots: &[(DateTime<Utc>, DateTime<Utc>)],
) -> Vec<DateTime<Utc>> {
    let starts: Vec<DateTime<Utc>> = report.entries.iter().filter_map(|e| e.started_at).collect();
    let Some(first) = starts.iter().min().copied() else {
        return Vec::new();
    };
    slots
        .iter()
        .filter(|(at, end)| *end > first && *at >= first - chrono::Duration::minutes(1))
        .filter(|(at, end)| !starts.iter().any(|s| s >= at && s < end))
        .map(|(at, _)| *at)
        .collect()
}

/// The runbook directories to walk under `dir`: `dir` itself when bundles are directly in it,
/// else each subdirectory that holds bundles (an evidence directory with several runbooks).
pub fn runbook_dirs(dir: &Path) -> Vec<PathBuf> {
    if !bundles_in(dir).is_empty() {
        return vec![dir.to_owned()];
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !bundles_in(p).is_empty())
        .collect();
    dirs.sort();
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bundle: a manifest with a start time and a chain link, sealed or not.
    fn bundle(dir: &Path, name: &str, second: u32, link: Value, sealed: bool) {
        let b = dir.join(name);
        std::fs::create_dir_all(&b).expect("mkdir");
        let m = json!({
            "run_id": name,
            "status": "succeeded",
            "started_at": format!("2026-11-25T10:00:{second:02}Z"),
            "context": { "chain": link },
        });
        std::fs::write(b.join(MANIFEST_FILE), m.to_string()).expect("manifest");
        if sealed {
            checksums::write(&b).expect("sums");
        }
    }

    fn problems(dir: &Path) -> Vec<ChainProblem> {
        walk(dir, &VerifyOptions::default()).problems
    }

    #[test]
    fn links_follow_sealed_bundles_and_skip_unsealed_ones() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        assert_eq!(link_to_previous(dir)["previous"], Value::Null);
        bundle(dir, "a", 1, link_to_previous(dir), true);
        bundle(dir, "b", 2, link_to_previous(dir), false);
        let link = link_to_previous(dir);
        assert_eq!(link["previous"]["bundle"], "a");
        assert_eq!(link["unsealed"], json!(["b"]));
        bundle(dir, "c", 3, link, true);
        // `b` sealed later (resumed): `c` rightly skipped it.
        checksums::write(&dir.join("b")).expect("sums");
        assert_eq!(problems(dir), vec![]);
    }

    #[test]
    fn a_link_past_a_sealed_bundle_is_out_of_order() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        bundle(dir, "a", 1, link_to_previous(dir), true);
        let to_a = link_to_previous(dir);
        bundle(dir, "b", 2, to_a.clone(), true);
        bundle(dir, "c", 3, to_a, true);
        assert_eq!(
            problems(dir),
            vec![ChainProblem::OutOfOrder {
                by: "c".into(),
                links_to: "a".into(),
                expected: "b".into()
            }]
        );
        // A bundle claiming to be first after chained ones.
        bundle(dir, "d", 4, json!({"previous": null, "unsealed": []}), true);
        assert!(problems(dir).contains(&ChainProblem::NotFirst {
            bundle: "d".into(),
            before: 3
        }));
    }

    #[test]
    fn scheduled_fire_times_without_a_bundle_are_gaps() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        bundle(dir, "a", 5, link_to_previous(dir), true);
        bundle(dir, "b", 35, link_to_previous(dir), true);
        let report = walk(dir, &VerifyOptions::default());
        let t = |s: u32| {
            DateTime::parse_from_rfc3339(&format!("2026-11-25T10:00:{s:02}Z"))
                .expect("time")
                .with_timezone(&Utc)
        };
        // Fire times every 10 s from 10:00:00: a drill started at :05 and :35 only.
        let slots: Vec<_> = (0..5).map(|i| (t(i * 10), t(i * 10 + 10))).collect();
        assert_eq!(missed_slots(&report, &slots), vec![t(10), t(20), t(40)]);
    }
}
