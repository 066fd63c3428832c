//! The deploy runbook's `configure_with=ansible` path against the RKE2 lab (docs/rke2/lab.md):
//! the real `runbook` binary runs its `ansible-rke2` step, which runs the real
//! `ansible-playbook` with the roles' `site.yml` over SSH against the lab's five nodes (real
//! sshds whose `/etc/os-release` says Rocky Linux 9), secrets in Ansible's environment.
//!
//! What the lab can and cannot run: Ansible's facts on the nodes say Rocky 9, so the roles'
//! platform guard passes; the first package task then stops, because the `dnf` module needs
//! the `python3-dnf` bindings on the node and the lab's `dnf` is a command, not a Python
//! package (asserted below, so the day the lab gains them this test says so). Everything the
//! roles write — config.yaml, CNI and add-on manifests, firewalld zones, sysctl, modules-load,
//! NetworkManager — runs for real on the nodes with the runtime tags skipped
//! (`--skip-tags packages,kernel-runtime,firewalld-runtime,services,install,verify`: no
//! packages, SELinux, firewalld runtime, modprobe or services). Then the runbook's own
//! install steps start RKE2 from the files the roles wrote, and the cluster forms: the roles'
//! config.yaml (token, `server:`, tls-san, CNI) is what the lab's RKE2 joins with.
//!
//! One lab for the whole file (lab tests serialize behind a machine-wide lock).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::{all_files, assert_bundle_lacks, BIN};
use crate::lab_harness::{nodes, repo, text, Lab};

const PLAYBOOKS: &str = "runbooks/deployment/containerization/kubernetes/rke2/playbooks";
const NODES: [&str; 5] = [
    "rke2-server-1",
    "rke2-server-2",
    "rke2-server-3",
    "rke2-agent-1",
    "rke2-agent-2",
];

/// `PATH` for the runbook: its own directory, the pip script directories (ansible-playbook as
/// scripts/test installs it), then the lab's (its kubectl and helm).
fn path_with_ansible(lab: &Lab) -> String {
    let mut dirs: Vec<PathBuf> = vec![Path::new(BIN).parent().expect("bin dir").to_path_buf()];
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".local/bin"));
    }
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
    {
        dirs.push(PathBuf::from(text(&out.stdout).trim()));
    }
    let mut path = std::env::join_paths(dirs)
        .expect("PATH")
        .to_string_lossy()
        .into_owned();
    path.push(':');
    path.push_str(&lab.var("PATH"));
    path
}

fn ansible_available(path: &str) -> bool {
    Command::new("sh")
        .args(["-c", "command -v ansible-playbook"])
        .env("PATH", path)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The `ansible-rke2` step's attempt logs in a bundle, joined.
fn step_logs(bundle: &Path, step: &str) -> String {
    all_files(&bundle.join("steps").join(step))
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "log"))
        .map(|f| std::fs::read_to_string(&f).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The result lines of the task whose name starts with `name` (up to the next task or the recap).
fn task_lines(log: &str, name: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for l in log.lines() {
        if l.contains("TASK [") || l.contains("PLAY RECAP") {
            inside = l.contains(&format!(" : {name}"));
            continue;
        }
        if inside {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn cat(lab: &Lab, node: &str, file: &str) -> String {
    let out = lab.exec(node, &["cat", file]);
    assert!(out.status.success(), "{node}:{file}: {}", text(&out.stderr));
    text(&out.stdout)
}

fn exists(lab: &Lab, node: &str, file: &str) -> bool {
    lab.exec(node, &["test", "-e", file]).status.success()
}

#[test]
fn deploy_with_the_ansible_roles_on_the_lab_checks_writes_the_nodes_and_the_cluster_forms() {
    let Some(lab) = Lab::up("127.0.181") else {
        return;
    };
    let path = path_with_ansible(&lab);
    assert!(
        ansible_available(&path),
        "ansible-playbook not found (scripts/test installs it)"
    );
    let playbooks = repo().join(PLAYBOOKS);
    let pb = format!("playbooks_dir={}", playbooks.display());
    let ansible = ["--set", "configure_with=ansible", "--set", pb.as_str()];
    // The nodes share this machine's python, whose login PATH may offer pyenv shims that do not
    // run: name the interpreter (a Rocky 9 VM's discovered one is /usr/bin/python3 too).
    let python = "ansible_extra_args=-e ansible_python_interpreter=/usr/bin/python3";
    // The runtime tags the lab cannot stand for (docs/rke2/ansible.md, "Tags"): RPMs and
    // SELinux (no python3-dnf, no SELinux kernel), this machine's kernel, daemons through
    // systemd, and the roles' own start of RKE2 (the runbook's install steps start it below).
    let files_only = [
        "--set",
        "ansible_extra_args=-e ansible_python_interpreter=/usr/bin/python3 --skip-tags packages,kernel-runtime,firewalld-runtime,services,install,verify",
    ];
    let nodes_net = "node_cidr=127.0.181.0/24";
    // Ansible's own files (control sockets, module temp dirs, on the runner and on the nodes,
    // which share this machine's /root) stay in the lab's temp dir and go with it.
    let scratch = lab.dir.path().join("ansible");
    let (home, local, remote) = (
        scratch.join("home").display().to_string(),
        scratch.join("local").display().to_string(),
        scratch.join("remote").display().to_string(),
    );
    let vars = [
        ("PATH", path.as_str()),
        ("ANSIBLE_HOME", home.as_str()),
        ("ANSIBLE_LOCAL_TEMP", local.as_str()),
        ("ANSIBLE_REMOTE_TEMP", remote.as_str()),
    ];
    let token = lab.var("RKE2_TOKEN");
    let s3 = lab.var("S3_SECRET_KEY");
    let lh = lab.var("LONGHORN_S3_SECRET_KEY");
    let config = "/etc/rancher/rke2/config.yaml";

    // 1. --dry-run, the roles as they are (check mode): facts say Rocky 9, the platform guard
    //    passes on all five nodes, and the first RPM task stops: no python3-dnf on the lab.
    //    (The lab's nodes lack /etc/yum.repos.d, which every Rocky 9 has: made here, as the
    //    repository task needs it; infra-requests.md asks the lab for it.)
    for n in NODES {
        let out = lab.exec(n, &["mkdir", "-p", "/etc/yum.repos.d"]);
        assert!(out.status.success(), "{n}: {}", text(&out.stderr));
    }
    let mut args = vec!["--dry-run"];
    args.extend(ansible);
    args.extend(["--set", python, "--set", nodes_net]);
    let full = lab.run("rke2-vm-deploy.toml", &args, &vars);
    assert_ne!(full.code(), Some(0), "{}", full.stderr());
    let log = step_logs(&full.bundle(), "ansible-rke2");
    let guard = task_lines(&log, "Check the platform (Rocky Linux / RHEL 9)");
    let packages = task_lines(&log, "Baseline packages");
    for n in NODES {
        assert!(guard.contains(&format!("ok: [{n}]")), "{n}: {guard}\n{log}");
        assert!(
            packages.contains(&format!("fatal: [{n}]")) && packages.contains("python3-dnf"),
            "{n}: {packages}\n{log}"
        );
    }
    assert!(!log.contains("rke2_baseline expects Rocky Linux"), "{log}");
    assert_bundle_lacks(&full.bundle(), &[&token, &s3, &lh]);

    // 2. --dry-run with the runtime tags skipped: check mode reports changes on every node,
    //    writes none.
    let mut args = vec!["--dry-run"];
    args.extend(ansible);
    args.extend(files_only);
    args.extend(["--set", nodes_net]);
    let check = lab.run("rke2-vm-deploy.toml", &args, &vars);
    check.assert_code(0);
    let log = step_logs(&check.bundle(), "ansible-rke2");
    assert!(log.contains("PLAY RECAP"), "{log}");
    for n in NODES {
        assert!(
            log.lines().any(|l| l.contains(&format!("out {n} "))
                && !l.contains("changed=0")
                && l.contains("failed=0")),
            "{n} not in the recap:\n{log}"
        );
        assert!(!exists(&lab, n, config), "check mode wrote {n}:{config}");
    }
    assert!(
        log.contains("<port port=\"9345\" protocol=\"tcp\"/>"),
        "{log}"
    );
    assert_bundle_lacks(&check.bundle(), &[&token, &s3, &lh]);

    // 3. For real, runtime tags skipped, through the runbook's hand-off (inventory export →
    //    ansible-rke2).
    let mut args = vec!["--only", "ansible-export", "--only", "ansible-rke2"];
    args.extend(ansible);
    args.extend(files_only);
    args.extend(["--set", nodes_net]);
    let real = lab.run("rke2-vm-deploy.toml", &args, &vars);
    real.assert_code(0);
    assert_eq!(real.status_of("ansible-rke2"), "succeeded");
    let api = lab.var("RKE2_API_HOST");
    let first = cat(&lab, "rke2-server-1", config);
    assert!(first.contains(&format!("token: \"{token}\"")), "{first}");
    assert!(
        !first.contains("server:"),
        "the first server bootstraps: {first}"
    );
    for n in ["rke2-server-2", "rke2-agent-1"] {
        let c = cat(&lab, n, config);
        assert!(
            c.contains(&format!("server: \"https://{api}:9345\"")),
            "{n}: {c}"
        );
        let mode = lab.exec(n, &["stat", "-c", "%a", config]);
        assert_eq!(text(&mode.stdout).trim(), "600", "{n}");
    }
    let manifests = "/var/lib/rancher/rke2/server/manifests";
    for f in [
        "rke2-cilium-config.yaml",
        "metallb-pool.yaml",
        "longhorn.yaml",
    ] {
        assert!(
            exists(&lab, "rke2-server-1", &format!("{manifests}/{f}")),
            "{f}"
        );
    }
    assert!(
        !exists(&lab, "rke2-agent-1", manifests),
        "agents get no server manifests"
    );
    let zone = "/etc/firewalld/zones/rke2-nodes.xml";
    let server_zone = cat(&lab, "rke2-server-3", zone);
    let agent_zone = cat(&lab, "rke2-agent-2", zone);
    for z in [&server_zone, &agent_zone] {
        assert!(z.contains("<port port=\"4244\" protocol=\"tcp\"/>"), "{z}");
        assert!(z.contains("<source address=\"127.0.181.0/24\"/>"), "{z}");
    }
    assert!(server_zone.contains("port=\"6443\""), "{server_zone}");
    assert!(!agent_zone.contains("port=\"6443\""), "{agent_zone}");
    // Per-host transcripts (the roles' callback) in the bundle, without a secret.
    let bundle = real.bundle();
    let transcripts: Vec<PathBuf> = all_files(&bundle)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "jsonl"))
        .filter(|f| f.to_string_lossy().contains("ansible-transcripts"))
        .collect();
    assert_eq!(transcripts.len(), 5, "{transcripts:?}");
    for t in &transcripts {
        let host = t.file_stem().expect("stem").to_string_lossy().into_owned();
        let body = std::fs::read_to_string(t).expect("transcript");
        for l in body.lines() {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            assert_eq!(v["host"], host.as_str());
        }
        assert!(body.contains("Config.yaml"), "{host}: {body}");
    }
    assert_bundle_lacks(&bundle, &[&token, &s3, &lh]);

    // 4. RKE2 started from the roles' files: the runbook's install, join and add-on steps (the
    //    roles' own need python3-dnf and `systemctl show`, which the lab's stand-ins lack). The
    //    config steps do not run (--from), so the servers and agents join with the roles'
    //    config.yaml.
    let formed = lab.run(
        "rke2-vm-deploy.toml",
        &["--from", "install-first-server"],
        &vars,
    );
    formed.assert_code(0);
    for n in ["rke2-server-2", "rke2-agent-2"] {
        assert!(
            cat(&lab, n, config).contains("# Every value is JSON-encoded"),
            "{n}: the roles' config.yaml was replaced"
        );
    }
    let got = nodes(&lab);
    assert_eq!(got.len(), 5, "{got:?}");
    for (name, status, _) in &got {
        assert_eq!(status, "Ready", "{name}");
    }
    assert_bundle_lacks(&formed.bundle(), &[&token, &s3, &lh]);
}
