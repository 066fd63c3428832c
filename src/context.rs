//! Run context for the manifest: where the runbook came from (git commit), what the tools it
//! declares say about themselves (`[evidence] facts`), and what the clock was.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

/// Runs a command with a time limit; (exit code, combined output trimmed to 4 KiB).
fn capture(cmd: &str, dir: &Path) -> (Option<i32>, String) {
    let out = Command::new("timeout")
        .args(["10", "sh", "-c", cmd])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            let text = text.trim();
            let text: String = text.chars().take(4096).collect();
            (o.status.code(), text)
        }
        Err(e) => (None, format!("could not run: {e}")),
    }
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

pub fn collect(runbook: &Path, workdir: &Path, facts: &[String]) -> Value {
    let dir = runbook
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Independent commands, run side by side: they delay the start of every run.
    let (repo, ntp, facts) = std::thread::scope(|scope| {
        let repo = scope.spawn(|| {
            git(dir, &["rev-parse", "HEAD"]).map(|commit| {
                let dirty = scope.spawn(|| {
                    git(dir, &["status", "--porcelain", "--", "."]).is_some_and(|s| !s.is_empty())
                });
                let branch = scope.spawn(|| git(dir, &["rev-parse", "--abbrev-ref", "HEAD"]));
                let remote = git(dir, &["config", "--get", "remote.origin.url"]);
                json!({
                    "commit": commit,
                    "dirty": dirty.join().unwrap_or(false),
                    "branch": branch.join().unwrap_or(None),
                    "remote": remote,
                })
            })
        });
        let ntp = scope.spawn(|| {
            Command::new("timedatectl")
                .args(["show", "-p", "NTPSynchronized", "--value"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "yes")
        });
        let facts: Vec<_> = facts
            .iter()
            .map(|cmd| {
                scope.spawn(move || {
                    let (code, output) = capture(cmd, workdir);
                    json!({ "command": cmd, "exit_code": code, "output": output })
                })
            })
            .collect();
        (
            repo.join().unwrap_or(None),
            ntp.join().unwrap_or(None),
            facts
                .into_iter()
                .map(|f| f.join().unwrap_or(Value::Null))
                .collect::<Vec<Value>>(),
        )
    });
    let now = chrono::Local::now();
    json!({
        "git": repo,
        "time": {
            "source": "system clock",
            "ntp_synchronized": ntp,
            "local_offset": now.offset().to_string(),
            "local_start": now.to_rfc3339(),
        },
        "engine": {
            "version": env!("CARGO_PKG_VERSION"),
            "target": std::env::consts::ARCH.to_owned() + "-" + std::env::consts::OS,
        },
        "facts": facts,
    })
}
