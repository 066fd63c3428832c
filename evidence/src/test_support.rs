//! Manifests for tests, built from JSON the way `manifest.json` is written.

use std::path::Path;

use crate::manifest::Manifest;

/// A failed run: `fetch` succeeded, `restore` failed twice (exit 3, stderr), `verify` was
/// skipped, `notify` was cancelled, `cleanup` ran on two targets. Logs are written into
/// `bundle`.
pub fn failed_run(bundle: &Path) -> Manifest {
    let logs: &[(&str, &str)] = &[
        (
            "steps/fetch/local/attempt-1.log",
            "2026-08-20T10:15:00.100Z --- $ curl -fsS https://backup/latest\n\
             2026-08-20T10:15:00.300Z out fetched snapshot-2026-08-20 <42 MB> & verified\n\
             2026-08-20T10:15:02.000Z --- attempt 1: succeeded\n",
        ),
        (
            "steps/restore/local/attempt-1.log",
            "2026-08-20T10:15:02.100Z --- $ restore --from snapshot\n\
             2026-08-20T10:15:03.000Z out restoring\n\
             2026-08-20T10:15:04.000Z err boom\n\
             2026-08-20T10:15:04.000Z --- attempt 1: exit code 3\n",
        ),
        (
            "steps/cleanup/host-a/attempt-1.log",
            "2026-08-20T10:15:08.000Z --- $ rm -rf /tmp/x\n\
             2026-08-20T10:15:08.500Z --- attempt 1: succeeded\n",
        ),
        (
            "steps/cleanup/host-b/attempt-1.log",
            "2026-08-20T10:15:08.000Z --- $ rm -rf /tmp/x\n\
             2026-08-20T10:15:08.400Z err rm: cannot remove '/tmp/x': Permission denied\n\
             2026-08-20T10:15:08.600Z --- attempt 1: exit code 1\n",
        ),
    ];
    for (rel, text) in logs {
        let p = bundle.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write log");
    }
    // attempt 2 of restore: many lines, invalid UTF-8, control characters, ANSI colours.
    let mut log2 = Vec::new();
    log2.extend_from_slice(b"2026-08-20T10:15:05.000Z --- $ restore --from snapshot\n");
    for i in 1..=70 {
        log2.extend_from_slice(
            format!("2026-08-20T10:15:05.{i:03}Z out progress line {i}\n").as_bytes(),
        );
    }
    log2.extend_from_slice(
        b"2026-08-20T10:15:06.000Z out caf\xc3\xa9 \xff\xfe \x01\x07bell \x1b[32mgreen\x1b[0m ]]> </pre>\n",
    );
    log2.extend_from_slice(
        b"2026-08-20T10:15:06.500Z err ERROR: relation \"orders\" does not exist\n",
    );
    log2.extend_from_slice(b"2026-08-20T10:15:06.500Z --- attempt 2: exit code 3\n");
    let p = bundle.join("steps/restore/local/attempt-2.log");
    std::fs::write(&p, log2).expect("write log");

    let v: serde_json::Value = serde_json::from_str(r##"{
      "format": "runbook-evidence/1",
      "run_id": "7f3a9c",
      "status": "failed",
      "started_at": "2026-08-20T10:15:00Z",
      "finished_at": "2026-08-20T10:15:10.250Z",
      "duration_seconds": 10.25,
      "runbook": {
        "name": "db-restore",
        "title": "DB restore drill <prod> & \"friends\"",
        "refs": ["SOC2 A1.3", "https://wiki.example/dr"],
        "path": "runbooks/db-restore.toml",
        "sha256": "abababababababababababababababababababababababababababababababab",
        "copy": "runbook/db-restore.toml"
      },
      "params": {"cluster": "prod-a", "token": "[REDACTED:token]", "replicas": 3},
      "param_sources": {"cluster": {"from": "cli"}, "token": {"from": "env", "var": "TOKEN"},
                        "replicas": {"from": "default"}},
      "operator": {"user": "alice", "uid": 1000, "host": "jump-1"},
      "engine": {"name": "runbook", "version": "0.1.0"},
      "workdir": "/srv/runbooks",
      "command_line": ["runbook", "run", "runbooks/db-restore.toml"],
      "summary": {"succeeded": 1, "failed": 2, "skipped": 1, "cancelled": 1},
      "steps": [
        {"id": "fetch", "phase": "backup", "status": "succeeded",
         "started_at": "2026-08-20T10:15:00.100Z", "finished_at": "2026-08-20T10:15:02Z",
         "duration_seconds": 1.9,
         "attempts": [{"attempt": 1, "target": "local", "command": "curl -fsS https://backup/latest",
            "cwd": "/srv", "started_at": "2026-08-20T10:15:00.100Z",
            "finished_at": "2026-08-20T10:15:02Z", "duration_seconds": 1.9, "exit_code": 0,
            "outcome": {"kind": "exited", "code": 0}, "output": {"stdout": 40, "stderr": 0},
            "log": "steps/fetch/local/attempt-1.log"}],
         "collected": [{"name": "snap.meta", "source": "/srv/snap.meta",
                        "copy": "collected/fetch/snap.meta", "sha256": "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"},
                       {"name": "gone.txt", "source": "/srv/gone.txt",
                        "error": "No such file or directory (os error 2)"}],
         "outputs": {"snapshot": "snapshot-2026-08-20"}},
        {"id": "restore", "phase": "restore", "status": "failed",
         "reason": "exit code 3 (after 2 attempts)",
         "started_at": "2026-08-20T10:15:02.100Z", "finished_at": "2026-08-20T10:15:06.500Z",
         "duration_seconds": 4.4,
         "attempts": [
           {"attempt": 1, "target": "local", "command": "restore --from snapshot", "cwd": "/srv",
            "started_at": "2026-08-20T10:15:02.100Z", "finished_at": "2026-08-20T10:15:04Z",
            "duration_seconds": 1.9, "exit_code": 3, "outcome": {"kind": "exited", "code": 3},
            "error": "exit code 3", "output": {"stdout": 10, "stderr": 5},
            "retry_delay_seconds": 1.0, "log": "steps/restore/local/attempt-1.log"},
           {"attempt": 2, "target": "local", "command": "restore --from snapshot", "cwd": "/srv",
            "started_at": "2026-08-20T10:15:05Z", "finished_at": "2026-08-20T10:15:06.500Z",
            "duration_seconds": 1.5, "exit_code": 3, "outcome": {"kind": "exited", "code": 3},
            "error": "exit code 3", "output": {"stdout": 1500, "stderr": 45},
            "log": "steps/restore/local/attempt-2.log"}],
         "collected": []},
        {"id": "verify", "phase": "verify", "status": "skipped",
         "reason": "needs `restore`, which failed", "duration_seconds": 0.0,
         "attempts": [], "collected": []},
        {"id": "notify", "status": "cancelled", "reason": "run cancelled (SIGINT)",
         "duration_seconds": 0.0, "attempts": [], "collected": []},
        {"id": "cleanup", "phase": "cleanup", "status": "failed", "reason": "exit code 1 on host-b",
         "started_at": "2026-08-20T10:15:08Z", "finished_at": "2026-08-20T10:15:08.600Z",
         "duration_seconds": 0.6,
         "attempts": [
           {"attempt": 1, "target": "host-a", "command": "rm -rf /tmp/x", "cwd": "/",
            "started_at": "2026-08-20T10:15:08Z", "finished_at": "2026-08-20T10:15:08.500Z",
            "duration_seconds": 0.5, "exit_code": 0, "outcome": {"kind": "exited", "code": 0},
            "output": {"stdout": 0, "stderr": 0}, "log": "steps/cleanup/host-a/attempt-1.log"},
           {"attempt": 1, "target": "host-b", "command": "rm -rf /tmp/x", "cwd": "/",
            "started_at": "2026-08-20T10:15:08Z", "finished_at": "2026-08-20T10:15:08.600Z",
            "duration_seconds": 0.6, "exit_code": 1, "outcome": {"kind": "exited", "code": 1},
            "error": "exit code 1", "output": {"stdout": 0, "stderr": 40},
            "log": "steps/cleanup/host-b/attempt-1.log"}],
         "collected": []}
      ],
      "notes": [{"at": "2026-08-20T10:15:06.600Z",
                 "message": "step restore failed (exit code 3); logs under steps/restore/"}],
      "secrets": ["token"]
    }"##)
    .expect("json");
    serde_json::from_value(v).expect("manifest from json")
}

/// A small succeeded run with one step.
pub fn succeeded_run(bundle: &Path) -> Manifest {
    let rel = "steps/only/local/attempt-1.log";
    let p = bundle.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(
        &p,
        "2026-08-20T10:00:00.000Z --- $ echo ok\n2026-08-20T10:00:00.010Z out ok\n\
         2026-08-20T10:00:00.020Z --- attempt 1: succeeded\n",
    )
    .expect("write");
    let v = serde_json::json!({
      "format": "runbook-evidence/1", "run_id": "0001", "status": "succeeded",
      "started_at": "2026-08-20T10:00:00Z", "finished_at": "2026-08-20T10:00:00.500Z",
      "duration_seconds": 0.5,
      "runbook": {"name": "ok-book", "refs": [], "path": "ok.toml", "sha256": "00", "copy": "runbook/ok.toml"},
      "params": {}, "param_sources": {},
      "operator": {"user": "bob", "uid": 1001, "host": "ci"},
      "engine": {"name": "runbook", "version": "0.1.0"},
      "workdir": "/w", "command_line": ["runbook", "run", "ok.toml"],
      "summary": {"succeeded": 1},
      "steps": [{"id": "only", "status": "succeeded", "started_at": "2026-08-20T10:00:00Z",
         "finished_at": "2026-08-20T10:00:00.020Z", "duration_seconds": 0.02,
         "attempts": [{"attempt": 1, "target": "local", "command": "echo ok", "cwd": "/w",
           "started_at": "2026-08-20T10:00:00Z", "finished_at": "2026-08-20T10:00:00.020Z",
           "duration_seconds": 0.02, "exit_code": 0, "outcome": {"kind": "exited", "code": 0},
           "output": {"stdout": 3, "stderr": 0}, "log": rel}],
         "collected": []}],
      "notes": [], "secrets": []
    });
    serde_json::from_value(v).expect("manifest from json")
}
