//! Step output at its edges, through the real binary: invalid UTF-8, NUL bytes, one 100 MB line
//! without a newline, a process that closes its stdout and keeps running, a step whose
//! grandchild holds the output pipe after the step exits (in the group or out of it), and a secret recognised by its shape
//! printed in two writes. Each must be recorded faithfully in `steps/<id>/local/attempt-1.log`
//! (`<RFC 3339> <tag> <bytes>`, docs/evidence.md: the bytes read back are the bytes written),
//! without hanging (every run is killed after a bound and reported), and the bundle must pass
//! `runbook evidence verify`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{
    all_files, find_bundle, processes_matching, read_json, step, unique_marker, BIN,
};
use crate::corpus::{run_bounded, Finished};

const HEAD: &str = "[runbook]\nname = \"edges\"\n";

struct Ran {
    out: Finished,
    dir: tempfile::TempDir,
    /// Peak resident memory of the runbook process itself (VmHWM), in KiB.
    peak_kib: u64,
}

impl Ran {
    fn bundle(&self) -> PathBuf {
        find_bundle(self.dir.path())
    }

    fn log(&self, id: &str) -> Vec<u8> {
        std::fs::read(
            self.bundle()
                .join(format!("steps/{id}/local/attempt-1.log")),
        )
        .expect("log")
    }
}

/// `runbook run runbook.toml` in a fresh directory; killed after `limit`.
fn run(toml: &str, limit: Duration) -> Ran {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("runbook.toml"), toml).expect("write");
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run",
        "runbook.toml",
        "--evidence-dir",
        "proof",
        "--no-progress",
    ])
    .current_dir(dir.path())
    .env("NO_COLOR", "1")
    .env_remove("RUNBOOK_EVIDENCE_DIR")
    .env_remove("RUST_LOG");
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let out = {
        // Sample VmHWM of the newest `runbook run` child while it runs.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (peak, stop, dir) = (peak.clone(), stop.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Some(kib) = runbook_hwm_in(&dir) {
                        peak.fetch_max(kib, std::sync::atomic::Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        let out = run_bounded(cmd, limit);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = sampler.join();
        out
    };
    assert!(
        !out.killed,
        "`runbook run` still running after {limit:?}: killed (hang)\n{}",
        out.stderr_text()
    );
    Ran {
        out,
        dir,
        peak_kib: peak.load(std::sync::atomic::Ordering::SeqCst),
    }
}

/// VmHWM of the `runbook` process whose working directory is `dir` (ours, started above).
fn runbook_hwm_in(dir: &Path) -> Option<u64> {
    for e in std::fs::read_dir("/proc").ok()? {
        let Ok(e) = e else { continue };
        let p = e.path();
        if std::fs::read_link(p.join("cwd")).ok().as_deref() != Some(dir) {
            continue;
        }
        if std::fs::read_link(p.join("exe")).ok().as_deref() != Some(Path::new(BIN)) {
            continue;
        }
        let status = std::fs::read_to_string(p.join("status")).ok()?;
        return status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    }
    None
}

/// `runbook evidence verify BUNDLE` passes.
#[track_caller]
fn assert_verifies(bundle: &Path) {
    let mut cmd = Command::new(BIN);
    cmd.args(["evidence", "verify"])
        .arg(bundle)
        .env("NO_COLOR", "1");
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert_eq!(
        out.code(),
        Some(0),
        "evidence verify failed\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        out.stderr_text()
    );
}

/// The records of an attempt log: (tag, bytes). Checks the framing of every record.
fn records(log: &[u8]) -> Vec<(String, &[u8])> {
    assert!(log.ends_with(b"\n"), "the log ends with a newline");
    log[..log.len() - 1]
        .split(|&b| b == b'\n')
        .map(|line| {
            let mut parts = line.splitn(3, |&b| b == b' ');
            let stamp = std::str::from_utf8(parts.next().expect("stamp")).expect("stamp text");
            assert!(
                chrono::DateTime::parse_from_rfc3339(stamp).is_ok(),
                "bad time stamp {stamp:?}"
            );
            let tag = String::from_utf8(parts.next().expect("tag").to_vec()).expect("tag");
            assert!(
                ["out", "err", "out+", "err+", "---"].contains(&tag.as_str()),
                "unknown tag {tag:?}"
            );
            (tag, parts.next().expect("payload"))
        })
        .collect()
}

/// One stream's bytes back from the log: `out` records are lines, `out+` continue.
fn stream(log: &[u8], tag: &str) -> Vec<u8> {
    let plus = format!("{tag}+");
    let mut out = Vec::new();
    for (t, payload) in records(log) {
        if t == tag {
            out.extend_from_slice(payload);
            out.push(b'\n');
        } else if t == plus {
            out.extend_from_slice(payload);
        }
    }
    out
}

fn shown(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

#[test]
fn invalid_utf8_is_recorded_byte_for_byte() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"bytes\"\nrun = '''printf 'caf\\351 \\377\\376 ok\\200\\n'; printf 'half \\303' >&2; sleep 0.2; printf '\\251 whole\\n\\360\\237' >&2'''\n"
    );
    let r = run(&toml, Duration::from_secs(30));
    assert_eq!(r.out.code(), Some(0), "{}", r.out.stderr_text());
    let log = r.log("bytes");
    let out = stream(&log, "out");
    let err = stream(&log, "err");
    assert_eq!(shown(&out), shown(b"caf\xe9 \xff\xfe ok\x80\n"));
    assert_eq!(shown(&err), shown(b"half \xc3\xa9 whole\n\xf0\x9f"));
    let m = read_json(&r.bundle().join("manifest.json"));
    assert_eq!(step(&m, "bytes")["attempts"][0]["output"]["stdout"], 12);
    assert_verifies(&r.bundle());
}

#[test]
fn nul_bytes_are_recorded_byte_for_byte() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"nul\"\nrun = '''printf 'a\\0b\\0\\n\\0'; printf '\\0\\0end'; printf 'x\\0y\\n' >&2'''\n"
    );
    let r = run(&toml, Duration::from_secs(30));
    assert_eq!(r.out.code(), Some(0), "{}", r.out.stderr_text());
    let log = r.log("nul");
    assert_eq!(shown(&stream(&log, "out")), shown(b"a\0b\0\n\0\0\0end"));
    assert_eq!(shown(&stream(&log, "err")), shown(b"x\0y\n"));
    assert_verifies(&r.bundle());
}

#[test]
fn a_single_100_mb_line_without_a_newline_streams_in_bounded_memory() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"line\"\nrun = '''head -c 100000000 /dev/zero | tr '\\0' x'''\n"
    );
    let r = run(&toml, Duration::from_secs(120));
    assert_eq!(r.out.code(), Some(0), "{}", r.out.stderr_text());
    let log = r.log("line");
    let mut total = 0usize;
    let mut largest = 0usize;
    for (tag, payload) in records(&log) {
        match tag.as_str() {
            "out+" => {
                assert!(payload.iter().all(|&b| b == b'x'), "only x in the line");
                total += payload.len();
                largest = largest.max(payload.len());
            }
            "---" => {}
            other => panic!("unexpected {other} record in a line without a newline"),
        }
    }
    assert_eq!(total, 100_000_000, "every byte of the line is in the log");
    assert!(
        largest <= 128 * 1024,
        "the line was cut into bounded fragments: largest {largest} bytes"
    );
    let m = read_json(&r.bundle().join("manifest.json"));
    assert_eq!(
        step(&m, "line")["attempts"][0]["output"]["stdout"],
        100_000_000
    );
    let peak_mib = r.peak_kib / 1024;
    eprintln!(
        "100 MB line: runner peak RSS {peak_mib} MiB, {:?}",
        r.out.elapsed
    );
    assert!(r.peak_kib > 0, "the runner's memory was sampled");
    assert!(
        peak_mib < 100,
        "runner memory stayed bounded: peak {peak_mib} MiB for a 100 MB line"
    );
    assert_verifies(&r.bundle());
}

#[test]
fn a_process_that_closes_stdout_and_keeps_running_is_waited_for() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"closer\"\nrun = '''echo before; exec >&-; sleep 1; echo after-close >&2; exit 3'''\n"
    );
    let r = run(&toml, Duration::from_secs(30));
    assert_eq!(
        r.out.code(),
        Some(1),
        "the step's exit code 3 fails the run"
    );
    let log = r.log("closer");
    assert_eq!(shown(&stream(&log, "out")), "before\\n");
    assert_eq!(shown(&stream(&log, "err")), "after-close\\n");
    let m = read_json(&r.bundle().join("manifest.json"));
    let attempt = &step(&m, "closer")["attempts"][0];
    assert_eq!(attempt["outcome"]["kind"], "exited", "{attempt}");
    assert_eq!(attempt["outcome"]["code"], 3, "{attempt}");
    let took = attempt["duration_seconds"].as_f64().expect("duration");
    assert!(
        took >= 0.9,
        "runbook waited for the process, not for stdout: {took}s"
    );
    assert!(took < 10.0, "and not much longer: {took}s");
    assert_verifies(&r.bundle());
}

#[test]
fn a_grandchild_in_the_group_holding_the_pipe_is_stopped() {
    let marker = unique_marker();
    // The grandchild ignores TERM and keeps stdout open; the step's shell exits at once.
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"parent\"\nkill_grace = \"500ms\"\nrun = '''(trap '' TERM; sleep {marker}; echo too-late) & echo main-done'''\n"
    );
    let r = run(&toml, Duration::from_secs(30));
    assert_eq!(r.out.code(), Some(0), "{}", r.out.stderr_text());
    assert!(
        r.out.elapsed < Duration::from_secs(10),
        "runbook stopped waiting for the pipe: {:?}",
        r.out.elapsed
    );
    let log = r.log("parent");
    assert_eq!(shown(&stream(&log, "out")), "main-done\\n");
    assert_eq!(
        processes_matching(&format!("sleep {marker}")),
        Vec::<i32>::new()
    );
    assert_verifies(&r.bundle());
}

#[test]
fn an_escaped_grandchild_holding_the_pipe_is_stopped_with_the_step() {
    let marker = unique_marker();
    // `setsid` takes the grandchild out of the step's group, but it still carries the
    // attempt's id: runbook keeps what it printed in time, stops it when the step's shell
    // exits (which closes the pipe), and records that as an engine record, not as output.
    // The step's shell exits only once the grandchild is `sleep` (a loaded machine can hold it
    // back before its `exec` for longer than any fixed pause).
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"escape\"\nkill_grace = \"1s\"\nrun = '''setsid sh -c 'echo tick-1; sleep 0.3; printf \"tick-2 \\377\\n\"; echo $$ > escaped.pid; exec sleep {marker}' & until [ -s escaped.pid ] && grep -qa '^sleep' /proc/$(cat escaped.pid)/cmdline 2>/dev/null; do sleep 0.05; done; echo main-done'''\n"
    );
    let r = run(&toml, Duration::from_secs(30));
    let left = processes_matching(&format!("sleep {marker}"));
    for &pid in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert_eq!(left, Vec::<i32>::new(), "stopped with the step");
    assert_eq!(r.out.code(), Some(0), "{}", r.out.stderr_text());
    assert!(
        r.out.elapsed < Duration::from_secs(10),
        "the run did not wait for the escaped process: {:?}",
        r.out.elapsed
    );
    let log = r.log("escape");
    assert_eq!(
        shown(&stream(&log, "out")),
        shown(b"tick-1\ntick-2 \xff\nmain-done\n")
    );
    assert_eq!(shown(&stream(&log, "err")), "");
    let engine = String::from_utf8_lossy(&stream(&log, "---")).into_owned();
    assert!(
        engine.contains("stopped a process that had left the step's process group: pid ")
            && engine.contains(&format!("(SIGTERM): sleep {marker}")),
        "{engine}"
    );
    assert!(!engine.contains("output truncated"), "{engine}");
    assert_verifies(&r.bundle());
}

/// `Authorization: Bearer …` is a secret by its shape. Printed in two writes (the token a
/// moment after the header), it reaches runbook as two reads; no file of the bundle may hold
/// the token. (The command builds the token with `%s`, so its own text does not hold it.)
#[test]
fn a_bearer_token_printed_in_two_writes_stays_out_of_the_evidence() {
    let token = "abcdefgh12345678";
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"curl\"\nrun = '''printf 'Authorization: Bearer '; sleep 0.3; printf 'abcdefgh%s\\n' 12345678; echo done'''\n"
    );
    let r = run(&toml, Duration::from_secs(30));
    assert_eq!(r.out.code(), Some(0), "{}", r.out.stderr_text());
    let mut leaks = Vec::new();
    for f in all_files(&r.bundle()) {
        let bytes = std::fs::read(&f).expect("read");
        if bytes.windows(token.len()).any(|w| w == token.as_bytes()) {
            leaks.push(
                f.strip_prefix(r.bundle())
                    .expect("in bundle")
                    .display()
                    .to_string(),
            );
        }
    }
    assert!(
        !String::from_utf8_lossy(&r.out.stdout).contains(token)
            && !r.out.stderr_text().contains(token),
        "the token reached the terminal"
    );
    assert!(leaks.is_empty(), "the token is in {leaks:?}");
    assert_verifies(&r.bundle());
}
