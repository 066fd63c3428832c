//! Write-ahead: no step's action starts before the journal holds the record that announces it.
//! Checked with real `kill -9` at instants picked from the live journal, with a ledger that
//! every step appends to, and with a disk that fills up mid-run (a small tmpfs).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{find_bundle, read_journal, read_json, BIN};

const CHAIN: usize = 10;

fn chain_runbook() -> String {
    let mut toml = String::from("[runbook]\nname = \"ledger\"\n");
    for i in 0..CHAIN {
        toml.push_str(&format!(
            "[[steps]]\nid = \"c{i}\"\nrun = \"echo c{i} >> ledger; sleep 0.05\"\n"
        ));
        if i > 0 {
            toml.push_str(&format!("needs = [\"c{}\"]\n", i - 1));
        }
    }
    toml
}

fn runbook(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RUNBOOK_EVIDENCE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// `runbook run runbook.toml --evidence-dir proof --no-progress` in `dir`.
fn run_cmd(dir: &Path) -> Command {
    runbook(
        dir,
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
        ],
    )
}

/// Waits for a spawned runbook, returning its exit status and what it printed on stderr.
fn finish(mut child: Child) -> (std::process::ExitStatus, String) {
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    (child.wait().expect("wait"), stderr)
}

fn ledger(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("ledger"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// The bundle's journal, as text, once it exists.
fn journal_text(dir: &Path) -> Option<String> {
    let rb = dir.join("proof/ledger");
    let bundle = std::fs::read_dir(rb)
        .ok()?
        .flatten()
        .find(|e| e.path().is_dir())?;
    std::fs::read_to_string(bundle.path().join("journal.jsonl")).ok()
}

/// xorshift: the kill instants are reproducible from the printed seed.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn steps_with(
    journal: &[serde_json::Value],
    event: &str,
    extra: impl Fn(&serde_json::Value) -> bool,
) -> Vec<String> {
    journal
        .iter()
        .filter(|e| e["event"] == event && extra(e))
        .filter_map(|e| e["step"].as_str().map(String::from))
        .collect()
}

fn kill9(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

/// `kill -9` the moment the journal records the end of a randomly chosen step (the instant at
/// which the next step is being started), then `resume`. Every line in the ledger must have
/// its `attempt_started` in the journal, no step recorded as succeeded runs again, and the
/// resumed run finishes. Before write-ahead, the next step's process could start while its
/// record was still on its way to the journal.
#[test]
fn a_kill_at_any_step_boundary_leaves_a_journal_that_names_every_started_step() {
    let mut seed: u64 = std::env::var("RUNBOOK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.subsec_nanos()),
            ) | 1
        });
    let first_seed = seed;
    let trials: u32 = std::env::var("RUNBOOK_TEST_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    for trial in 0..trials {
        let k = usize::try_from(next(&mut seed) % (CHAIN as u64 - 1)).expect("small");
        let durability = if trial % 2 == 0 { "process" } else { "power" };
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        std::fs::write(dir.join("runbook.toml"), chain_runbook()).expect("write");
        let mut child = runbook(
            dir,
            &[
                "run",
                "runbook.toml",
                "--evidence-dir",
                "proof",
                "--no-progress",
                "--durability",
                durability,
            ],
        )
        .spawn()
        .expect("spawn");
        let target = format!("\"step\":\"c{k}\"");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if journal_text(dir).is_some_and(|j| {
                j.lines()
                    .any(|l| l.contains("step_finished") && l.contains(&target))
            }) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "seed {first_seed}: c{k} never finished"
            );
            std::thread::sleep(Duration::from_micros(300));
        }
        kill9(&mut child);

        let bundle = find_bundle(dir);
        let journal = read_journal(&bundle);
        let announced = steps_with(&journal, "attempt_started", |_| true);
        let ran = ledger(dir);
        for line in &ran {
            assert!(
                announced.contains(line),
                "seed {first_seed}, trial {trial} ({durability}), killed after c{k}: `{line}` ran \
                 but the journal has no attempt_started for it\nledger: {ran:?}\nannounced: {announced:?}"
            );
        }
        let succeeded = steps_with(&journal, "step_finished", |e| e["status"] == "succeeded");

        let out = runbook(
            dir,
            &["resume", bundle.to_str().expect("utf-8"), "--no-progress"],
        )
        .output()
        .expect("resume");
        assert_eq!(
            out.status.code(),
            Some(0),
            "seed {first_seed}, trial {trial} ({durability}), killed after c{k}: resume failed\n\
             --- resume stdout\n{}\n--- resume stderr\n{}\nledger: {ran:?}\njournal before resume: {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            journal
                .iter()
                .map(|e| format!("{} {}", e["event"], e["step"]))
                .collect::<Vec<_>>()
        );
        let after = ledger(dir);
        for s in &succeeded {
            assert_eq!(
                after.iter().filter(|l| *l == s).count(),
                1,
                "seed {first_seed}: {s} succeeded before the kill and ran again: {after:?}"
            );
        }
        for i in 0..CHAIN {
            assert!(
                after.contains(&format!("c{i}")),
                "seed {first_seed}: {after:?}"
            );
        }
        crate::common::assert_bundle_verifies(&bundle);
    }
}

/// Mounts a tmpfs of `size` at `at`; `None` where this test cannot mount (not root).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }

    fn grow(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full evidence disk: the loud step's log cannot be written, the run stops with the path
/// and the free space, the next step does not start, and the `run_on_cancel` cleanup, whose
/// start cannot be recorded either, is not run (the console says so). Once space is freed,
/// `resume` finishes the run.
#[test]
fn a_full_evidence_disk_starts_nothing_it_cannot_record_and_resume_finishes_later() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let Some(disk) = Tmpfs::mount(&dir.join("proof"), "1m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let toml = "[runbook]\nname = \"full\"\n\
        [[steps]]\nid = \"loud\"\nrun = \"head -c 3000000 /dev/zero | tr '\\\\0' 'x' | fold -w 100 >&2; echo loud >> ledger\"\n\
        [[steps]]\nid = \"next\"\nneeds = [\"loud\"]\nrun = \"echo next >> ledger\"\n\
        [[steps]]\nid = \"cleanup\"\nneeds = [\"next\"]\nalways = true\nrun_on_cancel = true\nrun = \"echo cleanup >> ledger\"\n";
    std::fs::write(dir.join("runbook.toml"), toml).expect("write");
    let child = run_cmd(dir).spawn().expect("spawn");
    let (status, stderr) = finish(child);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot write evidence to")
            && stderr.contains("bytes free on the evidence file system"),
        "the error names the path and the free space: {stderr}"
    );
    let ran = ledger(dir);
    assert!(!ran.contains(&"next".to_owned()), "{ran:?}");
    assert!(
        !ran.contains(&"cleanup".to_owned()),
        "a cleanup whose start cannot be recorded does not run: {ran:?}"
    );
    assert!(
        stderr.contains("not started: its start could not be recorded in the evidence")
            || stderr.contains("not started: the run was cancelled"),
        "the console says why the cleanup did not run: {stderr}"
    );

    disk.grow("64m");
    let bundle = find_bundle(dir);
    let out = runbook(
        dir,
        &["resume", bundle.to_str().expect("utf-8"), "--no-progress"],
    )
    .output()
    .expect("resume");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let ran = ledger(dir);
    assert!(
        ran.contains(&"next".to_owned()) && ran.contains(&"cleanup".to_owned()),
        "{ran:?}"
    );
    crate::common::assert_bundle_verifies(&bundle);
    drop(disk);
}

/// The reference runbook of the crash-point enumeration: a retry with backoff, a parallel
/// pair, a collected file, outputs a later step reads, an approval gate, a step over SSH (on
/// a real sshd, appending to the same ledger through its absolute path) and an `always`
/// cleanup. Each attempt appends its step to `ledger`.
fn reference(ledger: &Path) -> String {
    format!(
        r#"[runbook]
name = "crashpoints"
inventory = "inventory.toml"

[[steps]]
id = "flaky"
run = "echo flaky >> ledger; if [ ! -e flaky.ok ]; then touch flaky.ok; exit 1; fi"
retry = {{ attempts = 3, delay = "20ms", backoff = "exponential" }}

[[steps]]
id = "left"
needs = ["flaky"]
run = "echo left >> ledger"

[[steps]]
id = "right"
needs = ["flaky"]
run = "echo right >> ledger; echo report > report.txt; echo hello"
collect = ["report.txt"]
outputs = {{ word = "output.stdout.trim()" }}

[[steps]]
id = "join"
needs = ["left", "right"]
run = "echo join-{{{{ steps.right.outputs.word }}}} >> ledger"

[[steps]]
id = "gate"
needs = ["join"]
approve = "Go on with the remote part?"
run = "echo gate >> ledger"

[[steps]]
id = "remote"
needs = ["gate"]
on = "servers"
run = "echo remote >> {ledger}"

[[steps]]
id = "cleanup"
needs = ["remote"]
always = true
run = "echo cleanup >> ledger"
"#,
        ledger = ledger.display()
    )
}

fn count(lines: &[String], what: &str) -> usize {
    lines.iter().filter(|l| l.as_str() == what).count()
}

/// What a crashed bundle's journal says: the steps whose attempts were announced, and those
/// whose success was recorded (the step's record, or its attempt's).
fn announced_and_done(bundle: &Path) -> (Vec<String>, Vec<String>) {
    let journal = read_journal(bundle);
    let announced = steps_with(&journal, "attempt_started", |_| true);
    let mut done = steps_with(&journal, "step_finished", |e| e["status"] == "succeeded");
    done.extend(steps_with(&journal, "attempt_finished", |e| {
        e["outcome"]["kind"] == "exited" && e["outcome"]["code"] == 0
    }));
    (announced, done)
}

const REFERENCE_STEPS: [&str; 7] = [
    "flaky", "left", "right", "gate", "remote", "cleanup", "join",
];

/// Crash-point enumeration, as SQLite and FoundationDB test durability: the runner aborts
/// right after its N-th journal record (`RUNBOOK_CRASH_AFTER_APPEND`, counted over the whole
/// journal, so N runs on into the approved resume), for every N, and a plain `resume` must
/// finish the run. Each time: every attempt in the ledger has its `attempt_started`; a step
/// whose success was recorded does not run again; the restored outputs reach the step that
/// reads them; the bundle verifies; no `--break-lock` is needed.
#[test]
fn every_crash_point_of_the_reference_runbook_resumes_to_a_verifying_bundle() {
    let sshd = crate::hosts::sshd::Sshd::start();
    let mut n = 1;
    loop {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let ledger_path = dir.join("ledger");
        std::fs::write(dir.join("runbook.toml"), reference(&ledger_path)).expect("write");
        std::fs::write(
            dir.join("inventory.toml"),
            format!(
                "[hosts.node-1]\naddress = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nidentity_file = \"{}\"\nknown_hosts = \"{}\"\ngroups = [\"servers\"]\n",
                sshd.port(),
                sshd.user(),
                sshd.client_key_path().display(),
                sshd.known_hosts_path().display(),
            ),
        )
        .expect("inventory");
        let out = run_cmd(dir)
            .env("RUNBOOK_CRASH_AFTER_APPEND", n.to_string())
            .output()
            .expect("run");
        let resume = |crash: Option<u64>| {
            let bundle = find_bundle(dir);
            let mut cmd = runbook(
                dir,
                &[
                    "resume",
                    bundle.to_str().expect("utf-8"),
                    "--approve",
                    "gate",
                    "--no-progress",
                ],
            );
            if let Some(k) = crash {
                cmd.env("RUNBOOK_CRASH_AFTER_APPEND", k.to_string());
            }
            cmd.output().expect("resume")
        };
        // The gate stops the first run (nobody to ask): the approved resume goes on counting.
        let crashed = match out.status.code() {
            None => true,
            Some(4) => {
                let out = resume(Some(n));
                match out.status.code() {
                    None => true,
                    Some(0) => {
                        assert!(n > 30, "the reference runbook writes more than {n} records");
                        break;
                    }
                    other => panic!(
                        "crash point {n}: the approved resume exited {other:?}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ),
                }
            }
            other => panic!(
                "crash point {n}: the run should have been aborted or awaited approval, it exited {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        };
        assert!(crashed);
        let bundle = find_bundle(dir);
        let (announced, done) = announced_and_done(&bundle);
        let before = ledger(dir);
        for step in REFERENCE_STEPS {
            assert!(
                count(&before, step) <= count(&announced, step),
                "crash point {n}: `{step}` ran {} time(s), journal announces {}",
                count(&before, step),
                count(&announced, step)
            );
        }
        let out = resume(None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "crash point {n}: resume: {stderr}"
        );
        assert!(!stderr.contains("break-lock"), "crash point {n}: {stderr}");
        let after = ledger(dir);
        for step in ["flaky", "left", "right", "gate"] {
            if done.iter().any(|d| d == step) {
                assert_eq!(
                    count(&after, step),
                    count(&before, step),
                    "crash point {n}: `{step}` had succeeded and ran again: {after:?}"
                );
            }
        }
        for want in ["left", "right", "join-hello", "gate", "remote", "cleanup"] {
            assert!(
                after.iter().any(|l| l == want),
                "crash point {n}: `{want}` missing after resume: {after:?}"
            );
        }
        crate::common::assert_bundle_verifies(&bundle);
        n += 1;
    }
}

/// The same for sealing: the runner aborts right after each file operation of sealing (a
/// temporary file written and synced, a rename, the journal's sync; `RUNBOOK_CRASH_IN_SEAL`),
/// for every one, with a signing key. `resume` seals the bundle, runs nothing again, and the
/// bundle verifies against the public key.
#[test]
fn every_crash_point_of_sealing_resumes_to_a_signed_verifying_bundle() {
    let keys = tempfile::tempdir().expect("temp dir");
    let out = runbook(keys.path(), &["keygen", "-s", "k.key", "-p", "k.pub"])
        .output()
        .expect("keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = keys.path().join("k.key");
    let key = key.to_str().expect("utf-8");
    let public = keys.path().join("k.pub");
    let simple = "[runbook]\nname = \"seal\"\n[[steps]]\nid = \"a\"\nrun = \"echo a >> ledger\"\n[[steps]]\nid = \"b\"\nneeds = [\"a\"]\nrun = \"echo b >> ledger\"\n";
    let mut k = 1;
    loop {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        std::fs::write(dir.join("runbook.toml"), simple).expect("write");
        let out = runbook(
            dir,
            &[
                "run",
                "runbook.toml",
                "--evidence-dir",
                "proof",
                "--no-progress",
                "--sign-key",
                key,
            ],
        )
        .env("RUNBOOK_CRASH_IN_SEAL", k.to_string())
        .output()
        .expect("run");
        if out.status.success() {
            assert!(k > 8, "sealing does more than {k} file operations");
            break;
        }
        assert_eq!(
            out.status.code(),
            None,
            "seal point {k}: the run should have been aborted: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bundle = find_bundle(dir);
        let out = runbook(
            dir,
            &[
                "resume",
                bundle.to_str().expect("utf-8"),
                "--no-progress",
                "--sign-key",
                key,
            ],
        )
        .output()
        .expect("resume");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Killed after its last file was in place, the run had nothing left but to exit: the
        // bundle is whole, `resume` says so, and the next run takes the dead run's lock over.
        let complete = out.status.code() == Some(2) && stderr.contains("already succeeded");
        assert!(
            out.status.code() == Some(0) || complete,
            "seal point {k}: resume: {stderr}"
        );
        assert!(!stderr.contains("break-lock"), "seal point {k}: {stderr}");
        assert_eq!(ledger(dir), ["a", "b"], "seal point {k}: a step ran again");
        let verify = runbook(dir, &["evidence", "verify"])
            .arg(&bundle)
            .arg("--pubkey")
            .arg(&public)
            .arg("--require-signature")
            .output()
            .expect("verify");
        assert!(
            verify.status.success(),
            "seal point {k}: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        // Nothing half-written is left beside the sealed files.
        let leftovers: Vec<PathBuf> = crate::common::all_files(&bundle)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
            .collect();
        assert!(leftovers.is_empty(), "seal point {k}: {leftovers:?}");
        if complete {
            let again = runbook(
                dir,
                &[
                    "run",
                    "runbook.toml",
                    "--evidence-dir",
                    "proof",
                    "--no-progress",
                ],
            )
            .output()
            .expect("run again");
            assert!(
                again.status.success(),
                "seal point {k}: the next run: {}",
                String::from_utf8_lossy(&again.stderr)
            );
        }
        k += 1;
    }
}

/// SIGINT and SIGTERM at every instant of the first 60 ms: exit 130 each time (unless the
/// signal beats the program's start, when nothing exists yet), the lock released, and either no bundle or a sealed `cancelled` one that verifies. Before, a signal
/// in the first ~20 ms killed the runner outright, leaving a `running` bundle and a held lock.
#[test]
fn a_stop_signal_in_the_first_instants_gives_exit_130_and_releases_the_lock() {
    use nix::sys::signal::Signal;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    std::fs::write(
        dir.join("runbook.toml"),
        "[runbook]\nname = \"early\"\n[[steps]]\nid = \"a\"\nrun = \"sleep 5\"\n",
    )
    .expect("write");
    for ms in (0..=60).step_by(5) {
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            // As an operator's terminal starts it: INT and TERM at their defaults, even when
            // this test itself runs in a background job (where a shell starts INT ignored, and a
            // SIGINT before runbook's handler is installed would be ignored, not stop it).
            let child = Command::new("env")
                .args(["--default-signal=INT,TERM", BIN])
                .args([
                    "run",
                    "runbook.toml",
                    "--evidence-dir",
                    "proof",
                    "--no-progress",
                ])
                .current_dir(dir)
                .env("NO_COLOR", "1")
                .env_remove("RUNBOOK_EVIDENCE_DIR")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            // Time from runbook's own start: `env` resets the signals, then runs runbook (a
            // signal while `env` itself starts would meet the inherited dispositions).
            let exe = std::fs::canonicalize(BIN).expect("runbook binary");
            let proc_exe = PathBuf::from(format!("/proc/{}/exe", child.id()));
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_link(&proc_exe).ok().as_ref() != Some(&exe)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(100));
            }
            std::thread::sleep(Duration::from_millis(ms));
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, sig);
            let (status, stderr) = finish(child);
            // A signal that arrives before the program's first instruction (while the kernel
            // and the loader start it) ends it like any program, before anything exists.
            let no_bundle = std::fs::read_dir(dir.join("proof/early"))
                .map(|d| d.flatten().all(|e| !e.path().is_dir()))
                .unwrap_or(true);
            let before_main = std::os::unix::process::ExitStatusExt::signal(&status)
                == Some(sig as i32)
                && no_bundle;
            assert!(
                status.code() == Some(130) || before_main,
                "{sig} after {ms} ms: {status:?}\n{stderr}"
            );
            assert!(
                !dir.join("proof/early/.lock.json").exists(),
                "{sig} after {ms} ms: the lock is still held\n{stderr}"
            );
            if let Ok(entries) = std::fs::read_dir(dir.join("proof/early")) {
                for b in entries.flatten().filter(|e| e.path().is_dir()) {
                    let m = crate::common::read_json(&b.path().join("manifest.json"));
                    assert_eq!(m["status"], "cancelled", "{sig} after {ms} ms\n{stderr}");
                    crate::common::assert_bundle_verifies(&b.path());
                    std::fs::remove_dir_all(b.path()).expect("clean");
                }
            }
        }
    }
}

/// Three `resume`s of one interrupted bundle at once: exactly one runs the rest of the run; the
/// others are refused and name the one that holds the lock (never `run ? by ?@? (pid 0)`, what
/// a reader saw when it read the lock file while it was being written).
#[test]
fn three_resumes_at_once_one_runs_and_the_others_name_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    std::fs::write(
        dir.join("runbook.toml"),
        "[runbook]\nname = \"trio\"\n\
         [[steps]]\nid = \"first\"\nrun = \"echo first >> ledger\"\n\
         [[steps]]\nid = \"slow\"\nneeds = [\"first\"]\nrun = \"echo slow >> ledger; sleep 2\"\n",
    )
    .expect("write");
    let out = run_cmd(dir)
        .env("RUNBOOK_CRASH_AFTER_APPEND", "6")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), None, "aborted");
    let bundle = find_bundle(dir);
    let b = bundle.to_str().expect("utf-8").to_owned();
    let children: Vec<Child> = (0..3)
        .map(|_| {
            runbook(dir, &["resume", &b, "--no-progress"])
                .spawn()
                .expect("resume")
        })
        .collect();
    let mut ran = 0;
    let mut refused = Vec::new();
    for c in children {
        let (status, stderr) = finish(c);
        match status.code() {
            Some(0) => ran += 1,
            Some(2) => refused.push(stderr),
            other => panic!("resume exited {other:?}: {stderr}"),
        }
    }
    assert_eq!(ran, 1, "exactly one resume runs: {refused:?}");
    assert_eq!(refused.len(), 2);
    for r in &refused {
        assert!(r.contains("is in progress: run "), "{r}");
        assert!(
            !r.contains("(pid 0)") && !r.contains("?@?"),
            "the holder is named: {r}"
        );
    }
    crate::common::assert_bundle_verifies(&bundle);
}

/// A bundle is created under a hidden `.partial` name and renamed into place with its manifest,
/// so no bundle directory ever lacks `manifest.json`; what a run that died while creating one
/// left behind is removed, with a note, by the next run.
#[test]
fn a_half_made_bundle_is_never_listed_and_the_next_run_removes_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    std::fs::write(
        dir.join("runbook.toml"),
        "[runbook]\nname = \"half\"\n[[steps]]\nid = \"a\"\nrun = \"true\"\n",
    )
    .expect("write");
    let partial = dir.join("proof/half/.20260101T000000Z-deadbeef.partial");
    std::fs::create_dir_all(&partial).expect("mkdir");
    std::fs::write(partial.join("journal.jsonl"), "").expect("journal");
    std::fs::write(partial.join("manifest.tmp"), "{").expect("manifest.tmp");
    let ok = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(&partial)
        .status()
        .expect("touch");
    assert!(ok.success());
    let out = run_cmd(dir).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("a bundle a run had died creating"),
        "{stderr}"
    );
    assert!(!partial.exists());
    for e in std::fs::read_dir(dir.join("proof/half"))
        .expect("dir")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() {
            assert!(!name.ends_with(".partial"), "{name}");
            assert!(
                e.path().join("manifest.json").exists(),
                "{name} has its manifest"
            );
        }
    }
    let list = runbook(dir, &["evidence", "list", "proof"])
        .output()
        .expect("list");
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
}

/// A runner that died after its run had ended (while sealing) left a lock naming a process
/// that is provably gone, and nothing to resume: the next `run` takes the lock over by itself
/// (no `--break-lock`), saying so; `resume` of the old bundle seals it. A run that died mid-step
/// is still refused (durability.rs: `a_second_run_is_refused_while_one_is_running`).
#[test]
fn the_next_run_takes_over_the_lock_of_a_dead_run_with_nothing_to_resume() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    std::fs::write(
        dir.join("runbook.toml"),
        "[runbook]\nname = \"sealing\"\n[[steps]]\nid = \"a\"\nrun = \"echo a >> ledger\"\n",
    )
    .expect("write");
    let run = || run_cmd(dir);
    let out = run()
        .env("RUNBOOK_CRASH_AFTER_APPEND", "7")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), None, "aborted right after run_finished");
    let first = find_bundle(dir);
    assert!(read_journal(&first)
        .iter()
        .any(|e| e["event"] == "run_finished"));
    assert!(
        dir.join("proof/sealing/.lock.json").exists(),
        "the dead run's lock details stay"
    );

    let out = run().output().expect("second run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("taking over its lock"), "{stderr}");
    assert!(!dir.join("proof/sealing/.lock.json").exists());

    let out = runbook(
        dir,
        &["resume", first.to_str().expect("utf-8"), "--no-progress"],
    )
    .output()
    .expect("resume");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("interrupted while sealing"), "{stderr}");
    crate::common::assert_bundle_verifies(&first);
    assert_eq!(ledger(dir), ["a", "a"], "each run ran its step once");
}

/// `run --break-lock` over a run killed while its step was running: the dead run's process is
/// stopped before the new run starts anything, not left running beside it.
#[test]
fn breaking_a_dead_runs_lock_stops_the_processes_it_left() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let marker = crate::common::unique_marker();
    std::fs::write(
        dir.join("runbook.toml"),
        format!(
            "[runbook]\nname = \"leftover\"\n[[steps]]\nid = \"long\"\nrun = \"echo long >> ledger; sleep 300; echo {marker}\"\n"
        ),
    )
    .expect("write");
    let mut child = run_cmd(dir).spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while crate::common::processes_matching(&marker).is_empty() {
        assert!(Instant::now() < deadline, "the step never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill9(&mut child);
    assert!(
        !crate::common::processes_matching(&marker).is_empty(),
        "the step outlives its runner"
    );
    // Something is left to resume, so a plain run refuses; --break-lock takes the lock over.
    let out = run_cmd(dir).output().expect("second run");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        dir.join("runbook.toml"),
        "[runbook]\nname = \"leftover\"\n[[steps]]\nid = \"quick\"\nrun = \"echo quick >> ledger\"\n",
    )
    .expect("write");
    let out = runbook(
        dir,
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
            "--break-lock",
        ],
    )
    .output()
    .expect("break-lock run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("stopped process group"), "{stderr}");
    assert!(
        crate::common::processes_matching(&marker).is_empty(),
        "the dead run's step is still running"
    );
    assert_eq!(ledger(dir), ["long", "quick"]);
}

/// A rolling step over hosts killed after its second host finished: `resume` leaves the hosts
/// that finished their part alone (each host's result is journaled as it finishes) and runs
/// only the rest. Before, the whole step ran again on every host — a rolling upgrade or
/// restore repeated on servers already done.
#[test]
fn resume_does_not_run_a_host_again_that_finished_its_part() {
    let sshds: Vec<crate::hosts::sshd::Sshd> =
        (0..3).map(|_| crate::hosts::sshd::Sshd::start()).collect();
    let setup = |dir: &Path| {
        let mut inv = String::new();
        for (i, s) in sshds.iter().enumerate() {
            inv.push_str(&format!(
                "[hosts.node-{i}]\naddress = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nidentity_file = \"{}\"\nknown_hosts = \"{}\"\ngroups = [\"servers\"]\n",
                s.port(),
                s.user(),
                s.client_key_path().display(),
                s.known_hosts_path().display(),
            ));
        }
        std::fs::write(dir.join("inventory.toml"), inv).expect("inventory");
        let ledger = dir.join("ledger");
        std::fs::write(
            dir.join("runbook.toml"),
            format!(
                r#"[runbook]
name = "rolling"
inventory = "inventory.toml"
[[steps]]
id = "upgrade"
on = "servers"
strategy = {{ rolling = 1 }}
steps = [
  {{ id = "drain", local = true, run = "echo drain-{{{{ host.name }}}} >> {l}" }},
  {{ id = "install", run = "echo install-{{{{ host.name }}}} >> {l}" }},
]
[[steps]]
id = "after"
needs = ["upgrade"]
run = "echo after >> {l}"
"#,
                l = ledger.display()
            ),
        )
        .expect("runbook");
    };
    // Where the second host's result is journaled, from a run that is not killed.
    let probe = tempfile::tempdir().expect("temp dir");
    setup(probe.path());
    let out = run_cmd(probe.path()).output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let journal = read_journal(&find_bundle(probe.path()));
    let n = journal
        .iter()
        .position(|e| e["event"] == "target_finished" && e["result"]["target"] == "node-1")
        .expect("a target_finished record for node-1")
        + 1;

    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    setup(dir);
    let out = run_cmd(dir)
        .env("RUNBOOK_CRASH_AFTER_APPEND", n.to_string())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), None, "aborted after node-1 finished");
    assert_eq!(
        ledger(dir),
        [
            "drain-node-0",
            "install-node-0",
            "drain-node-1",
            "install-node-1"
        ]
    );
    let bundle = find_bundle(dir);
    let out = runbook(
        dir,
        &["resume", bundle.to_str().expect("utf-8"), "--no-progress"],
    )
    .output()
    .expect("resume");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ledger(dir),
        [
            "drain-node-0",
            "install-node-0",
            "drain-node-1",
            "install-node-1",
            "drain-node-2",
            "install-node-2",
            "after"
        ],
        "each host's part ran once"
    );
    let m = read_json(&bundle.join("manifest.json"));
    let targets = &crate::common::step(&m, "upgrade")["targets"];
    assert_eq!(targets[0]["reason"], "succeeded earlier", "{targets}");
    assert_eq!(targets[1]["reason"], "succeeded earlier", "{targets}");
    assert_eq!(targets[2]["status"], "succeeded", "{targets}");
    crate::common::assert_bundle_verifies(&bundle);

    // Killed inside node-1's block, after its first sub-step: node-1's block runs again, its
    // sub-step attempts numbered after those already made, so no log is overwritten.
    let n = journal
        .iter()
        .position(|e| e["event"] == "attempt_finished" && e["target"] == "node-1/drain")
        .expect("node-1's drain")
        + 1;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    setup(dir);
    let out = run_cmd(dir)
        .env("RUNBOOK_CRASH_AFTER_APPEND", n.to_string())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), None, "aborted inside node-1's block");
    let bundle = find_bundle(dir);
    let out = runbook(
        dir,
        &["resume", bundle.to_str().expect("utf-8"), "--no-progress"],
    )
    .output()
    .expect("resume");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drain = bundle.join("steps/upgrade/node-1/drain");
    for log in ["attempt-1.log", "attempt-2.log"] {
        assert!(drain.join(log).is_file(), "{log} of node-1's drain");
    }
    let first = std::fs::read_to_string(drain.join("attempt-1.log")).expect("log");
    assert!(first.contains("drain-node-1"), "{first}");
    assert_eq!(
        count(&ledger(dir), "install-node-0"),
        1,
        "node-0 finished before the kill"
    );
    crate::common::assert_bundle_verifies(&bundle);
}
