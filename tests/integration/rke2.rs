//! The RKE2-on-Rocky-9 runbooks in `runbooks/`: every one passes `runbook check`; `runbook plan`
//! of each with the example inventory matches its snapshot in `tests/rke2-plans/`; secret
//! parameters given through the environment never appear in plan or dry-run output nor in the
//! dry-run's bundle; `--dry-run` of the deploy runbook runs the `terraform plan` and
//! `ansible-playbook --check` commands instead of the real ones; and the preflight checks run for
//! real on this machine (a local trial: the same shell, without SSH) and say which check failed
//! and why.
//!
//! Snapshots: after an intended change of a runbook, rewrite them with
//!
//! ```sh
//! RUNBOOK_BLESS=1 cargo test --test integration rke2
//! ```
//!
//! and review the diff of `tests/rke2-plans/*.txt` like any other change.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{all_files, BIN};

/// Distinctive values for every secret parameter of the RKE2 runbooks, set through the variables
/// their `env` names; none of them may show up in anything runbook prints or writes.
const SECRETS: &[(&str, &str)] = &[
    ("RKE2_TOKEN", "rke2tok-7f3a9c-sekrit"),
    ("S3_ACCESS_KEY", "AKIAETCDS3SEKRIT42"),
    ("S3_SECRET_KEY", "etcd-s3-secret-9b1e77"),
    ("LONGHORN_S3_ACCESS_KEY", "AKIALONGHORNSEKRIT7"),
    ("LONGHORN_S3_SECRET_KEY", "longhorn-s3-secret-c0ffee"),
    ("PROXMOX_TOKEN", "5e6f7a8b-pve-token-sekrit"),
    ("GRAFANA_TOKEN", "glsa_grafana_sekrit_0042"),
    ("RKE2_RESTORE_TOKEN", "K10restore-token-sekrit"),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The RKE2 runbooks: `runbooks/*.toml`, not the examples and not the schedules file.
fn runbooks() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("runbooks"))
        .expect("runbooks/")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "toml")
                && p.file_stem().is_some_and(|s| s != "schedules")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 6, "runbooks/ has {} runbooks", files.len());
    files
}

fn stem(p: &Path) -> String {
    p.file_stem().expect("stem").to_string_lossy().into_owned()
}

/// `runbook ARGS` in the repository root with the secrets in the environment.
fn runbook(args: &[&str], cwd: &Path, extra_env: &[(&str, String)]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("RUNBOOK_EVIDENCE_DIR")
        .env_remove("RUNBOOK_INVENTORY")
        .env_remove("RUST_LOG");
    for (k, v) in SECRETS {
        cmd.env(k, v);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().expect("run runbook")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn assert_no_secret(what: &str, haystack: &str) {
    for (var, value) in SECRETS {
        assert!(
            !haystack.contains(value),
            "{what} contains the value of {var}:\n{haystack}"
        );
    }
}

#[test]
fn every_rke2_runbook_passes_check() {
    for rb in runbooks() {
        let out = runbook(&["check", &rb.to_string_lossy()], &repo(), &[]);
        assert!(
            out.status.success(),
            "runbook check {}:\n{}",
            rb.display(),
            text(&out.stderr)
        );
    }
}

#[test]
fn plans_match_snapshots_and_hold_no_secret() {
    let bless = std::env::var_os("RUNBOOK_BLESS").is_some_and(|v| v == "1");
    let dir = repo().join("tests/rke2-plans");
    std::fs::create_dir_all(&dir).expect("tests/rke2-plans");
    let mut problems = Vec::new();
    for rb in runbooks() {
        let name = stem(&rb);
        let rel = format!("runbooks/{name}.toml");
        let out = runbook(&["plan", &rel], &repo(), &[]);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "runbook plan {rel}:\n{}",
            text(&out.stderr)
        );
        assert_no_secret(&format!("plan of {rel}"), &stdout);
        assert_no_secret(&format!("stderr of plan of {rel}"), &text(&out.stderr));
        let snapshot = dir.join(format!("{name}.txt"));
        if bless {
            std::fs::write(&snapshot, &stdout).expect("write snapshot");
            continue;
        }
        match std::fs::read_to_string(&snapshot) {
            Ok(want) if want == stdout => {}
            Ok(want) => {
                let line = stdout
                    .lines()
                    .zip(want.lines())
                    .position(|(g, w)| g != w)
                    .map_or_else(
                        || {
                            format!(
                                "{} lines, want {}",
                                stdout.lines().count(),
                                want.lines().count()
                            )
                        },
                        |n| format!("first difference at line {}", n + 1),
                    );
                problems.push(format!(
                    "{rel}: plan differs from tests/rke2-plans/{name}.txt ({line}); rerun with RUNBOOK_BLESS=1 if intended"
                ));
            }
            Err(_) => problems.push(format!(
                "{rel}: no snapshot; create it with RUNBOOK_BLESS=1"
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn plans_show_secrets_redacted_where_they_are_used() {
    let out = runbook(&["plan", "runbooks/rke2-vm-deploy.toml"], &repo(), &[]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("rke2_token = [REDACTED:rke2_token]"),
        "{stdout}"
    );
    assert!(stdout.contains("s3_secret_key = [REDACTED:s3_secret_key]"));
    // The config upload shows its template, not the token.
    assert!(
        stdout.contains("token: {{ params.rke2_token }}"),
        "{stdout}"
    );
}

/// Writes an executable stub that prints its name and arguments, standing in for a tool this
/// machine does not have (terraform, ansible-playbook) so the dry run's commands can be seen.
fn stub(dir: &Path, name: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\necho \"{name}-stub: $*\"\n")).expect("stub");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn dry_run_runs_the_plan_commands_and_leaks_no_secret() {
    let tmp = tempfile::tempdir().expect("tmp");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    stub(&bin, "terraform");
    stub(&bin, "ansible-playbook");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let deploy = repo().join("runbooks/rke2-vm-deploy.toml");
    let inventory = repo().join("runbooks/inventory/lab.toml");
    let out = runbook(
        &[
            "run",
            &deploy.to_string_lossy(),
            "--dry-run",
            "--stream",
            "--no-progress",
            "--evidence-dir",
            "proof",
            "--set",
            "ansible_playbook=site.yml",
            "--set",
            &format!("runbook_bin={BIN}"),
            "--set",
            &format!("inventory_file={}", inventory.display()),
        ],
        tmp.path(),
        &[("PATH", path)],
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "dry run failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // The resolved DAG first, then the side-effect-free commands, run.
    assert!(stdout.contains("level 0:"), "{stdout}");
    assert!(
        stderr.contains("terraform-stub: -chdir=infra/terraform/envs/lab plan -input=false -lock=false -var template_vmid=9000"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ansible-playbook-stub: -i rke2-work/hosts.ini site.yml --check --diff"),
        "{stderr}"
    );
    assert!(!stderr.contains("terraform-stub: -chdir=infra/terraform/envs/lab apply"));
    // The exported inventory Ansible was given is the lab inventory.
    let hosts = std::fs::read_to_string(tmp.path().join("rke2-work/hosts.ini")).expect("hosts.ini");
    assert!(
        hosts.contains("rke2-server-1") && hosts.contains("[agents]"),
        "{hosts}"
    );
    assert_no_secret("dry-run stdout", &stdout);
    assert_no_secret("dry-run stderr", &stderr);
    for f in all_files(&tmp.path().join("proof")) {
        let body = std::fs::read(&f).expect("read");
        assert_no_secret(&f.display().to_string(), &text(&body));
    }
}

/// The preflight as a local trial: the same checks, run by the real shell on this machine
/// instead of over SSH (the `on = "all"` lines removed, this machine treated as a server).
fn local_preflight(tmp: &Path) -> String {
    let text = std::fs::read_to_string(repo().join("runbooks/rke2-preflight.toml")).expect("read");
    let local: String = text
        .lines()
        .filter(|l| *l != "on = \"all\"" && !l.starts_with("inventory = "))
        .map(|l| l.replace("host.groups", "[\"servers\"]"))
        .collect::<Vec<_>>()
        .join("\n");
    let path = tmp.join("preflight-local.toml");
    std::fs::write(&path, local).expect("write");
    path.to_string_lossy().into_owned()
}

fn os_release_field(key: &str) -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_default()
}

#[test]
fn preflight_checks_run_for_real_and_name_what_failed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = local_preflight(tmp.path());
    let out = runbook(
        &["run", &file, "--no-progress", "--evidence-dir", "proof"],
        tmp.path(),
        &[],
    );
    let stderr = text(&out.stderr);
    let id = os_release_field("ID");
    let version = os_release_field("VERSION_ID");
    let bundle = crate::common::find_bundle(tmp.path());
    let log = |step: &str| {
        std::fs::read_to_string(bundle.join(format!("steps/{step}/local/attempt-1.log")))
            .unwrap_or_else(|e| panic!("log of {step}: {e}\n{stderr}"))
    };
    let os_log = log("os");
    let verdict = log("verdict");
    // Every check printed exactly one PASS or FAIL line, and the verdict repeats it.
    for check in [
        "os",
        "virt",
        "selinux",
        "cpu",
        "memory",
        "disk",
        "swap",
        "time-sync",
        "hostname",
        "ports",
        "nm-cni",
        "nm-cloud-setup",
    ] {
        let l = log(check);
        let said: Vec<&str> = l
            .lines()
            .filter(|x| x.contains(" out PASS ") || x.contains(" out FAIL "))
            .collect();
        assert_eq!(said.len(), 1, "{check}: {l}");
        let line = said[0].split(" out ").nth(1).expect("line");
        assert!(
            line.contains(": expected ") && line.contains("; found "),
            "{line}"
        );
        assert!(verdict.contains(line), "verdict lacks {line:?}:\n{verdict}");
    }
    if id == "rocky" && version.starts_with('9') {
        assert!(
            os_log.contains("PASS os: expected ID=rocky VERSION_ID=9.x"),
            "{os_log}"
        );
    } else {
        // On any other distribution (Debian here) the OS check fails and says what it found.
        assert!(
            os_log.contains(&format!(
                "FAIL os: expected ID=rocky VERSION_ID=9.x (Rocky Linux 9); found ID={id} VERSION_ID={version}"
            )),
            "{os_log}"
        );
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(verdict.contains("host local: FAIL"), "{verdict}");
        assert!(
            stderr.contains("preflight FAILED on 1 of 1 host(s): local"),
            "{stderr}"
        );
    }
}
