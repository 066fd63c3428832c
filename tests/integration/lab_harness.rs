//! The RKE2 lab as the integration tests drive it: `Lab::up` stands up 3 servers and 2 agents
//! (`scripts/lab up`) under a machine-wide lock, runs the real `runbook` binary with the lab's
//! environment, and takes the lab down on drop. Used by `lab` (deploy, upgrade, restore, drill)
//! and `day2` (patching, maintenance, replacement, rotation).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::{find_bundle, read_json, step, BIN};

/// The machine-wide lock file: one lab at a time, across test binaries and checkouts (every lab
/// test, from any worktree, takes it before standing a lab up).
pub(crate) fn lock_path() -> PathBuf {
    std::env::temp_dir().join("runbook-lab.lock")
}

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A running lab; `scripts/lab down` on drop.
pub(crate) struct Lab {
    /// Held (flock) while the lab exists; dropped after `scripts/lab down`.
    _guard: nix::fcntl::Flock<std::fs::File>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) inventory: PathBuf,
    pub(crate) env: Vec<(String, String)>,
}

impl Lab {
    /// Stands up 3 servers and 2 agents on `subnet` (three octets in 127.0.0.0/8), or None with
    /// a note when this machine cannot run the lab.
    pub(crate) fn up(subnet: &str) -> Option<Lab> {
        let missing: Vec<&str> = ["etcd", "etcdctl", "unshare", "nsenter", "/usr/sbin/sshd"]
            .into_iter()
            .filter(|t| {
                !Command::new("sh")
                    .args(["-c", &format!("command -v {t}")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .collect();
        // The lab mounts and unshares: root only.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| text(&o.stdout).trim() == "0");
        if !root || !missing.is_empty() {
            eprintln!(
                "not run: the RKE2 lab needs root and {missing:?} (scripts/test installs them)"
            );
            return None;
        }
        let file = std::fs::File::create(lock_path()).expect("lab lock file");
        let guard = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("lab lock");
        let dir = tempfile::tempdir().expect("tmp");
        let labdir = dir.path().join("lab");
        let out = lab_cmd(&labdir, &["up", "--subnet", subnet]);
        let stdout = text(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        let mut lab = Lab {
            _guard: guard,
            inventory: PathBuf::from(lines.first().copied().unwrap_or_default()),
            env: Vec::new(),
            dir,
        };
        assert!(
            out.status.success() && lines.len() >= 2,
            "scripts/lab up failed:\n{}\n{}",
            stdout,
            text(&out.stderr)
        );
        let env_file = PathBuf::from(lines[lines.len() - 1]);
        assert_eq!(
            PathBuf::from(lines[lines.len() - 2]),
            lab.inventory,
            "the inventory is the second-to-last line"
        );
        lab.env = parse_env(&std::fs::read_to_string(&env_file).expect("env file"));
        Some(lab)
    }

    pub(crate) fn labdir(&self) -> PathBuf {
        self.dir.path().join("lab")
    }

    pub(crate) fn var(&self, k: &str) -> String {
        self.env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// `runbook run <runbook>` as an operator types it after sourcing the env file, from a
    /// work directory of its own, with `extra` arguments and `vars` over the env file's.
    pub(crate) fn run(&self, runbook: &str, extra: &[&str], vars: &[(&str, &str)]) -> Run {
        let (cwd, mut cmd) = self.command(runbook, extra, vars);
        let out = timed(&format!("run {runbook}"), &mut cmd);
        Run { cwd, out }
    }

    /// The command `run` runs, and its work directory.
    pub(crate) fn command(
        &self,
        runbook: &str,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> (PathBuf, Command) {
        let cwd = self.dir.path().join(format!("run-{}", self.dir_count()));
        std::fs::create_dir_all(&cwd).expect("cwd");
        let bindir = Path::new(BIN).parent().expect("bin dir");
        let mut cmd = Command::new(BIN);
        cmd.current_dir(&cwd)
            .args([
                "run",
                &repo().join("runbooks").join(runbook).to_string_lossy(),
            ])
            .args([
                "--inventory",
                &self.inventory.to_string_lossy(),
                "--no-progress",
            ])
            .args(extra)
            .env("NO_COLOR", "1")
            // The run's own `proof/`, whatever `evidence_dir` the runbook names (the
            // deploy names the decision record's path inside the repository).
            .env("RUNBOOK_EVIDENCE_DIR", cwd.join("proof"))
            .env_remove("RUST_LOG");
        if runbook == "rke2-vm-deploy.toml" {
            // The nested preflight is found in the repository, wherever the run starts.
            let dir = repo().join("runbooks");
            cmd.args(["--set", &format!("runbooks_dir={}", dir.display())]);
        }
        for (k, v) in &self.env {
            let v = if k == "PATH" {
                format!("{}:{v}", bindir.display())
            } else {
                v.clone()
            };
            cmd.env(k, v);
        }
        for (k, v) in vars {
            cmd.env(k, v);
        }
        (cwd, cmd)
    }

    /// `runbook resume BUNDLE …` of an earlier run, in its directory, with the same environment.
    pub(crate) fn resume(&self, run: &Run, extra: &[&str], vars: &[(&str, &str)]) -> Run {
        let bindir = Path::new(BIN).parent().expect("bin dir");
        let mut cmd = Command::new(BIN);
        cmd.current_dir(&run.cwd)
            .arg("resume")
            .arg(run.bundle())
            .arg("--no-progress")
            .args(extra)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG");
        for (k, v) in &self.env {
            let v = if k == "PATH" {
                format!("{}:{v}", bindir.display())
            } else {
                v.clone()
            };
            cmd.env(k, v);
        }
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = timed("resume", &mut cmd);
        Run {
            cwd: run.cwd.clone(),
            out,
        }
    }

    pub(crate) fn dir_count(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The lab's kubectl against the deployed cluster (the kubeconfig the deploy wrote).
    pub(crate) fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.labdir().join("bin/kubectl"))
            .args(args)
            .env("KUBECONFIG", self.var("KUBECONFIG"))
            .output()
            .expect("kubectl")
    }

    /// A command inside a node (`scripts/lab exec`).
    pub(crate) fn exec(&self, node: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", node];
        args.extend_from_slice(cmd);
        lab_cmd(&self.labdir(), &args)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = lab_cmd(&self.labdir(), &["down"]);
        if !out.status.success() {
            eprintln!("scripts/lab down: {}", text(&out.stderr));
        }
    }
}

/// Runs `cmd` and prints how long it took (`[lab-timing]`, seen with `--nocapture`), and its
/// console too with `LAB_TIMING_OUT=1`: where the lab scenarios' time goes.
fn timed(label: &str, cmd: &mut Command) -> Output {
    let t0 = std::time::Instant::now();
    let out = cmd.output().expect("runbook");
    eprintln!("[lab-timing] {label} {:.1}s", t0.elapsed().as_secs_f64());
    if std::env::var_os("LAB_TIMING_OUT").is_some() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

pub(crate) fn lab_cmd(labdir: &Path, args: &[&str]) -> Output {
    let (verb, rest) = args.split_first().expect("verb");
    Command::new(repo().join("scripts/lab"))
        .arg(verb)
        .arg("--dir")
        .arg(labdir)
        .args(rest)
        .output()
        .expect("scripts/lab")
}

/// `export K="V"` lines of the env file (`$PATH` expanded).
pub(crate) fn parse_env(body: &str) -> Vec<(String, String)> {
    body.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim_matches('"');
            let v = v.replace("$PATH", &std::env::var("PATH").unwrap_or_default());
            (k.to_owned(), v)
        })
        .collect()
}

pub(crate) struct Run {
    pub(crate) cwd: PathBuf,
    pub(crate) out: Output,
}

impl Run {
    pub(crate) fn code(&self) -> Option<i32> {
        self.out.status.code()
    }

    pub(crate) fn stderr(&self) -> String {
        text(&self.out.stderr)
    }

    pub(crate) fn bundle(&self) -> PathBuf {
        find_bundle(&self.cwd)
    }

    pub(crate) fn manifest(&self) -> Value {
        read_json(&self.bundle().join("manifest.json"))
    }

    #[track_caller]
    pub(crate) fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "--- stdout\n{}\n--- stderr\n{}",
            text(&self.out.stdout),
            self.stderr()
        );
        self
    }

    pub(crate) fn status_of(&self, id: &str) -> String {
        step(&self.manifest(), id)["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// `NAME STATUS … VERSION` rows of `kubectl get nodes --no-headers`.
pub(crate) fn nodes(lab: &Lab) -> Vec<(String, String, String)> {
    let out = lab.kubectl(&["get", "nodes", "--no-headers"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c[0].to_owned(), c[1].to_owned(), c[4].to_owned())
        })
        .collect()
}
