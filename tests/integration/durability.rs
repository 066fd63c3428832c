//! Durability with real signals: `kill -9` at several points then `resume`, Ctrl-C twice,
//! `run_on_cancel`, run locks, torn journal lines, approval gates, and evidence that cannot be
//! written.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    find_bundle, processes_matching, read_journal, read_json, step, unique_marker, Test, BIN,
};

fn runbook_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RUNBOOK_EVIDENCE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn start_run(dir: &Path, extra: &[&str]) -> Child {
    let mut args = vec![
        "run",
        "runbook.toml",
        "--evidence-dir",
        "proof",
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    runbook_cmd(dir, &args).spawn().expect("spawn runbook")
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn journal_has(dir: &Path, needle: &str) -> bool {
    let Ok(rbs) = std::fs::read_dir(dir.join("proof")) else {
        return false;
    };
    for rb in rbs.flatten() {
        for b in std::fs::read_dir(rb.path()).into_iter().flatten().flatten() {
            if let Ok(text) = std::fs::read_to_string(b.path().join("journal.jsonl")) {
                if text.contains(needle) {
                    return true;
                }
            }
        }
    }
    false
}

fn kill9(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    let _ = child.wait();
}

fn resume(dir: &Path, bundle: &Path, extra: &[&str]) -> std::process::Output {
    let b = bundle.to_str().expect("utf-8");
    let mut args = vec!["resume", b, "--no-progress"];
    args.extend_from_slice(extra);
    runbook_cmd(dir, &args).output().expect("resume")
}

/// The command lines of the live processes whose working directory is `dir`: the steps of a
/// run there (and, for a moment, a step between its spawn and its exec).
fn processes_in(dir: &Path) -> Vec<String> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let proc_dir = e.path();
        if std::fs::read_link(proc_dir.join("cwd")).ok().as_deref() != Some(dir.as_path()) {
            continue;
        }
        let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'));
        if let (false, Ok(cmdline)) = (zombie, std::fs::read(proc_dir.join("cmdline"))) {
            out.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    out
}

fn counter(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("counter"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Steps with side effects counted in `counter`; `b` is slow unless `fast` exists, and `flaky`
/// fails once (unless `flaky-ok` exists) with a long backoff, so the test can kill the runner in
/// the middle of each.
fn three_steps(marker: &str) -> String {
    format!(
        r#"[runbook]
name = "dur"

[[steps]]
id = "a"
run = "echo a >> counter"
outputs = {{ n = "41 + 1" }}

[[steps]]
id = "b"
needs = ["a"]
run = "echo b >> counter; [ -f fast ] || sleep {marker}"

[[steps]]
id = "flaky"
needs = ["b"]
run = '[ -f flaky-ok ] || {{ touch flaky-ok; echo flaky-fail >> counter; exit 1; }}; echo flaky >> counter'
retry = {{ attempts = 2, delay = "30s" }}

[[steps]]
id = "c"
needs = ["flaky"]
run = "echo c {{{{ steps.a.outputs.n }}}} >> counter"
"#
    )
}

fn finish_after_kill(dir: &Path, marker: &str) -> PathBuf {
    std::fs::write(dir.join("fast"), "").expect("fast");
    let bundle = find_bundle(dir);
    let out = resume(dir, &bundle, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        processes_matching(&format!("sleep {marker}")),
        Vec::<i32>::new(),
        "nothing left running"
    );
    crate::common::assert_bundle_verifies(&bundle);
    bundle
}

#[test]
fn kill_9_mid_attempt_then_resume_runs_only_what_did_not_finish() {
    let marker = unique_marker();
    let t = Test::new()
        .runbook(&three_steps(&marker))
        .file("flaky-ok", "");
    let dir = t.path().to_path_buf();
    let mut child = start_run(&dir, &[]);
    // Started, and its start recorded: the journal is written by another thread than the one
    // that starts processes, so the counter alone can run ahead of it.
    wait_for("b to start", || {
        counter(&dir).contains(&"b".to_owned())
            && std::fs::read_to_string(find_bundle(&dir).join("journal.jsonl")).is_ok_and(|j| {
                j.lines()
                    .any(|l| l.contains("process_started") && l.contains("\"step\":\"b\""))
            })
    });
    let listed = || {
        let out = runbook_cmd(&dir, &["evidence", "list", "proof"])
            .output()
            .expect("evidence list");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let alive = listed();
    assert!(
        alive.contains("  running  ") && !alive.contains("stopped unsealed"),
        "{alive}"
    );
    kill9(&mut child);
    assert!(
        !processes_matching(&format!("sleep {marker}")).is_empty(),
        "the dead runner left b running"
    );
    // Not "running" any more: nothing holds the lock, and the list says what to do.
    let dead = listed();
    assert!(
        dead.contains("stopped unsealed") && dead.contains("runbook resume BUNDLE"),
        "{dead}"
    );
    let bundle = finish_after_kill(&dir, &marker);
    assert_eq!(
        counter(&dir),
        ["a", "b", "b", "flaky", "c 42"],
        "a ran once; b again; a's output restored"
    );
    let m = read_json(&bundle.join("manifest.json"));
    assert_eq!(m["status"], "succeeded");
    assert_eq!(step(&m, "a")["reason"], "succeeded earlier");
    assert_eq!(step(&m, "b")["attempts"].as_array().map(Vec::len), Some(2));
    assert!(step(&m, "b")["attempts"][0]["error"]
        .as_str()
        .unwrap_or("")
        .starts_with("interrupted"));
    assert_eq!(m["resumed"][0]["previous"], "interrupted");
    assert!(m["notes"]
        .to_string()
        .contains("left running by the interrupted run"));
}

#[test]
fn kill_9_during_retry_backoff_then_resume() {
    let marker = unique_marker();
    let t = Test::new().runbook(&three_steps(&marker)).file("fast", "");
    let dir = t.path().to_path_buf();
    let mut child = start_run(&dir, &[]);
    wait_for("flaky to fail once", || {
        counter(&dir).contains(&"flaky-fail".to_owned())
    });
    wait_for("the 30s retry to be scheduled", || {
        journal_has(&dir, "retry_scheduled")
    });
    kill9(&mut child);
    let bundle = finish_after_kill(&dir, &marker);
    assert_eq!(counter(&dir), ["a", "b", "flaky-fail", "flaky", "c 42"]);
    let m = read_json(&bundle.join("manifest.json"));
    assert_eq!(m["status"], "succeeded");
    let flaky = step(&m, "flaky")["attempts"]
        .as_array()
        .expect("attempts")
        .clone();
    assert_eq!(flaky.len(), 2, "attempt numbering continues: {flaky:?}");
    assert_eq!(flaky[1]["attempt"], 2);
    assert!(bundle.join("steps/flaky/local/attempt-2.log").is_file());
}

#[test]
fn kill_9_right_after_start_and_between_steps() {
    for point in ["run_started", "\"status\":\"succeeded\",\"step\":\"a\""] {
        let marker = unique_marker();
        let t = Test::new()
            .runbook(&three_steps(&marker))
            .file("flaky-ok", "");
        let dir = t.path().to_path_buf();
        let mut child = start_run(&dir, &[]);
        wait_for(point, || journal_has(&dir, point));
        kill9(&mut child);
        // The dead runner's steps live on: `a`, started but not yet recorded, may write its
        // line after the kill. Count only once they have ended (b's sleep is left to resume).
        wait_for("the dead run's steps to end", || {
            processes_in(&dir)
                .iter()
                .all(|cmdline| cmdline.contains(&marker))
        });
        let bundle = find_bundle(&dir);
        // Steps whose success the journal recorded before the kill (the step's record, or its
        // local attempt's) must not run again; a step that finished but whose success was not
        // yet recorded is (correctly) run again.
        let recorded_a = read_journal(&bundle).iter().any(|e| {
            e["step"] == "a"
                && ((e["event"] == "step_finished" && e["status"] == "succeeded")
                    || (e["event"] == "attempt_finished"
                        && e["outcome"]["kind"] == "exited"
                        && e["outcome"]["code"] == 0))
        });
        let a_before = counter(&dir).iter().filter(|l| *l == "a").count();
        // Until resumed, the bundle says it was interrupted once repaired.
        let repaired = runbook_cmd(
            &dir,
            &["evidence", "repair", bundle.to_str().expect("utf-8")],
        )
        .output()
        .expect("repair");
        assert!(
            String::from_utf8_lossy(&repaired.stderr).contains("status interrupted"),
            "{repaired:?}"
        );
        finish_after_kill(&dir, &marker);
        let lines = counter(&dir);
        let a_runs = lines.iter().filter(|l| *l == "a").count();
        if recorded_a {
            assert_eq!(
                a_runs, a_before,
                "{point}: a recorded as succeeded ran again: {lines:?}"
            );
        } else {
            assert_eq!(a_runs, a_before + 1, "{point}: {lines:?}");
        }
        assert_eq!(
            lines.last().map(String::as_str),
            Some("c 42"),
            "{point}: {lines:?}"
        );
    }
}

#[test]
fn a_torn_journal_line_is_tolerated() {
    let marker = unique_marker();
    let t = Test::new()
        .runbook(&three_steps(&marker))
        .file("flaky-ok", "");
    let dir = t.path().to_path_buf();
    let mut child = start_run(&dir, &[]);
    // Started, and its start recorded: the journal is written by another thread than the one
    // that starts processes, so the counter alone can run ahead of it.
    wait_for("b to start", || {
        counter(&dir).contains(&"b".to_owned())
            && std::fs::read_to_string(find_bundle(&dir).join("journal.jsonl")).is_ok_and(|j| {
                j.lines()
                    .any(|l| l.contains("process_started") && l.contains("\"step\":\"b\""))
            })
    });
    kill9(&mut child);
    let bundle = find_bundle(&dir);
    let journal = bundle.join("journal.jsonl");
    let mut text = std::fs::read_to_string(&journal).expect("journal");
    text.push_str("{\"at\":\"2026-11-25T18:00:00Z\",\"event\":\"attempt_fin");
    std::fs::write(&journal, text).expect("tear");
    finish_after_kill(&dir, &marker);
    let events = read_journal(&bundle);
    assert!(
        events.iter().all(|e| e["seq"].is_u64()),
        "every line parses after resume"
    );
    let m = read_json(&bundle.join("manifest.json"));
    assert!(
        m["notes"].to_string().contains("torn line"),
        "{}",
        m["notes"]
    );
}

#[test]
fn second_interrupt_kills_without_waiting_for_the_grace_period() {
    let marker = unique_marker();
    let toml = format!(
        "[runbook]\nname = \"t\"\n[[steps]]\nid = \"stubborn\"\nkill_grace = \"60s\"\nrun = \"trap '' TERM; sleep {marker}\"\n[[steps]]\nid = \"uncordon\"\nneeds = [\"stubborn\"]\nalways = true\nrun_on_cancel = true\nrun = \"touch uncordoned\"\n[[steps]]\nid = \"report\"\nneeds = [\"stubborn\"]\nalways = true\nrun = \"touch reported\"\n"
    );
    let t = Test::new().runbook(&toml);
    let dir = t.path().to_path_buf();
    let child = start_run(&dir, &[]);
    wait_for("the step to run", || {
        !processes_matching(&format!("sleep {marker}")).is_empty()
    });
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let started = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("first");
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("second");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "did not wait 60s of grace"
    );
    assert_eq!(
        processes_matching(&format!("sleep {marker}")),
        Vec::<i32>::new()
    );
    assert!(
        dir.join("uncordoned").exists(),
        "run_on_cancel step ran after the interrupt"
    );
    assert!(
        !dir.join("reported").exists(),
        "a plain always step does not run after a cancel"
    );
    let m = read_json(&find_bundle(&dir).join("manifest.json"));
    assert_eq!(m["status"], "cancelled");
    assert_eq!(step(&m, "uncordon")["status"], "succeeded");
}

#[test]
fn a_second_run_is_refused_while_one_is_running() {
    let marker = unique_marker();
    let toml = format!(
        "[runbook]\nname = \"locked\"\n[[steps]]\nid = \"long\"\nrun = \"sleep {marker}\"\n"
    );
    let t = Test::new().runbook(&toml);
    let dir = t.path().to_path_buf();
    let mut first = start_run(&dir, &[]);
    wait_for("the first run", || {
        !processes_matching(&format!("sleep {marker}")).is_empty()
    });
    let second = runbook_cmd(&dir, &["run", "runbook.toml", "--evidence-dir", "proof"])
        .output()
        .expect("second");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("another run of this runbook is in progress: run "),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("(pid {})", first.id())),
        "{stderr}"
    );
    kill9(&mut first);
    // The dead run's lock is stale now: a new run is refused until told.
    let third = runbook_cmd(&dir, &["run", "runbook.toml", "--evidence-dir", "proof"])
        .output()
        .expect("third");
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert_eq!(third.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the previous run did not finish"),
        "{stderr}"
    );
    for pid in processes_matching(&format!("sleep {marker}")) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::fs::write(
        dir.join("runbook.toml"),
        "[runbook]\nname = \"locked\"\n[[steps]]\nid = \"long\"\nrun = \"true\"\n",
    )
    .expect("write");
    let fourth = runbook_cmd(
        &dir,
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--break-lock",
        ],
    )
    .output()
    .expect("fourth");
    assert_eq!(
        fourth.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&fourth.stderr)
    );
    assert!(String::from_utf8_lossy(&fourth.stderr).contains("took over the lock"));
}

#[test]
fn an_unwritable_evidence_location_fails_before_anything_runs() {
    let t = Test::new()
        .runbook("[runbook]\nname = \"t\"\n[[steps]]\nid = \"a\"\nrun = \"touch ran\"\n");
    let out = t
        .args([
            "run",
            "runbook.toml",
            "--evidence-dir",
            "/proc/runbook-evidence",
        ])
        .run();
    out.assert_code(2)
        .assert_stderr_contains("cannot write evidence to `/proc/runbook-evidence/t/");
    assert!(!out.dir.path().join("ran").exists());
}

#[test]
fn evidence_that_cannot_be_written_stops_the_run_and_keeps_what_was_written() {
    // A 200 KiB file-size limit stands in for a full disk: the log of the loud step cannot grow.
    let toml = "[runbook]\nname = \"t\"\n[[steps]]\nid = \"loud\"\nrun = \"head -c 3000000 /dev/zero | tr '\\\\0' 'x' | fold -w 100\"\n[[steps]]\nid = \"after\"\nneeds = [\"loud\"]\nrun = \"touch after-ran\"\n";
    let t = Test::new().runbook(toml);
    let dir = t.path().to_path_buf();
    let out = Command::new("bash")
        .args([
            "-c",
            &format!(
                "ulimit -f 200; exec {BIN} run runbook.toml --evidence-dir proof --no-progress"
            ),
        ])
        .current_dir(&dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write evidence to") && stderr.contains("File too large"),
        "{stderr}"
    );
    assert!(
        !dir.join("after-ran").exists(),
        "no new step starts once evidence cannot be written"
    );
    let bundle = find_bundle(&dir);
    let journal = std::fs::read_to_string(bundle.join("journal.jsonl")).expect("journal readable");
    assert!(journal
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    assert!(journal.contains("attempt_started"));
}

#[test]
fn approval_gates_stop_the_run_and_resume_records_who_approved() {
    let toml = r#"[runbook]
name = "gated"
[[steps]]
id = "snapshot"
run = "echo snap >> counter"
[[steps]]
id = "upgrade"
needs = ["snapshot"]
approve = "Upgrade production servers to v1.31?"
run = "echo upgrade >> counter"
"#;
    let t = Test::new().runbook(toml);
    let dir = t.path().to_path_buf();
    let out = runbook_cmd(
        &dir,
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
        ],
    )
    .output()
    .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("continue with: runbook resume"), "{stderr}");
    let bundle = find_bundle(&dir);
    let m = read_json(&bundle.join("manifest.json"));
    assert_eq!(m["status"], "awaiting_approval");
    assert!(step(&m, "upgrade")["reason"]
        .as_str()
        .unwrap_or("")
        .starts_with("awaiting approval: Upgrade production servers"));
    assert_eq!(counter(&dir), ["snap"]);
    let wrong = resume(&dir, &bundle, &["--approve", "snapshot"]);
    assert_eq!(wrong.status.code(), Some(2));
    let out = resume(&dir, &bundle, &["--approve", "upgrade"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(counter(&dir), ["snap", "upgrade"]);
    let m = read_json(&bundle.join("manifest.json"));
    assert_eq!(m["status"], "succeeded");
    assert_eq!(m["approvals"][0]["step"], "upgrade");
    assert_eq!(m["approvals"][0]["granted"], true);
    assert!(m["approvals"][0]["by"].as_str().unwrap_or("").contains('@'));
    crate::common::assert_bundle_verifies(&bundle);
}

#[test]
fn resume_refuses_a_changed_runbook_and_a_finished_run() {
    let t =
        Test::new().runbook("[runbook]\nname = \"t\"\n[[steps]]\nid = \"a\"\nrun = \"exit 1\"\n");
    let dir = t.path().to_path_buf();
    let out = runbook_cmd(&dir, &["run", "runbook.toml", "--evidence-dir", "proof"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let bundle = find_bundle(&dir);
    std::fs::write(
        dir.join("runbook.toml"),
        "[runbook]\nname = \"t\"\n[[steps]]\nid = \"a\"\nrun = \"true\"\n",
    )
    .expect("edit");
    let out = resume(&dir, &bundle, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("changed since this run started"));
    let out = resume(&dir, &bundle, &["--allow-changed"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = resume(&dir, &bundle, &["--allow-changed"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already succeeded"));
}

// Regression: resuming a bundle whose journal had been emptied or cut short (disk full, a
// crash, a careless edit) numbered attempts from 1 again and overwrote the attempt-1 log and
// transcript already in the bundle.
#[test]
fn resume_refuses_a_journal_that_records_less_than_the_bundle_holds() {
    let t = Test::new().runbook(
        "[runbook]\nname = \"t\"\n[[steps]]\nid = \"a\"\nrun = \"echo first-attempt; exit 1\"\n",
    );
    let dir = t.path().to_path_buf();
    let out = runbook_cmd(&dir, &["run", "runbook.toml", "--evidence-dir", "proof"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let bundle = find_bundle(&dir);
    let journal = bundle.join("journal.jsonl");
    let full = std::fs::read_to_string(&journal).expect("journal");
    let log = bundle.join("steps/a/local/attempt-1.log");
    let cast = bundle.join("steps/a/local/attempt-1.cast");
    let (log_before, cast_before) = (
        std::fs::read(&log).expect("log"),
        std::fs::read(&cast).expect("cast"),
    );

    // Emptied, then cut short after run_started (before the attempt was recorded).
    let first_line = full.lines().next().expect("run_started");
    for (how, text) in [
        ("emptied", String::new()),
        ("cut short", format!("{first_line}\n")),
    ] {
        std::fs::write(&journal, &text).expect("truncate");
        let out = resume(&dir, &bundle, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{how}: {stderr}");
        for needle in [
            "journal.jsonl` records no attempt for 2 file(s) in the bundle",
            "steps/a/local/attempt-1.cast, steps/a/local/attempt-1.log",
            "the logs on disk are newer than what the journal records",
            "nothing was changed",
        ] {
            assert!(stderr.contains(needle), "{how}: {needle:?} in {stderr}");
        }
        assert_eq!(std::fs::read(&log).expect("log"), log_before, "{how}");
        assert_eq!(std::fs::read(&cast).expect("cast"), cast_before, "{how}");
        assert_eq!(
            std::fs::read_to_string(&journal).expect("journal"),
            text,
            "{how}"
        );
    }

    // With the journal back, the same bundle resumes at attempt 2.
    std::fs::write(&journal, &full).expect("restore");
    std::fs::write(
        dir.join("runbook.toml"),
        "[runbook]\nname = \"t\"\n[[steps]]\nid = \"a\"\nrun = \"true\"\n",
    )
    .expect("fix");
    let out = resume(&dir, &bundle, &["--allow-changed"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&log).expect("log"), log_before);
    assert!(bundle.join("steps/a/local/attempt-2.log").is_file());
    crate::common::assert_bundle_verifies(&bundle);

    // No attempt files to lose, but no run_started either: nothing to continue.
    let t = Test::new().runbook(
        "[runbook]\nname = \"t\"\n[[steps]]\nid = \"a\"\nrun = \"false\"\nwhen = \"false\"\n",
    );
    let dir = t.path().to_path_buf();
    let out = runbook_cmd(&dir, &["run", "runbook.toml", "--evidence-dir", "proof"])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = find_bundle(&dir);
    std::fs::write(bundle.join("journal.jsonl"), "").expect("empty");
    let out = resume(&dir, &bundle, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("journal.jsonl` has no run_started event"),
        "{stderr}"
    );
}

#[test]
fn resume_adds_again_the_hosts_the_interrupted_run_added() {
    let t = Test::new().runbook(
        r#"
[runbook]
name = "late-hosts"
[[steps]]
id = "provision"
script = '''
inventory.add_host("vm-1", #{ address: "127.0.0.1", port: 2201, groups: ["late"], vars: #{ color: "blue" } });
inventory.add_host("vm-2", #{ address: "127.0.0.2", groups: ["late"], vars: #{ color: "green" } });
'''
[[steps]]
id = "configure"
needs = ["provision"]
on = "late"
steps = [
  { id = "say", local = true, run = "test -f go && echo {{ host.name }}:{{ host.port }}:{{ host.vars.color }} >> said" },
]
"#,
    );
    let dir = t.path().to_path_buf();
    let first = t.run_args().run();
    assert_ne!(first.code, 0, "configure fails until `go` exists");
    let bundle = first.bundle();
    std::fs::write(dir.join("go"), "").expect("go");
    let out = resume(&dir, &bundle, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let mut said: Vec<String> = std::fs::read_to_string(dir.join("said"))
        .expect("said")
        .lines()
        .map(String::from)
        .collect();
    said.sort();
    assert_eq!(said, ["vm-1:2201:blue", "vm-2:22:green"]);
    let m = read_json(&bundle.join("manifest.json"));
    assert_eq!(
        step(&m, "provision")["attempts"].as_array().map(Vec::len),
        Some(1),
        "the step that added the hosts is not run again"
    );
    let notes = m["notes"].to_string();
    assert!(
        notes.contains("resume added the hosts the interrupted run had added: vm-1, vm-2"),
        "{notes}"
    );
    assert_eq!(m["hosts_added"][0]["spec"]["vars"]["color"], "blue");
    drop(first);
}

/// Resume binds the secret params again, so what the interrupted run recorded redacted with
/// them (a host's `add_host` settings, a step's outputs) is put back and not redone; a value
/// registered with `secret()` at run time was never stored, so its step runs again.
#[test]
fn resume_restores_what_param_secrets_redacted_and_reruns_what_runtime_secrets_did() {
    let t = Test::new().runbook(
        r#"
[runbook]
name = "secret-resume"
[params]
tok = { secret = true, env = "RB_TEST_TOK" }
[[steps]]
id = "provision"
script = '''
inventory.add_host("vm-1", #{ address: "127.0.0.1", groups: ["late"], vars: #{ token: params.tok } });
'''
[[steps]]
id = "param_out"
run = "echo p >> counter"
outputs = { t = 'params.tok + "-derived"' }
[[steps]]
id = "runtime_out"
run = "echo r >> counter"
outputs = { s = 'secret("minted", "minted-" + params.tok.len())' }
[[steps]]
id = "configure"
needs = ["provision", "param_out", "runtime_out"]
on = "late"
steps = [
  { id = "say", local = true, run = "test -f go && echo {{ host.name }}:{{ host.vars.token }}:{{ steps.param_out.outputs.t }}:{{ steps.runtime_out.outputs.s }} >> said" },
]
"#,
    );
    let dir = t.path().to_path_buf();
    let secret = "tok-9f2c41";
    let first = t.env("RB_TEST_TOK", secret).run_args().run();
    assert_ne!(first.code, 0, "configure fails until `go` exists");
    let bundle = first.bundle();
    std::fs::write(dir.join("go"), "").expect("go");
    let out = runbook_cmd(
        &dir,
        &["resume", bundle.to_str().expect("utf-8"), "--no-progress"],
    )
    .env("RB_TEST_TOK", secret)
    .output()
    .expect("resume");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(dir.join("said"))
            .expect("said")
            .trim(),
        format!("vm-1:{secret}:{secret}-derived:minted-10")
    );
    // param_out ran once; runtime_out twice (the first time side by side with param_out).
    let mut ran = counter(&dir);
    ran.sort();
    assert_eq!(ran, ["p", "r", "r"]);
    let m = read_json(&bundle.join("manifest.json"));
    let notes = m["notes"].to_string();
    assert!(
        notes.contains("resume runs runtime_out again: their outputs held secrets"),
        "{notes}"
    );
    assert!(
        notes.contains("resume added the hosts the interrupted run had added: vm-1"),
        "{notes}"
    );
    assert_eq!(
        m["hosts_added"][0]["spec"]["vars"]["token"],
        "[REDACTED:tok]"
    );
    crate::common::assert_bundle_lacks(&bundle, &[secret, "minted-10"]);
    crate::common::assert_bundle_verifies(&bundle);
    drop(first);
}

/// Regression: a `resume` refused for a missing secret had already taken over the lock, so
/// `.lock` named the refused process instead of the dead runner. Everything that can refuse is
/// now checked first: the refused resume changes nothing — not the lock, not the journal, not
/// the leftover processes — and the next resume, given the secret, works.
#[test]
fn a_refused_resume_leaves_the_lock_and_the_bundle_as_they_were() {
    let marker = unique_marker();
    let t = Test::new().runbook(&format!(
        r#"[runbook]
name = "locked-resume"
[params]
tok = {{ secret = true, env = "RB_TEST_TOK" }}
[[steps]]
id = "slow"
env = {{ TOK = "{{{{ params.tok }}}}" }}
run = "echo slow >> counter; [ -f fast ] || sleep {marker}"
[[steps]]
id = "last"
needs = ["slow"]
run = "echo last >> counter"
"#
    ));
    let dir = t.path().to_path_buf();
    let mut child = runbook_cmd(
        &dir,
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
        ],
    )
    .env("RB_TEST_TOK", "tok-5ecret")
    .spawn()
    .expect("spawn runbook");
    let runner_pid = child.id();
    wait_for("slow to start", || {
        journal_has(&dir, "process_started") && counter(&dir).contains(&"slow".to_owned())
    });
    let bundle = find_bundle(&dir);
    // While the run is alive, resume is refused before it looks any further.
    let live = runbook_cmd(
        &dir,
        &["resume", bundle.to_str().expect("utf-8"), "--no-progress"],
    )
    .env("RB_TEST_TOK", "tok-5ecret")
    .output()
    .expect("resume");
    let stderr = String::from_utf8_lossy(&live.stderr);
    assert_eq!(live.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("another run of this runbook is in progress"),
        "{stderr}"
    );
    assert!(
        !processes_matching(&format!("sleep {marker}")).is_empty(),
        "the live run's step was not touched"
    );
    kill9(&mut child);
    // The holder's details, published whole beside the lock (`.lock.json`).
    let lock_path = dir.join("proof/locked-resume/.lock.json");
    let lock_before = std::fs::read_to_string(&lock_path).expect("lock");
    assert!(
        lock_before.contains(&format!("\"pid\":{runner_pid}")),
        "{lock_before}"
    );
    let journal_before = std::fs::read(bundle.join("journal.jsonl")).expect("journal");

    let refused = runbook_cmd(
        &dir,
        &["resume", bundle.to_str().expect("utf-8"), "--no-progress"],
    )
    .env_remove("RB_TEST_TOK")
    .output()
    .expect("resume");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("tok"), "{stderr}");
    assert!(!stderr.contains("took over the lock"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&lock_path).expect("lock"),
        lock_before,
        "the refused resume left the lock as it was"
    );
    assert_eq!(
        std::fs::read(bundle.join("journal.jsonl")).expect("journal"),
        journal_before,
        "and the journal"
    );
    assert!(
        !processes_matching(&format!("sleep {marker}")).is_empty(),
        "and the dead run's leftover process: only a resume that goes ahead stops it"
    );

    std::fs::write(dir.join("fast"), "").expect("fast");
    let out = runbook_cmd(
        &dir,
        &["resume", bundle.to_str().expect("utf-8"), "--no-progress"],
    )
    .env("RB_TEST_TOK", "tok-5ecret")
    .output()
    .expect("resume");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("took over the lock"), "{stderr}");
    assert_eq!(
        processes_matching(&format!("sleep {marker}")),
        Vec::<i32>::new()
    );
    assert_eq!(counter(&dir), ["slow", "slow", "last"]);
    let m = read_json(&bundle.join("manifest.json"));
    assert_eq!(m["status"], "succeeded");
    assert!(!lock_path.exists(), "released at the end");
    crate::common::assert_bundle_verifies(&bundle);
}
