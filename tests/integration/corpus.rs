//! Bad input never panics, never hangs: `runbook check` on the corpus of bad runbooks in
//! `tests/bad-runbooks/` and on generated giants.
//!
//! Each committed `NN-name.toml` is one mistake (its first comment line says which diagnostic it
//! is about; `# valid: …` marks a file that is actually valid and must pass). The test runs
//! `runbook check NN-name.toml` in that directory with `NO_COLOR=1` and requires: exit code 2
//! (0 for a valid file), no panic or stack overflow, under 1 s, and stderr exactly equal to
//! `NN-name.expected` beside it. Every diagnostic must name `file:line:col` inside the file.
//!
//! Snapshots: after an intended change of a message, rewrite them with
//!
//! ```sh
//! RUNBOOK_BLESS=1 cargo test --test integration corpus
//! ```
//!
//! and review the diff of `tests/bad-runbooks/*.expected` like any other change.
//!
//! The generated cases (too big to commit: a 10 MB string, 10,000 levels of nesting, 100,000
//! steps) are written to a temporary directory by their tests. No test here asserts how long
//! a check takes (a busy machine would fail it): a check still running after `KILL_AFTER` is a
//! hang. How `check` scales is measured by `bench/check-scale.sh`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::BIN;

/// A command still running after this is killed: the test reports a hang instead of hanging.
const KILL_AFTER: Duration = Duration::from_secs(30);

pub struct Finished {
    /// `None` when killed by a signal (including our own kill after `limit`).
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
    pub killed: bool,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs a command with piped output, killing it (by its own pid) when it runs longer than
/// `limit`. Output is drained by threads, so a chatty child cannot block on a full pipe.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Finished {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let mut killed = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            killed = true;
            break child.wait().expect("wait after kill");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    Finished {
        status: (status.code().is_some()).then_some(status),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed,
        killed,
    }
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-runbooks")
}

fn corpus_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("tests/bad-runbooks")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// `runbook check FILE` in `dir`, as a person would type it there.
fn check(dir: &Path, file: &str, limit: Duration) -> Finished {
    let mut cmd = Command::new(BIN);
    cmd.args(["check", file])
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RUNBOOK_EVIDENCE_DIR")
        .env_remove("RUST_LOG");
    run_bounded(cmd, limit)
}

/// What is wrong with one run of `runbook check`, if anything (exit code, crash, time).
fn judge(name: &str, out: &Finished, want_code: i32) -> Vec<String> {
    let mut problems = Vec::new();
    let stderr = out.stderr_text();
    if out.killed {
        problems.push(format!(
            "{name}: still running after {KILL_AFTER:?}, killed (hang)"
        ));
    } else if out.code() != Some(want_code) {
        let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        problems.push(format!(
            "{name}: exit {:?}, want {want_code} (last stderr lines: {tail})",
            out.status
        ));
    }
    for crash in [
        "panicked",
        "overflowed its stack",
        "fatal runtime error",
        "RUST_BACKTRACE",
    ] {
        if stderr.contains(crash) {
            problems.push(format!("{name}: stderr contains {crash:?}"));
        }
    }
    problems
}

fn want_code(text: &[u8]) -> i32 {
    let first = text
        .strip_prefix("\u{feff}".as_bytes())
        .unwrap_or(text)
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    if first.starts_with(b"# valid") {
        0
    } else {
        2
    }
}

/// The first line where two texts differ, for a readable failure.
fn first_difference(got: &str, want: &str) -> String {
    for (n, (g, w)) in got.lines().zip(want.lines()).enumerate() {
        if g != w {
            return format!("line {}: got {g:?}, want {w:?}", n + 1);
        }
    }
    format!(
        "got {} lines, want {} lines",
        got.lines().count(),
        want.lines().count()
    )
}

#[test]
fn bad_runbooks_match_their_snapshots() {
    let bless = std::env::var_os("RUNBOOK_BLESS").is_some_and(|v| v == "1");
    let files = corpus_files();
    assert!(files.len() >= 40, "the corpus has {} files", files.len());
    let mut problems = Vec::new();
    let mut timings = Vec::new();
    for path in &files {
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read(path).expect("read");
        let out = check(&corpus_dir(), &name, KILL_AFTER);
        timings.push((out.elapsed, name.clone()));
        problems.extend(judge(&name, &out, want_code(&text)));
        let snapshot = path.with_extension("expected");
        let stderr = out.stderr_text();
        if bless {
            std::fs::write(&snapshot, &stderr).expect("write snapshot");
            continue;
        }
        match std::fs::read_to_string(&snapshot) {
            Ok(want) if want == stderr => {}
            Ok(want) => problems.push(format!(
                "{name}: stderr differs from {} ({}); rerun with RUNBOOK_BLESS=1 if intended",
                snapshot.file_name().expect("name").to_string_lossy(),
                first_difference(&stderr, &want)
            )),
            Err(_) => problems.push(format!(
                "{name}: no snapshot; create it with RUNBOOK_BLESS=1"
            )),
        }
    }
    timings.sort();
    let slowest: Vec<String> = timings
        .iter()
        .rev()
        .take(3)
        .map(|(t, n)| format!("{n} {t:?}"))
        .collect();
    eprintln!(
        "corpus: {} files, slowest: {}",
        timings.len(),
        slowest.join(", ")
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every diagnostic in `stderr` names `file:line:col` with a position inside `text`; plain
/// `error:` lines are allowed only for the closing summary.
fn positions_problems(file: &str, text: Option<&str>, stderr: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in stderr.lines() {
        if line.starts_with("error") || line.starts_with("warning") {
            blocks.push(vec![line]);
        } else if let Some(b) = blocks.last_mut() {
            b.push(line);
        }
    }
    let summary = |l: &str| {
        l.starts_with(&format!("error: `{file}` has ")) && l.ends_with("; nothing was run")
    };
    for block in blocks {
        let head = block[0];
        if summary(head) {
            continue;
        }
        if !(head.starts_with("error[RB") || head.starts_with("warning[RB")) {
            problems.push(format!(
                "{file}: diagnostic without a code or position: {head:?}"
            ));
            continue;
        }
        let marker = format!("┌─ {file}:");
        // Diagnostics on over-long lines carry `file:line:col:` in the message instead.
        let inline = format!("]: {file}:");
        let in_head = head.split_once(inline.as_str()).map(|(_, rest)| {
            let mut parts = rest.splitn(3, ':');
            let (l, c) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            format!("{l}:{c}")
        });
        let Some(loc) = in_head.as_deref().or_else(|| {
            block
                .iter()
                .find_map(|l| l.split_once(marker.as_str()).map(|(_, rest)| rest.trim()))
        }) else {
            problems.push(format!("{file}: {head:?} names no {file}:line:col"));
            continue;
        };
        let nums: Vec<usize> = loc.split(':').filter_map(|n| n.parse().ok()).collect();
        let [line, col] = nums[..] else {
            problems.push(format!("{file}: {head:?}: bad location {loc:?}"));
            continue;
        };
        if let Some(text) = text {
            let body = text.strip_prefix('\u{feff}').unwrap_or(text);
            let lines: Vec<&str> = body.split('\n').collect();
            let ok = line >= 1
                && line <= lines.len()
                && col >= 1
                && col <= lines[line - 1].trim_end_matches('\r').chars().count() + 1;
            if !ok {
                problems.push(format!(
                    "{file}: {head:?} at {line}:{col} is outside the file"
                ));
            }
        }
    }
    problems
}

#[test]
fn every_diagnostic_names_file_line_col() {
    let mut problems = Vec::new();
    for path in corpus_files() {
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let bytes = std::fs::read(&path).expect("read");
        let out = check(&corpus_dir(), &name, KILL_AFTER);
        let text = std::str::from_utf8(&bytes).ok();
        problems.extend(positions_problems(&name, text, &out.stderr_text()));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_corpus_covers_every_code_check_reports() {
    let mut missing = Vec::new();
    let snapshots: String = corpus_files()
        .iter()
        .filter_map(|p| std::fs::read_to_string(p.with_extension("expected")).ok())
        .collect();
    for n in 1..=17 {
        let code = format!("RB{n:04}");
        // RB0015 (unreadable, not UTF-8) has its own file, 66-invalid-utf8.toml.
        if n != 15 && !snapshots.contains(&format!("error[{code}]")) {
            missing.push(code);
        }
    }
    assert!(missing.is_empty(), "no bad runbook shows {missing:?}");
}

// ---------------------------------------------------------------------------------------------
// Generated giants

const HEAD: &str = "[runbook]\nname = \"giant\"\n";

/// Writes `text` as `name` in a fresh directory and checks it there.
fn check_generated(name: &str, text: &str) -> (Finished, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join(name), text).expect("write");
    let out = check(dir.path(), name, KILL_AFTER);
    eprintln!("{name}: {} bytes checked in {:?}", text.len(), out.elapsed);
    let mut problems = judge(name, &out, 2);
    problems.extend(positions_problems(name, Some(text), &out.stderr_text()));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    (out, dir)
}

#[test]
fn a_ten_megabyte_string_value() {
    let text = format!(
        "{HEAD}[[steps]]\nid = \"a\"\ndescription = \"{}\"\nrun = \"true\"\ntimout = \"1s\"\n",
        "x".repeat(10_000_000)
    );
    let (out, _dir) = check_generated("huge-string.toml", &text);
    let stderr = out.stderr_text();
    assert!(
        stderr.contains("error[RB0002]: unknown key `timout` in a step")
            && stderr.contains("┌─ huge-string.toml:7:1"),
        "{}",
        &stderr[..stderr.len().min(2000)]
    );
}

#[test]
fn ten_thousand_levels_of_nested_arrays_and_tables() {
    let n = 10_000;
    for (name, value) in [
        (
            "deep-arrays.toml",
            format!("{}{}", "[".repeat(n), "]".repeat(n)),
        ),
        (
            "deep-tables.toml",
            format!("{}1{}", "{ a = ".repeat(n), " }".repeat(n)),
        ),
    ] {
        let text =
            format!("{HEAD}[params]\ndeep = {value}\n[[steps]]\nid = \"a\"\nrun = \"true\"\n");
        let (out, _dir) = check_generated(name, &text);
        assert!(out.stderr_text().contains("error[RB0001]"), "{name}");
    }
}

/// 100,000 steps, each needing the one at half its index (a wide tree), and a last step with
/// one need that does not exist.
#[test]
fn a_hundred_thousand_steps_with_one_broken_need() {
    let mut text = String::from(HEAD);
    for i in 0..100_000 {
        text.push_str(&format!("[[steps]]\nid = \"s{i}\"\nrun = \"true\"\n"));
        if i > 0 {
            text.push_str(&format!("needs = [\"s{}\"]\n", i / 2));
        }
    }
    text.push_str("[[steps]]\nid = \"last\"\nrun = \"true\"\nneeds = [\"s99999\", \"nope\"]\n");
    let (out, _dir) = check_generated("wide.toml", &text);
    let stderr = out.stderr_text();
    assert!(
        stderr.contains("step `last` needs `nope`, which does not exist")
            && stderr.contains("has 1 error;"),
        "{stderr}"
    );
}

/// The same size as a chain: each step needs the one before (a generated sequential runbook),
/// and a last step with one need that does not exist.
#[test]
fn a_chain_of_a_hundred_thousand_steps_with_one_broken_need() {
    let mut text = String::from(HEAD);
    for i in 0..100_000 {
        text.push_str(&format!("[[steps]]\nid = \"s{i}\"\nrun = \"true\"\n"));
        if i > 0 {
            text.push_str(&format!("needs = [\"s{}\"]\n", i - 1));
        }
    }
    text.push_str("[[steps]]\nid = \"last\"\nrun = \"true\"\nneeds = [\"s99999\", \"nope\"]\n");
    let (out, _dir) = check_generated("chain.toml", &text);
    let stderr = out.stderr_text();
    assert!(
        stderr.contains("step `last` needs `nope`, which does not exist"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Expressions that would run forever

/// `when` from 69-when-endless-loop.toml: 10^8 closure calls, far beyond the 1,000,000
/// operations every evaluation is allowed. `check` accepts it (see the corpus); the run must
/// stop it quickly with an error instead of spinning.
fn endless_expression() -> String {
    let text = std::fs::read_to_string(corpus_dir().join("69-when-endless-loop.toml"))
        .expect("corpus file");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("when = '"))
        .expect("when line");
    line.strip_suffix('\'').expect("quoted").to_owned()
}

fn run_in(dir: &Path, args: &[&str], limit: Duration) -> Finished {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RUNBOOK_EVIDENCE_DIR")
        .env_remove("RUST_LOG");
    run_bounded(cmd, limit)
}

#[test]
fn an_endless_when_fails_quickly_at_run_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        corpus_dir().join("69-when-endless-loop.toml"),
        dir.path().join("endless.toml"),
    )
    .expect("copy");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "endless.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
        ],
        Duration::from_secs(15),
    );
    assert!(
        !out.killed && out.elapsed < Duration::from_secs(10),
        "`runbook run` with an endless `when` took {:?}{} (the operation limit did not stop it)",
        out.elapsed,
        if out.killed { " and was killed" } else { "" }
    );
    let stderr = out.stderr_text();
    assert_eq!(out.code(), Some(1), "the step fails: {stderr}");
    assert!(stderr.contains("`when`"), "{stderr}");
}

#[test]
fn an_endless_template_does_not_hang_plan() {
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = '''echo {{{{ {} }}}}'''\n",
        endless_expression()
    );
    std::fs::write(dir.path().join("endless.toml"), toml).expect("write");
    let out = run_in(
        dir.path(),
        &["plan", "endless.toml"],
        Duration::from_secs(15),
    );
    assert!(
        !out.killed && out.elapsed < Duration::from_secs(10),
        "`runbook plan` rendering an endless template took {:?}{}",
        out.elapsed,
        if out.killed { " and was killed" } else { "" }
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr_text());
}

// ---------------------------------------------------------------------------------------------
// Positions inside strings with escapes

/// A template or expression in a TOML string with escapes cannot be mapped character by
/// character onto the file, so diagnostics about it mark the whole string token (like RB0011 in
/// 49-template-in-escaped-basic-string). An unknown `params.NAME` (RB0012) or `steps.ID`
/// (RB0016) there must do the same, not underline the first characters of the token as if they
/// were the reference.
#[test]
fn a_reference_in_a_string_with_escapes_marks_the_whole_string() {
    let mut problems = Vec::new();
    for (file, line_no, key, diagnostics) in [
        ("52-unknown-param.toml", 8, "run = ", 2),
        ("61-step-ref-with-dash.toml", 10, "when = ", 1),
    ] {
        let out = check(&corpus_dir(), file, KILL_AFTER);
        let stderr = out.stderr_text();
        let text = std::fs::read_to_string(corpus_dir().join(file)).expect("read");
        let source = text.lines().nth(line_no - 1).expect("line");
        let token = source.strip_prefix(key).expect("key line");
        let lines: Vec<&str> = stderr.lines().collect();
        let mut seen = 0;
        for (i, l) in lines.iter().enumerate() {
            if !l.ends_with(source) {
                continue;
            }
            seen += 1;
            let carets = lines.get(i + 1).copied().unwrap_or_default();
            let marked = carets.chars().filter(|&c| c == '^').count();
            if marked != token.chars().count() {
                problems.push(format!(
                    "{file}:{line_no}: {marked} characters marked, want the whole {}-character string:\n{l}\n{carets}",
                    token.chars().count()
                ));
            }
        }
        assert_eq!(seen, diagnostics, "{file}:\n{stderr}");
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
