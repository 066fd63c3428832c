//! The RKE2-on-Rocky-9 runbooks in `runbooks/`: every one passes `runbook check`; `runbook plan`
//! of each with the example inventory matches its snapshot in `tests/rke2-plans/`; secret
//! parameters given through the environment never appear in plan or dry-run output nor in the
//! dry-run's bundle; `--dry-run` of the deploy runbook runs the `terraform plan` and
//! `ansible-playbook --check` commands instead of the real ones; and the preflight checks run for
//! real on this machine (a local trial: the same shell, without SSH) and say which check failed
//! and why. Against the real sshds of the test harness (`steps/tests/support/sshd.rs`): the
//! preflight runs over SSH on every host and its per-host verdicts are asserted, and the deploy
//! runbook stops at `sudo-check` on hosts without root or passwordless sudo. The runbooks run
//! end to end against the RKE2 lab in `lab.rs`.
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

use serde_json::Value;

use crate::common::{all_files, find_bundle, read_json, BIN};
use crate::hosts::sshd::{self, Sshd};

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
    // The config upload shows its template (the token quoted as a JSON string), not the token.
    assert!(
        stdout.contains("token: {{ to_json(params.rke2_token) }}"),
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
        stderr.contains("terraform-stub: -chdir=runbooks/infra/terraform/envs/lab plan -input=false -lock=false -var template_vmid=9000"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ansible-playbook-stub: -i rke2-work/hosts.ini site.yml --check --diff"),
        "{stderr}"
    );
    assert!(!stderr.contains("terraform-stub: -chdir=runbooks/infra/terraform/envs/lab apply"));
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

/// `--dry-run` with `configure_with=ansible` and `hypervisor=vsphere`: the vSphere env's
/// `terraform plan` with its template variable, and the roles' `site.yml` in `--check --diff`
/// with the secrets in Ansible's environment (read by vars/from-env.yml), never its arguments.
#[test]
fn dry_run_with_the_ansible_roles_on_vsphere_plans_the_vsphere_env_and_checks_the_roles() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    stub(&bin, "terraform");
    // Prints its arguments and how long the secrets it got through the environment are.
    let ansible = bin.join("ansible-playbook");
    std::fs::write(
        &ansible,
        "#!/bin/sh\necho \"ansible-playbook-stub: $*\"\necho \"ansible-env: token=${#RKE2_TOKEN} s3=${#S3_SECRET_KEY} longhorn=${#LONGHORN_S3_SECRET_KEY} config=$ANSIBLE_CONFIG transcripts=$RUNBOOK_TRANSCRIPT_DIR\"\n",
    )
    .expect("stub");
    std::fs::set_permissions(&ansible, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let deploy = repo().join("runbooks/rke2-vm-deploy.toml");
    let inventory = repo().join("runbooks/inventory/lab.toml");
    let playbooks = repo().join("runbooks/deployment/containerization/kubernetes/rke2/playbooks");
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
            "configure_with=ansible",
            "--set",
            "hypervisor=vsphere",
            "--set",
            &format!("playbooks_dir={}", playbooks.display()),
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
    assert!(
        stderr.contains("terraform-stub: -chdir=runbooks/infra/terraform/envs/lab-vsphere plan -input=false -lock=false -var template_name=rocky9-rke2"),
        "{stderr}"
    );
    assert!(!stderr.contains("template_vmid"), "{stderr}");
    let site = format!(
        "ansible-playbook-stub: -i rke2-work/hosts.ini {}/site.yml --check --diff -e @{}/vars/from-env.yml -e ",
        playbooks.display(),
        playbooks.display()
    );
    let line = stderr
        .lines()
        .find_map(|l| l.split_once(&site).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no `{site}` in\n{stderr}"));
    // The non-secret values as one JSON extra-vars argument the roles read.
    let vars: Value = serde_json::from_str(line.trim()).expect("extra vars are JSON");
    assert_eq!(vars["rke2_version"], "v1.33.4+rke2r1");
    assert_eq!(vars["rke2_cni"], "cilium");
    assert_eq!(vars["rke2_node_cidrs"], serde_json::json!(["10.0.10.0/24"]));
    assert_eq!(vars["rke2_addons_metallb_range"], "10.0.10.200-10.0.10.220");
    assert!(vars.get("rke2_token").is_none(), "{vars}");
    let env = |k: &str| SECRETS.iter().find(|(n, _)| *n == k).expect(k).1.len();
    assert!(
        stderr.contains(&format!(
            "ansible-env: token={} s3={} longhorn={} config={}/ansible.cfg transcripts={}/rke2-work/ansible-transcripts",
            env("RKE2_TOKEN"),
            env("S3_SECRET_KEY"),
            env("LONGHORN_S3_SECRET_KEY"),
            playbooks.display(),
            tmp.path().display()
        )),
        "{stderr}"
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

/// The preflight's checks, in the runbook's order.
const CHECKS: &[&str] = &[
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
];

/// The harness's sshds as RKE2 nodes: `rke2-server-N` in `servers` for the first `servers`,
/// `rke2-agent-N` in `agents` for the rest, each line of `vars(name)` added to its table.
fn node_inventory(
    sshds: &[Sshd],
    servers: usize,
    vars: impl Fn(&str) -> Option<String>,
) -> (String, Vec<String>) {
    let mut toml = String::new();
    let mut names = Vec::new();
    for (i, s) in sshds.iter().enumerate() {
        let (name, group) = if i < servers {
            (format!("rke2-server-{}", i + 1), "servers")
        } else {
            (format!("rke2-agent-{}", i + 1 - servers), "agents")
        };
        toml.push_str(&format!(
            "[hosts.{name}]\naddress = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nidentity_file = \"{}\"\nknown_hosts = \"{}\"\ngroups = [\"{group}\"]\n",
            s.port(),
            s.user(),
            s.client_key_path().display(),
            s.known_hosts_path().display(),
        ));
        if let Some(v) = vars(&name) {
            toml.push_str(&format!("vars = {{ {v} }}\n"));
        }
        names.push(name);
    }
    (toml, names)
}

/// `sh -c CMD` on this machine (the sshd hosts are this machine too), stdout trimmed.
fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("run sh");
    text(&out.stdout).trim().to_owned()
}

/// The `PASS …`/`FAIL …` lines a step printed on stdout on a host, in order.
fn verdict_lines(bundle: &Path, step: &str, host: &str) -> Vec<String> {
    let path = bundle.join(format!("steps/{step}/{host}/attempt-1.log"));
    let log = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    log.lines()
        .filter_map(|l| l.split_once(" out ").map(|(_, rest)| rest))
        .filter(|l| l.starts_with("PASS ") || l.starts_with("FAIL "))
        .map(str::to_owned)
        .collect()
}

/// The one `PASS …`/`FAIL …` line a check printed on a host.
fn verdict_line(bundle: &Path, step: &str, host: &str) -> String {
    let said = verdict_lines(bundle, step, host);
    assert_eq!(said.len(), 1, "{step} on {host}: {said:?}");
    said[0].clone()
}

/// `status` of every target of a step in the manifest, by host.
fn target_status(manifest: &Value, step: &str) -> std::collections::BTreeMap<String, String> {
    crate::common::step(manifest, step)["targets"]
        .as_array()
        .unwrap_or_else(|| panic!("{step} has targets"))
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap_or_default().to_owned(),
                t["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn preflight_over_ssh_reports_every_check_per_host() {
    let sshds = Sshd::start_many(3);
    let (inventory, hosts) = node_inventory(&sshds, 2, |_| None);
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(tmp.path().join("inventory.toml"), inventory).expect("inventory");
    let preflight = repo().join("runbooks/rke2-preflight.toml");
    let out = runbook(
        &[
            "run",
            &preflight.to_string_lossy(),
            "--inventory",
            "inventory.toml",
            "--no-progress",
            "--evidence-dir",
            "proof",
        ],
        tmp.path(),
        &[],
    );
    let stderr = text(&out.stderr);
    let bundle = find_bundle(tmp.path());
    let manifest = read_json(&bundle.join("manifest.json"));
    // The inventory the run used is in the bundle, digested, and the report names it.
    let inv_sha = manifest["inventory"]["sha256"]
        .as_str()
        .expect("inventory digest");
    let report = std::fs::read_to_string(bundle.join("report.html")).expect("report");
    assert!(report.contains("Inventory file") && report.contains(inv_sha));

    // Every check ran on every host and said one PASS or FAIL line with what it expected and
    // found; the manifest's per-host status agrees with the line.
    let mut failed: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    for check in CHECKS {
        let status = target_status(&manifest, check);
        assert_eq!(
            status.keys().cloned().collect::<Vec<_>>(),
            {
                let mut h = hosts.clone();
                h.sort();
                h
            },
            "{check}: {stderr}"
        );
        for host in &hosts {
            let line = verdict_line(&bundle, check, host);
            assert!(
                line.starts_with(&format!("PASS {check}: expected "))
                    || line.starts_with(&format!("FAIL {check}: expected ")),
                "{line}"
            );
            assert!(line.contains("; found "), "{line}");
            let want = if line.starts_with("PASS") {
                "succeeded"
            } else {
                "failed"
            };
            assert_eq!(status[host], want, "{check} on {host}: {line}");
            if want == "failed" {
                failed.entry(host.clone()).or_default().push(check);
            }
        }
    }

    // The OS check: on this Debian machine it fails on every host, saying which host, what the
    // decision wants and what the host has.
    let (id, version) = (os_release_field("ID"), os_release_field("VERSION_ID"));
    let pretty = os_release_field("PRETTY_NAME");
    for host in &hosts {
        let line = verdict_line(&bundle, "os", host);
        if id == "rocky" && version.starts_with('9') {
            assert!(line.starts_with("PASS os: "), "{line}");
            continue;
        }
        assert_eq!(
            line,
            format!("FAIL os: expected ID=rocky VERSION_ID=9.x (Rocky Linux 9); found ID={id} VERSION_ID={version} ({pretty})")
        );
        assert!(
            stderr.lines().any(
                |l| l.contains(&format!("! os on {host} attempt 1: exit code 1"))
                    && l.contains(&line)
            ),
            "no console line for os on {host}:\n{stderr}"
        );
    }

    // What can pass on this machine passes, and what the hosts report is what this machine has.
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    let no_swap = swaps.lines().count() <= 1;
    let no_nm =
        !Path::new("/etc/NetworkManager").exists() && sh("command -v NetworkManager").is_empty();
    let cpus: usize = sh("nproc --all").parse().unwrap_or(0);
    let uname = sh("uname -n");
    let disk_gib = sh("lsblk -dnbo SIZE,TYPE")
        .lines()
        .filter_map(|l| l.split_once(' ').filter(|(_, t)| t.trim() == "disk"))
        .filter_map(|(size, _)| size.trim().parse::<u64>().ok())
        .sum::<u64>()
        / (1 << 30);
    for host in &hosts {
        let role = if host.starts_with("rke2-server") {
            "a server"
        } else {
            "an agent"
        };
        let line = |check| verdict_line(&bundle, check, host);
        if no_swap {
            assert_eq!(
                line("swap"),
                "PASS swap: expected no active swap; found none"
            );
        }
        if no_nm {
            assert!(
                line("nm-cni").starts_with("PASS nm-cni: ")
                    && line("nm-cni").ends_with("found NetworkManager not installed"),
                "{}",
                line("nm-cni")
            );
        }
        if cpus >= 2 {
            assert_eq!(
                line("cpu"),
                format!("PASS cpu: expected >= 2 vCPU for {role}; found {cpus}")
            );
        }
        if disk_gib > 0 {
            // The total of the whole disks, in GiB (not clipped by awk's 32-bit %d).
            assert!(
                line("disk").contains(&format!("for {role}; found {disk_gib} GiB (")),
                "{} (lsblk: {disk_gib} GiB)",
                line("disk")
            );
        }
        if !uname.starts_with("localhost") {
            assert_eq!(
                line("hostname"),
                format!("PASS hostname: expected a node name that is not localhost; found {uname}")
            );
        }
        assert!(line("memory").contains(&format!("GiB for {role}; found ")));
        assert!(line("ports").contains(&format!(" free on {role}; found ")));
    }

    // The verdict: a block per host repeating each check's line, the hostname every node
    // shares (they are all this machine) named as a duplicate, and the run's failure saying
    // which checks failed on which host.
    let verdict = std::fs::read_to_string(bundle.join("steps/verdict/local/attempt-1.log"))
        .expect("verdict log");
    let reason = crate::common::step(&manifest, "verdict")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.starts_with(&format!(
            "preflight FAILED on {n} of {n} host(s): ",
            n = hosts.len()
        )),
        "{reason}"
    );
    for host in &hosts {
        // The others in name order, as the verdict lists them.
        let mut others: Vec<&str> = hosts
            .iter()
            .filter(|h| *h != host)
            .map(String::as_str)
            .collect();
        others.sort_unstable();
        let mut checks = failed.get(host).cloned().unwrap_or_default();
        // Uniqueness is judged among the hostnames the `hostname` check accepted.
        let named = !checks.contains(&"hostname");
        if named {
            checks.push("hostname-unique");
        }
        assert!(
            verdict.contains(&format!(
                "out host {host}: FAIL ({} check(s) failed)",
                checks.len()
            )),
            "{verdict}"
        );
        for check in CHECKS {
            assert!(
                verdict.contains(&format!("out   {}", verdict_line(&bundle, check, host))),
                "verdict lacks {check} of {host}:\n{verdict}"
            );
        }
        assert!(
            !named || verdict.contains(&format!(
                "out   FAIL hostname-unique: expected a hostname no other node has; found {uname}, also on {}",
                others.join(", ")
            )),
            "{verdict}"
        );
        assert!(
            reason.contains(&format!("{host} ({})", checks.join(", "))),
            "{host} ({}) not in: {reason}",
            checks.join(", ")
        );
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("verdict failed: {reason}")),
        "{stderr}"
    );
}

/// A run of the deploy runbook against three sshds (two servers, one agent) with provisioning
/// and the nested preflight off, as a login without root or passwordless sudo: it must stop at
/// sudo-check, naming every node, before changing anything (the full deploy runs on the lab:
/// tests/integration/lab.rs).
struct DeployRun {
    tmp: tempfile::TempDir,
    hosts: Vec<String>,
    stderr: String,
    code: Option<i32>,
}

/// [`DeployRun`] against the given sshds, the runbook as `edit` leaves it.
fn deploy_run_on(sshds: &[Sshd], edit: impl Fn(String) -> String) -> DeployRun {
    let tmp = tempfile::tempdir().expect("tmp");
    let (inventory, hosts) = node_inventory(sshds, 2, |_| None);
    std::fs::write(tmp.path().join("inventory.toml"), inventory).expect("inventory");
    let text_of = std::fs::read_to_string(repo().join("runbooks/rke2-vm-deploy.toml"))
        .expect("deploy runbook");
    let deploy = tmp.path().join("rke2-vm-deploy.toml");
    std::fs::write(&deploy, edit(text_of)).expect("write runbook");
    let out = runbook(
        &[
            "run",
            &deploy.to_string_lossy(),
            "--inventory",
            "inventory.toml",
            "--no-progress",
            "--evidence-dir",
            "proof",
            "--set",
            "provision=false",
            "--set",
            "run_preflight=false",
        ],
        tmp.path(),
        &[],
    );
    DeployRun {
        hosts,
        stderr: text(&out.stderr),
        code: out.status.code(),
        tmp,
    }
}

impl DeployRun {
    /// Exit 1 at sudo-check, every host named with its FAIL line, nothing after it run.
    #[track_caller]
    fn assert_stopped_at_sudo_check(&self, user: &str) {
        assert_eq!(self.code, Some(1), "{}", self.stderr);
        let bundle = find_bundle(self.tmp.path());
        let manifest = read_json(&bundle.join("manifest.json"));
        let step = crate::common::step(&manifest, "sudo-check");
        assert_eq!(step["status"], "failed");
        let reason = step["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("3 of 3 host(s) failed"), "{reason}");
        for host in &self.hosts {
            let line = verdict_line(&bundle, "sudo-check", host);
            assert!(
                line.starts_with(&format!(
                    "FAIL sudo: expected root or passwordless sudo for {user}; found "
                )) && line.ends_with(&format!(
                    "(give {user} NOPASSWD sudo, e.g. in /etc/sudoers.d/)"
                )),
                "{line}"
            );
        }
        for id in ["node-prep", "config-dirs", "install-first-server"] {
            assert_eq!(
                crate::common::step(&manifest, id)["status"],
                "skipped",
                "{id}"
            );
        }
    }
}

/// The deploy runbook with its sudo-check seeing no root and a sudo that wants a password.
fn without_sudo(t: String) -> String {
    let probe = "if [ \"$(id -u)\" -eq 0 ]; then";
    let sudo = "elif err=$(sudo -n true 2>&1); then";
    assert!(t.contains(probe) && t.contains(sudo), "sudo-check changed");
    t.replace(probe, "if false; then").replace(
        sudo,
        "elif err=$(echo 'sudo: a password is required'; false); then",
    )
}

#[test]
fn a_deploy_without_sudo_stops_at_sudo_check_naming_the_nodes() {
    let sshds = Sshd::start_many(3);
    let run = deploy_run_on(&sshds, without_sudo);
    run.assert_stopped_at_sudo_check(sshds[0].user());
}

/// Three sshds whose login is a fresh account without sudo rights, or None (and a note on
/// stderr) when this runner cannot make one (not root).
fn unprivileged_nodes() -> Option<(sshd::TempUser, Vec<Sshd>)> {
    let Some(user) = sshd::TempUser::create() else {
        eprintln!("not run: making an unprivileged account needs root and useradd");
        return None;
    };
    let sshds = (0..3).map(|_| Sshd::start_for_user(&user)).collect();
    Some((user, sshds))
}

/// The no-sudo path for real: the nodes' login is an account of its own with no password and
/// no sudoers entry, so `sudo -n` genuinely refuses.
#[test]
fn a_deploy_as_an_unprivileged_user_stops_at_sudo_check() {
    let Some((user, sshds)) = unprivileged_nodes() else {
        return;
    };
    let run = deploy_run_on(&sshds, |t| t);
    run.assert_stopped_at_sudo_check(&user.name);
}

/// The shell of every `sh '…'` and `sh '''…'''` step of the example Jenkinsfile, in order.
fn jenkins_sh_steps(jenkinsfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = jenkinsfile;
    while let Some(i) = rest.find("sh '") {
        let after = &rest[i + 3..];
        let (quote, body) = if let Some(b) = after.strip_prefix("'''") {
            ("'''", b)
        } else {
            ("'", &after[1..])
        };
        let end = body.find(quote).expect("closing quote");
        out.push(body[..end].to_owned());
        rest = &body[end + quote.len()..];
    }
    out
}

/// `sh -xe -c` as Jenkins runs a shell step, in `cwd`, with the built `runbook` first on PATH.
fn jenkins_sh(script: &str, cwd: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let bindir = Path::new(BIN).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bindir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-xe", "-c", script])
        .current_dir(cwd)
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .env_remove("RUNBOOK_EVIDENCE_DIR")
        .env_remove("RUNBOOK_INVENTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("sh")
}

/// The example Jenkinsfile's shell steps, run as Jenkins would in a workspace holding the
/// repository's runbooks: Check checks every runbook but not `schedules.toml` (which the old
/// `runbook check runbooks/*.toml` failed on with exit 2, failing every build), the schedule
/// file is validated on its own, the kubeconfig credential lands in `rke2-work/kubeconfig`
/// (0600), the Run command works for a dry run, and the post step verifies the bundles.
#[test]
fn jenkinsfile_shell_steps_run_and_check_only_runbooks() {
    use std::os::unix::fs::PermissionsExt;
    let jf =
        std::fs::read_to_string(repo().join("docs/examples/Jenkinsfile")).expect("Jenkinsfile");
    let steps = jenkins_sh_steps(&jf);
    let ws = tempfile::tempdir().expect("tmp");
    let copy = Command::new("cp")
        .arg("-r")
        .arg(repo().join("runbooks"))
        .arg(ws.path())
        .status()
        .expect("cp");
    assert!(copy.success());

    // The defect: checking every .toml includes the schedule file.
    let old = jenkins_sh("runbook check runbooks/*.toml", ws.path(), &[]);
    assert_eq!(old.status.code(), Some(2), "{}", text(&old.stderr));

    let check = steps
        .iter()
        .find(|s| s.contains("runbook check"))
        .expect("a Check step");
    let out = jenkins_sh(check, ws.path(), &[]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    for rb in [
        "rke2-vm-deploy",
        "rke2-upgrade",
        "rke2-dr-restore",
        "rke2-dr-drill",
        "rke2-preflight",
    ] {
        assert!(
            err.contains(&format!("runbook check runbooks/{rb}.toml")),
            "{err}"
        );
    }
    assert!(
        !err.contains("runbook check runbooks/schedules.toml"),
        "{err}"
    );
    assert!(
        err.contains("runbook schedule list runbooks/schedules.toml"),
        "{err}"
    );

    let state = steps
        .iter()
        .find(|s| s.contains("rke2-work/kubeconfig"))
        .expect("the kubeconfig credential step");
    let kc = ws.path().join("credential-kubeconfig");
    std::fs::write(&kc, "apiVersion: v1\nkind: Config\n").expect("kc");
    let out = jenkins_sh(state, ws.path(), &[("KC", &kc.to_string_lossy())]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = ws.path().join("rke2-work/kubeconfig");
    assert_eq!(
        std::fs::read_to_string(&written).expect("kubeconfig"),
        "apiVersion: v1\nkind: Config\n"
    );
    assert_eq!(
        std::fs::metadata(&written)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // The Run stage's command (a Groovy string) with a dry run of the preflight.
    let run_line = jf
        .lines()
        .find(|l| l.contains("runbook run runbooks/${name}.toml"))
        .expect("the Run command");
    let script = run_line
        .split("script: \"")
        .nth(1)
        .and_then(|s| s.rsplit_once("\")"))
        .map(|(s, _)| s)
        .expect("script string");
    let script = script
        .replace("${name}", "rke2-preflight")
        .replace("${mode}", "--dry-run")
        .replace("${inv}", "")
        .replace("${params.EXTRA}", "");
    let out = jenkins_sh(&script, ws.path(), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(ws.path().join("report.json").exists());

    // A bundle to verify, then the post step.
    let tiny = ws.path().join("tiny.toml");
    std::fs::write(
        &tiny,
        "[runbook]\nname = \"tiny\"\n[[steps]]\nid = \"a\"\nrun = \"true\"\n",
    )
    .expect("tiny");
    let made = jenkins_sh(
        "runbook run tiny.toml --no-progress --evidence-dir proof",
        ws.path(),
        &[],
    );
    assert!(made.status.success(), "{}", text(&made.stderr));
    let verify = steps
        .iter()
        .find(|s| s.contains("runbook evidence verify"))
        .expect("the post verify step");
    let out = jenkins_sh(verify, ws.path(), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // `verify` reports on stderr, data to stdout.
    let said = text(&out.stderr);
    assert!(said.contains("/: ok"), "{said}");
}
