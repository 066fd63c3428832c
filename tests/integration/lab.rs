//! The RKE2 runbooks end to end against the RKE2 lab (`scripts/lab`, docs/rke2/lab.md): real
//! sshds in their own mount and UTS namespaces on 127.0.x.y, a real etcd cluster under the
//! lab's `rke2`, the lab's `kubectl`/`helm` answering from it. Each test stands up its own lab
//! on its own loopback range, runs the real `runbook` binary with the environment the lab's
//! env file gives, checks the bundle and the cluster, and takes the lab down again (also when
//! it fails: `Lab` does it on drop). Lab tests run one at a time (a lock): each starts several
//! etcd members and sshds, and the machine has two cores.
//!
//! The lab needs root (namespaces, mounts), etcd/etcdctl and sshd; without them the tests say
//! so on stderr and pass without running (scripts/test installs the tools).

use std::path::Path;
use std::process::Output;

use crate::common::assert_bundle_lacks;
use crate::lab_harness::{lab_cmd, nodes, text, Lab};

#[test]
fn deploy_from_nothing_then_rerun_is_idempotent_and_never_downgrades() {
    let Some(lab) = Lab::up("127.0.177") else {
        return;
    };
    let version = lab.var("RKE2_VERSION");

    // From nothing: 3 servers, 2 agents.
    let first = lab.run("rke2-vm-deploy.toml", &[], &[]);
    first.assert_code(0);
    let manifest = first.manifest();
    assert_eq!(manifest["status"], "succeeded");
    for id in [
        "preflight",
        "node-prep",
        "install-first-server",
        "registration-address",
        "join-servers",
        "join-agents",
        "metallb-ready",
        "longhorn-backup-job",
        "baseline-snapshot",
        "health",
    ] {
        assert_eq!(first.status_of(id), "succeeded", "{id}");
    }
    let got = nodes(&lab);
    assert_eq!(got.len(), 5, "{got:?}");
    for (name, status, v) in &got {
        assert_eq!(status, "Ready", "{name}");
        assert_eq!(v, &version, "{name}");
    }
    // A real three-member etcd, and the snapshot on the first server's disk.
    let members = lab.exec(
        "rke2-server-1",
        &[
            "etcdctl",
            "--endpoints",
            "http://127.0.177.11:2379",
            "member",
            "list",
        ],
    );
    assert_eq!(
        text(&members.stdout).lines().count(),
        3,
        "{}",
        text(&members.stderr)
    );
    let snaps = lab.exec("rke2-server-1", &["rke2", "etcd-snapshot", "ls"]);
    assert!(
        text(&snaps.stdout).contains("post-deploy-rke2-server-1"),
        "{}",
        text(&snaps.stdout)
    );
    // The nodes got the secrets; nothing runbook wrote did.
    let token = lab.var("RKE2_TOKEN");
    let s3 = lab.var("S3_SECRET_KEY");
    let lh = lab.var("LONGHORN_S3_SECRET_KEY");
    assert_bundle_lacks(&first.bundle(), &[&token, &s3, &lh]);
    assert!(!first.stderr().contains(&token));
    let config = lab.exec("rke2-server-2", &["cat", "/etc/rancher/rke2/config.yaml"]);
    let config = text(&config.stdout);
    assert!(
        config.contains(&format!("token: \"{token}\"")),
        "quoted: {config}"
    );
    assert!(!config.contains("disable-kube-proxy: true"), "{config}");
    // RKE2 is versionlocked and its repos are off.
    let lock = lab.exec("rke2-agent-1", &["dnf", "versionlock", "list"]);
    assert!(
        text(&lock.stdout).contains("rke2-*"),
        "{}",
        text(&lock.stdout)
    );

    // Again: nothing reinstalled, the same cluster, one more snapshot.
    let again = lab.run("rke2-vm-deploy.toml", &[], &[]);
    again.assert_code(0);
    let log = std::fs::read_to_string(
        again
            .bundle()
            .join("steps/install-first-server/rke2-server-1/attempt-1.log"),
    )
    .expect("install log");
    assert!(
        !log.contains("installing rke2-server"),
        "re-run reinstalled: {log}"
    );
    assert_eq!(nodes(&lab).len(), 5);

    // A re-run with another version stops before touching any node (no downgrade).
    let older = lab.run(
        "rke2-vm-deploy.toml",
        &[],
        &[("RKE2_VERSION", "v1.33.3+rke2r1")],
    );
    older.assert_code(1);
    assert_eq!(older.status_of("installed"), "failed");
    assert_eq!(older.status_of("node-prep"), "skipped");
    for (name, _, v) in nodes(&lab) {
        assert_eq!(v, version, "{name} was changed");
    }
}

#[test]
fn disable_kube_proxy_with_canal_is_refused_before_anything_runs() {
    let Some(lab) = Lab::up("127.0.178") else {
        return;
    };
    let run = lab.run(
        "rke2-vm-deploy.toml",
        &["--set", "cni=canal", "--set", "kube_proxy_replacement=true"],
        &[],
    );
    run.assert_code(1);
    assert_eq!(run.status_of("prepare"), "failed");
    assert!(
        run.stderr()
            .contains("kube_proxy_replacement=true needs cni=cilium"),
        "{}",
        run.stderr()
    );
    assert_eq!(run.status_of("wait-ssh"), "skipped");
}

/// Every journal under `dir`, concatenated (the bundles of one work directory).
fn walk_journals(dir: &Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push_str(&walk_journals(&p));
        } else if p.file_name().is_some_and(|n| n == "journal.jsonl") {
            out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

/// Proxmox snapshots the lab holds for a VM (one directory per snapshot).
fn pve_snapshots(lab: &Lab, vmid: u32) -> Vec<String> {
    std::fs::read_dir(lab.labdir().join("pve").join(vmid.to_string()))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn rolling_upgrade_stops_at_a_failing_server_then_a_rerun_finishes_it() {
    let Some(lab) = Lab::up("127.0.179") else {
        return;
    };
    let from = lab.var("RKE2_VERSION");
    let to = "v1.33.5+rke2r1";
    lab.run("rke2-vm-deploy.toml", &[], &[]).assert_code(0);

    // rke2-server-2's install fails (a broken mirror): the run stops there.
    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-server-2", "fail-install"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let target = format!("target_version={to}");

    // Ctrl-C while the first server is being drained: the block's `run_on_cancel` uncordon
    // still runs, so no node is left cordoned (SchedulingDisabled).
    let (cwd, mut cmd) = lab.command("rke2-upgrade.toml", &["--set", &target], &[]);
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn upgrade");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    let journal = || -> String {
        let proof = cwd.join("proof");
        walk_journals(&proof)
    };
    while !journal().contains("\"target\":\"rke2-server-1/drain\"") {
        assert!(
            std::time::Instant::now() < deadline,
            "the drain never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "Ctrl-C mid-drain");
    for (name, status, _) in nodes(&lab) {
        assert_eq!(
            status, "Ready",
            "{name} left cordoned after Ctrl-C mid-drain"
        );
    }
    assert!(
        journal().contains("\"target\":\"rke2-server-1/uncordon\""),
        "the uncordon ran after the interrupt"
    );

    let failed = lab.run("rke2-upgrade.toml", &["--set", &target], &[]);
    failed.assert_code(1);
    assert_eq!(failed.status_of("pve-snapshot-wait"), "succeeded");
    assert_eq!(failed.status_of("upgrade-servers"), "failed");
    assert!(
        failed.manifest()["notes"]
            .to_string()
            .contains("upgrade-servers: gate before the first batch passed"),
        "the health gate ran before the first server was drained"
    );
    assert_eq!(failed.status_of("upgrade-agents"), "skipped");
    assert_eq!(failed.status_of("what-now"), "succeeded");
    let notes = failed.manifest()["notes"].to_string();
    assert!(
        notes.contains("upgrade stopped at [\\\"rke2-server-2\\\"]"),
        "{notes}"
    );
    assert!(notes.contains("re-run this runbook"), "{notes}");
    let got = nodes(&lab);
    let by = |n: &str| got.iter().find(|x| x.0 == n).cloned().expect(n);
    assert_eq!(by("rke2-server-1").2, to);
    assert_eq!(
        by("rke2-server-2").2,
        from,
        "failed install keeps the old version"
    );
    assert_eq!(
        by("rke2-server-2").1,
        "Ready",
        "uncordoned after the failure"
    );
    assert_eq!(
        by("rke2-server-3").2,
        from,
        "the next server was not touched"
    );
    assert_eq!(by("rke2-agent-1").2, from);
    // A failed (and an interrupted) run keeps its VM snapshots (the rollback path).
    for vmid in [201, 202, 203, 211, 212] {
        assert_eq!(pve_snapshots(&lab, vmid).len(), 2, "vm {vmid}");
    }

    // Mirror fixed: the same command finishes the job (a second snapshot name, no clash).
    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-server-2", "fix-install"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done = lab.run("rke2-upgrade.toml", &["--set", &target], &[]);
    done.assert_code(0);
    assert_eq!(done.status_of("verify"), "succeeded");
    assert_eq!(done.status_of("pve-snapshot-delete-wait"), "succeeded");
    for (name, status, v) in nodes(&lab) {
        assert_eq!((status.as_str(), v.as_str()), ("Ready", to), "{name}");
    }
    // This run's snapshots are deleted after verify; the failed and interrupted runs' stay.
    for vmid in [201, 202, 203, 211, 212] {
        assert_eq!(pve_snapshots(&lab, vmid).len(), 2, "vm {vmid}");
    }
    // Versionlock is back on after the upgrade.
    let lock = lab.exec("rke2-server-3", &["dnf", "versionlock", "list"]);
    assert!(
        text(&lock.stdout).contains("rke2-*"),
        "{}",
        text(&lock.stdout)
    );
}

#[test]
fn dr_restore_with_servers_0_lost_resets_where_the_snapshot_is_and_rolls_the_cluster_back() {
    let Some(lab) = Lab::up("127.0.180") else {
        return;
    };
    lab.run("rke2-vm-deploy.toml", &[], &[]).assert_code(0);
    let ok = |o: Output| assert!(o.status.success(), "{}", text(&o.stderr));
    ok(lab.kubectl(&["create", "namespace", "before-snapshot"]));
    // The snapshot is taken on rke2-server-2 and exists only there.
    ok(lab.exec(
        "rke2-server-2",
        &["rke2", "etcd-snapshot", "save", "--name", "dr"],
    ));
    let ls = text(
        &lab.exec("rke2-server-2", &["rke2", "etcd-snapshot", "ls"])
            .stdout,
    );
    let snap = ls
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|n| n.starts_with("dr-rke2-server-2-"))
        .expect("the snapshot")
        .to_owned();
    ok(lab.kubectl(&["create", "namespace", "after-snapshot"]));
    // servers[0] is gone for good.
    ok(lab_cmd(&lab.labdir(), &["fault", "rke2-server-1", "lose"]));

    let token = lab.var("RKE2_TOKEN");
    let snapshot = format!("snapshot={snap}");
    let args = [
        "--set",
        "confirm_cluster=lab",
        "--set",
        &snapshot,
        "--set",
        "snapshot_source=local",
        "--set",
        "delete_stale_nodes=true",
    ];
    let vars = [("RKE2_RESTORE_TOKEN", token.as_str())];
    // Stopping every server waits for a person's yes (exit 4), given on resume.
    let asked = lab.run("rke2-dr-restore.toml", &args, &vars);
    asked.assert_code(4);
    assert_eq!(asked.status_of("pick-reset"), "succeeded");
    let done = lab.resume(&asked, &["--approve", "stop-servers"], &vars);
    done.assert_code(0);
    let notes = done.manifest()["notes"].to_string();
    assert!(notes.contains("cluster-reset on rke2-server-2"), "{notes}");
    assert_bundle_lacks(&done.bundle(), &[&token]);

    // The cluster is the snapshot's: what came after it is gone.
    let ns = text(&lab.kubectl(&["get", "namespaces", "--no-headers"]).stdout);
    assert!(ns.contains("before-snapshot"), "{ns}");
    assert!(
        !ns.contains("after-snapshot"),
        "restore did not roll back: {ns}"
    );
    // Two servers in a real two-member etcd; the lost server's Node deleted.
    let got = nodes(&lab);
    let names: Vec<&str> = got.iter().map(|n| n.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "rke2-agent-1",
            "rke2-agent-2",
            "rke2-server-2",
            "rke2-server-3"
        ],
        "{got:?}"
    );
    for (name, status, _) in &got {
        assert_eq!(status, "Ready", "{name}");
    }
    let members = lab.exec(
        "rke2-server-2",
        &[
            "etcdctl",
            "--endpoints",
            "http://127.0.180.12:2379",
            "member",
            "list",
        ],
    );
    assert_eq!(
        text(&members.stdout).lines().count(),
        2,
        "{}",
        text(&members.stdout)
    );
    // `server:` was taken out for the reset only.
    let cfg = text(
        &lab.exec("rke2-server-2", &["cat", "/etc/rancher/rke2/config.yaml"])
            .stdout,
    );
    assert!(
        cfg.contains("server: \"https://127.0.180.10:9345\""),
        "{cfg}"
    );
    // The token file is gone.
    let tf = lab.exec(
        "rke2-server-2",
        &["test", "-e", "/var/lib/rancher/rke2/server/restore-token"],
    );
    assert!(!tf.status.success());
}
