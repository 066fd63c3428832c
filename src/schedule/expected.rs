//! What a schedule file says should be in an evidence directory: the fire times of the entries
//! that run a runbook there, and the bundles the scheduler's state names as last runs.
//! `runbook evidence verify --chain --schedule` compares them with the bundles it finds.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};

use crate::render::print_diagnostics;

/// At most this many fire times per check (a minutely cron over years stays bounded).
const MAX_SLOTS: usize = 10_000;

/// The runs a schedule expected of one runbook's bundle directory.
#[derive(Debug, Default)]
pub struct Expected {
    /// Each fire time due by now, with the next fire time (the end of its window).
    pub slots: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    /// Bundles the state file names as the last run of an entry that are not on disk.
    pub last_bundles_missing: Vec<String>,
}

/// From `schedule`: the fire times of the entries that run the runbook whose bundles are in
/// `rb_dir` (the directory is named after the runbook, under the entry's `evidence_dir`), from
/// just before `since` (the first bundle) up to now, and the last-run bundles that are missing.
/// The error is a sentence for the console; the schedule file's own diagnostics are printed.
pub fn expected(
    schedule: &Path,
    rb_dir: &Path,
    since: Option<DateTime<Utc>>,
) -> Result<Expected, String> {
    let file = super::file::load(schedule).map_err(|d| {
        print_diagnostics(&d);
        format!("schedule file `{}` has errors", schedule.display())
    })?;
    let state = super::state::State::load(&file.state_file).map_err(|e| e.to_string())?;
    let name = rb_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let here = rb_dir.parent().map(canonical);
    let now = Utc::now();
    let mut out = Expected::default();
    for entry in &file.entries {
        if runbook_name(&entry.runbook).as_deref() != Some(name.as_str())
            || Some(canonical(&entry.evidence_dir)) != here
        {
            continue;
        }
        // A drill starts within its jitter after its fire time; the next fire time ends its
        // window. Fire times not yet due (plus jitter) are not counted.
        let jitter = Duration::from_std(entry.jitter).unwrap_or_default();
        let Some(mut t) = since.map(|s| s - Duration::minutes(1)) else {
            continue;
        };
        while let Some(at) = entry.cron.next_after(t) {
            if at + jitter + Duration::minutes(1) > now || out.slots.len() >= MAX_SLOTS {
                break;
            }
            let end = entry.cron.next_after(at).unwrap_or(now);
            out.slots.push((at, end));
            t = at;
        }
        if let Some(b) = state
            .entries
            .get(&entry.name)
            .and_then(|s| s.last_outcome.as_ref())
            .and_then(|o| o.bundle.clone())
        {
            // Written as the scheduler saw it: absolute, or relative to where it ran.
            let p = Path::new(&b);
            if !p.exists() && !file.dir.join(p).exists() {
                out.last_bundles_missing.push(b);
            }
        }
    }
    Ok(out)
}

/// The `[runbook] name` of an entry's runbook, read by the engine's own analyzer (an entry
/// whose runbook does not load names nothing, and expects nothing here).
fn runbook_name(path: &Path) -> Option<String> {
    let source = runbook_engine::load_source(path).ok()?;
    let host = runbook_engine::expr::ExprHost::new();
    let (runbook, _) = runbook_engine::analyzer::analyze(&source, &host);
    runbook.map(|r| r.meta.name)
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
