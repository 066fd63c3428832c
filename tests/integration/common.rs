//! A small builder for running the `runbook` binary in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_runbook");

pub struct Test {
    dir: TempDir,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub dir: TempDir,
}

impl Test {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(self, name: &str, contents: &str) -> Self {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, contents).expect("write file");
        self
    }

    /// Writes `runbook.toml`.
    pub fn runbook(self, contents: &str) -> Self {
        self.file("runbook.toml", contents)
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// `run runbook.toml --evidence-dir proof --no-progress`: the usual run of a test.
    pub fn run_args(self) -> Self {
        self.args([
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
        ])
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(&self.args)
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .env_remove("RUNBOOK_EVIDENCE_DIR")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn run(self) -> Output {
        let out = self.command().output().expect("run runbook");
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            dir: self.dir,
        }
    }

    /// Runs the binary, but kills it if it has not ended within `limit` (a hang is a failure
    /// of the test, not a test that never ends).
    #[track_caller]
    pub fn run_within(self, limit: std::time::Duration) -> Output {
        use std::io::Read;
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn runbook");
        // Read both pipes as the child writes, so a full pipe cannot look like a hang.
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "runbook did not end within {limit:?}\n--- stderr\n{}",
                    stderr.join().unwrap_or_default()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        Output {
            code: status.code().unwrap_or(-1),
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
            dir: self.dir,
        }
    }

    /// Starts the binary without waiting, for signal tests.
    pub fn spawn(self) -> (Child, TempDir) {
        let child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn runbook");
        (child, self.dir)
    }
}

/// `runbook run runbook.toml --evidence-dir proof --no-progress` plus extra args.
pub fn run_runbook(toml: &str, extra: &[&str]) -> Output {
    Test::new()
        .runbook(toml)
        .run_args()
        .args(extra.iter().copied())
        .run()
}

impl Output {
    pub fn bundle(&self) -> PathBuf {
        find_bundle(self.dir.path())
    }

    pub fn manifest(&self) -> Value {
        read_json(&self.bundle().join("manifest.json"))
    }

    pub fn journal(&self) -> Vec<Value> {
        read_journal(&self.bundle())
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}\n--- stderr\n{}",
            self.stderr
        );
        self
    }
}

/// The single bundle under `<dir>/proof/<runbook>/`.
pub fn find_bundle(dir: &Path) -> PathBuf {
    let proof = dir.join("proof");
    let mut found = Vec::new();
    for rb in std::fs::read_dir(&proof).expect("proof dir exists") {
        for b in std::fs::read_dir(rb.expect("entry").path()).expect("runbook dir") {
            let path = b.expect("entry").path();
            // `.lock` is the run lock beside the bundles.
            if path.is_dir() {
                found.push(path);
            }
        }
    }
    assert_eq!(found.len(), 1, "exactly one bundle: {found:?}");
    found.remove(0)
}

pub fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

pub fn read_journal(bundle: &Path) -> Vec<Value> {
    std::fs::read_to_string(bundle.join("journal.jsonl"))
        .expect("journal")
        .lines()
        .map(|l| serde_json::from_str(l).expect("journal line is JSON"))
        .collect()
}

pub fn step<'a>(manifest: &'a Value, id: &str) -> &'a Value {
    manifest["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("step {id} in manifest"))
}

/// Every file in a directory tree.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Live (non-zombie) processes whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let me = std::process::id().to_string();
    for e in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(e) = e else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        if name == me || !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'));
        if cmdline.contains(needle) && !zombie {
            out.push(name.parse().unwrap_or(0));
        }
    }
    out
}

/// A marker unique to one test, for finding its processes.
pub fn unique_marker() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}.{}", 5000 + (nanos % 4000), std::process::id() % 1000)
}

/// No file of `bundle` holds any of `needles`, in its bytes or in its path inside the bundle:
/// what every secret test asks of the evidence.
#[track_caller]
pub fn assert_bundle_lacks(bundle: &Path, needles: &[&str]) {
    for f in all_files(bundle) {
        let rel = f.strip_prefix(bundle).unwrap_or(&f).display().to_string();
        let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("read {rel}: {e}"));
        for n in needles {
            assert!(!rel.contains(n), "the bundle path {rel} holds `{n}`");
            assert!(
                !bytes.windows(n.len()).any(|w| w == n.as_bytes()),
                "{rel} holds `{n}`"
            );
        }
    }
}

/// `runbook evidence verify` and `sha256sum -c SHA256SUMS` both accept the bundle.
#[track_caller]
pub fn assert_bundle_verifies(bundle: &Path) {
    let verify = Command::new(BIN)
        .args(["evidence", "verify"])
        .arg(bundle)
        .env("NO_COLOR", "1")
        .output()
        .expect("runbook evidence verify");
    assert!(
        verify.status.success(),
        "runbook evidence verify failed\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let sums = Command::new("sha256sum")
        .args(["--quiet", "-c", "SHA256SUMS"])
        .current_dir(bundle)
        .output()
        .expect("sha256sum");
    assert!(
        sums.status.success(),
        "sha256sum -c SHA256SUMS failed\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&sums.stdout),
        String::from_utf8_lossy(&sums.stderr)
    );
}

/// The output events of an asciicast v2 file, after checking that the first line is a JSON
/// header and every other line a JSON `[time, "o", "text"]` event.
#[track_caller]
pub fn cast_events(path: &Path) -> Vec<String> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().expect("a header line"))
        .unwrap_or_else(|e| panic!("{}: header is not JSON: {e}", path.display()));
    assert_eq!(header["version"], 2, "{}", path.display());
    lines
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: event {line:?} is not JSON: {e}", path.display()));
            let a = v.as_array().expect("an event is an array");
            assert!(
                a.len() == 3 && a[0].is_number() && a[1] == "o" && a[2].is_string(),
                "{}: not an output event: {line}",
                path.display()
            );
            a[2].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}
